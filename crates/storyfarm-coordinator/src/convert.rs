//! Conversions between store rows and API messages.

use prost_types::Timestamp;
use storyfarm_proto::v1 as pb;
use storyfarm_store::{
    CacheState, Frame, FrameState, Job, JobPrerequisite, JobState, PrerequisiteKind, Project,
    Reference, ReferenceKind,
};

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
        kind: match r.kind {
            ReferenceKind::Style => pb::ReferenceKind::Style,
            ReferenceKind::Character => pb::ReferenceKind::Character,
        } as i32,
        prompt: r.prompt.clone(),
        image_sha256: r
            .image
            .as_ref()
            .map(|i| i.sha256.clone())
            .unwrap_or_default(),
        width: r.image.as_ref().map_or(0, |i| i.width),
        height: r.image.as_ref().map_or(0, |i| i.height),
        size_bytes: r.image.as_ref().map_or(0, |i| i.size_bytes),
        create_time: Some(timestamp(r.created_at)),
        has_image: r.image.is_some(),
        name: r.name.clone(),
        subject_words: r.subject_words.clone(),
    }
}

/// A character's anchors as the API shows them (`None` for the style prerequisite); `anchors`
/// is the character's anchor count from its storyboard.
pub fn character_anchors(p: &JobPrerequisite, anchors: u32) -> Option<pb::CharacterAnchors> {
    if p.kind != PrerequisiteKind::Anchors {
        return None;
    }
    let state = match p.state {
        CacheState::Pending => pb::AnchorsState::Pending,
        CacheState::Ready => pb::AnchorsState::Ready,
        CacheState::Failed => pb::AnchorsState::Failed,
    };
    Some(pb::CharacterAnchors {
        name: p.name.clone(),
        state: state as i32,
        anchors,
        error: p.error.clone().unwrap_or_default(),
        cache_key: p.cache_key.clone(),
    })
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
        anchor_tasks: j.anchor_tasks,
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
