//! Conversions between store rows and API messages.

use prost_types::Timestamp;
use storyfarm_proto::v1 as pb;
use storyfarm_store::{Frame, FrameState, Job, JobState, Project, Reference};

pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn project(p: &Project) -> pb::Project {
    pb::Project {
        id: p.id.to_string(),
        name: p.name.clone(),
        create_time: Some(timestamp(p.created_at)),
    }
}

pub fn reference(r: &Reference) -> pb::Reference {
    pb::Reference {
        id: r.id.to_string(),
        project_id: r.project_id.to_string(),
        kind: pb::ReferenceKind::Style as i32,
        prompt: r.prompt.clone(),
        image_sha256: r.image_sha256.clone(),
        width: r.width,
        height: r.height,
        size_bytes: r.size_bytes,
        create_time: Some(timestamp(r.created_at)),
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn job(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        storyboard_id: j.storyboard_id.to_string(),
        state: job_state(j.state) as i32,
        frames_total: j.frames_total,
        frames_succeeded: j.frames_succeeded,
        frames_failed: j.frames_failed,
        inversion_tasks: j.inversion_tasks,
        render_tasks: j.render_tasks,
        error: j.error.clone().unwrap_or_default(),
        create_time: Some(timestamp(j.created_at)),
        finish_time: j.finished_at.map(timestamp),
    }
}

pub fn frame(f: &Frame) -> pb::Frame {
    let state = match f.state {
        FrameState::Pending => pb::FrameState::Pending,
        FrameState::Rendering => pb::FrameState::Rendering,
        FrameState::Succeeded => pb::FrameState::Succeeded,
        FrameState::Failed => pb::FrameState::Failed,
        FrameState::Cancelled => pb::FrameState::Cancelled,
    };
    pb::Frame {
        index: f.index,
        prompt: f.prompt.clone(),
        seed: f.seed,
        state: state as i32,
        png_key: f.png_key.clone().unwrap_or_default(),
        latents_key: f.latents_key.clone().unwrap_or_default(),
        error: f.error.clone().unwrap_or_default(),
        attempts: f.attempts,
    }
}
