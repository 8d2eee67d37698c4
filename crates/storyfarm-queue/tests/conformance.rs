//! One conformance suite for every `TaskQueue` backend: the in-process queue and RabbitMQ
//! (`STORYFARM_AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f). A missing broker fails
//! the RabbitMQ tests; it never skips them. Each test runs in its own namespace, deleted at the end.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use storyfarm_queue::{
    Consumer, DeadLetterReason, Delivery, InProcessQueue, OutgoingMessage, QueueConfig, QueueError,
    RabbitQueue, TaskQueue,
};

const FAMILY: &str = "sd15";
const OTHER_FAMILY: &str = "sdxl";
const DELIVERY_LIMIT: u32 = 2;
/// How long a test waits for a delivery that must come.
const ARRIVAL: Duration = Duration::from_secs(10);
/// How long a test waits to conclude that a delivery does not come.
const SILENCE: Duration = Duration::from_millis(400);

#[derive(Clone, Copy, Debug)]
enum Backend {
    InProcess,
    Rabbit,
}

fn test_config() -> QueueConfig {
    let namespace = format!("storyfarm-test-{}", uuid::Uuid::new_v4().simple());
    QueueConfig {
        delivery_limit: DELIVERY_LIMIT,
        ..QueueConfig::from_env().with_namespace(namespace)
    }
}

/// Runs `body` against a fresh topology of `backend` and deletes it afterwards, also when the
/// body panics.
async fn with_queue<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Arc<dyn TaskQueue>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let config = test_config();
    let queue: Arc<dyn TaskQueue> = match backend {
        Backend::InProcess => Arc::new(InProcessQueue::new(config.clone())),
        Backend::Rabbit => match RabbitQueue::connect(config.clone()).await {
            Ok(queue) => Arc::new(queue),
            Err(error) => panic!(
                "rabbitmq at {} is required for these tests: {error}",
                config.url.rsplit('@').next().unwrap_or_default()
            ),
        },
    };
    queue
        .declare_topology(&[FAMILY, OTHER_FAMILY])
        .await
        .expect("declare topology");
    // Declaring twice is fine (idempotent).
    queue
        .declare_topology(&[FAMILY])
        .await
        .expect("declare topology again");
    let outcome = tokio::spawn(body(queue.clone())).await;
    queue
        .delete_topology(&[FAMILY, OTHER_FAMILY])
        .await
        .expect("delete topology");
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(ARRIVAL, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery from {} within {ARRIVAL:?}", consumer.queue()))
        .expect("consume")
        .expect("consumer cancelled")
}

async fn assert_silent(consumer: &mut Consumer) {
    if let Ok(delivery) = tokio::time::timeout(SILENCE, consumer.next()).await {
        panic!(
            "unexpected delivery from {}: {delivery:?}",
            consumer.queue()
        );
    }
}

fn task(payload: &str) -> OutgoingMessage {
    OutgoingMessage::new(payload.as_bytes().to_vec())
        .with_header("task_id", format!("task-{payload}"))
        .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
}

async fn round_trip_with_headers(queue: Arc<dyn TaskQueue>) {
    let message = task("frame-7")
        .with_message_id("attempt-1")
        .with_correlation_id("job-42")
        .with_header("attempt", "1");
    queue.publish_task(FAMILY, message).await.expect("publish");
    let mut consumer = queue.consume_tasks(FAMILY, 4).await.expect("consume");
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(&delivery.payload[..], b"frame-7");
    assert_eq!(delivery.message_id.as_deref(), Some("attempt-1"));
    assert_eq!(delivery.correlation_id.as_deref(), Some("job-42"));
    assert_eq!(
        delivery.headers.get("task_id").map(String::as_str),
        Some("task-frame-7")
    );
    assert_eq!(
        delivery.headers.get("attempt").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        delivery.traceparent(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        delivery.headers.len(),
        3,
        "only application headers: {:?}",
        delivery.headers
    );
    assert!(!delivery.redelivered);
    assert_eq!(delivery.delivery_count, 0);
    assert_eq!(delivery.dead_letter, None);
    delivery.acker.ack().await.expect("ack");
    // Families are separate queues.
    let mut other = queue
        .consume_tasks(OTHER_FAMILY, 4)
        .await
        .expect("consume other family");
    assert_silent(&mut other).await;
}

async fn ack_removes_the_message(queue: Arc<dyn TaskQueue>) {
    queue
        .publish_task(FAMILY, task("a"))
        .await
        .expect("publish");
    let mut consumer = queue.consume_tasks(FAMILY, 1).await.expect("consume");
    let delivery = next_delivery(&mut consumer).await;
    delivery.acker.ack().await.expect("ack");
    consumer.close().await.expect("close");
    let mut again = queue.consume_tasks(FAMILY, 1).await.expect("consume again");
    assert_silent(&mut again).await;
}

async fn dropped_consumer_redelivers_to_another(queue: Arc<dyn TaskQueue>) {
    let message = task("crash");
    let message_id = message.message_id.clone();
    queue.publish_task(FAMILY, message).await.expect("publish");
    let mut crashing = queue.consume_tasks(FAMILY, 1).await.expect("consume");
    let first = next_delivery(&mut crashing).await;
    assert_eq!(first.delivery_count, 0);
    let mut survivor = queue
        .consume_tasks(FAMILY, 1)
        .await
        .expect("second consumer");
    assert_silent(&mut survivor).await;
    drop(crashing); // the worker crashes holding the delivery
    let second = next_delivery(&mut survivor).await;
    assert_eq!(second.message_id.as_deref(), Some(message_id.as_str()));
    assert!(second.redelivered);
    assert_eq!(second.delivery_count, 1);
    assert_eq!(second.headers, first.headers);
    // The crashed consumer's acker can no longer settle the delivery.
    let error = first
        .acker
        .ack()
        .await
        .expect_err("ack after the consumer went away");
    assert!(matches!(error, QueueError::Closed { .. }), "{error:?}");
    second.acker.ack().await.expect("ack");
    assert_silent(&mut survivor).await;
}

async fn nack_without_requeue_and_reject_dead_letter(queue: Arc<dyn TaskQueue>) {
    queue
        .publish_task(FAMILY, task("nacked").with_message_id("m-nacked"))
        .await
        .expect("publish");
    queue
        .publish_task(FAMILY, task("rejected").with_message_id("m-rejected"))
        .await
        .expect("publish");
    let mut consumer = queue.consume_tasks(FAMILY, 2).await.expect("consume");
    let first = next_delivery(&mut consumer).await;
    let second = next_delivery(&mut consumer).await;
    first.acker.nack(false).await.expect("nack");
    second.acker.reject().await.expect("reject");
    let mut dead = queue
        .consume_dead_letters(10)
        .await
        .expect("consume dead letters");
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut dead).await;
        let dead_letter = delivery.dead_letter.clone().expect("dead-letter info");
        assert_eq!(dead_letter.reason, DeadLetterReason::Rejected);
        assert!(
            dead_letter.queue.ends_with(".tasks.sd15"),
            "{dead_letter:?}"
        );
        let id = delivery.message_id.clone().expect("message id");
        let payload = String::from_utf8(delivery.payload.to_vec()).expect("utf-8");
        assert_eq!(id, format!("m-{payload}"));
        assert_eq!(
            delivery.headers.get("task_id"),
            Some(&format!("task-{payload}"))
        );
        assert!(delivery.traceparent().is_some());
        seen.insert(id);
        delivery.acker.ack().await.expect("ack dead letter");
    }
    assert_eq!(seen.len(), 2);
    assert_silent(&mut consumer).await;
}

async fn delivery_limit_dead_letters(queue: Arc<dyn TaskQueue>) {
    queue
        .publish_task(FAMILY, task("poison").with_message_id("m-poison"))
        .await
        .expect("publish");
    let mut consumer = queue.consume_tasks(FAMILY, 1).await.expect("consume");
    // Returned more than DELIVERY_LIMIT times: delivered DELIVERY_LIMIT + 1 times in all.
    for expected_count in 0..=u64::from(DELIVERY_LIMIT) {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.delivery_count, expected_count);
        assert_eq!(delivery.redelivered, expected_count > 0);
        delivery.acker.nack(true).await.expect("nack with requeue");
    }
    assert_silent(&mut consumer).await;
    let mut dead = queue
        .consume_dead_letters(1)
        .await
        .expect("consume dead letters");
    let delivery = next_delivery(&mut dead).await;
    assert_eq!(delivery.message_id.as_deref(), Some("m-poison"));
    assert_eq!(
        delivery.headers.get("task_id").map(String::as_str),
        Some("task-poison")
    );
    let dead_letter = delivery.dead_letter.clone().expect("dead-letter info");
    assert_eq!(dead_letter.reason, DeadLetterReason::DeliveryLimit);
    assert!(
        dead_letter.queue.ends_with(".tasks.sd15"),
        "{dead_letter:?}"
    );
    assert_eq!(dead_letter.count, 1);
    assert_eq!(
        delivery.delivery_count, 0,
        "a dead letter's count starts again in the dead-letter queue"
    );
    assert!(!delivery.redelivered);
    delivery.acker.ack().await.expect("ack");
}

async fn crashes_count_towards_the_delivery_limit(queue: Arc<dyn TaskQueue>) {
    queue
        .publish_task(FAMILY, task("crashy"))
        .await
        .expect("publish");
    for expected_count in 0..=u64::from(DELIVERY_LIMIT) {
        let mut consumer = queue.consume_tasks(FAMILY, 1).await.expect("consume");
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.delivery_count, expected_count);
        consumer.close().await.expect("close");
    }
    let mut dead = queue
        .consume_dead_letters(1)
        .await
        .expect("consume dead letters");
    let delivery = next_delivery(&mut dead).await;
    assert_eq!(
        delivery.dead_letter.expect("dead-letter info").reason,
        DeadLetterReason::DeliveryLimit
    );
}

async fn prefetch_limits_unacked_deliveries(queue: Arc<dyn TaskQueue>) {
    const PREFETCH: u16 = 3;
    let messages: Vec<_> = (0..10).map(|index| task(&index.to_string())).collect();
    queue
        .publish_task_batch(FAMILY, messages)
        .await
        .expect("publish batch");
    let mut consumer = queue
        .consume_tasks(FAMILY, PREFETCH)
        .await
        .expect("consume");
    let mut held = Vec::new();
    for _ in 0..PREFETCH {
        held.push(next_delivery(&mut consumer).await);
    }
    assert_silent(&mut consumer).await;
    held.remove(0).acker.ack().await.expect("ack");
    held.push(next_delivery(&mut consumer).await);
    assert_silent(&mut consumer).await;
    let mut consumed = PREFETCH as usize + 1;
    for delivery in held {
        delivery.acker.ack().await.expect("ack");
    }
    while consumed < 10 {
        next_delivery(&mut consumer)
            .await
            .acker
            .ack()
            .await
            .expect("ack");
        consumed += 1;
    }
    assert_silent(&mut consumer).await;
}

async fn control_broadcast_reaches_every_subscriber(queue: Arc<dyn TaskQueue>) {
    // Nobody listens yet: a broadcast is not an error.
    queue
        .broadcast_control(OutgoingMessage::new(&b"ignored"[..]))
        .await
        .expect("broadcast to nobody");
    let mut first = queue.consume_control().await.expect("subscribe");
    let mut second = queue.consume_control().await.expect("subscribe");
    assert_ne!(first.queue(), second.queue());
    queue
        .broadcast_control(
            OutgoingMessage::new(&b"cancel job-42"[..]).with_header("job_id", "job-42"),
        )
        .await
        .expect("broadcast");
    for consumer in [&mut first, &mut second] {
        let delivery = next_delivery(consumer).await;
        assert_eq!(&delivery.payload[..], b"cancel job-42");
        assert_eq!(
            delivery.headers.get("job_id").map(String::as_str),
            Some("job-42")
        );
        delivery.acker.ack().await.expect("ack");
        assert_silent(consumer).await;
    }
}

async fn replies_reach_only_the_addressed_worker(queue: Arc<dyn TaskQueue>) {
    let mut worker_a = queue
        .consume_replies("worker-a")
        .await
        .expect("consume replies");
    let mut worker_b = queue
        .consume_replies("worker-b")
        .await
        .expect("consume replies");
    queue
        .reply_to_worker(
            "worker-a",
            OutgoingMessage::new(&b"recorded"[..]).with_correlation_id("attempt-1"),
        )
        .await
        .expect("reply");
    let delivery = next_delivery(&mut worker_a).await;
    assert_eq!(&delivery.payload[..], b"recorded");
    assert_eq!(delivery.correlation_id.as_deref(), Some("attempt-1"));
    delivery.acker.ack().await.expect("ack");
    assert_silent(&mut worker_b).await;
    let error = queue
        .reply_to_worker("worker-gone", OutgoingMessage::new(&b"recorded"[..]))
        .await
        .expect_err("reply to a worker without a reply queue");
    assert!(matches!(error, QueueError::Publish { .. }), "{error:?}");
    let invalid = queue
        .reply_to_worker("bad worker", OutgoingMessage::new(&b""[..]))
        .await;
    assert!(
        matches!(invalid, Err(QueueError::InvalidName { .. })),
        "{invalid:?}"
    );
}

async fn events_round_trip(queue: Arc<dyn TaskQueue>) {
    queue
        .publish_event(
            OutgoingMessage::new(&b"frame done"[..]).with_header("kind", "attempt_finished"),
        )
        .await
        .expect("publish event");
    let mut events = queue.consume_events(16).await.expect("consume events");
    let delivery = next_delivery(&mut events).await;
    assert_eq!(&delivery.payload[..], b"frame done");
    assert_eq!(
        delivery.headers.get("kind").map(String::as_str),
        Some("attempt_finished")
    );
    delivery.acker.ack().await.expect("ack");
}

async fn publishing_to_an_undeclared_family_fails(queue: Arc<dyn TaskQueue>) {
    let error = queue
        .publish_task("flux", task("x"))
        .await
        .expect_err("no queue for family flux");
    assert!(matches!(error, QueueError::Publish { .. }), "{error:?}");
    let error = queue
        .consume_tasks("flux", 1)
        .await
        .expect_err("no queue for family flux");
    assert!(matches!(error, QueueError::Topology { .. }), "{error:?}");
    // The queue still works afterwards.
    queue
        .publish_task(FAMILY, task("after"))
        .await
        .expect("publish after a failure");
}

async fn batch_of_1000_confirmed_and_consumed_once(queue: Arc<dyn TaskQueue>) {
    const COUNT: usize = 1000;
    let messages: Vec<_> = (0..COUNT).map(|index| task(&index.to_string())).collect();
    let ids: HashSet<String> = messages
        .iter()
        .map(|message| message.message_id.clone())
        .collect();
    queue
        .publish_task_batch(FAMILY, messages)
        .await
        .expect("all confirmed");
    let mut consumers = Vec::new();
    for _ in 0..2 {
        consumers.push(queue.consume_tasks(FAMILY, 100).await.expect("consume"));
    }
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for mut consumer in consumers {
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Ok(Some(delivery))) =
                tokio::time::timeout(SILENCE * 3, consumer.next()).await
            {
                let id = delivery.message_id.clone().expect("message id");
                assert!(!delivery.redelivered);
                delivery.acker.ack().await.expect("ack");
                if sender.send(id).is_err() {
                    break;
                }
            }
        }));
    }
    drop(sender);
    for task in tasks {
        task.await.expect("consumer task");
    }
    let mut seen = HashSet::new();
    while let Some(id) = receiver.recv().await {
        assert!(seen.insert(id.clone()), "message {id} consumed twice");
    }
    assert_eq!(seen, ids);
}

/// The stats of the queue whose name ends with `suffix`.
async fn stats_of(queue: &dyn TaskQueue, suffix: &str) -> Option<storyfarm_queue::QueueStats> {
    queue
        .queue_stats(&[FAMILY, OTHER_FAMILY, "undeclared"])
        .await
        .expect("queue stats")
        .into_iter()
        .find(|s| s.queue.ends_with(suffix))
}

async fn queue_stats_count_ready_messages_and_consumers(queue: Arc<dyn TaskQueue>) {
    let stats = queue
        .queue_stats(&[FAMILY, OTHER_FAMILY, "undeclared"])
        .await
        .expect("queue stats");
    let mut names: Vec<&str> = stats.iter().map(|s| s.queue.as_str()).collect();
    names.sort();
    // Both families' task queues, the dead letters and the events; the undeclared family is
    // left out (and does not break the connection: the calls below still work).
    assert_eq!(names.len(), 4, "{names:?}");
    for suffix in [
        format!(".tasks.{FAMILY}"),
        format!(".tasks.{OTHER_FAMILY}"),
        ".tasks.dead".to_string(),
        ".events".to_string(),
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(&suffix)),
            "{suffix} in {names:?}"
        );
    }
    assert!(
        stats.iter().all(|s| s.messages == 0 && s.consumers == 0),
        "{stats:?}"
    );

    for p in ["a", "b", "c"] {
        queue.publish_task(FAMILY, task(p)).await.expect("publish");
    }
    let own = format!(".tasks.{FAMILY}");
    let s = stats_of(queue.as_ref(), &own).await.unwrap();
    assert_eq!((s.messages, s.consumers), (3, 0));
    let mut consumer = queue.consume_tasks(FAMILY, 1).await.expect("consume");
    let held = next_delivery(&mut consumer).await;
    // The broker's counts follow the delivery shortly after it arrives.
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    let s = loop {
        let s = stats_of(queue.as_ref(), &own).await.unwrap();
        if (s.messages, s.consumers) == (2, 1) || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (s.messages, s.consumers),
        (2, 1),
        "a held delivery is not ready"
    );
    held.acker.ack().await.expect("ack");
    consumer.close().await.expect("close");
    let other = stats_of(queue.as_ref(), &format!(".tasks.{OTHER_FAMILY}"))
        .await
        .unwrap();
    assert_eq!((other.messages, other.consumers), (0, 0));
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test]
                async fn $test() {
                    super::with_queue(super::Backend::InProcess, super::$test).await;
                }
            )*
        }
        mod rabbit {
            $(
                #[tokio::test]
                async fn $test() {
                    super::with_queue(super::Backend::Rabbit, super::$test).await;
                }
            )*
        }
    };
}

conformance!(
    round_trip_with_headers,
    ack_removes_the_message,
    dropped_consumer_redelivers_to_another,
    nack_without_requeue_and_reject_dead_letter,
    delivery_limit_dead_letters,
    crashes_count_towards_the_delivery_limit,
    prefetch_limits_unacked_deliveries,
    control_broadcast_reaches_every_subscriber,
    replies_reach_only_the_addressed_worker,
    events_round_trip,
    publishing_to_an_undeclared_family_fails,
    batch_of_1000_confirmed_and_consumed_once,
    queue_stats_count_ready_messages_and_consumers,
);
