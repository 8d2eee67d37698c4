//! Messages: what is published (`OutgoingMessage`), what is consumed (`Delivery`), how a delivery
//! is settled (`Acker`) and why a task was dead-lettered (`DeadLetter`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::QueueError;
use crate::in_process::InProcessAcker;
use crate::rabbit::RabbitAcker;

/// Application headers: text keys and text values (e.g. `traceparent`, `task_id`, `attempt`).
/// Broker bookkeeping headers (`x-death`, `x-delivery-count`, ...) are not kept here: they are
/// parsed into [`Delivery::delivery_count`] and [`Delivery::dead_letter`].
pub type Headers = BTreeMap<String, String>;

/// Header that carries the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A message to publish: opaque payload bytes (protobuf encoded by the caller) plus metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub payload: Bytes,
    /// Unique per message; a fresh UUIDv4 unless set.
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub headers: Headers,
}

impl OutgoingMessage {
    /// A message with a fresh random message id and no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            message_id: uuid::Uuid::new_v4().to_string(),
            correlation_id: None,
            headers: Headers::new(),
        }
    }
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = message_id.into();
        self
    }
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }
    /// Sets the W3C `traceparent` header (text produced by the caller's tracing layer).
    pub fn with_traceparent(self, traceparent: impl Into<String>) -> Self {
        self.with_header(TRACEPARENT_HEADER, traceparent)
    }
}

/// Why the broker dead-lettered a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Rejected, or nacked without requeue, by a consumer.
    Rejected,
    /// Returned more often than the queue's delivery limit (a poison task or crashing workers).
    DeliveryLimit,
    /// Its TTL expired.
    Expired,
    /// The queue was over its length limit.
    MaxLength,
    /// A reason this crate does not know by name.
    Other(String),
}

impl DeadLetterReason {
    /// Parses RabbitMQ's reason text (`rejected`, `delivery_limit`, `expired`, `maxlen`).
    pub fn from_broker_text(text: &str) -> Self {
        match text {
            "rejected" => Self::Rejected,
            "delivery_limit" => Self::DeliveryLimit,
            "expired" => Self::Expired,
            "maxlen" => Self::MaxLength,
            other => Self::Other(other.to_string()),
        }
    }
    /// RabbitMQ's reason text.
    pub fn as_broker_text(&self) -> &str {
        match self {
            Self::Rejected => "rejected",
            Self::DeliveryLimit => "delivery_limit",
            Self::Expired => "expired",
            Self::MaxLength => "maxlen",
            Self::Other(other) => other,
        }
    }
}

/// Where and why a message was dead-lettered (from the `x-death` header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    /// Full name of the queue it was dead-lettered from, e.g. `storyfarm.tasks.sd15`.
    pub queue: String,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: u64,
}

/// A consumed message. Settle it through `acker`: [`Acker::ack`] once its effect is durably
/// recorded, [`Acker::nack`] to give it back, [`Acker::reject`] to dead-letter it.
#[derive(Debug)]
pub struct Delivery {
    pub payload: Bytes,
    pub headers: Headers,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// How many times the message was returned to its queue before this delivery (nacked with
    /// requeue or held by a consumer that went away): 0 on a first delivery. RabbitMQ quorum
    /// queues report it in `x-delivery-count`.
    pub delivery_count: u64,
    /// Set on messages consumed from the dead-letter queue.
    pub dead_letter: Option<DeadLetter>,
    pub acker: Acker,
}

impl Delivery {
    /// The W3C `traceparent` header, when the publisher set one.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers.get(TRACEPARENT_HEADER).map(String::as_str)
    }
}

/// Settles one delivery. Each method consumes the acker: a delivery is settled once.
#[derive(Debug)]
pub struct Acker {
    pub(crate) inner: AckerInner,
    pub(crate) received_at: Instant,
    pub(crate) broker_consumer_timeout: Duration,
    pub(crate) queue: String,
}

#[derive(Debug)]
pub(crate) enum AckerInner {
    Rabbit(RabbitAcker),
    InProcess(InProcessAcker),
}

/// How a delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    Ack,
    Nack { requeue: bool },
    Reject,
}

impl Settlement {
    fn operation(self) -> &'static str {
        match self {
            Settlement::Ack => "ack",
            Settlement::Nack { .. } => "nack",
            Settlement::Reject => "reject",
        }
    }
}

impl Acker {
    /// How long ago the delivery arrived.
    pub fn held_for(&self) -> Duration {
        self.received_at.elapsed()
    }

    /// Acknowledges: the message is removed from its queue.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle(Settlement::Ack).await
    }

    /// Negative acknowledgement. `requeue = true` returns the message to its queue (counts
    /// towards the delivery limit); `false` dead-letters it (reason `rejected`).
    pub async fn nack(self, requeue: bool) -> Result<(), QueueError> {
        self.settle(Settlement::Nack { requeue }).await
    }

    /// Rejects without requeue: the message is dead-lettered (reason `rejected`).
    pub async fn reject(self) -> Result<(), QueueError> {
        self.settle(Settlement::Reject).await
    }

    async fn settle(self, settlement: Settlement) -> Result<(), QueueError> {
        let held_for = self.received_at.elapsed();
        let result = match &self.inner {
            AckerInner::Rabbit(acker) => acker.settle(settlement).await,
            AckerInner::InProcess(acker) => acker.settle(settlement),
        };
        if result.is_err() && held_for >= self.broker_consumer_timeout {
            tracing::warn!(
                queue = %self.queue,
                operation = settlement.operation(),
                held_for_s = held_for.as_secs(),
                consumer_timeout_s = self.broker_consumer_timeout.as_secs(),
                "delivery held longer than the broker's consumer_timeout; the broker closed the channel and redelivers it (raise consumer_timeout in rabbitmq.conf)"
            );
        }
        result.map_err(|error| match error {
            QueueError::Closed { .. } => QueueError::Closed {
                operation: settlement.operation(),
            },
            other => other,
        })
    }
}
