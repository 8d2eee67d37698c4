//! The UNet's building blocks (convolutions, GroupNorm with statistic hooks, ResNet blocks,
//! transformer blocks with hookable attention), named as in diffusers checkpoints.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use crate::attention::{
    self, AttentionId, AttentionInputs, AttentionKind, AttentionSite, ForwardContext, NormId,
    NormLayer, Qkv, UNetBlock,
};
use crate::error::Result;
use crate::layers::{layer_norm, linear, linear_no_bias, split_heads};
use crate::weights::Weights;

pub(crate) struct Conv2d {
    weight: Tensor,
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
        Ok(Self {
            weight: w.get(&[out_c, in_c, kernel, kernel], "weight")?,
            bias: Some(w.get(&[out_c], "bias")?),
            padding,
            stride,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
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
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let grouped = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let hook = ctx
            .hooks
            .norm
            .filter(|h| h.applies_to(&self.id, &ctx.step));
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
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
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
        let id = |layer| NormId { layer, level: s.level };
        Ok(Self {
            norm1: GroupNorm::new(
                &w.pp("norm1"),
                id(NormLayer::ResnetNorm1 { block: s.block, resnet: s.index }),
                s.groups,
                s.in_channels,
                s.eps,
            )?,
            conv1: Conv2d::new(&w.pp("conv1"), s.in_channels, s.out_channels, 3, 1, 1)?,
            time_emb_proj: linear(&w.pp("time_emb_proj"), s.temb_channels, s.out_channels)?,
            norm2: GroupNorm::new(
                &w.pp("norm2"),
                id(NormLayer::ResnetNorm2 { block: s.block, resnet: s.index }),
                s.groups,
                s.out_channels,
                s.eps,
            )?,
            conv2: Conv2d::new(&w.pp("conv2"), s.out_channels, s.out_channels, 3, 1, 1)?,
            conv_shortcut: if s.in_channels != s.out_channels {
                Some(Conv2d::new(&w.pp("conv_shortcut"), s.in_channels, s.out_channels, 1, 0, 1)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, ctx)?.silu()?)?;
        let t = self.time_emb_proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, ctx)?.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((shortcut + h)?)
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

    /// `x`: `[B, N, C]` tokens of an `height x width` map; `context`: text tokens for `attn2`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        height: usize,
        width: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let source = context.unwrap_or(x);
        let qkv = Qkv {
            q: self.split_heads(&self.to_q.forward(x)?)?,
            k: self.split_heads(&self.to_k.forward(source)?)?,
            v: self.split_heads(&self.to_v.forward(source)?)?,
        };
        let site = AttentionSite { id: self.id, height, width };
        let hook = ctx
            .hooks
            .attention
            .filter(|h| h.applies_to(&site, &ctx.step));
        let out = match hook {
            None => attention::plain_attention(&qkv.q, &qkv.k, &qkv.v, self.scale)?,
            Some(hook) => {
                if hook.wants_probabilities(&site, &ctx.step) {
                    let p = attention::attention_probabilities(&qkv.q, &qkv.k, self.scale)?;
                    hook.observe_probabilities(&site, &ctx.step, &p)?;
                }
                let AttentionInputs { qkv, extra } = hook.prepare(&site, &ctx.step, qkv)?;
                attention::attention(&qkv.q, &qkv.k, &qkv.v, self.scale, &extra)?
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, n, c))?;
        let out = match hook {
            Some(hook) => hook.finish(&site, &ctx.step, out)?,
            None => out,
        };
        Ok(self.to_out.forward(&out)?)
    }
}

/// GEGLU feed-forward: `ff.net.0.proj` to 2x4C, `hidden * gelu(gate)`, `ff.net.2` back to C.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(w: &Weights, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: linear(&w.pp("net.0.proj"), dim, 2 * inner)?,
            proj_out: linear(&w.pp("net.2"), inner, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let half = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        Ok(self.proj_out.forward(&(hidden * gate.gelu_erf()?)?)?)
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
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, height, width, ctx)? + x)?;
        let x =
            (self.attn2.forward(&self.norm2.forward(&x)?, Some(context), height, width, ctx)? + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + x)?)
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
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
                Projection::Conv(Conv2d::new(&w.pp(name), c, c, 1, 0, 1)?)
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
                attn1: Attention::new(&bw.pp("attn1"), id(AttentionKind::SelfAttention), c, c, s.heads)?,
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
                    layer: NormLayer::TransformerInput { block: s.block, attention: s.attention },
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
        self.blocks.iter().flat_map(|b| [b.attn1.id(), b.attn2.id()])
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x, ctx)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, h, w, ctx)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?)
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
            (args.iter().map(|a| a.cos()).collect(), args.iter().map(|a| a.sin()).collect())
        } else {
            (args.iter().map(|a| a.sin()).collect(), args.iter().map(|a| a.cos()).collect())
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
