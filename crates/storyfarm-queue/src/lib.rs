//! Task transport of storyfarm: the `TaskQueue` trait, its RabbitMQ backend (`RabbitQueue`,
//! lapin) and its in-process backend (`InProcessQueue`), with the same delivery semantics.
//!
//! Payloads are opaque bytes (protobuf encoded by other crates) plus text headers; this crate
//! knows nothing of diffusion, jobs or frames. It is the only crate of the workspace that
//! depends on lapin.
//!
//! # Topology
//!
//! Every name starts with [`QueueConfig::namespace`] (`storyfarm` by default; tests use a unique
//! namespace per run). [`TaskQueue::declare_topology`] declares, idempotently:
//!
//! | name | kind | purpose |
//! |------|------|---------|
//! | `<ns>.tasks` | durable direct exchange | routes a task to its model family's queue |
//! | `<ns>.tasks.<family>` | quorum queue, bound with key `<family>` | tasks of one model family; `x-delivery-limit` ([`QueueConfig::delivery_limit`], default 5), dead-lettered to `<ns>.dead` |
//! | `<ns>.dead` | durable fanout exchange | receives dead-lettered tasks |
//! | `<ns>.tasks.dead` | quorum queue bound to `<ns>.dead` | the coordinator fails the frame with the reason in [`Delivery::dead_letter`] |
//! | `<ns>.events` | quorum queue | workers publish events, the coordinator consumes them |
//! | `<ns>.reply.<worker>` | exclusive auto-delete queue, declared by the worker when it consumes | the coordinator's "recorded" acknowledgements to one worker |
//! | `<ns>.control` | durable fanout exchange | control broadcasts (cancellation); each subscriber binds its own exclusive auto-delete queue |
//!
//! Dead-lettering uses `x-dead-letter-strategy = at-least-once` (with `x-overflow =
//! reject-publish`, which that strategy requires): a poison task is never dropped on its way to
//! the dead-letter queue. Dead-lettered messages keep their payload, message id and headers; the
//! broker's `x-death` header becomes [`Delivery::dead_letter`] (reason, source queue, count), which
//! is how the coordinator fails the frame with a reason. On RabbitMQ 3.10 the `x-delivery-count`
//! does not follow a message into the dead-letter queue: there `delivery_count` starts again at 0
//! (checked by the conformance suite, and mirrored by the in-process queue).
//!
//! Queue arguments are fixed at declaration: declaring an existing queue with another delivery
//! limit fails with [`QueueError::Topology`]. Change a live farm's limit with a RabbitMQ policy
//! (`delivery-limit`) instead of the config.
//!
//! Publishing to a task family or worker that has no queue fails with [`QueueError::Publish`]
//! (mandatory flag, unroutable return); control broadcasts with no subscribers succeed.
//!
//! # Delivery semantics (both backends, checked by `tests/conformance.rs`)
//!
//! - At least once. Publishes are persistent and wait for publisher confirms;
//!   [`TaskQueue::publish_task_batch`] pipelines a batch and then awaits all its confirms.
//! - Manual acknowledgement through [`Acker`]. A consumer that goes away (dropped, closed,
//!   crashed, connection lost) gives back its unacknowledged deliveries; they are redelivered with
//!   `redelivered = true` and `delivery_count` + 1.
//! - A task returned more than `delivery_limit` times (so delivered at most `delivery_limit + 1`
//!   times), or nacked without requeue, or rejected, moves to the dead-letter queue with reason
//!   [`DeadLetterReason::DeliveryLimit`] or [`DeadLetterReason::Rejected`].
//! - Prefetch `n` caps a consumer's unacknowledged deliveries at `n` (0 = unlimited).
//!
//! # Consumer timeout (long GPU tasks)
//!
//! RabbitMQ 3.10 closes a consumer's channel when a delivery stays unacknowledged longer than the
//! broker-wide `consumer_timeout` (default 30 min); the delivery is then redelivered to another
//! worker. The per-queue `x-consumer-timeout` argument does **not** exist on 3.10 (it arrived in
//! 3.12; `rabbit_amqqueue:declare_args()` on 3.10.8 does not list it). To run longer tasks raise it
//! on the broker:
//!
//! - `rabbitmq.conf`: `consumer_timeout = 7200000` (milliseconds; restart), or
//! - at runtime, for channels opened afterwards:
//!   `rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, 7200000).'`
//!
//! The crate cannot read the broker's value, so [`QueueConfig::broker_consumer_timeout`] declares
//! it and [`QueueConfig::max_task_duration`] the longest a worker may hold a task; connecting logs
//! a warning when the second is not below the first, and a settlement that fails after the delivery
//! was held past the timeout logs a warning naming the setting. The in-process queue has no
//! consumer timeout.
//!
//! # Connections and errors
//!
//! [`RabbitQueue`] holds one connection: one confirm-mode channel for publishing (reopened if the
//! broker closed it) and one channel per consumer (so prefetch is per consumer and closing a
//! consumer requeues exactly its deliveries). lapin errors are translated in one function into
//! [`QueueError`]; [`QueueError::is_retryable`] says whether reconnecting (a new `RabbitQueue`)
//! may help.

mod config;
mod consumer;
mod error;
mod in_process;
mod message;
mod rabbit;

use futures::future::BoxFuture;

pub use config::{
    validate_name, QueueConfig, TopologyNames, AMQP_URL_ENV, DEFAULT_AMQP_URL,
    DEFAULT_BROKER_CONSUMER_TIMEOUT, DEFAULT_DELIVERY_LIMIT, DEFAULT_NAMESPACE, DEFAULT_PREFETCH,
};
pub use consumer::Consumer;
pub use error::QueueError;
pub use in_process::InProcessQueue;
pub use message::{
    Acker, DeadLetter, DeadLetterReason, Delivery, Headers, OutgoingMessage, TRACEPARENT_HEADER,
};
pub use rabbit::{Publisher, RabbitQueue};

/// The task transport. Implemented by [`RabbitQueue`] (farm) and [`InProcessQueue`] (local mode,
/// tests) with the same semantics. Object safe: use it as `Arc<dyn TaskQueue>`.
pub trait TaskQueue: Send + Sync {
    /// Declares exchanges and queues for these model families. Idempotent.
    fn declare_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Deletes what [`TaskQueue::declare_topology`] declared for these families (tests, teardown).
    fn delete_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Publishes one task to its family's queue and waits for the broker's confirm.
    fn publish_task<'a>(
        &'a self,
        family: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Publishes many tasks, pipelined, then waits for all confirms. On failure the error of the
    /// first unconfirmed message is returned; the others may have been enqueued.
    fn publish_task_batch<'a>(
        &'a self,
        family: &'a str,
        messages: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Consumes a family's tasks with at most `prefetch` unacknowledged at once (0 = unlimited).
    fn consume_tasks<'a>(
        &'a self,
        family: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>>;

    /// Consumes dead-lettered tasks (coordinator).
    fn consume_dead_letters(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>>;

    /// Publishes a worker event to the events queue (worker).
    fn publish_event(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Consumes worker events (coordinator).
    fn consume_events(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>>;

    /// Sends a reply to one worker's reply queue (coordinator). Fails with
    /// [`QueueError::Publish`] when that worker is not consuming its replies.
    fn reply_to_worker<'a>(
        &'a self,
        worker_id: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Declares this worker's exclusive reply queue and consumes it (worker).
    fn consume_replies<'a>(
        &'a self,
        worker_id: &'a str,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>>;

    /// Broadcasts a control message to every current control subscriber.
    fn broadcast_control(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Subscribes to control broadcasts sent from now on.
    fn consume_control(&self) -> BoxFuture<'_, Result<Consumer, QueueError>>;

    /// Ready messages and consumers of these families' task queues, the dead-letter queue and
    /// the events queue, as the broker counts them (metrics). Queues not declared are left out.
    fn queue_stats<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<QueueStats>, QueueError>>;
}

/// One queue as the broker counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    /// The queue's name on the broker.
    pub queue: String,
    /// Messages ready for delivery (not those delivered and unacknowledged).
    pub messages: u64,
    pub consumers: u64,
}
