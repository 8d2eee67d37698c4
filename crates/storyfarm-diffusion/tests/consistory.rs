//! ConsiStory's farm contract on the tiny models (SDXL- and SD-1.5-shaped): in anchor mode a frame
//! rendered with the anchors alone equals the same frame rendered beside other frames, and the
//! anchors come out the same whichever frames ride along. Also: which layers each model uses.

mod common;

use candle_core::{Device, Tensor};
use common::{absmax, load, max_abs, no_progress};
use storyfarm_diffusion::consistory::run::{ConsistorySet, DropoutDraws};
use storyfarm_diffusion::consistory::{AnchorMapping, ConsistoryLevels, ConsistoryOptions};
use storyfarm_diffusion::pipeline::{FrameInput, GenerationSettings, StableDiffusion};

fn frame(
    sd: &StableDiffusion,
    prompt: &str,
    seed: u64,
    settings: &GenerationSettings,
) -> FrameInput {
    FrameInput {
        prompt: prompt.into(),
        negative_prompt: None,
        init_latents: sd.seeded_latents(seed, settings).unwrap(),
    }
}

fn check_anchor_invariance(model: &str, size: usize) {
    let sd = load(model);
    // 12 steps reach every phase: sharing from step 1, query blending to 5, injection from 5.
    let settings = GenerationSettings {
        height: size,
        width: size,
        steps: 12,
        guidance_scale: 5.0,
    };
    let options = ConsistoryOptions::default();
    let words = vec!["dog".to_string()];
    let anchors = [
        frame(&sd, "a photo of a cute dog on the beach", 1, &settings),
        frame(&sd, "a photo of a cute dog in the snow", 2, &settings),
    ];
    let extra = [
        frame(&sd, "a photo of a cute dog in the park", 3, &settings),
        frame(&sd, "a photo of a cute dog on a sofa", 4, &settings),
    ];
    let run = |frames: &[FrameInput]| {
        let all: Vec<FrameInput> = anchors.iter().chain(frames).cloned().collect();
        let set = ConsistorySet {
            frames: &all,
            subject_words: &words,
            mapping: AnchorMapping::anchors_then_frames(anchors.len(), frames.len()),
            dropout: DropoutDraws::Seeded { seeds: vec![77] },
            replays: &[],
            style: None,
        };
        sd.consistory(&settings, &options, &set, &mut no_progress)
            .unwrap()
    };
    let together = run(&extra);
    let tol = 1e-4 * absmax(&together.final_latents);
    for (k, f) in extra.iter().enumerate() {
        let alone = run(std::slice::from_ref(f));
        let err = max_abs(
            &alone.final_latents.get(2).unwrap(),
            &together.final_latents.get(2 + k).unwrap(),
        );
        assert!(
            err <= tol,
            "{model}: frame {k} alone vs with others: {err} > {tol}"
        );
        let err = max_abs(
            &alone.final_latents.narrow(0, 0, 2).unwrap(),
            &together.final_latents.narrow(0, 0, 2).unwrap(),
        );
        assert!(
            err <= tol,
            "{model}: anchors depend on the frames: {err} > {tol}"
        );
        // The frame was really changed by the anchors: not a plain render.
        let plain = sd
            .txt2img(&settings, std::slice::from_ref(f), &mut no_progress)
            .unwrap();
        assert!(
            max_abs(
                &plain.final_latents,
                &alone.final_latents.get(2).unwrap().unsqueeze(0).unwrap()
            ) > 100.0 * tol
        );
    }
    // Masks were found and injection planned for every image that has sources.
    assert!(together
        .correspondence
        .injection
        .targets
        .iter()
        .all(Option::is_some));
    let masks = together
        .pass1
        .final_masks(ConsistoryLevels::for_unet(&sd.unet).unwrap().injection)
        .unwrap();
    assert!(masks
        .subject
        .iter()
        .all(|m| m.iter().any(|&x| x) && !m.iter().all(|&x| x)));
}

#[test]
fn sdxl_frames_are_independent_of_each_other() {
    check_anchor_invariance("tiny-sdxl", 128);
}

#[test]
fn sd15_frames_are_independent_of_each_other() {
    check_anchor_invariance("tiny-sd15", 64);
}

/// SDXL's levels are the official ones; SD 1.5's real UNet maps to the same ratios (1/4 and 1/2
/// of the latent side); the tiny SD 1.5 (attention at levels 0 and 1 only) uses those two.
#[test]
fn levels_follow_the_resolution_ratio() {
    let xl = ConsistoryLevels::for_unet(&load("tiny-sdxl").unet).unwrap();
    assert_eq!((xl.mask, xl.injection, xl.dift_up_block), (2, 1, 0));
    let tiny15 = ConsistoryLevels::for_unet(&load("tiny-sd15").unet).unwrap();
    assert_eq!(
        (tiny15.mask, tiny15.injection, tiny15.dift_up_block),
        (1, 0, 1)
    );
}

/// A character from a picture: the image is DDIM-inverted with its description and replayed as an
/// anchor. The anchor follows its trajectory exactly, still yields a subject mask from its own
/// cross-attention, and frames stay independent of each other.
#[test]
fn an_inverted_image_is_an_anchor() {
    let sd = load("tiny-sdxl");
    let settings = GenerationSettings {
        height: 128,
        width: 128,
        steps: 8,
        guidance_scale: 5.0,
    };
    let image = Tensor::rand(-1f32, 1f32, (1, 3, 128, 128), &Device::Cpu).unwrap();
    let description = "a drawing of a cute dog";
    let inverted = sd
        .invert(&image, description, settings.steps, 1.0, &mut no_progress)
        .unwrap();
    let words = vec!["dog".to_string()];
    let anchors = [
        FrameInput {
            prompt: description.into(),
            negative_prompt: None,
            init_latents: inverted.zts.get(0).unwrap().unsqueeze(0).unwrap(),
        },
        frame(&sd, "a photo of a cute dog in the snow", 2, &settings),
    ];
    let extra = [
        frame(&sd, "a photo of a cute dog in the park", 3, &settings),
        frame(&sd, "a photo of a cute dog on a sofa", 4, &settings),
    ];
    let replays = [(0usize, inverted.zts.clone())];
    let run = |frames: &[FrameInput]| {
        let all: Vec<FrameInput> = anchors.iter().chain(frames).cloned().collect();
        let set = ConsistorySet {
            frames: &all,
            subject_words: &words,
            mapping: AnchorMapping::anchors_then_frames(2, frames.len()),
            dropout: DropoutDraws::Seeded { seeds: vec![5] },
            replays: &replays,
            style: None,
        };
        sd.consistory(
            &settings,
            &ConsistoryOptions::default(),
            &set,
            &mut no_progress,
        )
        .unwrap()
    };
    let together = run(&extra);
    let alone = run(&extra[1..]);
    let tol = 1e-4 * absmax(&together.final_latents);
    assert!(
        max_abs(
            &alone.final_latents.get(2).unwrap(),
            &together.final_latents.get(3).unwrap()
        ) <= tol
    );
    for (step, latents) in together.pass2.latents.iter().enumerate() {
        let expected = inverted.zts.get(step + 1).unwrap();
        assert_eq!(
            max_abs(&latents.get(0).unwrap(), &expected),
            0.0,
            "step {step}"
        );
    }
    let level = ConsistoryLevels::for_unet(&sd.unet).unwrap().injection;
    assert!(together.pass1.final_masks(level).unwrap().subject[0]
        .iter()
        .any(|&x| x));
}

/// Style and characters in one render. With no image sharing with another (no characters) and
/// FreeU off, the styled set is exactly today's StyleAligned frames; with characters, a frame
/// rendered alone still equals the frame rendered beside others, and the anchors ignore the frames.
#[test]
fn style_and_characters_compose() {
    use storyfarm_diffusion::consistory::run::SetStyle;
    use storyfarm_diffusion::pipeline::{ReferenceInput, ReferenceLatents};
    use storyfarm_diffusion::style_aligned::StyleAlignedOptions;
    let sd = load("tiny-sdxl");
    let settings = GenerationSettings {
        height: 128,
        width: 128,
        steps: 8,
        guidance_scale: 5.0,
    };
    let words = vec!["dog".to_string()];
    let style_options = StyleAlignedOptions::default();
    let reference = ReferenceInput {
        prompt: "a watercolor painting".into(),
        negative_prompt: None,
        latents: ReferenceLatents::Generate(sd.seeded_latents(9, &settings).unwrap()),
    };
    let style = Some(SetStyle {
        options: &style_options,
        reference: &reference,
    });
    let frames = [
        frame(
            &sd,
            "a watercolor painting of a dog on the beach",
            1,
            &settings,
        ),
        frame(
            &sd,
            "a watercolor painting of a dog in the snow",
            2,
            &settings,
        ),
        frame(
            &sd,
            "a watercolor painting of a dog in the park",
            3,
            &settings,
        ),
    ];

    let no_freeu = ConsistoryOptions {
        freeu: None,
        ..ConsistoryOptions::default()
    };
    let set = ConsistorySet {
        frames: &frames,
        subject_words: &words,
        mapping: AnchorMapping::anchors_then_frames(0, frames.len()),
        dropout: DropoutDraws::Seeded { seeds: vec![] },
        replays: &[],
        style,
    };
    let unshared = sd
        .consistory(&settings, &no_freeu, &set, &mut no_progress)
        .unwrap();
    let styled = sd
        .style_aligned(
            &settings,
            &style_options,
            &reference,
            &frames,
            &mut no_progress,
        )
        .unwrap();
    let expected = styled.final_latents.narrow(0, 1, frames.len()).unwrap();
    let tol = 1e-4 * absmax(&expected);
    assert!(
        max_abs(&unshared.final_latents, &expected) <= tol,
        "{} > {tol}",
        max_abs(&unshared.final_latents, &expected)
    );

    let run = |extra: &[FrameInput]| {
        let all: Vec<FrameInput> = frames[..2].iter().chain(extra).cloned().collect();
        let set = ConsistorySet {
            frames: &all,
            subject_words: &words,
            mapping: AnchorMapping::anchors_then_frames(2, extra.len()),
            dropout: DropoutDraws::Seeded { seeds: vec![3] },
            replays: &[],
            style,
        };
        sd.consistory(
            &settings,
            &ConsistoryOptions::default(),
            &set,
            &mut no_progress,
        )
        .unwrap()
    };
    let extra = [
        frames[2].clone(),
        frame(
            &sd,
            "a watercolor painting of a dog on a sofa",
            4,
            &settings,
        ),
    ];
    let together = run(&extra);
    let alone = run(&extra[..1]);
    let tol = 1e-4 * absmax(&together.final_latents);
    assert!(
        max_abs(
            &alone.final_latents,
            &together.final_latents.narrow(0, 0, 3).unwrap()
        ) <= tol
    );
    // The characters changed the styled frame.
    assert!(
        max_abs(
            &alone.final_latents.get(2).unwrap(),
            &expected.get(2).unwrap()
        ) > 100.0 * tol
    );
}

/// Several characters: each has its own anchors and subject words, and a frame may show several.
/// A frame rendered with only its own characters' anchors equals the same frame in a task that
/// also carries another character and other frames (each character draws its own dropout).
#[test]
fn frames_with_several_characters_are_independent() {
    let sd = load("tiny-sdxl");
    let settings = GenerationSettings {
        height: 128,
        width: 128,
        steps: 12,
        guidance_scale: 5.0,
    };
    let words = vec!["dog".to_string(), "sailor".to_string()];
    let dogs = [
        frame(&sd, "a photo of a cute dog on the beach", 1, &settings),
        frame(&sd, "a photo of a cute dog in the snow", 2, &settings),
    ];
    let sailors = [
        frame(&sd, "a photo of an old sailor on a boat", 3, &settings),
        frame(&sd, "a photo of an old sailor in a harbour", 4, &settings),
    ];
    let both = frame(
        &sd,
        "a photo of a dog and a sailor on the pier",
        5,
        &settings,
    );
    let dog_only = frame(&sd, "a photo of a dog in the park", 6, &settings);
    let run = |anchor_sets: &[&[FrameInput]],
               seeds: Vec<u64>,
               frames: &[(FrameInput, Vec<usize>)]| {
        let mut all: Vec<FrameInput> = anchor_sets.iter().flat_map(|a| a.iter().cloned()).collect();
        all.extend(frames.iter().map(|(f, _)| f.clone()));
        let counts: Vec<usize> = anchor_sets.iter().map(|a| a.len()).collect();
        let shows: Vec<Vec<usize>> = frames.iter().map(|(_, c)| c.clone()).collect();
        let set = ConsistorySet {
            frames: &all,
            subject_words: &words,
            mapping: AnchorMapping::characters(&counts, &shows),
            dropout: DropoutDraws::Seeded { seeds },
            replays: &[],
            style: None,
        };
        sd.consistory(
            &settings,
            &ConsistoryOptions::default(),
            &set,
            &mut no_progress,
        )
        .unwrap()
    };
    let together = run(
        &[&dogs, &sailors],
        vec![10, 20],
        &[(both.clone(), vec![0, 1]), (dog_only.clone(), vec![0])],
    );
    let alone = run(&[&dogs], vec![10], &[(dog_only, vec![0])]);
    let tol = 1e-4 * absmax(&together.final_latents);
    let err = max_abs(
        &alone.final_latents.get(2).unwrap(),
        &together.final_latents.get(5).unwrap(),
    );
    assert!(
        err <= tol,
        "the dog-only frame depends on the sailor's presence: {err} > {tol}"
    );
    let err = max_abs(
        &alone.final_latents.narrow(0, 0, 2).unwrap(),
        &together.final_latents.narrow(0, 0, 2).unwrap(),
    );
    assert!(
        err <= tol,
        "the dog's anchors depend on the sailor's: {err} > {tol}"
    );
    // The frame with both characters shares with all four anchors.
    let mapping = AnchorMapping::characters(&[2, 2], &[vec![0, 1], vec![0]]);
    assert!((0..4).all(|j| mapping.sees(4, j)) && !mapping.sees(5, 2) && !mapping.sees(0, 2));
}

/// The farm's two task kinds through the bytes-in/bytes-out API: an anchor task (one character's
/// anchors alone, its picture inverted and replayed, in a style) makes exactly the anchors a
/// render task recomputes beside its frames with another character present, and a frame renders
/// the same in a task of its own as beside other frames and characters.
#[test]
fn anchor_tasks_make_the_anchors_render_tasks_recompute() {
    use storyfarm_diffusion::frames::{
        anchors_file, invert_image, latents_from_bytes, picture_from_anchors_file,
        render_characters, CharacterFrameRequest, CharacterRenderRequest, CharacterRequest,
        FrameRequest, StyleRequest, CHARACTER_INVERSION_GUIDANCE,
    };
    use storyfarm_diffusion::style_aligned::StyleAlignedOptions;

    let sd = load("tiny-sd15");
    let settings = GenerationSettings {
        height: 64,
        width: 64,
        steps: 6,
        guidance_scale: 7.5,
    };
    let png = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/sd15/inversion_image.png"),
    )
    .unwrap();
    let style_trajectory = invert_image(
        &sd,
        &png,
        "style",
        "a colorful pattern",
        &settings,
        2.0,
        &mut no_progress,
    )
    .unwrap();
    let picture = invert_image(
        &sd,
        &png,
        "sailor",
        "an old sailor",
        &settings,
        CHARACTER_INVERSION_GUIDANCE,
        &mut no_progress,
    )
    .unwrap();
    let style = StyleRequest {
        trajectory: &style_trajectory,
        reference_prompt: "a colorful pattern",
        offset: 0,
        options: StyleAlignedOptions::default(),
    };
    let sailor = CharacterRequest {
        description: "an old sailor".into(),
        subject_words: vec!["sailor".into()],
        anchor_seeds: vec![31],
        dropout_seed: 31,
        picture: Some(picture.clone()),
    };
    let dog = CharacterRequest {
        description: "a cute dog".into(),
        subject_words: vec!["dog".into()],
        anchor_seeds: vec![41, 42],
        dropout_seed: 41,
        picture: None,
    };
    let options = ConsistoryOptions::default();
    let frame = |index, prompt: &str, seed, characters: Vec<usize>| CharacterFrameRequest {
        frame: FrameRequest {
            index,
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed,
        },
        characters,
    };
    // The anchor task of the sailor.
    let task = render_characters(
        &sd,
        &settings,
        &CharacterRenderRequest {
            options: &options,
            style: Some(&style),
            anchor_negative_prompt: "",
            characters: std::slice::from_ref(&sailor),
            frames: &[],
        },
        &mut no_progress,
    )
    .unwrap();
    assert!(task.frames.is_empty());
    let stored = anchors_file(&task.anchors[0], Some(&picture)).unwrap();
    assert_eq!(
        picture_from_anchors_file(&stored).unwrap().as_deref(),
        Some(picture.as_slice())
    );
    // A render task with both characters and two frames, the sailor's picture read back from the
    // anchors file.
    let sailor_from_file = CharacterRequest {
        picture: picture_from_anchors_file(&stored).unwrap(),
        ..sailor.clone()
    };
    let both = render_characters(
        &sd,
        &settings,
        &CharacterRenderRequest {
            options: &options,
            style: Some(&style),
            anchor_negative_prompt: "",
            characters: &[dog.clone(), sailor_from_file.clone()],
            frames: &[
                frame(0, "a dog and a sailor on a boat", 7, vec![0, 1]),
                frame(1, "a sailor on the pier", 8, vec![1]),
            ],
        },
        &mut no_progress,
    )
    .unwrap();
    let stored_latents = latents_from_bytes(&stored).unwrap();
    let recomputed = Tensor::cat(&both.anchors[1], 0).unwrap();
    let tol = 1e-4 * absmax(&stored_latents);
    assert!(
        max_abs(&stored_latents, &recomputed) <= tol,
        "the render task's sailor anchors differ from the anchor task's"
    );
    // The sailor-only frame alone, with only its own character, equals it beside the other.
    let alone = render_characters(
        &sd,
        &settings,
        &CharacterRenderRequest {
            options: &options,
            style: Some(&style),
            anchor_negative_prompt: "",
            characters: &[sailor_from_file],
            frames: &[frame(1, "a sailor on the pier", 8, vec![0])],
        },
        &mut no_progress,
    )
    .unwrap();
    let a = latents_from_bytes(&alone.frames[0].latents).unwrap();
    let b = latents_from_bytes(&both.frames[1].latents).unwrap();
    assert!(
        max_abs(&a, &b) <= 1e-4 * absmax(&b),
        "a frame depends on the other frames and characters of its task"
    );
    assert_eq!(alone.frames[0].index, 1);
    assert!(image::load_from_memory(&both.frames[0].png).is_ok());
}
