//! The ConsiStory hook of one UNet call: shares subject tokens in decoder self-attention, blends
//! vanilla queries, injects features, and records what the next step needs (cross-attention maps,
//! queries of a vanilla call, DIFT features). Everything it reads arrives in [`StepInputs`];
//! everything it records is taken out with [`ConsistoryHook::into_record`] after the call.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use crate::attention::{
    AttentionHook, AttentionId, AttentionInputs, AttentionSite, BlockHook, ExtraKeys, GuidanceHalf,
    Qkv, StepContext,
};
use crate::error::{DiffusionError, Result};

pub use super::maths::{InjectionPlan, TargetInjection};
use super::{maths, AnchorMapping, ConsistoryLevels, ConsistoryOptions};

/// Which kind of UNet call the hook serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// The extra plain call of steps 1..=5 whose decoder queries are blended into the main call.
    VanillaQueries,
    /// The call whose noise prediction is used.
    Main,
}

/// What one UNet call of a ConsiStory pass is given.
#[derive(Default)]
pub struct StepInputs<'a> {
    /// Subject masks after dropout, per level: `[images, N]` f32 0/1 on the model's device.
    /// `None` at step 0 (no masks yet): no sharing.
    pub keep: Option<&'a HashMap<usize, Tensor>>,
    /// Queries `[2B, N, C]` of the vanilla call of this step, per decoder layer.
    pub vanilla_queries: Option<&'a HashMap<AttentionId, Tensor>>,
    /// The injection plan of this pass (pass 2), if any.
    pub injection: Option<&'a InjectionPlan>,
    /// Record DIFT features in this call.
    pub read_dift: bool,
}

/// What a call recorded.
#[derive(Default)]
pub struct CallRecord {
    /// Sum over the recorded cross-attention layers of the head-mean probabilities of each
    /// concept's token, `[images][concepts][N]` (zeros where a concept is absent), and how many
    /// layers were summed.
    pub token_maps: Option<(Vec<Vec<Vec<f64>>>, usize)>,
    pub queries: HashMap<AttentionId, Tensor>,
    /// `[images, C, H, W]`, the conditional half of the DIFT block's output.
    pub dift: Option<Tensor>,
}

pub struct ConsistoryHook<'a> {
    options: &'a ConsistoryOptions,
    levels: &'a ConsistoryLevels,
    mapping: &'a AnchorMapping,
    /// `[concept][image]`: the position of the concept's first token in the image's prompt.
    tokens: &'a [Vec<Option<usize>>],
    call: CallKind,
    inputs: StepInputs<'a>,
    record: Mutex<CallRecord>,
}

impl<'a> ConsistoryHook<'a> {
    pub fn new(
        options: &'a ConsistoryOptions,
        levels: &'a ConsistoryLevels,
        mapping: &'a AnchorMapping,
        tokens: &'a [Vec<Option<usize>>],
        call: CallKind,
        inputs: StepInputs<'a>,
    ) -> Self {
        Self {
            options,
            levels,
            mapping,
            tokens,
            call,
            inputs,
            record: Mutex::new(CallRecord::default()),
        }
    }

    pub fn into_record(self) -> CallRecord {
        self.record.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CallRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sdsa_active(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        self.levels.is_sdsa_layer(&site.id)
            && ctx.step >= self.options.sdsa_first_step
            && self
                .inputs
                .keep
                .is_some_and(|k| k.contains_key(&site.id.level))
    }

    fn injection_active(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        self.inputs.injection.is_some()
            && self.levels.is_injection_layer(&site.id)
            && self.options.injects_at(ctx.step, ctx.steps)
    }

    fn halves(ctx: &StepContext) -> &'static [GuidanceHalf] {
        if ctx.layout.guidance {
            &[GuidanceHalf::Unconditional, GuidanceHalf::Conditional]
        } else {
            &[GuidanceHalf::Conditional]
        }
    }

    fn shared_attention(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        qkv: Qkv,
    ) -> Result<AttentionInputs> {
        let images = ctx.layout.images;
        if images != self.mapping.images() {
            return Err(DiffusionError::invalid_argument(
                "images",
                format!(
                    "the UNet batch holds {images} images, the anchor mapping {}",
                    self.mapping.images()
                ),
            ));
        }
        let keep = self
            .inputs
            .keep
            .and_then(|k| k.get(&site.id.level))
            .ok_or_else(|| {
                DiffusionError::invalid_argument(
                    "masks",
                    format!("none at level {}", site.id.level),
                )
            })?;
        let Qkv { q, k, v, heads } = qkv;
        let q = match (
            self.options.query_blend_weight(ctx.step, ctx.steps),
            self.inputs.vanilla_queries.and_then(|m| m.get(&site.id)),
        ) {
            (Some(weight), Some(vanilla)) => {
                // torch multiplies an f32 tensor by a Python float in f32: both weights are
                // rounded once, `1 - weight` after it was formed in double.
                let (w_vanilla, w_own) = (weight as f32, (1.0 - weight) as f32);
                let vanilla = vanilla.to_dtype(q.dtype())?;
                if (0..images).all(|i| self.mapping.has_sources(i)) {
                    ((vanilla * w_vanilla as f64)? + (q * w_own as f64)?)?
                } else {
                    // An image that shares with nobody renders as it would alone: no blending.
                    let per_item = |shared: f32, alone: f32| -> Result<Tensor> {
                        let w: Vec<f32> = (0..ctx.layout.batch_size())
                            .map(|item| {
                                if self.mapping.has_sources(ctx.layout.image_of(item)) {
                                    shared
                                } else {
                                    alone
                                }
                            })
                            .collect();
                        Ok(
                            Tensor::from_vec(w, (ctx.layout.batch_size(), 1, 1), q.device())?
                                .to_dtype(q.dtype())?,
                        )
                    };
                    (vanilla.broadcast_mul(&per_item(w_vanilla, 0.0)?)?
                        + q.broadcast_mul(&per_item(w_own, 1.0)?)?)?
                }
            }
            _ => q,
        };
        let mut extra = Vec::new();
        for source in 0..images {
            let mask = keep.narrow(0, source, 1)?;
            for &half in Self::halves(ctx) {
                let items: Vec<usize> = (0..images)
                    .filter(|&i| i != source && self.mapping.sees(i, source))
                    .map(|i| ctx.layout.item(half, i))
                    .collect();
                if items.is_empty() {
                    continue;
                }
                let row = ctx.layout.item(half, source);
                let n = items.len();
                extra.push(ExtraKeys {
                    items,
                    keys: k.narrow(0, row, 1)?.repeat((n, 1, 1))?,
                    values: v.narrow(0, row, 1)?.repeat((n, 1, 1))?,
                    logit_bias: 0.0,
                    key_mask: Some(mask.repeat((n, 1))?),
                });
            }
        }
        Ok(AttentionInputs {
            qkv: Qkv { q, k, v, heads },
            extra,
        })
    }

    fn inject(&self, ctx: &StepContext, out: Tensor) -> Result<Tensor> {
        let Some(plan) = self
            .inputs
            .injection
            .filter(|p| p.targets.iter().any(Option::is_some))
        else {
            return Ok(out);
        };
        let images = ctx.layout.images;
        let start = ctx.layout.item(GuidanceHalf::Conditional, 0);
        let (_, tokens, channels) = out.dims3()?;
        let dtype = out.dtype();
        let cond = out.narrow(0, start, images)?;
        let mut values = cond.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        maths::apply_injection(plan, &mut values, channels, self.options.injection_alpha)?;
        let cond =
            Tensor::from_vec(values, (images, tokens, channels), out.device())?.to_dtype(dtype)?;
        if start == 0 {
            return Ok(cond);
        }
        Ok(Tensor::cat(&[&out.narrow(0, 0, start)?, &cond], 0)?)
    }
}

impl AttentionHook for ConsistoryHook<'_> {
    fn applies_to(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        match self.call {
            CallKind::VanillaQueries => self.levels.is_sdsa_layer(&site.id),
            CallKind::Main => {
                self.levels.is_mask_layer(&site.id)
                    || self.sdsa_active(site, ctx)
                    || self.injection_active(site, ctx)
            }
        }
    }

    fn prepare(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        qkv: Qkv,
    ) -> Result<AttentionInputs> {
        match self.call {
            CallKind::VanillaQueries => {
                self.lock().queries.insert(site.id, qkv.q.clone());
                Ok(AttentionInputs {
                    qkv,
                    extra: Vec::new(),
                })
            }
            CallKind::Main if self.sdsa_active(site, ctx) => self.shared_attention(site, ctx, qkv),
            CallKind::Main => Ok(AttentionInputs {
                qkv,
                extra: Vec::new(),
            }),
        }
    }

    fn wants_probabilities(&self, site: &AttentionSite, _ctx: &StepContext) -> bool {
        self.call == CallKind::Main && self.levels.is_mask_layer(&site.id)
    }

    fn observe_probabilities(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        probabilities: &Tensor,
    ) -> Result<()> {
        let images = ctx.layout.images;
        let start = ctx.layout.item(GuidanceHalf::Conditional, 0);
        // [B, N, 77]: conditional half, mean over heads (the official AttentionStore's map).
        let maps = probabilities
            .narrow(0, start, images)?
            .to_dtype(DType::F32)?
            .mean(1)?;
        let (_, tokens, width) = maps.dims3()?;
        if tokens != site.tokens() {
            return Err(DiffusionError::invalid_argument(
                "probabilities",
                format!("{tokens} queries at {}", site.id),
            ));
        }
        let values = maps.flatten_all()?.to_vec1::<f32>()?;
        let mut record = self.lock();
        let (sums, layers) = record
            .token_maps
            .get_or_insert_with(|| (vec![vec![vec![0.0; tokens]; self.tokens.len()]; images], 0));
        for (image, per_concept) in sums.iter_mut().enumerate() {
            for (concept, sum) in per_concept.iter_mut().enumerate() {
                let Some(column) = self.tokens[concept].get(image).copied().flatten() else {
                    continue;
                };
                let base = image * tokens * width;
                for (p, s) in sum.iter_mut().enumerate() {
                    *s += values[base + p * width + column] as f64;
                }
            }
        }
        *layers += 1;
        Ok(())
    }

    fn finish(&self, site: &AttentionSite, ctx: &StepContext, out: Tensor) -> Result<Tensor> {
        if self.call == CallKind::Main && self.injection_active(site, ctx) {
            return self.inject(ctx, out);
        }
        Ok(out)
    }
}

impl BlockHook for ConsistoryHook<'_> {
    fn wants_up_block(&self, index: usize, _ctx: &StepContext) -> bool {
        self.call == CallKind::Main && self.inputs.read_dift && index == self.levels.dift_up_block
    }

    fn observe_up_block(&self, index: usize, ctx: &StepContext, output: &Tensor) -> Result<()> {
        let start = ctx.layout.item(GuidanceHalf::Conditional, 0);
        let mut dift = output
            .narrow(0, start, ctx.layout.images)?
            .to_dtype(DType::F32)?;
        // Official quirk: the UNet stores this tensor by reference, and diffusers' FreeU then
        // scales the first half of its channels in place as the next up block's first input. So
        // the official features are read after that scaling (b2 when the next block is block 1).
        if let (Some(freeu), true) = (self.options.freeu, index + 1 == 1) {
            let channels = dift.dim(1)?;
            let half = channels / 2;
            let scaled = (dift.narrow(1, 0, half)? * freeu.b2)?;
            dift = Tensor::cat(&[&scaled, &dift.narrow(1, half, channels - half)?], 1)?;
        }
        self.lock().dift = Some(dift);
        Ok(())
    }
}
