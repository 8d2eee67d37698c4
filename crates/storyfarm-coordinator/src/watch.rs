//! Live job updates for `WatchJob`: ingestion signals "job changed" and forwards per-frame
//! progress; each watcher re-reads the job from the store on a signal (and on a slow tick, so a
//! missed signal or a coordinator restart only delays an update) and sends what changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storyfarm_core::JobId;
use storyfarm_proto::v1 as pb;
use storyfarm_store::MetadataStore;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::convert;
use crate::status::ApiError;

#[derive(Clone, Debug)]
pub enum Signal {
    Changed,
    Progress(pb::FrameProgress),
    Inversion(pb::InversionProgress),
    Anchor(pb::AnchorProgress),
}

/// Per-job broadcast channels, created on first use and dropped when nobody listens.
#[derive(Default)]
pub struct WatchHub {
    channels: Mutex<HashMap<JobId, broadcast::Sender<Signal>>>,
}

impl WatchHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn sender(&self, job: JobId) -> broadcast::Sender<Signal> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|_, s| s.receiver_count() > 0);
        channels
            .entry(job)
            .or_insert_with(|| broadcast::channel(256).0)
            .clone()
    }

    pub fn subscribe(&self, job: JobId) -> broadcast::Receiver<Signal> {
        self.sender(job).subscribe()
    }

    pub fn signal(&self, job: JobId, signal: Signal) {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = channels.get(&job) {
            let _ = sender.send(signal);
        }
    }
}

/// Streams the job's state, then every change, until the job ends or the client goes away.
pub fn watch_job(
    store: Arc<dyn MetadataStore>,
    hub: Arc<WatchHub>,
    job_id: JobId,
) -> mpsc::Receiver<Result<pb::JobEvent, Status>> {
    let (tx, rx) = mpsc::channel(64);
    let mut signals = hub.subscribe(job_id);
    tokio::spawn(async move {
        let id = job_id.to_string();
        let mut sent_job: Option<pb::Job> = None;
        let mut sent_frames: HashMap<u32, pb::Frame> = HashMap::new();
        let mut sent_anchors: HashMap<String, pb::CharacterAnchors> = HashMap::new();
        // Anchor counts per character name, from the job's storyboard (read once).
        let mut anchor_counts: Option<HashMap<String, u32>> = None;
        loop {
            // Send what changed since the last look.
            let snapshot = async {
                let job = store.get_job(job_id).await?;
                let frames = store.list_frames(job_id).await?;
                let prerequisites = store.job_prerequisites(job_id).await?;
                if anchor_counts.is_none() && !prerequisites.is_empty() {
                    let sb = store.get_storyboard(job.storyboard_id).await?;
                    anchor_counts = Some(crate::service::anchor_counts(&sb.stored.spec));
                }
                Ok::<_, ApiError>((job, frames, prerequisites))
            }
            .await;
            let (job, frames, prerequisites) = match snapshot {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let counts = anchor_counts.clone().unwrap_or_default();
            for anchors in prerequisites.iter().filter_map(|p| {
                convert::character_anchors(p, counts.get(&p.name).copied().unwrap_or_default())
            }) {
                if sent_anchors.get(&anchors.name) != Some(&anchors) {
                    sent_anchors.insert(anchors.name.clone(), anchors.clone());
                    let event = pb::JobEvent {
                        job_id: id.clone(),
                        event: Some(pb::job_event::Event::Anchors(anchors)),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            for f in &frames {
                let f = convert::frame(f);
                if sent_frames.get(&f.index) != Some(&f) {
                    sent_frames.insert(f.index, f.clone());
                    let event = pb::JobEvent {
                        job_id: id.clone(),
                        event: Some(pb::job_event::Event::Frame(f)),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            let pj = convert::job(&job);
            if sent_job.as_ref() != Some(&pj) {
                sent_job = Some(pj.clone());
                let event = pb::JobEvent {
                    job_id: id.clone(),
                    event: Some(pb::job_event::Event::Job(pj)),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if job.state.is_terminal() {
                return;
            }
            // Wait for a change; forward progress as it comes.
            let mut deadline = Box::pin(tokio::time::sleep(Duration::from_secs(2)));
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    signal = signals.recv() => match signal {
                        Ok(Signal::Changed) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(Signal::Progress(p)) => {
                            let event = pb::JobEvent { job_id: id.clone(), event: Some(pb::job_event::Event::Progress(p)) };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Signal::Inversion(p)) => {
                            let event = pb::JobEvent { job_id: id.clone(), event: Some(pb::job_event::Event::Inversion(p)) };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Signal::Anchor(p)) => {
                            let event = pb::JobEvent { job_id: id.clone(), event: Some(pb::job_event::Event::Anchor(p)) };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tx.closed() => return,
                }
            }
        }
    });
    rx
}
