//! Queue configuration (`QueueConfig`) and the names of every exchange and queue (`TopologyNames`).

use std::time::Duration;

use crate::error::QueueError;

/// Environment variable that overrides [`QueueConfig::url`].
pub const AMQP_URL_ENV: &str = "STORYFARM_AMQP_URL";
/// Default broker URL: a local RabbitMQ, default vhost `/`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default prefix of every exchange and queue name.
pub const DEFAULT_NAMESPACE: &str = "storyfarm";
/// Default number of unacknowledged deliveries a consumer may hold.
pub const DEFAULT_PREFETCH: u16 = 1;
/// Default number of returns (nack with requeue, consumer lost) before a task is dead-lettered.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;
/// RabbitMQ's default `consumer_timeout` (30 minutes).
pub const DEFAULT_BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How to reach the broker and how the topology is shaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// AMQP URL. Env override: `STORYFARM_AMQP_URL`. Default: [`DEFAULT_AMQP_URL`].
    pub url: String,
    /// Prefix of every exchange and queue (`<namespace>.tasks`, ...). Default: `storyfarm`.
    /// Tests use a unique namespace per run so they never collide.
    pub namespace: String,
    /// Default prefetch (basic.qos) for consumers that are not given one explicitly. Default: 1.
    pub prefetch: u16,
    /// `x-delivery-limit` of the task queues. Default: 5.
    pub delivery_limit: u32,
    /// The broker's `consumer_timeout` as configured in rabbitmq.conf (default 30 min). RabbitMQ
    /// closes a consumer's channel when one of its deliveries stays unacknowledged longer; the
    /// delivery is then redelivered. The queue cannot read this setting from the broker, so it is
    /// declared here and compared with [`QueueConfig::max_task_duration`].
    pub broker_consumer_timeout: Duration,
    /// Longest time a worker may hold a task delivery before acknowledging it. When it exceeds
    /// `broker_consumer_timeout`, connecting logs a warning: raise `consumer_timeout` on the broker.
    pub max_task_duration: Option<Duration>,
    /// Name shown for the connection in the broker's management UI.
    pub connection_name: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_AMQP_URL.to_string(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            prefetch: DEFAULT_PREFETCH,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            broker_consumer_timeout: DEFAULT_BROKER_CONSUMER_TIMEOUT,
            max_task_duration: None,
            connection_name: "storyfarm".to_string(),
        }
    }
}

impl QueueConfig {
    /// Defaults, with `url` taken from `STORYFARM_AMQP_URL` when it is set.
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Ok(url) = std::env::var(AMQP_URL_ENV) {
            if !url.trim().is_empty() {
                config.url = url;
            }
        }
        config
    }

    /// The same configuration under another namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Exchange and queue names under this configuration's namespace.
    pub fn names(&self) -> TopologyNames {
        TopologyNames {
            namespace: self.namespace.clone(),
        }
    }

    /// True when a task may outlive the broker's consumer timeout.
    pub fn task_may_exceed_consumer_timeout(&self) -> bool {
        self.max_task_duration
            .is_some_and(|max_task_duration| max_task_duration >= self.broker_consumer_timeout)
    }
}

/// Names of every exchange and queue, derived from a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyNames {
    namespace: String,
}

impl TopologyNames {
    /// The namespace all names start with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// Durable direct exchange that routes tasks by model family: `<ns>.tasks`.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.namespace)
    }
    /// Quorum queue of one model family: `<ns>.tasks.<family>`.
    pub fn task_queue(&self, family: &str) -> String {
        format!("{}.tasks.{family}", self.namespace)
    }
    /// Fanout exchange that receives dead-lettered tasks: `<ns>.dead`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    /// Quorum queue of dead-lettered tasks: `<ns>.tasks.dead`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.tasks.dead", self.namespace)
    }
    /// The durable queues of these families' topology: each family's task queue, the dead
    /// letters and the events (what `TaskQueue::queue_stats` counts).
    pub fn durable_queues(&self, families: &[&str]) -> Vec<String> {
        let mut queues: Vec<String> = families.iter().map(|f| self.task_queue(f)).collect();
        queues.push(self.dead_letter_queue());
        queues.push(self.events_queue());
        queues
    }
    /// Quorum queue of worker events, consumed by the coordinator: `<ns>.events`.
    pub fn events_queue(&self) -> String {
        format!("{}.events", self.namespace)
    }
    /// Fanout exchange for control broadcasts (cancellation): `<ns>.control`.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.namespace)
    }
    /// Exclusive, auto-delete reply queue of one worker: `<ns>.reply.<worker_id>`.
    pub fn reply_queue(&self, worker_id: &str) -> String {
        format!("{}.reply.{worker_id}", self.namespace)
    }
}

/// Checks a model family, worker id or namespace before it becomes part of a queue name:
/// 1 to 100 characters out of ASCII letters, digits, `-`, `_`, `.` and `:`.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), QueueError> {
    let invalid = |reason: &'static str| QueueError::InvalidName {
        what,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if value.len() > 100 {
        return Err(invalid("must be at most 100 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(invalid(
            "may only contain ASCII letters, digits, '-', '_', '.' and ':'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_namespace() {
        let names = QueueConfig::default().with_namespace("t1").names();
        assert_eq!(names.tasks_exchange(), "t1.tasks");
        assert_eq!(names.task_queue("sd15"), "t1.tasks.sd15");
        assert_eq!(names.dead_letter_queue(), "t1.tasks.dead");
        assert_eq!(names.events_queue(), "t1.events");
        assert_eq!(names.reply_queue("w-1"), "t1.reply.w-1");
    }

    #[test]
    fn invalid_names_are_rejected_with_the_offending_value() {
        let error = validate_name("model family", "sd 1.5").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid model family \"sd 1.5\": may only contain ASCII letters, digits, '-', '_', '.' and ':'"
        );
        assert!(validate_name("worker id", "").is_err());
        assert!(validate_name("worker id", &"w".repeat(101)).is_err());
        assert!(validate_name("worker id", "gpu-node-3:0").is_ok());
    }

    #[test]
    fn consumer_timeout_check() {
        let mut config = QueueConfig::default();
        assert!(!config.task_may_exceed_consumer_timeout());
        config.max_task_duration = Some(Duration::from_secs(3600));
        assert!(config.task_may_exceed_consumer_timeout());
    }
}
