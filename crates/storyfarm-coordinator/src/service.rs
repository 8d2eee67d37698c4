//! The public gRPC services. Every input is validated before anything is written, so bad input
//! leaves nothing behind in Postgres or the blob store.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use storyfarm_blob::{BlobKey, BlobStore};
use storyfarm_core::storyboard::{validate_characters, validate_style, StyleOptions, StyleSpec};
use storyfarm_core::{
    CharacterSpec, ConsistoryOptions, FrameSpec, JobId, ProjectId, ReferenceId, StoryboardId,
    StoryboardSpec,
};
use storyfarm_proto::v1 as pb;
use storyfarm_proto::v1::job_service_server::JobService;
use storyfarm_proto::v1::project_service_server::ProjectService;
use storyfarm_proto::v1::reference_service_server::ReferenceService;
use storyfarm_proto::v1::storyboard_service_server::StoryboardService;
use storyfarm_queue::{OutgoingMessage, TaskQueue};
use storyfarm_store::{
    MetadataStore, PrerequisiteKind, Reference, ReferenceImage, ReferenceKind, StoredStoryboard,
};
use storyfarm_telemetry::CoordinatorMetrics;
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::model_facts::model_facts;
use crate::planner::{plan_job, JobReferences, PlanPolicy};
use crate::status::ApiError;
use crate::watch::{watch_job, WatchHub};

/// Shared state of the services.
#[derive(Clone)]
pub struct Api {
    pub store: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub hub: Arc<WatchHub>,
    /// Wakes the dispatcher when a transaction wrote outbox rows.
    pub dispatch: Arc<Notify>,
    pub policy: PlanPolicy,
    pub max_reference_bytes: usize,
    pub metrics: CoordinatorMetrics,
}

type ApiResult<T> = Result<Response<T>, Status>;

fn parse<T>(
    field: &str,
    value: &str,
    f: fn(&str, &str) -> Result<T, storyfarm_core::ValidationError>,
) -> Result<T, Status> {
    f(field, value).map_err(|e| ApiError::from(e).into())
}

#[tonic::async_trait]
impl ProjectService for Api {
    #[tracing::instrument(skip_all)]
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> ApiResult<pb::Project> {
        let name = request.into_inner().name;
        if name.trim().is_empty() || name.len() > 200 {
            return Err(ApiError::invalid("name", "must be 1 to 200 characters").into());
        }
        let project = self
            .store
            .create_project(name.trim())
            .await
            .map_err(ApiError::from)?;
        tracing::info!(project_id = %project.id, "project created");
        Ok(Response::new(convert::project(&project)))
    }

    async fn get_project(&self, request: Request<pb::GetProjectRequest>) -> ApiResult<pb::Project> {
        let id = parse("id", &request.into_inner().id, ProjectId::parse_field)?;
        let project = self.store.get_project(id).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::project(&project)))
    }

    async fn list_projects(
        &self,
        _: Request<pb::ListProjectsRequest>,
    ) -> ApiResult<pb::ListProjectsResponse> {
        let projects = self.store.list_projects().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.iter().map(convert::project).collect(),
        }))
    }
}

#[tonic::async_trait]
impl ReferenceService for Api {
    #[tracing::instrument(skip_all)]
    async fn upload_reference(
        &self,
        request: Request<Streaming<pb::UploadReferenceRequest>>,
    ) -> ApiResult<pb::Reference> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadReferenceRequest {
                part: Some(pb::upload_reference_request::Part::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(ApiError::invalid(
                    "header",
                    "the first message must carry the reference header",
                )
                .into())
            }
        };
        let project_id = parse(
            "header.project_id",
            &header.project_id,
            ProjectId::parse_field,
        )?;
        let kind = match pb::ReferenceKind::try_from(header.kind) {
            Ok(pb::ReferenceKind::Style | pb::ReferenceKind::Unspecified) => ReferenceKind::Style,
            Ok(pb::ReferenceKind::Character) => ReferenceKind::Character,
            Err(_) => {
                return Err(ApiError::invalid(
                    "header.kind",
                    format!("unsupported reference kind {}", header.kind),
                )
                .into())
            }
        };
        if header.prompt.trim().is_empty() {
            let what = match kind {
                ReferenceKind::Style => "must describe the image (or the style to generate)",
                ReferenceKind::Character => "must describe the character",
            };
            return Err(ApiError::invalid("header.prompt", what).into());
        }
        let (name, subject_words) = match kind {
            ReferenceKind::Style => {
                if !header.name.is_empty() || !header.subject_words.is_empty() {
                    return Err(ApiError::invalid(
                        "header.name",
                        "a style reference has no name or subject words",
                    )
                    .into());
                }
                (String::new(), Vec::new())
            }
            ReferenceKind::Character => {
                let character = CharacterSpec {
                    name: header.name.clone(),
                    description: header.prompt.trim().to_string(),
                    subject_words: header.subject_words.clone(),
                    image: None,
                    seed: None,
                    anchors: 1,
                };
                validate_characters(std::slice::from_ref(&character)).map_err(|e| {
                    let field = e
                        .field
                        .replacen("characters[0].description", "header.prompt", 1)
                        .replacen("characters[0].", "header.", 1);
                    ApiError::invalid(field, e.message)
                })?;
                (character.name, character.subject_words)
            }
        };
        // Fail before reading megabytes for a project that does not exist.
        self.store
            .get_project(project_id)
            .await
            .map_err(ApiError::from)?;
        let mut bytes = Vec::new();
        while let Some(message) = stream.next().await {
            match message?.part {
                Some(pb::upload_reference_request::Part::Chunk(chunk)) => {
                    if bytes.len() + chunk.len() > self.max_reference_bytes {
                        return Err(ApiError::invalid(
                            "chunk",
                            format!(
                                "reference image exceeds the limit of {} bytes",
                                self.max_reference_bytes
                            ),
                        )
                        .into());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                _ => {
                    return Err(ApiError::invalid(
                        "header",
                        "only the first message may carry a header",
                    )
                    .into())
                }
            }
        }
        // A header alone: a reference made from its prompt.
        let image = if bytes.is_empty() {
            None
        } else {
            Some(self.store_reference_image(&header.filename, bytes).await?)
        };
        let reference = Reference {
            id: ReferenceId::new(),
            project_id,
            kind,
            prompt: header.prompt.trim().to_string(),
            name,
            subject_words,
            image,
            created_at: chrono::Utc::now(),
        };
        let stored = self
            .store
            .create_reference(&reference)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(reference_id = %stored.id, project_id = %project_id, kind = kind.as_str(), bytes = stored.image.as_ref().map_or(0, |i| i.size_bytes), "reference uploaded");
        Ok(Response::new(convert::reference(&stored)))
    }

    async fn get_reference(
        &self,
        request: Request<pb::GetReferenceRequest>,
    ) -> ApiResult<pb::Reference> {
        let id = parse("id", &request.into_inner().id, ReferenceId::parse_field)?;
        let reference = self.store.get_reference(id).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::reference(&reference)))
    }
}

impl Api {
    /// Checks that the bytes decode as an image, then stores them content-addressed.
    async fn store_reference_image(
        &self,
        filename: &str,
        bytes: Vec<u8>,
    ) -> Result<ReferenceImage, Status> {
        let (width, height) = match image::load_from_memory(&bytes) {
            Ok(img) => (img.width(), img.height()),
            Err(e) => {
                let name = if filename.is_empty() {
                    "image"
                } else {
                    filename
                };
                return Err(ApiError::invalid(
                    "chunk",
                    format!("{name} is not a readable PNG or JPEG image: {e}"),
                )
                .into());
            }
        };
        let sha256 = storyfarm_core::keys::sha256_hex(&bytes);
        let size_bytes = bytes.len() as u64;
        let key = self
            .blobs
            .put_content("image", Bytes::from(bytes))
            .await
            .map_err(ApiError::from)?;
        Ok(ReferenceImage {
            sha256,
            key: key.as_str().to_string(),
            width,
            height,
            size_bytes,
        })
    }

    /// The references a storyboard request names, checked to belong to the project and to be of
    /// the right kind.
    async fn request_references(
        &self,
        project_id: ProjectId,
        settings: &pb::StoryboardSettings,
    ) -> Result<(Option<Reference>, Vec<Reference>), Status> {
        let fetch = |field: String, id: &str, kind: ReferenceKind| {
            let id = id.to_string();
            async move {
                let reference_id = ReferenceId::parse_field(&field, &id).map_err(ApiError::from)?;
                let reference = self
                    .store
                    .get_reference(reference_id)
                    .await
                    .map_err(ApiError::from)?;
                if reference.project_id != project_id {
                    return Err(Status::not_found(format!(
                        "reference {reference_id} not found in project {project_id}"
                    )));
                }
                if reference.kind != kind {
                    return Err(ApiError::invalid(
                        field,
                        format!(
                            "reference {reference_id} is a {} reference, not a {} reference",
                            reference.kind.as_str(),
                            kind.as_str()
                        ),
                    )
                    .into());
                }
                Ok(reference)
            }
        };
        let style = match &settings.style {
            Some(style) => Some(
                fetch(
                    "settings.style.reference_id".into(),
                    &style.reference_id,
                    ReferenceKind::Style,
                )
                .await?,
            ),
            None => None,
        };
        let mut characters = Vec::with_capacity(settings.characters.len());
        for (i, c) in settings.characters.iter().enumerate() {
            characters.push(
                fetch(
                    format!("settings.characters[{i}].reference_id"),
                    &c.reference_id,
                    ReferenceKind::Character,
                )
                .await?,
            );
        }
        Ok((style, characters))
    }
}

/// Anchor counts of a storyboard's characters by name.
pub fn anchor_counts(spec: &StoryboardSpec) -> std::collections::HashMap<String, u32> {
    spec.characters
        .iter()
        .map(|c| (c.name.clone(), c.anchors))
        .collect()
}

/// The storyboard an API request describes, with its references already fetched, validated like
/// a storyboard file.
fn storyboard_from_request(
    req: &pb::CreateStoryboardRequest,
    style_reference: Option<&Reference>,
    character_references: &[Reference],
) -> Result<StoredStoryboard, ApiError> {
    let settings = req
        .settings
        .clone()
        .ok_or_else(|| ApiError::invalid("settings", "required"))?;
    let style = match (&settings.style, style_reference) {
        (Some(style), Some(reference)) => {
            let options = style.options.map(StyleOptions::from).unwrap_or_default();
            let spec = StyleSpec {
                image: reference
                    .image
                    .as_ref()
                    .map(|_| format!("reference:{}", reference.id).into()),
                prompt: reference.prompt.clone(),
                seed: style.seed,
                offset: style.offset,
                inversion_guidance: style.inversion_guidance,
                options,
            };
            validate_style(&spec, settings.steps)
                .map_err(|e| ApiError::invalid(format!("settings.{}", e.field), e.message))?;
            Some(spec)
        }
        _ => None,
    };
    let characters = settings
        .characters
        .iter()
        .zip(character_references)
        .map(|(c, reference)| CharacterSpec {
            name: reference.name.clone(),
            description: reference.prompt.clone(),
            subject_words: reference.subject_words.clone(),
            image: reference
                .image
                .as_ref()
                .map(|_| format!("reference:{}", reference.id).into()),
            seed: c.seed,
            anchors: if c.anchors == 0 { 2 } else { c.anchors },
        })
        .collect();
    let spec = StoryboardSpec {
        model: settings.model.clone(),
        width: settings.width,
        height: settings.height,
        steps: settings.steps,
        guidance: settings.guidance_scale,
        negative_prompt: settings.negative_prompt.clone(),
        seed: settings.seed,
        frames_per_task: if settings.frames_per_task == 0 {
            4
        } else {
            settings.frames_per_task
        },
        style,
        characters,
        consistory: settings
            .consistory
            .map(ConsistoryOptions::from)
            .unwrap_or_default(),
        frames: req
            .frames
            .iter()
            .map(|f| FrameSpec {
                prompt: f.prompt.clone(),
                negative_prompt: f.negative_prompt.clone(),
                seed: f.seed,
                characters: f.characters.clone(),
            })
            .collect(),
    };
    spec.validate().map_err(|e| {
        let field = if e.field.starts_with("frames") {
            e.field.clone()
        } else {
            format!("settings.{}", e.field)
        };
        ApiError::invalid(field, e.message)
    })?;
    Ok(StoredStoryboard {
        spec,
        reference_id: style_reference.map(|r| r.id),
        character_references: character_references.iter().map(|r| r.id).collect(),
    })
}

fn storyboard_message(sb: &storyfarm_store::Storyboard) -> pb::Storyboard {
    let spec = &sb.stored.spec;
    pb::Storyboard {
        id: sb.id.to_string(),
        project_id: sb.project_id.to_string(),
        name: sb.name.clone(),
        settings: Some(pb::StoryboardSettings {
            model: spec.model.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            guidance_scale: spec.guidance,
            negative_prompt: spec.negative_prompt.clone(),
            style: spec.style.as_ref().map(|s| pb::StyleSettings {
                reference_id: sb
                    .stored
                    .reference_id
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
                offset: s.offset,
                inversion_guidance: s.inversion_guidance,
                options: Some(pb::StyleAlignedOptions::from(&s.options)),
                seed: s.seed,
            }),
            frames_per_task: spec.frames_per_task,
            seed: spec.seed,
            characters: spec
                .characters
                .iter()
                .zip(&sb.stored.character_references)
                .map(|(c, id)| pb::CharacterSettings {
                    reference_id: id.to_string(),
                    anchors: c.anchors,
                    seed: c.seed,
                })
                .collect(),
            consistory: Some(pb::ConsistorySettings::from(&spec.consistory)),
        }),
        frames: spec
            .frames
            .iter()
            .map(|f| pb::FrameSpec {
                prompt: f.prompt.clone(),
                negative_prompt: f.negative_prompt.clone(),
                seed: f.seed,
                characters: f.characters.clone(),
            })
            .collect(),
        create_time: Some(convert::timestamp(sb.created_at)),
    }
}

#[tonic::async_trait]
impl StoryboardService for Api {
    #[tracing::instrument(skip_all)]
    async fn create_storyboard(
        &self,
        request: Request<pb::CreateStoryboardRequest>,
    ) -> ApiResult<pb::Storyboard> {
        let req = request.into_inner();
        let project_id = parse("project_id", &req.project_id, ProjectId::parse_field)?;
        let settings = req
            .settings
            .clone()
            .ok_or_else(|| Status::from(ApiError::invalid("settings", "required")))?;
        // Style fields that need no reference are checked before any lookup.
        if let Some(style) = &settings.style {
            let spec = StyleSpec {
                image: Some("reference".into()),
                prompt: "reference".into(),
                seed: style.seed,
                offset: style.offset,
                inversion_guidance: style.inversion_guidance,
                options: style.options.map(StyleOptions::from).unwrap_or_default(),
            };
            validate_style(&spec, settings.steps)
                .map_err(|e| ApiError::invalid(format!("settings.{}", e.field), e.message))?;
        }
        self.store
            .get_project(project_id)
            .await
            .map_err(ApiError::from)?;
        let (style, characters) = self.request_references(project_id, &settings).await?;
        let stored = storyboard_from_request(&req, style.as_ref(), &characters)?;
        let sb = self
            .store
            .create_storyboard(project_id, req.name.trim(), &stored)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(storyboard_id = %sb.id, frames = sb.stored.spec.frames.len(), "storyboard created");
        Ok(Response::new(storyboard_message(&sb)))
    }

    async fn get_storyboard(
        &self,
        request: Request<pb::GetStoryboardRequest>,
    ) -> ApiResult<pb::Storyboard> {
        let id = parse("id", &request.into_inner().id, StoryboardId::parse_field)?;
        let sb = self
            .store
            .get_storyboard(id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(storyboard_message(&sb)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadFrameChunk, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Api {
    type WatchJobStream = EventStream;
    type DownloadFrameStream = ChunkStream;
    type DownloadAnchorStream = ChunkStream;

    #[tracing::instrument(skip_all, fields(storyboard_id, job_id, trace_id))]
    async fn submit_job(&self, request: Request<pb::SubmitJobRequest>) -> ApiResult<pb::Job> {
        let storyboard_id = parse(
            "storyboard_id",
            &request.into_inner().storyboard_id,
            StoryboardId::parse_field,
        )?;
        tracing::Span::current().record("storyboard_id", tracing::field::display(storyboard_id));
        let sb = self
            .store
            .get_storyboard(storyboard_id)
            .await
            .map_err(ApiError::from)?;
        let reference = match sb.stored.reference_id {
            Some(id) => Some(self.store.get_reference(id).await.map_err(ApiError::from)?),
            None => None,
        };
        let mut characters = Vec::with_capacity(sb.stored.character_references.len());
        for &id in &sb.stored.character_references {
            characters.push(self.store.get_reference(id).await.map_err(ApiError::from)?);
        }
        let job_id = JobId::new();
        // Tasks continue this span's trace when traces are exported; otherwise a fresh trace id
        // still ties the job's log lines together.
        let traceparent = storyfarm_telemetry::traceparent_of(&tracing::Span::current())
            .unwrap_or_else(storyfarm_core::trace::new_traceparent);
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(job_id));
        span.record(
            "trace_id",
            storyfarm_core::trace::trace_id(&traceparent).unwrap_or_default(),
        );
        let facts = model_facts(&sb.stored.spec.model);
        let plan = tracing::info_span!("plan").in_scope(|| {
            plan_job(
                job_id,
                storyboard_id,
                &sb.stored,
                JobReferences {
                    style: reference.as_ref(),
                    characters: &characters,
                },
                &facts,
                &self.policy,
                &traceparent,
            )
        });
        let job = self.store.submit_job(&plan).await.map_err(ApiError::from)?;
        self.dispatch.notify_one();
        self.metrics.job_submitted();
        // A prerequisite this job did not have to compute (ready, or being computed for another
        // job) is a hit of the content-addressed cache.
        for (kind, computed) in [
            (PrerequisiteKind::Style, job.inversion_tasks),
            (PrerequisiteKind::Anchors, job.anchor_tasks),
        ] {
            let planned = plan.prerequisites.iter().filter(|p| p.kind == kind).count() as u32;
            self.metrics.prerequisite_lookups(
                kind.as_str(),
                planned.saturating_sub(computed).into(),
                computed.into(),
            );
        }
        tracing::info!(frames = job.frames_total, inversion_tasks = job.inversion_tasks, anchor_tasks = job.anchor_tasks, render_tasks = job.render_tasks, family = %facts.family, "job submitted");
        Ok(Response::new(convert::job(&job)))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> ApiResult<pb::Job> {
        let id = parse("id", &request.into_inner().id, JobId::parse_field)?;
        let job = self.store.get_job(id).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> ApiResult<Self::WatchJobStream> {
        let id = parse("id", &request.into_inner().id, JobId::parse_field)?;
        self.store.get_job(id).await.map_err(ApiError::from)?;
        let rx = watch_job(self.store.clone(), self.hub.clone(), id);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(job_id))]
    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> ApiResult<pb::Job> {
        let id = parse("id", &request.into_inner().id, JobId::parse_field)?;
        tracing::Span::current().record("job_id", tracing::field::display(id));
        let (job, running) = self.store.cancel_job(id).await.map_err(ApiError::from)?;
        if running {
            let control = pb::Control {
                command: Some(pb::control::Command::CancelJobId(id.to_string())),
            };
            self.queue
                .broadcast_control(OutgoingMessage::new(prost::Message::encode_to_vec(
                    &control,
                )))
                .await
                .map_err(ApiError::from)?;
        }
        self.hub.signal(id, crate::watch::Signal::Changed);
        tracing::info!(running_tasks_told = running, "job cancelled");
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_frames(
        &self,
        request: Request<pb::ListFramesRequest>,
    ) -> ApiResult<pb::ListFramesResponse> {
        let id = parse("job_id", &request.into_inner().job_id, JobId::parse_field)?;
        let frames = self.store.list_frames(id).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListFramesResponse {
            frames: frames.iter().map(convert::frame).collect(),
        }))
    }

    async fn download_frame(
        &self,
        request: Request<pb::DownloadFrameRequest>,
    ) -> ApiResult<Self::DownloadFrameStream> {
        let req = request.into_inner();
        let id = parse("job_id", &req.job_id, JobId::parse_field)?;
        let frame = self
            .store
            .get_frame(id, req.index)
            .await
            .map_err(ApiError::from)?;
        let key = frame.png_key.clone().ok_or_else(|| {
            Status::from(ApiError::FailedPrecondition(format!(
                "frame {} of job {id} is {} and has no image yet",
                req.index,
                frame.state.as_str()
            )))
        })?;
        let key = BlobKey::new(key).map_err(ApiError::from)?;
        let bytes = self.blobs.get(&key).await.map_err(ApiError::from)?;
        let chunks: Vec<Result<pb::DownloadFrameChunk, Status>> = bytes
            .chunks(64 * 1024)
            .map(|c| Ok(pb::DownloadFrameChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn list_anchors(
        &self,
        request: Request<pb::ListAnchorsRequest>,
    ) -> ApiResult<pb::ListAnchorsResponse> {
        let id = parse("job_id", &request.into_inner().job_id, JobId::parse_field)?;
        let job = self.store.get_job(id).await.map_err(ApiError::from)?;
        let sb = self
            .store
            .get_storyboard(job.storyboard_id)
            .await
            .map_err(ApiError::from)?;
        let counts = anchor_counts(&sb.stored.spec);
        let prerequisites = self
            .store
            .job_prerequisites(id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListAnchorsResponse {
            characters: prerequisites
                .iter()
                .filter_map(|p| {
                    convert::character_anchors(p, counts.get(&p.name).copied().unwrap_or_default())
                })
                .collect(),
        }))
    }

    async fn download_anchor(
        &self,
        request: Request<pb::DownloadAnchorRequest>,
    ) -> ApiResult<Self::DownloadAnchorStream> {
        let req = request.into_inner();
        let id = parse("job_id", &req.job_id, JobId::parse_field)?;
        let prerequisites = self
            .store
            .job_prerequisites(id)
            .await
            .map_err(ApiError::from)?;
        let anchors = prerequisites
            .iter()
            .find(|p| p.kind == PrerequisiteKind::Anchors && p.name == req.character)
            .ok_or_else(|| {
                Status::not_found(format!("job {id} has no character {:?}", req.character))
            })?;
        let file = anchors.artifact_key.clone().ok_or_else(|| {
            Status::from(ApiError::FailedPrecondition(format!(
                "the anchors of {:?} are {} and have no images yet",
                req.character,
                anchors.state.as_str()
            )))
        })?;
        let key = BlobKey::new(storyfarm_core::keys::anchor_png_key(&file, req.index))
            .map_err(ApiError::from)?;
        let bytes = self.blobs.get(&key).await.map_err(ApiError::from)?;
        let chunks: Vec<Result<pb::DownloadFrameChunk, Status>> = bytes
            .chunks(64 * 1024)
            .map(|c| Ok(pb::DownloadFrameChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}
