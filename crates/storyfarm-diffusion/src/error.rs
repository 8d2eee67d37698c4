//! The one error type of the diffusion crate; every variant names the input that caused it.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a diffusion model.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("{component} config: unsupported value for `{field}`: {value}")]
    UnsupportedConfig {
        component: &'static str,
        field: String,
        value: String,
    },
    #[error("{component} config: invalid value for `{field}`: {reason}")]
    InvalidConfig {
        component: &'static str,
        field: String,
        reason: String,
    },
    #[error("config file {path}: {message}")]
    ConfigFile { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model location (`--model`) that is neither a model folder nor a hub repo id.
    #[error("model `{spec}`: {message}")]
    ModelSpec { spec: String, message: String },
    #[error("model folder {path}: {message}")]
    ModelLayout { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` in {location} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        location: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("model `{repo}` is not in the local Hugging Face cache and the hub is offline ({reason}); download it elsewhere and pass the local folder with --model /path/to/model")]
    HubOffline { repo: String, reason: String },
    #[error("model `{repo}`: could not fetch `{file}` from the Hugging Face hub: {message}; pass a local folder with --model /path/to/model")]
    HubFetch {
        repo: String,
        file: String,
        message: String,
    },
    /// The hub answered, and has no such repo or revision, or refuses it to us (private, gated).
    #[error("model `{repo}` at revision `{revision}`: not on the Hugging Face hub, or access is refused ({detail}); check the repo id and revision, set HF_TOKEN for a private or gated repo, or pass a local folder with --model /path/to/model")]
    HubRepoNotFound {
        repo: String,
        revision: String,
        detail: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("image {name}: {message}")]
    Image { name: String, message: String },
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DiffusionError {
    pub fn invalid_argument(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(
        component: &'static str,
        field: impl Into<String>,
        value: impl std::fmt::Display,
    ) -> Self {
        Self::UnsupportedConfig {
            component,
            field: field.into(),
            value: value.to_string(),
        }
    }

    pub fn invalid_config(
        component: &'static str,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidConfig {
            component,
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether running the same request again could succeed (the worker's retry policy).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::HubFetch { .. })
    }
}

pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;
