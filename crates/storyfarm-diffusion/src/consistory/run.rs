//! ConsiStory runs over a loaded model: one set of images rendered in two passes (pass 1 finds
//! subject masks and DIFT correspondences, pass 2 renders again from the same noise with feature
//! injection), in the official batch layout or in anchor mode (anchors, then frames that see the
//! anchors only). Per step it makes the next step's masks from the last `mask_window` steps of
//! cross-attention, draws mask dropout, and runs the vanilla-query call where blending needs it.

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Tensor};

use super::hook::{CallKind, CallRecord, ConsistoryHook, StepInputs};
use super::maths::{self, DropoutSource};
use super::maths::{InjectionPlan, NnMaps};
use super::{AnchorMapping, ConsistoryLevels, ConsistoryOptions};
use crate::attention::{
    AttentionHook, BatchLayout, ChainedHooks, ForwardContext, Hooks, NormHook, StepContext,
};
use crate::error::{DiffusionError, Result};
use crate::pipeline::{
    FrameInput, GenerationSettings, Progress, ProgressFn, ReferenceInput, ReferenceLatents,
    StableDiffusion,
};
use crate::scheduler::DdimScheduler;
use crate::style_aligned::{ReferenceFeatures, StyleAligned, StyleAlignedOptions, StyleRole};

/// Where mask-dropout draws come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropoutDraws {
    /// `torch.rand` on the CPU after `torch.manual_seed(seed)` at the start of every pass: the
    /// official run's draws (MT19937, METHOD.md §2), for parity. One stream for every group.
    TorchCpu { seed: u64 },
    /// The project's seeded generator, one stream per dropout group (a character's anchors), each
    /// restarted at every pass so both passes draw the same.
    Seeded { seeds: Vec<u64> },
}

impl DropoutDraws {
    /// One source per dropout group (the same source for all under torch's single stream).
    fn sources(&self, groups: usize) -> Result<Vec<Box<dyn DropoutSource>>> {
        match self {
            Self::TorchCpu { seed } => Ok(vec![Box::new(maths::TorchCpuRand::new(*seed))]),
            Self::Seeded { seeds } if seeds.len() == groups => Ok(seeds
                .iter()
                .map(|&s| Box::new(maths::SeededUniform::new(s)) as Box<dyn DropoutSource>)
                .collect()),
            Self::Seeded { seeds } => Err(DiffusionError::invalid_argument(
                "dropout",
                format!("{} seeds for {groups} dropout groups", seeds.len()),
            )),
        }
    }
}

/// A set of images rendered together, in batch order.
pub struct ConsistorySet<'a> {
    pub frames: &'a [FrameInput],
    /// The words whose first token's cross-attention makes the subject mask; an image whose prompt
    /// lacks a word ignores it.
    pub subject_words: &'a [String],
    pub mapping: AnchorMapping,
    pub dropout: DropoutDraws,
    /// Images that follow a stored trajectory `[steps + 1, 4, h, w]` instead of denoising
    /// themselves (a character drawn or photographed by the user: its DDIM inversion, replayed as
    /// an anchor). Such an image starts at `zts[0]` and is reset to `zts[i + 1]` after step `i`; its
    /// cross-attention still makes its masks and its tokens are still shared.
    pub replays: &'a [(usize, Tensor)],
    /// A style for the whole set (StyleAligned toward a reference that never sees the set).
    pub style: Option<SetStyle<'a>>,
}

/// Style and characters in one render: every image of the set is a StyleAligned target of the
/// reference (AdaIN of its queries and keys toward the reference's, the reference's keys and values
/// as an extra block, GroupNorm statistics pooled with the reference), and ConsiStory then blends
/// the styled queries and adds the mapped images' masked styled tokens. The reference runs alone
/// each step, without FreeU, exactly as for plain StyleAligned frames, so its stored trajectory
/// serves both.
#[derive(Clone, Copy)]
pub struct SetStyle<'a> {
    pub options: &'a StyleAlignedOptions,
    pub reference: &'a ReferenceInput,
}

/// Subject masks and their Otsu thresholds at one level, `[image][patch]` and `[image][concept]`.
#[derive(Clone, Debug, Default)]
pub struct LevelMasks {
    pub height: usize,
    pub width: usize,
    pub subject: Vec<Vec<bool>>,
    pub thresholds: Vec<Vec<Option<f32>>>,
}

/// What one pass did, step by step (kept for golden checks and reports; small next to latents).
#[derive(Default)]
pub struct PassTrace {
    /// `[images, 4, h, w]` after each step.
    pub latents: Vec<Tensor>,
    /// Masks made at the end of each step, per level.
    pub masks: Vec<HashMap<usize, LevelMasks>>,
    /// Averaged concept maps at the mask level at the end of each step, `[image][concept][patch]`.
    pub token_maps: Vec<Vec<Vec<Vec<f32>>>>,
    /// Raw DIFT features `[images, C, H, W]` (conditional half), pass 1 only.
    pub dift: Option<Tensor>,
    pub unet_calls: usize,
    pub vanilla_calls: usize,
}

impl PassTrace {
    pub fn final_masks(&self, level: usize) -> Option<&LevelMasks> {
        self.masks.last().and_then(|m| m.get(&level))
    }
}

/// Correspondences found after pass 1.
pub struct Correspondence {
    /// DIFT features smoothed by the 3x3 Gaussian, `[images][C * H * W]`, and their shape.
    pub dift_smoothed: Vec<Vec<f32>>,
    pub dift_shape: (usize, usize, usize),
    /// `nn[(i, j)]`: for target `i` and source `j`, nearest source patch and its distance per
    /// target patch, at the injection level.
    pub nn: NnMaps,
    pub injection: InjectionPlan,
}

pub struct ConsistoryOutput {
    /// Pass-2 latents after the last step, `[images, 4, h, w]`.
    pub final_latents: Tensor,
    pub pass1: PassTrace,
    pub pass2: PassTrace,
    pub correspondence: Correspondence,
}

/// `[concept][image]` position of each subject word's first token in each prompt, as the official
/// `create_token_indices` finds it (tokenizer 1; the last occurrence when a word repeats, as the
/// official indexed assignment leaves it; `None` when absent).
pub fn token_indices(
    sd: &StableDiffusion,
    prompts: &[&str],
    words: &[String],
) -> Result<Vec<Vec<Option<usize>>>> {
    let tokenizer = sd.text.primary_tokenizer();
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<_>>()?;
    words
        .iter()
        .map(|word| {
            let ids = tokenizer.encode(word)?;
            // encode() adds BOS first: the word's first BPE token is at 1.
            let first = *ids
                .get(1)
                .filter(|&&id| id != tokenizer.eos_id())
                .ok_or_else(|| {
                    DiffusionError::invalid_argument(
                        "subject_words",
                        format!("`{word}` has no tokens"),
                    )
                })?;
            Ok(encoded
                .iter()
                .map(|ids| ids.iter().rposition(|&id| id == first))
                .collect())
        })
        .collect()
}

/// `latents` with each replayed image set to its trajectory's entry `index`.
fn replay_into(latents: &Tensor, replays: &[(usize, Tensor)], index: usize) -> Result<Tensor> {
    if replays.is_empty() {
        return Ok(latents.clone());
    }
    let mut rows: Vec<Tensor> = (0..latents.dim(0)?)
        .map(|i| latents.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    for (image, trajectory) in replays {
        rows[*image] = trajectory
            .narrow(0, index, 1)?
            .to_dtype(latents.dtype())?
            .to_device(latents.device())?;
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Side of level `level` for a latent side: each downsampler (3x3, stride 2, padding 1) rounds up.
fn level_side(mut side: usize, level: usize) -> usize {
    for _ in 0..level {
        side = side.div_ceil(2);
    }
    side
}

struct PassPlan<'a> {
    injection: Option<&'a InjectionPlan>,
    read_dift: bool,
}

impl StableDiffusion {
    /// ConsiStory over one set: pass 1, correspondences, pass 2 (official `run_batch_generation`,
    /// or with [`AnchorMapping::anchors_then_frames`] the anchor run and its extra frames at once).
    pub fn consistory(
        &self,
        settings: &GenerationSettings,
        options: &ConsistoryOptions,
        set: &ConsistorySet,
        progress: ProgressFn,
    ) -> Result<ConsistoryOutput> {
        settings.validate()?;
        options.validate()?;
        if set.frames.len() != set.mapping.images() {
            return Err(DiffusionError::invalid_argument(
                "frames",
                format!(
                    "{} frames for an anchor mapping of {} images",
                    set.frames.len(),
                    set.mapping.images()
                ),
            ));
        }
        if set.subject_words.is_empty() {
            return Err(DiffusionError::invalid_argument(
                "subject_words",
                "at least one word is needed",
            ));
        }
        let levels = ConsistoryLevels::for_unet(&self.unet)?;
        let prompts: Vec<&str> = set.frames.iter().map(|f| f.prompt.as_str()).collect();
        let tokens = token_indices(self, &prompts, set.subject_words)?;
        for (image, trajectory) in set.replays {
            let frame = set.frames.get(*image).ok_or_else(|| {
                DiffusionError::invalid_argument(
                    "replays",
                    format!("image {image} of a set of {}", set.frames.len()),
                )
            })?;
            let (_, c, h, w) = frame.init_latents.dims4()?;
            if trajectory.dims() != [settings.steps + 1, c, h, w] {
                return Err(DiffusionError::invalid_argument(
                    "replays",
                    format!(
                        "image {image}: trajectory {:?}, expected [{}, {c}, {h}, {w}]",
                        trajectory.dims(),
                        settings.steps + 1
                    ),
                ));
            }
        }
        let mut latents =
            self.stack_latents(set.frames.iter().map(|f| &f.init_latents), settings)?;
        latents = replay_into(&latents, set.replays, 0)?;
        let (cond, uncond) = self.encode_frames(
            set.frames
                .iter()
                .map(|f| (f.prompt.as_str(), f.negative_prompt.as_deref())),
        )?;
        let conditioning =
            self.batch_conditioning(&cond, &uncond, settings, settings.uses_guidance())?;
        let style = match &set.style {
            Some(style) => Some(self.style_state(settings, style, &latents)?),
            None => None,
        };
        let run = PassRunner {
            sd: self,
            settings,
            options,
            levels: &levels,
            set,
            tokens: &tokens,
            conditioning: &conditioning,
            style,
        };
        let passes = if options.feature_injection { 2 } else { 1 };
        let total = passes * settings.steps;
        let mut pass_progress = |offset: usize, p: Progress| match p {
            Progress::Denoise { step, .. } => progress(Progress::Denoise {
                step: offset + step,
                steps: total,
            }),
            other => progress(other),
        };
        let pass1 = run.pass(
            &latents,
            PassPlan {
                injection: None,
                read_dift: true,
            },
            &mut |p| pass_progress(0, p),
        )?;
        let correspondence = correspondence(&pass1, &levels, &set.mapping)?;
        if !options.feature_injection {
            let final_latents = pass1
                .latents
                .last()
                .cloned()
                .ok_or_else(|| DiffusionError::invalid_argument("steps", "no step ran"))?;
            return Ok(ConsistoryOutput {
                final_latents,
                pass1,
                pass2: PassTrace::default(),
                correspondence,
            });
        }
        let pass2 = run.pass(
            &latents,
            PassPlan {
                injection: Some(&correspondence.injection),
                read_dift: false,
            },
            &mut |p| pass_progress(settings.steps, p),
        )?;
        let final_latents = pass2
            .latents
            .last()
            .cloned()
            .ok_or_else(|| DiffusionError::invalid_argument("steps", "no step ran"))?;
        Ok(ConsistoryOutput {
            final_latents,
            pass1,
            pass2,
            correspondence,
        })
    }
}

impl StableDiffusion {
    fn style_state(
        &self,
        settings: &GenerationSettings,
        style: &SetStyle,
        latents: &Tensor,
    ) -> Result<StyleState> {
        let features = ReferenceFeatures::new();
        let base = StyleAligned::new(style.options.clone(), &self.unet)?;
        let reference = style.reference;
        let (start, replay) = match &reference.latents {
            ReferenceLatents::Generate(init) => (init.clone(), None),
            ReferenceLatents::Replay { trajectory, offset } => {
                let (_, c, h, w) = latents.dims4()?;
                if trajectory.dims() != [settings.steps + 1, c, h, w] || *offset >= settings.steps {
                    return Err(DiffusionError::invalid_argument(
                        "style.reference",
                        format!(
                            "trajectory {:?} with offset {offset} for {} steps of [{c}, {h}, {w}]",
                            trajectory.dims(),
                            settings.steps
                        ),
                    ));
                }
                (
                    trajectory.get(*offset)?.unsqueeze(0)?,
                    Some((trajectory.clone(), *offset)),
                )
            }
        };
        let start = self.stack_latents(std::iter::once(&start), settings)?;
        let (cond, uncond) = self.encode_frames(std::iter::once((
            reference.prompt.as_str(),
            reference.negative_prompt.as_deref(),
        )))?;
        let conditioning =
            self.batch_conditioning(&cond, &uncond, settings, settings.uses_guidance())?;
        Ok(StyleState {
            capture: base.with_role(StyleRole::CaptureReference(features.clone())),
            apply: base.with_role(StyleRole::Targets(features)),
            conditioning,
            start,
            replay,
        })
    }
}

struct PassRunner<'a> {
    sd: &'a StableDiffusion,
    settings: &'a GenerationSettings,
    options: &'a ConsistoryOptions,
    levels: &'a ConsistoryLevels,
    set: &'a ConsistorySet<'a>,
    tokens: &'a [Vec<Option<usize>>],
    conditioning: &'a crate::pipeline::BatchConditioning,
    style: Option<StyleState>,
}

/// The reference of a styled set: its hooks (capture, apply), conditioning and where it starts.
struct StyleState {
    capture: StyleAligned,
    apply: StyleAligned,
    conditioning: crate::pipeline::BatchConditioning,
    start: Tensor,
    replay: Option<(Tensor, usize)>,
}

impl PassRunner<'_> {
    fn pass(&self, init: &Tensor, plan: PassPlan, progress: ProgressFn) -> Result<PassTrace> {
        let settings = self.settings;
        let options = self.options;
        let scheduler = DdimScheduler::new(&self.sd.scheduler, settings.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let images = self.set.mapping.images();
        let layout = BatchLayout {
            images,
            guidance: settings.uses_guidance(),
        };
        let dift_step = timesteps
            .iter()
            .enumerate()
            .min_by_key(|(_, &t)| t.abs_diff(options.dift_timestep))
            .map(|(i, _)| i);
        let (lh, lw) = settings.latent_hw();
        let mut dropout = self
            .set
            .dropout
            .sources(self.set.mapping.dropout_groups.len())?;
        let mut window: VecDeque<(Vec<Vec<Vec<f64>>>, usize)> =
            VecDeque::with_capacity(options.mask_window);
        let mut keep: Option<HashMap<usize, Tensor>> = None;
        let mut latents = init.clone();
        let mut reference = self.style.as_ref().map(|s| s.start.clone());
        let mut trace = PassTrace::default();
        for (step, &t) in timesteps.iter().enumerate() {
            progress(Progress::Denoise {
                step,
                steps: settings.steps,
            })?;
            let _span = tracing::debug_span!("consistory_step", step, timestep = t).entered();
            let step_ctx = StepContext {
                step,
                steps: settings.steps,
                timestep: t as u32,
                layout,
            };
            if let (Some(style), Some(ref_latents)) = (&self.style, reference.as_mut()) {
                let hooks = Hooks {
                    attention: Some(&style.capture),
                    norm: Some(&style.capture),
                    ..Hooks::none()
                };
                let ctx = ForwardContext {
                    step: StepContext {
                        layout: BatchLayout {
                            images: 1,
                            ..layout
                        },
                        ..step_ctx
                    },
                    hooks,
                };
                let (ref_eps, _) =
                    self.sd
                        .guided_eps_raw(ref_latents, t, &style.conditioning, settings, ctx)?;
                *ref_latents = match &style.replay {
                    Some((trajectory, offset)) => {
                        trajectory.get((offset + 1).max(step + 1))?.unsqueeze(0)?
                    }
                    None => scheduler.step(&ref_eps, t, ref_latents)?,
                };
            }
            let style_attention = self.style.as_ref().map(|s| &s.apply as &dyn AttentionHook);
            let style_norm = self.style.as_ref().map(|s| &s.apply as &dyn NormHook);
            let sharing = keep.is_some() && step >= options.sdsa_first_step;
            let vanilla = if sharing && options.query_blend_weight(step, settings.steps).is_some() {
                let hook = ConsistoryHook::new(
                    options,
                    self.levels,
                    &self.set.mapping,
                    self.tokens,
                    CallKind::VanillaQueries,
                    StepInputs::default(),
                );
                let chained = style_attention.map(|first| ChainedHooks {
                    first,
                    second: &hook,
                });
                let hooks = Hooks {
                    attention: Some(chained.as_ref().map_or(&hook as &dyn AttentionHook, |c| c)),
                    norm: style_norm,
                    freeu: options.freeu,
                    ..Hooks::none()
                };
                self.sd.guided_eps_raw(
                    &latents,
                    t,
                    self.conditioning,
                    settings,
                    ForwardContext {
                        step: step_ctx,
                        hooks,
                    },
                )?;
                trace.vanilla_calls += 1;
                Some(hook.into_record().queries)
            } else {
                None
            };
            let hook = ConsistoryHook::new(
                options,
                self.levels,
                &self.set.mapping,
                self.tokens,
                CallKind::Main,
                StepInputs {
                    keep: keep.as_ref(),
                    vanilla_queries: vanilla.as_ref(),
                    injection: plan.injection,
                    read_dift: plan.read_dift && Some(step) == dift_step,
                },
            );
            let chained = style_attention.map(|first| ChainedHooks {
                first,
                second: &hook,
            });
            let hooks = Hooks {
                attention: Some(chained.as_ref().map_or(&hook as &dyn AttentionHook, |c| c)),
                norm: style_norm,
                blocks: Some(&hook),
                freeu: options.freeu,
            };
            let (eps, _) = self.sd.guided_eps_raw(
                &latents,
                t,
                self.conditioning,
                settings,
                ForwardContext {
                    step: step_ctx,
                    hooks,
                },
            )?;
            trace.unet_calls += 1;
            latents = replay_into(
                &scheduler.step(&eps, t, &latents)?,
                self.set.replays,
                step + 1,
            )?;
            trace.latents.push(latents.clone());
            let CallRecord {
                token_maps, dift, ..
            } = hook.into_record();
            if dift.is_some() {
                trace.dift = dift;
            }
            let maps = token_maps.ok_or_else(|| {
                DiffusionError::invalid_argument(
                    "model",
                    "no cross-attention layer at the mask level ran",
                )
            })?;
            if window.len() == options.mask_window {
                window.pop_front();
            }
            window.push_back(maps);
            let averaged = average_maps(&window);
            let (masks, kept) =
                self.masks_of_step(&averaged, (lh, lw), &mut dropout, init.device())?;
            trace.token_maps.push(averaged);
            trace.masks.push(masks);
            keep = Some(kept);
        }
        progress(Progress::Denoise {
            step: settings.steps,
            steps: settings.steps,
        })?;
        Ok(trace)
    }

    /// Otsu masks at both mask levels (union over the image's present concepts), then dropout:
    /// per level, coarse first, one uniform per patch of each image of each dropout group.
    fn masks_of_step(
        &self,
        maps: &[Vec<Vec<f32>>],
        (lh, lw): (usize, usize),
        dropout: &mut [Box<dyn DropoutSource>],
        device: &candle_core::Device,
    ) -> Result<(HashMap<usize, LevelMasks>, HashMap<usize, Tensor>)> {
        let images = self.set.mapping.images();
        let (mh, mw) = (
            level_side(lh, self.levels.mask),
            level_side(lw, self.levels.mask),
        );
        let mut all = HashMap::new();
        let mut kept = HashMap::new();
        for level in self.levels.mask_levels() {
            let (h, w) = (level_side(lh, level), level_side(lw, level));
            let mut level_masks = LevelMasks {
                height: h,
                width: w,
                ..Default::default()
            };
            for (image, per_concept) in maps.iter().enumerate() {
                let mut union = vec![false; h * w];
                let mut thresholds = Vec::with_capacity(per_concept.len());
                for (concept, map) in per_concept.iter().enumerate() {
                    if self.tokens[concept][image].is_none() {
                        thresholds.push(None);
                        continue;
                    }
                    let resized = if (h, w) == (mh, mw) {
                        map.clone()
                    } else {
                        maths::resize_bilinear(map, mh, mw, h, w)?
                    };
                    let threshold = maths::otsu_threshold(&resized)?;
                    for (u, &v) in union.iter_mut().zip(&resized) {
                        *u |= v > threshold;
                    }
                    thresholds.push(Some(threshold));
                }
                level_masks.subject.push(union);
                level_masks.thresholds.push(thresholds);
            }
            // Per level, each group draws one uniform per patch of its images, in order.
            let mut dropped = vec![false; images * h * w];
            for (g, group) in self.set.mapping.dropout_groups.iter().enumerate() {
                let source = &mut dropout[g.min(dropout.len() - 1)];
                let uniforms = source.draw(group.len() * h * w);
                for (k, u) in uniforms.iter().enumerate() {
                    dropped[group.start * h * w + k] = *u < self.options.mask_dropout;
                }
            }
            let mut flat = Vec::with_capacity(images * h * w);
            for (image, subject) in level_masks.subject.iter().enumerate() {
                for (p, &s) in subject.iter().enumerate() {
                    flat.push(if s && !dropped[image * h * w + p] {
                        1f32
                    } else {
                        0f32
                    });
                }
            }
            let dtype = self.sd.dtype();
            kept.insert(
                level,
                Tensor::from_vec(flat, (images, h * w), device)?.to_dtype(
                    if dtype == DType::F32 {
                        DType::F32
                    } else {
                        dtype
                    },
                )?,
            );
            all.insert(level, level_masks);
        }
        Ok((all, kept))
    }
}

/// Mean over the window's steps and layers (all layers record every step, so this is the
/// official mean over the stacked per-layer, per-step maps).
fn average_maps(window: &VecDeque<(Vec<Vec<Vec<f64>>>, usize)>) -> Vec<Vec<Vec<f32>>> {
    let count: usize = window.iter().map(|(_, layers)| layers).sum();
    let (first, _) = &window[0];
    first
        .iter()
        .enumerate()
        .map(|(image, per_concept)| {
            per_concept
                .iter()
                .enumerate()
                .map(|(concept, map)| {
                    (0..map.len())
                        .map(|p| {
                            let sum: f64 = window.iter().map(|(m, _)| m[image][concept][p]).sum();
                            (sum / count as f64) as f32
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// DIFT smoothing, nearest neighbours at the injection level and the injection plan (METHOD.md
/// §1.5-1.6), from pass 1's features and final masks.
pub fn correspondence(
    pass1: &PassTrace,
    levels: &ConsistoryLevels,
    mapping: &AnchorMapping,
) -> Result<Correspondence> {
    let dift = pass1.dift.as_ref().ok_or_else(|| {
        DiffusionError::invalid_argument("steps", "pass 1 never reached the DIFT timestep")
    })?;
    let masks = pass1
        .final_masks(levels.injection)
        .ok_or_else(|| DiffusionError::invalid_argument("steps", "pass 1 made no masks"))?;
    let (images, c, h, w) = dift.dims4()?;
    let smoothed: Vec<Vec<f32>> = (0..images)
        .map(|i| {
            maths::gaussian_smooth_3x3(&dift.get(i)?.flatten_all()?.to_vec1::<f32>()?, c, h, w, 1.0)
        })
        .collect::<Result<_>>()?;
    let sees = |i: usize, j: usize| mapping.sees(i, j);
    let nn = maths::nn_maps(
        &smoothed,
        &masks.subject,
        c,
        (h, w),
        (masks.height, masks.width),
        sees,
    )?;
    let injection = maths::injection_plan(&nn, &masks.subject, sees)?;
    Ok(Correspondence {
        dift_smoothed: smoothed,
        dift_shape: (c, h, w),
        nn,
        injection,
    })
}
