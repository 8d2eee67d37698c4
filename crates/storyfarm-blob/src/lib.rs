//! Artifact storage for storyfarm: reference images, inversion trajectories, frame PNGs, latents.
//!
//! One trait, [`BlobStore`], with two backends: [`LocalDirStore`] (a directory, for local mode and
//! tests) and [`S3Store`] (any S3-compatible server, for the farm). Both pass the same conformance
//! suite (`conformance`, behind the `testing` feature).
//!
//! Architecture invariant: this is the only crate of the workspace that touches aws-sdk-s3.
//!
//! Semantics shared by every backend:
//! - keys are [`BlobKey`]s; immutable artifacts are stored under their content address
//!   (`sha256/<aa>/<hex>.<kind>`, see [`key`]), so putting the same bytes twice is a no-op in effect;
//! - `put` replaces atomically: a reader sees the old or the new bytes, never a torn write, and
//!   concurrent writers of the same key are safe (the last one wins);
//! - `get` of a missing key is [`BlobError::NotFound`]; `delete` of a missing key succeeds;
//! - there are no presigned URLs: every byte goes through a `BlobStore`.

pub mod error;
pub mod key;
pub mod local;
pub mod s3;

#[cfg(feature = "testing")]
pub mod conformance;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::{BlobError, Result};
pub use key::BlobKey;
pub use local::LocalDirStore;
pub use s3::{S3Config, S3Store};

/// Where artifacts live. Cheap to share as `Arc<dyn BlobStore>`.
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, replacing what was there atomically. Putting the same bytes under
    /// the same key twice, even concurrently, is fine.
    async fn put(&self, key: &BlobKey, bytes: Bytes) -> Result<()>;

    /// Stores `bytes` under their content address (see [`BlobKey::for_content`]) and returns it.
    /// `kind` is the extension, e.g. `"png"`, or `""` for none. Skips the upload when the content
    /// is already stored.
    async fn put_content(&self, kind: &str, bytes: Bytes) -> Result<BlobKey> {
        let key = BlobKey::for_content(kind, &bytes)?;
        if self.exists(&key).await? {
            tracing::debug!(key = %key, bytes = bytes.len(), "blob content already stored");
            return Ok(key);
        }
        self.put(&key, bytes).await?;
        Ok(key)
    }

    /// The bytes stored under `key`, or [`BlobError::NotFound`].
    async fn get(&self, key: &BlobKey) -> Result<Bytes>;

    /// Writes the blob to `path` without holding it in memory; the file appears atomically (temp
    /// file in the same directory, fsync, rename). The parent directory must exist.
    async fn get_to_file(&self, key: &BlobKey, path: &Path) -> Result<()>;

    async fn exists(&self, key: &BlobKey) -> Result<bool>;

    /// Removes the blob; succeeds when it is already absent.
    async fn delete(&self, key: &BlobKey) -> Result<()>;

    /// Every key that starts with `prefix` (a plain string prefix, as in S3: `jobs/4` matches
    /// `jobs/42/x`), sorted. `prefix` follows the key rules except that it may be empty or end in `/`.
    async fn list(&self, prefix: &str) -> Result<Vec<BlobKey>>;
}

/// Opens a store from a URL-ish spec:
/// - `file:///absolute/path` (or a plain absolute path): a [`LocalDirStore`] there, created if missing;
/// - `s3://bucket` or `s3://bucket/prefix`: an [`S3Store`], the rest of its configuration (endpoint,
///   region, credentials, path style) from the environment as in [`S3Config::from_env`].
pub async fn open_blob_store(spec: &str) -> Result<Arc<dyn BlobStore>> {
    if let Some(rest) = spec.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let config = S3Config::from_vars(|name| match name {
            "STORYFARM_S3_BUCKET" => Some(bucket.to_owned()),
            "STORYFARM_S3_PREFIX" => Some(prefix.to_owned()),
            _ => std::env::var(name).ok(),
        })?;
        return Ok(Arc::new(S3Store::new(config).await?));
    }
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    if !path.starts_with('/') {
        return Err(BlobError::Config {
            message: format!(
                "blob store spec {spec:?}: expected file:///absolute/path or s3://bucket/prefix"
            ),
        });
    }
    Ok(Arc::new(LocalDirStore::open(path).await?))
}
