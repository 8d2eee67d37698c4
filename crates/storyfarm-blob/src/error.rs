//! The one error type of every blob store, with the few kinds callers act on.

/// A blob store operation failed. Every variant names the key (or prefix, or bucket) involved.
///
/// Backends translate their foreign errors (IO, S3 SDK) into these kinds in exactly one function each:
/// `local::translate_io_error` and `s3::translate_s3_failure`.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob is stored under this key.
    #[error("blob {key}: not found")]
    NotFound { key: String },

    /// The key (or list prefix, or content kind) breaks the key rules of [`crate::BlobKey`].
    #[error("invalid blob key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    /// The store spec or configuration cannot be used (bad URL, missing bucket, bad env value).
    #[error("invalid blob store configuration: {message}")]
    Config { message: String },

    /// The backend failed. `retryable` says whether the same call may succeed later unchanged
    /// (timeouts, throttling, 5xx, connection resets), as opposed to permission or data errors.
    #[error("blob {key}: {message}")]
    Backend {
        key: String,
        message: String,
        retryable: bool,
    },
}

impl BlobError {
    /// Whether retrying the same call unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BlobError::Backend {
                retryable: true,
                ..
            }
        )
    }

    /// Whether this is the not-found kind.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BlobError::NotFound { .. })
    }
}

pub type Result<T, E = BlobError> = std::result::Result<T, E>;
