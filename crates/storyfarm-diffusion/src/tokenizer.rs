//! The CLIP prompt tokenizer: a Hugging Face `tokenizer.json`, or the same tokenizer built from
//! `vocab.json` + `merges.txt` for repos that ship only those; always exactly 77 ids per prompt.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationParams,
};

use crate::error::{DiffusionError, Result};

const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
/// The CLIP text encoders have 77 positions; configs without `model_max_length` mean this.
const DEFAULT_MAX_LENGTH: usize = 77;
/// The pre-tokenizer regex of OpenAI CLIP (`simple_tokenizer.py`), matches are kept as words.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Turns a prompt into the fixed-length id sequence a CLIP text encoder reads:
/// `[BOS] + up to max_length-2 BPE ids + [EOS]`, right-padded with the pad token.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    /// The folder or file it was loaded from, for error messages.
    source: PathBuf,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say about the special tokens.
struct SpecialTokens {
    pad: Option<String>,
    eos: Option<String>,
    max_length: usize,
}

impl PromptTokenizer {
    /// Loads the tokenizer of a `tokenizer/` (or `tokenizer_2/`) folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = SpecialTokens::read(dir)?;
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| tokenizer_error(&json, e))?
        } else {
            build_clip_tokenizer(dir)?
        };
        Self::configure(tokenizer, special, dir)
    }

    /// Loads exactly one Hugging Face `tokenizer.json` file (any name), ignoring the
    /// `tokenizer_config.json` / `special_tokens_map.json` a folder may hold next to it: the pad
    /// token and length come from the file's own padding and truncation settings
    /// (`<|endoftext|>` and 77 where it has none). Otherwise the same as [`Self::from_dir`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))?;
        let fixed_padding = tokenizer.get_padding().and_then(|p| match p.strategy {
            PaddingStrategy::Fixed(n) => Some(n),
            _ => None,
        });
        let max_length = tokenizer
            .get_truncation()
            .map(|t| t.max_length)
            .or(fixed_padding)
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_LENGTH);
        let special = SpecialTokens {
            pad: None,
            eos: None,
            max_length,
        };
        Self::configure(tokenizer, special, path)
    }

    /// Registers the pad token as special and enforces truncation and padding to
    /// `special.max_length`.
    fn configure(mut tokenizer: Tokenizer, special: SpecialTokens, source: &Path) -> Result<Self> {
        let pad_token = special
            .pad
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_token.clone()))
            .unwrap_or_else(|| EOS_TOKEN.to_string());
        // As in transformers, the pad token is a special token: a literal "!" in a prompt then
        // stays a lone id for SDXL's tokenizer_2 instead of merging into "!!" tokens.
        if !tokenizer
            .get_added_vocabulary()
            .is_special_token(&pad_token)
        {
            tokenizer
                .add_special_tokens([AddedToken::from(pad_token.clone(), true)])
                .map_err(|e| tokenizer_error(source, e))?;
        }
        let pad_id = token_id(&tokenizer, source, &pad_token)?;
        let eos_id = token_id(
            &tokenizer,
            source,
            special.eos.as_deref().unwrap_or(EOS_TOKEN),
        )?;

        // Enforced whatever the file says: the text encoders need exactly max_length ids.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: special.max_length,
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error(source, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(special.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));

        Ok(Self {
            tokenizer,
            source: source.to_path_buf(),
            max_length: special.max_length,
            pad_id,
            eos_id,
        })
    }

    /// Exactly `max_length()` ids (77 for CLIP), truncated prompts keep their EOS.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| tokenizer_error(&self.source, e))?;
        let ids = encoding.get_ids();
        if ids.len() != self.max_length {
            return Err(DiffusionError::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "prompt {prompt:?} gave {} ids instead of {}",
                    ids.len(),
                    self.max_length
                ),
            });
        }
        Ok(ids.to_vec())
    }

    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.encode(p.as_ref())).collect()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

impl SpecialTokens {
    /// `tokenizer_config.json` wins over `special_tokens_map.json`, as in transformers; both are
    /// optional.
    fn read(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str| {
            [&config, &map]
                .into_iter()
                .flatten()
                .find_map(|json| token_content(json.get(key)?))
        };
        // Unknown lengths are stored as huge sentinel numbers by transformers; CLIP has 77.
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_u64())
            .filter(|&n| (1..=4096).contains(&n))
            .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);
        Ok(Self {
            pad: token("pad_token"),
            eos: token("eos_token"),
            max_length,
        })
    }
}

/// A special token is written either as a plain string or as an `AddedToken` object.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    crate::component::read_json(path).map(Some)
}

/// The CLIP tokenizer exactly as the `tokenizer.json` that transformers writes for it:
/// NFC, whitespace runs to one space, lowercase; split on the CLIP regex; byte-level symbols
/// without prefix space; BPE with `</w>` ending each word; BOS/EOS around the ids.
fn build_clip_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for file in [&vocab, &merges] {
        if !file.is_file() {
            return Err(DiffusionError::ModelLayout {
                path: dir.to_path_buf(),
                message: format!(
                    "no tokenizer.json and no {}",
                    file.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into())
                ),
            });
        }
    }
    let (vocab_map, merge_list) = BPE::read_file(&path_str(&vocab)?, &path_str(&merges)?)
        .map_err(|e| tokenizer_error(dir, e))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map, merge_list)
        .unk_token(EOS_TOKEN.to_string())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| tokenizer_error(dir, e))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(|e| tokenizer_error(dir, e))?;
    tokenizer
        .with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| tokenizer_error(dir, e))?;
    // `Removed` + `invert` keeps exactly the regex matches, dropping the whitespace between.
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tokenizer_error(dir, e))?;
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(
        vec![split.into(), ByteLevel::new(false, true, false).into()],
    )));

    let bos_id = token_id(&tokenizer, dir, BOS_TOKEN)?;
    let eos_id = token_id(&tokenizer, dir, EOS_TOKEN)?;
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(
            (EOS_TOKEN.to_string(), eos_id),
            (BOS_TOKEN.to_string(), bos_id),
        )
        .trim_offsets(false)
        .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens([
            AddedToken::from(BOS_TOKEN, true),
            AddedToken::from(EOS_TOKEN, true),
        ])
        .map_err(|e| tokenizer_error(dir, e))?;
    Ok(tokenizer)
}

fn token_id(tokenizer: &Tokenizer, dir: &Path, token: &str) -> Result<u32> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| DiffusionError::Tokenizer {
            path: dir.to_path_buf(),
            message: format!("token {token:?} is not in the vocabulary"),
        })
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| DiffusionError::Tokenizer {
            path: path.to_path_buf(),
            message: "path is not valid UTF-8".to_string(),
        })
}

fn tokenizer_error(path: &Path, error: impl std::fmt::Display) -> DiffusionError {
    DiffusionError::Tokenizer {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn golden(name: &str) -> anyhow::Result<(Vec<String>, Vec<Vec<u32>>)> {
        let dir = Path::new(FIXTURES).join("tokenizer");
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("clip_ids.json"))?)?;
        let prompts = serde_json::from_value(json["settings"]["prompts"].clone())?;
        let tensors =
            candle_core::safetensors::load(dir.join("clip_ids.safetensors"), &Device::Cpu)?;
        let ids = tensors[name].to_dtype(DType::U32)?.to_vec2::<u32>()?;
        Ok((prompts, ids))
    }

    fn assert_matches(tokenizer: &PromptTokenizer, golden_name: &str) -> anyhow::Result<()> {
        let (prompts, expected) = golden(golden_name)?;
        assert_eq!(prompts.len(), expected.len());
        let ids = tokenizer.encode_batch(&prompts)?;
        for ((prompt, ids), expected) in prompts.iter().zip(&ids).zip(&expected) {
            assert_eq!(ids, expected, "prompt {prompt:?}");
        }
        Ok(())
    }

    /// A fresh folder under the system temp dir, removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> std::io::Result<Self> {
            let path = std::env::temp_dir()
                .join(format!("storyfarm-tokenizer-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn model_dir(rel: &str) -> PathBuf {
        Path::new(FIXTURES).join("models").join(rel)
    }

    /// A folder with the files real SD repos ship (no tokenizer.json); vocab/merges of every
    /// tiny tokenizer are tiny-sd15's.
    fn vocab_merges_dir(config_from: &str) -> anyhow::Result<ScratchDir> {
        let dir = ScratchDir::new(&config_from.replace('/', "-"))?;
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(
                model_dir("tiny-sd15/tokenizer").join(file),
                dir.path().join(file),
            )?;
        }
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            std::fs::copy(model_dir(config_from).join(file), dir.path().join(file))?;
        }
        Ok(dir)
    }

    #[test]
    fn tokenizer_json_pad_eos() -> anyhow::Result<()> {
        let tokenizer = PromptTokenizer::from_dir(&model_dir("tiny-sd15/tokenizer"))?;
        assert_eq!((tokenizer.pad_id(), tokenizer.eos_id()), (49407, 49407));
        assert_matches(&tokenizer, "ids_pad_eos")
    }

    #[test]
    fn tokenizer_json_pad_bang() -> anyhow::Result<()> {
        let tokenizer = PromptTokenizer::from_dir(&model_dir("tiny-sdxl/tokenizer_2"))?;
        assert_eq!((tokenizer.pad_id(), tokenizer.eos_id()), (0, 49407));
        assert_matches(&tokenizer, "ids_pad_bang")
    }

    #[test]
    fn vocab_merges_pad_eos() -> anyhow::Result<()> {
        let dir = vocab_merges_dir("tiny-sd15/tokenizer")?;
        let tokenizer = PromptTokenizer::from_dir(dir.path())?;
        assert_eq!((tokenizer.pad_id(), tokenizer.eos_id()), (49407, 49407));
        assert_matches(&tokenizer, "ids_pad_eos")
    }

    #[test]
    fn vocab_merges_pad_bang() -> anyhow::Result<()> {
        let dir = vocab_merges_dir("tiny-sdxl/tokenizer_2")?;
        let tokenizer = PromptTokenizer::from_dir(dir.path())?;
        assert_eq!((tokenizer.pad_id(), tokenizer.eos_id()), (0, 49407));
        assert_matches(&tokenizer, "ids_pad_bang")
    }

    #[test]
    fn tokenizer_file_alone_pad_bang() -> anyhow::Result<()> {
        // Only the file, under another name: no config files next to it to read the pad from.
        let dir = ScratchDir::new("file-alone")?;
        let file = dir.path().join("bang.json");
        std::fs::copy(model_dir("tiny-sdxl/tokenizer_2/tokenizer.json"), &file)?;
        let tokenizer = PromptTokenizer::from_file(&file)?;
        assert_eq!(
            (
                tokenizer.pad_id(),
                tokenizer.eos_id(),
                tokenizer.max_length()
            ),
            (0, 49407, 77)
        );
        assert_matches(&tokenizer, "ids_pad_bang")
    }

    #[test]
    fn tokenizer_file_pad_eos() -> anyhow::Result<()> {
        let tokenizer =
            PromptTokenizer::from_file(&model_dir("tiny-sd15/tokenizer/tokenizer.json"))?;
        assert_eq!((tokenizer.pad_id(), tokenizer.eos_id()), (49407, 49407));
        assert_matches(&tokenizer, "ids_pad_eos")
    }

    #[test]
    fn missing_file_is_named() {
        let file = model_dir("does-not-exist/tokenizer.json");
        let err = PromptTokenizer::from_file(&file)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("does-not-exist")));
    }

    #[test]
    fn missing_files_name_the_folder() {
        let dir = model_dir("does-not-exist");
        let err = PromptTokenizer::from_dir(&dir).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("does-not-exist")));
    }
}
