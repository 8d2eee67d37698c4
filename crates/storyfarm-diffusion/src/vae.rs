//! The KL autoencoder (diffusers `AutoencoderKL`) that maps images to latents and back.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, GroupNorm, Linear};
use serde::Deserialize;

use crate::component::read_json;
use crate::error::{DiffusionError, Result};
use crate::layers::{conv2d, group_norm, linear, scaled_dot_product_attention};
use crate::model::weight_files_in;
use crate::weights::Weights;

const COMPONENT: &str = "vae";
/// diffusers builds every VAE GroupNorm with this epsilon (not the UNet's 1e-5).
const NORM_EPS: f64 = 1e-6;

/// A diffusers `vae/config.json`, restricted to what SD 1.x/2.x and SDXL VAEs use.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Whether diffusers runs this VAE in f32 even in half-precision pipelines.
    pub force_upcast: bool,
    pub sample_size: Option<usize>,
}

#[derive(Deserialize)]
struct RawVaeConfig {
    #[serde(default = "default_image_channels")]
    in_channels: usize,
    #[serde(default = "default_image_channels")]
    out_channels: usize,
    #[serde(default)]
    down_block_types: Vec<String>,
    #[serde(default)]
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    act_fn: String,
    #[serde(default = "default_latent_channels")]
    latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    latents_std: Option<serde_json::Value>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
    #[serde(default = "default_force_upcast")]
    force_upcast: bool,
    #[serde(default)]
    sample_size: Option<usize>,
}

fn default_image_channels() -> usize {
    3
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_force_upcast() -> bool {
    true
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let raw: RawVaeConfig = read_json(path)?;
        Self::from_raw(raw)
    }

    pub fn from_json_str(json: &str) -> Result<Self> {
        let raw: RawVaeConfig =
            serde_json::from_str(json).map_err(|e| DiffusionError::ConfigFile {
                path: "<inline json>".into(),
                message: e.to_string(),
            })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawVaeConfig) -> Result<Self> {
        let levels = raw.block_out_channels.len();
        if levels == 0 {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "block_out_channels",
                "empty",
            ));
        }
        check_block_types(
            "down_block_types",
            &raw.down_block_types,
            "DownEncoderBlock2D",
            levels,
        )?;
        check_block_types(
            "up_block_types",
            &raw.up_block_types,
            "UpDecoderBlock2D",
            levels,
        )?;
        if raw.act_fn != "silu" {
            return Err(DiffusionError::unsupported(
                COMPONENT,
                "act_fn",
                &raw.act_fn,
            ));
        }
        // A shift would have to be applied around the scaling factor; SD/SDXL VAEs have none.
        if let Some(shift) = raw.shift_factor.filter(|&s| s != 0.0) {
            return Err(DiffusionError::unsupported(
                COMPONENT,
                "shift_factor",
                shift,
            ));
        }
        for (field, value) in [
            ("latents_mean", &raw.latents_mean),
            ("latents_std", &raw.latents_std),
        ] {
            if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
                return Err(DiffusionError::unsupported(COMPONENT, field, value));
            }
        }
        if raw.norm_num_groups == 0
            || raw
                .block_out_channels
                .iter()
                .any(|c| !c.is_multiple_of(raw.norm_num_groups))
        {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "norm_num_groups",
                format!(
                    "{} groups do not divide block_out_channels {:?}",
                    raw.norm_num_groups, raw.block_out_channels
                ),
            ));
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor,
            use_quant_conv: raw.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
            mid_block_add_attention: raw.mid_block_add_attention.unwrap_or(true),
            force_upcast: raw.force_upcast,
            sample_size: raw.sample_size,
        })
    }

    /// Pixels per latent along each axis (8 for SD/SDXL).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn check_block_types(field: &str, types: &[String], expected: &str, levels: usize) -> Result<()> {
    if let Some(other) = types.iter().find(|t| t.as_str() != expected) {
        return Err(DiffusionError::unsupported(COMPONENT, field, other));
    }
    if types.len() != levels {
        return Err(DiffusionError::invalid_config(
            COMPONENT,
            field,
            format!("{} entries for {levels} block_out_channels", types.len()),
        ));
    }
    Ok(())
}

/// diffusers `ResnetBlock2D` without time embedding.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(
        weights: &Weights,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                &weights.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(&weights.pp("norm1"), groups, in_channels, NORM_EPS)?,
            conv1: conv2d(&weights.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            norm2: group_norm(&weights.pp("norm2"), groups, out_channels, NORM_EPS)?,
            conv2: conv2d(&weights.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok((shortcut + h)?)
    }
}

/// The single-head self-attention of the VAE mid block, over all H*W positions.
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(weights: &Weights, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 use the old attention names.
        let legacy = !weights.contains("to_q.weight") && weights.contains("query.weight");
        let [q, k, v, out] = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: group_norm(&weights.pp("group_norm"), groups, channels, NORM_EPS)?,
            to_q: linear(&weights.pp(q), channels, channels)?,
            to_k: linear(&weights.pp(k), channels, channels)?,
            to_v: linear(&weights.pp(v), channels, channels)?,
            to_out: linear(&weights.pp(out), channels, channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self
            .to_out
            .forward(&scaled_dot_product_attention(&q, &k, &v, None)?)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        Ok((out + x)?)
    }
}

/// diffusers `UNetMidBlock2D` as used by the VAE: resnet, optional attention, resnet.
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<MidAttention>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(weights: &Weights, channels: usize, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        let attention = if config.mid_block_add_attention {
            Some(MidAttention::new(
                &weights.pp("attentions.0"),
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet_in: ResnetBlock::new(&weights.pp("resnets.0"), channels, channels, groups)?,
            attention,
            resnet_out: ResnetBlock::new(&weights.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet_in.forward(x)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(&x)?;
        }
        self.resnet_out.forward(&x)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resample {
    /// `downsamplers.0`: stride-2 conv (encoder).
    Down,
    /// `upsamplers.0`: nearest 2x, then conv (decoder).
    Up,
}

/// A stack of resnets, then an optional 2x resampler (down in the encoder, up in the decoder).
struct Level {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

impl Level {
    fn new(
        weights: &Weights,
        in_channels: usize,
        out_channels: usize,
        num_resnets: usize,
        resample: Option<Resample>,
        config: &VaeConfig,
    ) -> Result<Self> {
        let resnets = (0..num_resnets)
            .map(|i| {
                let in_ch = if i == 0 { in_channels } else { out_channels };
                ResnetBlock::new(
                    &weights.pp("resnets").pp(i),
                    in_ch,
                    out_channels,
                    config.norm_num_groups,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = match resample {
            // Downsample2D(padding=0) pads right/bottom itself, so the conv has no padding.
            Some(Resample::Down) => Some(conv2d(
                &weights.pp("downsamplers.0.conv"),
                out_channels,
                out_channels,
                3,
                2,
                0,
            )?),
            Some(Resample::Up) => Some(conv2d(
                &weights.pp("upsamplers.0.conv"),
                out_channels,
                out_channels,
                3,
                1,
                1,
            )?),
            None => None,
        };
        Ok(Self { resnets, resample })
    }

    fn forward_resnets(&self, x: &Tensor) -> Result<Tensor> {
        self.resnets
            .iter()
            .try_fold(x.clone(), |x, resnet| resnet.forward(&x))
    }

    fn forward_down(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.forward_resnets(x)?;
        match &self.resample {
            Some(conv) => Ok(conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?),
            None => Ok(x),
        }
    }

    fn forward_up(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.forward_resnets(x)?;
        match &self.resample {
            Some(conv) => {
                let (_, _, height, width) = x.dims4()?;
                Ok(conv.forward(&x.upsample_nearest2d(height * 2, width * 2)?)?)
            }
            None => Ok(x),
        }
    }
}

struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(weights: &Weights, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let last = channels.len() - 1;
        let levels = channels
            .iter()
            .enumerate()
            .map(|(i, &out_ch)| {
                let in_ch = if i == 0 { channels[0] } else { channels[i - 1] };
                let resample = (i != last).then_some(Resample::Down);
                Level::new(
                    &weights.pp("down_blocks").pp(i),
                    in_ch,
                    out_ch,
                    config.layers_per_block,
                    resample,
                    config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: conv2d(
                &weights.pp("conv_in"),
                config.in_channels,
                channels[0],
                3,
                1,
                1,
            )?,
            levels,
            mid_block: MidBlock::new(&weights.pp("mid_block"), channels[last], config)?,
            conv_norm_out: group_norm(
                &weights.pp("conv_norm_out"),
                config.norm_num_groups,
                channels[last],
                NORM_EPS,
            )?,
            conv_out: conv2d(
                &weights.pp("conv_out"),
                channels[last],
                2 * config.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for level in &self.levels {
            x = level.forward_down(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        Ok(self
            .conv_out
            .forward(&self.conv_norm_out.forward(&x)?.silu()?)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    levels: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(weights: &Weights, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let last = reversed.len() - 1;
        let levels = reversed
            .iter()
            .enumerate()
            .map(|(i, &out_ch)| {
                let in_ch = if i == 0 { reversed[0] } else { reversed[i - 1] };
                let resample = (i != last).then_some(Resample::Up);
                Level::new(
                    &weights.pp("up_blocks").pp(i),
                    in_ch,
                    out_ch,
                    config.layers_per_block + 1,
                    resample,
                    config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: conv2d(
                &weights.pp("conv_in"),
                config.latent_channels,
                reversed[0],
                3,
                1,
                1,
            )?,
            mid_block: MidBlock::new(&weights.pp("mid_block"), reversed[0], config)?,
            levels,
            conv_norm_out: group_norm(
                &weights.pp("conv_norm_out"),
                config.norm_num_groups,
                reversed[last],
                NORM_EPS,
            )?,
            conv_out: conv2d(
                &weights.pp("conv_out"),
                reversed[last],
                config.out_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for level in &self.levels {
            x = level.forward_up(&x)?;
        }
        Ok(self
            .conv_out
            .forward(&self.conv_norm_out.forward(&x)?.silu()?)?)
    }
}

/// The encoder's diagonal Gaussian posterior over latents.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// [B, latent_channels, H/8, W/8] raw (unscaled) latents.
    pub mean: Tensor,
    /// Same shape, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }
}

/// diffusers `AutoencoderKL` (SD 1.x/2.x and SDXL VAEs).
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKl {
    /// `weights` is the root of the checkpoint (`encoder.`, `decoder.`, `quant_conv.` ...).
    pub fn new(config: &VaeConfig, weights: &Weights) -> Result<Self> {
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(
                &weights.pp("quant_conv"),
                2 * latent,
                2 * latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(
                &weights.pp("post_quant_conv"),
                latent,
                latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(&weights.pp("encoder"), config)?,
            decoder: Decoder::new(&weights.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
        })
    }

    /// Loads `vae_dir/config.json` and its weights
    /// (`diffusion_pytorch_model.safetensors`, else the `.fp16` variant).
    pub fn load(vae_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::load(&vae_dir.join("config.json"))?;
        let files = weight_files_in(vae_dir, dtype)?;
        let weights = Weights::from_safetensors(&files, dtype, device)?;
        Self::new(&config, &weights)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `image`: [B, 3, H, W] in [-1, 1], H and W multiples of 8.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let (_, _, height, width) = image.dims4()?;
        let factor = self.config.downscale_factor();
        if height % factor != 0 || width % factor != 0 {
            return Err(DiffusionError::invalid_argument(
                "image",
                format!("size {height}x{width} (HxW) is not a multiple of {factor}"),
            ));
        }
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        let latent = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Raw latents (no scaling factor) to an image [B, 3, 8h, 8w], unclamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// The latents a pipeline works with: `mean * scaling_factor`.
    pub fn encode_scaled(&self, image: &Tensor) -> Result<Tensor> {
        Ok((self.encode(image)?.mean * self.config.scaling_factor)?)
    }

    /// Pipeline latents to an image: `decode(latents / scaling_factor)`.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents / self.config.scaling_factor)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn fixtures() -> PathBuf {
        PathBuf::from(FIXTURES)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn assert_close(
        name: &str,
        actual: &Tensor,
        expected: &Tensor,
        tolerance: f32,
    ) -> anyhow::Result<()> {
        let diff = max_abs_diff(actual, expected)?;
        println!("{name}: max abs diff {diff:e}");
        assert!(
            diff <= tolerance,
            "{name}: max abs diff {diff} > {tolerance}"
        );
        Ok(())
    }

    fn check_golden(model: &str, golden: &str) -> anyhow::Result<()> {
        let vae = AutoencoderKl::load(
            &fixtures().join("models").join(model).join("vae"),
            DType::F32,
            &Device::Cpu,
        )?;
        let g: HashMap<String, Tensor> = candle_core::safetensors::load(
            fixtures().join(format!("{golden}.safetensors")),
            &Device::Cpu,
        )?;
        let posterior = vae.encode(&g["image"])?;
        assert_close(
            &format!("{golden} latent_mean"),
            &posterior.mean,
            &g["latent_mean"],
            5e-4,
        )?;
        assert_close(
            &format!("{golden} latent_logvar"),
            &posterior.logvar,
            &g["latent_logvar"],
            1e-4,
        )?;
        assert_close(
            &format!("{golden} latent_std"),
            &posterior.std()?,
            &g["latent_std"],
            1e-4,
        )?;
        assert_close(
            &format!("{golden} decode_out"),
            &vae.decode(&g["decode_in"])?,
            &g["decode_out"],
            1e-4,
        )?;
        assert_close(
            &format!("{golden} recon_out"),
            &vae.decode(&g["latent_mean"])?,
            &g["recon_out"],
            1e-4,
        )?;

        let scaled = vae.encode_scaled(&g["image"])?;
        let expected = (&g["latent_mean"] * vae.scaling_factor())?;
        assert_close(
            &format!("{golden} encode_scaled"),
            &scaled,
            &expected,
            5e-4 * vae.scaling_factor() as f32,
        )?;
        let unscaled_back = vae.decode_scaled(&(&g["decode_in"] * vae.scaling_factor())?)?;
        assert_close(
            &format!("{golden} decode_scaled"),
            &unscaled_back,
            &g["decode_out"],
            1e-4,
        )?;
        Ok(())
    }

    #[test]
    fn sd15_vae_64x64() -> anyhow::Result<()> {
        check_golden("tiny-sd15", "sd15/vae_64x64")
    }

    #[test]
    fn sd15_vae_64x96() -> anyhow::Result<()> {
        check_golden("tiny-sd15", "sd15/vae_64x96")
    }

    #[test]
    fn sdxl_vae_64x64() -> anyhow::Result<()> {
        check_golden("tiny-sdxl", "sdxl/vae_64x64")
    }

    #[test]
    fn sdxl_vae_64x96() -> anyhow::Result<()> {
        check_golden("tiny-sdxl", "sdxl/vae_64x96")
    }

    #[test]
    fn parses_real_configs() -> anyhow::Result<()> {
        let dir = fixtures().join("real-configs");
        let sd15 = VaeConfig::load(&dir.join("sd15_vae.json"))?;
        assert_eq!(sd15.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!(
            (
                sd15.layers_per_block,
                sd15.norm_num_groups,
                sd15.scaling_factor
            ),
            (2, 32, 0.18215)
        );
        assert!(sd15.use_quant_conv && sd15.use_post_quant_conv && sd15.mid_block_add_attention);
        assert_eq!(sd15.downscale_factor(), 8);
        let sdxl = VaeConfig::load(&dir.join("sdxl_vae.json"))?;
        assert_eq!(
            (sdxl.scaling_factor, sdxl.sample_size),
            (0.13025, Some(1024))
        );
        assert!(sdxl.force_upcast);
        Ok(())
    }

    #[test]
    fn rejects_unsupported_configs() -> anyhow::Result<()> {
        let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixtures().join("real-configs/sd15_vae.json"),
        )?)?;
        let cases = [
            ("shift_factor", serde_json::json!(0.1159), "0.1159"),
            ("act_fn", serde_json::json!("gelu"), "gelu"),
            (
                "down_block_types",
                serde_json::json!([
                    "DownEncoderBlock2D",
                    "AttnDownEncoderBlock2D",
                    "DownEncoderBlock2D",
                    "DownEncoderBlock2D"
                ]),
                "AttnDownEncoderBlock2D",
            ),
        ];
        for (field, value, shown) in cases {
            let mut json = base.clone();
            json[field] = value;
            let err = VaeConfig::from_json_str(&json.to_string()).err();
            assert!(
                matches!(&err, Some(DiffusionError::UnsupportedConfig { field: f, value: v, .. })
                    if f == field && v == shown),
                "{field}: {err:?}"
            );
        }
        let mut zero_shift = base.clone();
        zero_shift["shift_factor"] = serde_json::json!(0.0);
        VaeConfig::from_json_str(&zero_shift.to_string())?;
        Ok(())
    }

    #[test]
    fn loads_legacy_attention_names() -> anyhow::Result<()> {
        let dir = fixtures().join("models/tiny-sd15/vae");
        let tensors = candle_core::safetensors::load(
            dir.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )?;
        let renamed: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let name = name
                    .replace(".to_q.", ".query.")
                    .replace(".to_k.", ".key.")
                    .replace(".to_v.", ".value.")
                    .replace(".to_out.0.", ".proj_attn.");
                (name, t)
            })
            .collect();
        let scratch =
            std::env::temp_dir().join(format!("storyfarm-vae-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        std::fs::copy(dir.join("config.json"), scratch.join("config.json"))?;
        candle_core::safetensors::save(
            &renamed,
            scratch.join("diffusion_pytorch_model.fp16.safetensors"),
        )?;
        let g = candle_core::safetensors::load(
            fixtures().join("sd15/vae_64x64.safetensors"),
            &Device::Cpu,
        )?;
        let decoded = AutoencoderKl::load(&scratch, DType::F32, &Device::Cpu)
            .and_then(|vae| vae.decode(&g["decode_in"]));
        std::fs::remove_dir_all(&scratch)?;
        assert_close("legacy decode_out", &decoded?, &g["decode_out"], 1e-4)
    }
}
