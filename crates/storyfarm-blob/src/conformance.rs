//! The conformance suite every [`BlobStore`] backend must pass (feature `testing`).
//!
//! Run it from a backend's test with [`run_all`]. Each check writes under a namespace unique to the
//! run, and content-addressed checks hash bytes unique to the run, so a store that already holds
//! data (a reused bucket or directory) does not disturb it. Failures panic naming the check.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{BlobError, BlobKey, BlobStore};

/// Runs every check against `store`, one after the other.
pub async fn run_all(store: Arc<dyn BlobStore>) {
    let run = ConformanceRun::new();
    round_trip(store.as_ref(), &run).await;
    idempotent_put(store.as_ref(), &run).await;
    content_addressing(store.as_ref(), &run).await;
    missing_keys_are_not_found(store.as_ref(), &run).await;
    exists_delete_and_list_with_prefix(store.as_ref(), &run).await;
    large_object(store.as_ref(), &run).await;
    concurrent_puts_of_one_key(&store, &run).await;
    invalid_keys_are_rejected(store.as_ref()).await;
}

/// What makes one run's keys and bytes unique.
pub struct ConformanceRun {
    id: String,
}

impl ConformanceRun {
    pub fn new() -> ConformanceRun {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ConformanceRun {
            id: format!("conformance-{}-{nanos}", std::process::id()),
        }
    }

    fn key(&self, relative: &str) -> BlobKey {
        BlobKey::new(format!("{}/{relative}", self.id)).expect("conformance keys are valid")
    }

    fn prefix(&self, relative: &str) -> String {
        format!("{}/{relative}", self.id)
    }

    /// `length` bytes unique to this run and `label`, not all equal (a torn write would show).
    fn bytes(&self, label: &str, length: usize) -> Bytes {
        let seed = format!("{}/{label}", self.id);
        let mut bytes = Vec::with_capacity(length);
        bytes.extend(seed.bytes().take(length));
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed.len() as u64;
        while bytes.len() < length {
            // xorshift64: cheap, incompressible enough, deterministic.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.push((state >> 32) as u8);
        }
        Bytes::from(bytes)
    }
}

impl Default for ConformanceRun {
    fn default() -> Self {
        ConformanceRun::new()
    }
}

fn scratch_directory(check: &str) -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|error| panic!("{check}: cannot create a temp dir: {error}"))
}

pub async fn round_trip(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "round_trip";
    let key = run.key("round-trip/frame.png");
    let first = run.bytes("first", 1000);
    store
        .put(&key, first.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: put: {error}"));
    let read = store
        .get(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get: {error}"));
    assert_eq!(read, first, "{check}: get returns what was put");

    let directory = scratch_directory(check);
    let path = directory.path().join("frame.png");
    store
        .get_to_file(&key, &path)
        .await
        .unwrap_or_else(|error| panic!("{check}: get_to_file: {error}"));
    let on_disk =
        std::fs::read(&path).unwrap_or_else(|error| panic!("{check}: read file: {error}"));
    assert_eq!(on_disk, first, "{check}: get_to_file writes what was put");

    let second = run.bytes("second", 10);
    store
        .put(&key, second.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: overwrite: {error}"));
    let read = store
        .get(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get after overwrite: {error}"));
    assert_eq!(read, second, "{check}: put replaces the old bytes");

    let empty_key = run.key("round-trip/empty");
    store
        .put(&empty_key, Bytes::new())
        .await
        .unwrap_or_else(|error| panic!("{check}: put empty: {error}"));
    let read = store
        .get(&empty_key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get empty: {error}"));
    assert!(read.is_empty(), "{check}: an empty blob round-trips");
}

pub async fn idempotent_put(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "idempotent_put";
    let key = run.key("idempotent/latent.safetensors");
    let bytes = run.bytes("idempotent", 4096);
    for attempt in 0..2 {
        store
            .put(&key, bytes.clone())
            .await
            .unwrap_or_else(|error| panic!("{check}: put {attempt}: {error}"));
    }
    let read = store
        .get(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get: {error}"));
    assert_eq!(read, bytes, "{check}");
    let listed = store
        .list(&run.prefix("idempotent/"))
        .await
        .unwrap_or_else(|error| panic!("{check}: list: {error}"));
    assert_eq!(listed, vec![key], "{check}: one key after two puts");
}

pub async fn content_addressing(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "content_addressing";
    let bytes = run.bytes("content", 2048);
    let expected =
        BlobKey::for_content("png", &bytes).unwrap_or_else(|error| panic!("{check}: {error}"));
    let exists_before = store
        .exists(&expected)
        .await
        .unwrap_or_else(|error| panic!("{check}: exists: {error}"));
    assert!(
        !exists_before,
        "{check}: run-unique content is not stored yet"
    );

    let first = store
        .put_content("png", bytes.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: put_content: {error}"));
    let second = store
        .put_content("png", bytes.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: put_content again: {error}"));
    assert_eq!(
        first, expected,
        "{check}: put_content returns the content address"
    );
    assert_eq!(second, first, "{check}: same bytes, same key");
    assert!(
        first.as_str().starts_with("sha256/") && first.as_str().ends_with(".png"),
        "{check}: {first}"
    );
    assert!(first.content_sha256().is_some(), "{check}: {first}");
    let read = store
        .get(&first)
        .await
        .unwrap_or_else(|error| panic!("{check}: get: {error}"));
    assert_eq!(read, bytes, "{check}");

    let other = store
        .put_content("png", run.bytes("other content", 2048))
        .await
        .unwrap_or_else(|error| panic!("{check}: {error}"));
    assert_ne!(other, first, "{check}: different bytes, different key");
    let bare = store
        .put_content("", bytes.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: {error}"));
    assert!(
        !bare.as_str().contains(".png") && bare.content_sha256() == first.content_sha256(),
        "{check}: {bare}"
    );
}

pub async fn missing_keys_are_not_found(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "missing_keys_are_not_found";
    let key = run.key("missing/never-put.bin");
    match store.get(&key).await {
        Err(BlobError::NotFound { key: named }) => {
            assert_eq!(named, key.as_str(), "{check}: error names the key")
        }
        other => panic!("{check}: get of a missing key: expected NotFound, got {other:?}"),
    }
    let error = store.get(&key).await.expect_err("missing key");
    assert!(
        error.to_string().contains(key.as_str()),
        "{check}: message names the key: {error}"
    );

    let directory = scratch_directory(check);
    let path = directory.path().join("never.bin");
    match store.get_to_file(&key, &path).await {
        Err(BlobError::NotFound { .. }) => {}
        other => panic!("{check}: get_to_file of a missing key: expected NotFound, got {other:?}"),
    }
    assert!(
        !path.exists(),
        "{check}: a failed get_to_file leaves no file"
    );
    let leftovers = std::fs::read_dir(directory.path())
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(
        leftovers, 0,
        "{check}: a failed get_to_file leaves no temp file"
    );

    let exists = store
        .exists(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: exists: {error}"));
    assert!(!exists, "{check}");
    store
        .delete(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: delete of a missing key must succeed: {error}"));
}

pub async fn exists_delete_and_list_with_prefix(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "exists_delete_and_list_with_prefix";
    let names = [
        "list/a/1.png",
        "list/a/2.png",
        "list/ab.png",
        "list/b/1.png",
        "list/b/deep/x.bin",
    ];
    let keys: Vec<BlobKey> = names.iter().map(|name| run.key(name)).collect();
    for key in &keys {
        store
            .put(key, run.bytes(key.as_str(), 16))
            .await
            .unwrap_or_else(|error| panic!("{check}: put {key}: {error}"));
        let exists = store
            .exists(key)
            .await
            .unwrap_or_else(|error| panic!("{check}: exists {key}: {error}"));
        assert!(exists, "{check}: {key} exists after put");
    }
    let list = |prefix: String| async move {
        store
            .list(&prefix)
            .await
            .unwrap_or_else(|error| panic!("{check}: list {prefix}: {error}"))
    };
    assert_eq!(
        list(run.prefix("list/")).await,
        keys,
        "{check}: everything under list/, sorted"
    );
    assert_eq!(
        list(run.prefix("list/a/")).await,
        keys[..2].to_vec(),
        "{check}: a directory-like prefix"
    );
    assert_eq!(
        list(run.prefix("list/a")).await,
        keys[..3].to_vec(),
        "{check}: a partial segment prefix"
    );
    assert_eq!(
        list(run.prefix("list/b")).await,
        keys[3..].to_vec(),
        "{check}: nested keys are listed"
    );
    assert_eq!(
        list(run.prefix("list/c")).await,
        Vec::<BlobKey>::new(),
        "{check}: nothing matches"
    );
    assert_eq!(
        list(run.prefix("nothing/")).await,
        Vec::<BlobKey>::new(),
        "{check}: nothing there"
    );
    let everything = list(String::new()).await;
    assert!(
        keys.iter().all(|key| everything.contains(key)),
        "{check}: empty prefix lists everything"
    );

    store
        .delete(&keys[0])
        .await
        .unwrap_or_else(|error| panic!("{check}: delete: {error}"));
    let exists = store
        .exists(&keys[0])
        .await
        .unwrap_or_else(|error| panic!("{check}: exists: {error}"));
    assert!(!exists, "{check}: deleted key is gone");
    assert!(
        store
            .get(&keys[0])
            .await
            .is_err_and(|error| error.is_not_found()),
        "{check}: get after delete"
    );
    assert_eq!(
        list(run.prefix("list/a/")).await,
        keys[1..2].to_vec(),
        "{check}: list after delete"
    );
}

/// 20 MB: over the multipart threshold of S3Store (8 MiB) and not a multiple of its part size.
pub async fn large_object(store: &dyn BlobStore, run: &ConformanceRun) {
    let check = "large_object";
    let bytes = run.bytes("large", 20_000_000);
    let key = store
        .put_content("bin", bytes.clone())
        .await
        .unwrap_or_else(|error| panic!("{check}: put: {error}"));
    let read = store
        .get(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get: {error}"));
    assert!(
        read == bytes,
        "{check}: 20 MB round trip differs (len {} vs {})",
        read.len(),
        bytes.len()
    );
    let directory = scratch_directory(check);
    let path = directory.path().join("large.bin");
    store
        .get_to_file(&key, &path)
        .await
        .unwrap_or_else(|error| panic!("{check}: get_to_file: {error}"));
    let on_disk =
        std::fs::read(&path).unwrap_or_else(|error| panic!("{check}: read file: {error}"));
    assert!(on_disk == bytes, "{check}: 20 MB get_to_file differs");
    store
        .delete(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: delete: {error}"));
}

/// Eight writers of one key at once (named and content-addressed, one over the multipart threshold):
/// all succeed, the blob is whole, and nothing else (temp files) shows up in a listing.
pub async fn concurrent_puts_of_one_key(store: &Arc<dyn BlobStore>, run: &ConformanceRun) {
    let check = "concurrent_puts_of_one_key";
    let key = run.key("concurrent/frame.png");
    let small = run.bytes("concurrent small", 300_000);
    let large = run.bytes("concurrent large", 9_000_000);
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let store = Arc::clone(store);
        let key = key.clone();
        let small = small.clone();
        let large = large.clone();
        writers.spawn(async move {
            store
                .put(&key, small)
                .await
                .map_err(|error| format!("writer {writer}: put: {error}"))?;
            store
                .put_content("bin", large)
                .await
                .map_err(|error| format!("writer {writer}: put_content: {error}"))
        });
    }
    let mut content_keys = Vec::new();
    while let Some(joined) = writers.join_next().await {
        match joined {
            Ok(Ok(content_key)) => content_keys.push(content_key),
            Ok(Err(message)) => panic!("{check}: {message}"),
            Err(error) => panic!("{check}: writer task failed: {error}"),
        }
    }
    content_keys.dedup();
    assert_eq!(
        content_keys.len(),
        1,
        "{check}: every writer got the same content key"
    );
    let read = store
        .get(&key)
        .await
        .unwrap_or_else(|error| panic!("{check}: get: {error}"));
    assert_eq!(read, small, "{check}: named key is whole");
    let read = store
        .get(&content_keys[0])
        .await
        .unwrap_or_else(|error| panic!("{check}: get content: {error}"));
    assert!(read == large, "{check}: content key is whole");
    let listed = store
        .list(&run.prefix("concurrent/"))
        .await
        .unwrap_or_else(|error| panic!("{check}: list: {error}"));
    assert_eq!(listed, vec![key], "{check}: one key, no temp files");
    store
        .delete(&content_keys[0])
        .await
        .unwrap_or_else(|error| panic!("{check}: delete: {error}"));
}

pub async fn invalid_keys_are_rejected(store: &dyn BlobStore) {
    let check = "invalid_keys_are_rejected";
    for key in [
        "",
        "/abs",
        "a/../b",
        "..",
        "a//b",
        "a/",
        "a b",
        "a/.tmp123",
        "ü",
    ] {
        match BlobKey::new(key) {
            Err(BlobError::InvalidKey { key: named, .. }) => assert_eq!(named, key, "{check}"),
            other => panic!("{check}: {key:?}: expected InvalidKey, got {other:?}"),
        }
    }
    for prefix in ["/", "../", "a/../", "a//"] {
        match store.list(prefix).await {
            Err(BlobError::InvalidKey { key, .. }) => assert_eq!(key, prefix, "{check}"),
            other => panic!("{check}: list {prefix:?}: expected InvalidKey, got {other:?}"),
        }
    }
    match store.put_content("../png", Bytes::from_static(b"x")).await {
        Err(BlobError::InvalidKey { .. }) => {}
        other => {
            panic!("{check}: put_content with kind ../png: expected InvalidKey, got {other:?}")
        }
    }
}
