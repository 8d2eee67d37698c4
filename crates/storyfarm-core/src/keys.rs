//! Content keys: everything that determines an inversion trajectory (or a character's anchors)
//! hashes to the same key, so the same reference under the same settings is never inverted twice
//! and the same character is never anchored twice.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::storyboard::{ConsistoryOptions, StoryboardSpec, StyleOptions};

/// Hex sha256 of some bytes (image hashes, artifact addresses).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where anchor `index`'s picture is stored beside its character's anchors file.
pub fn anchor_png_key(anchors_key: &str, index: u32) -> String {
    let stem = anchors_key
        .strip_suffix(".safetensors")
        .unwrap_or(anchors_key);
    format!("{stem}/{index}.png")
}

/// Where the picture of a generated style reference is stored beside its trajectory.
pub fn reference_png_key(trajectory_key: &str) -> String {
    let stem = trajectory_key
        .strip_suffix(".safetensors")
        .unwrap_or(trajectory_key);
    format!("{stem}.png")
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

/// Everything that determines the trajectory of a style reference generated from its prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GeneratedReferenceInputs<'a> {
    pub model: &'a str,
    pub scheduler: &'a str,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub prompt: &'a str,
    pub seed: u64,
}

impl GeneratedReferenceInputs<'_> {
    pub fn cache_key(&self) -> String {
        let canonical = serde_json::json!({ "v": 1, "generated_reference": self });
        sha256_hex(canonical.to_string().as_bytes())
    }
}

/// How a board's frames (and anchors) are styled: the style trajectory's cache key and how it is
/// replayed. Part of a styled character's anchor key, since its anchors are rendered in the style.
pub fn style_identity(trajectory_cache_key: &str, offset: u32, options: &StyleOptions) -> String {
    let canonical = serde_json::json!({
        "v": 1,
        "style": { "trajectory": trajectory_cache_key, "offset": offset, "options": options },
    });
    sha256_hex(canonical.to_string().as_bytes())
}

/// Everything that determines a character's anchors, the images its frames attend to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnchorInputs<'a> {
    pub model: &'a str,
    /// The scheduler settings as the model folder states them (canonical JSON).
    pub scheduler: &'a str,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// The board's negative prompt: the anchors' unconditional half.
    pub negative_prompt: &'a str,
    pub description: &'a str,
    pub subject_words: &'a [String],
    pub seed: u64,
    pub anchors: u32,
    /// The character's image by its bytes, not its path.
    pub image_sha256: Option<&'a str>,
    pub consistory: &'a ConsistoryOptions,
    /// The board's style ([`style_identity`]): anchors are rendered in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<&'a str>,
}

impl<'a> AnchorInputs<'a> {
    /// The inputs of character `index` of a board (its seed resolved); `image_sha256` hashes the
    /// character's image and is `Some` exactly when it has one. `None` for an index out of range.
    pub fn of_character(
        spec: &'a StoryboardSpec,
        index: usize,
        scheduler: &'a str,
        image_sha256: Option<&'a str>,
        style: Option<&'a str>,
    ) -> Option<Self> {
        let character = spec.characters.get(index)?;
        Some(Self {
            model: &spec.model,
            scheduler,
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            guidance_scale: spec.guidance,
            negative_prompt: &spec.negative_prompt,
            description: &character.description,
            subject_words: &character.subject_words,
            seed: spec.character_seed(index),
            anchors: character.anchors,
            image_sha256,
            consistory: &spec.consistory,
            style,
        })
    }

    /// The anchors' key: sha256 of a canonical, versioned JSON encoding of the inputs.
    pub fn anchor_key(&self) -> String {
        let canonical = serde_json::json!({ "v": 1, "anchors": self });
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
            InversionInputs {
                image_sha256: "ac",
                ..base.clone()
            },
            InversionInputs {
                model: "n",
                ..base.clone()
            },
            InversionInputs {
                scheduler: "{\"a\":1}",
                ..base.clone()
            },
            InversionInputs {
                width: 256,
                ..base.clone()
            },
            InversionInputs {
                height: 256,
                ..base.clone()
            },
            InversionInputs {
                steps: 31,
                ..base.clone()
            },
            InversionInputs {
                prompt: "q",
                ..base.clone()
            },
            InversionInputs {
                guidance_scale: 1.0,
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.cache_key(), k, "{v:?}");
        }
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_anchor_input_changes_the_key() {
        let dog = words(&["dog"]);
        let corgi = words(&["corgi"]);
        let defaults = ConsistoryOptions::default();
        let base = AnchorInputs {
            model: "m",
            scheduler: "{}",
            width: 512,
            height: 512,
            steps: 30,
            guidance_scale: 7.5,
            negative_prompt: "",
            description: "a corgi dog",
            subject_words: &dog,
            seed: 1,
            anchors: 2,
            image_sha256: None,
            consistory: &defaults,
            style: None,
        };
        let k = base.anchor_key();
        assert_eq!(k, base.clone().anchor_key());
        assert_eq!(k.len(), 64);
        let options = [
            ConsistoryOptions {
                mask_dropout: 0.4,
                ..Default::default()
            },
            ConsistoryOptions {
                injection_alpha: 0.7,
                ..Default::default()
            },
            ConsistoryOptions {
                freeu: false,
                ..Default::default()
            },
            ConsistoryOptions {
                query_blend: false,
                ..Default::default()
            },
            ConsistoryOptions {
                feature_injection: false,
                ..Default::default()
            },
        ];
        let mut variants = vec![
            AnchorInputs {
                model: "n",
                ..base.clone()
            },
            AnchorInputs {
                scheduler: "{\"a\":1}",
                ..base.clone()
            },
            AnchorInputs {
                width: 256,
                ..base.clone()
            },
            AnchorInputs {
                height: 256,
                ..base.clone()
            },
            AnchorInputs {
                steps: 31,
                ..base.clone()
            },
            AnchorInputs {
                guidance_scale: 5.0,
                ..base.clone()
            },
            AnchorInputs {
                negative_prompt: "blurry",
                ..base.clone()
            },
            AnchorInputs {
                description: "a corgi dog, a painting",
                ..base.clone()
            },
            AnchorInputs {
                subject_words: &corgi,
                ..base.clone()
            },
            AnchorInputs {
                seed: 2,
                ..base.clone()
            },
            AnchorInputs {
                anchors: 3,
                ..base.clone()
            },
            AnchorInputs {
                image_sha256: Some("ab"),
                ..base.clone()
            },
        ];
        variants.extend(options.iter().map(|o| AnchorInputs {
            consistory: o,
            ..base.clone()
        }));
        let mut keys: Vec<String> = variants.iter().map(|v| v.anchor_key()).collect();
        for (v, key) in variants.iter().zip(&keys) {
            assert_ne!(*key, k, "{v:?}");
        }
        // Each input moves the key somewhere of its own, not merely away from the base.
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), variants.len());
        // Two images differ by their bytes' hash.
        let ab = AnchorInputs {
            image_sha256: Some("ab"),
            ..base.clone()
        };
        assert_ne!(
            ab.anchor_key(),
            AnchorInputs {
                image_sha256: Some("ac"),
                ..base.clone()
            }
            .anchor_key()
        );
        // The anchors of a character and the inversion of a reference never share a key space.
        assert_ne!(
            k,
            sha256_hex(
                serde_json::json!({ "v": 1, "inversion": base })
                    .to_string()
                    .as_bytes()
            )
        );
    }

    #[test]
    fn equal_boards_give_equal_anchor_keys_whatever_their_key_order() {
        let a = "model: m
seed: 3
characters:
  - { name: Rex, description: a corgi dog, subject_words: [dog], anchors: 3 }
consistory: { mask_dropout: 0.3, freeu: false }
frames: [{ prompt: a dog }]
";
        let b = "frames: [{ prompt: a dog }]
consistory: { freeu: false, mask_dropout: 0.3 }
characters:
  - { anchors: 3, subject_words: [dog], description: a corgi dog, name: Rex }
seed: 3
model: m
";
        let (a, b) = (
            StoryboardSpec::from_yaml(a).unwrap(),
            StoryboardSpec::from_yaml(b).unwrap(),
        );
        let key = |s: &StoryboardSpec, image| {
            AnchorInputs::of_character(s, 0, "{}", image, None)
                .unwrap()
                .anchor_key()
        };
        assert_eq!(key(&a, None), key(&b, None));
        assert_eq!(key(&a, Some("ab")), key(&b, Some("ab")));
        assert_ne!(key(&a, None), key(&a, Some("ab")));
        // The default seed is resolved into the key: naming it explicitly changes nothing.
        let mut explicit = a.clone();
        explicit.characters[0].seed = Some(a.character_seed(0));
        assert_eq!(key(&a, None), key(&explicit, None));
        // Defaults written out equal defaults left out.
        let written = StoryboardSpec::from_yaml(
            "model: m
characters:
  - { name: Rex, description: a corgi dog, subject_words: [dog], anchors: 2 }
consistory:
  { mask_dropout: 0.5, injection_alpha: 0.8, freeu: true, query_blend: true, feature_injection: true }
frames: [{ prompt: a dog }]
",
        )
        .unwrap();
        let omitted = StoryboardSpec::from_yaml(
            "model: m
characters: [{ name: Rex, description: a corgi dog, subject_words: [dog] }]
frames: [{ prompt: a dog }]
",
        )
        .unwrap();
        assert_eq!(key(&written, None), key(&omitted, None));
        // The name is how frames refer to a character, not what it looks like.
        let mut renamed = omitted.clone();
        renamed.characters[0].name = "Biscuit".into();
        assert_eq!(key(&renamed, None), key(&omitted, None));
        assert!(AnchorInputs::of_character(&omitted, 1, "{}", None, None).is_none());
        // Anchors are rendered in the board's style: another style is other anchors.
        let styled = |options: &StyleOptions, offset| style_identity("inv", offset, options);
        let defaults = StyleOptions::default();
        let plain = AnchorInputs::of_character(&omitted, 0, "{}", None, None).unwrap();
        let s1 = styled(&defaults, 0);
        let shifted = StyleOptions {
            shared_score_shift: 0.5,
            ..defaults.clone()
        };
        let s2 = styled(&shifted, 0);
        let s3 = styled(&defaults, 1);
        let s4 = style_identity("other", 0, &defaults);
        let mut keys: Vec<String> = [None, Some(&s1), Some(&s2), Some(&s3), Some(&s4)]
            .iter()
            .map(|style| {
                AnchorInputs {
                    style: style.map(String::as_str),
                    ..plain.clone()
                }
                .anchor_key()
            })
            .collect();
        assert_eq!(keys[0], key(&omitted, None));
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 5);
    }
}
