//! StyleAligned (google/style-aligned) as hooks on the attention seam: AdaIN of target queries
//! and keys toward the reference, the reference's keys/values shared into every target's
//! self-attention (per guidance half), and GroupNorm statistics pooled with the reference.
//!
//! Image 0 of the batch is the reference. Its own computation is exactly a plain forward pass, so
//! its trajectory never depends on the targets: that is what lets a farm render every frame
//! separately against a stored reference trajectory.

use std::collections::HashSet;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::attention::{
    AttentionHook, AttentionId, AttentionInputs, AttentionKind, AttentionSite, BatchLayout,
    ExtraKeys, NormHook, NormId, Qkv, StepContext,
};
use crate::error::{DiffusionError, Result};
use crate::unet::UNet;

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

/// The StyleAligned hook set for one UNet.
pub struct StyleAligned {
    options: StyleAlignedOptions,
    shared: HashSet<AttentionId>,
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
        Ok(Self { options, shared })
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

/// AdaIN over the token axis of `[B, H, N, d]` toward the items in `style` (unbiased variance,
/// epsilon 1e-5 added before the square root, as the official `calc_mean_std`).
fn adain(feat: &Tensor, style: &Tensor) -> Result<Tensor> {
    let n = feat.dim(2)?;
    let mean = feat.mean_keepdim(2)?;
    let centered = feat.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(2)? / (n.max(2) - 1) as f64)?;
    let std = (var + 1e-5)?.sqrt()?;
    let style_mean = mean.index_select(style, 0)?;
    let style_std = std.index_select(style, 0)?;
    Ok(centered
        .broadcast_div(&std)?
        .broadcast_mul(&style_std)?
        .broadcast_add(&style_mean)?)
}

impl AttentionHook for StyleAligned {
    fn applies_to(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        self.options.share_attention
            && ctx.layout.images > 1
            && site.id.kind == AttentionKind::SelfAttention
            && self.shared.contains(&site.id)
    }

    fn prepare(&self, _site: &AttentionSite, ctx: &StepContext, qkv: Qkv) -> Result<AttentionInputs> {
        let layout = &ctx.layout;
        let device = qkv.q.device().clone();
        let style = index(Self::style_items(layout), &device)?;
        let Qkv { mut q, mut k, mut v } = qkv;
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
            qkv: Qkv { q, k, v },
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
        self.options.share_group_norm && ctx.layout.images > 1
    }

    /// Statistics over the union of item i's and its reference's values: the mean of the two
    /// means, and (for equal-sized halves) the mean of the variances plus the variance of the
    /// means. The reference pools with itself, which leaves it unchanged.
    fn pool_statistics(
        &self,
        _id: &NormId,
        ctx: &StepContext,
        mean: Tensor,
        var: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let style = index(Self::style_items(&ctx.layout), mean.device())?;
        let style_mean = mean.index_select(&style, 0)?;
        let style_var = var.index_select(&style, 0)?;
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
        let o = StyleAlignedOptions { full_attention_share: true, ..Default::default() };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("full_attention_share"), "{e}");
    }
}
