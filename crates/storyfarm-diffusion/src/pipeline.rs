//! Pipelines over a loaded model: txt2img with classifier-free guidance, DDIM inversion of a
//! real image, and StyleAligned rendering against a reference that is either generated in the
//! batch or replayed from a stored trajectory.

use candle_core::{DType, Device, Tensor};

use crate::attention::{BatchLayout, ForwardContext, Hooks, StepContext};
use crate::error::{DiffusionError, Result};
use crate::model::{ModelFamily, ModelFolder};
use crate::noise::NoiseGenerator;
use crate::scheduler::{DdimConfig, DdimScheduler};
use crate::style_aligned::{ReferenceFeatures, StyleAligned, StyleAlignedOptions, StyleRole};
use crate::text::{PromptEmbedding, TextConditioner};
use crate::unet::{UNet, UNetConditioning, UNetConfig};
use crate::vae::AutoencoderKl;

/// Sizes and sampler settings shared by every image of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerationSettings {
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance_scale: f64,
}

impl GenerationSettings {
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("height", self.height), ("width", self.width)] {
            if v == 0 || v % 8 != 0 {
                return Err(DiffusionError::invalid_argument(
                    field,
                    format!("must be a positive multiple of 8, got {v}"),
                ));
            }
        }
        if self.steps == 0 {
            return Err(DiffusionError::invalid_argument(
                "steps",
                "must be at least 1",
            ));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(DiffusionError::invalid_argument(
                "guidance_scale",
                format!(
                    "must be a finite non-negative number, got {}",
                    self.guidance_scale
                ),
            ));
        }
        Ok(())
    }

    pub fn latent_hw(&self) -> (usize, usize) {
        (self.height / 8, self.width / 8)
    }

    /// diffusers runs the unconditional branch only when guidance is above 1.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// One image to render: prompts and its initial latents `[1, 4, h, w]`.
#[derive(Clone, Debug)]
pub struct FrameInput {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub init_latents: Tensor,
}

/// Where the StyleAligned reference (image 0) comes from.
#[derive(Clone, Debug)]
pub enum ReferenceLatents {
    /// Denoised in the batch from these initial latents, like any other image.
    Generate(Tensor),
    /// Follows a stored trajectory `[N+1, 4, h, w]` (`zts[k]` enters step k, `zts[N]` = z0);
    /// after step i it is reset to `zts[max(offset + 1, i + 1)]` (official
    /// `make_inversion_callback`), starting from `zts[offset]`.
    Replay { trajectory: Tensor, offset: usize },
}

#[derive(Clone, Debug)]
pub struct ReferenceInput {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub latents: ReferenceLatents,
}

/// Progress of a long run; returning `Err` (e.g. [`DiffusionError::Cancelled`]) from the
/// callback stops the run between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Denoise { step: usize, steps: usize },
    Invert { step: usize, steps: usize },
}

pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress) -> Result<()>;

/// What a denoising run leaves behind.
pub struct Denoised {
    /// `[n, 4, h, w]` latents after the last step (before `1 / scaling_factor`).
    pub final_latents: Tensor,
    /// `[n, 4, h, w]` after each step (after any reference replacement).
    pub latents_per_step: Vec<Tensor>,
    /// Raw UNet output of the first step, `[uncond..., cond...]`.
    pub first_unet_output: Tensor,
}

/// A DDIM inversion of one image.
pub struct Inversion {
    /// `vae.encode(image).mean * scaling_factor`, `[1, 4, h, w]`.
    pub z0: Tensor,
    /// `[N+1, 4, h, w]`, official order: `zts[0]` is the noisiest, `zts[N] = z0`.
    pub zts: Tensor,
    /// UNet outputs (after guidance) of each inversion step, `[N, 4, h, w]`.
    pub eps: Tensor,
}

/// A loaded Stable Diffusion 1.x/2.x or XL model.
pub struct StableDiffusion {
    pub family: ModelFamily,
    pub unet: UNet,
    pub vae: AutoencoderKl,
    pub text: TextConditioner,
    pub scheduler: DdimConfig,
    device: Device,
    dtype: DType,
}

/// Text conditioning of a whole UNet batch, in batch order.
pub(crate) struct BatchConditioning {
    context: Tensor,
    added: Option<(Tensor, Tensor)>,
}

impl StableDiffusion {
    pub fn load(folder: &ModelFolder, dtype: DType, device: &Device) -> Result<Self> {
        let family = folder.family();
        let unet_config = UNetConfig::from_file(&folder.component_dir("unet").join("config.json"))?;
        let unet = UNet::new(unet_config, &folder.weights("unet", dtype, device)?)?;
        let vae = AutoencoderKl::load(&folder.component_dir("vae"), dtype, device)?;
        let text = TextConditioner::load(folder.root(), dtype, device)?;
        let scheduler = DdimConfig::from_file(
            &folder
                .component_dir("scheduler")
                .join("scheduler_config.json"),
        )?;
        if text.context_dim() != unet.config().context_dim() {
            return Err(DiffusionError::ModelLayout {
                path: folder.root().to_path_buf(),
                message: format!(
                    "text encoders give {}-wide context but the unet expects {}",
                    text.context_dim(),
                    unet.config().context_dim()
                ),
            });
        }
        Ok(Self {
            family,
            unet,
            vae,
            text,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Initial latents of one frame from the project's seeded generator.
    pub fn seeded_latents(&self, seed: u64, settings: &GenerationSettings) -> Result<Tensor> {
        let (h, w) = settings.latent_hw();
        let channels = self.unet.config().in_channels;
        Ok(NoiseGenerator::latents(seed, channels, h, w, &self.device)?.to_dtype(self.dtype)?)
    }

    /// `vae.encode(image).mean * scaling_factor` for an image `[1, 3, H, W]` in [-1, 1].
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.vae.encode_scaled(&image)
    }

    /// Images `[n, 3, H, W]` (about [-1, 1]) from final latents.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode_scaled(latents)
    }

    /// Decodes image `index` of `latents` `[n, 4, h, w]` and writes it as an 8-bit PNG.
    pub fn write_png(&self, latents: &Tensor, index: usize, path: &std::path::Path) -> Result<()> {
        let image = self.decode(&latents.narrow(0, index, 1)?)?;
        crate::image_io::save_png(&image, path)
    }

    pub(crate) fn batch_conditioning(
        &self,
        cond: &[PromptEmbedding],
        uncond: &[PromptEmbedding],
        settings: &GenerationSettings,
        guidance: bool,
    ) -> Result<BatchConditioning> {
        let ordered: Vec<&PromptEmbedding> = if guidance {
            uncond.iter().chain(cond.iter()).collect()
        } else {
            cond.iter().collect()
        };
        let contexts: Vec<&Tensor> = ordered.iter().map(|e| &e.context).collect();
        let context = Tensor::cat(&contexts, 0)?;
        let added = match self.family {
            ModelFamily::StableDiffusion => None,
            ModelFamily::StableDiffusionXl => {
                let pooled: Vec<Tensor> = ordered
                    .iter()
                    .map(|e| {
                        e.pooled.clone().ok_or_else(|| {
                            DiffusionError::invalid_argument(
                                "prompt",
                                "SDXL needs pooled embeddings",
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
                let pooled = Tensor::cat(&pooled, 0)?;
                let (h, w) = (settings.height as f32, settings.width as f32);
                let ids: Vec<f32> = (0..ordered.len())
                    .flat_map(|_| [h, w, 0.0, 0.0, h, w])
                    .collect();
                let time_ids = Tensor::from_vec(ids, (ordered.len(), 6), &self.device)?;
                Some((pooled, time_ids))
            }
        };
        Ok(BatchConditioning { context, added })
    }

    pub(crate) fn encode_frames<'a>(
        &self,
        prompts: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<(Vec<PromptEmbedding>, Vec<PromptEmbedding>)> {
        let mut cond = Vec::new();
        let mut uncond = Vec::new();
        for (prompt, negative) in prompts {
            cond.push(self.text.encode(prompt)?);
            uncond.push(self.text.encode_negative(negative)?);
        }
        Ok((cond, uncond))
    }

    /// The denoising loop shared by every pipeline.
    fn denoise(
        &self,
        mut latents: Tensor,
        conditioning: &BatchConditioning,
        settings: &GenerationSettings,
        hooks: Hooks,
        replay: Option<(&Tensor, usize)>,
        progress: ProgressFn,
    ) -> Result<Denoised> {
        let scheduler = DdimScheduler::new(&self.scheduler, settings.steps)?;
        let images = latents.dim(0)?;
        let guidance = settings.uses_guidance();
        let layout = BatchLayout { images, guidance };
        if let Some((trajectory, offset)) = replay {
            check_trajectory(trajectory, settings.steps, offset, &latents)?;
            latents = replace_reference(&latents, &trajectory.get(offset)?)?;
        }
        let mut per_step = Vec::with_capacity(settings.steps);
        let mut first = None;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            progress(Progress::Denoise {
                step: i,
                steps: settings.steps,
            })?;
            let _span = tracing::debug_span!("denoise_step", step = i, timestep = t).entered();
            let ctx = ForwardContext {
                step: StepContext {
                    step: i,
                    steps: settings.steps,
                    timestep: t as u32,
                    layout,
                },
                hooks,
            };
            let (eps, out) = self.guided_eps_raw(&latents, t, conditioning, settings, ctx)?;
            if first.is_none() {
                first = Some(out);
            }
            latents = scheduler.step(&eps, t, &latents)?;
            if let Some((trajectory, offset)) = replay {
                latents = replace_reference(&latents, &trajectory.get((offset + 1).max(i + 1))?)?;
            }
            per_step.push(latents.clone());
        }
        progress(Progress::Denoise {
            step: settings.steps,
            steps: settings.steps,
        })?;
        Ok(Denoised {
            final_latents: latents,
            latents_per_step: per_step,
            first_unet_output: first
                .ok_or_else(|| DiffusionError::invalid_argument("steps", "no step ran"))?,
        })
    }

    /// Independent images, batched; each `init_latents` is `[1, 4, h, w]`.
    pub fn txt2img(
        &self,
        settings: &GenerationSettings,
        frames: &[FrameInput],
        progress: ProgressFn,
    ) -> Result<Denoised> {
        settings.validate()?;
        let latents = self.stack_latents(frames.iter().map(|f| &f.init_latents), settings)?;
        let (cond, uncond) = self.encode_frames(
            frames
                .iter()
                .map(|f| (f.prompt.as_str(), f.negative_prompt.as_deref())),
        )?;
        let conditioning =
            self.batch_conditioning(&cond, &uncond, settings, settings.uses_guidance())?;
        self.denoise(
            latents,
            &conditioning,
            settings,
            Hooks::none(),
            None,
            progress,
        )
    }

    /// StyleAligned in the official layout: one batch with the reference as image 0 and the
    /// targets after it. The output holds all images, reference first.
    pub fn style_aligned_batch(
        &self,
        settings: &GenerationSettings,
        options: &StyleAlignedOptions,
        reference: &ReferenceInput,
        targets: &[FrameInput],
        progress: ProgressFn,
    ) -> Result<Denoised> {
        settings.validate()?;
        let hook = StyleAligned::new(options.clone(), &self.unet)?;
        let (ref_latents, replay) = reference_start(&reference.latents)?;
        let latents = self.stack_latents(
            std::iter::once(&ref_latents).chain(targets.iter().map(|f| &f.init_latents)),
            settings,
        )?;
        let prompts = std::iter::once((
            reference.prompt.as_str(),
            reference.negative_prompt.as_deref(),
        ))
        .chain(
            targets
                .iter()
                .map(|f| (f.prompt.as_str(), f.negative_prompt.as_deref())),
        );
        let (cond, uncond) = self.encode_frames(prompts)?;
        let conditioning =
            self.batch_conditioning(&cond, &uncond, settings, settings.uses_guidance())?;
        let hooks = Hooks {
            attention: Some(&hook),
            norm: Some(&hook),
            ..Hooks::none()
        };
        self.denoise(latents, &conditioning, settings, hooks, replay, progress)
    }

    /// StyleAligned as the farm runs it: at every step the reference runs alone and its
    /// features are captured, then the targets run as their own batch against them. Targets
    /// never share a batch with each other or the reference, so a frame's result does not depend
    /// on which frames it was rendered with. Output: all images, reference first.
    pub fn style_aligned(
        &self,
        settings: &GenerationSettings,
        options: &StyleAlignedOptions,
        reference: &ReferenceInput,
        targets: &[FrameInput],
        progress: ProgressFn,
    ) -> Result<Denoised> {
        settings.validate()?;
        let features = ReferenceFeatures::new();
        let base = StyleAligned::new(options.clone(), &self.unet)?;
        let capture = base.with_role(StyleRole::CaptureReference(features.clone()));
        let apply = base.with_role(StyleRole::Targets(features));
        let (ref_start, replay) = reference_start(&reference.latents)?;
        let mut ref_latents = self.stack_latents(std::iter::once(&ref_start), settings)?;
        let mut latents = self.stack_latents(targets.iter().map(|f| &f.init_latents), settings)?;
        if let Some((trajectory, offset)) = replay {
            check_trajectory(trajectory, settings.steps, offset, &ref_latents)?;
        }
        let guidance = settings.uses_guidance();
        let (ref_cond, ref_uncond) = self.encode_frames(std::iter::once((
            reference.prompt.as_str(),
            reference.negative_prompt.as_deref(),
        )))?;
        let ref_conditioning =
            self.batch_conditioning(&ref_cond, &ref_uncond, settings, guidance)?;
        let (cond, uncond) = self.encode_frames(
            targets
                .iter()
                .map(|f| (f.prompt.as_str(), f.negative_prompt.as_deref())),
        )?;
        let conditioning = self.batch_conditioning(&cond, &uncond, settings, guidance)?;
        let scheduler = DdimScheduler::new(&self.scheduler, settings.steps)?;
        let images = targets.len();
        let mut per_step = Vec::with_capacity(settings.steps);
        let mut first = None;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            progress(Progress::Denoise {
                step: i,
                steps: settings.steps,
            })?;
            let _span =
                tracing::debug_span!("style_aligned_step", step = i, timestep = t).entered();
            let step = |layout| StepContext {
                step: i,
                steps: settings.steps,
                timestep: t as u32,
                layout,
            };
            let ref_eps = self.guided_eps(
                &ref_latents,
                t,
                &ref_conditioning,
                settings,
                ForwardContext {
                    step: step(BatchLayout {
                        images: 1,
                        guidance,
                    }),
                    hooks: Hooks {
                        attention: Some(&capture),
                        norm: Some(&capture),
                        ..Hooks::none()
                    },
                },
            )?;
            let (eps, raw) = self.guided_eps_raw(
                &latents,
                t,
                &conditioning,
                settings,
                ForwardContext {
                    step: step(BatchLayout { images, guidance }),
                    hooks: Hooks {
                        attention: Some(&apply),
                        norm: Some(&apply),
                        ..Hooks::none()
                    },
                },
            )?;
            if first.is_none() {
                first = Some(raw);
            }
            latents = scheduler.step(&eps, t, &latents)?;
            ref_latents = match replay {
                Some((trajectory, offset)) => {
                    trajectory.get((offset + 1).max(i + 1))?.unsqueeze(0)?
                }
                None => scheduler.step(&ref_eps, t, &ref_latents)?,
            };
            per_step.push(Tensor::cat(&[&ref_latents, &latents], 0)?);
        }
        progress(Progress::Denoise {
            step: settings.steps,
            steps: settings.steps,
        })?;
        Ok(Denoised {
            final_latents: Tensor::cat(&[&ref_latents, &latents], 0)?,
            latents_per_step: per_step,
            first_unet_output: first
                .ok_or_else(|| DiffusionError::invalid_argument("steps", "no step ran"))?,
        })
    }

    fn guided_eps(
        &self,
        latents: &Tensor,
        t: usize,
        conditioning: &BatchConditioning,
        settings: &GenerationSettings,
        ctx: ForwardContext,
    ) -> Result<Tensor> {
        Ok(self
            .guided_eps_raw(latents, t, conditioning, settings, ctx)?
            .0)
    }

    /// One UNet call over `latents` (doubled under guidance): guided noise and the raw output.
    pub(crate) fn guided_eps_raw(
        &self,
        latents: &Tensor,
        t: usize,
        conditioning: &BatchConditioning,
        settings: &GenerationSettings,
        ctx: ForwardContext,
    ) -> Result<(Tensor, Tensor)> {
        let images = latents.dim(0)?;
        let guidance = settings.uses_guidance();
        let cond = UNetConditioning {
            context: &conditioning.context,
            added: conditioning.added.as_ref().map(|(a, b)| (a, b)),
        };
        let input = if guidance {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let out = self.unet.forward(&input, t as f64, &cond, &ctx)?;
        let eps = if guidance {
            let uncond = out.narrow(0, 0, images)?;
            let condi = out.narrow(0, images, images)?;
            (&uncond + ((condi - &uncond)? * settings.guidance_scale)?)?
        } else {
            out.clone()
        };
        Ok((eps, out))
    }

    /// The trajectory a generated reference follows (`[N+1, 4, h, w]`, entering-step order, to
    /// replay with offset 0): what it would do inside any StyleAligned batch, computed alone.
    pub fn reference_trajectory(
        &self,
        settings: &GenerationSettings,
        prompt: &str,
        negative_prompt: Option<&str>,
        init_latents: &Tensor,
        progress: ProgressFn,
    ) -> Result<Tensor> {
        let frame = FrameInput {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.map(str::to_string),
            init_latents: init_latents.clone(),
        };
        let run = self.txt2img(settings, std::slice::from_ref(&frame), progress)?;
        let mut rows = vec![init_latents.to_dtype(self.dtype)?.to_device(&self.device)?];
        rows.extend(run.latents_per_step);
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// DDIM inversion of `image` `[1, 3, H, W]` (official StyleAligned `ddim_inversion`). With
    /// guidance above 1 the unconditional branch uses the encoding of "" as the official code does.
    pub fn invert(
        &self,
        image: &Tensor,
        prompt: &str,
        steps: usize,
        guidance_scale: f64,
        progress: ProgressFn,
    ) -> Result<Inversion> {
        let (_, channels, height, width) = image.dims4()?;
        if channels != 3 {
            return Err(DiffusionError::invalid_argument(
                "image",
                format!("expected 3 channels, got {channels}"),
            ));
        }
        let settings = GenerationSettings {
            height,
            width,
            steps,
            guidance_scale,
        };
        settings.validate()?;
        let scheduler = DdimScheduler::new(&self.scheduler, steps)?;
        let z0 = self.encode_image(image)?;
        let guidance = settings.uses_guidance();
        let cond = vec![self.text.encode(prompt)?];
        let uncond = vec![self.text.encode("")?];
        let conditioning = self.batch_conditioning(&cond, &uncond, &settings, guidance)?;
        let unet_cond = UNetConditioning {
            context: &conditioning.context,
            added: conditioning.added.as_ref().map(|(a, b)| (a, b)),
        };
        let layout = BatchLayout {
            images: 1,
            guidance,
        };
        let mut z = z0.clone();
        let mut forward = vec![z0.clone()];
        let mut all_eps = Vec::with_capacity(steps);
        let timesteps = scheduler.timesteps().to_vec();
        for i in 0..steps {
            progress(Progress::Invert { step: i, steps })?;
            let t = timesteps[steps - 1 - i];
            let input = if guidance {
                Tensor::cat(&[&z, &z], 0)?
            } else {
                z.clone()
            };
            let ctx = ForwardContext {
                step: StepContext {
                    step: i,
                    steps,
                    timestep: t as u32,
                    layout,
                },
                hooks: Hooks::none(),
            };
            let out = self.unet.forward(&input, t as f64, &unet_cond, &ctx)?;
            let eps = if guidance {
                let u = out.narrow(0, 0, 1)?;
                let c = out.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * guidance_scale)?)?
            } else {
                out
            };
            z = scheduler.inversion_step(&eps, t, &z)?;
            forward.push(z.clone());
            all_eps.push(eps);
        }
        progress(Progress::Invert { step: steps, steps })?;
        forward.reverse();
        Ok(Inversion {
            z0,
            zts: Tensor::cat(&forward, 0)?,
            eps: Tensor::cat(&all_eps, 0)?,
        })
    }

    pub(crate) fn stack_latents<'a>(
        &self,
        latents: impl Iterator<Item = &'a Tensor>,
        settings: &GenerationSettings,
    ) -> Result<Tensor> {
        let (h, w) = settings.latent_hw();
        let channels = self.unet.config().in_channels;
        let mut rows = Vec::new();
        for (i, l) in latents.enumerate() {
            let l = if l.rank() == 3 {
                l.unsqueeze(0)?
            } else {
                l.clone()
            };
            if l.dims() != [1, channels, h, w] {
                return Err(DiffusionError::invalid_argument(
                    format!("frames[{i}].init_latents"),
                    format!("shape {:?}, expected {:?}", l.dims(), [1, channels, h, w]),
                ));
            }
            rows.push(l.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        if rows.is_empty() {
            return Err(DiffusionError::invalid_argument(
                "frames",
                "no frame to render",
            ));
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// The reference's first latent and, when it replays a trajectory, the trajectory and offset.
fn reference_start(latents: &ReferenceLatents) -> Result<(Tensor, Option<(&Tensor, usize)>)> {
    Ok(match latents {
        ReferenceLatents::Generate(init) => (init.clone(), None),
        ReferenceLatents::Replay { trajectory, offset } => {
            let offset = *offset;
            let steps = trajectory.dim(0)?.saturating_sub(1);
            if offset >= steps.max(1) {
                return Err(DiffusionError::invalid_argument(
                    "reference.offset",
                    format!("must be below the step count {steps}, got {offset}"),
                ));
            }
            (
                trajectory.get(offset)?.unsqueeze(0)?,
                Some((trajectory, offset)),
            )
        }
    })
}

fn check_trajectory(
    trajectory: &Tensor,
    steps: usize,
    offset: usize,
    latents: &Tensor,
) -> Result<()> {
    let dims = trajectory.dims();
    let (_, c, h, w) = latents.dims4()?;
    if dims.len() != 4 || dims[0] != steps + 1 || dims[1..] != [c, h, w] {
        return Err(DiffusionError::invalid_argument(
            "reference.trajectory",
            format!(
                "shape {dims:?}, expected [{}, {c}, {h}, {w}] for {steps} steps",
                steps + 1
            ),
        ));
    }
    if offset >= steps {
        return Err(DiffusionError::invalid_argument(
            "reference.offset",
            format!("must be below the step count {steps}, got {offset}"),
        ));
    }
    Ok(())
}

/// `latents` with row 0 replaced by `reference` (`[4, h, w]`).
fn replace_reference(latents: &Tensor, reference: &Tensor) -> Result<Tensor> {
    let n = latents.dim(0)?;
    let reference = reference.unsqueeze(0)?.to_dtype(latents.dtype())?;
    if n == 1 {
        return Ok(reference);
    }
    Ok(Tensor::cat(
        &[&reference, &latents.narrow(0, 1, n - 1)?],
        0,
    )?)
}
