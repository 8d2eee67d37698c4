//! Store errors, and the one place sqlx errors are translated into them.

/// What went wrong in the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id}: {message}")]
    Conflict { what: &'static str, id: String, message: String },
    #[error("database unavailable: {message}")]
    Unavailable { message: String },
    #[error("database error: {message}")]
    Backend { message: String },
    #[error("stored {what} is corrupt: {message}")]
    Corrupt { what: &'static str, message: String },
}

impl StoreError {
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Self::NotFound { what, id: id.to_string() }
    }

    /// Whether retrying the operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Self::Unavailable { message: e.to_string() },
            sqlx::Error::Database(db) if db.code().as_deref() == Some("40001") => {
                // Serialization failure: the caller retries the whole transaction.
                Self::Unavailable { message: e.to_string() }
            }
            _ => Self::Backend { message: e.to_string() },
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
