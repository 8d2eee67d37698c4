//! The worker (`storyfarm worker`): takes tasks of its model families from the queue, runs them
//! on its device (models loaded once and kept, trajectories cached on disk), uploads artifacts,
//! reports events, and acknowledges a task only after the coordinator has recorded its outcome.
//! Never touches the database.

mod models;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use storyfarm_blob::{BlobKey, BlobStore};
use storyfarm_diffusion::consistory::ConsistoryOptions;
use storyfarm_diffusion::device::{DeviceSpec, GpuMemoryProbe};
use storyfarm_diffusion::frames::{
    anchors_file, generate_reference, invert_image, picture_from_anchors_file, render_characters,
    render_frames, CharacterFrameRequest, CharacterRenderRequest, CharacterRequest, FrameRequest,
    RenderedFrame, StyleRequest, CHARACTER_INVERSION_GUIDANCE,
};
use storyfarm_diffusion::pipeline::{GenerationSettings, Progress};
use storyfarm_diffusion::style_aligned::StyleAlignedOptions;
use storyfarm_diffusion::DiffusionError;
use storyfarm_proto::v1 as pb;
use storyfarm_queue::{Delivery, OutgoingMessage, QueueError, TaskQueue};
use storyfarm_telemetry::WorkerMetrics;
use tokio::sync::mpsc;
use tracing::Instrument;

pub use models::{ModelCache, ModelLoader};

/// The diffusion crate's StyleAligned options for the storyboard's (the rest keep their defaults).
fn style_aligned_options(o: storyfarm_core::StyleOptions) -> StyleAlignedOptions {
    StyleAlignedOptions {
        share_group_norm: o.share_group_norm,
        share_attention: o.share_attention,
        adain_queries: o.adain_queries,
        adain_keys: o.adain_keys,
        adain_values: o.adain_values,
        shared_score_scale: o.shared_score_scale,
        shared_score_shift: o.shared_score_shift,
        only_self_level: o.only_self_level,
        ..StyleAlignedOptions::default()
    }
}

/// The diffusion crate's ConsiStory options for the storyboard's (the step ranges follow the
/// official formulas of the step count).
fn consistory_options(o: storyfarm_core::ConsistoryOptions) -> ConsistoryOptions {
    let defaults = ConsistoryOptions::default();
    ConsistoryOptions {
        mask_dropout: o.mask_dropout as f32,
        injection_alpha: o.injection_alpha,
        freeu: if o.freeu { defaults.freeu } else { None },
        // Blending ends before the first shared step: no step blends.
        query_blend_last_step: if o.query_blend {
            None
        } else {
            Some(defaults.sdsa_first_step.saturating_sub(1))
        },
        feature_injection: o.feature_injection,
        ..defaults
    }
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub families: Vec<String>,
    /// Where trajectories are cached between tasks.
    pub cache_dir: PathBuf,
    pub heartbeat: Duration,
    /// Report progress every this many steps.
    pub progress_every: u32,
    /// Resend a final event when its "recorded" reply takes longer than this.
    pub recorded_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cache directory {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What failed, as the metrics name it (a small fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// The task itself is invalid (missing parts, inconsistent artifacts).
    Task,
    /// The model would not load.
    Model,
    /// The artifact store.
    Storage,
    /// The computation.
    Render,
    /// The worker could not report to the coordinator.
    Report,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Model => "model",
            Self::Storage => "storage",
            Self::Render => "render",
            Self::Report => "report",
        }
    }
}

/// Why a task did not produce artifacts.
#[derive(Debug)]
enum TaskFailure {
    /// Report it; `retryable` decides whether the coordinator tries again.
    Failed {
        reason: String,
        retryable: bool,
        cause: Cause,
    },
    /// The coordinator said stop (cancelled, or this attempt is stale): ack and move on.
    Stopped,
    /// Shutting down: hand the task back to the queue.
    HandBack,
}

impl From<DiffusionError> for TaskFailure {
    fn from(e: DiffusionError) -> Self {
        match e {
            DiffusionError::Cancelled { .. } => Self::Stopped,
            e => Self::Failed {
                retryable: e.is_retryable(),
                reason: e.to_string(),
                cause: Cause::Render,
            },
        }
    }
}

impl From<storyfarm_blob::BlobError> for TaskFailure {
    fn from(e: storyfarm_blob::BlobError) -> Self {
        Self::Failed {
            retryable: e.is_retryable() || e.is_not_found(),
            reason: e.to_string(),
            cause: Cause::Storage,
        }
    }
}

/// The task in progress, shared with the reply and control listeners.
struct Current {
    task_id: String,
    attempt: u32,
    job_id: String,
    stop: Arc<AtomicBool>,
    recorded: mpsc::UnboundedSender<u64>,
}

/// The character of an anchor task's work, with its picture's trajectory file when it has one.
fn character_request(c: &pb::CharacterWork, picture: Option<Vec<u8>>) -> CharacterRequest {
    CharacterRequest {
        description: c.description.clone(),
        subject_words: c.subject_words.clone(),
        anchor_seeds: c.anchor_seeds.clone(),
        dropout_seed: c.dropout_seed,
        picture,
    }
}

/// What a worker's `/metrics` endpoint serves: its metrics, with the heartbeat age brought up to
/// now and, on CUDA, the device's memory.
pub struct WorkerScrape {
    metrics: WorkerMetrics,
    gpu: Option<(String, GpuMemoryProbe)>,
}

impl WorkerScrape {
    /// `device`: the worker's; a CUDA device is opened once here for the memory figures.
    pub fn new(metrics: WorkerMetrics, device: DeviceSpec) -> Self {
        let gpu = match GpuMemoryProbe::open(device) {
            Ok(probe) => probe.map(|p| (device.to_string(), p)),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: no GPU memory figures");
                None
            }
        };
        Self { metrics, gpu }
    }
}

impl storyfarm_telemetry::Scrape for WorkerScrape {
    fn refresh(&self) -> storyfarm_telemetry::BoxFuture<'_, ()> {
        self.metrics.refresh_heartbeat_age();
        if let Some((name, probe)) = &self.gpu {
            if let Some((used, total)) = probe.read() {
                self.metrics.set_gpu_memory(name, used, total);
            }
        }
        Box::pin(std::future::ready(()))
    }

    fn registry(&self) -> &storyfarm_telemetry::Registry {
        self.metrics.registry()
    }
}

pub struct Worker {
    config: WorkerConfig,
    queue: Arc<dyn TaskQueue>,
    blobs: Arc<dyn BlobStore>,
    models: Arc<ModelCache>,
    current: Arc<Mutex<Option<Current>>>,
    shutting_down: Arc<AtomicBool>,
    seq: AtomicU64,
    metrics: WorkerMetrics,
}

impl Worker {
    pub fn new(
        config: WorkerConfig,
        queue: Arc<dyn TaskQueue>,
        blobs: Arc<dyn BlobStore>,
        models: Arc<ModelCache>,
    ) -> Self {
        Self {
            config,
            queue,
            blobs,
            models,
            current: Arc::new(Mutex::new(None)),
            shutting_down: Arc::new(AtomicBool::new(false)),
            metrics: WorkerMetrics::new(),
            // Sequence numbers keep growing across restarts of a worker with the same id.
            seq: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
            ),
        }
    }

    /// This worker's metrics (served on `/metrics` by whoever runs the worker).
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown` fires; the task in progress is handed back at its next step.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), WorkerError> {
        std::fs::create_dir_all(&self.config.cache_dir).map_err(|source| WorkerError::Cache {
            path: self.config.cache_dir.clone(),
            source,
        })?;
        let families: Vec<&str> = self.config.families.iter().map(String::as_str).collect();
        self.queue.declare_topology(&families).await?;
        let listeners = self.clone().spawn_listeners().await?;
        let (tx, mut rx) = mpsc::channel::<Delivery>(1);
        let mut consumers = Vec::new();
        for family in &self.config.families {
            // One task at a time per family queue; the device runs one task at a time anyway.
            let mut consumer = self.queue.consume_tasks(family, 1).await?;
            let tx = tx.clone();
            consumers.push(tokio::spawn(async move {
                while let Ok(Some(delivery)) = consumer.next().await {
                    if tx.send(delivery).await.is_err() {
                        break;
                    }
                }
                let _ = consumer.close().await;
            }));
        }
        drop(tx);
        tracing::info!(worker_id = %self.config.worker_id, families = ?self.config.families, "worker ready");
        tokio::pin!(shutdown);
        let mut consumers_lost = false;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                delivery = rx.recv() => {
                    let Some(delivery) = delivery else {
                        consumers_lost = true;
                        break;
                    };
                    let handle = tokio::spawn(self.clone().handle(delivery));
                    tokio::pin!(handle);
                    tokio::select! {
                        _ = &mut handle => continue,
                        _ = &mut shutdown => {
                            tracing::info!("shutting down: handing back the task in progress");
                            self.begin_shutdown();
                            let _ = handle.await;
                            break;
                        }
                    }
                }
            }
        }
        self.begin_shutdown();
        for c in consumers {
            c.abort();
        }
        listeners.abort();
        if consumers_lost {
            // The broker connection is gone: exit with an error so a supervisor restarts us.
            return Err(WorkerError::Queue(QueueError::Closed {
                operation: "consume tasks",
            }));
        }
        Ok(())
    }

    /// From now on the task in progress stops at its next step and is handed back.
    fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        if let Some(c) = self.lock_current().as_ref() {
            c.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Listens to this worker's reply queue and to control broadcasts.
    async fn spawn_listeners(self: Arc<Self>) -> Result<tokio::task::JoinHandle<()>, WorkerError> {
        let mut replies = self.queue.consume_replies(&self.config.worker_id).await?;
        let mut control = self.queue.consume_control().await?;
        let worker = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    reply = replies.next() => match reply {
                        Ok(Some(d)) => {
                            if let Ok(r) = pb::TaskRecorded::decode(d.payload.clone()) {
                                let current = worker.lock_current();
                                if let Some(c) = current.as_ref().filter(|c| c.task_id == r.task_id && c.attempt == r.attempt) {
                                    if r.stop {
                                        c.stop.store(true, Ordering::SeqCst);
                                    }
                                    let _ = c.recorded.send(r.seq);
                                }
                            }
                            let _ = d.acker.ack().await;
                        }
                        _ => break,
                    },
                    command = control.next() => match command {
                        Ok(Some(d)) => {
                            if let Ok(pb::Control { command: Some(pb::control::Command::CancelJobId(job)) }) = pb::Control::decode(d.payload.clone()) {
                                if let Some(c) = worker.lock_current().as_ref().filter(|c| c.job_id == job) {
                                    tracing::info!(job_id = %job, task_id = %c.task_id, "job cancelled: stopping task");
                                    c.stop.store(true, Ordering::SeqCst);
                                }
                            }
                            let _ = d.acker.ack().await;
                        }
                        _ => break,
                    },
                }
            }
        }))
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    async fn send_event(
        &self,
        task: &pb::Task,
        seq: u64,
        event: pb::task_event::Event,
    ) -> Result<(), QueueError> {
        let message = pb::TaskEvent {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: self.config.worker_id.clone(),
            seq,
            event: Some(event),
            job_id: task.job_id.clone(),
            task_kind: task.kind_name().to_string(),
            family: task.family.clone(),
        };
        // Events continue the task's span (ingestion becomes its child) when traces are exported.
        let traceparent = storyfarm_telemetry::traceparent_of(&tracing::Span::current())
            .unwrap_or_else(|| task.traceparent.clone());
        self.queue
            .publish_event(
                OutgoingMessage::new(message.encode_to_vec()).with_traceparent(traceparent),
            )
            .await
    }

    /// Sends a final event and waits until the coordinator says it is recorded (resending on
    /// timeout: ingestion is idempotent).
    async fn send_final(
        &self,
        task: &pb::Task,
        event: pb::task_event::Event,
        recorded: &mut mpsc::UnboundedReceiver<u64>,
    ) {
        let seq = self.next_seq();
        loop {
            if let Err(e) = self.send_event(task, seq, event.clone()).await {
                tracing::warn!(error = %e, "event not published; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let deadline = tokio::time::sleep(self.config.recorded_timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    got = recorded.recv() => match got {
                        Some(s) if s == seq => return,
                        Some(_) => continue,
                        None => return,
                    },
                    _ = &mut deadline => break,
                }
            }
            tracing::info!(task_id = %task.task_id, "no record of the final event yet; sending it again");
        }
    }

    async fn handle(self: Arc<Self>, delivery: Delivery) {
        let span = match pb::Task::decode(delivery.payload.clone()) {
            Ok(task) => {
                let trace_id = storyfarm_core::trace::trace_id(&task.traceparent)
                    .unwrap_or_default()
                    .to_string();
                let span = tracing::info_span!("task", task_id = %task.task_id, attempt = task.attempt, job_id = %task.job_id, kind = task.kind_name(), family = %task.family, trace_id = %trace_id, redelivered = delivery.redelivered);
                storyfarm_telemetry::continue_trace(&span, &task.traceparent);
                span
            }
            Err(_) => tracing::info_span!("task"),
        };
        self.handle_in_span(delivery).instrument(span).await
    }

    async fn handle_in_span(self: Arc<Self>, delivery: Delivery) {
        let task = match pb::Task::decode(delivery.payload.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "undecodable task rejected");
                let _ = delivery.acker.reject().await;
                return;
            }
        };
        let stop = Arc::new(AtomicBool::new(self.shutting_down.load(Ordering::SeqCst)));
        let (recorded_tx, mut recorded_rx) = mpsc::unbounded_channel();
        *self.lock_current() = Some(Current {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            job_id: task.job_id.clone(),
            stop: stop.clone(),
            recorded: recorded_tx,
        });
        tracing::info!("task started");
        let began = std::time::Instant::now();
        self.metrics.task_began();
        let pickup_seconds = (task.published_at_unix_ms > 0).then(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            (now - task.published_at_unix_ms).max(0) as f64 / 1000.0
        });
        let started = self
            .send_event(
                &task,
                self.next_seq(),
                pb::task_event::Event::Started(pb::TaskStarted { pickup_seconds }),
            )
            .await;
        let outcome = match started {
            Err(e) => Err(TaskFailure::Failed {
                reason: format!("cannot report start: {e}"),
                retryable: true,
                cause: Cause::Report,
            }),
            Ok(()) => {
                let heartbeat = self.clone().spawn_heartbeat(task.clone());
                let result = self.run_task(&task, stop.clone()).await;
                heartbeat.abort();
                result
            }
        };
        // A stop while shutting down is ours, not the coordinator's: the task goes back.
        let outcome = match outcome {
            Err(TaskFailure::Stopped) if self.shutting_down.load(Ordering::SeqCst) => {
                Err(TaskFailure::HandBack)
            }
            other => other,
        };
        let (kind, family) = (task.kind_name(), task.family.as_str());
        let ended = |outcome: &str| {
            self.metrics
                .task_ended(kind, family, outcome, began.elapsed().as_secs_f64())
        };
        let settle = match outcome {
            Ok(done) => {
                tracing::info!(frames = done.frames.len(), "task succeeded");
                self.metrics.frames_rendered(family, done.frames.len());
                ended("succeeded");
                self.send_final(
                    &task,
                    pb::task_event::Event::Succeeded(done),
                    &mut recorded_rx,
                )
                .await;
                delivery.acker.ack().await
            }
            Err(TaskFailure::Failed {
                reason,
                retryable,
                cause,
            }) => {
                tracing::warn!(%reason, retryable, cause = cause.as_str(), "task failed");
                ended("failed");
                self.send_final(
                    &task,
                    pb::task_event::Event::Failed(pb::TaskFailed {
                        reason,
                        retryable,
                        cause: cause.as_str().to_string(),
                    }),
                    &mut recorded_rx,
                )
                .await;
                delivery.acker.ack().await
            }
            Err(TaskFailure::HandBack) => {
                tracing::info!("task handed back");
                ended("handed_back");
                delivery.acker.nack(true).await
            }
            Err(TaskFailure::Stopped) => {
                tracing::info!("task stopped at the coordinator's request");
                ended("stopped");
                delivery.acker.ack().await
            }
        };
        if let Err(e) = settle {
            tracing::warn!(error = %e, "could not settle the delivery; it will be redelivered");
        }
        *self.lock_current() = None;
    }

    fn spawn_heartbeat(self: Arc<Self>, task: pb::Task) -> tokio::task::JoinHandle<()> {
        tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(self.config.heartbeat).await;
                    let sent = self
                        .send_event(
                            &task,
                            self.next_seq(),
                            pb::task_event::Event::Heartbeat(pb::TaskHeartbeat {}),
                        )
                        .await;
                    if sent.is_ok() {
                        self.metrics.heartbeat_sent();
                    }
                }
            }
            // In the task's span: heartbeats belong to the task's trace.
            .instrument(tracing::Span::current()),
        )
    }

    /// Fetches a blob through the local cache (trajectories are reused by every render task).
    async fn cached_blob(&self, key: &str) -> Result<Vec<u8>, TaskFailure> {
        let name = key.replace('/', "_");
        let path = self.config.cache_dir.join(name);
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Ok(bytes);
        }
        let blob_key = BlobKey::new(key)?;
        let began = std::time::Instant::now();
        let bytes = self.blobs.get(&blob_key).await?;
        self.metrics.blob_call("get", began.elapsed().as_secs_f64());
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if tokio::fs::write(&tmp, &bytes).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &path).await;
        }
        Ok(bytes.to_vec())
    }

    /// Uploads rendered frames content-addressed.
    #[tracing::instrument(name = "upload", skip_all, fields(frames = rendered.len()))]
    async fn upload_frames(
        &self,
        rendered: Vec<RenderedFrame>,
    ) -> Result<Vec<pb::FrameArtifacts>, TaskFailure> {
        let mut artifacts = Vec::with_capacity(rendered.len());
        for frame in rendered {
            let began = std::time::Instant::now();
            let png = self
                .blobs
                .put_content("png", Bytes::from(frame.png))
                .await?;
            let latents = self
                .blobs
                .put_content("safetensors", Bytes::from(frame.latents))
                .await?;
            // One observation per frame: its picture and latents together.
            self.metrics.blob_call("put", began.elapsed().as_secs_f64());
            artifacts.push(pb::FrameArtifacts {
                index: frame.index,
                png_key: png.as_str().into(),
                latents_key: latents.as_str().into(),
            });
        }
        Ok(artifacts)
    }

    async fn run_task(
        self: &Arc<Self>,
        task: &pb::Task,
        stop: Arc<AtomicBool>,
    ) -> Result<pb::TaskSucceeded, TaskFailure> {
        let settings = task.settings.clone().ok_or(TaskFailure::Failed {
            reason: "task without settings".into(),
            retryable: false,
            cause: Cause::Task,
        })?;
        let generation = GenerationSettings {
            height: settings.height as usize,
            width: settings.width as usize,
            steps: settings.steps as usize,
            guidance_scale: settings.guidance_scale,
        };
        let model = self.models.get(&settings.model, &self.metrics).await?;
        // Progress travels from the compute thread to the event publisher through a channel.
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(u32, u32)>();
        let reporter = {
            let worker = self.clone();
            let task = task.clone();
            let frames: Vec<u32> = match &task.work {
                Some(pb::task::Work::Render(r)) => r.frames.iter().map(|f| f.index).collect(),
                _ => Vec::new(),
            };
            let character = match &task.work {
                Some(pb::task::Work::Anchor(a)) => a
                    .character
                    .as_ref()
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            tokio::spawn(async move {
                while let Some((step, steps)) = progress_rx.recv().await {
                    let event = pb::task_event::Event::Progress(pb::TaskProgress {
                        frames: frames.clone(),
                        step,
                        steps,
                        character: character.clone(),
                    });
                    let _ = worker.send_event(&task, worker.next_seq(), event).await;
                }
            })
        };
        let every = self.config.progress_every.max(1);
        let metrics = self.metrics.clone();
        let family = task.family.clone();
        let mut last_step = std::time::Instant::now();
        let progress = move |p: Progress| -> storyfarm_diffusion::Result<()> {
            let (step, steps) = match p {
                Progress::Denoise { step, steps } | Progress::Invert { step, steps } => {
                    (step, steps)
                }
            };
            // Step 0 is the call before the first step; after it each call ends a step.
            if step > 0 {
                metrics.step(&family, last_step.elapsed().as_secs_f64());
            }
            last_step = std::time::Instant::now();
            if stop.load(Ordering::SeqCst) {
                return Err(DiffusionError::Cancelled { step });
            }
            if step > 0 && ((step as u32).is_multiple_of(every) || step == steps) {
                let _ = progress_tx.send((step as u32, steps as u32));
            }
            Ok(())
        };
        let result = match task.work.clone() {
            Some(pb::task::Work::Invert(work)) => {
                let image = if work.image_key.is_empty() {
                    None
                } else {
                    Some(self.cached_blob(&work.image_key).await?)
                };
                let mut progress = progress;
                let work_key = work.trajectory_key.clone();
                tracing::info!(
                    generated = image.is_none(),
                    "computing the style reference's trajectory"
                );
                let parent = tracing::Span::current();
                let (trajectory, picture) = tokio::task::spawn_blocking(move || match image {
                    Some(image) => {
                        let _span = tracing::info_span!(parent: &parent, "invert").entered();
                        invert_image(
                            &model,
                            &image,
                            &work.image_key,
                            &work.prompt,
                            &generation,
                            work.guidance_scale,
                            &mut progress,
                        )
                        .map(|t| (t, None))
                    }
                    None => {
                        let _span =
                            tracing::info_span!(parent: &parent, "generate_reference").entered();
                        // The reference is rendered like a frame, at the board's guidance.
                        let generation = GenerationSettings {
                            guidance_scale: work.guidance_scale,
                            ..generation
                        };
                        generate_reference(
                            &model,
                            &work.prompt,
                            work.seed,
                            &generation,
                            &mut progress,
                        )
                        .map(|r| (r.trajectory, Some(r.png)))
                    }
                })
                .await
                .map_err(|e| TaskFailure::Failed {
                    reason: format!("inversion panicked: {e}"),
                    retryable: false,
                    cause: Cause::Render,
                })??;
                // The picture first: the trajectory is what marks the reference complete.
                if let Some(png) = picture {
                    let key = BlobKey::new(storyfarm_core::keys::reference_png_key(&work_key))?;
                    self.blobs.put(&key, Bytes::from(png)).await?;
                }
                let key = BlobKey::new(work_key.clone())?;
                self.blobs.put(&key, Bytes::from(trajectory)).await?;
                Ok(pb::TaskSucceeded {
                    frames: Vec::new(),
                    trajectory_key: work_key,
                })
            }
            Some(pb::task::Work::Anchor(work)) => {
                let character = work.character.clone().ok_or(TaskFailure::Failed {
                    reason: "anchor task without a character".into(),
                    retryable: false,
                    cause: Cause::Task,
                })?;
                let style = match &work.style {
                    Some(s) => Some(self.cached_blob(&s.trajectory_key).await?),
                    None => None,
                };
                let image = if character.image_key.is_empty() {
                    None
                } else {
                    Some(self.cached_blob(&character.image_key).await?)
                };
                let options = consistory_options(work.consistory.unwrap_or_default().into());
                let style_options = work
                    .style
                    .as_ref()
                    .and_then(|s| s.options)
                    .map(|o| style_aligned_options(o.into()))
                    .unwrap_or_default();
                let mut progress = progress;
                tracing::info!(character = %character.name, picture = image.is_some(), "rendering anchors");
                let name = character.name.clone();
                let anchors_key = character.anchors_key.clone();
                let parent = tracing::Span::current();
                let (anchors, file) =
                    tokio::task::spawn_blocking(move || {
                        let _span =
                            tracing::info_span!(parent: &parent, "anchors", character = %character.name).entered();
                        let picture = match &image {
                            Some(bytes) => Some(invert_image(
                                &model,
                                bytes,
                                &character.image_key,
                                &character.description,
                                &generation,
                                CHARACTER_INVERSION_GUIDANCE,
                                &mut progress,
                            )?),
                            None => None,
                        };
                        let style = work.style.as_ref().zip(style.as_deref()).map(|(s, bytes)| {
                            StyleRequest {
                                trajectory: bytes,
                                reference_prompt: &s.reference_prompt,
                                offset: s.offset as usize,
                                options: style_options.clone(),
                            }
                        });
                        let request = character_request(&character, picture.clone());
                        let rendered = render_characters(
                            &model,
                            &generation,
                            &CharacterRenderRequest {
                                options: &options,
                                style: style.as_ref(),
                                anchor_negative_prompt: &work.negative_prompt,
                                characters: std::slice::from_ref(&request),
                                frames: &[],
                            },
                            &mut progress,
                        )?;
                        let anchors = rendered.anchors.into_iter().next().unwrap_or_default();
                        let file = anchors_file(&anchors, picture.as_deref())?;
                        let encoded = anchors
                            .iter()
                            .enumerate()
                            .map(|(i, l)| {
                                storyfarm_diffusion::frames::encode_frame(&model, i as u32, l)
                            })
                            .collect::<storyfarm_diffusion::Result<Vec<_>>>()?;
                        Ok::<_, DiffusionError>((encoded, file))
                    })
                    .await
                    .map_err(|e| TaskFailure::Failed {
                        reason: format!("anchor render panicked: {e}"),
                        retryable: false,
                        cause: Cause::Render,
                    })??;
                // Pictures first: the anchors file is what marks the anchors complete.
                for anchor in &anchors {
                    let key = BlobKey::new(storyfarm_core::keys::anchor_png_key(
                        &anchors_key,
                        anchor.index,
                    ))?;
                    self.blobs
                        .put(&key, Bytes::from(anchor.png.clone()))
                        .await?;
                }
                let key = BlobKey::new(anchors_key.clone())?;
                self.blobs.put(&key, Bytes::from(file)).await?;
                tracing::info!(character = %name, anchors = anchors.len(), "anchors stored");
                Ok(pb::TaskSucceeded {
                    frames: Vec::new(),
                    trajectory_key: anchors_key,
                })
            }
            Some(pb::task::Work::Render(work)) if !work.characters.is_empty() => {
                let style = if work.trajectory_key.is_empty() {
                    None
                } else {
                    Some(self.cached_blob(&work.trajectory_key).await?)
                };
                let mut characters = Vec::with_capacity(work.characters.len());
                for c in &work.characters {
                    let picture = if c.image_key.is_empty() {
                        None
                    } else {
                        let file = self.cached_blob(&c.anchors_key).await?;
                        Some(picture_from_anchors_file(&file)?.ok_or_else(|| {
                            TaskFailure::Failed {
                                reason: format!(
                                    "anchors file {} of character {} has no picture trajectory",
                                    c.anchors_key, c.name
                                ),
                                retryable: false,
                                cause: Cause::Task,
                            }
                        })?)
                    };
                    characters.push(character_request(c, picture));
                }
                let frames: Vec<CharacterFrameRequest> = work
                    .frames
                    .iter()
                    .map(|f| CharacterFrameRequest {
                        frame: FrameRequest {
                            index: f.index,
                            prompt: f.prompt.clone(),
                            negative_prompt: f.negative_prompt.clone(),
                            seed: f.seed,
                        },
                        characters: f.characters.iter().map(|&c| c as usize).collect(),
                    })
                    .collect();
                let options = consistory_options(work.consistory.unwrap_or_default().into());
                let style_options = work.options.map(|o| style_aligned_options(o.into()));
                let mut progress = progress;
                tracing::info!(
                    frames = frames.len(),
                    characters = characters.len(),
                    styled = style.is_some(),
                    "rendering with characters"
                );
                let parent = tracing::Span::current();
                let rendered = tokio::task::spawn_blocking(move || {
                    let _span =
                        tracing::info_span!(parent: &parent, "render", frames = frames.len())
                            .entered();
                    let style = style.as_deref().map(|t| StyleRequest {
                        trajectory: t,
                        reference_prompt: &work.reference_prompt,
                        offset: work.offset as usize,
                        options: style_options.unwrap_or_default(),
                    });
                    render_characters(
                        &model,
                        &generation,
                        &CharacterRenderRequest {
                            options: &options,
                            style: style.as_ref(),
                            anchor_negative_prompt: &work.anchor_negative_prompt,
                            characters: &characters,
                            frames: &frames,
                        },
                        &mut progress,
                    )
                    .map(|r| r.frames)
                })
                .await
                .map_err(|e| TaskFailure::Failed {
                    reason: format!("render panicked: {e}"),
                    retryable: false,
                    cause: Cause::Render,
                })??;
                Ok(pb::TaskSucceeded {
                    frames: self.upload_frames(rendered).await?,
                    trajectory_key: String::new(),
                })
            }
            Some(pb::task::Work::Render(work)) => {
                let trajectory = if work.trajectory_key.is_empty() {
                    None
                } else {
                    Some(self.cached_blob(&work.trajectory_key).await?)
                };
                let frames: Vec<FrameRequest> = work
                    .frames
                    .iter()
                    .map(|f| FrameRequest {
                        index: f.index,
                        prompt: f.prompt.clone(),
                        negative_prompt: f.negative_prompt.clone(),
                        seed: f.seed,
                    })
                    .collect();
                let options = work.options.map(|o| style_aligned_options(o.into()));
                let mut progress = progress;
                tracing::info!(
                    frames = frames.len(),
                    styled = trajectory.is_some(),
                    "rendering"
                );
                let parent = tracing::Span::current();
                let rendered = tokio::task::spawn_blocking(move || {
                    let _span =
                        tracing::info_span!(parent: &parent, "render", frames = frames.len())
                            .entered();
                    let style = trajectory.as_deref().map(|t| StyleRequest {
                        trajectory: t,
                        reference_prompt: &work.reference_prompt,
                        offset: work.offset as usize,
                        options: options.unwrap_or_default(),
                    });
                    render_frames(&model, &generation, style.as_ref(), &frames, &mut progress)
                })
                .await
                .map_err(|e| TaskFailure::Failed {
                    reason: format!("render panicked: {e}"),
                    retryable: false,
                    cause: Cause::Render,
                })??;
                Ok(pb::TaskSucceeded {
                    frames: self.upload_frames(rendered).await?,
                    trajectory_key: String::new(),
                })
            }
            None => Err(TaskFailure::Failed {
                reason: "task without work".into(),
                retryable: false,
                cause: Cause::Task,
            }),
        };
        reporter.abort();
        result
    }
}
