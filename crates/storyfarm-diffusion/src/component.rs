//! Reading the JSON files of a model folder (configs, indexes) with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{DiffusionError, Result};

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| DiffusionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| DiffusionError::ConfigFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
