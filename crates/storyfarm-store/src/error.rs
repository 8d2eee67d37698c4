//! Store errors, and the one place sqlx errors are translated into them.

/// What went wrong in the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id}: {message}")]
    Conflict {
        what: &'static str,
        id: String,
        message: String,
    },
    #[error("database unavailable: {message}")]
    Unavailable { message: String },
    #[error("database error: {message}")]
    Backend { message: String },
    #[error("stored {what} is corrupt: {message}")]
    Corrupt { what: &'static str, message: String },
    #[error("cannot open database {}: {message}", path.display())]
    Open {
        path: std::path::PathBuf,
        message: String,
    },
}

impl StoreError {
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
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
            | sqlx::Error::Tls(_) => Self::Unavailable {
                message: e.to_string(),
            },
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40001" | "40P01")) =>
            {
                // Serialization failure or deadlock victim: the caller retries the whole transaction.
                Self::Unavailable {
                    message: e.to_string(),
                }
            }
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .is_some_and(sqlite_busy) =>
            {
                // Another writer held the file past the busy timeout: a later try can succeed.
                Self::Unavailable {
                    message: e.to_string(),
                }
            }
            _ => Self::Backend {
                message: e.to_string(),
            },
        }
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, whatever the extended code (the primary code is its low byte).
fn sqlite_busy(e: &sqlx::sqlite::SqliteError) -> bool {
    use sqlx::error::DatabaseError;
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    e.code()
        .and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
