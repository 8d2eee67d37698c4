//! The shared BlobStore conformance suite on both backends: a temp directory and a real S3 server.
//!
//! The S3 test needs `STORYFARM_S3_ENDPOINT` (and credentials) in the environment:
//! `eval "$(scripts/s3-server)"` starts a local s3s-fs and prints them; `scripts/test` does it for
//! you. Without them the test fails: CI never skips it silently.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use storyfarm_blob::{
    conformance, open_blob_store, BlobError, BlobKey, BlobStore, LocalDirStore, S3Config, S3Store,
};

#[tokio::test]
async fn local_dir_store_passes_conformance() {
    let directory = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(directory.path().join("blobs"))
        .await
        .unwrap();
    conformance::run_all(Arc::new(store)).await;
    let leftovers = temp_files_under(directory.path());
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

#[tokio::test]
async fn local_dir_store_opens_from_file_url() {
    let directory = tempfile::tempdir().unwrap();
    let spec = format!("file://{}", directory.path().display());
    let store = open_blob_store(&spec).await.unwrap();
    let key = store.put_content("txt", "hello".into()).await.unwrap();
    assert!(directory.path().join(key.as_str()).is_file());
    let error = open_blob_store("relative/dir").await.unwrap_err();
    assert!(
        matches!(error, BlobError::Config { .. }) && error.to_string().contains("relative/dir"),
        "{error}"
    );
}

/// A bucket of its own for every run: s3s-fs maps buckets to directories and needs CreateBucket.
fn s3_config_for_a_fresh_bucket() -> S3Config {
    if std::env::var("STORYFARM_S3_ENDPOINT").map_or(true, |endpoint| endpoint.is_empty()) {
        panic!(
            "STORYFARM_S3_ENDPOINT is not set: start a local S3 server with \
             `eval \"$(scripts/s3-server)\"` (or run scripts/test, which does it)"
        );
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!(
        "storyfarm-test-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    );
    S3Config::from_vars(|name| match name {
        "STORYFARM_S3_BUCKET" => Some(bucket.clone()),
        "STORYFARM_S3_PREFIX" => Some("farm/artifacts".to_owned()),
        _ => std::env::var(name).ok(),
    })
    .unwrap()
}

#[tokio::test]
async fn s3_store_passes_conformance() {
    let config = s3_config_for_a_fresh_bucket();
    let store = S3Store::new(config).await.unwrap();
    store.ensure_bucket().await.unwrap();
    store
        .ensure_bucket()
        .await
        .expect("ensure_bucket is idempotent");
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn s3_store_opens_from_s3_url_and_misses_are_not_found() {
    let config = s3_config_for_a_fresh_bucket();
    S3Store::new(config.clone())
        .await
        .unwrap()
        .ensure_bucket()
        .await
        .unwrap();
    let store = open_blob_store(&format!("s3://{}/studio", config.bucket))
        .await
        .unwrap();
    let key = store.put_content("txt", "hello".into()).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), "hello");
    // The prefix is a namespace: the same bucket under another prefix does not see the key.
    let elsewhere = open_blob_store(&format!("s3://{}/other", config.bucket))
        .await
        .unwrap();
    assert!(!elsewhere.exists(&key).await.unwrap());
    assert!(elsewhere.list("").await.unwrap().is_empty());
    assert_eq!(store.list("sha256/").await.unwrap(), vec![key]);
}

#[tokio::test]
async fn s3_store_with_wrong_credentials_is_a_backend_error() {
    let mut config = s3_config_for_a_fresh_bucket();
    config.secret_access_key = Some("wrong-secret".to_owned());
    config
        .access_key_id
        .get_or_insert_with(|| "storyfarm".to_owned());
    let store = S3Store::new(config).await.unwrap();
    let key = BlobKey::new("a/b.png").unwrap();
    match store.put(&key, "x".into()).await {
        Err(BlobError::Backend {
            key: named,
            retryable: false,
            ..
        }) => assert_eq!(named, "a/b.png"),
        other => panic!("expected a non-retryable backend error naming the key, got {other:?}"),
    }
}

/// A missing bucket is a configuration problem, never "no such blob": `list` must not answer empty.
/// (HeadObject, GetObject cannot tell: S3 answers a bodiless 404 to HEAD, and s3s-fs answers
/// NoSuchKey to GET in a missing bucket.)
#[tokio::test]
async fn s3_store_without_bucket_is_a_backend_error_not_not_found() {
    let config = s3_config_for_a_fresh_bucket();
    let store: Arc<dyn BlobStore> = Arc::new(S3Store::new(config).await.unwrap());
    match store.list("a/").await {
        Err(BlobError::Backend {
            key,
            retryable: false,
            message,
        }) => {
            assert_eq!(key, "a/");
            assert!(message.contains("NoSuchBucket"), "{message}")
        }
        other => panic!("list in a missing bucket must be a backend error: {other:?}"),
    }
}

fn temp_files_under(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![directory.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with('.'))
            {
                found.push(path);
            }
        }
    }
    found
}
