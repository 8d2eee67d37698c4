//! A blob store in a local directory: one file per key, written atomically.
//!
//! A key `a/b/c.png` is the file `<root>/a/b/c.png`. Writes go to a temp file (named `.tmp…`, which no
//! key can name) in the destination directory, are fsynced, renamed over the destination, and the
//! directory is fsynced: a crash leaves the old file or the new one, and concurrent writers of one key
//! each rename a complete file of their own. A key cannot be both a file and a directory (`a` and
//! `a/b`); putting the second is a backend error.
//!
//! Filesystem calls are blocking and run on tokio's blocking pool.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tracing::debug;

use crate::error::{BlobError, Result};
use crate::key::{validate_prefix, BlobKey};
use crate::BlobStore;

#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// A store rooted at `root`, created if missing.
    pub async fn open(root: impl Into<PathBuf>) -> Result<LocalDirStore> {
        let root = root.into();
        let root_for_error = root.display().to_string();
        let created = root.clone();
        run_blocking(&root_for_error, move || fs::create_dir_all(&created)).await?;
        Ok(LocalDirStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &BlobKey) -> PathBuf {
        self.root.join(key.as_str())
    }
}

/// Translates an IO error on `key` into a blob error kind: the one place this backend does so.
pub(crate) fn translate_io_error(key: &str, error: io::Error) -> BlobError {
    match error.kind() {
        io::ErrorKind::NotFound => BlobError::NotFound {
            key: key.to_owned(),
        },
        kind => BlobError::Backend {
            key: key.to_owned(),
            message: format!("local file error: {error}"),
            retryable: matches!(
                kind,
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
        },
    }
}

/// Runs blocking filesystem work off the async executor, translating its error for `key`.
async fn run_blocking<T, F>(key: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| translate_io_error(key, error)),
        Err(join_error) => Err(translate_io_error(key, io::Error::other(join_error))),
    }
}

/// Writes `destination` atomically from `fill`: temp file in the same directory, fsync, rename,
/// fsync of the directory. The temp file is removed if anything fails.
pub(crate) fn write_file_atomically(
    destination: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let directory = destination.parent().unwrap_or(Path::new("."));
    let mut temp_file = tempfile::Builder::new()
        .prefix(".tmp")
        .tempfile_in(directory)?;
    fill(temp_file.as_file_mut())?;
    temp_file.as_file_mut().flush()?;
    temp_file.as_file().sync_all()?;
    temp_file
        .persist(destination)
        .map_err(|error| error.error)?;
    sync_directory(directory)
}

pub(crate) fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

#[async_trait]
impl BlobStore for LocalDirStore {
    async fn put(&self, key: &BlobKey, bytes: Bytes) -> Result<()> {
        let path = self.path_of(key);
        let byte_count = bytes.len();
        run_blocking(key.as_str(), move || {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            write_file_atomically(&path, |file| file.write_all(&bytes))
        })
        .await?;
        debug!(key = %key, bytes = byte_count, backend = "local", "blob put");
        Ok(())
    }

    async fn get(&self, key: &BlobKey) -> Result<Bytes> {
        let path = self.path_of(key);
        let bytes = run_blocking(key.as_str(), move || fs::read(path)).await?;
        debug!(key = %key, bytes = bytes.len(), backend = "local", "blob get");
        Ok(Bytes::from(bytes))
    }

    async fn get_to_file(&self, key: &BlobKey, path: &Path) -> Result<()> {
        let source_path = self.path_of(key);
        let destination = path.to_owned();
        let byte_count = run_blocking(key.as_str(), move || {
            // Open the source first so a missing key is NotFound and leaves no temp file.
            let mut source = File::open(&source_path)?;
            let mut copied = 0;
            write_file_atomically(&destination, |file| {
                copied = io::copy(&mut source, file)?;
                Ok(())
            })?;
            Ok(copied)
        })
        .await?;
        debug!(key = %key, bytes = byte_count, path = %path.display(), backend = "local", "blob get to file");
        Ok(())
    }

    async fn exists(&self, key: &BlobKey) -> Result<bool> {
        let path = self.path_of(key);
        run_blocking(key.as_str(), move || match fs::metadata(path) {
            Ok(metadata) => Ok(metadata.is_file()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        })
        .await
    }

    async fn delete(&self, key: &BlobKey) -> Result<()> {
        let path = self.path_of(key);
        run_blocking(key.as_str(), move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        })
        .await?;
        debug!(key = %key, backend = "local", "blob deleted");
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobKey>> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let owned_prefix = prefix.to_owned();
        let mut keys = run_blocking(prefix, move || list_files(&root, &owned_prefix)).await?;
        keys.sort();
        Ok(keys)
    }
}

/// Every key under `root` starting with `prefix`: walks only the directory the prefix's complete
/// segments name, and skips dot-names (temp files; no key has them).
fn list_files(root: &Path, prefix: &str) -> io::Result<Vec<BlobKey>> {
    let start_directory = match prefix.rfind('/') {
        Some(index) => &prefix[..index],
        None => "",
    };
    let mut keys = Vec::new();
    let mut pending = vec![start_directory.to_owned()];
    while let Some(relative_directory) = pending.pop() {
        let entries = match fs::read_dir(root.join(&relative_directory)) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) if error.kind() == io::ErrorKind::NotADirectory => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let relative = if relative_directory.is_empty() {
                name
            } else {
                format!("{relative_directory}/{name}")
            };
            if entry.file_type()?.is_dir() {
                // Descend only where keys below may still match the prefix.
                if prefix.starts_with(&format!("{relative}/")) || relative.starts_with(prefix) {
                    pending.push(relative);
                }
            } else if relative.starts_with(prefix) {
                if let Ok(key) = BlobKey::new(relative) {
                    keys.push(key);
                }
            }
        }
    }
    Ok(keys)
}
