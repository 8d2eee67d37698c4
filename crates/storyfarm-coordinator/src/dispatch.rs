//! The outbox dispatcher: publishes what transactions queued, with publisher confirms, then
//! marks it published. After a restart it republishes whatever was not marked (workers and
//! ingestion tolerate the duplicates). Also turns due retries into new attempts.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use storyfarm_proto::v1 as pb;
use storyfarm_queue::{OutgoingMessage, TaskQueue};
use storyfarm_store::{MetadataStore, OutboxMessage};
use storyfarm_telemetry::CoordinatorMetrics;
use tokio::sync::Notify;

/// Rows published per round.
const BATCH: u32 = 500;

/// The message for one outbox row: the task at its attempt, with ids and trace context in headers.
pub fn task_message(row: &OutboxMessage) -> Result<OutgoingMessage, prost::DecodeError> {
    Ok(stamped_task(row)?.1)
}

/// The task of an outbox row as published now, and its message.
fn stamped_task(row: &OutboxMessage) -> Result<(pb::Task, OutgoingMessage), prost::DecodeError> {
    let mut task = pb::Task::decode(row.payload.as_slice())?;
    task.attempt = row.attempt;
    task.family = row.family.clone();
    task.published_at_unix_ms = chrono::Utc::now().timestamp_millis();
    let traceparent = task.traceparent.clone();
    let mut message = OutgoingMessage::new(task.encode_to_vec())
        .with_message_id(format!("{}:{}", row.task_id, row.attempt))
        .with_header("task_id", row.task_id.to_string())
        .with_header("attempt", row.attempt.to_string())
        .with_header("job_id", task.job_id.clone());
    if !traceparent.is_empty() {
        message = message.with_traceparent(traceparent);
    }
    Ok((task, message))
}

/// One round: release due retries, publish pending rows per family, mark them. Returns how many
/// rows were published.
pub async fn dispatch_once(
    store: &dyn MetadataStore,
    queue: &dyn TaskQueue,
    metrics: &CoordinatorMetrics,
) -> Result<usize, crate::CoordinatorError> {
    let released = store.release_due_retries().await?;
    metrics.retries_released(u64::from(released));
    let rows = store.pending_outbox(BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut families: Vec<&str> = rows.iter().map(|r| r.family.as_str()).collect();
    families.sort();
    families.dedup();
    let mut published = 0;
    for family in families {
        let batch: Vec<&OutboxMessage> = rows.iter().filter(|r| r.family == family).collect();
        let mut messages = Vec::with_capacity(batch.len());
        let mut kinds = Vec::with_capacity(batch.len());
        // One span per task in its job's trace, from before the publish to the broker's confirm.
        let mut spans = Vec::with_capacity(batch.len());
        for row in &batch {
            let (task, message) = stamped_task(row)?;
            kinds.push(task.kind_name());
            let span = tracing::info_span!("dispatch", task_id = %task.task_id, attempt = task.attempt, kind = task.kind_name(), family);
            storyfarm_telemetry::continue_trace(&span, &task.traceparent);
            spans.push(span);
            messages.push(message);
        }
        queue.publish_task_batch(family, messages).await?;
        drop(spans);
        for kind in kinds {
            metrics.task_published(kind, family);
        }
        let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
        store.mark_published(&ids).await?;
        published += ids.len();
        tracing::debug!(family, tasks = ids.len(), "tasks published");
    }
    Ok(published)
}

/// Runs rounds whenever woken, and at least every `tick` (for retries coming due).
pub async fn run_dispatcher(
    store: Arc<dyn MetadataStore>,
    queue: Arc<dyn TaskQueue>,
    wake: Arc<Notify>,
    tick: Duration,
    metrics: CoordinatorMetrics,
) {
    loop {
        match dispatch_once(store.as_ref(), queue.as_ref(), &metrics).await {
            Ok(n) if n as u32 == BATCH => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "dispatch round failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
