//! The farm's correctness contract on the tiny models: a frame rendered alone against a stored
//! reference trajectory equals the same frame rendered in a batch with other frames, and equals
//! the official in-batch StyleAligned layout. Also: cancelling between steps stops a run.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{absmax, load, max_abs, no_progress};
use storyfarm_diffusion::pipeline::{
    FrameInput, GenerationSettings, Progress, ReferenceInput, ReferenceLatents,
};
use storyfarm_diffusion::style_aligned::StyleAlignedOptions;
use storyfarm_diffusion::DiffusionError;

fn check_invariance(model: &str) {
    let sd = load(model);
    let settings = GenerationSettings {
        height: 64,
        width: 64,
        steps: 6,
        guidance_scale: 7.5,
    };
    let prompts = ["a red barn", "a lighthouse at night", "a bowl of fruit"];
    let frames: Vec<FrameInput> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| FrameInput {
            prompt: p.to_string(),
            negative_prompt: Some("blurry".into()),
            init_latents: sd.seeded_latents(100 + i as u64, &settings).unwrap(),
        })
        .collect();
    let ref_init = sd.seeded_latents(7, &settings).unwrap();
    let trajectory = sd
        .reference_trajectory(
            &settings,
            "flat pastel illustration",
            None,
            &ref_init,
            &mut no_progress,
        )
        .unwrap();
    let options = StyleAlignedOptions::default();
    let replay = ReferenceInput {
        prompt: "flat pastel illustration".into(),
        negative_prompt: None,
        latents: ReferenceLatents::Replay {
            trajectory: trajectory.clone(),
            offset: 0,
        },
    };
    let batch = sd
        .style_aligned(&settings, &options, &replay, &frames, &mut no_progress)
        .unwrap();
    // The official layout, with the reference generated inside the batch.
    let generated = ReferenceInput {
        latents: ReferenceLatents::Generate(ref_init.clone()),
        ..replay.clone()
    };
    let official = sd
        .style_aligned_batch(&settings, &options, &generated, &frames, &mut no_progress)
        .unwrap();
    let tol = 1e-4 * absmax(&official.final_latents);
    let err = max_abs(&batch.final_latents, &official.final_latents);
    assert!(
        err <= tol,
        "{model}: replayed batch vs official in-batch: {err} > {tol}"
    );
    for (i, frame) in frames.iter().enumerate() {
        let alone = sd
            .style_aligned(
                &settings,
                &options,
                &replay,
                std::slice::from_ref(frame),
                &mut no_progress,
            )
            .unwrap();
        let a = alone.final_latents.get(1).unwrap();
        let b = batch.final_latents.get(i + 1).unwrap();
        let tol = 1e-4 * absmax(&b);
        let err = max_abs(&a, &b);
        assert!(
            err <= tol,
            "{model} frame {i}: alone vs batch {err} > {tol}"
        );
        // StyleAligned actually changed the frame.
        let plain = sd
            .txt2img(&settings, std::slice::from_ref(frame), &mut no_progress)
            .unwrap();
        assert!(
            max_abs(&plain.final_latents.get(0).unwrap(), &a) > 100.0 * tol,
            "{model} frame {i}: style had no effect"
        );
    }
    // The reference followed its trajectory exactly.
    assert_eq!(
        max_abs(
            &batch.final_latents.get(0).unwrap(),
            &trajectory.get(settings.steps).unwrap()
        ),
        0.0
    );
}

#[test]
fn sd15_frame_alone_equals_frame_in_batch() {
    check_invariance("tiny-sd15");
}

#[test]
fn sdxl_frame_alone_equals_frame_in_batch() {
    check_invariance("tiny-sdxl");
}

#[test]
fn progress_callback_cancels_between_steps() {
    let sd = load("tiny-sd15");
    let settings = GenerationSettings {
        height: 64,
        width: 64,
        steps: 8,
        guidance_scale: 7.5,
    };
    let frame = FrameInput {
        prompt: "x".into(),
        negative_prompt: None,
        init_latents: sd.seeded_latents(1, &settings).unwrap(),
    };
    let mut seen = Vec::new();
    let result = sd.txt2img(&settings, &[frame], &mut |p| {
        seen.push(p);
        match p {
            Progress::Denoise { step: 3, .. } => Err(DiffusionError::Cancelled { step: 3 }),
            _ => Ok(()),
        }
    });
    assert!(matches!(result, Err(DiffusionError::Cancelled { step: 3 })));
    assert_eq!(
        seen.len(),
        4,
        "steps 0..=3 announced, nothing after the cancel"
    );
}

#[test]
fn bad_inputs_name_the_field() {
    let sd = load("tiny-sd15");
    let settings = GenerationSettings {
        height: 60,
        width: 64,
        steps: 4,
        guidance_scale: 7.5,
    };
    let e = settings.validate().unwrap_err().to_string();
    assert!(e.contains("height") && e.contains("60"), "{e}");
    let ok = GenerationSettings {
        height: 64,
        ..settings
    };
    let wrong = FrameInput {
        prompt: "x".into(),
        negative_prompt: None,
        init_latents: Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap(),
    };
    let e = sd
        .txt2img(&ok, &[wrong], &mut no_progress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("frames[0].init_latents"), "{e}");
    let short = ReferenceInput {
        prompt: "s".into(),
        negative_prompt: None,
        latents: ReferenceLatents::Replay {
            trajectory: Tensor::zeros((3, 4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
            offset: 0,
        },
    };
    let frame = FrameInput {
        prompt: "x".into(),
        negative_prompt: None,
        init_latents: sd.seeded_latents(1, &ok).unwrap(),
    };
    let e = sd
        .style_aligned(
            &ok,
            &StyleAlignedOptions::default(),
            &short,
            &[frame],
            &mut no_progress,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("reference.trajectory"), "{e}");
}

/// The bytes-level API the workers use: invert an encoded image, render frames against the
/// trajectory file, and get the same frame whether it is rendered alone or with others.
#[test]
fn frames_api_invert_then_render_alone_or_together() {
    use storyfarm_diffusion::frames::{
        compare_latents, invert_image, render_frames, FrameRequest, StyleRequest,
    };
    let sd = load("tiny-sd15");
    let settings = GenerationSettings {
        height: 64,
        width: 96,
        steps: 5,
        guidance_scale: 7.5,
    };
    let image = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd15/inversion_image.png"),
    )
    .unwrap();
    let trajectory = invert_image(
        &sd,
        &image,
        "inversion_image.png",
        "a geometric pattern",
        &settings,
        2.0,
        &mut no_progress,
    )
    .unwrap();
    let style = StyleRequest {
        trajectory: &trajectory,
        reference_prompt: "a geometric pattern",
        offset: 1,
        options: StyleAlignedOptions::default(),
    };
    let frames: Vec<FrameRequest> = (0..3)
        .map(|i| FrameRequest {
            index: i,
            prompt: format!("frame {i}"),
            negative_prompt: String::new(),
            seed: 40 + i as u64,
        })
        .collect();
    let together = render_frames(&sd, &settings, Some(&style), &frames, &mut no_progress).unwrap();
    assert_eq!(together.len(), 3);
    for (frame, rendered) in frames.iter().zip(&together) {
        let alone = render_frames(
            &sd,
            &settings,
            Some(&style),
            std::slice::from_ref(frame),
            &mut no_progress,
        )
        .unwrap();
        let (diff, scale) = compare_latents(&rendered.latents, &alone[0].latents).unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "frame {}: {diff} vs scale {scale}",
            frame.index
        );
        let png = image::load_from_memory(&rendered.png).unwrap();
        assert_eq!((png.width(), png.height()), (96, 64));
    }
    let bad = render_frames(
        &sd,
        &settings,
        Some(&StyleRequest {
            trajectory: b"junk",
            ..style.clone()
        }),
        &frames,
        &mut no_progress,
    );
    assert!(bad.unwrap_err().to_string().contains("trajectory file"));
}
