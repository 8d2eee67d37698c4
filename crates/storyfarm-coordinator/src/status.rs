//! The one place where errors become gRPC status codes.

use storyfarm_blob::BlobError;
use storyfarm_core::ValidationError;
use storyfarm_queue::QueueError;
use storyfarm_store::StoreError;
use tonic::{Code, Status};

/// Everything a service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("{0}")]
    FailedPrecondition(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(ValidationError::new(field, message))
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Store(StoreError::NotFound { .. }) => Code::NotFound,
            ApiError::Store(StoreError::Conflict { .. }) => Code::AlreadyExists,
            ApiError::Store(e) if e.is_retryable() => Code::Unavailable,
            ApiError::Store(_) => Code::Internal,
            ApiError::Blob(e) if e.is_not_found() => Code::NotFound,
            ApiError::Blob(e) if e.is_retryable() => Code::Unavailable,
            ApiError::Blob(_) => Code::Internal,
            ApiError::Queue(e) if e.is_retryable() => Code::Unavailable,
            ApiError::Queue(_) => Code::Internal,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_codes() {
        let s: Status = ApiError::invalid("frames[2].prompt", "must not be empty").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "frames[2].prompt: must not be empty");
        let s: Status = ApiError::from(StoreError::not_found("project", "x")).into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ApiError::from(StoreError::Unavailable {
            message: "down".into(),
        })
        .into();
        assert_eq!(s.code(), Code::Unavailable);
    }
}
