//! `storyfarm generate`: prompts in, PNGs out, with a progress bar per step; with a style image
//! the image is DDIM-inverted once and every frame is rendered against its trajectory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use storyfarm_diffusion::device::{default_precision, DeviceSpec, Precision};
use storyfarm_diffusion::image_io::load_image;
use storyfarm_diffusion::model::{HubOptions, ModelFolder};
use storyfarm_diffusion::pipeline::{
    FrameInput, GenerationSettings, Progress, ReferenceInput, ReferenceLatents, StableDiffusion,
};
use storyfarm_diffusion::style_aligned::StyleAlignedOptions;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers model folder, or a Hugging Face repo id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).
    #[arg(long, env = "STORYFARM_MODEL")]
    model: String,
    /// One frame per --prompt.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Style reference image (PNG/JPEG); it is resized to the output size and DDIM-inverted.
    #[arg(long)]
    style_image: Option<PathBuf>,
    /// Describes the style reference; without --style-image a reference is generated from it.
    #[arg(long)]
    style_prompt: Option<String>,
    /// Hold the inverted reference this many steps cleaner at the start (official `offset`).
    #[arg(long, default_value_t = 0)]
    style_offset: usize,
    /// Guidance of the DDIM inversion (the official transfer notebook uses 2).
    #[arg(long, default_value_t = 2.0)]
    inversion_guidance: f64,
    /// Added to the logits of the reference's keys (the transfer notebook uses ln 2).
    #[arg(long, default_value_t = 0.0)]
    shared_score_shift: f32,
    /// Do not pool GroupNorm statistics with the reference (the official SDXL demo setting).
    #[arg(long)]
    no_shared_group_norm: bool,
    /// Seed of the first frame; frame i uses seed + i (the reference uses seed - 1).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on CUDA).
    #[arg(long)]
    precision: Option<Precision>,
}

fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:40}] {pos}/{len} steps  {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A progress callback driving `bar`.
fn track(bar: &ProgressBar) -> impl FnMut(Progress) -> storyfarm_diffusion::Result<()> + '_ {
    move |p| {
        let step = match p {
            Progress::Denoise { step, .. } | Progress::Invert { step, .. } => step,
        };
        bar.set_position(step as u64);
        Ok(())
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = args.device.device()?;
    let precision = args.precision.unwrap_or_else(|| default_precision(&device));
    let dtype = precision.to_dtype();
    let settings = GenerationSettings {
        height: args.height,
        width: args.width,
        steps: args.steps,
        guidance_scale: args.guidance,
    };
    settings.validate()?;
    if args.style_image.is_some() && args.style_prompt.is_none() {
        bail!("--style-image needs --style-prompt describing the image");
    }
    let style_image = match &args.style_image {
        Some(path) => Some(load_image(path, Some((args.height, args.width)))?),
        None => None,
    };

    let loading = ProgressBar::new_spinner().with_message(format!("loading {}", args.model));
    loading.enable_steady_tick(Duration::from_millis(120));
    let folder = ModelFolder::open_for_dtype(&args.model, &HubOptions::from_env()?, dtype)?;
    let sd = StableDiffusion::load(&folder, dtype, &device)?;
    loading.finish_with_message(format!(
        "loaded {} ({:?}, {precision} on {})",
        folder.id(),
        sd.family,
        args.device
    ));

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let frames: Vec<FrameInput> = args
        .prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| -> Result<FrameInput> {
            Ok(FrameInput {
                prompt: prompt.clone(),
                negative_prompt: args.negative_prompt.clone(),
                init_latents: sd.seeded_latents(args.seed + i as u64, &settings)?,
            })
        })
        .collect::<Result<_>>()?;

    let latents = match &args.style_prompt {
        None => {
            let b = bar(settings.steps as u64, "rendering");
            let out = sd.txt2img(&settings, &frames, &mut track(&b))?;
            b.finish();
            out.final_latents
        }
        Some(style_prompt) => {
            let reference_latents = match &style_image {
                Some(image) => {
                    let b = bar(settings.steps as u64, "inverting");
                    let inversion = sd.invert(
                        image,
                        style_prompt,
                        settings.steps,
                        args.inversion_guidance,
                        &mut track(&b),
                    )?;
                    b.finish();
                    ReferenceLatents::Replay {
                        trajectory: inversion.zts,
                        offset: args.style_offset,
                    }
                }
                None => ReferenceLatents::Generate(
                    sd.seeded_latents(args.seed.wrapping_sub(1), &settings)?,
                ),
            };
            let reference = ReferenceInput {
                prompt: style_prompt.clone(),
                negative_prompt: args.negative_prompt.clone(),
                latents: reference_latents,
            };
            let options = StyleAlignedOptions {
                share_group_norm: !args.no_shared_group_norm,
                shared_score_shift: args.shared_score_shift,
                ..StyleAlignedOptions::default()
            };
            let b = bar(settings.steps as u64, "rendering");
            let out = sd.style_aligned(&settings, &options, &reference, &frames, &mut track(&b))?;
            b.finish();
            let n = out.final_latents.dim(0)?;
            sd.write_png(&out.final_latents, 0, &args.out.join("reference.png"))?;
            out.final_latents.narrow(0, 1, n - 1)?
        }
    };
    for i in 0..latents.dim(0)? {
        let path = args.out.join(format!("frame-{:03}.png", i + 1));
        sd.write_png(&latents, i, &path)?;
        println!("{}", path.display());
    }
    Ok(())
}
