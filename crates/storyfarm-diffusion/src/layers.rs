//! Basic layers built from checkpoint tensors (linear, norms, convolutions) and the plain
//! multi-head attention kernel shared by the text encoders and the VAE.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear};

use crate::error::Result;
use crate::weights::Weights;

/// `weight` [out, in] and `bias` [out].
pub fn linear(weights: &Weights, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = weights.get(&[out_dim, in_dim], "weight")?;
    let bias = weights.get(&[out_dim], "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// `weight` [out, in] only.
pub fn linear_no_bias(weights: &Weights, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = weights.get(&[out_dim, in_dim], "weight")?;
    Ok(Linear::new(weight, None))
}

pub fn layer_norm(weights: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    let weight = weights.get(&[dim], "weight")?;
    let bias = weights.get(&[dim], "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

pub fn group_norm(
    weights: &Weights,
    num_groups: usize,
    channels: usize,
    eps: f64,
) -> Result<GroupNorm> {
    let weight = weights.get(&[channels], "weight")?;
    let bias = weights.get(&[channels], "bias")?;
    Ok(GroupNorm::new(weight, bias, channels, num_groups, eps)?)
}

/// A square-kernel convolution with bias, symmetric zero padding `padding` and stride `stride`.
pub fn conv2d(
    weights: &Weights,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let weight = weights.get(&[out_channels, in_channels, kernel, kernel], "weight")?;
    let bias = weights.get(&[out_channels], "bias")?;
    let config = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), config))
}

/// [B, N, H*d] -> [B, H, N, d]
pub fn split_heads(x: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (batch, tokens, channels) = x.dims3()?;
    Ok(x.reshape((batch, tokens, num_heads, channels / num_heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// [B, H, N, d] -> [B, N, H*d]
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = x.dims4()?;
    Ok(x.transpose(1, 2)?
        .reshape((batch, tokens, heads * head_dim))?)
}

/// `softmax(q k^T / sqrt(d) + mask) v` for q [.., Nq, d], k and v [.., Nk, d]; `mask` is added
/// to the scores (broadcast), `-inf` entries exclude a key.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = (head_dim as f64).powf(-0.5);
    let Some(mask) = mask else {
        // Unmasked attention (the VAE's) goes through the chunked kernel: a 1024x1024 image
        // has 16384 latent tokens, whose full logit matrix would take 1 GiB.
        return crate::attention::plain_attention(q, k, v, scale);
    };
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?)
}

/// [Nq, Nk] additive mask that lets query i see keys 0..=i only.
pub fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (len, len), device)?.to_dtype(dtype)?)
}
