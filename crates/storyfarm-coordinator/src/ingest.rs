//! Event ingestion: worker events become store transactions exactly once (by task, attempt and
//! sequence number), then the worker is told the event is recorded, then the event is acked.
//! Dead-lettered tasks fail their frames with the reason.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use storyfarm_core::TaskId;
use storyfarm_proto::v1 as pb;
use storyfarm_queue::{Delivery, OutgoingMessage, TaskQueue};
use storyfarm_store::{
    EventOutcome, FrameArtifacts, MetadataStore, RetryPolicy, TaskEventKind, TaskEventRecord,
};
use storyfarm_telemetry::CoordinatorMetrics;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::watch::{Signal, WatchHub};

/// Sequence number used for the synthetic failure of a dead-lettered attempt.
const DEAD_LETTER_SEQ: u64 = i64::MAX as u64;

pub struct Ingestor {
    pub store: Arc<dyn MetadataStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub hub: Arc<WatchHub>,
    pub dispatch: Arc<Notify>,
    pub retry: RetryPolicy,
    pub metrics: CoordinatorMetrics,
}

/// Counts an event the store applied (once per task, attempt and sequence number, so
/// redelivered events are not counted twice).
fn count_applied(metrics: &CoordinatorMetrics, event: &pb::TaskEvent) {
    let (kind, family) = (event.task_kind.as_str(), event.family.as_str());
    match &event.event {
        Some(pb::task_event::Event::Started(s)) => {
            metrics.task_started(kind, family, s.pickup_seconds)
        }
        Some(pb::task_event::Event::Succeeded(s)) => {
            metrics.task_succeeded(kind, family, s.frames.len())
        }
        Some(pb::task_event::Event::Failed(f)) => {
            let cause = if f.cause.is_empty() {
                "unknown"
            } else {
                f.cause.as_str()
            };
            metrics.task_failed(kind, family, cause)
        }
        _ => {}
    }
}

fn record_from(event: &pb::TaskEvent) -> Result<TaskEventRecord, String> {
    let task_id: TaskId = event
        .task_id
        .parse()
        .map_err(|_| format!("bad task id {:?}", event.task_id))?;
    let kind = match &event.event {
        Some(pb::task_event::Event::Started(_)) => TaskEventKind::Started,
        Some(pb::task_event::Event::Heartbeat(_)) => TaskEventKind::Heartbeat,
        Some(pb::task_event::Event::Progress(_)) => return Err("progress is not recorded".into()),
        Some(pb::task_event::Event::Succeeded(s)) => TaskEventKind::Succeeded {
            frames: s
                .frames
                .iter()
                .map(|f| FrameArtifacts {
                    index: f.index,
                    png_key: f.png_key.clone(),
                    latents_key: f.latents_key.clone(),
                })
                .collect(),
            trajectory_key: (!s.trajectory_key.is_empty()).then(|| s.trajectory_key.clone()),
        },
        Some(pb::task_event::Event::Failed(f)) => TaskEventKind::Failed {
            reason: f.reason.clone(),
            retryable: f.retryable,
        },
        None => return Err("event without a body".into()),
    };
    Ok(TaskEventRecord {
        task_id,
        attempt: event.attempt,
        seq: event.seq,
        worker_id: event.worker_id.clone(),
        kind,
    })
}

impl Ingestor {
    /// Consumes worker events until the consumer ends.
    pub async fn run_events(self: Arc<Self>) -> Result<(), crate::CoordinatorError> {
        let mut consumer = self.queue.consume_events(64).await?;
        while let Some(delivery) = consumer.next().await? {
            self.handle_event(delivery).await;
        }
        Ok(())
    }

    async fn handle_event(&self, delivery: Delivery) {
        let event = match pb::TaskEvent::decode(delivery.payload.clone()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "undecodable task event dead-lettered");
                let _ = delivery.acker.reject().await;
                return;
            }
        };
        // Progress goes straight to the job's watchers: a transaction per step per task would be
        // the busiest write of the farm and keep nothing worth keeping (heartbeats and final
        // events carry the durable state; cancellation reaches workers by broadcast).
        if let Some(pb::task_event::Event::Progress(p)) = &event.event {
            match event.job_id.parse::<storyfarm_core::JobId>() {
                Ok(job_id) if !p.character.is_empty() => {
                    self.hub.signal(
                        job_id,
                        Signal::Anchor(pb::AnchorProgress {
                            character: p.character.clone(),
                            step: p.step,
                            steps: p.steps,
                        }),
                    );
                }
                Ok(job_id) if p.frames.is_empty() => {
                    // A task without frames is the style reference's inversion.
                    self.hub.signal(
                        job_id,
                        Signal::Inversion(pb::InversionProgress {
                            step: p.step,
                            steps: p.steps,
                        }),
                    );
                }
                Ok(job_id) => {
                    for &index in &p.frames {
                        self.hub.signal(
                            job_id,
                            Signal::Progress(pb::FrameProgress {
                                index,
                                step: p.step,
                                steps: p.steps,
                            }),
                        );
                    }
                }
                Err(_) => {
                    tracing::warn!(job_id = %event.job_id, "progress event without a valid job id")
                }
            }
            let _ = delivery.acker.ack().await;
            return;
        }
        let record = match record_from(&event) {
            Ok(r) => r,
            Err(reason) => {
                tracing::error!(%reason, "invalid task event dead-lettered");
                let _ = delivery.acker.reject().await;
                return;
            }
        };
        let span = tracing::info_span!("ingest_event", task_id = %record.task_id, attempt = record.attempt, seq = record.seq, kind = record.kind.as_str());
        if let Some(tp) = delivery.traceparent() {
            storyfarm_telemetry::continue_trace(&span, tp);
        }
        self.apply_event(delivery, event, record)
            .instrument(span)
            .await
    }

    async fn apply_event(&self, delivery: Delivery, event: pb::TaskEvent, record: TaskEventRecord) {
        let outcome = loop {
            match self.store.record_event(&record, &self.retry).await {
                Ok(o) => break o,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "store unavailable; retrying event");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    // Not retryable (unknown task, corrupt row): requeueing would loop forever.
                    tracing::error!(error = %e, "event cannot be recorded; dropped");
                    let _ = delivery.acker.reject().await;
                    return;
                }
            }
        };
        let final_event = matches!(
            record.kind,
            TaskEventKind::Succeeded { .. } | TaskEventKind::Failed { .. }
        );
        let stop = match &outcome {
            EventOutcome::Stale { cancelled, .. } => *cancelled || !final_event,
            _ => false,
        };
        match &outcome {
            EventOutcome::Applied { affected_jobs, .. } => {
                count_applied(&self.metrics, &event);
                for job in affected_jobs {
                    self.hub.signal(*job, Signal::Changed);
                }
                if final_event {
                    // Success may have released waiting renders; failure may schedule a retry.
                    self.dispatch.notify_one();
                }
            }
            EventOutcome::Stale { .. } | EventOutcome::Duplicate => {}
        }
        if final_event || stop {
            let reply = pb::TaskRecorded {
                task_id: event.task_id.clone(),
                attempt: event.attempt,
                seq: event.seq,
                stop,
            };
            if let Err(e) = self
                .queue
                .reply_to_worker(
                    &event.worker_id,
                    OutgoingMessage::new(reply.encode_to_vec()),
                )
                .await
            {
                // The worker is gone; its delivery comes back to another worker, whose events
                // find this outcome recorded.
                tracing::info!(worker_id = %event.worker_id, error = %e, "worker not reachable for the reply");
            }
        }
        if let Err(e) = delivery.acker.ack().await {
            tracing::warn!(error = %e, "event ack failed; it will be redelivered and ignored");
        }
    }

    /// Consumes dead-lettered tasks: their attempt fails for good with the reason.
    pub async fn run_dead_letters(self: Arc<Self>) -> Result<(), crate::CoordinatorError> {
        let mut consumer = self.queue.consume_dead_letters(16).await?;
        while let Some(delivery) = consumer.next().await? {
            let task = match pb::Task::decode(delivery.payload.clone()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "undecodable dead letter dropped");
                    let _ = delivery.acker.ack().await;
                    continue;
                }
            };
            let Ok(task_id) = task.task_id.parse::<TaskId>() else {
                let _ = delivery.acker.ack().await;
                continue;
            };
            let why = match &delivery.dead_letter {
                Some(d) => format!(
                    "{:?} after {} deliveries from {}",
                    d.reason,
                    delivery.delivery_count + 1,
                    d.queue
                ),
                None => "dead-lettered".to_string(),
            };
            let record = TaskEventRecord {
                task_id,
                attempt: task.attempt,
                seq: DEAD_LETTER_SEQ,
                worker_id: "dead-letter-queue".into(),
                kind: TaskEventKind::Failed {
                    reason: format!("task never finished: no worker completed it ({why}); workers may be crashing on it"),
                    retryable: false,
                },
            };
            match self.store.record_event(&record, &self.retry).await {
                Ok(EventOutcome::Applied { affected_jobs, .. }) => {
                    self.metrics.dead_lettered(task.kind_name(), &task.family);
                    for job in affected_jobs {
                        self.hub.signal(job, Signal::Changed);
                    }
                    let _ = delivery.acker.ack().await;
                }
                Ok(_) => {
                    let _ = delivery.acker.ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead letter not recorded; requeued");
                    let _ = delivery.acker.nack(true).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Ok(())
    }
}
