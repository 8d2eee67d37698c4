//! `storyfarm submit`, `storyfarm watch` and `storyfarm frames`: clients of the gRPC API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use storyfarm_core::StoryboardSpec;
use storyfarm_proto::v1 as pb;
use storyfarm_proto::v1::job_service_client::JobServiceClient;
use storyfarm_proto::v1::project_service_client::ProjectServiceClient;
use storyfarm_proto::v1::reference_service_client::ReferenceServiceClient;
use storyfarm_proto::v1::storyboard_service_client::StoryboardServiceClient;
use tonic::transport::Channel;

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The coordinator's gRPC address.
    #[arg(long, env = "STORYFARM_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
}

impl Endpoint {
    async fn channel(&self) -> Result<Channel> {
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

/// Uploads a reference image in chunks.
async fn upload_reference(channel: Channel, project_id: &str, image: &Path, prompt: &str) -> Result<pb::Reference> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut messages = vec![pb::UploadReferenceRequest {
        part: Some(pb::upload_reference_request::Part::Header(pb::ReferenceHeader {
            project_id: project_id.to_string(),
            kind: pb::ReferenceKind::Style as i32,
            prompt: prompt.to_string(),
            filename: image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        })),
    }];
    messages.extend(
        bytes
            .chunks(256 * 1024)
            .map(|c| pb::UploadReferenceRequest { part: Some(pb::upload_reference_request::Part::Chunk(c.to_vec())) }),
    );
    let reference = ReferenceServiceClient::new(channel)
        .upload_reference(tokio_stream::iter(messages))
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(reference)
}

/// Submits a storyboard file; returns the job.
pub async fn submit_board(board: &Path, project: Option<&str>, endpoint: &Endpoint) -> Result<pb::Job> {
    let spec = StoryboardSpec::load(board)?;
    let channel = endpoint.channel().await?;
    let project_id = match project {
        Some(id) => id.to_string(),
        None => {
            let name = board.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "storyboard".into());
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
            let reference = upload_reference(channel.clone(), &project_id, &style.image, &style.prompt).await?;
            Some(pb::StyleSettings {
                reference_id: reference.id,
                offset: style.offset,
                inversion_guidance: style.inversion_guidance,
                options: Some(pb::StyleAlignedOptions::from(&style.options)),
            })
        }
        None => None,
    };
    let frames = spec
        .resolved_frames()
        .into_iter()
        .map(|f| pb::FrameSpec { prompt: f.prompt, negative_prompt: Some(f.negative_prompt), seed: Some(f.seed) })
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
            }),
            frames,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let job = JobServiceClient::new(channel)
        .submit_job(pb::SubmitJobRequest { storyboard_id: storyboard.id })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(job)
}

pub async fn submit(args: SubmitArgs) -> Result<()> {
    let job = submit_board(&args.board, args.project.as_deref(), &args.endpoint).await?;
    eprintln!(
        "submitted {} frames: {} inversion task(s), {} render task(s)",
        job.frames_total, job.inversion_tasks, job.render_tasks
    );
    println!("{}", job.id);
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    pb::JobState::try_from(state).map(|s| s.as_str_name()).unwrap_or("JOB_STATE_UNKNOWN")
}

pub async fn watch(args: WatchArgs) -> Result<()> {
    let channel = args.endpoint.channel().await?;
    let mut stream = JobServiceClient::new(channel)
        .watch_job(pb::WatchJobRequest { id: args.job.clone() })
        .await
        .map_err(status_error)?
        .into_inner();
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} frames  {elapsed_precise} (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    overall.set_prefix("job");
    let step_style = ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} steps")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut frame_bars: std::collections::HashMap<u32, ProgressBar> = std::collections::HashMap::new();
    let mut last = None;
    while let Some(event) = stream.message().await.map_err(status_error)? {
        match event.event {
            Some(pb::job_event::Event::Job(job)) => {
                overall.set_length(job.frames_total as u64);
                overall.set_position((job.frames_succeeded + job.frames_failed) as u64);
                overall.set_message(state_name(job.state).trim_start_matches("JOB_STATE_").to_lowercase());
                last = Some(job);
            }
            Some(pb::job_event::Event::Progress(p)) => {
                let bar = frame_bars.entry(p.index).or_insert_with(|| {
                    let b = bars.add(ProgressBar::new(p.steps as u64));
                    b.set_style(step_style.clone());
                    b.set_prefix(format!("frame {}", p.index + 1));
                    b
                });
                bar.set_position(p.step as u64);
            }
            Some(pb::job_event::Event::Frame(f)) => {
                let done = matches!(
                    pb::FrameState::try_from(f.state),
                    Ok(pb::FrameState::Succeeded | pb::FrameState::Failed | pb::FrameState::Cancelled)
                );
                if done {
                    if let Some(bar) = frame_bars.remove(&f.index) {
                        bar.finish_and_clear();
                    }
                    if !f.error.is_empty() {
                        bars.println(format!("frame {} failed: {}", f.index + 1, f.error))?;
                    }
                }
            }
            None => {}
        }
    }
    overall.finish();
    let Some(job) = last else { bail!("the coordinator sent no job state") };
    println!("{} {}", job.id, state_name(job.state).trim_start_matches("JOB_STATE_").to_lowercase());
    if job.state != pb::JobState::Succeeded as i32 {
        bail!("job {} ended {}: {}", job.id, state_name(job.state), job.error);
    }
    Ok(())
}

pub async fn frames(args: FramesArgs) -> Result<()> {
    let channel = args.endpoint.channel().await?;
    let mut jobs = JobServiceClient::new(channel);
    let frames = jobs
        .list_frames(pb::ListFramesRequest { job_id: args.job.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .frames;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = 0;
    for frame in frames.iter().filter(|f| f.state == pb::FrameState::Succeeded as i32) {
        let mut stream = jobs
            .download_frame(pb::DownloadFrameRequest { job_id: args.job.clone(), index: frame.index })
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
        eprintln!("{} of {} frames are not (yet) rendered", frames.len() - written, frames.len());
    }
    Ok(())
}
