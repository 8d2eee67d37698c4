//! Our own `UNet2DConditionModel` (SD 1.x/2.x and SDXL) built from a diffusers config, with every
//! attention and GroupNorm layer reachable through the typed seam in [`crate::attention`].

mod config;
pub mod freeu;
mod layers;

pub use config::{DownBlockType, UNetConfig, UpBlockType};

use candle_core::{DType, Tensor};

use crate::attention::{AttentionId, ForwardContext, NormId, NormLayer, UNetBlock};
use crate::error::{DiffusionError, Result};
use crate::weights::Weights;
use layers::{
    timestep_features, Conv2d, GroupNorm, ResnetBlock, ResnetSpec, TimestepEmbedding,
    Transformer2D, TransformerSpec,
};

/// Conditioning for one UNet call, already in batch order.
pub struct UNetConditioning<'a> {
    /// Text context `[B, 77, C]`.
    pub context: &'a Tensor,
    /// SDXL pooled text embeddings `[B, P]` and time ids `[B, 6]`.
    pub added: Option<(&'a Tensor, &'a Tensor)>,
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    device: candle_core::Device,
}

impl UNet {
    pub fn new(config: UNetConfig, w: &Weights) -> Result<Self> {
        let c0 = config.block_out_channels[0];
        let temb = 4 * c0;
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let n = config.block_out_channels.len();

        let add_embedding = match &config.text_time {
            Some(tt) => Some(TimestepEmbedding::new(
                &w.pp("add_embedding"),
                tt.projection_input_dim,
                temb,
            )?),
            None => None,
        };

        let transformer = |bw: &Weights, block, attention, level, channels, heads, layers, ctx| {
            Transformer2D::new(
                bw,
                &TransformerSpec {
                    block,
                    attention,
                    level,
                    channels,
                    heads,
                    layers,
                    context_dim: ctx,
                    groups,
                    linear_projection: config.use_linear_projection,
                },
            )
        };
        let resnet = |rw: &Weights, block, index, level, in_c, out_c| {
            ResnetBlock::new(
                rw,
                &ResnetSpec {
                    block,
                    index,
                    level,
                    in_channels: in_c,
                    out_channels: out_c,
                    temb_channels: temb,
                    groups,
                    eps,
                },
            )
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, b) in config.down_blocks.iter().enumerate() {
            let bw = w.pp(format!("down_blocks.{i}"));
            let block = UNetBlock::Down(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..b.layers {
                let in_c = if j == 0 {
                    b.in_channels
                } else {
                    b.out_channels
                };
                resnets.push(resnet(
                    &bw.pp(format!("resnets.{j}")),
                    block,
                    j,
                    i,
                    in_c,
                    b.out_channels,
                )?);
                if b.kind == DownBlockType::CrossAttnDown {
                    attentions.push(transformer(
                        &bw.pp(format!("attentions.{j}")),
                        block,
                        j,
                        i,
                        b.out_channels,
                        b.num_heads,
                        b.transformer_layers,
                        b.cross_attention_dim,
                    )?);
                }
            }
            let downsampler = if b.downsample {
                Some(Conv2d::new(
                    &bw.pp("downsamplers.0.conv"),
                    b.out_channels,
                    b.out_channels,
                    3,
                    config.downsample_padding,
                    2,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let m = &config.mid_block;
        let mw = w.pp("mid_block");
        let mid_level = n - 1;
        let mid_block = MidBlock {
            resnets: vec![
                resnet(
                    &mw.pp("resnets.0"),
                    UNetBlock::Mid,
                    0,
                    mid_level,
                    m.channels,
                    m.channels,
                )?,
                resnet(
                    &mw.pp("resnets.1"),
                    UNetBlock::Mid,
                    1,
                    mid_level,
                    m.channels,
                    m.channels,
                )?,
            ],
            attentions: vec![transformer(
                &mw.pp("attentions.0"),
                UNetBlock::Mid,
                0,
                mid_level,
                m.channels,
                m.num_heads,
                m.transformer_layers,
                m.cross_attention_dim,
            )?],
        };

        let mut up_blocks = Vec::with_capacity(n);
        for (i, b) in config.up_blocks.iter().enumerate() {
            let bw = w.pp(format!("up_blocks.{i}"));
            let block = UNetBlock::Up(i);
            let level = n - 1 - i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..b.layers {
                let skip = if j + 1 == b.layers {
                    b.skip_in_channels
                } else {
                    b.out_channels
                };
                let in_c = if j == 0 {
                    b.prev_out_channels
                } else {
                    b.out_channels
                };
                resnets.push(resnet(
                    &bw.pp(format!("resnets.{j}")),
                    block,
                    j,
                    level,
                    in_c + skip,
                    b.out_channels,
                )?);
                if b.kind == UpBlockType::CrossAttnUp {
                    attentions.push(transformer(
                        &bw.pp(format!("attentions.{j}")),
                        block,
                        j,
                        level,
                        b.out_channels,
                        b.num_heads,
                        b.transformer_layers,
                        b.cross_attention_dim,
                    )?);
                }
            }
            let upsampler = if b.upsample {
                Some(Conv2d::new(
                    &bw.pp("upsamplers.0.conv"),
                    b.out_channels,
                    b.out_channels,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), config.in_channels, c0, 3, 1, 1)?,
            time_embedding: TimestepEmbedding::new(&w.pp("time_embedding"), c0, temb)?,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &w.pp("conv_norm_out"),
                NormId {
                    layer: NormLayer::Output,
                    level: 0,
                },
                groups,
                c0,
                eps,
            )?,
            conv_out: Conv2d::new(&w.pp("conv_out"), c0, config.out_channels, 3, 1, 1)?,
            dtype: w.dtype(),
            device: w.device().clone(),
            config,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Every attention layer, in diffusers' processor order (down blocks, up blocks, mid block;
    /// `attn1` before `attn2` in each transformer block) — the order StyleAligned's
    /// `only_self_level` counts in.
    pub fn attention_ids(&self) -> Vec<AttentionId> {
        let down = self.down_blocks.iter().flat_map(|b| b.attentions.iter());
        let up = self.up_blocks.iter().flat_map(|b| b.attentions.iter());
        let mid = self.mid_block.attentions.iter();
        down.chain(up)
            .chain(mid)
            .flat_map(|t| t.attention_ids())
            .collect()
    }

    /// Runs one attention layer on its input `x` `[B, N, C]` (the output of the norm before it),
    /// hooks included: for checking a method against reference tensors of a single layer.
    pub fn run_attention(
        &self,
        id: &AttentionId,
        x: &Tensor,
        context: Option<&Tensor>,
        height: usize,
        width: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let transformers = self
            .down_blocks
            .iter()
            .flat_map(|b| b.attentions.iter())
            .chain(self.up_blocks.iter().flat_map(|b| b.attentions.iter()))
            .chain(self.mid_block.attentions.iter());
        let layer = transformers
            .filter_map(|t| t.attention(id))
            .next()
            .ok_or_else(|| {
                DiffusionError::invalid_argument("attention", format!("no layer {id}"))
            })?;
        layer.forward(&x.to_dtype(self.dtype)?, context, height, width, ctx, None)
    }

    /// `temb` (before SDXL's added embedding) and the added embedding, for debugging and goldens.
    pub fn time_embeddings(
        &self,
        timestep: f64,
        batch: usize,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let device = self.device.clone();
        let c0 = self.config.block_out_channels[0];
        let t = timestep_features(
            &vec![timestep as f32; batch],
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &device,
        )?
        .to_dtype(self.dtype)?;
        let temb = self.time_embedding.forward(&t)?;
        let aug = match (&self.add_embedding, &self.config.text_time, added) {
            (Some(embedding), Some(tt), Some((text_embeds, time_ids))) => {
                let ids: Vec<f32> = time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let features = timestep_features(
                    &ids,
                    tt.time_embed_dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                    &device,
                )?
                .reshape((batch, ()))?
                .to_dtype(self.dtype)?;
                let input = Tensor::cat(&[&text_embeds.to_dtype(self.dtype)?, &features], 1)?;
                Some(embedding.forward(&input)?)
            }
            (Some(_), _, None) => {
                return Err(DiffusionError::invalid_argument(
                    "added_conditioning",
                    "this UNet (text_time) needs pooled text embeddings and time ids",
                ))
            }
            _ => None,
        };
        Ok((temb, aug))
    }

    /// One forward pass: `sample` `[B, C, h, w]` at `timestep`, noise prediction out.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        Ok(self.forward_with_debug(sample, timestep, cond, ctx)?.out)
    }

    pub fn forward_with_debug(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        ctx: &ForwardContext,
    ) -> Result<UNetOutput> {
        let (batch, _, _, _) = sample.dims4()?;
        if cond.context.dim(0)? != batch {
            return Err(DiffusionError::invalid_argument(
                "context",
                format!(
                    "batch {} for a sample batch of {batch}",
                    cond.context.dim(0)?
                ),
            ));
        }
        let context = cond.context.to_dtype(self.dtype)?;
        let (temb_plain, aug) = self.time_embeddings(timestep, batch, cond.added)?;
        let temb = match &aug {
            Some(a) => (&temb_plain + a)?,
            None => temb_plain.clone(),
        };

        let mut x = self.conv_in.forward(&sample.to_dtype(self.dtype)?)?;
        let conv_in_out = x.clone();
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, &temb, ctx)?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context, ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = self.mid_block.resnets[0].forward(&x, &temb, ctx)?;
        for (attn, resnet) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            x = attn.forward(&x, &context, ctx)?;
            x = resnet.forward(&x, &temb, ctx)?;
        }
        if self.config.mid_block_scale_factor != 1.0 {
            x = (x * self.config.mid_block_scale_factor)?;
        }
        let mid_out = x.clone();

        for (index, block) in self.up_blocks.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    DiffusionError::invalid_argument("sample", "skip connections exhausted")
                })?;
                let skip = match &ctx.hooks.freeu {
                    Some(freeu) => {
                        let (scaled, filtered) = freeu::apply(freeu, index, &x, &skip)?;
                        x = scaled;
                        filtered
                    }
                    None => skip,
                };
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet.forward(&x, &temb, ctx)?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context, ctx)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Resize to the next skip's size, not 2x: odd latent sides (e.g. 8x10 -> 4x5 ->
                // 2x3) must come back to their exact size, as diffusers' `upsample_size` does.
                let (_, _, h, w) = skips
                    .last()
                    .ok_or_else(|| {
                        DiffusionError::invalid_argument("sample", "no skip to upsample to")
                    })?
                    .dims4()?;
                x = up.forward(&x.upsample_nearest2d(h, w)?)?;
            }
            if let Some(hook) = ctx
                .hooks
                .blocks
                .filter(|b| b.wants_up_block(index, &ctx.step))
            {
                hook.observe_up_block(index, &ctx.step, &x)?;
            }
        }

        let out = self
            .conv_out
            .forward(&self.conv_norm_out.forward_act(&x, true, ctx)?)?;
        Ok(UNetOutput {
            out,
            temb: temb_plain,
            aug,
            conv_in: conv_in_out,
            mid_out,
        })
    }
}

/// The UNet output plus the intermediate tensors the goldens pin down.
pub struct UNetOutput {
    pub out: Tensor,
    pub temb: Tensor,
    pub aug: Option<Tensor>,
    pub conv_in: Tensor,
    pub mid_out: Tensor,
}
