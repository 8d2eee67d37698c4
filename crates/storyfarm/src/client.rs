//! `storyfarm submit`, `storyfarm watch` and `storyfarm frames`: clients of the gRPC API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use storyfarm_core::StoryboardSpec;
use storyfarm_proto::v1 as pb;
use storyfarm_proto::v1::job_service_client::JobServiceClient;
use storyfarm_proto::v1::project_service_client::ProjectServiceClient;
use storyfarm_proto::v1::reference_service_client::ReferenceServiceClient;
use storyfarm_proto::v1::storyboard_service_client::StoryboardServiceClient;
use tonic::transport::Channel;

use tracing::Instrument;

use crate::progress::{job_state_name, JobProgress};

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "STORYFARM_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
}

impl Endpoint {
    pub fn new(coordinator: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
        }
    }

    pub async fn channel(&self) -> Result<Channel> {
        Channel::from_shared(self.coordinator.clone())
            .with_context(|| format!("bad coordinator address {}", self.coordinator))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.coordinator))
    }
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The storyboard file (the same file `storyfarm render` reads).
    board: PathBuf,
    /// Project to submit into (an id); a new project named after the file otherwise.
    #[arg(long)]
    project: Option<String>,
    #[command(flatten)]
    endpoint: Endpoint,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    job: String,
    #[command(flatten)]
    endpoint: Endpoint,
}

#[derive(Args, Debug)]
pub struct FramesArgs {
    job: String,
    #[arg(long, default_value = "frames")]
    out: PathBuf,
    #[command(flatten)]
    endpoint: Endpoint,
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code().description(), e.message())
}

/// What a reference upload says about the reference (the image, if any, follows in chunks).
struct ReferenceUpload<'a> {
    kind: pb::ReferenceKind,
    prompt: &'a str,
    name: &'a str,
    subject_words: &'a [String],
    image: Option<&'a Path>,
}

/// Uploads a reference, its image (when it has one) in chunks.
async fn upload_reference(
    channel: Channel,
    project_id: &str,
    upload: ReferenceUpload<'_>,
) -> Result<pb::Reference> {
    let bytes = match upload.image {
        Some(image) => {
            std::fs::read(image).with_context(|| format!("reading {}", image.display()))?
        }
        None => Vec::new(),
    };
    let mut messages = vec![pb::UploadReferenceRequest {
        part: Some(pb::upload_reference_request::Part::Header(
            pb::ReferenceHeader {
                project_id: project_id.to_string(),
                kind: upload.kind as i32,
                prompt: upload.prompt.to_string(),
                filename: upload
                    .image
                    .and_then(|i| i.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                name: upload.name.to_string(),
                subject_words: upload.subject_words.to_vec(),
            },
        )),
    }];
    messages.extend(
        bytes
            .chunks(256 * 1024)
            .map(|c| pb::UploadReferenceRequest {
                part: Some(pb::upload_reference_request::Part::Chunk(c.to_vec())),
            }),
    );
    let reference = ReferenceServiceClient::new(channel)
        .upload_reference(tokio_stream::iter(messages))
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(reference)
}

/// Submits a storyboard file; returns the job.
pub async fn submit_board(
    board: &Path,
    project: Option<&str>,
    endpoint: &Endpoint,
) -> Result<pb::Job> {
    let spec = StoryboardSpec::load(board)?;
    submit_spec(&spec, board, project, endpoint.channel().await?).await
}

/// Submits a loaded storyboard (`board` names it): a project unless given, the style reference,
/// the storyboard and its job.
pub async fn submit_spec(
    spec: &StoryboardSpec,
    board: &Path,
    project: Option<&str>,
    channel: Channel,
) -> Result<pb::Job> {
    let project_id = match project {
        Some(id) => id.to_string(),
        None => {
            let name = board
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "storyboard".into());
            ProjectServiceClient::new(channel.clone())
                .create_project(pb::CreateProjectRequest { name })
                .await
                .map_err(status_error)?
                .into_inner()
                .id
        }
    };
    let style = match &spec.style {
        Some(style) => {
            let reference = upload_reference(
                channel.clone(),
                &project_id,
                ReferenceUpload {
                    kind: pb::ReferenceKind::Style,
                    prompt: &style.prompt,
                    name: "",
                    subject_words: &[],
                    image: style.image.as_deref(),
                },
            )
            .await?;
            Some(pb::StyleSettings {
                reference_id: reference.id,
                offset: style.offset,
                inversion_guidance: style.inversion_guidance,
                options: Some(pb::StyleAlignedOptions::from(&style.options)),
                seed: style.seed,
            })
        }
        None => None,
    };
    let mut characters = Vec::with_capacity(spec.characters.len());
    for c in &spec.characters {
        let reference = upload_reference(
            channel.clone(),
            &project_id,
            ReferenceUpload {
                kind: pb::ReferenceKind::Character,
                prompt: &c.description,
                name: &c.name,
                subject_words: &c.subject_words,
                image: c.image.as_deref(),
            },
        )
        .await?;
        characters.push(pb::CharacterSettings {
            reference_id: reference.id,
            anchors: c.anchors,
            seed: c.seed,
        });
    }
    let frames = spec
        .resolved_frames()
        .into_iter()
        .map(|f| pb::FrameSpec {
            prompt: f.prompt,
            negative_prompt: Some(f.negative_prompt),
            seed: Some(f.seed),
            characters: f
                .characters
                .iter()
                .map(|&c| spec.characters[c].name.clone())
                .collect(),
        })
        .collect();
    let storyboard = StoryboardServiceClient::new(channel.clone())
        .create_storyboard(pb::CreateStoryboardRequest {
            project_id,
            name: board.display().to_string(),
            settings: Some(pb::StoryboardSettings {
                model: spec.model.clone(),
                width: spec.width,
                height: spec.height,
                steps: spec.steps,
                guidance_scale: spec.guidance,
                negative_prompt: spec.negative_prompt.clone(),
                style,
                frames_per_task: spec.frames_per_task,
                seed: spec.seed,
                characters,
                consistory: Some(pb::ConsistorySettings::from(&spec.consistory)),
            }),
            frames,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut request = tonic::Request::new(pb::SubmitJobRequest {
        storyboard_id: storyboard.id,
    });
    // The job's trace continues the caller's: this process's span when it exports traces, else
    // a TRACEPARENT from the environment (a pipeline that runs `storyfarm submit`).
    let traceparent = storyfarm_telemetry::traceparent_of(&tracing::Span::current())
        .or_else(|| std::env::var("TRACEPARENT").ok());
    if let Some(value) = traceparent.and_then(|tp| tp.parse().ok()) {
        request.metadata_mut().insert("traceparent", value);
    }
    let job = JobServiceClient::new(channel)
        .submit_job(request)
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(job)
}

pub async fn submit(args: SubmitArgs) -> Result<()> {
    let span = tracing::info_span!("storyfarm submit", board = %args.board.display());
    if let Ok(parent) = std::env::var("TRACEPARENT") {
        storyfarm_telemetry::continue_trace(&span, &parent);
    }
    let job = submit_board(&args.board, args.project.as_deref(), &args.endpoint)
        .instrument(span)
        .await?;
    eprintln!(
        "submitted {} frames: {} inversion task(s), {} anchor task(s), {} render task(s)",
        job.frames_total, job.inversion_tasks, job.anchor_tasks, job.render_tasks
    );
    println!("{}", job.id);
    Ok(())
}

/// Follows a job's events with progress bars until the job ends. `on_frame` sees every frame as
/// it reaches a final state and may return a line to show. Returns the job as last reported.
pub async fn follow_job<F, Fut>(
    channel: Channel,
    job_id: &str,
    steps: u32,
    mut on_frame: F,
) -> Result<pb::Job>
where
    F: FnMut(pb::Frame) -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>>>,
{
    let mut stream = JobServiceClient::new(channel)
        .watch_job(pb::WatchJobRequest {
            id: job_id.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut progress = JobProgress::new(steps);
    let result = async {
        while let Some(event) = stream.message().await.map_err(status_error)? {
            if let Some(frame) = progress.apply(event) {
                if let Some(line) = on_frame(frame).await? {
                    progress.println(line);
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match result {
        Ok(()) => progress.finish(),
        Err(e) => {
            progress.abandon();
            return Err(e);
        }
    }
    progress
        .job()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the coordinator sent no job state"))
}

pub async fn watch(args: WatchArgs) -> Result<()> {
    let channel = args.endpoint.channel().await?;
    let job = JobServiceClient::new(channel.clone())
        .get_job(pb::GetJobRequest {
            id: args.job.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let steps = StoryboardServiceClient::new(channel.clone())
        .get_storyboard(pb::GetStoryboardRequest {
            id: job.storyboard_id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .settings
        .map(|s| s.steps)
        .unwrap_or(1);
    let job = follow_job(channel, &args.job, steps, |_| async { Ok(None) }).await?;
    println!("{} {}", job.id, job_state_name(job.state));
    if job.state != pb::JobState::Succeeded as i32 {
        bail!(
            "job {} ended {}: {}",
            job.id,
            job_state_name(job.state),
            job.error
        );
    }
    Ok(())
}

pub async fn frames(args: FramesArgs) -> Result<()> {
    let channel = args.endpoint.channel().await?;
    let mut jobs = JobServiceClient::new(channel);
    let frames = jobs
        .list_frames(pb::ListFramesRequest {
            job_id: args.job.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .frames;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = 0;
    for frame in frames
        .iter()
        .filter(|f| f.state == pb::FrameState::Succeeded as i32)
    {
        let mut stream = jobs
            .download_frame(pb::DownloadFrameRequest {
                job_id: args.job.clone(),
                index: frame.index,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(status_error)? {
            bytes.extend_from_slice(&chunk.data);
        }
        let path = args.out.join(format!("frame-{:03}.png", frame.index + 1));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        written += 1;
    }
    if written < frames.len() {
        eprintln!(
            "{} of {} frames are not (yet) rendered",
            frames.len() - written,
            frames.len()
        );
    }
    Ok(())
}
