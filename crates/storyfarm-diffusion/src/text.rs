//! CLIP text encoders and the prompt conditioning of SD 1.x/2.x (one encoder) and SDXL (two
//! encoders, penultimate hidden states concatenated, pooled projection of the second).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};
use serde::Deserialize;

use crate::component::read_json;
use crate::error::{DiffusionError, Result};
use crate::layers::{
    causal_mask, layer_norm, linear, linear_no_bias, merge_heads, scaled_dot_product_attention,
    split_heads,
};
use crate::model::weight_files_in;
use crate::tokenizer::PromptTokenizer;
use crate::weights::Weights;

const COMPONENT: &str = "text encoder";

/// The MLP activation of a CLIP text encoder (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP ViT-L (SD 1.x, SDXL text_encoder).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H / bigG (SD 2.x, SDXL text_encoder_2).
    Gelu,
}

impl ClipActivation {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Gelu => x.gelu_erf()?,
        })
    }
}

/// How the pooled output picks its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// The first position holding this id (the EOS token).
    FirstToken(u32),
    /// The position of the largest id: what transformers does for legacy configs whose
    /// `eos_token_id` is 2, relying on EOS (49407) being the largest id in the vocabulary.
    ArgmaxId,
}

/// The fields of a transformers CLIP text `config.json` that the encoder needs; defaults are
/// transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub eos_token_id: u32,
    pub architectures: Vec<String>,
}

#[derive(Deserialize)]
struct RawClipTextConfig {
    #[serde(default = "default_vocab_size")]
    vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
    #[serde(default = "default_eos_token_id")]
    eos_token_id: u32,
    #[serde(default)]
    architectures: Vec<String>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}
fn default_eos_token_id() -> u32 {
    49407
}

impl ClipTextConfig {
    /// Reads a transformers `config.json` (`text_encoder/config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let raw: RawClipTextConfig = read_json(path)?;
        Self::from_raw(raw)
    }

    pub fn from_json_str(json: &str) -> Result<Self> {
        let raw: RawClipTextConfig =
            serde_json::from_str(json).map_err(|e| DiffusionError::ConfigFile {
                path: "<inline json>".into(),
                message: e.to_string(),
            })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawClipTextConfig) -> Result<Self> {
        let hidden_act = match raw.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => return Err(DiffusionError::unsupported(COMPONENT, "hidden_act", other)),
        };
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    raw.num_attention_heads, raw.hidden_size
                ),
            ));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
            projection_dim: raw.projection_dim,
            eos_token_id: raw.eos_token_id,
            architectures: raw.architectures,
        })
    }

    fn pooling(&self) -> Pooling {
        if self.eos_token_id == 2 {
            Pooling::ArgmaxId
        } else {
            Pooling::FirstToken(self.eos_token_id)
        }
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl ClipAttention {
    fn new(weights: &Weights, config: &ClipTextConfig) -> Result<Self> {
        let dim = config.hidden_size;
        Ok(Self {
            q_proj: linear(&weights.pp("q_proj"), dim, dim)?,
            k_proj: linear(&weights.pp("k_proj"), dim, dim)?,
            v_proj: linear(&weights.pp("v_proj"), dim, dim)?,
            out_proj: linear(&weights.pp("out_proj"), dim, dim)?,
            num_heads: config.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.num_heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.num_heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.num_heads)?;
        let out = scaled_dot_product_attention(&q, &k, &v, Some(mask))?;
        Ok(self.out_proj.forward(&merge_heads(&out)?)?)
    }
}

struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipEncoderLayer {
    fn new(weights: &Weights, config: &ClipTextConfig) -> Result<Self> {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            layer_norm1: layer_norm(&weights.pp("layer_norm1"), dim, eps)?,
            self_attn: ClipAttention::new(&weights.pp("self_attn"), config)?,
            layer_norm2: layer_norm(&weights.pp("layer_norm2"), dim, eps)?,
            fc1: linear(&weights.pp("mlp.fc1"), dim, config.intermediate_size)?,
            fc2: linear(&weights.pp("mlp.fc2"), config.intermediate_size, dim)?,
            activation: config.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = self.fc2.forward(&self.activation.forward(&h)?)?;
        Ok((x + h)?)
    }
}

/// Everything one forward pass of a CLIP text encoder produces.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `L + 1` tensors [B, S, H]: the embeddings, then the output of every layer (no final LN).
    pub hidden_states: Vec<Tensor>,
    /// [B, S, H] the last layer's output after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// [B, H] `last_hidden_state` at the EOS token.
    pub pooled: Tensor,
    /// [B, P] `text_projection(pooled)`, for models built with the projection.
    pub text_embeds: Option<Tensor>,
}

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (pre-LayerNorm, causal).
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `weights` is the root of the checkpoint (names start with `text_model.`).
    pub fn new(config: &ClipTextConfig, weights: Weights, with_projection: bool) -> Result<Self> {
        let text = weights.pp("text_model");
        let dim = config.hidden_size;
        let embeddings = text.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&text.pp("encoder.layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            Some(linear_no_bias(
                &weights.pp("text_projection"),
                dim,
                config.projection_dim,
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: embeddings
                .pp("token_embedding")
                .get(&[config.vocab_size, dim], "weight")?,
            position_embedding: embeddings
                .pp("position_embedding")
                .get(&[config.max_position_embeddings, dim], "weight")?,
            layers,
            final_layer_norm: layer_norm(&text.pp("final_layer_norm"), dim, config.layer_norm_eps)?,
            text_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `ids`: [B, S] u32 token ids, S <= `max_position_embeddings`.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (batch, seq_len) = ids.dims2()?;
        if seq_len > self.config.max_position_embeddings {
            return Err(DiffusionError::invalid_argument(
                "ids",
                format!(
                    "{seq_len} tokens, the text encoder has {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let tokens = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, seq_len, self.config.hidden_size))?;
        let positions = self.position_embedding.narrow(0, 0, seq_len)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq_len, x.dtype(), x.device())?;

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        let pooled = pool_positions(ids, self.config.pooling())?
            .into_iter()
            .enumerate()
            .map(|(b, pos)| last_hidden_state.i((b, pos)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        })
    }
}

/// The pooled position of every row of `ids`; as in transformers a row without the EOS id
/// pools position 0.
fn pool_positions(ids: &Tensor, pooling: Pooling) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| match pooling {
            Pooling::FirstToken(eos) => row.iter().position(|&id| id == eos).unwrap_or(0),
            // The first maximum, as torch.argmax.
            Pooling::ArgmaxId => {
                row.iter()
                    .enumerate()
                    .fold(
                        (0, 0),
                        |best, (i, &id)| if id > best.1 { (i, id) } else { best },
                    )
                    .0
            }
        })
        .collect())
}

/// What the UNet is conditioned on for one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// [1, 77, C] cross-attention context.
    pub context: Tensor,
    /// [1, P] pooled text embedding (SDXL added conditioning); `None` for SD 1.x/2.x.
    pub pooled: Option<Tensor>,
}

/// One tokenizer and the text encoder that reads its ids.
struct PromptEncoder {
    tokenizer: PromptTokenizer,
    model: ClipTextModel,
}

impl PromptEncoder {
    fn load(
        tokenizer_dir: &Path,
        encoder_dir: &Path,
        with_projection: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = PromptTokenizer::from_dir(tokenizer_dir)?;
        let config = ClipTextConfig::load(&encoder_dir.join("config.json"))?;
        if tokenizer.max_length() > config.max_position_embeddings {
            return Err(DiffusionError::ModelLayout {
                path: tokenizer_dir.to_path_buf(),
                message: format!(
                    "tokenizer pads to {} tokens but the text encoder has {} positions",
                    tokenizer.max_length(),
                    config.max_position_embeddings
                ),
            });
        }
        let weights =
            Weights::from_safetensors(&weight_files_in(encoder_dir, dtype)?, dtype, device)?;
        let model = ClipTextModel::new(&config, weights, with_projection)?;
        Ok(Self { tokenizer, model })
    }

    fn forward(&self, prompt: &str, device: &Device) -> Result<ClipTextOutput> {
        let ids = self.tokenizer.encode(prompt)?;
        let ids = Tensor::from_vec(ids, (1, self.tokenizer.max_length()), device)?;
        self.model.forward(&ids)
    }
}

#[derive(Deserialize)]
struct ModelIndex {
    force_zeros_for_empty_prompt: Option<bool>,
}

/// Prompt conditioning of a pipeline: SD 1.x/2.x (`tokenizer/`, `text_encoder/`) or SDXL (also
/// `tokenizer_2/`, `text_encoder_2/` with projection).
pub struct TextConditioner {
    primary: PromptEncoder,
    /// SDXL's OpenCLIP bigG encoder.
    secondary: Option<PromptEncoder>,
    /// SDXL: an absent or empty negative prompt conditions on zeros instead of encoding "".
    force_zeros_for_empty_prompt: bool,
    dtype: DType,
    device: Device,
}

impl TextConditioner {
    /// The tokenizer of the first text encoder (ConsiStory finds subject tokens with it).
    pub fn primary_tokenizer(&self) -> &PromptTokenizer {
        &self.primary.tokenizer
    }

    /// Loads the tokenizer(s) and text encoder(s) of a diffusers model folder; it is SDXL when
    /// `text_encoder_2/` exists.
    pub fn load(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let primary = PromptEncoder::load(
            &root.join("tokenizer"),
            &root.join("text_encoder"),
            false,
            dtype,
            device,
        )?;
        let secondary = if root.join("text_encoder_2").is_dir() {
            Some(PromptEncoder::load(
                &root.join("tokenizer_2"),
                &root.join("text_encoder_2"),
                true,
                dtype,
                device,
            )?)
        } else {
            None
        };
        let index_path = root.join("model_index.json");
        let force_zeros = if index_path.is_file() {
            read_json::<ModelIndex>(&index_path)?.force_zeros_for_empty_prompt
        } else {
            None
        };
        if let Some(secondary) = &secondary {
            let (len1, len2) = (
                primary.tokenizer.max_length(),
                secondary.tokenizer.max_length(),
            );
            if len1 != len2 {
                return Err(DiffusionError::ModelLayout {
                    path: root.to_path_buf(),
                    message: format!("tokenizers pad to different lengths ({len1} and {len2})"),
                });
            }
        }
        Ok(Self {
            force_zeros_for_empty_prompt: secondary.is_some() && force_zeros.unwrap_or(true),
            primary,
            secondary,
            dtype,
            device: device.clone(),
        })
    }

    pub fn is_xl(&self) -> bool {
        self.secondary.is_some()
    }

    /// Channels of the context (UNet `cross_attention_dim`).
    pub fn context_dim(&self) -> usize {
        self.primary.model.config.hidden_size
            + self
                .secondary
                .as_ref()
                .map_or(0, |s| s.model.config.hidden_size)
    }

    /// Width of the pooled embedding (SDXL), `None` for SD 1.x/2.x.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.secondary
            .as_ref()
            .map(|s| s.model.config.projection_dim)
    }

    /// Tokens per prompt (77).
    pub fn sequence_length(&self) -> usize {
        self.primary.tokenizer.max_length()
    }

    pub fn encode(&self, prompt: &str) -> Result<PromptEmbedding> {
        let first = self.primary.forward(prompt, &self.device)?;
        let Some(secondary) = &self.secondary else {
            return Ok(PromptEmbedding {
                context: first.last_hidden_state,
                pooled: None,
            });
        };
        let second = secondary.forward(prompt, &self.device)?;
        let context = Tensor::cat(&[penultimate(&first)?, penultimate(&second)?], D::Minus1)?;
        Ok(PromptEmbedding {
            context,
            pooled: second.text_embeds,
        })
    }

    /// The unconditional embedding for classifier-free guidance. SDXL with
    /// `force_zeros_for_empty_prompt` uses zeros when there is no (or an empty) negative prompt;
    /// otherwise the negative prompt, or "", is encoded.
    pub fn encode_negative(&self, negative: Option<&str>) -> Result<PromptEmbedding> {
        let prompt = negative.unwrap_or("");
        if !(prompt.is_empty() && self.force_zeros_for_empty_prompt) {
            return self.encode(prompt);
        }
        let context = Tensor::zeros(
            (1, self.sequence_length(), self.context_dim()),
            self.dtype,
            &self.device,
        )?;
        let pooled = match self.pooled_dim() {
            Some(dim) => Some(Tensor::zeros((1, dim), self.dtype, &self.device)?),
            None => None,
        };
        Ok(PromptEmbedding { context, pooled })
    }
}

/// `hidden_states[-2]`: the output of the second-to-last layer, without the final LayerNorm.
fn penultimate(output: &ClipTextOutput) -> Result<Tensor> {
    let n = output.hidden_states.len();
    if n < 2 {
        return Err(DiffusionError::invalid_config(
            COMPONENT,
            "num_hidden_layers",
            "SDXL needs at least one layer for the penultimate hidden state",
        ));
    }
    Ok(output.hidden_states[n - 2].clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    const TOLERANCE: f32 = 1e-4;

    fn fixtures() -> PathBuf {
        PathBuf::from(FIXTURES)
    }

    fn golden(name: &str) -> anyhow::Result<(Vec<String>, HashMap<String, Tensor>)> {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixtures().join(format!("{name}.json")),
        )?)?;
        let prompts = serde_json::from_value(json["settings"]["prompts"].clone())?;
        let tensors = candle_core::safetensors::load(
            fixtures().join(format!("{name}.safetensors")),
            &Device::Cpu,
        )?;
        Ok((prompts, tensors))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) -> anyhow::Result<()> {
        let diff = max_abs_diff(actual, expected)?;
        println!("{name}: max abs diff {diff:e}");
        assert!(
            diff <= TOLERANCE,
            "{name}: max abs diff {diff} > {TOLERANCE}"
        );
        Ok(())
    }

    fn load_model(dir: &str, with_projection: bool) -> anyhow::Result<ClipTextModel> {
        let dir = fixtures().join("models").join(dir);
        let config = ClipTextConfig::load(&dir.join("config.json"))?;
        let weights =
            Weights::from_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)?;
        Ok(ClipTextModel::new(&config, weights, with_projection)?)
    }

    fn ids(tensors: &HashMap<String, Tensor>, name: &str) -> anyhow::Result<Tensor> {
        Ok(tensors[name].to_dtype(DType::U32)?)
    }

    #[test]
    fn parses_real_configs() -> anyhow::Result<()> {
        let dir = fixtures().join("real-configs");
        let clip_l = ClipTextConfig::load(&dir.join("clip_l_text_encoder.json"))?;
        assert_eq!(clip_l.hidden_act, ClipActivation::QuickGelu);
        assert_eq!(
            (
                clip_l.hidden_size,
                clip_l.num_hidden_layers,
                clip_l.num_attention_heads
            ),
            (768, 12, 12)
        );
        assert_eq!(clip_l.pooling(), Pooling::FirstToken(49407));
        let big_g = ClipTextConfig::load(&dir.join("clip_bigg_text_encoder_2.json"))?;
        assert_eq!(big_g.hidden_act, ClipActivation::Gelu);
        assert_eq!(
            (
                big_g.hidden_size,
                big_g.num_hidden_layers,
                big_g.projection_dim
            ),
            (1280, 32, 1280)
        );
        assert_eq!(
            big_g.architectures,
            vec!["CLIPTextModelWithProjection".to_string()]
        );
        Ok(())
    }

    #[test]
    fn rejects_unknown_activation_and_pools_legacy_configs_by_argmax() -> anyhow::Result<()> {
        let err = ClipTextConfig::from_json_str(r#"{"hidden_act": "relu"}"#).err();
        assert!(
            matches!(&err, Some(DiffusionError::UnsupportedConfig { field, value, .. })
                if field == "hidden_act" && value == "relu"),
            "{err:?}"
        );
        let legacy = ClipTextConfig::from_json_str(r#"{"eos_token_id": 2}"#)?;
        assert_eq!(legacy.pooling(), Pooling::ArgmaxId);
        let ids = Tensor::new(
            &[[49406u32, 320, 49407, 49407], [49406, 49407, 0, 0]],
            &Device::Cpu,
        )?;
        assert_eq!(pool_positions(&ids, Pooling::ArgmaxId)?, vec![2, 1]);
        assert_eq!(
            pool_positions(&ids, Pooling::FirstToken(49407))?,
            vec![2, 1]
        );
        Ok(())
    }

    #[test]
    fn sd15_text_encoder_matches_golden() -> anyhow::Result<()> {
        let (_, golden) = golden("sd15/text_encoder")?;
        let model = load_model("tiny-sd15/text_encoder", false)?;
        let out = model.forward(&ids(&golden, "input_ids")?)?;
        assert_eq!(out.hidden_states.len(), 4);
        assert_close(
            "last_hidden_state",
            &out.last_hidden_state,
            &golden["last_hidden_state"],
        )?;
        assert_close(
            "penultimate",
            &out.hidden_states[2],
            &golden["penultimate_hidden_state"],
        )?;
        assert_close("pooler_output", &out.pooled, &golden["pooler_output"])?;
        assert!(out.text_embeds.is_none());
        Ok(())
    }

    #[test]
    fn sdxl_text_encoders_match_golden() -> anyhow::Result<()> {
        let (_, golden) = golden("sdxl/text_encoder")?;
        let te1 =
            load_model("tiny-sdxl/text_encoder", false)?.forward(&ids(&golden, "input_ids_1")?)?;
        assert_close(
            "te1_last",
            &te1.last_hidden_state,
            &golden["te1_last_hidden_state"],
        )?;
        assert_close(
            "te1_penultimate",
            &te1.hidden_states[2],
            &golden["te1_penultimate_hidden_state"],
        )?;
        assert_close("te1_pooled", &te1.pooled, &golden["te1_pooler_output"])?;
        let te2 =
            load_model("tiny-sdxl/text_encoder_2", true)?.forward(&ids(&golden, "input_ids_2")?)?;
        assert_close(
            "te2_last",
            &te2.last_hidden_state,
            &golden["te2_last_hidden_state"],
        )?;
        assert_close(
            "te2_penultimate",
            &te2.hidden_states[2],
            &golden["te2_penultimate_hidden_state"],
        )?;
        let text_embeds = te2
            .text_embeds
            .ok_or_else(|| anyhow::anyhow!("no text_embeds"))?;
        assert_close("te2_text_embeds", &text_embeds, &golden["te2_text_embeds"])?;
        Ok(())
    }

    #[test]
    fn sd15_conditioner_matches_golden() -> anyhow::Result<()> {
        let (prompts, golden) = golden("sd15/text_encoder")?;
        let conditioner = TextConditioner::load(
            &fixtures().join("models/tiny-sd15"),
            DType::F32,
            &Device::Cpu,
        )?;
        assert!(!conditioner.is_xl());
        assert_eq!(
            (conditioner.context_dim(), conditioner.pooled_dim()),
            (32, None)
        );
        for (i, prompt) in prompts.iter().enumerate() {
            let embedding = conditioner.encode(prompt)?;
            let expected = golden["last_hidden_state"].narrow(0, i, 1)?;
            assert_close(&format!("sd15 context {i}"), &embedding.context, &expected)?;
            assert!(embedding.pooled.is_none());
        }
        // SD encodes "" for a missing negative prompt; prompt 1 of the golden is "".
        assert_eq!(prompts[1], "");
        let negative = conditioner.encode_negative(None)?;
        assert_close(
            "sd15 negative",
            &negative.context,
            &golden["last_hidden_state"].narrow(0, 1, 1)?,
        )?;
        Ok(())
    }

    #[test]
    fn sdxl_conditioner_matches_golden() -> anyhow::Result<()> {
        let (prompts, golden) = golden("sdxl/text_encoder")?;
        let conditioner = TextConditioner::load(
            &fixtures().join("models/tiny-sdxl"),
            DType::F32,
            &Device::Cpu,
        )?;
        assert!(conditioner.is_xl());
        assert_eq!(
            (conditioner.context_dim(), conditioner.pooled_dim()),
            (24, Some(16))
        );
        for (i, prompt) in prompts.iter().enumerate() {
            let embedding = conditioner.encode(prompt)?;
            let context = golden["prompt_embeds"].narrow(0, i, 1)?;
            assert_close(&format!("sdxl context {i}"), &embedding.context, &context)?;
            let pooled = embedding
                .pooled
                .ok_or_else(|| anyhow::anyhow!("no pooled"))?;
            let expected = golden["te2_text_embeds"].narrow(0, i, 1)?;
            assert_close(&format!("sdxl pooled {i}"), &pooled, &expected)?;
        }
        for negative in [None, Some("")] {
            let zeros = conditioner.encode_negative(negative)?;
            assert_eq!(zeros.context.dims(), &[1, 77, 24]);
            assert_eq!(zeros.context.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
            let pooled = zeros.pooled.ok_or_else(|| anyhow::anyhow!("no pooled"))?;
            assert_eq!(pooled.dims(), &[1, 16]);
            assert_eq!(pooled.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        }
        let negative = conditioner.encode_negative(Some(&prompts[0]))?;
        assert_close(
            "sdxl negative",
            &negative.context,
            &golden["prompt_embeds"].narrow(0, 0, 1)?,
        )?;
        Ok(())
    }
}
