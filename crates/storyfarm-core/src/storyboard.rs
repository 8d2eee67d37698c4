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
//! frames:
//!   - prompt: a lighthouse on a cliff, a watercolor painting
//!   - prompt: a fishing boat at dawn, a watercolor painting
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
        Self { field: field.into(), message: message.into() }
    }
}

/// Why a storyboard file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoryboardFileError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Malformed YAML or an unknown key; the message carries the line and column.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: ValidationError },
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

/// The style reference of a storyboard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleSpec {
    /// Image file, relative to the storyboard file (local mode and `storyfarm submit`).
    pub image: PathBuf,
    /// What the image shows; the prompt of its inversion.
    pub prompt: String,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
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
}

impl StoryboardSpec {
    /// Parses YAML; unknown keys and type errors carry their line and column.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads, parses and validates a storyboard file; the style image path becomes absolute
    /// (relative to the file) and must exist.
    pub fn load(path: &Path) -> Result<Self, StoryboardFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| StoryboardFileError::Read { path: path.to_path_buf(), source })?;
        let mut spec = Self::from_yaml(&text)
            .map_err(|message| StoryboardFileError::Syntax { path: path.to_path_buf(), message })?;
        let invalid = |source| StoryboardFileError::Invalid { path: path.to_path_buf(), source };
        spec.validate().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        // A model folder next to the board is named relative to it, like the style image.
        let local_model = base.join(&spec.model);
        if Path::new(&spec.model).is_relative() && local_model.join("model_index.json").is_file() {
            spec.model = local_model.canonicalize().unwrap_or(local_model).display().to_string();
        }
        if let Some(style) = &mut spec.style {
            let image = base.join(&style.image);
            if !image.is_file() {
                return Err(invalid(ValidationError::new(
                    "style.image",
                    format!("no such file: {}", image.display()),
                )));
            }
            style.image = image;
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

    pub fn resolved_frames(&self) -> Vec<ResolvedFrame> {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, f)| ResolvedFrame {
                index: i as u32,
                prompt: f.prompt.clone(),
                negative_prompt: f.negative_prompt.clone().unwrap_or_else(|| self.negative_prompt.clone()),
                seed: self.frame_seed(i),
            })
            .collect()
    }

    /// Every rule a storyboard must meet, with the field named on failure.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.model.trim().is_empty() {
            return Err(ValidationError::new("model", "must name a model (hub id or folder)"));
        }
        validate_size(self.width, self.height)?;
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(ValidationError::new("steps", format!("must be within 1..={MAX_STEPS}, got {}", self.steps)));
        }
        if !self.guidance.is_finite() || !(0.0..=50.0).contains(&self.guidance) {
            return Err(ValidationError::new("guidance", format!("must be within 0..=50, got {}", self.guidance)));
        }
        if self.frames_per_task == 0 || self.frames_per_task > MAX_FRAMES_PER_TASK {
            return Err(ValidationError::new(
                "frames_per_task",
                format!("must be within 1..={MAX_FRAMES_PER_TASK}, got {}", self.frames_per_task),
            ));
        }
        if self.frames.is_empty() {
            return Err(ValidationError::new("frames", "a storyboard needs at least one frame"));
        }
        if self.frames.len() > MAX_FRAMES {
            return Err(ValidationError::new(
                "frames",
                format!("at most {MAX_FRAMES} frames, got {}", self.frames.len()),
            ));
        }
        for (i, frame) in self.frames.iter().enumerate() {
            if frame.prompt.trim().is_empty() {
                return Err(ValidationError::new(format!("frames[{i}].prompt"), "must not be empty"));
            }
        }
        if let Some(style) = &self.style {
            validate_style(style, self.steps)?;
        }
        Ok(())
    }
}

/// Width and height rules shared by every entry point.
pub fn validate_size(width: u32, height: u32) -> Result<(), ValidationError> {
    for (field, v) in [("width", width), ("height", height)] {
        if v % 8 != 0 {
            return Err(ValidationError::new(field, format!("must be divisible by 8, got {v}")));
        }
        if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
            return Err(ValidationError::new(field, format!("must be within {MIN_SIDE}..={MAX_SIDE}, got {v}")));
        }
    }
    Ok(())
}

/// Style rules shared by every entry point.
pub fn validate_style(style: &StyleSpec, steps: u32) -> Result<(), ValidationError> {
    if style.prompt.trim().is_empty() {
        return Err(ValidationError::new("style.prompt", "must describe the style image"));
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
        return Err(ValidationError::new("style.options", "shared_score_scale and shared_score_shift must be finite"));
    }
    Ok(())
}

impl fmt::Display for StoryboardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} frames of {}x{} on {}", self.frames.len(), self.width, self.height, self.model)
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
        let e = StoryboardSpec::from_yaml("model: m\nframes:\n  - prompt: a\n    colour: red\n").unwrap_err();
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
        check(StoryboardSpec { width: 60, ..base.clone() }, "width");
        check(StoryboardSpec { height: 4096, ..base.clone() }, "height");
        check(StoryboardSpec { steps: 0, ..base.clone() }, "steps");
        check(StoryboardSpec { frames: vec![], ..base.clone() }, "frames");
        check(StoryboardSpec { guidance: f64::NAN, ..base.clone() }, "guidance");
        check(StoryboardSpec { frames_per_task: 0, ..base.clone() }, "frames_per_task");
        let mut blank = base.clone();
        blank.frames[1].prompt = " ".into();
        check(blank, "frames[1].prompt");
        let style = StyleSpec {
            image: "s.png".into(),
            prompt: "p".into(),
            offset: 4,
            inversion_guidance: 2.0,
            options: StyleOptions::default(),
        };
        check(StoryboardSpec { style: Some(style.clone()), ..base.clone() }, "style.offset");
        let bad = StyleSpec { options: StyleOptions { only_self_level: 2.0, ..Default::default() }, offset: 0, ..style };
        check(StoryboardSpec { style: Some(bad), ..base }, "style.options.only_self_level");
    }

    #[test]
    fn load_resolves_the_style_image_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("style.png"), b"x").unwrap();
        let board = format!("{BOARD}style:\n  image: style.png\n  prompt: watercolor\n");
        let path = dir.path().join("board.yaml");
        std::fs::write(&path, &board).unwrap();
        let s = StoryboardSpec::load(&path).unwrap();
        assert_eq!(s.style.unwrap().image, dir.path().join("style.png"));
        std::fs::write(&path, board.replace("style.png", "missing.png")).unwrap();
        let e = StoryboardSpec::load(&path).unwrap_err().to_string();
        assert!(e.contains("style.image") && e.contains("missing.png"), "{e}");
    }
}
