//! `storyfarm render board.yaml`: the farm in one process on embedded defaults. The same
//! coordinator (API, planner, dispatch, ingestion), task protocol and workers as the farm run
//! over SQLite, an in-process queue and a local artifact directory; frames, a contact sheet and
//! `manifest.json` land in the output folder, and an interrupted run resumes where it stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use storyfarm_blob::{BlobKey, BlobStore, LocalDirStore};
use storyfarm_coordinator::planner::PlanPolicy;
use storyfarm_coordinator::{Coordinator, DEFAULT_MAX_REFERENCE_BYTES};
use storyfarm_core::keys::{anchor_png_key, reference_png_key, sha256_hex};
use storyfarm_core::{JobId, StoryboardSpec};
use storyfarm_diffusion::device::default_precision;
use storyfarm_diffusion::device::{DeviceSpec, Precision};
use storyfarm_diffusion::model::HubOptions;
use storyfarm_proto::v1 as pb;
use storyfarm_queue::{InProcessQueue, QueueConfig, TaskQueue};
use storyfarm_store::{
    FrameState, JobState, MetadataStore, PrerequisiteKind, RetryPolicy, SqliteStore,
};
use storyfarm_worker::{ModelCache, ModelLoader, Worker, WorkerConfig};
use tokio::sync::watch;

use crate::client::{follow_job, submit_spec, Endpoint};
use crate::models::prepare_model;
use crate::sheet::{contact_sheet, sheet_names, thumbnail, Cell, FRAMES_PER_SHEET};

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// The storyboard file (YAML; README "Storyboard files" documents it).
    board: PathBuf,
    /// Where frames, the contact sheet and manifest.json go [default: renders/<board name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Render with this model instead of the storyboard's (hub id or diffusers folder).
    #[arg(long)]
    model: Option<String>,
    /// Workers rendering in parallel [default: one per device].
    #[arg(long)]
    workers: Option<usize>,
    /// Devices, comma separated (cpu, cuda, cuda:1); workers are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    device: Vec<DeviceSpec>,
    #[arg(long)]
    precision: Option<Precision>,
    /// Database, artifacts and caches, kept between runs [default: $XDG_DATA_HOME/storyfarm or
    /// ~/.local/share/storyfarm].
    #[arg(long, env = "STORYFARM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Render every frame again instead of resuming or reusing an earlier run of this storyboard.
    #[arg(long)]
    fresh: bool,
}

/// The run was interrupted (Ctrl-C); main exits with 130 like a shell does.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {done} of {total} frames are rendered; run the same command again to resume")]
pub struct Interrupted {
    pub done: u32,
    pub total: u32,
}

fn default_data_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("XDG_DATA_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("storyfarm")
}

/// Which job renders a storyboard, by the storyboard's content (`runs/<key>.json`).
#[derive(Serialize, Deserialize)]
struct RunRecord {
    job_id: String,
    board: String,
}

/// The content key of a storyboard: everything that decides its pixels, images by their bytes
/// (not their paths), the board's name and location excluded.
fn board_key(spec: &StoryboardSpec, images: &BoardImages) -> Result<String> {
    let mut value = serde_json::to_value(spec)?;
    if let (Some(style), Some(image)) = (
        value.get_mut("style").and_then(|s| s.as_object_mut()),
        &images.style,
    ) {
        style.insert(
            "image".into(),
            serde_json::Value::String(sha256_hex(&image.bytes)),
        );
    }
    if let Some(characters) = value.get_mut("characters").and_then(|c| c.as_array_mut()) {
        for (c, image) in characters.iter_mut().zip(&images.characters) {
            if let (Some(c), Some(image)) = (c.as_object_mut(), image) {
                c.insert(
                    "image".into(),
                    serde_json::Value::String(sha256_hex(&image.bytes)),
                );
            }
        }
    }
    if let Some(frames) = value.get_mut("frames") {
        *frames = serde_json::to_value(
            spec.resolved_frames()
                .iter()
                .map(|f| (&f.prompt, &f.negative_prompt, f.seed, &f.characters))
                .collect::<Vec<_>>(),
        )?;
    }
    Ok(sha256_hex(serde_json::to_string(&value)?.as_bytes()))
}

/// Reads a picture the board names, so a bad file fails before anything starts.
fn read_picture(board: &Path, field: &str, path: &Path) -> Result<BoardImage> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "{}: {field}: cannot read {}",
            board.display(),
            path.display()
        )
    })?;
    let picture = image::load_from_memory(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: {field}: {} is not a readable image: {e}",
            board.display(),
            path.display()
        )
    })?;
    Ok(BoardImage {
        thumbnail: thumbnail(&picture.to_rgb8()),
        bytes,
    })
}

/// Reads the board and everything it points to, so a bad file fails before anything starts.
fn load_board(args: &RenderArgs) -> Result<(StoryboardSpec, BoardImages)> {
    let mut spec = StoryboardSpec::load(&args.board)?;
    if let Some(model) = &args.model {
        let local = Path::new(model);
        spec.model = if local.is_dir() {
            local
                .canonicalize()
                .unwrap_or_else(|_| local.to_path_buf())
                .display()
                .to_string()
        } else {
            model.clone()
        };
        spec.validate()
            .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    }
    let style = match spec.style.as_ref().and_then(|s| s.image.as_deref()) {
        Some(path) => Some(read_picture(&args.board, "style.image", path)?),
        None => None,
    };
    let characters = spec
        .characters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.image
                .as_deref()
                .map(|path| read_picture(&args.board, &format!("characters[{i}].image"), path))
                .transpose()
        })
        .collect::<Result<_>>()?;
    Ok((spec, BoardImages { style, characters }))
}

/// A picture of the board as read once: its bytes (hashed, uploaded) and its contact-sheet cell.
struct BoardImage {
    bytes: Vec<u8>,
    thumbnail: image::RgbImage,
}

/// The board's pictures: the style's and each character's, when they have one.
#[derive(Default)]
struct BoardImages {
    style: Option<BoardImage>,
    characters: Vec<Option<BoardImage>>,
}

/// The embedded farm: coordinator and workers on one queue, store and artifact directory.
struct LocalFarm {
    store: Arc<SqliteStore>,
    blobs: Arc<dyn BlobStore>,
    endpoint: Endpoint,
    stop: watch::Sender<bool>,
    coordinator: tokio::task::JoinHandle<()>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl LocalFarm {
    async fn start(data_dir: &Path, args: &RenderArgs) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let store = Arc::new(
            SqliteStore::open(&data_dir.join("storyfarm.db"))
                .await
                .context("opening the local database")?,
        );
        let blobs: Arc<dyn BlobStore> =
            Arc::new(LocalDirStore::open(data_dir.join("artifacts")).await?);
        let queue: Arc<dyn TaskQueue> = Arc::new(InProcessQueue::new(QueueConfig {
            namespace: "local".into(),
            ..QueueConfig::default()
        }));
        let families = vec!["sd".to_string(), "sdxl".to_string()];
        let (stop, stop_rx) = watch::channel(false);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the local API port")?;
        let endpoint = Endpoint::new(format!("http://{}", listener.local_addr()?));
        let coordinator = Coordinator {
            store: store.clone(),
            blobs: blobs.clone(),
            queue: queue.clone(),
            families: families.clone(),
            policy: PlanPolicy { max_attempts: 3 },
            retry: RetryPolicy {
                base: Duration::from_millis(500),
                max: Duration::from_secs(10),
            },
            max_reference_bytes: DEFAULT_MAX_REFERENCE_BYTES,
            metrics_listener: None,
        };
        let shutdown = stopped(stop_rx.clone());
        let coordinator = tokio::spawn(async move {
            if let Err(e) = coordinator.serve(listener, shutdown).await {
                tracing::error!(error = %e, "local coordinator stopped");
            }
        });

        let devices = if args.device.is_empty() {
            vec![DeviceSpec::Cpu]
        } else {
            args.device.clone()
        };
        let count = args.workers.unwrap_or(devices.len()).max(1);
        let hub = HubOptions::from_env()?;
        let caches: Vec<Arc<ModelCache>> = devices
            .iter()
            .map(|&device| {
                Arc::new(ModelCache::new(
                    ModelLoader {
                        device,
                        precision: args.precision,
                        hub: hub.clone(),
                    },
                    1,
                ))
            })
            .collect();
        let mut workers = Vec::new();
        for i in 0..count {
            let config = WorkerConfig {
                worker_id: format!("local-{}-{}", std::process::id(), i + 1),
                families: families.clone(),
                cache_dir: data_dir.join("trajectories"),
                heartbeat: Duration::from_secs(10),
                progress_every: 1,
                recorded_timeout: Duration::from_secs(30),
            };
            let worker = Arc::new(Worker::new(
                config,
                queue.clone(),
                blobs.clone(),
                caches[i % caches.len()].clone(),
            ));
            let shutdown = stopped(stop_rx.clone());
            workers.push(tokio::spawn(async move {
                if let Err(e) = worker.run(shutdown).await {
                    tracing::error!(error = %e, "local worker stopped");
                }
            }));
        }
        Ok(Self {
            store,
            blobs,
            endpoint,
            stop,
            coordinator,
            workers,
        })
    }

    /// Workers hand their task back at the next step; then the coordinator stops.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.coordinator).await;
    }
}

/// The job an earlier run of this board left, when it can still be finished or reused.
async fn earlier_job(store: &SqliteStore, runs: &Path, key: &str) -> Result<Option<JobId>> {
    let Ok(text) = std::fs::read_to_string(runs.join(format!("{key}.json"))) else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_str::<RunRecord>(&text) else {
        return Ok(None);
    };
    let Ok(id) = record.job_id.parse::<JobId>() else {
        return Ok(None);
    };
    match store.get_job(id).await {
        Ok(job)
            if matches!(
                job.state,
                JobState::Queued | JobState::Running | JobState::Succeeded
            ) =>
        {
            Ok(Some(id))
        }
        Ok(_) => Ok(None),
        Err(storyfarm_store::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn frame_file(index: u32) -> String {
    format!("frame-{:03}.png", index + 1)
}

/// Writes a frame's PNG unless the file already holds exactly these bytes (a resumed run leaves
/// finished frames untouched).
async fn write_frame(
    blobs: &dyn BlobStore,
    out: &Path,
    index: u32,
    png_key: &str,
) -> Result<(PathBuf, Vec<u8>)> {
    let key = BlobKey::new(png_key.to_string())?;
    let bytes = blobs
        .get(&key)
        .await
        .with_context(|| format!("reading frame {} from the artifact store", index + 1))?;
    let path = out.join(frame_file(index));
    if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
        let partial = path.with_extension("png.partial");
        std::fs::write(&partial, &bytes)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((path, bytes.to_vec()))
}

/// A character as the output shows it: its anchors' contact-sheet cells and manifest entry.
struct CharacterOutput {
    cells: Vec<Cell>,
    manifest: serde_json::Value,
}

/// A style generated from its prompt has no picture of the user's: its generated picture is
/// written to `style-generated.png` and shown in the style's cell. Returns its hash and thumbnail.
async fn write_generated_style(
    farm: &LocalFarm,
    spec: &StoryboardSpec,
    job_id: JobId,
    out: &Path,
) -> Result<Option<(String, image::RgbImage)>> {
    if spec.style.as_ref().is_none_or(|s| s.image.is_some()) {
        return Ok(None);
    }
    let prerequisites = farm.store.job_prerequisites(job_id).await?;
    let Some(trajectory) = prerequisites
        .iter()
        .find(|p| p.kind == PrerequisiteKind::Style)
        .and_then(|p| p.artifact_key.as_deref())
    else {
        return Ok(None);
    };
    let key = BlobKey::new(reference_png_key(trajectory))?;
    let bytes = farm
        .blobs
        .get(&key)
        .await
        .context("reading the generated style reference from the artifact store")?;
    let path = out.join("style-generated.png");
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let thumb = image::load_from_memory(&bytes)
        .map(|im| thumbnail(&im.to_rgb8()))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some((sha256_hex(&bytes), thumb)))
}

/// Writes every character's anchors to `anchors/<name>-<n>.png` and returns their cells (shown
/// before the frames on every contact-sheet page) and manifest entries.
async fn write_anchors(
    farm: &LocalFarm,
    spec: &StoryboardSpec,
    images: &BoardImages,
    job_id: JobId,
    out: &Path,
) -> Result<Vec<CharacterOutput>> {
    if spec.characters.is_empty() {
        return Ok(Vec::new());
    }
    let prerequisites = farm.store.job_prerequisites(job_id).await?;
    let dir = out.join("anchors");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut outputs = Vec::new();
    for (i, character) in spec.characters.iter().enumerate() {
        let stored = prerequisites
            .iter()
            .find(|p| p.kind == PrerequisiteKind::Anchors && p.name == character.name);
        let mut cells = Vec::new();
        let mut files = Vec::new();
        for n in 0..character.anchors {
            let label = character.name.clone();
            let mut picture = None;
            if let Some(file) = stored.and_then(|p| p.artifact_key.as_deref()) {
                let key = BlobKey::new(anchor_png_key(file, n))?;
                let bytes = farm.blobs.get(&key).await.with_context(|| {
                    format!(
                        "reading anchor {} of {} from the artifact store",
                        n + 1,
                        character.name
                    )
                })?;
                let name = format!("{}-{}.png", character.name.replace(' ', "_"), n + 1);
                std::fs::write(dir.join(&name), &bytes)
                    .with_context(|| format!("writing {}", dir.join(&name).display()))?;
                picture = image::load_from_memory(&bytes)
                    .ok()
                    .map(|im| thumbnail(&im.to_rgb8()));
                files.push(serde_json::json!({
                    "file": format!("anchors/{name}"),
                    "png_sha256": sha256_hex(&bytes),
                }));
            }
            cells.push(Cell {
                label,
                caption: if n == 0 && character.image.is_some() {
                    format!("anchor 1, its picture: {}", character.description)
                } else {
                    format!("anchor {}: {}", n + 1, character.description)
                },
                image: picture,
            });
        }
        outputs.push(CharacterOutput {
            cells,
            manifest: serde_json::json!({
                "name": character.name,
                "description": character.description,
                "subject_words": character.subject_words,
                "anchors": character.anchors,
                "seed": spec.character_seed(i),
                "image": character.image.as_ref().map(|p| p.display().to_string()),
                "image_sha256": images.characters.get(i).and_then(|im| im.as_ref()).map(|im| sha256_hex(&im.bytes)),
                "anchors_key": stored.map(|p| p.cache_key.clone()),
                "state": stored.map(|p| p.state.as_str()),
                "anchor_files": files,
            }),
        });
    }
    Ok(outputs)
}

#[derive(Serialize)]
struct ManifestFrame {
    index: u32,
    file: Option<String>,
    prompt: String,
    negative_prompt: String,
    seed: u64,
    state: String,
    png_sha256: Option<String>,
    latents_key: Option<String>,
    error: Option<String>,
    finished_at: Option<String>,
}

#[derive(Serialize)]
struct Manifest {
    storyfarm: &'static str,
    board: String,
    board_key: String,
    job_id: String,
    model: String,
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    frames_per_task: u32,
    style: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    characters: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consistory: Option<storyfarm_core::ConsistoryOptions>,
    contact_sheets: Vec<String>,
    frames: Vec<ManifestFrame>,
}

pub async fn run(args: RenderArgs) -> Result<()> {
    let (spec, images) = load_board(&args)?;
    let key = board_key(&spec, &images)?;
    let stem = args
        .board
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "storyboard".into());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("renders").join(&stem));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let runs = data_dir.join("runs");
    std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;

    // The model is found (or fetched, with a progress bar) before anything starts: a bad id is
    // one line, not a failed job.
    let first_device = args.device.first().copied().unwrap_or_default();
    let precision = match args.precision {
        Some(p) => p,
        None => default_precision(&first_device.device()?),
    };
    let (model, hub) = (spec.model.clone(), HubOptions::from_env()?);
    tokio::task::spawn_blocking(move || prepare_model(&model, &hub, precision))
        .await?
        .with_context(|| format!("{}: model", args.board.display()))?;

    // One process per storyboard and data directory: a second one would requeue the first
    // one's tasks as lost and render them twice. The OS drops the lock when the process ends,
    // however it ends.
    let lock_path = runs.join(format!("{key}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is being rendered by another storyfarm process on {}; wait for it, or pass another --data-dir",
            args.board.display(),
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", lock_path.display())),
    }

    let farm = LocalFarm::start(&data_dir, &args).await?;
    let result = render_board(&farm, &args, &spec, &images, &key, &runs, &out).await;
    farm.stop().await;
    result
}

async fn render_board(
    farm: &LocalFarm,
    args: &RenderArgs,
    spec: &StoryboardSpec,
    images: &BoardImages,
    key: &str,
    runs: &Path,
    out: &Path,
) -> Result<()> {
    let store = farm.store.as_ref();
    let channel = farm.endpoint.channel().await?;
    let earlier = if args.fresh {
        None
    } else {
        earlier_job(store, runs, key).await?
    };
    // Frames finished by an earlier run are written quietly: this run did not render them.
    let mut already = std::collections::HashSet::new();
    let job_id = match earlier {
        Some(id) => {
            // The in-process queue died with the last process: its deliveries are gone.
            let requeued = store.requeue_lost_deliveries(Some(id)).await?;
            let frames = store.list_frames(id).await?;
            already.extend(
                frames
                    .iter()
                    .filter(|f| f.state == FrameState::Succeeded)
                    .map(|f| f.index),
            );
            let done = already.len();
            if done == frames.len() {
                eprintln!(
                    "all {} frames were rendered by an earlier run (--fresh renders them again)",
                    frames.len()
                );
            } else {
                eprintln!("resuming job {id}: {done} of {} frames already rendered, {requeued} task(s) requeued", frames.len());
            }
            id
        }
        None => {
            let job = submit_spec(spec, &args.board, None, channel.clone()).await?;
            let record = RunRecord {
                job_id: job.id.clone(),
                board: args.board.display().to_string(),
            };
            std::fs::write(
                runs.join(format!("{key}.json")),
                serde_json::to_vec_pretty(&record)?,
            )?;
            eprintln!(
                "rendering {} frames of {} ({} inversion task(s), {} anchor task(s), {} render task(s))",
                job.frames_total,
                args.board.display(),
                job.inversion_tasks,
                job.anchor_tasks,
                job.render_tasks
            );
            job.id.parse::<JobId>()?
        }
    };

    let already = &already;
    // Frames written (or found already written) by this run: the final pass reads them from disk
    // instead of fetching and comparing them again.
    let written = std::sync::Mutex::new(std::collections::HashSet::new());
    let written_ref = &written;
    let write_finished = move |frame: pb::Frame| async move {
        if frame.state != pb::FrameState::Succeeded as i32 || frame.png_key.is_empty() {
            return Ok(None);
        }
        // Written as they finish, so an interrupted run leaves every finished frame on disk.
        let (path, _) = write_frame(farm.blobs.as_ref(), out, frame.index, &frame.png_key).await?;
        written_ref
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(frame.index);
        if already.contains(&frame.index) {
            return Ok(None);
        }
        Ok(Some(format!(
            "frame {} done: {}",
            frame.index + 1,
            path.display()
        )))
    };
    let job_name = job_id.to_string();
    let follow = follow_job(channel, &job_name, spec.steps, write_finished);
    let job = tokio::select! {
        job = follow => job?,
        _ = tokio::signal::ctrl_c() => {
            let frames = store.list_frames(job_id).await?;
            let done = frames.iter().filter(|f| f.state == FrameState::Succeeded).count() as u32;
            return Err(Interrupted { done, total: frames.len() as u32 }.into());
        }
    };

    // Every frame again from the store: those of an earlier run were not in this run's events.
    let frames = store.list_frames(job_id).await?;
    let written = written.into_inner().unwrap_or_else(|p| p.into_inner());
    let board_name = args
        .board
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let anchors = write_anchors(farm, spec, images, job_id, out).await?;
    let generated_style = write_generated_style(farm, spec, job_id, out).await?;
    let sheets = sheet_names(frames.len());
    let mut manifest_frames = Vec::new();
    for (page, (chunk, sheet_name)) in frames.chunks(FRAMES_PER_SHEET).zip(&sheets).enumerate() {
        // One page of thumbnails in memory at a time, however long the storyboard.
        let mut cells = Vec::new();
        if let Some(style) = &spec.style {
            // A generated style has no picture of its own: its prompt stands in the cell.
            cells.push(Cell {
                label: "style".into(),
                caption: style.prompt.clone(),
                image: images
                    .style
                    .as_ref()
                    .map(|i| i.thumbnail.clone())
                    .or_else(|| generated_style.as_ref().map(|(_, t)| t.clone())),
            });
        }
        cells.extend(anchors.iter().flat_map(|c| c.cells.iter().cloned()));
        for f in chunk {
            let mut entry = ManifestFrame {
                index: f.index,
                file: None,
                prompt: f.prompt.clone(),
                negative_prompt: f.negative_prompt.clone(),
                seed: f.seed,
                state: f.state.as_str().to_string(),
                png_sha256: None,
                latents_key: f.latents_key.clone(),
                error: f.error.clone(),
                finished_at: f.finished_at.map(|t| t.to_rfc3339()),
            };
            let mut picture = None;
            if let (FrameState::Succeeded, Some(png)) = (f.state, &f.png_key) {
                let path = out.join(frame_file(f.index));
                let bytes = match written.contains(&f.index) {
                    true => std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                    false => write_frame(farm.blobs.as_ref(), out, f.index, png).await?.1,
                };
                entry.png_sha256 = Some(sha256_hex(&bytes));
                entry.file = Some(frame_file(f.index));
                picture = image::load_from_memory(&bytes)
                    .ok()
                    .map(|i| thumbnail(&i.to_rgb8()));
            }
            cells.push(Cell {
                label: format!("#{}", f.index + 1),
                caption: f.prompt.clone(),
                image: picture,
            });
            manifest_frames.push(entry);
        }
        let title = match sheets.len() {
            1 => format!("{board_name} - {} frames", frames.len()),
            n => format!("{board_name} - page {} of {n}", page + 1),
        };
        contact_sheet(&title, &cells)
            .save(out.join(sheet_name))
            .with_context(|| format!("writing {}", out.join(sheet_name).display()))?;
    }
    let manifest = Manifest {
        storyfarm: env!("CARGO_PKG_VERSION"),
        board: args.board.display().to_string(),
        board_key: key.to_string(),
        job_id: job_id.to_string(),
        model: spec.model.clone(),
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        guidance: spec.guidance,
        frames_per_task: spec.frames_per_task,
        style: spec.style.as_ref().map(|style| {
            serde_json::json!({
                "image": style.image.as_ref().map(|i| i.display().to_string()),
                "image_sha256": images.style.as_ref().map(|i| sha256_hex(&i.bytes)),
                "generated_seed": style.image.is_none().then(|| spec.style_seed()),
                "generated_file": generated_style.as_ref().map(|(sha, _)| {
                    serde_json::json!({ "file": "style-generated.png", "png_sha256": sha })
                }),
                "prompt": style.prompt,
                "offset": style.offset,
                "inversion_guidance": style.inversion_guidance,
                "options": style.options,
            })
        }),
        characters: anchors.into_iter().map(|c| c.manifest).collect(),
        consistory: (!spec.characters.is_empty()).then(|| spec.consistory.clone()),
        contact_sheets: sheets,
        frames: manifest_frames,
    };
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;

    let failed = frames
        .iter()
        .filter(|f| f.state != FrameState::Succeeded)
        .count();
    if job.state != pb::JobState::Succeeded as i32 || failed > 0 {
        bail!(
            "{failed} of {} frames were not rendered: {}",
            frames.len(),
            job.error
        );
    }
    println!("{}", out.display());
    eprintln!(
        "{} frames, contact sheet and manifest in {}",
        frames.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_key_follows_content_not_paths() {
        let yaml = "model: m\nwidth: 64\nheight: 64\nframes:\n  - prompt: a\n  - prompt: b\n";
        let a = StoryboardSpec::from_yaml(yaml).unwrap();
        let none = BoardImages::default();
        let key = board_key(&a, &none).unwrap();
        assert_eq!(key, board_key(&a.clone(), &none).unwrap());
        // An explicit seed equal to the default one renders the same pixels: same key.
        let explicit =
            StoryboardSpec::from_yaml(&yaml.replace("prompt: b", "prompt: b\n    seed: 1"))
                .unwrap();
        assert_eq!(explicit.frame_seed(1), a.frame_seed(1));
        assert_eq!(board_key(&explicit, &none).unwrap(), key);
        let changed = StoryboardSpec::from_yaml(&yaml.replace("prompt: b", "prompt: c")).unwrap();
        assert_ne!(board_key(&changed, &none).unwrap(), key);
        // Who a frame shows decides its pixels too.
        let cast = "model: m\nwidth: 64\nheight: 64\ncharacters:\n  - { name: Rex, description: a dog, subject_words: [dog] }\nframes:\n  - prompt: a dog\n";
        let alone = StoryboardSpec::from_yaml(cast).unwrap();
        let with_rex =
            StoryboardSpec::from_yaml(&format!("{cast}    characters: [Rex]\n")).unwrap();
        assert_ne!(
            board_key(&alone, &none).unwrap(),
            board_key(&with_rex, &none).unwrap()
        );
    }
}
