//! Files of one component (`vae/`, `text_encoder/`, ...) of a diffusers model folder: its JSON
//! config and the safetensors file(s) holding its weights.

use std::path::{Path, PathBuf};

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

/// The weight files of a component whose weights are called `stem` (`model` for transformers,
/// `diffusion_pytorch_model` for diffusers), best first: the full-precision single file, its
/// sharded form, then the fp16 variants (same two forms).
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            return shard_files(&index);
        }
    }
    Err(DiffusionError::ModelLayout {
        path: dir.to_path_buf(),
        message: format!(
            "no weights found: expected {stem}.safetensors, {stem}.fp16.safetensors or a sharded \
             {stem}.safetensors.index.json"
        ),
    })
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The distinct shard files named by a `*.safetensors.index.json`, in a stable order.
fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let index: ShardIndex = read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(DiffusionError::ConfigFile {
            path: index_path.to_path_buf(),
            message: "weight_map is empty".to_string(),
        });
    }
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_full_precision_then_shards_then_fp16() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("storyfarm-component-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let missing = weight_files(&dir, "model");
        assert!(matches!(missing, Err(DiffusionError::ModelLayout { .. })));

        std::fs::write(dir.join("model.fp16.safetensors"), b"")?;
        assert_eq!(
            weight_files(&dir, "model")?,
            vec![dir.join("model.fp16.safetensors")]
        );

        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "model-00002.safetensors",
                "b": "model-00001.safetensors", "c": "model-00002.safetensors"}}"#,
        )?;
        assert_eq!(
            weight_files(&dir, "model")?,
            vec![
                dir.join("model-00001.safetensors"),
                dir.join("model-00002.safetensors")
            ]
        );

        std::fs::write(dir.join("model.safetensors"), b"")?;
        assert_eq!(
            weight_files(&dir, "model")?,
            vec![dir.join("model.safetensors")]
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
