//! The attention seam: typed ids for every attention and GroupNorm layer of the UNet, the
//! per-call context that travels down the forward pass, the hook traits that methods such as
//! StyleAligned (and later ConsiStory) implement, and the attention kernel itself.
//!
//! A layer with no hook (or whose hook declines it) runs the plain kernel and pays nothing for
//! the seam. Hooks never hold hidden per-step state of the UNet: everything they need about the
//! call (step, timestep, how the batch is laid out) arrives in [`StepContext`].

use std::fmt;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::layers::{merge_heads, split_heads};

/// Which part of the UNet a layer sits in, with the block index as in diffusers' weight names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UNetBlock {
    Down(usize),
    Mid,
    Up(usize),
}

impl fmt::Display for UNetBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Down(i) => write!(f, "down_blocks.{i}"),
            Self::Mid => write!(f, "mid_block"),
            Self::Up(i) => write!(f, "up_blocks.{i}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttentionKind {
    /// `attn1`: the image attends to itself.
    SelfAttention,
    /// `attn2`: the image attends to the text context.
    CrossAttention,
}

/// The identity of one attention layer: where it is, what it attends to and at which resolution
/// level (0 = full latent size, +1 per downsampler above it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttentionId {
    pub block: UNetBlock,
    /// Index of the `Transformer2DModel` within its block (`attentions.{i}`).
    pub attention: usize,
    /// Index of the `BasicTransformerBlock` within that transformer (`transformer_blocks.{i}`).
    pub transformer_block: usize,
    pub kind: AttentionKind,
    pub level: usize,
}

impl fmt::Display for AttentionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let attn = match self.kind {
            AttentionKind::SelfAttention => "attn1",
            AttentionKind::CrossAttention => "attn2",
        };
        write!(
            f,
            "{}.attentions.{}.transformer_blocks.{}.{}",
            self.block, self.attention, self.transformer_block, attn
        )
    }
}

/// One call of an attention layer: its id and the spatial size of the tokens it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSite {
    pub id: AttentionId,
    pub height: usize,
    pub width: usize,
}

impl AttentionSite {
    pub fn tokens(&self) -> usize {
        self.height * self.width
    }
}

/// Which GroupNorm of the UNet is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormLayer {
    ResnetNorm1 { block: UNetBlock, resnet: usize },
    ResnetNorm2 { block: UNetBlock, resnet: usize },
    TransformerInput { block: UNetBlock, attention: usize },
    Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormId {
    pub layer: NormLayer,
    pub level: usize,
}

/// Half of a classifier-free-guidance batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuidanceHalf {
    Unconditional,
    Conditional,
}

/// How the UNet batch is made of images: `images` images, each twice under classifier-free
/// guidance, laid out `[uncond_0 .. uncond_{n-1}, cond_0 .. cond_{n-1}]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    pub images: usize,
    pub guidance: bool,
}

impl BatchLayout {
    pub fn batch_size(&self) -> usize {
        if self.guidance {
            2 * self.images
        } else {
            self.images
        }
    }

    /// The image a batch item renders.
    pub fn image_of(&self, item: usize) -> usize {
        item % self.images
    }

    pub fn half_of(&self, item: usize) -> GuidanceHalf {
        if self.guidance && item < self.images {
            GuidanceHalf::Unconditional
        } else {
            GuidanceHalf::Conditional
        }
    }

    /// The batch item of `image` in `half`.
    pub fn item(&self, half: GuidanceHalf, image: usize) -> usize {
        match half {
            GuidanceHalf::Unconditional if self.guidance => image,
            _ if self.guidance => self.images + image,
            _ => image,
        }
    }
}

/// Everything a hook may know about the current UNet call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepContext {
    /// Denoising step index (0 = the noisiest) or inversion step index.
    pub step: usize,
    pub steps: usize,
    pub timestep: u32,
    pub layout: BatchLayout,
}

/// Projected queries, keys and values as tokens `[B, N, H*d]`: head `h` is channels
/// `h*d..(h+1)*d`, so a per-head, per-channel statistic over tokens is a per-channel one. The
/// kernel reads heads in place; nothing is split or copied for a hook.
pub struct Qkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub heads: usize,
}

/// An extra block of keys and values that some batch items attend to beside their own tokens.
///
/// `keys`/`values` are tokens `[items.len(), M, H*d]`, row r belonging to batch item
/// `items[r]`.
/// `logit_bias` is added to every logit of this block (StyleAligned's `shared_score_shift`); a
/// `key_mask` `[items.len(), M]` of 0/1 excludes keys (ConsiStory's subject masks and dropout).
pub struct ExtraKeys {
    pub items: Vec<usize>,
    pub keys: Tensor,
    pub values: Tensor,
    pub logit_bias: f32,
    pub key_mask: Option<Tensor>,
}

/// What the kernel attends with after a hook has had its say.
pub struct AttentionInputs {
    pub qkv: Qkv,
    pub extra: Vec<ExtraKeys>,
}

/// A method that changes attention. Implementations must be cheap to ask
/// ([`AttentionHook::applies_to`] runs for every layer call).
pub trait AttentionHook: Send + Sync {
    /// Whether this hook takes part in this layer call; declined layers run the plain kernel.
    fn applies_to(&self, site: &AttentionSite, ctx: &StepContext) -> bool;

    /// Transform Q/K/V (after projection, as tokens) and add extra keys/values per item.
    fn prepare(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        qkv: Qkv,
    ) -> Result<AttentionInputs> {
        let _ = (site, ctx);
        Ok(AttentionInputs {
            qkv,
            extra: Vec::new(),
        })
    }

    /// Whether the hook wants the attention probabilities of this call (cross-attention maps
    /// for subject masks); asking forces the kernel to materialise them.
    fn wants_probabilities(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        let _ = (site, ctx);
        false
    }

    /// Receives `[B, H, N, M]` probabilities when [`AttentionHook::wants_probabilities`] said so.
    fn observe_probabilities(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        probabilities: &Tensor,
    ) -> Result<()> {
        let _ = (site, ctx, probabilities);
        Ok(())
    }

    /// The attention output `[B, N, C]` before `to_out` (blending, feature injection, read-outs).
    fn finish(&self, site: &AttentionSite, ctx: &StepContext, out: Tensor) -> Result<Tensor> {
        let _ = (site, ctx);
        Ok(out)
    }

    /// Adds to what an earlier hook of a [`ChainedHooks`] prepared: by default this hook prepares
    /// from the earlier hook's queries, keys and values and its extra blocks follow the earlier ones.
    fn extend(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        inputs: AttentionInputs,
    ) -> Result<AttentionInputs> {
        let AttentionInputs { qkv, mut extra } = inputs;
        let mine = self.prepare(site, ctx, qkv)?;
        extra.extend(mine.extra);
        Ok(AttentionInputs {
            qkv: mine.qkv,
            extra,
        })
    }
}

/// Two methods in one attention call (a style and characters): `first` prepares, `second` extends
/// what `first` prepared, and outputs pass through `first`'s then `second`'s `finish`.
pub struct ChainedHooks<'a> {
    pub first: &'a dyn AttentionHook,
    pub second: &'a dyn AttentionHook,
}

impl AttentionHook for ChainedHooks<'_> {
    fn applies_to(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        self.first.applies_to(site, ctx) || self.second.applies_to(site, ctx)
    }

    fn prepare(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        qkv: Qkv,
    ) -> Result<AttentionInputs> {
        let inputs = if self.first.applies_to(site, ctx) {
            self.first.prepare(site, ctx, qkv)?
        } else {
            AttentionInputs {
                qkv,
                extra: Vec::new(),
            }
        };
        if self.second.applies_to(site, ctx) {
            self.second.extend(site, ctx, inputs)
        } else {
            Ok(inputs)
        }
    }

    fn wants_probabilities(&self, site: &AttentionSite, ctx: &StepContext) -> bool {
        [self.first, self.second]
            .iter()
            .any(|h| h.applies_to(site, ctx) && h.wants_probabilities(site, ctx))
    }

    fn observe_probabilities(
        &self,
        site: &AttentionSite,
        ctx: &StepContext,
        probabilities: &Tensor,
    ) -> Result<()> {
        for hook in [self.first, self.second] {
            if hook.applies_to(site, ctx) && hook.wants_probabilities(site, ctx) {
                hook.observe_probabilities(site, ctx, probabilities)?;
            }
        }
        Ok(())
    }

    fn finish(&self, site: &AttentionSite, ctx: &StepContext, out: Tensor) -> Result<Tensor> {
        let mut out = out;
        for hook in [self.first, self.second] {
            if hook.applies_to(site, ctx) {
                out = hook.finish(site, ctx, out)?;
            }
        }
        Ok(out)
    }
}

/// A method that changes GroupNorm statistics (StyleAligned's shared GroupNorm).
pub trait NormHook: Send + Sync {
    fn applies_to(&self, id: &NormId, ctx: &StepContext) -> bool;

    /// Given per-(item, group) mean and biased variance `[B, G]` (f32), the statistics each item
    /// is normalised with.
    fn pool_statistics(
        &self,
        id: &NormId,
        ctx: &StepContext,
        mean: Tensor,
        var: Tensor,
    ) -> Result<(Tensor, Tensor)>;
}

/// Read-outs of whole UNet blocks (ConsiStory's DIFT features are the output of `up_blocks[0]`).
pub trait BlockHook: Send + Sync {
    /// Whether [`BlockHook::observe_up_block`] wants up block `index` in this call; asking nothing
    /// costs nothing.
    fn wants_up_block(&self, index: usize, ctx: &StepContext) -> bool;

    /// The output `[B, C, H, W]` of up block `index`, after its upsampler.
    fn observe_up_block(&self, index: usize, ctx: &StepContext, output: &Tensor) -> Result<()>;
}

/// FreeU (Si et al. 2023) as diffusers applies it: before every resnet of the first two up blocks,
/// the first half of the backbone channels is scaled by `b1`/`b2` and the lowest frequencies of the
/// skip connection by `s1`/`s2`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FreeU {
    pub s1: f64,
    pub s2: f64,
    pub b1: f64,
    pub b2: f64,
}

/// The hooks of one forward call; `Hooks::none()` is the plain model.
#[derive(Clone, Copy, Default)]
pub struct Hooks<'a> {
    pub attention: Option<&'a dyn AttentionHook>,
    pub norm: Option<&'a dyn NormHook>,
    pub blocks: Option<&'a dyn BlockHook>,
    pub freeu: Option<FreeU>,
}

impl<'a> Hooks<'a> {
    pub fn none() -> Self {
        Self::default()
    }
}

/// The explicit per-call context passed down the UNet forward.
#[derive(Clone, Copy)]
pub struct ForwardContext<'a> {
    pub step: StepContext,
    pub hooks: Hooks<'a>,
}

/// Runs attention over a hook's prepared inputs in token layout `[B, N, H*d]` and returns
/// `[B, N, H*d]` (before `to_out`): the fused CPU kernel where it applies, else the head-split path.
pub fn attend(inputs: AttentionInputs, scale: f64) -> Result<Tensor> {
    let AttentionInputs { qkv, extra } = inputs;
    let heads = qkv.heads;
    if storyfarm_kernels::supported(&[&qkv.q, &qkv.k, &qkv.v]) {
        let blocks: Vec<storyfarm_kernels::ExtraBlock> = extra
            .iter()
            .map(|e| storyfarm_kernels::ExtraBlock {
                items: &e.items,
                keys: &e.keys,
                values: &e.values,
                logit_bias: e.logit_bias,
                key_mask: e.key_mask.as_ref(),
            })
            .collect();
        return Ok(storyfarm_kernels::attention(
            &qkv.q,
            &qkv.k,
            &qkv.v,
            heads,
            scale as f32,
            &blocks,
        )?);
    }
    let extra = extra
        .into_iter()
        .map(|e| {
            Ok(ExtraKeys {
                keys: split_heads(&e.keys, heads)?,
                values: split_heads(&e.values, heads)?,
                ..e
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (q, k, v) = (
        split_heads(&qkv.q, heads)?,
        split_heads(&qkv.k, heads)?,
        split_heads(&qkv.v, heads)?,
    );
    merge_heads(&attention(&q, &k, &v, scale, &extra)?)
}

/// Queries per chunk are bounded so that one chunk's logits stay below this many elements
/// (256 MiB in f32): a 64x64 latent has 4096 tokens, and 16 heads x 4096^2 logits would be 1 GiB.
const MAX_LOGITS_PER_CHUNK: usize = 64 * 1024 * 1024;

/// Scaled dot-product attention `softmax(q k^T * scale) v` over `[B, H, N, d]` inputs, chunked
/// over queries to bound memory, plus any extra key blocks merged with an online softmax (so no
/// concatenated `N x (N + M)` logit matrix is built).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    extra: &[ExtraKeys],
) -> Result<Tensor> {
    let (batch, _, _, _) = q.dims4()?;
    if extra.is_empty() {
        return plain_attention(q, k, v, scale);
    }
    // Group items by the set of extra blocks they attend to; each group runs batched.
    let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for item in 0..batch {
        let blocks: Vec<usize> = extra
            .iter()
            .enumerate()
            .filter(|(_, e)| e.items.contains(&item))
            .map(|(i, _)| i)
            .collect();
        match groups.iter_mut().find(|(b, _)| *b == blocks) {
            Some((_, items)) => items.push(item),
            None => groups.push((blocks, vec![item])),
        }
    }
    let mut per_item: Vec<Option<Tensor>> = vec![None; batch];
    for (blocks, items) in groups {
        let index = index_tensor(&items, q.device())?;
        let gq = q.index_select(&index, 0)?;
        let gk = k.index_select(&index, 0)?;
        let gv = v.index_select(&index, 0)?;
        let out = if blocks.is_empty() {
            plain_attention(&gq, &gk, &gv, scale)?
        } else {
            let mut parts = Vec::with_capacity(blocks.len());
            for &b in &blocks {
                let e = &extra[b];
                let rows: Vec<usize> = items
                    .iter()
                    .map(|item| e.items.iter().position(|x| x == item).unwrap_or(0))
                    .collect();
                let rows = index_tensor(&rows, q.device())?;
                let mask = match &e.key_mask {
                    Some(m) => Some(m.index_select(&rows, 0)?),
                    None => None,
                };
                parts.push((
                    e.keys.index_select(&rows, 0)?,
                    e.values.index_select(&rows, 0)?,
                    e.logit_bias,
                    mask,
                ));
            }
            merged_attention(&gq, &gk, &gv, scale, &parts)?
        };
        for (r, &item) in items.iter().enumerate() {
            per_item[item] = Some(out.narrow(0, r, 1)?);
        }
    }
    let parts: Vec<Tensor> = per_item.into_iter().flatten().collect();
    Ok(Tensor::cat(&parts, 0)?)
}

fn index_tensor(items: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let idx: Vec<u32> = items.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(idx, items.len(), device)?)
}

fn query_chunk(batch: usize, heads: usize, queries: usize, keys: usize) -> usize {
    let per_query = (batch * heads * keys).max(1);
    (MAX_LOGITS_PER_CHUNK / per_query).clamp(1, queries.max(1))
}

/// The plain kernel over `[.., N, d]` inputs (any leading dims); probabilities are computed in
/// f32 whatever the model dtype.
pub fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let rank = q.rank();
    let n = q.dim(rank - 2)?;
    let m = k.dim(rank - 2)?;
    let lead: usize = q.dims()[..rank - 2].iter().product();
    let kt = k.t()?;
    // Scaling the queries is cheaper than scaling the logits.
    let q = (q * scale)?;
    let chunk = query_chunk(lead, 1, n, m);
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let qc = if len == n {
            q.clone()
        } else {
            q.narrow(rank - 2, start, len)?
        };
        let probs = softmax_f32(&qc.matmul(&kt)?)?;
        outs.push(probs.matmul(v)?);
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Ok(Tensor::cat(&outs, rank - 2)?)
}

/// Attention probabilities `[B, H, N, M]` (for hooks that read cross-attention maps).
pub fn attention_probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = (q.matmul(&k.t()?)? * scale)?;
    softmax_f32(&logits)
}

fn softmax_f32(logits: &Tensor) -> Result<Tensor> {
    let dtype = logits.dtype();
    // candle's CUDA softmax accumulates half types in f32 already; converting would only add two
    // passes over the largest tensor of the forward.
    if dtype == DType::F32 || logits.device().is_cuda() {
        return Ok(candle_nn::ops::softmax_last_dim(logits)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
}

type ExtraPart = (Tensor, Tensor, f32, Option<Tensor>);

/// Own keys plus extra blocks under one softmax: the blocks' keys and values are concatenated
/// after the own ones, and each block's logit bias (and `-inf` for masked keys) is one additive
/// row over the keys. Query chunks keep the logits bounded as in [`plain_attention`]. This is the
/// path of devices without our CPU kernels: on a GPU one large product and one softmax beat a
/// per-block online merge, whose every step is another pass over the logits.
fn merged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    extra: &[ExtraPart],
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let device = q.device();
    let dtype = q.dtype();
    let mut keys = vec![k.clone()];
    let mut values = vec![v.clone()];
    let mut bias = vec![Tensor::zeros((b, k.dim(2)?), DType::F32, device)?];
    for (ek, ev, logit_bias, mask) in extra {
        keys.push(ek.clone());
        values.push(ev.clone());
        let mut row = Tensor::full(*logit_bias, (b, ek.dim(2)?), device)?;
        if let Some(mask) = mask {
            // Masked keys get -inf logits: exp() makes them exactly zero.
            let keep = mask.to_dtype(DType::F32)?;
            row = (row + ((keep.ones_like()? - &keep)? * -1e30)?)?;
        }
        bias.push(row);
    }
    let needs_bias = extra
        .iter()
        .any(|(_, _, logit_bias, mask)| *logit_bias != 0.0 || mask.is_some());
    let keys = Tensor::cat(&keys, 2)?;
    let values = Tensor::cat(&values, 2)?;
    let total_keys = keys.dim(2)?;
    let bias = if needs_bias {
        Some(
            Tensor::cat(&bias, 1)?
                .reshape((b, 1, 1, total_keys))?
                .to_dtype(dtype)?,
        )
    } else {
        None
    };
    let kt = keys.t()?;
    let q = (q * scale)?;
    let chunk = query_chunk(b, h, n, total_keys);
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let qc = if len == n {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let mut logits = qc.matmul(&kt)?;
        if let Some(bias) = &bias {
            logits = logits.broadcast_add(bias)?;
        }
        outs.push(softmax_f32(&logits)?.matmul(&values)?);
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Ok(Tensor::cat(&outs, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        let v = crate::noise::NoiseGenerator::new(seed).normal_vec(n);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The merged kernel must equal attention over explicitly concatenated keys with the
    /// bias added to the extra block (the definition in fixtures/README.md section 10).
    #[test]
    fn merged_blocks_equal_concatenated_softmax() {
        let (b, h, n, m, d) = (3, 2, 5, 7, 4);
        let q = rand(&[b, h, n, d], 1);
        let k = rand(&[b, h, n, d], 2);
        let v = rand(&[b, h, n, d], 3);
        let ek = rand(&[2, h, m, d], 4);
        let ev = rand(&[2, h, m, d], 5);
        let bias = 0.7f32;
        let extra = vec![ExtraKeys {
            items: vec![2, 0],
            keys: ek.clone(),
            values: ev.clone(),
            logit_bias: bias,
            key_mask: None,
        }];
        let out = attention(&q, &k, &v, 0.5, &extra).unwrap();
        for (row, item) in [(0usize, 2usize), (1, 0)] {
            let qi = q.narrow(0, item, 1).unwrap();
            let kk = Tensor::cat(
                &[k.narrow(0, item, 1).unwrap(), ek.narrow(0, row, 1).unwrap()],
                2,
            )
            .unwrap();
            let vv = Tensor::cat(
                &[v.narrow(0, item, 1).unwrap(), ev.narrow(0, row, 1).unwrap()],
                2,
            )
            .unwrap();
            let mut logits = (qi.matmul(&kk.t().unwrap()).unwrap() * 0.5).unwrap();
            let shift: Vec<f32> = (0..n + m)
                .map(|j| if j >= n { bias } else { 0.0 })
                .collect();
            let shift = Tensor::from_vec(shift, n + m, &Device::Cpu).unwrap();
            logits = logits.broadcast_add(&shift).unwrap();
            let expected = candle_nn::ops::softmax_last_dim(&logits)
                .unwrap()
                .matmul(&vv)
                .unwrap();
            let err = max_abs(&out.narrow(0, item, 1).unwrap(), &expected);
            assert!(err < 1e-5, "item {item}: {err}");
        }
        // Item 1 has no extra keys: plain attention.
        let plain = plain_attention(
            &q.narrow(0, 1, 1).unwrap(),
            &k.narrow(0, 1, 1).unwrap(),
            &v.narrow(0, 1, 1).unwrap(),
            0.5,
        )
        .unwrap();
        assert!(max_abs(&out.narrow(0, 1, 1).unwrap(), &plain) < 1e-6);
    }

    #[test]
    fn masked_keys_are_ignored_and_chunking_is_exact() {
        let (h, n, m, d) = (1, 6, 4, 3);
        let q = rand(&[1, h, n, d], 11);
        let k = rand(&[1, h, n, d], 12);
        let v = rand(&[1, h, n, d], 13);
        let ek = rand(&[1, h, m, d], 14);
        let ev = rand(&[1, h, m, d], 15);
        let mask = Tensor::from_vec(vec![1f32, 0., 1., 0.], (1, m), &Device::Cpu).unwrap();
        let masked = attention(
            &q,
            &k,
            &v,
            1.0,
            &[ExtraKeys {
                items: vec![0],
                keys: ek.clone(),
                values: ev.clone(),
                logit_bias: 0.0,
                key_mask: Some(mask),
            }],
        )
        .unwrap();
        let keep = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let kept = attention(
            &q,
            &k,
            &v,
            1.0,
            &[ExtraKeys {
                items: vec![0],
                keys: ek.index_select(&keep, 2).unwrap(),
                values: ev.index_select(&keep, 2).unwrap(),
                logit_bias: 0.0,
                key_mask: None,
            }],
        )
        .unwrap();
        assert!(max_abs(&masked, &kept) < 1e-6);
        assert_eq!(query_chunk(2, 8, 4096, 4096), 1024);
    }

    #[test]
    fn batch_layout_maps_items() {
        let l = BatchLayout {
            images: 3,
            guidance: true,
        };
        assert_eq!(l.batch_size(), 6);
        assert_eq!(l.image_of(4), 1);
        assert_eq!(l.half_of(2), GuidanceHalf::Unconditional);
        assert_eq!(l.half_of(3), GuidanceHalf::Conditional);
        assert_eq!(l.item(GuidanceHalf::Conditional, 0), 3);
        let id = AttentionId {
            block: UNetBlock::Up(1),
            attention: 2,
            transformer_block: 0,
            kind: AttentionKind::SelfAttention,
            level: 1,
        };
        assert_eq!(
            id.to_string(),
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
        );
    }
}
