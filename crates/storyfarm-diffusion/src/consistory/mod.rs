//! ConsiStory (Tewel et al. 2024, NVlabs/consistory) as hooks on the attention seam: subject masks
//! from cross-attention, subject-driven shared self-attention (SDSA) with mask dropout, vanilla
//! query blending, DIFT correspondences and feature injection, FreeU; run as the official code runs
//! it (../shared/tools/consistory-goldens/METHOD.md is the step-by-step account this follows).
//!
//! Levels are resolution levels of the UNet (0 = latent size). The official code is SDXL-only and
//! names resolutions of a 1024² render: its "32²" layers are the level at 1/4 of the latent side
//! (level 2) and its "64²" layers the level at 1/2 (level 1). Those ratios carry over to SD 1.5,
//! whose attention also runs at level 0: there SDSA, masks and injection use levels 2 and 1 exactly
//! as SDXL does and level 0 stays plain ([`ConsistoryLevels`]).

pub mod hook;
pub mod maths;
pub mod run;

use serde::{Deserialize, Serialize};

use crate::attention::{AttentionId, AttentionKind, FreeU, UNetBlock};
use crate::error::{DiffusionError, Result};
use crate::unet::UNet;

/// The official settings of `run_batch_generation` / `run_anchor_generation`, as defaults. Step
/// ranges follow the official formulas of the step count `n` unless set: shared attention on steps
/// `1..n`, query blending on `0..=n/10` (effective from step 1), feature injection on
/// `n/10..=n/3` (5..=16 at 50 steps). DIFT features are read at the step whose timestep is nearest
/// to `dift_timestep` (261 in the official code, whatever `n`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistoryOptions {
    /// Probability that a subject token of another image is dropped at a step.
    pub mask_dropout: f32,
    /// First step with shared attention (step 0 has no masks yet).
    pub sdsa_first_step: usize,
    /// Vanilla query blending up to this step (`None`: `n / 10`).
    pub query_blend_last_step: Option<usize>,
    /// `linspace(start, end, last + 1)[step]` is the vanilla query's weight.
    pub query_blend_start: f64,
    pub query_blend_end: f64,
    /// Feature injection on steps `first..=last` (`None`: `n/10..=n/3`), with weight `alpha` on
    /// the source features.
    pub injection_steps: Option<(usize, usize)>,
    pub injection_alpha: f64,
    pub dift_timestep: usize,
    /// Cross-attention maps are averaged over this many most recent steps.
    pub mask_window: usize,
    pub freeu: Option<FreeU>,
    /// Pass 2 with feature injection (official `enable_feature_injection`); without it the
    /// result is pass 1.
    pub feature_injection: bool,
}

impl Default for ConsistoryOptions {
    fn default() -> Self {
        Self {
            mask_dropout: 0.5,
            sdsa_first_step: 1,
            query_blend_last_step: None,
            query_blend_start: 0.9,
            query_blend_end: 0.81836735,
            injection_steps: None,
            injection_alpha: 0.8,
            dift_timestep: 261,
            mask_window: 20,
            freeu: Some(FreeU {
                s1: 0.6,
                s2: 0.4,
                b1: 1.1,
                b2: 1.2,
            }),
            feature_injection: true,
        }
    }
}

impl ConsistoryOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.mask_dropout) {
            return Err(DiffusionError::invalid_argument(
                "mask_dropout",
                format!("must lie in [0, 1], got {}", self.mask_dropout),
            ));
        }
        if !(0.0..=1.0).contains(&self.injection_alpha) {
            return Err(DiffusionError::invalid_argument(
                "injection_alpha",
                format!("must lie in [0, 1], got {}", self.injection_alpha),
            ));
        }
        if self.mask_window == 0 {
            return Err(DiffusionError::invalid_argument(
                "mask_window",
                "must be at least 1",
            ));
        }
        if let Some((first, last)) = self.injection_steps {
            if first > last {
                return Err(DiffusionError::invalid_argument(
                    "injection_steps",
                    format!("first step {first} is after the last {last}"),
                ));
            }
        }
        Ok(())
    }

    /// The last step of query blending in a run of `steps` steps.
    pub fn query_blend_last(&self, steps: usize) -> usize {
        self.query_blend_last_step.unwrap_or(steps / 10)
    }

    /// The vanilla query's weight at `step` of `steps`, as numpy's float64 `linspace` computes it.
    pub fn query_blend_weight(&self, step: usize, steps: usize) -> Option<f64> {
        let last = self.query_blend_last(steps);
        if step < self.sdsa_first_step || step > last {
            return None;
        }
        Some(maths::linspace(self.query_blend_start, self.query_blend_end, last + 1)[step])
    }

    pub fn injects_at(&self, step: usize, steps: usize) -> bool {
        let (first, last) = self.injection_steps.unwrap_or((steps / 10, steps / 3));
        (first..=last).contains(&step)
    }
}

/// Where in a UNet ConsiStory acts (see the module docs for the SDXL-to-SD-1.5 mapping).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistoryLevels {
    /// Cross-attention maps are recorded here; masks are made here and at `injection`.
    pub mask: usize,
    /// Self-attention of up blocks at these levels shares subject tokens.
    pub sdsa: Vec<usize>,
    /// Self-attention of down and up blocks at this level injects features.
    pub injection: usize,
    /// The up block whose output (after its upsampler) is at the injection level: DIFT features.
    pub dift_up_block: usize,
}

impl ConsistoryLevels {
    /// Levels 2 and 1 (1/4 and 1/2 of the latent side) wherever the UNet has attention there:
    /// SDXL and SD 1.x/2.x alike. A UNet whose attention stops above level 2 (the tiny SD 1.5
    /// test model: levels 0 and 1 only) uses its two coarsest attention levels instead.
    pub fn for_unet(unet: &UNet) -> Result<Self> {
        let ids = unet.attention_ids();
        let down_blocks = unet.config().num_downsamplers() + 1;
        let usable = |level: usize| {
            let has = |kind: AttentionKind, up_only: bool| {
                ids.iter().any(|id| {
                    id.level == level
                        && id.kind == kind
                        && (!up_only || matches!(id.block, UNetBlock::Up(_)))
                })
            };
            has(AttentionKind::SelfAttention, true) && has(AttentionKind::CrossAttention, true)
        };
        let mut levels: Vec<usize> = (0..down_blocks).filter(|&l| usable(l)).collect();
        let (mask, injection) = if usable(2) && usable(1) {
            (2, 1)
        } else {
            match (levels.pop(), levels.pop()) {
                (Some(coarse), Some(fine)) => (coarse, fine),
                _ => {
                    return Err(DiffusionError::invalid_argument(
                        "model",
                        "ConsiStory needs decoder self- and cross-attention at two resolution levels; this UNet has fewer",
                    ))
                }
            }
        };
        // Up block i runs at level L-1-i and its upsampler brings it to L-2-i.
        let dift_up_block = (down_blocks - 2).checked_sub(injection).ok_or_else(|| {
            DiffusionError::invalid_argument(
                "model",
                format!("no up block ends at level {injection}"),
            )
        })?;
        Ok(Self {
            mask,
            sdsa: vec![mask, injection],
            injection,
            dift_up_block,
        })
    }

    /// The levels masks are made for, coarse first: the order of the official dropout draws.
    pub fn mask_levels(&self) -> [usize; 2] {
        [self.mask, self.injection]
    }

    pub fn is_sdsa_layer(&self, id: &AttentionId) -> bool {
        id.kind == AttentionKind::SelfAttention
            && matches!(id.block, UNetBlock::Up(_))
            && self.sdsa.contains(&id.level)
    }

    pub fn is_injection_layer(&self, id: &AttentionId) -> bool {
        id.kind == AttentionKind::SelfAttention
            && matches!(id.block, UNetBlock::Up(_) | UNetBlock::Down(_))
            && id.level == self.injection
    }

    pub fn is_mask_layer(&self, id: &AttentionId) -> bool {
        id.kind == AttentionKind::CrossAttention && id.level == self.mask
    }
}

/// Which images of a set see which: `mapping[i][j]` lets image `i` attend to image `j`'s subject
/// tokens and take injected features from it (the diagonal is always set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorMapping {
    rows: Vec<Vec<bool>>,
    /// Images whose mask dropout is drawn, as groups of consecutive images each with its own draws
    /// (official batch mode: one group of every image; anchor mode: one group per character's
    /// anchors, so a character's anchors draw the same whatever else shares the task). Images in
    /// no group are never anyone's source, so their dropout would change nothing.
    pub dropout_groups: Vec<std::ops::Range<usize>>,
}

impl AnchorMapping {
    /// Official batch mode: `eye(B)` with the anchor columns set (anchors see each other, every
    /// other image sees the anchors, non-anchors never see each other). Dropout is drawn for all.
    pub fn batch(images: usize, anchors: usize) -> Self {
        let rows = (0..images)
            .map(|i| (0..images).map(|j| i == j || j < anchors).collect())
            .collect();
        Self {
            rows,
            dropout_groups: std::iter::once(0..images).collect(),
        }
    }

    /// Anchor mode: `anchors` images see each other (the official `ones(A, A)`), and each of the
    /// `frames` after them sees the anchors and itself only, so a frame never depends on the others.
    pub fn anchors_then_frames(anchors: usize, frames: usize) -> Self {
        Self::characters(&[anchors], &vec![vec![0]; frames])
    }

    /// Several characters in one set: the anchors of character 0, then of character 1, ..., then
    /// the frames. A character's anchors see each other only; frame `f` sees the anchors of the
    /// characters `frame_characters[f]` names and itself.
    pub fn characters(anchors: &[usize], frame_characters: &[Vec<usize>]) -> Self {
        let mut groups = Vec::with_capacity(anchors.len());
        let mut start = 0;
        for &n in anchors {
            groups.push(start..start + n);
            start += n;
        }
        let total = start + frame_characters.len();
        let mut rows = vec![vec![false; total]; total];
        for group in &groups {
            for i in group.clone() {
                for j in group.clone() {
                    rows[i][j] = true;
                }
            }
        }
        for (f, shows) in frame_characters.iter().enumerate() {
            let i = start + f;
            rows[i][i] = true;
            for &c in shows {
                if let Some(group) = groups.get(c) {
                    for j in group.clone() {
                        rows[i][j] = true;
                    }
                }
            }
        }
        Self {
            rows,
            dropout_groups: groups.into_iter().filter(|g| !g.is_empty()).collect(),
        }
    }

    pub fn images(&self) -> usize {
        self.rows.len()
    }

    pub fn sees(&self, image: usize, source: usize) -> bool {
        self.rows[image][source]
    }

    /// Whether image `i` maps to any image but itself.
    pub fn has_sources(&self, image: usize) -> bool {
        self.rows[image]
            .iter()
            .enumerate()
            .any(|(j, &m)| m && j != image)
    }

    pub fn row(&self, image: usize) -> &[bool] {
        &self.rows[image]
    }
}
