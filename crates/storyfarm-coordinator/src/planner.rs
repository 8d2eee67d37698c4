//! The planner: a storyboard (and its stored style reference) becomes a task graph — at most
//! one inversion, then render tasks of up to `frames_per_task` frames that replay it. Pure: no
//! IO, so it is tested exhaustively.

use prost::Message;
use storyfarm_core::keys::InversionInputs;
use storyfarm_core::{JobId, StoryboardSpec, TaskId};
use storyfarm_proto::v1 as pb;
use storyfarm_store::{
    NewJob, PlannedInversion, PlannedTask, Reference, StoredStoryboard, TaskKind,
};

/// Knobs of planning that are the farm's, not the storyboard's.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanPolicy {
    pub max_attempts: u32,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        Self { max_attempts: 4 }
    }
}

/// What the planner needs to know about the model without loading it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFacts {
    /// Queue family (`sd` or `sdxl`).
    pub family: String,
    /// The scheduler settings that determine an inversion (canonical text).
    pub scheduler: String,
}

/// The content key of a stored inversion trajectory.
pub fn trajectory_key(cache_key: &str) -> String {
    format!("inversions/{cache_key}.safetensors")
}

/// Plans a job. `reference` must be the storyboard's reference when it has a style.
pub fn plan_job(
    job_id: JobId,
    storyboard_id: storyfarm_core::StoryboardId,
    stored: &StoredStoryboard,
    reference: Option<&Reference>,
    model: &ModelFacts,
    policy: &PlanPolicy,
    traceparent: &str,
) -> NewJob {
    let spec: &StoryboardSpec = &stored.spec;
    let settings = pb::RenderSettings {
        model: spec.model.clone(),
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        guidance_scale: spec.guidance,
    };
    let frames = spec.resolved_frames();
    let task = |kind, frames: Vec<u32>, work| {
        let id = TaskId::new();
        // The attempt is set by the dispatcher when it publishes.
        let payload = pb::Task {
            task_id: id.to_string(),
            attempt: 0,
            job_id: job_id.to_string(),
            settings: Some(settings.clone()),
            work,
            traceparent: traceparent.to_string(),
        }
        .encode_to_vec();
        PlannedTask {
            id,
            kind,
            family: model.family.clone(),
            max_attempts: policy.max_attempts,
            frames,
            payload,
        }
    };

    let style = spec.style.as_ref().zip(reference);
    let inversion = style.map(|(style, reference)| {
        let cache_key = InversionInputs {
            image_sha256: &reference.image_sha256,
            model: &spec.model,
            scheduler: &model.scheduler,
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            prompt: &reference.prompt,
            guidance_scale: style.inversion_guidance,
        }
        .cache_key();
        let work = pb::task::Work::Invert(pb::InvertWork {
            image_key: reference.image_key.clone(),
            prompt: reference.prompt.clone(),
            guidance_scale: style.inversion_guidance,
            trajectory_key: trajectory_key(&cache_key),
        });
        PlannedInversion {
            task: task(TaskKind::Invert, Vec::new(), Some(work)),
            cache_key,
        }
    });
    let per_task = spec.frames_per_task.max(1) as usize;
    let render_tasks = frames
        .chunks(per_task)
        .map(|chunk| {
            let work = pb::task::Work::Render(pb::RenderWork {
                trajectory_key: inversion
                    .as_ref()
                    .map(|i| trajectory_key(&i.cache_key))
                    .unwrap_or_default(),
                reference_prompt: reference.map(|r| r.prompt.clone()).unwrap_or_default(),
                offset: style.map(|(s, _)| s.offset).unwrap_or(0),
                options: style.map(|(s, _)| pb::StyleAlignedOptions::from(&s.options)),
                frames: chunk
                    .iter()
                    .map(|f| pb::FrameWork {
                        index: f.index,
                        prompt: f.prompt.clone(),
                        negative_prompt: f.negative_prompt.clone(),
                        seed: f.seed,
                    })
                    .collect(),
            });
            task(
                TaskKind::Render,
                chunk.iter().map(|f| f.index).collect(),
                Some(work),
            )
        })
        .collect();
    NewJob {
        id: job_id,
        storyboard_id,
        frames,
        inversion,
        render_tasks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storyfarm_core::{ProjectId, ReferenceId, StoryboardId, StyleOptions, StyleSpec};

    fn stored(frames: usize, per_task: u32, style: bool) -> StoredStoryboard {
        let mut spec = StoryboardSpec::from_yaml(
            "model: m\nwidth: 64\nheight: 64\nsteps: 4\nseed: 10\nframes: []\n",
        )
        .unwrap();
        spec.frames_per_task = per_task;
        spec.frames = (0..frames)
            .map(|i| storyfarm_core::FrameSpec {
                prompt: format!("p{i}"),
                negative_prompt: None,
                seed: None,
                characters: Vec::new(),
            })
            .collect();
        if style {
            spec.style = Some(StyleSpec {
                image: "s.png".into(),
                prompt: "watercolor".into(),
                offset: 1,
                inversion_guidance: 2.0,
                options: StyleOptions::default(),
            });
        }
        StoredStoryboard {
            spec,
            reference_id: style.then(ReferenceId::new),
        }
    }

    fn reference() -> Reference {
        Reference {
            id: ReferenceId::new(),
            project_id: ProjectId::new(),
            prompt: "watercolor".into(),
            image_sha256: "abc".into(),
            image_key: "refs/abc.png".into(),
            width: 64,
            height: 64,
            size_bytes: 3,
            created_at: chrono::Utc::now(),
        }
    }

    fn facts() -> ModelFacts {
        ModelFacts {
            family: "sd".into(),
            scheduler: "ddim".into(),
        }
    }

    #[test]
    fn chunks_cover_every_frame_once_in_order() {
        for frames in 1..=13 {
            for per_task in 1..=5 {
                let plan = plan_job(
                    JobId::new(),
                    StoryboardId::new(),
                    &stored(frames, per_task, false),
                    None,
                    &facts(),
                    &PlanPolicy::default(),
                    "",
                );
                assert!(plan.inversion.is_none());
                let covered: Vec<u32> = plan
                    .render_tasks
                    .iter()
                    .flat_map(|t| t.frames.clone())
                    .collect();
                assert_eq!(covered, (0..frames as u32).collect::<Vec<_>>());
                assert_eq!(plan.render_tasks.len(), frames.div_ceil(per_task as usize));
                assert!(plan
                    .render_tasks
                    .iter()
                    .all(|t| t.frames.len() <= per_task as usize));
            }
        }
    }

    #[test]
    fn payloads_carry_frames_seeds_and_the_trajectory() {
        let r = reference();
        let plan = plan_job(
            JobId::new(),
            StoryboardId::new(),
            &stored(5, 2, true),
            Some(&r),
            &facts(),
            &PlanPolicy::default(),
            "00-abc-def-01",
        );
        let inv = plan.inversion.as_ref().unwrap();
        let task = pb::Task::decode(inv.task.payload.as_slice()).unwrap();
        let Some(pb::task::Work::Invert(work)) = task.work else {
            panic!()
        };
        assert_eq!(work.image_key, "refs/abc.png");
        assert_eq!(work.trajectory_key, trajectory_key(&inv.cache_key));
        let render = pb::Task::decode(plan.render_tasks[1].payload.as_slice()).unwrap();
        assert_eq!(render.traceparent, "00-abc-def-01");
        let Some(pb::task::Work::Render(work)) = render.work else {
            panic!()
        };
        assert_eq!(work.trajectory_key, trajectory_key(&inv.cache_key));
        assert_eq!(work.offset, 1);
        assert_eq!(
            work.frames
                .iter()
                .map(|f| (f.index, f.seed))
                .collect::<Vec<_>>(),
            [(2, 12), (3, 13)]
        );
        // The same storyboard planned again reuses the inversion key.
        let again = plan_job(
            JobId::new(),
            StoryboardId::new(),
            &stored(5, 2, true),
            Some(&r),
            &facts(),
            &PlanPolicy::default(),
            "",
        );
        assert_eq!(again.inversion.unwrap().cache_key, inv.cache_key);
    }
}
