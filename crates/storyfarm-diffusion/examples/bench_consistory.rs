//! Times the UNet calls of a ConsiStory frame against a plain call, on a UNet config with random
//! weights (f32 CPU by default; `STORYFARM_DEVICE`, `STORYFARM_PRECISION` as for bench_unet), and
//! derives what a whole character frame costs against a plain frame from the call counts.
//!
//! `cargo run --release -p storyfarm-diffusion --example bench_consistory -- <unet config.json>
//! [runs] [image side px] [frames per task]` (`runs` 0: the first call of each kind, no warm-up).
//! scripts/bench/official_consistory.py times the official code's calls the same way.
//!
//! A task renders `A = 2` anchors and `F` frames as one set (anchor mode; the anchors are
//! recomputed beside the frames, the farm's design). Calls timed, all under classifier-free
//! guidance: `plain` (the F frames alone, no hooks), `vanilla` (the set's query-capturing call of
//! steps 1..n/10), `sdsa` (a shared-attention call: steps past n/10 outside injection), `sdsa+blend`
//! (steps 1..n/10), `sdsa+inject` (steps n/10..n/3). Subject masks are a centred disc over about a
//! third of each image with the official 0.5 dropout; injection moves the same share of patches.

use std::collections::HashMap;
mod common;

use std::time::Instant;

use common::cpu_seconds;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use storyfarm_diffusion::attention::{BatchLayout, ForwardContext, Hooks, StepContext};
use storyfarm_diffusion::consistory::hook::{
    CallKind, ConsistoryHook, InjectionPlan, StepInputs, TargetInjection,
};
use storyfarm_diffusion::consistory::maths::{DropoutSource, SeededUniform};
use storyfarm_diffusion::consistory::{AnchorMapping, ConsistoryLevels, ConsistoryOptions};
use storyfarm_diffusion::device::{default_precision, DeviceSpec, Precision};
use storyfarm_diffusion::unet::{UNet, UNetConditioning, UNetConfig};
use storyfarm_diffusion::weights::Weights;

const ANCHORS: usize = 2;

/// Latents, text context and SDXL's added conditioning of one UNet batch.
type UNetInputs = (Tensor, Tensor, Option<(Tensor, Tensor)>);
const STEPS: usize = 50;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A centred disc over about a third of a `side x side` map.
fn disc(side: usize) -> Vec<bool> {
    let c = (side as f64 - 1.0) / 2.0;
    let r2 = (side * side) as f64 / (3.0 * std::f64::consts::PI);
    (0..side * side)
        .map(|p| {
            let (y, x) = ((p / side) as f64 - c, (p % side) as f64 - c);
            y * y + x * x <= r2
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config_path = args
        .get(1)
        .context("usage: bench_consistory <unet config.json> [runs] [side px] [frames]")?;
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let side_px: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(1024);
    let frames: usize = args.get(4).map(|r| r.parse()).transpose()?.unwrap_or(1);
    let config = UNetConfig::from_file(std::path::Path::new(config_path))?;
    let device: DeviceSpec = std::env::var("STORYFARM_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let device = device.device()?;
    let precision: Precision = match std::env::var("STORYFARM_PRECISION") {
        Ok(p) => p.parse()?,
        Err(_) => default_precision(&device),
    };
    let dtype = precision.to_dtype();
    let unet = UNet::new(config.clone(), &Weights::random(dtype, &device))?;
    let levels = ConsistoryLevels::for_unet(&unet)?;
    let side = side_px / 8;
    let images = ANCHORS + frames;
    let options = ConsistoryOptions::default();
    let mapping = AnchorMapping::anchors_then_frames(ANCHORS, frames);
    let tokens = vec![vec![Some(5usize); images]];

    let inputs = |n: usize| -> Result<UNetInputs> {
        let batch = 2 * n;
        let sample = Tensor::randn(0f32, 1.0, (batch, 4, side, side), &device)?.to_dtype(dtype)?;
        let context = Tensor::randn(0f32, 1.0, (batch, 77, config.context_dim()), &device)?
            .to_dtype(dtype)?;
        let added = match &config.text_time {
            Some(tt) => {
                let pooled = Tensor::randn(
                    0f32,
                    1.0,
                    (batch, tt.projection_input_dim - 6 * tt.time_embed_dim),
                    &device,
                )?;
                let px = side_px as f32;
                let ids = Tensor::new(&[px, px, 0.0, 0.0, px, px], &device)?
                    .unsqueeze(0)?
                    .repeat((batch, 1))?;
                Some((pooled.to_dtype(dtype)?, ids.to_dtype(dtype)?))
            }
            None => None,
        };
        Ok((sample, context, added))
    };

    // Masks after dropout per level, and an injection plan over the same disc.
    let mut dropout = SeededUniform::new(1);
    let mut keep = HashMap::new();
    let mut level_side = side;
    for level in 0..=levels.mask.max(levels.injection) {
        if levels.mask_levels().contains(&level) {
            let subject = disc(level_side);
            let mut flat = Vec::new();
            for _ in 0..images {
                let u = dropout.draw(subject.len());
                flat.extend(
                    subject
                        .iter()
                        .zip(&u)
                        .map(|(&s, &u)| if s && u >= 0.5 { 1f32 } else { 0.0 }),
                );
            }
            keep.insert(
                level,
                Tensor::from_vec(flat, (images, level_side * level_side), &device)?
                    .to_dtype(dtype)?,
            );
        }
        level_side = level_side.div_ceil(2);
    }
    let fine = side.div_ceil(1 << levels.injection);
    let n = fine * fine;
    let subject = disc(fine);
    let plan = InjectionPlan {
        targets: (0..images)
            .map(|i| {
                Some(TargetInjection {
                    // Anchors take from the other anchor, frames from either.
                    source_image: (0..n)
                        .map(|p| {
                            if i < ANCHORS {
                                (ANCHORS - 1 - i) as u32
                            } else {
                                (p % ANCHORS) as u32
                            }
                        })
                        .collect(),
                    source_patch: (0..n).map(|p| ((p * 7919) % n) as u32).collect(),
                    inject: subject.clone(),
                    best_distance: vec![0.0; n],
                    threshold: 1.0,
                })
            })
            .collect(),
    };

    let (fs, fc, fa) = inputs(frames)?;
    let (ss, sc, sa) = inputs(images)?;
    let frame_cond = UNetConditioning {
        context: &fc,
        added: fa.as_ref().map(|(a, b)| (a, b)),
    };
    let set_cond = UNetConditioning {
        context: &sc,
        added: sa.as_ref().map(|(a, b)| (a, b)),
    };
    let layout = |n| BatchLayout {
        images: n,
        guidance: true,
    };
    let step_ctx = |step: usize, n| StepContext {
        step,
        steps: STEPS,
        timestep: 981 - 20 * step as u32,
        layout: layout(n),
    };

    // The blended calls need the set's vanilla queries: the timed vanilla calls capture them
    // (their values do not change the cost), so no extra call is spent on them.
    let mut queries = None;
    let mut report = Vec::new();
    for mode in ["plain", "vanilla", "sdsa", "sdsa+blend", "sdsa+inject"] {
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        // `runs` timed calls after a warm-up; 0 times the first call alone (on the real config
        // at 1024² one call takes minutes and the warm-up changes little).
        let calls = if runs == 0 { 1 } else { runs + 1 };
        for run in 0..calls {
            let (step, sample, cond, n) = match mode {
                "plain" => (20, &fs, &frame_cond, frames),
                "vanilla" => (3, &ss, &set_cond, images),
                "sdsa" => (20, &ss, &set_cond, images),
                "sdsa+blend" => (3, &ss, &set_cond, images),
                _ => (8, &ss, &set_cond, images),
            };
            let call = match mode {
                "vanilla" => CallKind::VanillaQueries,
                _ => CallKind::Main,
            };
            let step_inputs = match mode {
                "plain" | "vanilla" => StepInputs::default(),
                "sdsa" => StepInputs {
                    keep: Some(&keep),
                    ..Default::default()
                },
                "sdsa+blend" => StepInputs {
                    keep: Some(&keep),
                    vanilla_queries: Some(queries.as_ref().context("vanilla runs first")?),
                    ..Default::default()
                },
                _ => StepInputs {
                    keep: Some(&keep),
                    injection: Some(&plan),
                    ..Default::default()
                },
            };
            let hook = ConsistoryHook::new(&options, &levels, &mapping, &tokens, call, step_inputs);
            let hooks = match mode {
                "plain" => Hooks::none(),
                "vanilla" => Hooks {
                    attention: Some(&hook),
                    freeu: options.freeu,
                    ..Hooks::none()
                },
                _ => Hooks {
                    attention: Some(&hook),
                    blocks: Some(&hook),
                    freeu: options.freeu,
                    ..Hooks::none()
                },
            };
            let ctx = ForwardContext {
                step: step_ctx(step, n),
                hooks,
            };
            let (w0, c0) = (Instant::now(), cpu_seconds());
            let _ = unet
                .forward(sample, 981.0 - 20.0 * step as f64, cond, &ctx)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            let (wall, cpu) = (w0.elapsed().as_secs_f64(), cpu_seconds() - c0);
            if run > 0 || runs == 0 {
                walls.push(wall);
                cpus.push(cpu);
            }
            if mode == "vanilla" {
                queries = Some(hook.into_record().queries);
            }
        }
        let (wall, cpu) = (median(walls), median(cpus));
        println!(
            "{mode:<12} images {:>2}  wall {wall:8.3}s  cpu {cpu:8.3}s",
            if mode == "plain" { frames } else { images }
        );
        report.push((mode, wall));
    }
    let t = |m: &str| {
        report
            .iter()
            .find(|(k, _)| *k == m)
            .map(|(_, w)| *w)
            .unwrap_or(f64::NAN)
    };
    // Calls per pass of n steps: n main calls (step 0 plain-shared, 1..n/10 blended, n/10..n/3
    // injecting in pass 2 only) and n/10 vanilla calls.
    let blend = STEPS / 10;
    let inject = STEPS / 3 - STEPS / 10 + 1;
    let pass1 = t("sdsa+blend") * blend as f64
        + t("sdsa") * (STEPS - blend) as f64
        + t("vanilla") * blend as f64;
    let pass2 = t("sdsa+blend") * blend as f64
        + t("sdsa+inject") * inject as f64
        + t("sdsa") * (STEPS - blend - inject) as f64
        + t("vanilla") * blend as f64;
    let plain_frames = t("plain") * STEPS as f64;
    println!(
        "per frame ({frames} frame(s) per task, {ANCHORS} anchors recomputed): {:.2}x a plain frame (two-pass floor 2.00x at equal call cost)",
        (pass1 + pass2) / plain_frames
    );
    Ok(())
}
