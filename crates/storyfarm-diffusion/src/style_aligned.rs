//! StyleAligned (google/style-aligned) as hooks on the attention seam: AdaIN of target queries
//! and keys toward the reference, the reference's keys/values shared into every target's
//! self-attention (per guidance half), and GroupNorm statistics pooled with the reference.
//!
//! Image 0 of the batch is the reference. Its own computation is exactly a plain forward pass, so
//! its trajectory never depends on the targets: that is what lets a farm render every frame
//! separately against a stored reference trajectory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::attention::{
    AttentionHook, AttentionId, AttentionInputs, AttentionKind, AttentionSite, BatchLayout,
    ExtraKeys, GuidanceHalf, NormHook, NormId, Qkv, StepContext,
};
use crate::error::{DiffusionError, Result};
use crate::unet::UNet;
use storyfarm_kernels as kernels;

/// The official `StyleAlignedArgs`, with the official defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StyleAlignedOptions {
    pub share_group_norm: bool,
    /// Kept for parity with the official arguments: LayerNorm normalises each token on its own,
    /// so sharing it changes nothing and there is nothing to run.
    pub share_layer_norm: bool,
    pub share_attention: bool,
    pub adain_queries: bool,
    pub adain_keys: bool,
    pub adain_values: bool,
    /// Rejected: it lets the reference attend to the targets, so no frame could be rendered on
    /// its own.
    pub full_attention_share: bool,
    pub shared_score_scale: f32,
    pub shared_score_shift: f32,
    /// Fraction of self-attention layers left unshared (official `_get_switch_vec`).
    pub only_self_level: f64,
}

impl Default for StyleAlignedOptions {
    fn default() -> Self {
        Self {
            share_group_norm: true,
            share_layer_norm: true,
            share_attention: true,
            adain_queries: true,
            adain_keys: true,
            adain_values: false,
            full_attention_share: false,
            shared_score_scale: 1.0,
            shared_score_shift: 0.0,
            only_self_level: 0.0,
        }
    }
}

impl StyleAlignedOptions {
    pub fn validate(&self) -> Result<()> {
        if self.full_attention_share {
            return Err(DiffusionError::invalid_argument(
                "style_aligned.full_attention_share",
                "not supported: it makes the reference depend on the other frames",
            ));
        }
        if !(0.0..=1.0).contains(&self.only_self_level) {
            return Err(DiffusionError::invalid_argument(
                "style_aligned.only_self_level",
                format!("must be within 0..=1, got {}", self.only_self_level),
            ));
        }
        if !self.shared_score_scale.is_finite() || !self.shared_score_shift.is_finite() {
            return Err(DiffusionError::invalid_argument(
                "style_aligned.shared_score_scale",
                "scale and shift must be finite",
            ));
        }
        Ok(())
    }
}

/// Which of `total` self-attention layers are left unshared at `level` (official
/// `_get_switch_vec`; true = plain attention).
pub fn unshared_layers(total: usize, level: f64) -> Vec<bool> {
    if level == 0.0 || total == 0 {
        return vec![false; total];
    }
    if level >= 1.0 {
        return vec![true; total];
    }
    let flip = level > 0.5;
    let level = if flip { 1.0 - level } else { level };
    let switches = (level * total as f64) as usize;
    if switches == 0 {
        return vec![flip; total];
    }
    let period = total / switches;
    (0..total).map(|i| (i % period == 0) != flip).collect()
}

/// What the batch of a StyleAligned forward pass holds.
#[derive(Clone)]
pub enum StyleRole {
    /// Image 0 is the reference, images 1.. the targets (the official layout).
    InBatch,
    /// The batch is the reference alone; its keys, values and statistics are recorded.
    CaptureReference(Arc<ReferenceFeatures>),
    /// The batch holds only targets, styled by features captured from the reference at the
    /// same step: the reference's cost is paid once per step, whatever the number of targets.
    Targets(Arc<ReferenceFeatures>),
}

/// The reference's self-attention keys/values, AdaIN statistics and GroupNorm statistics of one
/// forward pass, per guidance half (row 0 unconditional, row 1 conditional under guidance).
#[derive(Default)]
pub struct ReferenceFeatures {
    attention: Mutex<HashMap<AttentionId, CapturedAttention>>,
    norms: Mutex<HashMap<NormId, (Tensor, Tensor)>>,
}

#[derive(Clone)]
struct CapturedAttention {
    k: Tensor,
    v: Tensor,
    stats: [(Tensor, Tensor); 3],
}

impl ReferenceFeatures {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn captured_layers(&self) -> usize {
        self.attention.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn attention(&self, id: &AttentionId) -> Result<CapturedAttention> {
        self.attention
            .lock()
            .map_err(|_| poisoned())?
            .get(id)
            .cloned()
            .ok_or_else(|| {
                DiffusionError::invalid_argument(
                    "style_aligned.reference",
                    format!("no captured features for {id}"),
                )
            })
    }
}

fn poisoned() -> DiffusionError {
    DiffusionError::invalid_argument(
        "style_aligned.reference",
        "feature store poisoned by a panic",
    )
}

/// The StyleAligned hook set for one UNet.
pub struct StyleAligned {
    options: StyleAlignedOptions,
    shared: HashSet<AttentionId>,
    role: StyleRole,
}

impl StyleAligned {
    pub fn new(options: StyleAlignedOptions, unet: &UNet) -> Result<Self> {
        options.validate()?;
        let self_layers: Vec<AttentionId> = unet
            .attention_ids()
            .into_iter()
            .filter(|id| id.kind == AttentionKind::SelfAttention)
            .collect();
        let unshared = unshared_layers(self_layers.len(), options.only_self_level);
        let shared = self_layers
            .into_iter()
            .zip(unshared)
            .filter(|(_, plain)| !plain)
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            options,
            shared,
            role: StyleRole::InBatch,
        })
    }

    /// The same hook set playing another role.
    pub fn with_role(&self, role: StyleRole) -> Self {
        Self {
            options: self.options.clone(),
            shared: self.shared.clone(),
            role,
        }
    }

    pub fn role(&self) -> &StyleRole {
        &self.role
    }

    pub fn options(&self) -> &StyleAlignedOptions {
        &self.options
    }

    pub fn is_shared(&self, id: &AttentionId) -> bool {
        self.shared.contains(id)
    }

    /// The reference item each batch item takes its style from (`s(i)`).
    fn style_items(layout: &BatchLayout) -> Vec<u32> {
        (0..layout.batch_size())
            .map(|item| layout.item(layout.half_of(item), 0) as u32)
            .collect()
    }

    fn target_items(layout: &BatchLayout) -> Vec<usize> {
        (0..layout.batch_size())
            .filter(|&item| layout.image_of(item) != 0)
            .collect()
    }
}

fn index(values: Vec<u32>, device: &candle_core::Device) -> Result<Tensor> {
    let n = values.len();
    Ok(Tensor::from_vec(values, n, device)?)
}

/// Mean and standard deviation over the tokens of `[B, N, C]` per (item, channel), `[B, 1, C]`
/// (unbiased variance, epsilon 1e-5 added before the square root, as the official
/// `calc_mean_std` computes it per head over `[B, H, N, d]`).
fn mean_std(feat: &Tensor) -> Result<(Tensor, Tensor)> {
    if kernels::supported(&[feat]) {
        return Ok(kernels::token_mean_std(feat, 1e-5)?);
    }
    let n = feat.dim(1)?;
    let mean = feat.mean_keepdim(1)?;
    let var = (feat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?;
    Ok((mean, (var + 1e-5)?.sqrt()?))
}

/// AdaIN of `feat` toward per-item style statistics (`[B, 1, C]` each).
fn adain_toward(feat: &Tensor, style: &(Tensor, Tensor)) -> Result<Tensor> {
    restyle(feat, &mean_std(feat)?, style)
}

/// AdaIN toward the items in `style` of the same batch.
fn adain(feat: &Tensor, style: &Tensor) -> Result<Tensor> {
    let own = mean_std(feat)?;
    let target = (own.0.index_select(style, 0)?, own.1.index_select(style, 0)?);
    restyle(feat, &own, &target)
}

fn restyle(feat: &Tensor, own: &(Tensor, Tensor), target: &(Tensor, Tensor)) -> Result<Tensor> {
    if kernels::supported(&[feat, &own.0, &own.1, &target.0, &target.1]) {
        return Ok(kernels::restyle(
            feat, &own.0, &own.1, &target.0, &target.1,
        )?);
    }
    Ok(feat
        .broadcast_sub(&own.0)?
        .broadcast_div(&own.1)?
        .broadcast_mul(&target.1)?
        .broadcast_add(&target.0)?)
}

/// Rows `rows` of `t` along dim 0; `t` itself when that is all of it in order (the usual
/// single-image batch), so captured features are not copied per layer.
fn select_rows(t: &Tensor, rows: &[u32]) -> Result<Tensor> {
    if t.dim(0)? == rows.len() && rows.iter().enumerate().all(|(i, &r)| r as usize == i) {
        return Ok(t.clone());
    }
    Ok(t.index_select(&index(rows.to_vec(), t.device())?, 0)?)
}

/// For each item of a targets-only batch, the row of the captured reference of its half.
fn reference_rows(layout: &BatchLayout) -> Vec<u32> {
    (0..layout.batch_size())
        .map(|item| match layout.half_of(item) {
            GuidanceHalf::Conditional if layout.guidance => 1,
            _ => 0,
        })
        .collect()
}

impl AttentionHook for StyleAligned {
    fn applies_to(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        let batch_ok = match self.role {
            StyleRole::InBatch => ctx.layout.images > 1,
            StyleRole::CaptureReference(_) | StyleRole::Targets(_) => true,
        };
        self.options.share_attention
            && batch_ok
            && site.id.kind == AttentionKind::SelfAttention
            && self.shared.contains(&site.id)
    }

    fn prepare(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        qkv: Qkv,
    ) -> Result<AttentionInputs> {
        match &self.role {
            StyleRole::InBatch => self.prepare_in_batch(ctx, qkv),
            StyleRole::CaptureReference(store) => {
                let captured = CapturedAttention {
                    k: qkv.k.clone(),
                    v: qkv.v.clone(),
                    stats: [mean_std(&qkv.q)?, mean_std(&qkv.k)?, mean_std(&qkv.v)?],
                };
                store
                    .attention
                    .lock()
                    .map_err(|_| poisoned())?
                    .insert(site.id, captured);
                Ok(AttentionInputs {
                    qkv,
                    extra: Vec::new(),
                })
            }
            StyleRole::Targets(store) => {
                let reference = store.attention(&site.id)?;
                let rows = reference_rows(&ctx.layout);
                let toward = |i: usize| -> Result<(Tensor, Tensor)> {
                    let (m, s) = &reference.stats[i];
                    Ok((select_rows(m, &rows)?, select_rows(s, &rows)?))
                };
                let Qkv {
                    mut q,
                    mut k,
                    mut v,
                    heads,
                } = qkv;
                if self.options.adain_queries {
                    q = adain_toward(&q, &toward(0)?)?;
                }
                if self.options.adain_keys {
                    k = adain_toward(&k, &toward(1)?)?;
                }
                if self.options.adain_values {
                    v = adain_toward(&v, &toward(2)?)?;
                }
                let mut keys = select_rows(&reference.k, &rows)?;
                if self.options.shared_score_scale != 1.0 {
                    keys = (keys * self.options.shared_score_scale as f64)?;
                }
                let values = select_rows(&reference.v, &rows)?;
                let items = (0..ctx.layout.batch_size()).collect();
                Ok(AttentionInputs {
                    qkv: Qkv { q, k, v, heads },
                    extra: vec![ExtraKeys {
                        items,
                        keys,
                        values,
                        logit_bias: self.options.shared_score_shift,
                        key_mask: None,
                    }],
                })
            }
        }
    }
}

impl StyleAligned {
    fn prepare_in_batch(&self, ctx: &StepContext, qkv: Qkv) -> Result<AttentionInputs> {
        let layout = &ctx.layout;
        let device = qkv.q.device().clone();
        let style = index(Self::style_items(layout), &device)?;
        let Qkv {
            mut q,
            mut k,
            mut v,
            heads,
        } = qkv;
        if self.options.adain_queries {
            q = adain(&q, &style)?;
        }
        if self.options.adain_keys {
            k = adain(&k, &style)?;
        }
        if self.options.adain_values {
            v = adain(&v, &style)?;
        }
        let targets = Self::target_items(layout);
        let target_styles = index(
            targets
                .iter()
                .map(|&item| layout.item(layout.half_of(item), 0) as u32)
                .collect(),
            &device,
        )?;
        let mut keys = k.index_select(&target_styles, 0)?;
        if self.options.shared_score_scale != 1.0 {
            keys = (keys * self.options.shared_score_scale as f64)?;
        }
        let values = v.index_select(&target_styles, 0)?;
        Ok(AttentionInputs {
            qkv: Qkv { q, k, v, heads },
            extra: vec![ExtraKeys {
                items: targets,
                keys,
                values,
                logit_bias: self.options.shared_score_shift,
                key_mask: None,
            }],
        })
    }
}

impl NormHook for StyleAligned {
    fn applies_to(&self, _id: &NormId, ctx: &StepContext) -> bool {
        let batch_ok = match self.role {
            StyleRole::InBatch => ctx.layout.images > 1,
            StyleRole::CaptureReference(_) | StyleRole::Targets(_) => true,
        };
        self.options.share_group_norm && batch_ok
    }

    /// Statistics over the union of item i's and its reference's values: the mean of the two
    /// means, and (for equal-sized halves) the mean of the variances plus the variance of the
    /// means. The reference pools with itself, which leaves it unchanged.
    fn pool_statistics(
        &self,
        id: &NormId,
        ctx: &StepContext,
        mean: Tensor,
        var: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (style_mean, style_var) = match &self.role {
            StyleRole::InBatch => {
                let style = index(Self::style_items(&ctx.layout), mean.device())?;
                (mean.index_select(&style, 0)?, var.index_select(&style, 0)?)
            }
            StyleRole::CaptureReference(store) => {
                store
                    .norms
                    .lock()
                    .map_err(|_| poisoned())?
                    .insert(*id, (mean.clone(), var.clone()));
                return Ok((mean, var));
            }
            StyleRole::Targets(store) => {
                let norms = store.norms.lock().map_err(|_| poisoned())?;
                let (m, v) = norms.get(id).ok_or_else(|| {
                    DiffusionError::invalid_argument(
                        "style_aligned.reference",
                        format!("no captured statistics for {id:?}"),
                    )
                })?;
                let rows = reference_rows(&ctx.layout);
                (select_rows(m, &rows)?, select_rows(v, &rows)?)
            }
        };
        let pooled_mean = ((&mean + &style_mean)? * 0.5)?;
        let spread = ((&mean - &style_mean)? * 0.5)?.sqr()?;
        let pooled_var = (((var + style_var)? * 0.5)? + spread)?;
        Ok((pooled_mean, pooled_var))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_vector_matches_official() {
        assert_eq!(unshared_layers(4, 0.0), [false; 4]);
        assert_eq!(unshared_layers(4, 1.0), [true; 4]);
        // level 0.25 of 16: 4 switches, every 4th layer plain.
        let v = unshared_layers(16, 0.25);
        assert_eq!(v.iter().filter(|&&x| x).count(), 4);
        assert!(v[0] && v[4] && !v[1]);
        // level 0.75 flips it: every 4th layer shared.
        let v = unshared_layers(16, 0.75);
        assert_eq!(v.iter().filter(|&&x| x).count(), 12);
        assert!(!v[0] && !v[4] && v[1]);
    }

    #[test]
    fn full_attention_share_is_rejected() {
        let o = StyleAlignedOptions {
            full_attention_share: true,
            ..Default::default()
        };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("full_attention_share"), "{e}");
    }
}
