//! The attention seam on the real SD 1.5 and SDXL UNet configs, built with zero weights that
//! cost no memory: every self- and cross-attention layer is a typed hook site.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use storyfarm_diffusion::attention::{AttentionKind, UNetBlock};
use storyfarm_diffusion::unet::{UNet, UNetConfig};
use storyfarm_diffusion::weights::Weights;

fn real_unet(name: &str) -> UNet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/real-configs")
        .join(name);
    let config = UNetConfig::from_file(&path).unwrap();
    UNet::new(config, &Weights::zeros(DType::F32, &Device::Cpu)).unwrap()
}

fn per_level(unet: &UNet, kind: AttentionKind) -> BTreeMap<usize, usize> {
    let mut m = BTreeMap::new();
    for id in unet
        .attention_ids()
        .into_iter()
        .filter(|id| id.kind == kind)
    {
        *m.entry(id.level).or_insert(0) += 1;
    }
    m
}

#[test]
fn sd15_has_16_self_attention_sites() {
    let unet = real_unet("sd15_unet.json");
    let ids = unet.attention_ids();
    let selfs: Vec<_> = ids
        .iter()
        .filter(|id| id.kind == AttentionKind::SelfAttention)
        .collect();
    assert_eq!(selfs.len(), 16);
    assert_eq!(ids.len(), 32, "every transformer block has attn1 and attn2");
    // 64x64 latent: levels 0..2 hold attention (level 3 is the attention-free bottom block).
    assert_eq!(
        per_level(&unet, AttentionKind::SelfAttention),
        BTreeMap::from([(0, 5), (1, 5), (2, 5), (3, 1)])
    );
    // diffusers processor order: down blocks, up blocks, mid block.
    assert_eq!(
        selfs[0].to_string(),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    );
    assert_eq!(
        selfs[6].to_string(),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    );
    assert_eq!(selfs[15].block, UNetBlock::Mid);
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "ids are unique");
}

#[test]
fn sdxl_has_70_self_attention_sites() {
    let unet = real_unet("sdxl_unet.json");
    let ids = unet.attention_ids();
    let selfs = ids
        .iter()
        .filter(|id| id.kind == AttentionKind::SelfAttention)
        .count();
    assert_eq!(selfs, 70);
    assert_eq!(ids.len(), 140);
    // Attention only at the two lower resolutions (64x64 and 32x32 tokens at 1024px).
    assert_eq!(
        per_level(&unet, AttentionKind::SelfAttention),
        BTreeMap::from([(1, 10), (2, 60)])
    );
    assert!(ids
        .iter()
        .any(|id| id.to_string() == "mid_block.attentions.0.transformer_blocks.9.attn2"));
}

/// ConsiStory on the real configs: SDXL's official layers (masks from the 32² cross-attention of a
/// 1024² render = level 2, injection and DIFT at 64² = level 1, DIFT from up_blocks[0]); SD 1.5
/// mapped by resolution ratio to the same levels (16² and 32² of a 512² render; DIFT from
/// up_blocks[1], the first up block that ends at level 1); SD 1.5's level 0 stays plain.
#[test]
fn consistory_levels_on_the_real_configs() {
    use storyfarm_diffusion::consistory::ConsistoryLevels;
    let xl = real_unet("sdxl_unet.json");
    let levels = ConsistoryLevels::for_unet(&xl).unwrap();
    assert_eq!(
        (levels.mask, levels.injection, levels.dift_up_block),
        (2, 1, 0)
    );
    let count = |unet: &UNet, f: &dyn Fn(&storyfarm_diffusion::attention::AttentionId) -> bool| {
        unet.attention_ids().iter().filter(|id| f(id)).count()
    };
    // SDXL: 30 + 6 decoder self-attention layers share, 4 + 6 inject at 64², 60 cross-attention
    // layers at 32² make the masks (METHOD.md §1.3-1.4).
    assert_eq!(count(&xl, &|id| levels.is_sdsa_layer(id)), 36);
    assert_eq!(count(&xl, &|id| levels.is_injection_layer(id)), 10);
    assert_eq!(count(&xl, &|id| levels.is_mask_layer(id)), 60);
    let sd15 = real_unet("sd15_unet.json");
    let levels = ConsistoryLevels::for_unet(&sd15).unwrap();
    assert_eq!(
        (levels.mask, levels.injection, levels.dift_up_block),
        (2, 1, 1)
    );
    assert!(sd15
        .attention_ids()
        .iter()
        .filter(|id| id.level == 0)
        .all(|id| !levels.is_sdsa_layer(id)
            && !levels.is_injection_layer(id)
            && !levels.is_mask_layer(id)));
    // SD 1.5: 3 + 3 decoder layers share, 2 + 3 inject, 2 + 3 cross-attention layers make masks.
    assert_eq!(count(&sd15, &|id| levels.is_sdsa_layer(id)), 6);
    assert_eq!(count(&sd15, &|id| levels.is_injection_layer(id)), 5);
    assert_eq!(count(&sd15, &|id| levels.is_mask_layer(id)), 5);
}
