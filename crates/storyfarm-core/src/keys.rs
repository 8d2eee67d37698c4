//! Content keys: everything that determines an inversion trajectory hashes to the same key, so
//! the same reference under the same settings is never inverted twice.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Hex sha256 of some bytes (image hashes, artifact addresses).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Everything that determines a DDIM inversion trajectory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InversionInputs<'a> {
    pub image_sha256: &'a str,
    pub model: &'a str,
    /// The scheduler settings as the model folder states them (canonical JSON).
    pub scheduler: &'a str,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub prompt: &'a str,
    pub guidance_scale: f64,
}

impl InversionInputs<'_> {
    /// The cache key: sha256 of a canonical, versioned JSON encoding of the inputs.
    pub fn cache_key(&self) -> String {
        let canonical = serde_json::json!({ "v": 1, "inversion": self });
        sha256_hex(canonical.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_key() {
        let base = InversionInputs {
            image_sha256: "ab",
            model: "m",
            scheduler: "{}",
            width: 512,
            height: 512,
            steps: 30,
            prompt: "p",
            guidance_scale: 2.0,
        };
        let k = base.cache_key();
        assert_eq!(k, base.clone().cache_key());
        let variants = [
            InversionInputs { image_sha256: "ac", ..base.clone() },
            InversionInputs { model: "n", ..base.clone() },
            InversionInputs { scheduler: "{\"a\":1}", ..base.clone() },
            InversionInputs { width: 256, ..base.clone() },
            InversionInputs { height: 256, ..base.clone() },
            InversionInputs { steps: 31, ..base.clone() },
            InversionInputs { prompt: "q", ..base.clone() },
            InversionInputs { guidance_scale: 1.0, ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.cache_key(), k, "{v:?}");
        }
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
