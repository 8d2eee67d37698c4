//! The storyboard: the YAML file an artist writes (`storyfarm submit` / `storyfarm render` read
//! the same file), its defaults, and the one validation every entry point goes through.
//!
//! ```yaml
//! model: stable-diffusion-v1-5/stable-diffusion-v1-5   # hub id or model folder
//! width: 512
//! height: 512
//! steps: 30
//! guidance: 7.5
//! negative_prompt: blurry, low quality       # default for every frame
//! seed: 1000                                 # frame i defaults to seed + i
//! frames_per_task: 4
//! style:
//!   image: style.png                         # relative to the storyboard file
//!   prompt: a watercolor painting
//!   offset: 0
//!   inversion_guidance: 2.0
//!   options: { share_group_norm: true, shared_score_shift: 0.0 }
//! characters:                                # at most 8
//!   - name: Biscuit
//!     description: a cute corgi dog, a watercolor painting
//!     subject_words: [dog]                   # whole words of the description
//!   - name: Captain
//!     description: an old sailor, a watercolor painting
//!     subject_words: [sailor]
//!     image: captain.png                     # relative to the storyboard file; one of the anchors
//!     anchors: 3                             # 1..=4, the image included (default 2)
//!     seed: 5                                # default: seed + (index + 1) * 2^32
//! consistory: { mask_dropout: 0.5, injection_alpha: 0.8 }
//! frames:
//!   - prompt: a lighthouse on a cliff, a watercolor painting
//!   - prompt: a dog and a sailor on a fishing boat at dawn, a watercolor painting
//!     characters: [Biscuit, Captain]         # at most 4; each needs one of its words in the prompt
//!     seed: 42
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The most frames one storyboard may hold.
pub const MAX_FRAMES: usize = 10_000;
/// Image sides are multiples of 8 within this range (pixels).
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
pub const MAX_STEPS: u32 = 1000;
pub const MAX_FRAMES_PER_TASK: u32 = 64;
/// Every frame attends to the anchors of all the characters it shows, so these bound the extra
/// keys of one self-attention call (and the anchor batches a board needs).
pub const MAX_CHARACTERS: usize = 8;
pub const MAX_FRAME_CHARACTERS: usize = 4;
/// Anchors per character, an image counted as one (each anchor is one more image in the batch).
pub const MAX_ANCHORS: u32 = 4;
pub const MAX_CHARACTER_NAME: usize = 64;

/// A problem with one field of a storyboard or request, named by its path
/// (`frames[3].seed`, `style.image`, `width`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a storyboard file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoryboardFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Malformed YAML or an unknown key; the message carries the line and column.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        source: ValidationError,
    },
}

/// StyleAligned options, with the official defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StyleOptions {
    pub share_group_norm: bool,
    pub share_attention: bool,
    pub adain_queries: bool,
    pub adain_keys: bool,
    pub adain_values: bool,
    pub shared_score_scale: f32,
    pub shared_score_shift: f32,
    pub only_self_level: f64,
}

impl Default for StyleOptions {
    fn default() -> Self {
        Self {
            share_group_norm: true,
            share_attention: true,
            adain_queries: true,
            adain_keys: true,
            adain_values: false,
            shared_score_scale: 1.0,
            shared_score_shift: 0.0,
            only_self_level: 0.0,
        }
    }
}

/// The style reference of a storyboard: a picture (DDIM-inverted) or, without one, an image
/// generated from the prompt. Either way it is computed once and every frame replays it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleSpec {
    /// Image file, relative to the storyboard file (local mode and `storyfarm submit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// What the image shows (the prompt of its inversion), or what to generate without an image.
    pub prompt: String,
    /// Seed of a generated reference (default: the board's seed minus one, as `generate` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub offset: u32,
    #[serde(default = "default_inversion_guidance")]
    pub inversion_guidance: f64,
    #[serde(default)]
    pub options: StyleOptions,
}

fn default_inversion_guidance() -> f64 {
    2.0
}

/// ConsiStory options, with the official defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistoryOptions {
    /// Share of the anchors' subject patches dropped from each frame's attention (0.5): pose variety.
    pub mask_dropout: f64,
    /// Weight of the corresponding anchor features in feature injection (0.8), within 0..=1.
    pub injection_alpha: f64,
    /// FreeU (re-weighted UNet backbone and skip features) on every image (true).
    pub freeu: bool,
    /// Early steps blend the queries with the frame's plain generation (true): varied layouts.
    pub query_blend: bool,
    /// Subject patches take in the features of their corresponding anchor patches (true).
    pub feature_injection: bool,
}

impl Default for ConsistoryOptions {
    fn default() -> Self {
        Self {
            mask_dropout: 0.5,
            injection_alpha: 0.8,
            freeu: true,
            query_blend: true,
            feature_injection: true,
        }
    }
}

impl ConsistoryOptions {
    /// Left out of a serialized board when default: boards without the block keep their keys.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A character: the same subject in every frame that names it (ConsiStory, no fine-tuning).
/// Its anchors (generated from the description, or its image inverted plus generated ones) are
/// rendered once; frames share attention with them inside the subject's mask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CharacterSpec {
    /// How frames name it: 1-64 ASCII letters, digits, `-`, `_` and spaces, unique in the board.
    pub name: String,
    /// A prompt that shows the character: anchors render from it, the image inverts with it.
    pub description: String,
    /// Words whose cross-attention makes the character's mask; the prompt of every frame showing
    /// the character needs one of them, since the mask comes from that word's tokens.
    pub subject_words: Vec<String>,
    /// A picture of the character, relative to the storyboard file (absolute after `load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Seed of the generated anchors; see [`StoryboardSpec::character_seed`] for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many anchors, the image counted as one when there is one (1..=4, default 2).
    #[serde(default = "default_anchors")]
    pub anchors: u32,
}

fn default_anchors() -> u32 {
    2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Names of the characters this frame shows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub characters: Vec<String>,
}

/// A storyboard as written in its file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoryboardSpec {
    pub model: String,
    #[serde(default = "default_side")]
    pub width: u32,
    #[serde(default = "default_side")]
    pub height: u32,
    #[serde(default = "default_steps")]
    pub steps: u32,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub negative_prompt: String,
    /// Base seed: frame i without its own seed uses `seed + i`.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_frames_per_task")]
    pub frames_per_task: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<StyleSpec>,
    // Both are left out of a serialized board when unused: a board without characters serializes
    // (and so keys) exactly as before characters existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub characters: Vec<CharacterSpec>,
    #[serde(default, skip_serializing_if = "ConsistoryOptions::is_default")]
    pub consistory: ConsistoryOptions,
    pub frames: Vec<FrameSpec>,
}

fn default_side() -> u32 {
    512
}
fn default_steps() -> u32 {
    30
}
fn default_guidance() -> f64 {
    7.5
}
fn default_frames_per_task() -> u32 {
    4
}

/// The settings of one frame after defaults are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedFrame {
    pub index: u32,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// The characters it shows, as indices into `StoryboardSpec::characters`, in the frame's order.
    pub characters: Vec<usize>,
}

impl StoryboardSpec {
    /// Parses YAML; unknown keys and type errors carry their line and column.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads, parses and validates a storyboard file; the style and character image paths become
    /// absolute (relative to the file) and must exist.
    pub fn load(path: &Path) -> Result<Self, StoryboardFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoryboardFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut spec = Self::from_yaml(&text).map_err(|message| StoryboardFileError::Syntax {
            path: path.to_path_buf(),
            message,
        })?;
        let invalid = |source| StoryboardFileError::Invalid {
            path: path.to_path_buf(),
            source,
        };
        spec.validate().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        // A model folder next to the board is named relative to it, like the style image.
        let local_model = base.join(&spec.model);
        if Path::new(&spec.model).is_relative() && local_model.join("model_index.json").is_file() {
            spec.model = local_model
                .canonicalize()
                .unwrap_or(local_model)
                .display()
                .to_string();
        }
        if let Some(style) = &mut spec.style {
            if let Some(image) = &mut style.image {
                let resolved = base.join(&*image);
                if !resolved.is_file() {
                    return Err(invalid(ValidationError::new(
                        "style.image",
                        format!("no such file: {}", resolved.display()),
                    )));
                }
                *image = resolved;
            }
        }
        for (i, character) in spec.characters.iter_mut().enumerate() {
            if let Some(image) = &mut character.image {
                let resolved = base.join(&*image);
                if !resolved.is_file() {
                    return Err(invalid(ValidationError::new(
                        format!("characters[{i}].image"),
                        format!("no such file: {}", resolved.display()),
                    )));
                }
                *image = resolved;
            }
        }
        Ok(spec)
    }

    /// The seed of frame `index`: its own, else the base seed plus its index.
    pub fn frame_seed(&self, index: usize) -> u64 {
        self.frames
            .get(index)
            .and_then(|f| f.seed)
            .unwrap_or_else(|| self.seed.wrapping_add(index as u64))
    }

    /// The seed of character `index`'s anchors: its own, else `seed + (index + 1) * 2^32`
    /// (wrapping). That lies far from the frames' `seed + i`, so no anchor starts from the noise of
    /// a frame that takes its default seed, even when a character's anchors use seeds after it.
    pub fn character_seed(&self, index: usize) -> u64 {
        self.characters
            .get(index)
            .and_then(|c| c.seed)
            .unwrap_or_else(|| self.seed.wrapping_add((index as u64 + 1) << 32))
    }

    /// The seed of a generated style reference: its own, else the base seed minus one (the
    /// frames start at the base seed).
    pub fn style_seed(&self) -> Option<u64> {
        let style = self.style.as_ref()?;
        Some(style.seed.unwrap_or_else(|| self.seed.wrapping_sub(1)))
    }

    /// The index of the character named `name`.
    pub fn character_index(&self, name: &str) -> Option<usize> {
        self.characters.iter().position(|c| c.name == name)
    }

    /// Defaults applied to every frame. Meant for validated boards: a character name that
    /// `validate` would reject as unknown is left out.
    pub fn resolved_frames(&self) -> Vec<ResolvedFrame> {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, f)| ResolvedFrame {
                index: i as u32,
                prompt: f.prompt.clone(),
                negative_prompt: f
                    .negative_prompt
                    .clone()
                    .unwrap_or_else(|| self.negative_prompt.clone()),
                seed: self.frame_seed(i),
                characters: f
                    .characters
                    .iter()
                    .filter_map(|name| self.character_index(name))
                    .collect(),
            })
            .collect()
    }

    /// Every rule a storyboard must meet, with the field named on failure.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.model.trim().is_empty() {
            return Err(ValidationError::new(
                "model",
                "must name a model (hub id or folder)",
            ));
        }
        validate_size(self.width, self.height)?;
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(ValidationError::new(
                "steps",
                format!("must be within 1..={MAX_STEPS}, got {}", self.steps),
            ));
        }
        if !self.guidance.is_finite() || !(0.0..=50.0).contains(&self.guidance) {
            return Err(ValidationError::new(
                "guidance",
                format!("must be within 0..=50, got {}", self.guidance),
            ));
        }
        if self.frames_per_task == 0 || self.frames_per_task > MAX_FRAMES_PER_TASK {
            return Err(ValidationError::new(
                "frames_per_task",
                format!(
                    "must be within 1..={MAX_FRAMES_PER_TASK}, got {}",
                    self.frames_per_task
                ),
            ));
        }
        if self.frames.is_empty() {
            return Err(ValidationError::new(
                "frames",
                "a storyboard needs at least one frame",
            ));
        }
        if self.frames.len() > MAX_FRAMES {
            return Err(ValidationError::new(
                "frames",
                format!("at most {MAX_FRAMES} frames, got {}", self.frames.len()),
            ));
        }
        for (i, frame) in self.frames.iter().enumerate() {
            if frame.prompt.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("frames[{i}].prompt"),
                    "must not be empty",
                ));
            }
        }
        if let Some(style) = &self.style {
            validate_style(style, self.steps)?;
        }
        validate_consistory(&self.consistory)?;
        validate_characters(&self.characters)?;
        for (i, frame) in self.frames.iter().enumerate() {
            self.validate_frame_characters(i, frame)?;
        }
        Ok(())
    }

    fn validate_frame_characters(
        &self,
        i: usize,
        frame: &FrameSpec,
    ) -> Result<(), ValidationError> {
        if frame.characters.len() > MAX_FRAME_CHARACTERS {
            return Err(ValidationError::new(
                format!("frames[{i}].characters"),
                format!(
                    "at most {MAX_FRAME_CHARACTERS} characters per frame, got {}",
                    frame.characters.len()
                ),
            ));
        }
        for (k, name) in frame.characters.iter().enumerate() {
            let field = format!("frames[{i}].characters[{k}]");
            let Some(index) = self.character_index(name) else {
                let known: Vec<&str> = self.characters.iter().map(|c| c.name.as_str()).collect();
                let known = if known.is_empty() {
                    "none defined".to_string()
                } else {
                    known.join(", ")
                };
                return Err(ValidationError::new(
                    field,
                    format!("no character named {name:?} (characters: {known})"),
                ));
            };
            if frame.characters[..k].contains(name) {
                return Err(ValidationError::new(
                    field,
                    format!("{name:?} is named twice in this frame"),
                ));
            }
            let words = &self.characters[index].subject_words;
            if !words.iter().any(|w| contains_word(&frame.prompt, w)) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "the prompt shows {name:?} but has none of its subject words as a whole word (looked for: {})",
                        words.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `word` occurs in `text` as a whole word, ignoring case: a word is a run of letters and
/// digits, so "dog" is in "a dog, running" but not in "dogs" or "hotdog".
pub fn contains_word(text: &str, word: &str) -> bool {
    let word = word.to_lowercase();
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| !w.is_empty() && w.to_lowercase() == word)
}

/// ConsiStory option rules shared by every entry point.
pub fn validate_consistory(o: &ConsistoryOptions) -> Result<(), ValidationError> {
    for (field, v) in [
        ("mask_dropout", o.mask_dropout),
        ("injection_alpha", o.injection_alpha),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(ValidationError::new(
                format!("consistory.{field}"),
                format!("must be within 0..=1, got {v}"),
            ));
        }
    }
    Ok(())
}

/// Character rules shared by every entry point (frames' references are checked by `validate`).
pub fn validate_characters(characters: &[CharacterSpec]) -> Result<(), ValidationError> {
    if characters.len() > MAX_CHARACTERS {
        return Err(ValidationError::new(
            "characters",
            format!(
                "at most {MAX_CHARACTERS} characters, got {}",
                characters.len()
            ),
        ));
    }
    for (i, c) in characters.iter().enumerate() {
        let field = |name: &str| format!("characters[{i}].{name}");
        let name_ok = (1..=MAX_CHARACTER_NAME).contains(&c.name.len())
            && c.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | ' '))
            && !c.name.starts_with(' ')
            && !c.name.ends_with(' ');
        if !name_ok {
            return Err(ValidationError::new(
                field("name"),
                format!(
                    "must be 1-{MAX_CHARACTER_NAME} ASCII letters, digits, '-', '_' or inner spaces, got {:?}",
                    c.name
                ),
            ));
        }
        // Names differing only in case would be the same name to a reader (and to a
        // case-insensitive file system if they name output files).
        if let Some(j) = characters[..i]
            .iter()
            .position(|o| o.name.eq_ignore_ascii_case(&c.name))
        {
            return Err(ValidationError::new(
                field("name"),
                format!(
                    "{:?} is already the name of characters[{j}] ({:?})",
                    c.name, characters[j].name
                ),
            ));
        }
        if c.description.trim().is_empty() {
            return Err(ValidationError::new(
                field("description"),
                "must describe the character",
            ));
        }
        if c.subject_words.is_empty() {
            return Err(ValidationError::new(
                field("subject_words"),
                "needs at least one word of the description (e.g. [dog] for \"a corgi dog\")",
            ));
        }
        for (j, w) in c.subject_words.iter().enumerate() {
            let field = format!("characters[{i}].subject_words[{j}]");
            if w.is_empty() || !w.chars().all(char::is_alphanumeric) {
                return Err(ValidationError::new(
                    field,
                    format!("must be one word of letters and digits, got {w:?}"),
                ));
            }
            if !contains_word(&c.description, w) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "{w:?} does not occur as a whole word in the description {:?}",
                        c.description
                    ),
                ));
            }
        }
        if !(1..=MAX_ANCHORS).contains(&c.anchors) {
            return Err(ValidationError::new(
                field("anchors"),
                format!(
                    "must be within 1..={MAX_ANCHORS} (an image counts as one), got {}",
                    c.anchors
                ),
            ));
        }
    }
    Ok(())
}

/// Width and height rules shared by every entry point.
pub fn validate_size(width: u32, height: u32) -> Result<(), ValidationError> {
    for (field, v) in [("width", width), ("height", height)] {
        if v % 8 != 0 {
            return Err(ValidationError::new(
                field,
                format!("must be divisible by 8, got {v}"),
            ));
        }
        if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
            return Err(ValidationError::new(
                field,
                format!("must be within {MIN_SIDE}..={MAX_SIDE}, got {v}"),
            ));
        }
    }
    Ok(())
}

/// Style rules shared by every entry point.
pub fn validate_style(style: &StyleSpec, steps: u32) -> Result<(), ValidationError> {
    if style.prompt.trim().is_empty() {
        return Err(ValidationError::new(
            "style.prompt",
            "must describe the style image (or, without one, the style to generate)",
        ));
    }
    if style.image.is_none() && style.offset != 0 {
        return Err(ValidationError::new(
            "style.offset",
            "holds an inverted image cleaner at the start; a generated style (no image) has none",
        ));
    }
    if style.offset >= steps {
        return Err(ValidationError::new(
            "style.offset",
            format!("must be below steps ({steps}), got {}", style.offset),
        ));
    }
    if !style.inversion_guidance.is_finite() || !(0.0..=50.0).contains(&style.inversion_guidance) {
        return Err(ValidationError::new(
            "style.inversion_guidance",
            format!("must be within 0..=50, got {}", style.inversion_guidance),
        ));
    }
    let o = &style.options;
    if !(0.0..=1.0).contains(&o.only_self_level) {
        return Err(ValidationError::new(
            "style.options.only_self_level",
            format!("must be within 0..=1, got {}", o.only_self_level),
        ));
    }
    if !o.shared_score_scale.is_finite() || !o.shared_score_shift.is_finite() {
        return Err(ValidationError::new(
            "style.options",
            "shared_score_scale and shared_score_shift must be finite",
        ));
    }
    Ok(())
}

impl fmt::Display for StoryboardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} frames of {}x{} on {}",
            self.frames.len(),
            self.width,
            self.height,
            self.model
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOARD: &str = "model: tiny\nwidth: 64\nheight: 64\nsteps: 4\nseed: 100\nframes:\n  - prompt: a\n  - prompt: b\n    seed: 7\n";

    #[test]
    fn defaults_and_seeds() {
        let s = StoryboardSpec::from_yaml(BOARD).unwrap();
        s.validate().unwrap();
        assert_eq!(s.guidance, 7.5);
        assert_eq!(s.frames_per_task, 4);
        let frames = s.resolved_frames();
        assert_eq!(frames[0].seed, 100);
        assert_eq!(frames[1].seed, 7);
        assert!(s.style.is_none());
    }

    #[test]
    fn unknown_keys_name_the_line() {
        let e = StoryboardSpec::from_yaml("model: m\nframes:\n  - prompt: a\n    colour: red\n")
            .unwrap_err();
        assert!(e.contains("colour") && e.contains("line 4"), "{e}");
        let e = StoryboardSpec::from_yaml("model: m\nwidht: 3\nframes: []\n").unwrap_err();
        assert!(e.contains("widht") && e.contains("line 2"), "{e}");
        let e = StoryboardSpec::from_yaml("model: [\n").unwrap_err();
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let base = StoryboardSpec::from_yaml(BOARD).unwrap();
        let check = |s: StoryboardSpec, field: &str| {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        };
        check(
            StoryboardSpec {
                width: 60,
                ..base.clone()
            },
            "width",
        );
        check(
            StoryboardSpec {
                height: 4096,
                ..base.clone()
            },
            "height",
        );
        check(
            StoryboardSpec {
                steps: 0,
                ..base.clone()
            },
            "steps",
        );
        check(
            StoryboardSpec {
                frames: vec![],
                ..base.clone()
            },
            "frames",
        );
        check(
            StoryboardSpec {
                guidance: f64::NAN,
                ..base.clone()
            },
            "guidance",
        );
        check(
            StoryboardSpec {
                frames_per_task: 0,
                ..base.clone()
            },
            "frames_per_task",
        );
        let mut blank = base.clone();
        blank.frames[1].prompt = " ".into();
        check(blank, "frames[1].prompt");
        let style = StyleSpec {
            image: Some("s.png".into()),
            prompt: "p".into(),
            seed: None,
            offset: 4,
            inversion_guidance: 2.0,
            options: StyleOptions::default(),
        };
        check(
            StoryboardSpec {
                style: Some(style.clone()),
                ..base.clone()
            },
            "style.offset",
        );
        let bad = StyleSpec {
            options: StyleOptions {
                only_self_level: 2.0,
                ..Default::default()
            },
            offset: 0,
            ..style
        };
        check(
            StoryboardSpec {
                style: Some(bad),
                ..base
            },
            "style.options.only_self_level",
        );
    }

    #[test]
    fn load_resolves_the_style_image_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("style.png"), b"x").unwrap();
        let board = format!("{BOARD}style:\n  image: style.png\n  prompt: watercolor\n");
        let path = dir.path().join("board.yaml");
        std::fs::write(&path, &board).unwrap();
        let s = StoryboardSpec::load(&path).unwrap();
        assert_eq!(s.style.unwrap().image, Some(dir.path().join("style.png")));
        std::fs::write(&path, board.replace("style.png", "missing.png")).unwrap();
        let e = StoryboardSpec::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("style.image") && e.contains("missing.png"),
            "{e}"
        );
    }

    /// A 1x1 grey PNG: character images are real pictures in these tests.
    const TINY_PNG: &[u8] = b"\
        \x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\
        \x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00\x3a\x7e\x9b\
        \x55\x00\x00\x00\x0a\x49\x44\x41\x54\x78\x9c\x63\x68\x00\x00\x00\
        \x82\x00\x81\x77\xcd\x72\xb6\x00\x00\x00\x00\x49\x45\x4e\x44\xae\
        \x42\x60\x82";

    const CHARACTERS: &str = "model: tiny\nwidth: 64\nheight: 64\nsteps: 4\nseed: 100
characters:
  - name: Biscuit
    description: a cute corgi dog, a watercolor painting
    subject_words: [dog, corgi]
  - name: Old Captain
    description: an old sailor with a pipe
    subject_words: [sailor]
    image: captain.png
    anchors: 3
    seed: 5
consistory:
  mask_dropout: 0.25
  freeu: false
frames:
  - prompt: a lighthouse on a cliff
  - prompt: A Sailor and his DOG on a boat
    characters: [Old Captain, Biscuit]
  - prompt: a corgi asleep
    characters: [Biscuit]
";

    fn characters_board() -> StoryboardSpec {
        StoryboardSpec::from_yaml(CHARACTERS).unwrap()
    }

    #[test]
    fn characters_parse_load_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("captain.png"), TINY_PNG).unwrap();
        let path = dir.path().join("board.yaml");
        std::fs::write(&path, CHARACTERS).unwrap();
        let s = StoryboardSpec::load(&path).unwrap();
        assert_eq!(s.characters.len(), 2);
        let (biscuit, captain) = (&s.characters[0], &s.characters[1]);
        assert_eq!(biscuit.subject_words, ["dog", "corgi"]);
        assert_eq!(biscuit.image, None);
        assert_eq!(
            captain.image.as_deref(),
            Some(dir.path().join("captain.png").as_path())
        );
        assert_eq!(captain.anchors, 3);
        assert_eq!(s.character_seed(1), 5);
        assert_eq!(s.character_index("Old Captain"), Some(1));
        assert_eq!(s.character_index("old captain"), None);
        assert_eq!(
            s.consistory,
            ConsistoryOptions {
                mask_dropout: 0.25,
                freeu: false,
                ..Default::default()
            }
        );
        let frames = s.resolved_frames();
        let shown: Vec<&[usize]> = frames.iter().map(|f| f.characters.as_slice()).collect();
        assert_eq!(shown, [&[][..], &[1, 0], &[0]]);
        assert_eq!(frames[1].seed, 101);

        std::fs::write(&path, CHARACTERS.replace("captain.png", "missing.png")).unwrap();
        let e = StoryboardSpec::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("characters[1].image") && e.contains("missing.png"),
            "{e}"
        );
    }

    #[test]
    fn character_defaults() {
        let s = StoryboardSpec::from_yaml(
            "model: m
seed: 100
characters:
  - { name: Rex, description: a dog, subject_words: [dog] }
  - { name: Tom, description: a cat, subject_words: [cat] }
frames: [{ prompt: a dog, characters: [Rex] }]
",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.characters[0].anchors, 2);
        assert_eq!(s.characters[0].seed, None);
        assert_eq!(s.character_seed(0), 100 + (1 << 32));
        assert_eq!(s.character_seed(1), 100 + (2 << 32));
        assert_eq!(
            StoryboardSpec {
                seed: u64::MAX,
                ..s.clone()
            }
            .character_seed(0),
            (1 << 32) - 1
        );
        let o = &s.consistory;
        assert_eq!((o.mask_dropout, o.injection_alpha), (0.5, 0.8));
        assert!(o.freeu && o.query_blend && o.feature_injection);
        assert_eq!(
            StoryboardSpec::from_yaml("model: m\nconsistory: {}\nframes: []\n")
                .unwrap()
                .consistory,
            *o
        );
    }

    #[test]
    fn boards_without_characters_are_unchanged() {
        let s = StoryboardSpec::from_yaml(BOARD).unwrap();
        assert!(s.characters.is_empty() && s.consistory.is_default());
        assert!(s.resolved_frames().iter().all(|f| f.characters.is_empty()));
        // Serialized boards are content keys (`storyfarm render`'s resume) and stored specs.
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            !json.contains("characters") && !json.contains("consistory"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<StoryboardSpec>(&json).unwrap(), s);
        let with = characters_board();
        assert_eq!(
            serde_json::from_str::<StoryboardSpec>(&serde_json::to_string(&with).unwrap()).unwrap(),
            with
        );
    }

    #[test]
    fn contains_word_matches_whole_words_ignoring_case() {
        assert!(contains_word("A Dog, running", "dog"));
        assert!(contains_word("dog", "DOG"));
        assert!(contains_word("the corgi-dog", "dog"));
        assert!(!contains_word("two dogs", "dog"));
        assert!(!contains_word("a hotdog", "dog"));
        assert!(!contains_word("", "dog"));
    }

    #[test]
    fn character_validation_names_the_field() {
        let base = characters_board();
        base.validate().unwrap();
        let check = |s: StoryboardSpec, field: &str, needles: &[&str]| {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            for needle in needles {
                assert!(e.message.contains(needle), "{needle:?} not in {e}");
            }
        };
        let edit = |f: &dyn Fn(&mut StoryboardSpec)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };

        // Frames: unknown, twice, without a subject word, too many.
        check(
            edit(&|s| s.frames[2].characters = vec!["Rex".into()]),
            "frames[2].characters[0]",
            &["no character named \"Rex\"", "Biscuit, Old Captain"],
        );
        check(
            edit(&|s| {
                s.characters.clear();
                s.frames[0].characters = vec!["Rex".into()];
                s.frames[1].characters.clear();
                s.frames[2].characters.clear();
            }),
            "frames[0].characters[0]",
            &["no character named \"Rex\" (characters: none defined)"],
        );
        check(
            edit(&|s| s.frames[2].characters.push("Biscuit".into())),
            "frames[2].characters[1]",
            &["\"Biscuit\" is named twice"],
        );
        check(
            edit(&|s| s.frames[2].prompt = "two dogs and a hotdog".into()),
            "frames[2].characters[0]",
            &["\"Biscuit\"", "looked for: dog, corgi"],
        );
        check(
            edit(&|s| s.frames[1].prompt = "a dog on a boat".into()),
            "frames[1].characters[0]",
            &["\"Old Captain\"", "looked for: sailor"],
        );
        let many = |n: usize| {
            edit(&|s| {
                s.characters = (0..n)
                    .map(|i| CharacterSpec {
                        name: format!("c{i}"),
                        ..base.characters[0].clone()
                    })
                    .collect();
                s.frames[1].characters = (0..n).map(|i| format!("c{i}")).collect();
                s.frames[2].characters.clear();
            })
        };
        many(4).validate().unwrap();
        check(
            many(5),
            "frames[1].characters",
            &["at most 4 characters per frame, got 5"],
        );
        many(8)
            .characters
            .iter()
            .for_each(|c| assert_eq!(c.anchors, 2));
        check(many(9), "characters", &["at most 8 characters, got 9"]);

        // Characters.
        for bad in ["", " Rex", "Rex ", "Rex!", "Zoë", &"x".repeat(65)] {
            check(
                edit(&|s| s.characters[0].name = bad.into()),
                "characters[0].name",
                &["must be 1-64 ASCII letters"],
            );
        }
        edit(&|s| {
            s.characters[0].name = "a-Z_0 9".repeat(9).chars().take(64).collect();
            s.frames.iter_mut().for_each(|f| f.characters.clear());
        })
        .validate()
        .unwrap();
        check(
            edit(&|s| s.characters[1].name = "biscuit".into()),
            "characters[1].name",
            &["\"biscuit\" is already the name of characters[0] (\"Biscuit\")"],
        );
        check(
            edit(&|s| s.characters[0].description = " ".into()),
            "characters[0].description",
            &["must describe the character"],
        );
        check(
            edit(&|s| s.characters[1].subject_words.clear()),
            "characters[1].subject_words",
            &["at least one word"],
        );
        check(
            edit(&|s| s.characters[0].subject_words[1] = "corgi dog".into()),
            "characters[0].subject_words[1]",
            &["one word of letters and digits, got \"corgi dog\""],
        );
        check(
            edit(&|s| s.characters[0].subject_words[1] = "puppy".into()),
            "characters[0].subject_words[1]",
            &["\"puppy\" does not occur as a whole word in the description"],
        );
        check(
            edit(&|s| s.characters[0].subject_words[0] = "cor".into()),
            "characters[0].subject_words[0]",
            &["does not occur as a whole word"],
        );
        check(
            edit(&|s| s.characters[0].anchors = 0),
            "characters[0].anchors",
            &["1..=4", "got 0"],
        );
        check(
            edit(&|s| s.characters[1].anchors = 5),
            "characters[1].anchors",
            &["an image counts as one", "got 5"],
        );

        // ConsiStory options.
        check(
            edit(&|s| s.consistory.mask_dropout = 1.5),
            "consistory.mask_dropout",
            &["0..=1, got 1.5"],
        );
        check(
            edit(&|s| s.consistory.injection_alpha = -0.1),
            "consistory.injection_alpha",
            &["0..=1"],
        );
        check(
            edit(&|s| s.consistory.injection_alpha = f64::NAN),
            "consistory.injection_alpha",
            &["NaN"],
        );
    }

    #[test]
    fn unknown_keys_in_characters_name_line_and_column() {
        let e = StoryboardSpec::from_yaml(&CHARACTERS.replace("    anchors: 3", "    anchor: 3"))
            .unwrap_err();
        assert!(
            e.contains("unknown field `anchor`") && e.contains("line 14 column 5"),
            "{e}"
        );
        let e = StoryboardSpec::from_yaml(&CHARACTERS.replace("  freeu: false", "  free_u: false"))
            .unwrap_err();
        assert!(
            e.contains("unknown field `free_u`") && e.contains("line 18 column 3"),
            "{e}"
        );
        let e = StoryboardSpec::from_yaml(
            &CHARACTERS.replace("characters: [Biscuit]", "character: [Biscuit]"),
        )
        .unwrap_err();
        assert!(
            e.contains("unknown field `character`") && e.contains("line 24 column 5"),
            "{e}"
        );
        let e = StoryboardSpec::from_yaml(
            &CHARACTERS.replace("subject_words: [sailor]", "subject_words: sailor"),
        )
        .unwrap_err();
        assert!(e.contains("subject_words") && e.contains("line 12"), "{e}");
    }

    /// The first YAML block after `after` in a Markdown text.
    fn yaml_block(markdown: &str, after: &str) -> String {
        let rest = &markdown[markdown.find(after).unwrap()..];
        let start = rest.find("```yaml\n").unwrap() + "```yaml\n".len();
        rest[start..][..rest[start..].find("```").unwrap()].to_string()
    }

    #[test]
    fn documented_examples_are_valid_boards() {
        let readme = yaml_block(include_str!("../../../README.md"), "### Storyboard files");
        let module: String = include_str!("storyboard.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
            .collect();
        for yaml in [readme, yaml_block(&module, "")] {
            let s = StoryboardSpec::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            s.validate().unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            assert_eq!(s.characters.len(), 2, "{yaml}");
            assert!(
                s.resolved_frames().iter().any(|f| f.characters == [0, 1]),
                "{yaml}"
            );
        }
    }
}
