//! What the coordinator knows about a model without loading it: its queue family and the
//! scheduler settings that enter the inversion cache key.

use std::path::Path;

use crate::planner::ModelFacts;

/// Facts from a local diffusers folder when the coordinator can see one; for a hub repo id the
/// family comes from the name (`...xl...` is SDXL) and the id stands for its scheduler settings
/// (a repo's scheduler config does not change under the same id and revision).
pub fn model_facts(model: &str) -> ModelFacts {
    let dir = Path::new(model);
    let index = std::fs::read_to_string(dir.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if let Some(index) = index {
        let xl = index["_class_name"]
            .as_str()
            .is_some_and(|c| c.contains("XL"))
            || dir.join("text_encoder_2").is_dir();
        // serde_json maps are sorted: the re-serialised config is canonical.
        let scheduler = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.retain(|k, _| !k.starts_with('_'));
                }
                v.to_string()
            })
            .unwrap_or_default();
        return ModelFacts {
            family: family_name(xl),
            scheduler: format!("ddim;{scheduler}"),
        };
    }
    let xl = model.to_ascii_lowercase().contains("xl");
    ModelFacts {
        family: family_name(xl),
        scheduler: format!("ddim;hub:{model}"),
    }
}

fn family_name(xl: bool) -> String {
    if xl { "sdxl" } else { "sd" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_the_tiny_models_and_hub_ids() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let sd = model_facts(root.join("tiny-sd15").to_str().unwrap());
        assert_eq!(sd.family, "sd");
        assert!(sd.scheduler.contains("scaled_linear"), "{}", sd.scheduler);
        assert_eq!(
            model_facts(root.join("tiny-sdxl").to_str().unwrap()).family,
            "sdxl"
        );
        assert_eq!(
            model_facts("stabilityai/stable-diffusion-xl-base-1.0").family,
            "sdxl"
        );
        assert_eq!(
            model_facts("stable-diffusion-v1-5/stable-diffusion-v1-5").family,
            "sd"
        );
    }
}
