//! Throughput probe (not a test): publishes N persistent messages with publisher confirms to a
//! quorum task queue in batches while a consumer receives and acks them; prints msgs/s and the
//! p50/p99 publish→consume latency.
//!
//! `cargo run -p storyfarm-queue --example queue_throughput -- [messages] [batch] [prefetch] [payload-bytes] [in-process]`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use storyfarm_queue::{InProcessQueue, OutgoingMessage, QueueConfig, RabbitQueue, TaskQueue};

const FAMILY: &str = "probe";
const SENT_AT_HEADER: &str = "sent_at_ns";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or(0)
}

fn argument(index: usize, default: usize) -> anyhow::Result<usize> {
    match std::env::args().nth(index) {
        Some(text) => Ok(text.parse()?),
        None => Ok(default),
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let messages = argument(1, 20_000)?;
    let batch = argument(2, 500)?.max(1);
    let prefetch = u16::try_from(argument(3, 200)?)?;
    let payload_bytes = argument(4, 256)?;
    let in_process = std::env::args().nth(5).as_deref() == Some("in-process");

    let namespace = format!("storyfarm-probe-{}", uuid::Uuid::new_v4().simple());
    let config = QueueConfig::from_env().with_namespace(namespace);
    let queue: Box<dyn TaskQueue> = if in_process {
        Box::new(InProcessQueue::new(config.clone()))
    } else {
        Box::new(RabbitQueue::connect(config.clone()).await?)
    };
    queue.declare_topology(&[FAMILY]).await?;
    let mut consumer = queue.consume_tasks(FAMILY, prefetch).await?;

    let consume = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(messages);
        while latencies.len() < messages {
            let Some(delivery) = consumer.next().await? else {
                anyhow::bail!("consumer cancelled");
            };
            let sent_at: u128 = delivery
                .headers
                .get(SENT_AT_HEADER)
                .map(|text| text.parse())
                .transpose()?
                .unwrap_or(0);
            latencies.push(Duration::from_nanos(now_ns().saturating_sub(sent_at) as u64));
            delivery.acker.ack().await?;
        }
        Ok::<_, anyhow::Error>((latencies, Instant::now()))
    });

    let payload = vec![7u8; payload_bytes];
    let started = Instant::now();
    let mut published = 0;
    while published < messages {
        let size = batch.min(messages - published);
        let chunk: Vec<_> = (0..size)
            .map(|_| {
                OutgoingMessage::new(payload.clone())
                    .with_header(SENT_AT_HEADER, now_ns().to_string())
            })
            .collect();
        queue.publish_task_batch(FAMILY, chunk).await?;
        published += size;
    }
    let publish_elapsed = started.elapsed();
    let (mut latencies, consumed_at) = consume.await??;
    let total_elapsed = consumed_at.duration_since(started);
    queue.delete_topology(&[FAMILY]).await?;

    latencies.sort();
    println!(
        "backend={} messages={messages} batch={batch} prefetch={prefetch} payload={payload_bytes}B",
        if in_process { "in-process" } else { "rabbitmq" }
    );
    println!(
        "publish (confirmed): {:.0} msgs/s in {:.2}s",
        messages as f64 / publish_elapsed.as_secs_f64(),
        publish_elapsed.as_secs_f64()
    );
    println!(
        "end to end (published, consumed, acked): {:.0} msgs/s in {:.2}s",
        messages as f64 / total_elapsed.as_secs_f64(),
        total_elapsed.as_secs_f64()
    );
    println!(
        "publish->consume latency: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    Ok(())
}
