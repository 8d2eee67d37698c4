//! The UNet's building blocks (convolutions, GroupNorm with statistic hooks, ResNet blocks,
//! transformer blocks with hookable attention), named as in diffusers checkpoints.

use std::borrow::Cow;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use crate::attention::{
    self, AttentionId, AttentionKind, AttentionSite, ForwardContext, NormId, NormLayer, Qkv,
    UNetBlock,
};
use crate::error::Result;
use crate::layers::{layer_norm, linear, linear_no_bias, merge_heads, split_heads};
use crate::weights::Weights;
use storyfarm_kernels as kernels;

/// A layer's weight as a tensor, or only in the CPU sgemm's panel layout: packed once at load
/// instead of per call, and the tensor dropped so the weights are not held twice.
enum LayerWeight {
    Tensor(Tensor),
    Packed(kernels::PackedWeight),
}

impl LayerWeight {
    fn conv(t: Tensor) -> Result<Self> {
        Ok(match kernels::PackedWeight::conv(&t)? {
            Some(p) => Self::Packed(p),
            None => Self::Tensor(t),
        })
    }

    /// A GEGLU projection, packed for [`kernels::linear_geglu`].
    fn geglu(t: Tensor) -> Result<Self> {
        Ok(match kernels::PackedWeight::geglu(&t)? {
            Some(p) => Self::Packed(p),
            None => Self::Tensor(t),
        })
    }

    fn linear(t: Tensor) -> Result<Self> {
        Ok(match kernels::PackedWeight::linear(&t)? {
            Some(p) => Self::Packed(p),
            None => Self::Tensor(t),
        })
    }

    /// The tensor, rebuilt from the packed form for the paths the packed kernels do not take.
    fn tensor(&self) -> Result<Cow<'_, Tensor>> {
        Ok(match self {
            Self::Tensor(t) => Cow::Borrowed(t),
            Self::Packed(p) => Cow::Owned(p.unpack()?),
        })
    }
}

pub(crate) struct Conv2d {
    weight: LayerWeight,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = w.get(&[out_c, in_c, kernel, kernel], "weight")?;
        Ok(Self {
            weight: LayerWeight::conv(weight)?,
            bias: Some(w.get(&[out_c], "bias")?),
            padding,
            stride,
        })
    }

    /// A convolution that keeps its weight tensor (a transformer's 1x1 projection, which the
    /// token kernels read as a `[C, C]` matrix).
    fn new_unpacked(w: &Weights, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            weight: LayerWeight::Tensor(w.get(&[out_c, in_c, 1, 1], "weight")?),
            bias: Some(w.get(&[out_c], "bias")?),
            padding: 0,
            stride: 1,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None, None)
    }

    /// `conv(x) + bias + channel_add[b, c] + residual`, in one pass on the CPU (f32).
    pub fn forward_add(
        &self,
        x: &Tensor,
        channel_add: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, p) = (self.bias.as_ref(), self.stride, self.padding);
        match &self.weight {
            LayerWeight::Packed(pw) if kernels::supported(&[x]) => {
                return Ok(kernels::conv2d_packed(
                    x,
                    pw,
                    b,
                    s,
                    p,
                    channel_add,
                    residual,
                )?);
            }
            LayerWeight::Tensor(t) if kernels::supported(&[x, t]) => {
                return Ok(kernels::conv2d(x, t, b, s, p, channel_add, residual)?);
            }
            _ => {}
        }
        let mut y = x.conv2d(&*self.weight.tensor()?, self.padding, self.stride, 1, 1)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        }
        if let Some(a) = channel_add {
            y = y.broadcast_add(&a.reshape((a.dim(0)?, a.dim(1)?, 1, 1))?)?;
        }
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }

    fn weight(&self) -> Result<Cow<'_, Tensor>> {
        self.weight.tensor()
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `x W^T + b (+ residual)`, bias and residual fused into the product on the CPU (f32).
fn linear_add(layer: &Linear, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    if kernels::supported(&[x, layer.weight()]) {
        return Ok(kernels::linear(x, layer.weight(), layer.bias(), residual)?);
    }
    let y = layer.forward(x)?;
    Ok(match residual {
        Some(r) => (y + r)?,
        None => y,
    })
}

/// A linear layer whose weight may live packed (see [`LayerWeight`]).
struct PackedLinear {
    weight: LayerWeight,
    bias: Option<Tensor>,
}

impl PackedLinear {
    fn new(layer: Linear) -> Result<Self> {
        Ok(Self {
            bias: layer.bias().cloned(),
            weight: LayerWeight::linear(layer.weight().clone())?,
        })
    }

    /// A GEGLU projection (`[2 * inner, in]`), see [`Self::forward_geglu`].
    fn new_geglu(layer: Linear) -> Result<Self> {
        Ok(Self {
            bias: layer.bias().cloned(),
            weight: LayerWeight::geglu(layer.weight().clone())?,
        })
    }

    /// `hidden * gelu_erf(gate)` of `x W^T + b`, gated per product tile on the CPU (f32).
    fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LayerWeight::Packed(p) if kernels::supported(&[x]) => {
                Ok(kernels::linear_geglu(x, p, self.bias.as_ref())?)
            }
            _ => {
                let h = linear_add(
                    &Linear::new(self.weight.tensor()?.into_owned(), self.bias.clone()),
                    x,
                    None,
                )?;
                if kernels::supported(&[&h]) {
                    return Ok(kernels::geglu(&h)?);
                }
                let half = h.dim(D::Minus1)? / 2;
                Ok((h.narrow(D::Minus1, 0, half)?
                    * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?)
            }
        }
    }

    /// `x W^T + b (+ residual)`.
    fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match &self.weight {
            LayerWeight::Packed(p) if kernels::supported(&[x]) => {
                Ok(kernels::linear_packed(x, p, self.bias.as_ref(), residual)?)
            }
            _ => linear_add(
                &Linear::new(self.weight.tensor()?.into_owned(), self.bias.clone()),
                x,
                residual,
            ),
        }
    }
}

/// GroupNorm whose per-group statistics a [`crate::attention::NormHook`] may replace.
pub(crate) struct GroupNorm {
    id: NormId,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(w: &Weights, id: NormId, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            id,
            weight: w.get(&[channels], "weight")?,
            bias: w.get(&[channels], "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        self.forward_act(x, false, ctx)
    }

    /// GroupNorm, then SiLU if `silu`; one fused pass (after the statistics) on the CPU (f32).
    pub fn forward_act(&self, x: &Tensor, silu: bool, ctx: &ForwardContext) -> Result<Tensor> {
        if kernels::supported(&[x, &self.weight]) {
            return self.forward_fused(x, silu, ctx);
        }
        let y = self.forward_ops(x, ctx)?;
        Ok(if silu { y.silu()? } else { y })
    }

    fn forward_fused(&self, x: &Tensor, silu: bool, ctx: &ForwardContext) -> Result<Tensor> {
        let (mut mean, mut var) = kernels::group_norm_stats(x, self.groups)?;
        if let Some(hook) = ctx.hooks.norm.filter(|h| h.applies_to(&self.id, &ctx.step)) {
            let b = x.dim(0)?;
            let shape = (b, self.groups);
            let (pm, pv) = hook.pool_statistics(
                &self.id,
                &ctx.step,
                Tensor::from_vec(mean, shape, x.device())?,
                Tensor::from_vec(var, shape, x.device())?,
            )?;
            mean = pm.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            var = pv.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        }
        Ok(kernels::group_norm_apply(
            x,
            self.groups,
            &mean,
            &var,
            self.eps,
            &self.weight,
            &self.bias,
            silu,
        )?)
    }

    /// The same with candle ops (other devices and dtypes).
    fn forward_ops(&self, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let hook = ctx.hooks.norm.filter(|h| h.applies_to(&self.id, &ctx.step));
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        if hook.is_none() && x.device().is_cuda() {
            // A group is a row of candle's fused layer-norm kernel (f32 statistics, one pass
            // over the data) where the ops below take ten; the affine is per channel, so the
            // kernel's own is the identity.
            let grouped = x.contiguous()?.reshape((b, self.groups, ()))?;
            let row = grouped.dim(2)?;
            let ones = Tensor::ones(row, dtype, x.device())?;
            let zeros = Tensor::zeros(row, dtype, x.device())?;
            return Ok(
                candle_nn::ops::layer_norm(&grouped, &ones, &zeros, self.eps as f32)?
                    .reshape(dims.as_slice())?
                    .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
                    .broadcast_add(&self.bias.reshape(shape.as_slice())?)?,
            );
        }
        let grouped = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let normalized = match hook {
            None => {
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
            Some(hook) => {
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let (pm, pv) = hook.pool_statistics(
                    &self.id,
                    &ctx.step,
                    mean.squeeze(D::Minus1)?,
                    var.squeeze(D::Minus1)?,
                )?;
                grouped
                    .broadcast_sub(&pm.unsqueeze(D::Minus1)?)?
                    .broadcast_div(&(pv.unsqueeze(D::Minus1)? + self.eps)?.sqrt()?)?
            }
        };
        Ok(normalized
            .reshape(dims.as_slice())?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)?)
    }
}

/// diffusers `ResnetBlock2D` (time embedding added after conv1, `default` time scale shift).
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

pub(crate) struct ResnetSpec {
    pub block: UNetBlock,
    pub index: usize,
    pub level: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock {
    pub fn new(w: &Weights, s: &ResnetSpec) -> Result<Self> {
        let id = |layer| NormId {
            layer,
            level: s.level,
        };
        Ok(Self {
            norm1: GroupNorm::new(
                &w.pp("norm1"),
                id(NormLayer::ResnetNorm1 {
                    block: s.block,
                    resnet: s.index,
                }),
                s.groups,
                s.in_channels,
                s.eps,
            )?,
            conv1: Conv2d::new(&w.pp("conv1"), s.in_channels, s.out_channels, 3, 1, 1)?,
            time_emb_proj: linear(&w.pp("time_emb_proj"), s.temb_channels, s.out_channels)?,
            norm2: GroupNorm::new(
                &w.pp("norm2"),
                id(NormLayer::ResnetNorm2 {
                    block: s.block,
                    resnet: s.index,
                }),
                s.groups,
                s.out_channels,
                s.eps,
            )?,
            conv2: Conv2d::new(&w.pp("conv2"), s.out_channels, s.out_channels, 3, 1, 1)?,
            conv_shortcut: if s.in_channels != s.out_channels {
                Some(Conv2d::new(
                    &w.pp("conv_shortcut"),
                    s.in_channels,
                    s.out_channels,
                    1,
                    0,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        // The time embedding is a per-(item, channel) addend of conv1's output, and the
        // shortcut the residual of conv2's: both ride along with the convolutions.
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = self
            .conv1
            .forward_add(&self.norm1.forward_act(x, true, ctx)?, Some(&t), None)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(
            &self.norm2.forward_act(&h, true, ctx)?,
            None,
            Some(&shortcut),
        )
    }
}

/// One attention layer (`attn1` or `attn2`) with its typed id.
pub(crate) struct Attention {
    id: AttentionId,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(
        w: &Weights,
        id: AttentionId,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            id,
            to_q: linear_no_bias(&w.pp("to_q"), query_dim, query_dim)?,
            to_k: linear_no_bias(&w.pp("to_k"), context_dim, query_dim)?,
            to_v: linear_no_bias(&w.pp("to_v"), context_dim, query_dim)?,
            to_out: linear(&w.pp("to_out.0"), query_dim, query_dim)?,
            heads,
            scale: 1.0 / ((query_dim / heads) as f64).sqrt(),
        })
    }

    pub fn id(&self) -> AttentionId {
        self.id
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(x, self.heads)
    }

    /// `x`: `[B, N, C]` tokens of an `height x width` map; `context`: text tokens for `attn2`;
    /// `residual` is added to the output projection.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        height: usize,
        width: usize,
        ctx: &ForwardContext,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let source = context.unwrap_or(x);
        let site = AttentionSite {
            id: self.id,
            height,
            width,
        };
        let hook = ctx
            .hooks
            .attention
            .filter(|h| h.applies_to(&site, &ctx.step));
        if hook.is_none() && kernels::supported(&[x, source, self.to_q.weight()]) {
            // Token layout straight through the fused kernel: no head split or merge copies.
            let out = kernels::attention(
                &linear_add(&self.to_q, x, None)?,
                &linear_add(&self.to_k, source, None)?,
                &linear_add(&self.to_v, source, None)?,
                self.heads,
                self.scale as f32,
                &[],
            )?;
            return linear_add(&self.to_out, &out, residual);
        }
        let (q, k, v) = (
            linear_add(&self.to_q, x, None)?,
            linear_add(&self.to_k, source, None)?,
            linear_add(&self.to_v, source, None)?,
        );
        let Some(hook) = hook else {
            let out = attention::plain_attention(
                &self.split_heads(&q)?,
                &self.split_heads(&k)?,
                &self.split_heads(&v)?,
                self.scale,
            )?;
            return linear_add(&self.to_out, &merge_heads(&out)?, residual);
        };
        if hook.wants_probabilities(&site, &ctx.step) {
            let p = attention::attention_probabilities(
                &self.split_heads(&q)?,
                &self.split_heads(&k)?,
                self.scale,
            )?;
            hook.observe_probabilities(&site, &ctx.step, &p)?;
        }
        let out = attention::attend(
            hook.prepare(
                &site,
                &ctx.step,
                Qkv {
                    q,
                    k,
                    v,
                    heads: self.heads,
                },
            )?,
            self.scale,
        )?;
        let out = hook.finish(&site, &ctx.step, out)?;
        linear_add(&self.to_out, &out, residual)
    }
}

/// GEGLU feed-forward: `ff.net.0.proj` to 2x4C, `hidden * gelu(gate)`, `ff.net.2` back to C.
struct FeedForward {
    proj_in: PackedLinear,
    proj_out: PackedLinear,
}

impl FeedForward {
    fn new(w: &Weights, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: PackedLinear::new_geglu(linear(&w.pp("net.0.proj"), dim, 2 * inner)?)?,
            proj_out: PackedLinear::new(linear(&w.pp("net.2"), inner, dim)?)?,
        })
    }

    /// The feed-forward of `x`, plus `residual`.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let gated = self.proj_in.forward_geglu(x)?;
        self.proj_out.forward_add(&gated, Some(residual))
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        height: usize,
        width: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let x = self
            .attn1
            .forward(&self.norm1.forward(x)?, None, height, width, ctx, Some(x))?;
        let x = self.attn2.forward(
            &self.norm2.forward(&x)?,
            Some(context),
            height,
            width,
            ctx,
            Some(&x),
        )?;
        self.ff.forward(&self.norm3.forward(&x)?, &x)
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn weight_bias(&self) -> Result<(Cow<'_, Tensor>, Option<&Tensor>)> {
        Ok(match self {
            Self::Conv(c) => (c.weight()?, c.bias()),
            Self::Linear(l) => (Cow::Borrowed(l.weight()), l.bias()),
        })
    }
}

/// diffusers `Transformer2DModel`: GroupNorm, projection in, transformer blocks, projection out,
/// residual.
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub(crate) struct TransformerSpec {
    pub block: UNetBlock,
    pub attention: usize,
    pub level: usize,
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn new(w: &Weights, s: &TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(linear(&w.pp(name), c, c)?)
            } else {
                Projection::Conv(Conv2d::new_unpacked(&w.pp(name), c, c)?)
            })
        };
        let mut blocks = Vec::with_capacity(s.layers);
        for i in 0..s.layers {
            let bw = w.pp(format!("transformer_blocks.{i}"));
            let id = |kind| AttentionId {
                block: s.block,
                attention: s.attention,
                transformer_block: i,
                kind,
                level: s.level,
            };
            blocks.push(BasicTransformerBlock {
                norm1: layer_norm(&bw.pp("norm1"), c, 1e-5)?,
                attn1: Attention::new(
                    &bw.pp("attn1"),
                    id(AttentionKind::SelfAttention),
                    c,
                    c,
                    s.heads,
                )?,
                norm2: layer_norm(&bw.pp("norm2"), c, 1e-5)?,
                attn2: Attention::new(
                    &bw.pp("attn2"),
                    id(AttentionKind::CrossAttention),
                    c,
                    s.context_dim,
                    s.heads,
                )?,
                norm3: layer_norm(&bw.pp("norm3"), c, 1e-5)?,
                ff: FeedForward::new(&bw.pp("ff"), c)?,
            });
        }
        Ok(Self {
            norm: GroupNorm::new(
                &w.pp("norm"),
                NormId {
                    layer: NormLayer::TransformerInput {
                        block: s.block,
                        attention: s.attention,
                    },
                    level: s.level,
                },
                s.groups,
                c,
                1e-6,
            )?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn attention(&self, id: &AttentionId) -> Option<&Attention> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.attn1, &b.attn2])
            .find(|a| a.id() == *id)
    }

    pub fn attention_ids(&self) -> impl Iterator<Item = AttentionId> + '_ {
        self.blocks
            .iter()
            .flat_map(|b| [b.attn1.id(), b.attn2.id()])
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x, ctx)?;
        if kernels::supported(&[x]) {
            // Both projection kinds are a [C, C] matrix; the NCHW <-> token transposes live in
            // the kernels' operand strides, and the residual rides with the output projection.
            let (pw, pb) = self.proj_in.weight_bias()?;
            let mut tokens = kernels::linear_from_channels(&normed, &pw, pb)?;
            for block in &self.blocks {
                tokens = block.forward(&tokens, context, h, w, ctx)?;
            }
            let (pw, pb) = self.proj_out.weight_bias()?;
            return Ok(kernels::linear_to_channels(
                &tokens,
                &pw,
                pb,
                Some(x),
                h,
                w,
            )?);
        }
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, h, w, ctx)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

/// Sinusoidal timestep features as diffusers' `Timesteps` computes them in float32.
pub(crate) fn timestep_features(
    values: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let denom = (half as f64 - freq_shift) as f32;
    let ln = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|j| (-ln * j as f32 / denom).exp()).collect();
    let mut data = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                args.iter().map(|a| a.cos()).collect(),
                args.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                args.iter().map(|a| a.sin()).collect(),
                args.iter().map(|a| a.cos()).collect(),
            )
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (values.len(), dim), device)?)
}

/// diffusers `TimestepEmbedding`: linear, SiLU, linear.
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&w.pp("linear_1"), in_dim, out_dim)?,
            linear_2: linear(&w.pp("linear_2"), out_dim, out_dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)?)
    }
}
