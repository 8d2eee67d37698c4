//! The planner: a storyboard (and its stored references) becomes a task graph — at most one
//! style trajectory (an inverted or a generated reference), one anchor task per character, then
//! render tasks of up to `frames_per_task` frames that need them. Pure: no IO, so it is tested
//! exhaustively.

use prost::Message;
use storyfarm_core::keys::{
    style_identity, AnchorInputs, GeneratedReferenceInputs, InversionInputs,
};
use storyfarm_core::storyboard::ResolvedFrame;
use storyfarm_core::{JobId, StoryboardSpec, TaskId};
use storyfarm_proto::v1 as pb;
use storyfarm_store::{
    NewJob, PlannedPrerequisite, PlannedTask, PrerequisiteKind, Reference, StoredStoryboard,
    TaskKind,
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

/// The stored references a storyboard uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobReferences<'a> {
    /// The style reference, when the board has a style.
    pub style: Option<&'a Reference>,
    /// The reference of each of the board's characters, in order.
    pub characters: &'a [Reference],
}

/// The content key of a stored style trajectory.
pub fn trajectory_key(cache_key: &str) -> String {
    format!("inversions/{cache_key}.safetensors")
}

/// The content key of a character's stored anchors file.
pub fn anchors_key(cache_key: &str) -> String {
    format!("anchors/{cache_key}.safetensors")
}

/// Plans a job. `references` must hold the board's style reference (when it has a style) and
/// one reference per character.
pub fn plan_job(
    job_id: JobId,
    storyboard_id: storyfarm_core::StoryboardId,
    stored: &StoredStoryboard,
    references: JobReferences,
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
    let task = |kind, frames: Vec<u32>, needs: Vec<String>, work| {
        let id = TaskId::new();
        // The attempt is set by the dispatcher when it publishes.
        let payload = pb::Task {
            task_id: id.to_string(),
            attempt: 0,
            job_id: job_id.to_string(),
            settings: Some(settings.clone()),
            work: Some(work),
            traceparent: traceparent.to_string(),
            // Both stamped by the dispatcher when it publishes.
            family: String::new(),
            published_at_unix_ms: 0,
        }
        .encode_to_vec();
        PlannedTask {
            id,
            kind,
            family: model.family.clone(),
            max_attempts: policy.max_attempts,
            frames,
            payload,
            needs,
        }
    };
    let mut prerequisites = Vec::new();

    // The style: an inverted picture, or a reference generated from its prompt.
    let style = spec
        .style
        .as_ref()
        .zip(references.style)
        .map(|(style, reference)| {
            let (cache_key, work) = match &reference.image {
                Some(image) => {
                    let key = InversionInputs {
                        image_sha256: &image.sha256,
                        model: &spec.model,
                        scheduler: &model.scheduler,
                        width: spec.width,
                        height: spec.height,
                        steps: spec.steps,
                        prompt: &reference.prompt,
                        guidance_scale: style.inversion_guidance,
                    }
                    .cache_key();
                    let work = pb::InvertWork {
                        image_key: image.key.clone(),
                        prompt: reference.prompt.clone(),
                        guidance_scale: style.inversion_guidance,
                        trajectory_key: trajectory_key(&key),
                        seed: 0,
                    };
                    (key, work)
                }
                None => {
                    let seed = spec.style_seed().unwrap_or_default();
                    let key = GeneratedReferenceInputs {
                        model: &spec.model,
                        scheduler: &model.scheduler,
                        width: spec.width,
                        height: spec.height,
                        steps: spec.steps,
                        guidance_scale: spec.guidance,
                        prompt: &reference.prompt,
                        seed,
                    }
                    .cache_key();
                    let work = pb::InvertWork {
                        image_key: String::new(),
                        prompt: reference.prompt.clone(),
                        guidance_scale: spec.guidance,
                        trajectory_key: trajectory_key(&key),
                        seed,
                    };
                    (key, work)
                }
            };
            let style_work = pb::StyleWork {
                trajectory_key: work.trajectory_key.clone(),
                reference_prompt: reference.prompt.clone(),
                offset: style.offset,
                options: Some(pb::StyleAlignedOptions::from(&style.options)),
            };
            let identity = style_identity(&cache_key, style.offset, &style.options);
            prerequisites.push(PlannedPrerequisite {
                cache_key: cache_key.clone(),
                kind: PrerequisiteKind::Style,
                name: String::new(),
                task: task(
                    TaskKind::Invert,
                    Vec::new(),
                    Vec::new(),
                    pb::task::Work::Invert(work),
                ),
            });
            (cache_key, style_work, identity)
        });
    let style_needs: Vec<String> = style.iter().map(|(key, _, _)| key.clone()).collect();
    let consistory = pb::ConsistoryWork::from(&spec.consistory);

    // Each character's anchors, in the style when there is one.
    let characters: Vec<(String, pb::CharacterWork)> = spec
        .characters
        .iter()
        .enumerate()
        .filter_map(|(i, character)| {
            let reference = references.characters.get(i);
            let image = reference.and_then(|r| r.image.as_ref());
            let cache_key = AnchorInputs::of_character(
                spec,
                i,
                &model.scheduler,
                image.map(|im| im.sha256.as_str()),
                style.as_ref().map(|(_, _, identity)| identity.as_str()),
            )?
            .anchor_key();
            let seed = spec.character_seed(i);
            let generated = character.anchors.saturating_sub(u32::from(image.is_some()));
            let work = pb::CharacterWork {
                name: character.name.clone(),
                description: character.description.clone(),
                subject_words: character.subject_words.clone(),
                anchor_seeds: (0..generated as u64)
                    .map(|k| seed.wrapping_add(k))
                    .collect(),
                dropout_seed: seed,
                anchors_key: anchors_key(&cache_key),
                image_key: image.map(|im| im.key.clone()).unwrap_or_default(),
            };
            prerequisites.push(PlannedPrerequisite {
                cache_key: cache_key.clone(),
                kind: PrerequisiteKind::Anchors,
                name: character.name.clone(),
                task: task(
                    TaskKind::Anchor,
                    Vec::new(),
                    style_needs.clone(),
                    pb::task::Work::Anchor(pb::AnchorWork {
                        character: Some(work.clone()),
                        consistory: Some(consistory),
                        style: style.as_ref().map(|(_, w, _)| w.clone()),
                        negative_prompt: spec.negative_prompt.clone(),
                    }),
                ),
            });
            Some((cache_key, work))
        })
        .collect();

    // Frames showing the same characters render together: each task carries its characters'
    // anchors once, so mixing casts would only add anchors to every task.
    let mut groups: Vec<(Vec<usize>, Vec<&ResolvedFrame>)> = Vec::new();
    for frame in &frames {
        let mut cast = frame.characters.clone();
        cast.sort_unstable();
        match groups.iter_mut().find(|(c, _)| *c == cast) {
            Some((_, members)) => members.push(frame),
            None => groups.push((cast, vec![frame])),
        }
    }
    let per_task = spec.frames_per_task.max(1) as usize;
    let mut render_tasks = Vec::new();
    for (cast, members) in &groups {
        for chunk in members.chunks(per_task) {
            let task_characters: Vec<pb::CharacterWork> =
                cast.iter().map(|&c| characters[c].1.clone()).collect();
            let mut needs = style_needs.clone();
            needs.extend(cast.iter().map(|&c| characters[c].0.clone()));
            let work = pb::RenderWork {
                trajectory_key: style
                    .as_ref()
                    .map(|(_, w, _)| w.trajectory_key.clone())
                    .unwrap_or_default(),
                reference_prompt: style
                    .as_ref()
                    .map(|(_, w, _)| w.reference_prompt.clone())
                    .unwrap_or_default(),
                offset: style.as_ref().map(|(_, w, _)| w.offset).unwrap_or(0),
                options: style.as_ref().and_then(|(_, w, _)| w.options),
                frames: chunk
                    .iter()
                    .map(|f| pb::FrameWork {
                        index: f.index,
                        prompt: f.prompt.clone(),
                        negative_prompt: f.negative_prompt.clone(),
                        seed: f.seed,
                        characters: f
                            .characters
                            .iter()
                            .filter_map(|c| cast.iter().position(|x| x == c))
                            .map(|p| p as u32)
                            .collect(),
                    })
                    .collect(),
                consistory: (!cast.is_empty()).then_some(consistory),
                characters: task_characters,
                anchor_negative_prompt: if cast.is_empty() {
                    String::new()
                } else {
                    spec.negative_prompt.clone()
                },
            };
            render_tasks.push(task(
                TaskKind::Render,
                chunk.iter().map(|f| f.index).collect(),
                needs,
                pb::task::Work::Render(work),
            ));
        }
    }
    NewJob {
        id: job_id,
        storyboard_id,
        frames,
        prerequisites,
        render_tasks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storyfarm_core::{
        CharacterSpec, ProjectId, ReferenceId, StoryboardId, StyleOptions, StyleSpec,
    };
    use storyfarm_store::{ReferenceImage, ReferenceKind};

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
                image: Some("s.png".into()),
                prompt: "watercolor".into(),
                seed: None,
                offset: 1,
                inversion_guidance: 2.0,
                options: StyleOptions::default(),
            });
        }
        StoredStoryboard {
            spec,
            reference_id: style.then(ReferenceId::new),
            character_references: Vec::new(),
        }
    }

    fn reference(kind: ReferenceKind, prompt: &str, image: Option<&str>) -> Reference {
        Reference {
            id: ReferenceId::new(),
            project_id: ProjectId::new(),
            kind,
            prompt: prompt.into(),
            name: String::new(),
            subject_words: Vec::new(),
            image: image.map(|sha| ReferenceImage {
                sha256: sha.into(),
                key: format!("refs/{sha}.png"),
                width: 64,
                height: 64,
                size_bytes: 3,
            }),
            created_at: chrono::Utc::now(),
        }
    }

    fn style_reference() -> Reference {
        reference(ReferenceKind::Style, "watercolor", Some("abc"))
    }

    fn facts() -> ModelFacts {
        ModelFacts {
            family: "sd".into(),
            scheduler: "ddim".into(),
        }
    }

    fn plan(stored: &StoredStoryboard, references: JobReferences) -> NewJob {
        plan_job(
            JobId::new(),
            StoryboardId::new(),
            stored,
            references,
            &facts(),
            &PlanPolicy::default(),
            "00-abc-def-01",
        )
    }

    fn work(task: &PlannedTask) -> pb::task::Work {
        pb::Task::decode(task.payload.as_slice())
            .unwrap()
            .work
            .unwrap()
    }

    #[test]
    fn chunks_cover_every_frame_once_in_order() {
        for frames in 1..=13 {
            for per_task in 1..=5 {
                let plan = plan(&stored(frames, per_task, false), JobReferences::default());
                assert!(plan.prerequisites.is_empty());
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
                    .all(|t| t.frames.len() <= per_task as usize && t.needs.is_empty()));
            }
        }
    }

    #[test]
    fn payloads_carry_frames_seeds_and_the_trajectory() {
        let r = style_reference();
        let refs = JobReferences {
            style: Some(&r),
            characters: &[],
        };
        let plan1 = plan(&stored(5, 2, true), refs);
        let [inv] = plan1.prerequisites.as_slice() else {
            panic!("one prerequisite expected")
        };
        assert_eq!(inv.kind, PrerequisiteKind::Style);
        assert_eq!(inv.task.kind, TaskKind::Invert);
        let pb::task::Work::Invert(w) = work(&inv.task) else {
            panic!()
        };
        assert_eq!(w.image_key, "refs/abc.png");
        assert_eq!(w.trajectory_key, trajectory_key(&inv.cache_key));
        let render = pb::Task::decode(plan1.render_tasks[1].payload.as_slice()).unwrap();
        assert_eq!(render.traceparent, "00-abc-def-01");
        assert_eq!(
            plan1.render_tasks[1].needs,
            std::slice::from_ref(&inv.cache_key)
        );
        let Some(pb::task::Work::Render(w)) = render.work else {
            panic!()
        };
        assert_eq!(w.trajectory_key, trajectory_key(&inv.cache_key));
        assert_eq!(w.offset, 1);
        assert!(w.characters.is_empty() && w.consistory.is_none());
        assert_eq!(
            w.frames
                .iter()
                .map(|f| (f.index, f.seed))
                .collect::<Vec<_>>(),
            [(2, 12), (3, 13)]
        );
        // The same storyboard planned again reuses the inversion key.
        let again = plan(&stored(5, 2, true), refs);
        assert_eq!(again.prerequisites[0].cache_key, inv.cache_key);
    }

    #[test]
    fn a_style_without_an_image_is_generated_once() {
        let mut board = stored(3, 4, true);
        let style = board.spec.style.as_mut().unwrap();
        style.image = None;
        style.offset = 0;
        let r = reference(ReferenceKind::Style, "a watercolor painting", None);
        let refs = JobReferences {
            style: Some(&r),
            characters: &[],
        };
        let p = plan(&board, refs);
        let pb::task::Work::Invert(w) = work(&p.prerequisites[0].task) else {
            panic!()
        };
        assert!(w.image_key.is_empty());
        // The board's seed minus one, as `generate` seeds its reference.
        assert_eq!(w.seed, 9);
        assert_eq!(w.guidance_scale, board.spec.guidance);
        assert_eq!(
            plan(&board, refs).prerequisites[0].cache_key,
            p.prerequisites[0].cache_key
        );
        // Another seed or prompt is another reference; a picture never shares its key.
        board.spec.style.as_mut().unwrap().seed = Some(3);
        assert_ne!(
            plan(&board, refs).prerequisites[0].cache_key,
            p.prerequisites[0].cache_key
        );
        let pictured = plan(
            &stored(3, 4, true),
            JobReferences {
                style: Some(&style_reference()),
                characters: &[],
            },
        );
        assert_ne!(
            pictured.prerequisites[0].cache_key,
            p.prerequisites[0].cache_key
        );
    }

    fn characters_board(style: bool) -> (StoredStoryboard, Vec<Reference>) {
        let mut board = stored(0, 2, style);
        let character = |name: &str, word: &str, image: bool| CharacterSpec {
            name: name.into(),
            description: format!("a {word}"),
            subject_words: vec![word.into()],
            image: image.then(|| "x.png".into()),
            seed: None,
            anchors: 2,
        };
        board.spec.characters = vec![
            character("Rex", "dog", false),
            character("Ann", "sailor", true),
        ];
        let frame = |prompt: &str, cast: &[&str]| storyfarm_core::FrameSpec {
            prompt: prompt.into(),
            negative_prompt: None,
            seed: None,
            characters: cast.iter().map(|c| c.to_string()).collect(),
        };
        board.spec.frames = vec![
            frame("a dog", &["Rex"]),
            frame("a lighthouse", &[]),
            frame("a dog and a sailor", &["Ann", "Rex"]),
            frame("a dog running", &["Rex"]),
            frame("a dog asleep", &["Rex"]),
            frame("a sailor and a dog", &["Rex", "Ann"]),
        ];
        board.spec.validate().unwrap();
        let refs = vec![
            reference(ReferenceKind::Character, "a dog", None),
            reference(ReferenceKind::Character, "a sailor", Some("pic")),
        ];
        (board, refs)
    }

    #[test]
    fn characters_get_one_anchor_task_each_and_frames_group_by_cast() {
        let (board, refs) = characters_board(true);
        let style = style_reference();
        let p = plan(
            &board,
            JobReferences {
                style: Some(&style),
                characters: &refs,
            },
        );
        let kinds: Vec<_> = p
            .prerequisites
            .iter()
            .map(|x| (x.kind, x.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (PrerequisiteKind::Style, ""),
                (PrerequisiteKind::Anchors, "Rex"),
                (PrerequisiteKind::Anchors, "Ann")
            ]
        );
        let style_key = p.prerequisites[0].cache_key.clone();
        let (rex, ann) = (&p.prerequisites[1], &p.prerequisites[2]);
        // Styled anchors need the style first.
        assert_eq!(rex.task.needs, std::slice::from_ref(&style_key));
        assert_eq!(rex.task.kind, TaskKind::Anchor);
        let pb::task::Work::Anchor(a) = work(&ann.task) else {
            panic!()
        };
        let c = a.character.unwrap();
        // The picture is one of the two anchors: one generated anchor beside it.
        assert_eq!(c.image_key, "refs/pic.png");
        assert_eq!(c.anchor_seeds, [board.spec.character_seed(1)]);
        assert_eq!(c.anchors_key, anchors_key(&ann.cache_key));
        assert!(a.style.is_some());
        let pb::task::Work::Anchor(a) = work(&rex.task) else {
            panic!()
        };
        let seed = board.spec.character_seed(0);
        assert_eq!(a.character.unwrap().anchor_seeds, [seed, seed + 1]);
        // Casts in order of first appearance; frames_per_task 2 within each cast.
        let frames: Vec<Vec<u32>> = p.render_tasks.iter().map(|t| t.frames.clone()).collect();
        assert_eq!(frames, [vec![0, 3], vec![4], vec![1], vec![2, 5]]);
        assert_eq!(
            p.render_tasks[0].needs,
            [style_key.clone(), rex.cache_key.clone()]
        );
        assert_eq!(p.render_tasks[2].needs, std::slice::from_ref(&style_key));
        assert_eq!(
            p.render_tasks[3].needs,
            [style_key, rex.cache_key.clone(), ann.cache_key.clone()]
        );
        let pb::task::Work::Render(r) = work(&p.render_tasks[3]) else {
            panic!()
        };
        let names: Vec<&str> = r.characters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["Rex", "Ann"]);
        // Each frame names its characters by their place in the task.
        assert_eq!(r.frames[0].characters, [1, 0]);
        assert_eq!(r.frames[1].characters, [0, 1]);
        assert!(r.consistory.is_some());
        let pb::task::Work::Render(plain) = work(&p.render_tasks[2]) else {
            panic!()
        };
        assert!(plain.characters.is_empty() && plain.consistory.is_none());
    }

    #[test]
    fn anchor_keys_are_stable_and_follow_the_style() {
        let (board, refs) = characters_board(false);
        let keys = |board: &StoredStoryboard, style: Option<&Reference>| -> Vec<String> {
            plan(
                board,
                JobReferences {
                    style,
                    characters: &refs,
                },
            )
            .prerequisites
            .iter()
            .filter(|p| p.kind == PrerequisiteKind::Anchors)
            .map(|p| p.cache_key.clone())
            .collect()
        };
        let plain = keys(&board, None);
        assert_eq!(plain, keys(&board, None));
        assert_ne!(plain[0], plain[1]);
        // Unstyled anchors need nothing.
        let p = plan(
            &board,
            JobReferences {
                style: None,
                characters: &refs,
            },
        );
        assert!(p.prerequisites.iter().all(|x| x.task.needs.is_empty()));
        let (styled_board, _) = characters_board(true);
        let styled = keys(&styled_board, Some(&style_reference()));
        assert_ne!(plain[0], styled[0]);
        // Another frame list does not move the anchors.
        let mut fewer = board.clone();
        fewer.spec.frames.truncate(1);
        assert_eq!(keys(&fewer, None), plain);
    }
}
