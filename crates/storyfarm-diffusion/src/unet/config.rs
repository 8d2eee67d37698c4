//! `unet/config.json` as diffusers' `UNet2DConditionModel` interprets it, resolved into the
//! per-block numbers the model is built from. Anything we do not implement is an error naming
//! the field and value.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{DiffusionError, Result};

const COMPONENT: &str = "unet";

/// A config value that is either one number for all blocks or one per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    fn resolve(&self, field: &str, blocks: usize) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); blocks]),
            Self::Each(v) if v.len() == blocks => Ok(v.clone()),
            Self::Each(v) => Err(DiffusionError::invalid_config(
                COMPONENT,
                field,
                format!("has {} entries for {blocks} blocks: {v:?}", v.len()),
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownBlockType {
    Down,
    CrossAttnDown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpBlockType {
    Up,
    CrossAttnUp,
}

/// The diffusers fields we read; the rest are checked against their supported values.
#[derive(Clone, Debug, Deserialize)]
struct RawUNetConfig {
    #[serde(default = "default_in_channels")]
    in_channels: usize,
    #[serde(default = "default_in_channels")]
    out_channels: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    layers_per_block: PerBlock<usize>,
    #[serde(default = "default_heads")]
    attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock<usize>>,
    cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_transformer_layers")]
    transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default = "default_groups")]
    norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    norm_eps: f64,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_one")]
    mid_block_scale_factor: f64,
    #[serde(default = "default_one_usize")]
    downsample_padding: usize,
}

fn default_in_channels() -> usize {
    4
}
fn default_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}

/// Fields that only have one supported value (the one every SD 1.x/2.x/XL checkpoint uses).
/// A null value means "diffusers default", which is that value too.
const FIXED_FIELDS: &[(&str, &str)] = &[
    ("act_fn", "\"silu\""),
    ("center_input_sample", "false"),
    ("class_embed_type", "null"),
    ("class_embeddings_concat", "false"),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("cross_attention_norm", "null"),
    ("dual_cross_attention", "false"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("mid_block_only_cross_attention", "null"),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("num_class_embeds", "null"),
    ("only_cross_attention", "false"),
    ("resnet_out_scale_factor", "1.0"),
    ("resnet_skip_time_act", "false"),
    ("resnet_time_scale_shift", "\"default\""),
    ("reverse_transformer_layers_per_block", "null"),
    ("time_cond_proj_dim", "null"),
    ("time_embedding_act_fn", "null"),
    ("time_embedding_dim", "null"),
    ("time_embedding_type", "\"positional\""),
    ("timestep_post_act", "null"),
    ("attention_type", "\"default\""),
];

/// Fields we read (or that do not change inference) and accept with any value.
const KNOWN_FIELDS: &[&str] = &[
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "use_linear_projection",
    "upcast_attention",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "mid_block_scale_factor",
    "downsample_padding",
    "sample_size",
    "dropout",
    "addition_embed_type_num_heads",
];

/// One resolved down block.
#[derive(Clone, Debug)]
pub struct DownBlockConfig {
    pub kind: DownBlockType,
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub transformer_layers: usize,
    pub num_heads: usize,
    pub cross_attention_dim: usize,
    pub downsample: bool,
}

#[derive(Clone, Debug)]
pub struct MidBlockConfig {
    pub channels: usize,
    pub transformer_layers: usize,
    pub num_heads: usize,
    pub cross_attention_dim: usize,
}

#[derive(Clone, Debug)]
pub struct UpBlockConfig {
    pub kind: UpBlockType,
    /// Channels of the block's input (the previous up block's output).
    pub prev_out_channels: usize,
    pub out_channels: usize,
    /// Channels of the deepest skip connection this block consumes.
    pub skip_in_channels: usize,
    pub layers: usize,
    pub transformer_layers: usize,
    pub num_heads: usize,
    pub cross_attention_dim: usize,
    pub upsample: bool,
}

/// SDXL's added conditioning (`addition_embed_type: text_time`).
#[derive(Clone, Debug)]
pub struct TextTimeConfig {
    pub time_embed_dim: usize,
    pub projection_input_dim: usize,
}

/// The UNet configuration, resolved block by block.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<DownBlockConfig>,
    pub mid_block: MidBlockConfig,
    pub up_blocks: Vec<UpBlockConfig>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub text_time: Option<TextTimeConfig>,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: usize,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DiffusionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DiffusionError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let object = value.as_object().ok_or_else(|| {
            DiffusionError::invalid_config(COMPONENT, "<root>", "config is not a JSON object")
        })?;
        for (field, v) in object {
            if field.starts_with('_') {
                continue;
            }
            if let Some((_, expected)) = FIXED_FIELDS.iter().find(|(f, _)| f == field) {
                let expected: Value = serde_json::from_str(expected).unwrap_or(Value::Null);
                let same = match (&expected, v) {
                    (_, Value::Null) => true,
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    (a, b) => a == b,
                };
                if !same {
                    return Err(DiffusionError::unsupported(COMPONENT, field.as_str(), v));
                }
                continue;
            }
            let harmless = matches!(v, Value::Null | Value::Bool(false));
            if !KNOWN_FIELDS.contains(&field.as_str()) && !harmless {
                return Err(DiffusionError::unsupported(COMPONENT, field.as_str(), v));
            }
        }
        let raw: RawUNetConfig = serde_json::from_value(value.clone())
            .map_err(|e| DiffusionError::invalid_config(COMPONENT, "<root>", e.to_string()))?;
        Self::resolve(raw)
    }

    fn resolve(raw: RawUNetConfig) -> Result<Self> {
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "block_out_channels",
                "is empty",
            ));
        }
        if raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "down_block_types",
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    raw.down_block_types.len(),
                    raw.up_block_types.len()
                ),
            ));
        }
        if !matches!(raw.freq_shift, 0.0 | 1.0) {
            return Err(DiffusionError::unsupported(
                COMPONENT,
                "freq_shift",
                raw.freq_shift,
            ));
        }
        let layers = raw.layers_per_block.resolve("layers_per_block", n)?;
        // diffusers' historical naming: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        let heads = match &raw.num_attention_heads {
            Some(h) => h.resolve("num_attention_heads", n)?,
            None => raw.attention_head_dim.resolve("attention_head_dim", n)?,
        };
        let cross = raw.cross_attention_dim.resolve("cross_attention_dim", n)?;
        let transformer_layers = raw
            .transformer_layers_per_block
            .resolve("transformer_layers_per_block", n)?;
        for (i, (&c, &h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(DiffusionError::invalid_config(
                    COMPONENT,
                    "attention_head_dim",
                    format!("block {i}: {c} channels do not split into {h} heads"),
                ));
            }
            if c % raw.norm_num_groups != 0 {
                return Err(DiffusionError::invalid_config(
                    COMPONENT,
                    "norm_num_groups",
                    format!(
                        "block {i}: {c} channels do not split into {} groups",
                        raw.norm_num_groups
                    ),
                ));
            }
        }

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = raw.block_out_channels[0];
        for (i, kind) in raw.down_block_types.iter().enumerate() {
            let kind = match kind.as_str() {
                "DownBlock2D" => DownBlockType::Down,
                "CrossAttnDownBlock2D" => DownBlockType::CrossAttnDown,
                other => {
                    return Err(DiffusionError::unsupported(
                        COMPONENT,
                        format!("down_block_types[{i}]"),
                        other,
                    ))
                }
            };
            let input = out;
            out = raw.block_out_channels[i];
            down_blocks.push(DownBlockConfig {
                kind,
                in_channels: input,
                out_channels: out,
                layers: layers[i],
                transformer_layers: transformer_layers[i],
                num_heads: heads[i],
                cross_attention_dim: cross[i],
                downsample: i + 1 < n,
            });
        }
        if down_blocks.iter().all(|b| b.kind == DownBlockType::Down)
            && raw.up_block_types.iter().all(|t| t == "UpBlock2D")
        {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "down_block_types",
                "no cross-attention block: not a text-conditioned UNet",
            ));
        }

        let mid_block = MidBlockConfig {
            channels: raw.block_out_channels[n - 1],
            transformer_layers: transformer_layers[n - 1],
            num_heads: heads[n - 1],
            cross_attention_dim: cross[n - 1],
        };

        let rev_channels: Vec<usize> = raw.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev_channels[0];
        for (i, kind) in raw.up_block_types.iter().enumerate() {
            let kind = match kind.as_str() {
                "UpBlock2D" => UpBlockType::Up,
                "CrossAttnUpBlock2D" => UpBlockType::CrossAttnUp,
                other => {
                    return Err(DiffusionError::unsupported(
                        COMPONENT,
                        format!("up_block_types[{i}]"),
                        other,
                    ))
                }
            };
            let prev = out;
            out = rev_channels[i];
            let r = n - 1 - i;
            up_blocks.push(UpBlockConfig {
                kind,
                prev_out_channels: prev,
                out_channels: out,
                skip_in_channels: rev_channels[(i + 1).min(n - 1)],
                layers: layers[r] + 1,
                transformer_layers: transformer_layers[r],
                num_heads: heads[r],
                cross_attention_dim: cross[r],
                upsample: i + 1 < n,
            });
        }

        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(TextTimeConfig {
                time_embed_dim: raw.addition_time_embed_dim.ok_or_else(|| {
                    DiffusionError::invalid_config(
                        COMPONENT,
                        "addition_time_embed_dim",
                        "required with addition_embed_type text_time",
                    )
                })?,
                projection_input_dim: raw.projection_class_embeddings_input_dim.ok_or_else(
                    || {
                        DiffusionError::invalid_config(
                            COMPONENT,
                            "projection_class_embeddings_input_dim",
                            "required with addition_embed_type text_time",
                        )
                    },
                )?,
            }),
            Some(other) => {
                return Err(DiffusionError::unsupported(
                    COMPONENT,
                    "addition_embed_type",
                    other,
                ))
            }
        };

        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            down_blocks,
            mid_block,
            up_blocks,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            text_time,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            downsample_padding: raw.downsample_padding,
        })
    }

    /// Context width the cross-attention layers expect (the text encoder output size).
    pub fn context_dim(&self) -> usize {
        self.mid_block.cross_attention_dim
    }

    /// Number of downsamplers: a latent side must be divisible by `2^this` to avoid resizing.
    pub fn num_downsamplers(&self) -> usize {
        self.down_blocks.iter().filter(|b| b.downsample).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn real(name: &str) -> UNetConfig {
        let path = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/real-configs"
        ))
        .join(name);
        UNetConfig::from_file(&path).unwrap()
    }

    #[test]
    fn real_sd15_resolves_like_diffusers() {
        let c = real("sd15_unet.json");
        assert_eq!(c.down_blocks.len(), 4);
        assert!(c.down_blocks.iter().all(|b| b.num_heads == 8));
        assert_eq!(c.up_blocks[0].kind, UpBlockType::Up);
        assert_eq!(c.up_blocks[1].layers, 3);
        assert_eq!(c.up_blocks[3].skip_in_channels, 320);
        assert!(c.text_time.is_none());
        assert!(!c.use_linear_projection);
    }

    #[test]
    fn real_sdxl_resolves_like_diffusers() {
        let c = real("sdxl_unet.json");
        assert_eq!(
            c.down_blocks
                .iter()
                .map(|b| b.num_heads)
                .collect::<Vec<_>>(),
            [5, 10, 20]
        );
        assert_eq!(
            c.up_blocks
                .iter()
                .map(|b| b.transformer_layers)
                .collect::<Vec<_>>(),
            [10, 2, 1]
        );
        assert_eq!(c.mid_block.transformer_layers, 10);
        let tt = c.text_time.unwrap();
        assert_eq!((tt.time_embed_dim, tt.projection_input_dim), (256, 2816));
    }

    #[test]
    fn unsupported_values_name_field_and_value() {
        let mut v: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/real-configs/sd15_unet.json"
            ))
            .unwrap(),
        )
        .unwrap();
        v["resnet_time_scale_shift"] = json!("scale_shift");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("resnet_time_scale_shift") && e.contains("scale_shift"),
            "{e}"
        );
        v["resnet_time_scale_shift"] = json!("default");
        v["down_block_types"][0] = json!("SimpleCrossAttnDownBlock2D");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("down_block_types[0]") && e.contains("SimpleCrossAttnDownBlock2D"),
            "{e}"
        );
        v["down_block_types"][0] = json!("CrossAttnDownBlock2D");
        v["some_new_feature"] = json!(3);
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("some_new_feature"), "{e}");
        v["some_new_feature"] = json!(null);
        v["addition_embed_type"] = json!("image");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("addition_embed_type") && e.contains("image"),
            "{e}"
        );
    }
}
