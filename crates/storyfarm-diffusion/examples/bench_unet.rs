//! Times one UNet forward of a real-size config with random weights, plain and with
//! StyleAligned, the way ../shared/BASELINES.md timed PyTorch (f32, CPU, 1 warm-up, median of
//! the runs). Prints wall and process CPU seconds and peak RSS.
//!
//! `cargo run -p storyfarm-diffusion --example bench_unet -- <unet config.json> [runs] [modes]`
//! modes: comma list of `plain`, `sa-batch` (reference + target in one CFG batch, the official
//! layout), `sa-target` (the farm layout: the reference's features captured once per step, then a
//! target pass against them; the target pass is what each further frame costs), `sa-pair` (the
//! farm layout's target pass and a plain forward alternated, in alternating order, with the
//! median of the per-pair ratios: on a shared machine whose speed drifts, the ratio of
//! neighbours is the steadier figure).
//! `STORYFARM_DEVICE` (`cpu`, `cuda`, `cuda:N`; default cpu) and `STORYFARM_PRECISION` (`f32`,
//! `f16`, `bf16`; default f32 on the CPU, f16 on a GPU) pick where and in what it runs.

mod common;

use std::time::Instant;

use common::{cpu_seconds, peak_rss_gib};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use storyfarm_diffusion::attention::{BatchLayout, ForwardContext, Hooks, StepContext};
use storyfarm_diffusion::device::{default_precision, DeviceSpec, Precision};
use storyfarm_diffusion::style_aligned::{
    ReferenceFeatures, StyleAligned, StyleAlignedOptions, StyleRole,
};
use storyfarm_diffusion::unet::{UNet, UNetConditioning, UNetConfig};
use storyfarm_diffusion::weights::Weights;

/// Wall and CPU seconds of one forward, its output read back so no work is left pending (on a
/// GPU the read waits for the queued kernels).
fn timed(forward: &mut dyn FnMut() -> storyfarm_diffusion::Result<Tensor>) -> Result<(f64, f64)> {
    let (w0, c0) = (Instant::now(), cpu_seconds());
    let _ = forward()?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((w0.elapsed().as_secs_f64(), cpu_seconds() - c0))
}

fn features_layers(hook: &StyleAligned) -> usize {
    match hook.role() {
        StyleRole::Targets(f) | StyleRole::CaptureReference(f) => f.captured_layers(),
        StyleRole::InBatch => 0,
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config_path = args
        .get(1)
        .context("usage: bench_unet <unet config.json> [runs] [modes]")?;
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let modes = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "plain,sa-batch".into());
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
    let started = Instant::now();
    let unet = UNet::new(config.clone(), &Weights::random(dtype, &device))?;
    eprintln!(
        "random weights ready in {:.1}s ({precision} on {device:?})",
        started.elapsed().as_secs_f64()
    );
    let xl = config.text_time.is_some();
    let side = if xl { 128 } else { 64 };
    let ctx_dim = config.context_dim();

    for mode in modes.split(',') {
        let (images, hooks_on) = match mode {
            "plain" | "sa-target" | "sa-pair" => (1, false),
            "sa-batch" => (2, true),
            other => anyhow::bail!("unknown mode {other}"),
        };
        let batch = 2 * images;
        let sample = Tensor::randn(0f32, 1.0, (batch, 4, side, side), &device)?.to_dtype(dtype)?;
        let context = Tensor::randn(0f32, 1.0, (batch, 77, ctx_dim), &device)?.to_dtype(dtype)?;
        let added = match &config.text_time {
            Some(tt) => Some((
                Tensor::randn(
                    0f32,
                    1.0,
                    (batch, tt.projection_input_dim - 6 * tt.time_embed_dim),
                    &device,
                )?
                .to_dtype(dtype)?,
                Tensor::new(
                    &[
                        side as f32 * 8.0,
                        side as f32 * 8.0,
                        0.0,
                        0.0,
                        side as f32 * 8.0,
                        side as f32 * 8.0,
                    ],
                    &device,
                )?
                .unsqueeze(0)?
                .repeat((batch, 1))?
                .to_dtype(dtype)?,
            )),
            None => None,
        };
        let cond = UNetConditioning {
            context: &context,
            added: added.as_ref().map(|(a, b)| (a, b)),
        };
        let sa = StyleAligned::new(StyleAlignedOptions::default(), &unet)?;
        let features = ReferenceFeatures::new();
        let capture = sa.with_role(StyleRole::CaptureReference(features.clone()));
        let target = sa.with_role(StyleRole::Targets(features));
        let hooks = if hooks_on {
            Hooks {
                attention: Some(&sa),
                norm: Some(&sa),
                ..Hooks::none()
            }
        } else {
            Hooks::none()
        };
        let step = StepContext {
            step: 0,
            steps: 50,
            timestep: 501,
            layout: BatchLayout {
                images,
                guidance: true,
            },
        };
        let mut ctx = ForwardContext { step, hooks };
        if mode == "sa-target" || mode == "sa-pair" {
            // Capture the reference once (not timed); every timed run is a target pass.
            let reference = ForwardContext {
                step,
                hooks: Hooks {
                    attention: Some(&capture),
                    norm: Some(&capture),
                    ..Hooks::none()
                },
            };
            let (wall, cpu) = timed(&mut || unet.forward(&sample, 501.0, &cond, &reference))?;
            println!(
                "sa-target reference capture pass: wall {wall:.3}s cpu {cpu:.3}s ({} layers captured)",
                features_layers(&target)
            );
            ctx = ForwardContext {
                step,
                hooks: Hooks {
                    attention: Some(&target),
                    norm: Some(&target),
                    ..Hooks::none()
                },
            };
        }
        if mode == "sa-pair" {
            let plain = ForwardContext {
                step,
                hooks: Hooks::none(),
            };
            let mut rows: Vec<[f64; 4]> = Vec::new();
            for run in 0..=runs {
                let mut row = [0f64; 4];
                // Order alternates (plain first, then target first) so a drift in the machine's
                // speed does not always fall on the same side.
                let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    (row[2 * i], row[2 * i + 1]) =
                        timed(&mut || unet.forward(&sample, 501.0, &cond, [&plain, &ctx][i]))?;
                }
                eprintln!(
                    "sa-pair run {run}{}: plain wall {:.3}s cpu {:.3}s, target wall {:.3}s cpu {:.3}s",
                    if run == 0 { " (warm-up)" } else { "" },
                    row[0],
                    row[1],
                    row[2],
                    row[3]
                );
                if run > 0 {
                    rows.push(row);
                }
            }
            let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
                let mut v: Vec<f64> = rows.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "sa-pair   batch {batch}x4x{side}x{side}: median plain {:.3}s (cpu {:.3}s), target {:.3}s (cpu {:.3}s); \
                 median ratio target/plain wall {:.3}x cpu {:.3}x",
                median(&|r| r[0]),
                median(&|r| r[1]),
                median(&|r| r[2]),
                median(&|r| r[3]),
                median(&|r| r[2] / r[0]),
                median(&|r| r[3] / r[1])
            );
            continue;
        }
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        for run in 0..=runs {
            let (wall, cpu) = timed(&mut || unet.forward(&sample, 501.0, &cond, &ctx))?;
            eprintln!(
                "{mode} run {run}{}: wall {wall:.3}s cpu {cpu:.3}s",
                if run == 0 { " (warm-up)" } else { "" }
            );
            if run > 0 {
                walls.push(wall);
                cpus.push(cpu);
            }
        }
        walls.sort_by(f64::total_cmp);
        cpus.sort_by(f64::total_cmp);
        println!(
            "{mode:<9} batch {batch}x4x{side}x{side}: best {:.3}s median {:.3}s cpu(median) {:.3}s peak RSS {:.1} GiB",
            walls[0],
            walls[walls.len() / 2],
            cpus[cpus.len() / 2],
            peak_rss_gib()
        );
    }
    Ok(())
}
