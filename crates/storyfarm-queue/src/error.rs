//! `QueueError`: the error kinds of the task transport, shared by every backend.

/// What went wrong talking to the queue. Every backend reports the same kinds; lapin's errors
/// are translated in exactly one place (`rabbit::translate_lapin_error`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The connection or channel failed. `retryable`: reconnecting may help (network, broker
    /// restart); not retryable: configuration or authentication is wrong.
    #[error("queue connection: {message}")]
    Connection { retryable: bool, message: String },
    /// Declaring exchanges or queues failed, e.g. a queue exists with other arguments.
    #[error("queue topology: {reason}")]
    Topology { reason: String },
    /// The broker did not take the message: unroutable (no such queue), channel error.
    #[error("publish to {destination}: {reason}")]
    Publish { destination: String, reason: String },
    /// The broker negatively acknowledged a published message (publisher confirm nack).
    #[error("publish to {destination}: broker nacked message {message_id}")]
    Nacked {
        destination: String,
        message_id: String,
    },
    /// A delivery's properties or headers could not be read.
    #[error("delivery from {queue}: {reason}")]
    Decode { queue: String, reason: String },
    /// A family, worker id or namespace that cannot be part of a queue name.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The consumer or channel a delivery came from is gone: it can no longer be acknowledged and
    /// will be redelivered by the queue.
    #[error("{operation}: consumer closed, the delivery will be redelivered")]
    Closed { operation: &'static str },
}

impl QueueError {
    /// True when the same operation may succeed after reconnecting.
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Connection { retryable, .. } => *retryable,
            QueueError::Publish { .. } | QueueError::Nacked { .. } => true,
            QueueError::Topology { .. }
            | QueueError::Decode { .. }
            | QueueError::InvalidName { .. }
            | QueueError::Closed { .. } => false,
        }
    }
}
