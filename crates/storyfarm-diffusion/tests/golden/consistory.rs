//! ConsiStory cases (`consistory_*` kinds, recorded from the official NVlabs/consistory code by
//! ../shared/tools/consistory-goldens): one SDSA call, one feature-injection call, and whole
//! two-pass runs in batch and anchor mode, with masks compared step by step.
//!
//! Masks are discrete: a pixel whose map value lies within float32 noise of the Otsu threshold may
//! fall on the other side, and a near-tie between two Otsu bins may pick the neighbour. So a mask
//! check reports the fraction of pixels that differ (tolerance `tolerance.<name>` of the case file,
//! default 0) and, separately, how far the farthest differing pixel lies from the golden threshold
//! in bins of that map's histogram: more than one bin means a real error, not a flipped bin. The
//! report names the pass, step, level and image of every difference.

// Golden tensors are read as nested [step][image][patch] vectors; index loops over them say
// which axis is which more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use storyfarm_diffusion::attention::{
    attend, AttentionHook, AttentionId, AttentionKind, AttentionSite, BatchLayout, FreeU, Qkv,
    StepContext, UNetBlock,
};
use storyfarm_diffusion::consistory::hook::{
    CallKind, ConsistoryHook, InjectionPlan, StepInputs, TargetInjection,
};
use storyfarm_diffusion::consistory::maths;
use storyfarm_diffusion::consistory::run::{
    token_indices, ConsistoryOutput, ConsistorySet, DropoutDraws, PassTrace,
};
use storyfarm_diffusion::consistory::{AnchorMapping, ConsistoryLevels, ConsistoryOptions};
use storyfarm_diffusion::pipeline::{FrameInput, GenerationSettings};

use crate::cases::{load_pipeline, no_progress};
use crate::{Case, Check, Tol};

/// The official options as the case's settings state them.
fn options_of(case: &Case) -> Result<ConsistoryOptions> {
    let sdsa: Vec<usize> = case.setting("sdsa_steps")?;
    let blend: Vec<usize> = case.setting("query_blend_steps")?;
    let strengths: Vec<f64> = case.setting("query_blend_strength_f64")?;
    let fi = &case.settings["feature_injection"];
    let fi_steps: Vec<usize> =
        serde_json::from_value(fi["steps"].clone()).context("settings.feature_injection.steps")?;
    let freeu: Option<FreeU> = case.optional_setting("freeu")?;
    Ok(ConsistoryOptions {
        mask_dropout: case.setting("mask_dropout")?,
        sdsa_first_step: sdsa[0],
        query_blend_last_step: Some(blend[1]),
        query_blend_start: strengths[0],
        query_blend_end: *strengths
            .last()
            .ok_or_else(|| anyhow!("settings.query_blend_strength_f64 is empty"))?,
        injection_steps: Some((fi_steps[0], fi_steps[1])),
        injection_alpha: serde_json::from_value(fi["alpha"].clone())
            .context("settings.feature_injection.alpha")?,
        mask_window: case.setting("attention_window_steps")?,
        dift_timestep: serde_json::from_value(case.settings["dift"]["timestep"].clone())
            .context("settings.dift.timestep")?,
        freeu,
        feature_injection: true,
    })
}

fn generation_settings(case: &Case) -> Result<GenerationSettings> {
    let (height, width) = case.hw()?;
    Ok(GenerationSettings {
        height,
        width,
        steps: case.setting("steps")?,
        guidance_scale: case.setting("guidance_scale")?,
    })
}

fn frames(case: &Case, prompts: &[String], init: &Tensor) -> Result<Vec<FrameInput>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(FrameInput {
                prompt: p.clone(),
                negative_prompt: None,
                init_latents: init.get(i)?.unsqueeze(0)?,
            })
        })
        .collect::<Result<_>>()
        .with_context(|| case.path.display().to_string())
}

/// `[concept][image]` golden token positions (`-1` = absent).
fn golden_token_indices(t: &Tensor) -> Result<Vec<Vec<Option<usize>>>> {
    Ok(t.to_dtype(DType::I64)?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|row| row.into_iter().map(|x| usize::try_from(x).ok()).collect())
        .collect())
}

fn push(case: &mut Case, name: &str, max_abs: f32, ref_absmax: f32, default: f32) -> Result<()> {
    let tolerance = match case.tolerance(name, Tol::Abs(default))? {
        Tol::Abs(t) => t,
        _ => default,
    };
    case.checks.push(Check {
        name: name.to_string(),
        max_abs,
        ref_absmax,
        tolerance,
    });
    Ok(())
}

fn check_tokens(case: &mut Case, name: &str, got: &[Vec<Option<usize>>]) -> Result<()> {
    let expected = golden_token_indices(&case.tensor(name)?)?;
    let wrong = if expected == got { 0.0 } else { 1.0 };
    if wrong > 0.0 {
        case.notes
            .push(format!("{name}: ours {got:?}, golden {expected:?}"));
    }
    push(case, name, wrong, 1.0, 0.0)
}

/// The one SDSA call of the case: the hook assembles each image's key set from the golden
/// keyset's masks and the kernel attends; compared before `to_out`.
pub fn sdsa(case: &mut Case) -> Result<()> {
    let heads: usize = case.setting("heads")?;
    let scale: f64 = case.setting("softmax_scale")?;
    let images: usize = case.setting("batch_size_B")?;
    let res: usize = case.setting("res")?;
    let q = case.tensor("q")?;
    let k = case.tensor("k")?;
    let v = case.tensor("v")?;
    let keyset = case
        .tensor("keyset")?
        .to_dtype(DType::U8)?
        .to_vec2::<u8>()?;
    let n = res * res;
    // keyset[i] = all of image i, plus the kept subject tokens of each image j it maps to.
    let mut rows = vec![vec![false; images]; images];
    let mut keep = vec![vec![0f32; n]; images];
    for i in 0..images {
        for j in 0..images {
            let part = &keyset[i][j * n..(j + 1) * n];
            if i == j {
                if part.contains(&0) {
                    bail!("keyset[{i}] hides some of image {i}'s own tokens");
                }
                rows[i][j] = true;
            } else if part.iter().any(|&x| x != 0) {
                rows[i][j] = true;
                for (p, &x) in part.iter().enumerate() {
                    keep[j][p] = x as f32;
                }
            }
        }
    }
    // Mapped images with no kept token still count as mapped; that changes nothing in attention.
    let anchors = (0..images)
        .filter(|&j| (0..images).all(|i| i == j || rows[i][j]))
        .count();
    let mapping = AnchorMapping::batch(images, anchors.max(1));
    for i in 0..images {
        for j in 0..images {
            if rows[i][j] && !mapping.sees(i, j) {
                bail!("keyset[{i}] uses image {j}, which the batch mapping of {anchors} anchors forbids");
            }
        }
    }
    let level = level_of(case, res)?;
    let id = AttentionId {
        block: UNetBlock::Up(0),
        attention: 0,
        transformer_block: 0,
        kind: AttentionKind::SelfAttention,
        level,
    };
    let keep = HashMap::from([(
        level,
        Tensor::from_vec(keep.concat(), (images, n), &Device::Cpu)?,
    )]);
    let options = ConsistoryOptions::default();
    let levels = ConsistoryLevels {
        mask: level,
        sdsa: vec![level],
        injection: level,
        dift_up_block: 0,
    };
    let tokens: Vec<Vec<Option<usize>>> = Vec::new();
    // The golden q is already blended: no vanilla queries here.
    let step: usize = case.setting("step")?;
    let hook = ConsistoryHook::new(
        &options,
        &levels,
        &mapping,
        &tokens,
        CallKind::Main,
        StepInputs {
            keep: Some(&keep),
            ..Default::default()
        },
    );
    let ctx = StepContext {
        step,
        steps: 50,
        timestep: 0,
        layout: BatchLayout {
            images,
            guidance: true,
        },
    };
    let site = AttentionSite {
        id,
        height: res,
        width: res,
    };
    if !hook.applies_to(&site, &ctx) {
        bail!("the hook declines the SDSA layer at step {step}");
    }
    let inputs = hook.prepare(&site, &ctx, Qkv { q, k, v, heads })?;
    let out = attend(inputs, scale)?;
    let tol = case.tolerance("attn_out", Tol::Abs(1e-5))?;
    case.check("attn_out", &out, tol)?;
    Ok(())
}

/// Resolution level of a `res x res` layer of the case's model at its image size.
fn level_of(case: &Case, res: usize) -> Result<usize> {
    let (h, _) = case
        .hw()
        .or_else(|_| -> Result<(usize, usize)> { Ok((1024, 1024)) })?;
    let mut side = h / 8;
    for level in 0..8 {
        if side == res {
            return Ok(level);
        }
        side = side.div_ceil(2);
    }
    bail!("no level of a {h}-pixel image has side {res}")
}

/// One feature-injection call: the golden plan applied in place to the golden input, and the
/// plan itself rebuilt from the batch case's nearest-neighbour maps when the fixtures root has one.
pub fn feature_injection(case: &mut Case) -> Result<()> {
    let alpha: f64 = case.setting("alpha")?;
    let inp = case.tensor("inp")?;
    let (images, tokens, channels) = inp.dims3()?;
    let src_img = case
        .tensor("source_image")?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?;
    let src_patch = case
        .tensor("source_patch")?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?;
    let inject = case
        .tensor("inject_mask")?
        .to_dtype(DType::U8)?
        .to_vec2::<u8>()?;
    let best = case.tensor("best_dist")?.to_vec2::<f32>()?;
    let thr = case.tensor("threshold")?.to_vec1::<f32>()?;
    let plan = InjectionPlan {
        targets: (0..images)
            .map(|i| {
                if src_img[i].iter().all(|&j| j < 0) {
                    return None;
                }
                Some(TargetInjection {
                    source_image: src_img[i].iter().map(|&j| j as u32).collect(),
                    source_patch: src_patch[i].iter().map(|&q| q as u32).collect(),
                    inject: inject[i].iter().map(|&x| x != 0).collect(),
                    best_distance: best[i].clone(),
                    threshold: thr[i],
                })
            })
            .collect(),
    };
    let mut values = inp.flatten_all()?.to_vec1::<f32>()?;
    maths::apply_injection(&plan, &mut values, channels, alpha)?;
    let out = Tensor::from_vec(values, (images, tokens, channels), &Device::Cpu)?;
    let tol = case.tolerance("out", Tol::Abs(1e-6))?;
    case.check("out", &out, tol)?;

    // The plan from the nearest-neighbour maps of the batch case in the same folder.
    let Some(batch) = sibling_of_kind(case, "consistory_batch")? else {
        case.notes.push(
            "no consistory_batch case beside this one: plan construction not checked here".into(),
        );
        return Ok(());
    };
    let (_, tensors) = batch;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("batch case: no `{name}`"))
    };
    let mapping_t = get("anchor_mapping")?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?;
    let anchors = (0..images)
        .filter(|&j| (0..images).all(|i| mapping_t[i][j] != 0))
        .count();
    let mapping = AnchorMapping::batch(images, anchors);
    let nn_map = get("nn_map_64")?.to_dtype(DType::I64)?.to_vec3::<i64>()?;
    let nn_dist = get("nn_dist_64")?.to_vec3::<f32>()?;
    let masks: Vec<Vec<bool>> = case
        .tensor("mask64_pass1_final")?
        .to_dtype(DType::U8)?
        .to_vec2::<u8>()?
        .into_iter()
        .map(|r| r.into_iter().map(|x| x != 0).collect())
        .collect();
    let mut nn = HashMap::new();
    for i in 0..images {
        for j in 0..images {
            if i != j && mapping.sees(i, j) {
                nn.insert(
                    (i, j),
                    (
                        nn_map[i][j].iter().map(|&q| q as u32).collect(),
                        nn_dist[i][j].clone(),
                    ),
                );
            }
        }
    }
    let ours = maths::injection_plan(&nn, &masks, |i, j| mapping.sees(i, j))?;
    compare_plan(case, &ours, &plan)
}

fn compare_plan(case: &mut Case, ours: &InjectionPlan, golden: &InjectionPlan) -> Result<()> {
    let mut wrong_sources = 0usize;
    let mut wrong_inject = 0usize;
    let mut thr_err = 0f32;
    for (i, (a, b)) in ours.targets.iter().zip(&golden.targets).enumerate() {
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                wrong_sources += a
                    .source_image
                    .iter()
                    .zip(&b.source_image)
                    .zip(a.source_patch.iter().zip(&b.source_patch))
                    .filter(|((x, y), (p, q))| x != y || p != q)
                    .count();
                wrong_inject += a
                    .inject
                    .iter()
                    .zip(&b.inject)
                    .filter(|(x, y)| x != y)
                    .count();
                thr_err = thr_err.max((a.threshold - b.threshold).abs());
            }
            _ => bail!("image {i}: ours and the golden disagree on whether it is injected at all"),
        }
    }
    push(
        case,
        "plan:source_image_and_patch (mismatches)",
        wrong_sources as f32,
        0.0,
        0.0,
    )?;
    push(
        case,
        "plan:inject_mask (mismatches)",
        wrong_inject as f32,
        0.0,
        0.0,
    )?;
    push(case, "plan:threshold", thr_err, 1.0, 1e-6)
}

/// Another case file of `kind` under the same folder, with its tensors (CPU).
fn sibling_of_kind(
    case: &Case,
    kind: &str,
) -> Result<Option<(std::path::PathBuf, HashMap<String, Tensor>)>> {
    let dir = case
        .path
        .parent()
        .ok_or_else(|| anyhow!("case has no folder"))?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            if v.get("kind").and_then(Value::as_str) == Some(kind) {
                found.push(path);
            }
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((
            one.clone(),
            candle_core::safetensors::load(one.with_extension("safetensors"), &Device::Cpu)?,
        ))),
        many => bail!(
            "{} cases of kind {kind} beside {}: {many:?}",
            many.len(),
            case.path.display()
        ),
    }
}

/// Mask comparison of one pass at one level: `golden` `[steps, B, N]` 0/1 against our masks.
/// `maps` gives our averaged maps (resized to the level) to measure how close each differing
/// pixel was to the golden threshold.
/// A mask level: the UNet level, its index in the golden (0 = coarse), and the level the maps
/// were recorded at.
#[derive(Clone, Copy)]
struct MaskLevel {
    level: usize,
    index: usize,
    mask_level: usize,
}

fn check_masks(
    case: &mut Case,
    label: &str,
    golden: &Tensor,
    ours: &PassTrace,
    at: MaskLevel,
    golden_thresholds: Option<&Tensor>,
    tokens: &[Vec<Option<usize>>],
) -> Result<()> {
    let MaskLevel {
        level,
        index: level_index,
        mask_level,
    } = at;
    let golden = golden.to_dtype(DType::U8)?.to_vec3::<u8>()?;
    let thresholds = golden_thresholds
        .map(|t| t.to_dtype(DType::F32))
        .transpose()?;
    let mut differing = 0usize;
    let mut total = 0usize;
    let mut worst_bins = 0f32;
    let mut places = Vec::new();
    for (step, golden_step) in golden.iter().enumerate() {
        let masks = ours
            .masks
            .get(step)
            .and_then(|m| m.get(&level))
            .ok_or_else(|| anyhow!("{label}: no masks at step {step}"))?;
        for (image, golden_image) in golden_step.iter().enumerate() {
            let mine = &masks.subject[image];
            let diff: Vec<usize> = (0..mine.len())
                .filter(|&p| mine[p] != (golden_image[p] != 0))
                .collect();
            total += mine.len();
            if diff.is_empty() {
                continue;
            }
            differing += diff.len();
            places.push(format!("step {step} image {image}: {}", diff.len()));
            // Distance in bins from the golden threshold of the (single present) concept.
            if let Some(thr) = &thresholds {
                let concept = (0..tokens.len()).find(|&c| tokens[c][image].is_some());
                if let Some(c) = concept {
                    let golden_thr: f32 = thr
                        .get(step)?
                        .get(level_index)?
                        .get(image)?
                        .get(c)?
                        .to_scalar()?;
                    let map = &ours.token_maps[step][image][c];
                    let (mh, mw) = side_pair(ours, mask_level, step)?;
                    let resized = if level == mask_level {
                        map.clone()
                    } else {
                        maths::resize_bilinear(map, mh, mw, masks.height, masks.width)?
                    };
                    let (lo, hi) = resized
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                    let bin = ((hi - lo) / 256.0).max(f32::MIN_POSITIVE);
                    for &p in &diff {
                        worst_bins = worst_bins.max((resized[p] - golden_thr).abs() / bin);
                    }
                }
            }
        }
    }
    if !places.is_empty() {
        let shown: Vec<_> = places.iter().take(12).cloned().collect();
        case.notes.push(format!(
            "{label}: {differing} of {total} mask pixels differ ({:.2e}); where: {}{}",
            differing as f64 / total as f64,
            shown.join(", "),
            if places.len() > 12 {
                format!(" and {} more", places.len() - 12)
            } else {
                String::new()
            }
        ));
    }
    // The case file states a mask's tolerance under the mask's own name (module docs).
    let fraction_tol = match case.tolerance(label, Tol::Abs(0.0))? {
        Tol::Abs(t) => t,
        _ => 0.0,
    };
    case.checks.push(Check {
        name: format!("{label} (fraction differing)"),
        max_abs: differing as f32 / total.max(1) as f32,
        ref_absmax: 1.0,
        tolerance: fraction_tol,
    });
    push(
        case,
        &format!("{label} (differing pixels' distance to the threshold, bins)"),
        worst_bins,
        1.0,
        1.0,
    )
}

fn side_pair(trace: &PassTrace, level: usize, step: usize) -> Result<(usize, usize)> {
    let m = trace.masks[step]
        .get(&level)
        .ok_or_else(|| anyhow!("no masks at level {level}"))?;
    Ok((m.height, m.width))
}

fn stack(latents: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(latents, 0)?)
}

fn step_norms(trace: &PassTrace) -> Result<Tensor> {
    let rows: Vec<Tensor> = trace
        .latents
        .iter()
        .map(|l| Ok(l.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?))
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Our thresholds as the golden `[steps, 2, B, n_concepts]` (NaN where absent).
fn thresholds_tensor(trace: &PassTrace, levels: [usize; 2], concepts: usize) -> Result<Tensor> {
    let steps = trace.masks.len();
    let images = trace.masks[0][&levels[0]].subject.len();
    let mut v = Vec::with_capacity(steps * 2 * images * concepts);
    for m in &trace.masks {
        for level in levels {
            for image in 0..images {
                for c in 0..concepts {
                    v.push(
                        m[&level].thresholds[image]
                            .get(c)
                            .copied()
                            .flatten()
                            .unwrap_or(f32::NAN),
                    );
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        v,
        (steps, 2, images, concepts),
        &Device::Cpu,
    )?)
}

/// NaN-aware max-abs check (NaN in the golden means "absent"; ours must be NaN there too).
fn check_nan_aware(
    case: &mut Case,
    name: &str,
    got: &Tensor,
    expected: &Tensor,
    default: f32,
) -> Result<()> {
    let g = got.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let e = expected
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if g.len() != e.len() {
        bail!("{name}: {} values, golden {}", g.len(), e.len());
    }
    let mut max_abs = 0f32;
    let mut ref_absmax = 0f32;
    for (a, b) in g.iter().zip(&e) {
        if b.is_nan() {
            if !a.is_nan() {
                max_abs = f32::INFINITY;
            }
            continue;
        }
        ref_absmax = ref_absmax.max(b.abs());
        max_abs = max_abs.max((a - b).abs());
    }
    push(case, name, max_abs, ref_absmax, default)
}

fn trajectory_tol(case: &Case, name: &str, reference: &Tensor) -> Result<f32> {
    let absmax: f32 = reference.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    Ok(match case.tolerance(name, Tol::Trajectory)? {
        Tol::Abs(t) => t,
        Tol::Exact => 0.0,
        Tol::Trajectory => (5e-3f32).max(1e-4 * absmax),
    })
}

fn check_latents(case: &mut Case, name: &str, got: &Tensor, golden_name: &str) -> Result<()> {
    let expected = case.tensor(golden_name)?;
    let tol = trajectory_tol(case, name, &expected)?;
    case.check_against(name, got, &expected, Tol::Abs(tol))
}

/// Batch mode (official `run_batch_generation`): the whole two-pass run from the golden noise,
/// with the official dropout draws replayed.
pub fn batch(case: &mut Case) -> Result<()> {
    let sd = load_pipeline(case)?;
    let settings = generation_settings(case)?;
    let options = options_of(case)?;
    let prompts: Vec<String> = case.setting("prompts")?;
    let words: Vec<String> = case.setting("concept_token")?;
    let anchors: usize = case.setting("n_anchors")?;
    let images = prompts.len();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokens = token_indices(&sd, &refs, &words)?;
    check_tokens(case, "token_indices", &tokens)?;
    let mapping = AnchorMapping::batch(images, anchors);
    let golden_mapping = case
        .tensor("anchor_mapping")?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?;
    let mapping_ok =
        (0..images).all(|i| (0..images).all(|j| mapping.sees(i, j) == (golden_mapping[i][j] != 0)));
    push(
        case,
        "anchor_mapping (mismatch)",
        if mapping_ok { 0.0 } else { 1.0 },
        1.0,
        0.0,
    )?;
    let levels = ConsistoryLevels::for_unet(&sd.unet)?;
    let level_pair = levels.mask_levels();
    check_dropout_replay(case, "", images, level_pair, &settings)?;

    let init = case.tensor("init_latents")?;
    let frames = frames(case, &prompts, &init)?;
    let set = ConsistorySet {
        frames: &frames,
        subject_words: &words,
        mapping,
        dropout: DropoutDraws::TorchCpu { seed: 0 },
        replays: &[],
        style: None,
    };
    let out = sd.consistory(&settings, &options, &set, &mut no_progress())?;
    report_run(case, "", &out, &levels, &tokens, words.len())?;
    Ok(())
}

/// The dropout draws of the MT19937 replay against the golden `[steps, B, N]` drop masks.
fn check_dropout_replay(
    case: &mut Case,
    prefix: &str,
    images: usize,
    levels: [usize; 2],
    settings: &GenerationSettings,
) -> Result<()> {
    let names = [
        format!("{prefix}dropout_drop_32"),
        format!("{prefix}dropout_drop_64"),
    ];
    if !case.tensors.contains_key(&names[0]) {
        return Ok(());
    }
    let golden: Vec<Vec<Vec<Vec<u8>>>> = names
        .iter()
        .map(|n| Ok(case.tensor(n)?.to_dtype(DType::U8)?.to_vec3::<u8>()?))
        .collect::<Result<_>>()?;
    let mut rng = maths::TorchCpuRand::new(0);
    let mut wrong = 0usize;
    let (lh, lw) = settings.latent_hw();
    for step in 0..golden[0].len() {
        for (k, level) in levels.iter().enumerate() {
            let side = |s: usize| (0..*level).fold(s, |a, _| a.div_ceil(2));
            let n = side(lh) * side(lw);
            let u = maths::DropoutSource::draw(&mut rng, images * n);
            for i in 0..images {
                for p in 0..n {
                    let dropped = u[i * n + p] < 0.5;
                    if dropped != (golden[k][step][i][p] != 0) {
                        wrong += 1;
                    }
                }
            }
        }
    }
    push(
        case,
        &format!("{prefix}dropout draws (mismatches)"),
        wrong as f32,
        0.0,
        0.0,
    )
}

fn report_run(
    case: &mut Case,
    prefix: &str,
    out: &ConsistoryOutput,
    levels: &ConsistoryLevels,
    tokens: &[Vec<Option<usize>>],
    concepts: usize,
) -> Result<()> {
    let level_pair = levels.mask_levels();
    let res_names = ["32", "64"];
    for (pass, trace) in [(1, &out.pass1), (2, &out.pass2)] {
        for (k, &level) in level_pair.iter().enumerate() {
            let name = format!("{prefix}pass{pass}_subject_mask_{}", res_names[k]);
            let thr_name = format!("{prefix}pass{pass}_otsu_threshold");
            if let Some(golden) = case.tensors.get(&name).cloned() {
                let thr = case.tensors.get(&thr_name).cloned();
                let at = MaskLevel {
                    level,
                    index: k,
                    mask_level: levels.mask,
                };
                check_masks(case, &name, &golden, trace, at, thr.as_ref(), tokens)?;
            }
            let count_name = format!("{prefix}pass{pass}_subject_mask_{}_count", res_names[k]);
            if let Some(golden) = case.tensors.get(&count_name).cloned() {
                let counts: Vec<i64> = trace
                    .masks
                    .iter()
                    .flat_map(|m| {
                        m[&level]
                            .subject
                            .iter()
                            .map(|s| s.iter().filter(|&&x| x).count() as i64)
                    })
                    .collect();
                let got = Tensor::from_vec(counts, golden.dims(), &Device::Cpu)?;
                let tol = case.tolerance(&count_name, Tol::Abs(0.0))?;
                case.check_against(
                    &count_name,
                    &got.to_dtype(DType::F32)?,
                    &golden.to_dtype(DType::F32)?,
                    tol,
                )?;
            }
            let final_name = format!("{prefix}pass{pass}_subject_mask_{}_final", res_names[k]);
            if let Some(golden) = case.tensors.get(&final_name).cloned() {
                let last = trace
                    .final_masks(level)
                    .ok_or_else(|| anyhow!("no final masks"))?;
                let flat: Vec<u8> = last
                    .subject
                    .iter()
                    .flat_map(|s| s.iter().map(|&x| x as u8))
                    .collect();
                let got = Tensor::from_vec(flat, golden.dims(), &Device::Cpu)?;
                let diff = got
                    .to_dtype(DType::F32)?
                    .sub(&golden.to_dtype(DType::F32)?)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                push(
                    case,
                    &format!("{final_name} (differing pixels)"),
                    diff,
                    0.0,
                    0.0,
                )?;
            }
        }
        let thr_name = format!("{prefix}pass{pass}_otsu_threshold");
        if let Some(golden) = case.tensors.get(&thr_name).cloned() {
            let ours = thresholds_tensor(trace, level_pair, concepts)?;
            check_nan_aware(case, &thr_name, &ours, &golden, 1e-6)?;
        }
        let maps_name = format!("{prefix}pass{pass}_token_maps");
        if let Some(golden) = case.tensors.get(&maps_name).cloned() {
            // ours: [step][image][concept][p] -> golden [steps, concepts, B, 32, 32]
            let (steps, nc, b, h, w) = golden.dims5()?;
            let mut v = Vec::with_capacity(steps * nc * b * h * w);
            for s in 0..steps {
                for c in 0..nc {
                    for i in 0..b {
                        if tokens[c][i].is_none() {
                            v.extend(std::iter::repeat_n(f32::NAN, h * w));
                        } else {
                            v.extend_from_slice(&trace.token_maps[s][i][c]);
                        }
                    }
                }
            }
            let ours = Tensor::from_vec(v, (steps, nc, b, h, w), &Device::Cpu)?;
            check_nan_aware(case, &maps_name, &ours, &golden, 1e-6)?;
        }
        let norm_name = format!("{prefix}pass{pass}_latents_step_norm");
        if case.tensors.contains_key(&norm_name) {
            let norms = step_norms(trace)?;
            check_latents(case, &norm_name, &norms, &norm_name)?;
        }
        let final_name = format!("{prefix}pass{pass}_final_latents");
        if case.tensors.contains_key(&final_name) {
            let last = trace
                .latents
                .last()
                .ok_or_else(|| anyhow!("no steps"))?
                .clone();
            check_latents(case, &final_name, &last, &final_name)?;
        }
        for step in [0usize, 1, 4, 5] {
            let name = format!("{prefix}pass{pass}_latents_after_step{step}");
            if case.tensors.contains_key(&name) {
                let got = trace.latents[step].clone();
                check_latents(case, &name, &got, &name)?;
            }
        }
        let _ = stack;
    }
    let dift_name = format!("{prefix}dift_smoothed");
    if case.tensors.contains_key(&dift_name) {
        let (c, h, w) = out.correspondence.dift_shape;
        let images = out.correspondence.dift_smoothed.len();
        let ours = Tensor::from_vec(
            out.correspondence.dift_smoothed.concat(),
            (images, c, h, w),
            &Device::Cpu,
        )?;
        let tol = case.tolerance(&dift_name, Tol::Abs(1e-4))?;
        case.check(&dift_name, &ours, tol)?;
    }
    let nn_name = format!("{prefix}nn_map_64");
    if let Some(golden) = case.tensors.get(&nn_name).cloned() {
        let maps = golden.to_dtype(DType::I64)?.to_vec3::<i64>()?;
        let dists = case
            .tensor(&format!("{prefix}nn_dist_64"))?
            .to_vec3::<f32>()?;
        let mut disagree = 0usize;
        let mut dist_err = 0f32;
        for (&(i, j), (map, dist)) in &out.correspondence.nn {
            for p in 0..map.len() {
                if map[p] as i64 != maps[i][j][p] {
                    disagree += 1;
                }
                dist_err = dist_err.max((dist[p] - dists[i][j][p]).abs());
            }
        }
        push(
            case,
            &format!("{nn_name} (disagreeing patches)"),
            disagree as f32,
            0.0,
            0.0,
        )?;
        push(case, &format!("{prefix}nn_dist_64"), dist_err, 2.0, 1e-4)?;
    }
    Ok(())
}

/// Anchor mode (official `run_anchor_generation` + `run_extra_generation`): the anchors and the
/// extra frame rendered in one set, the frame seeing the anchors only, dropout drawn for the
/// anchors only. The anchors must come out as the official anchor run and the frame as the
/// official extra run against the anchors' caches.
pub fn anchor(case: &mut Case) -> Result<()> {
    let sd = load_pipeline(case)?;
    let settings = generation_settings(case)?;
    let options = options_of(case)?;
    let anchor_prompts: Vec<String> = case.setting("anchor_prompts")?;
    let extra_prompts: Vec<String> = case.setting("extra_prompts")?;
    let words: Vec<String> = case.setting("concept_token")?;
    let anchors = anchor_prompts.len();
    let extras = extra_prompts.len();
    let anchor_init = case.tensor("anchor_init_latents")?;
    let extra_init = case.tensor("extra_init_latents")?;
    let mut frames = frames(case, &anchor_prompts, &anchor_init)?;
    for p in &extra_prompts {
        // The official extra run starts every extra image of a seed from the same noise.
        frames.push(FrameInput {
            prompt: p.clone(),
            negative_prompt: None,
            init_latents: extra_init.get(0)?.unsqueeze(0)?,
        });
    }
    let all: Vec<&str> = frames.iter().map(|f| f.prompt.as_str()).collect();
    let tokens = token_indices(&sd, &all, &words)?;
    let anchor_tokens: Vec<Vec<Option<usize>>> =
        tokens.iter().map(|r| r[..anchors].to_vec()).collect();
    let extra_tokens: Vec<Vec<Option<usize>>> = tokens
        .iter()
        .map(|r| r[anchors..anchors + 1].to_vec())
        .collect();
    check_tokens(case, "anchor_token_indices", &anchor_tokens)?;
    check_tokens(case, "extra_token_indices", &extra_tokens)?;
    let levels = ConsistoryLevels::for_unet(&sd.unet)?;
    let mapping = AnchorMapping::anchors_then_frames(anchors, extras);
    let set = ConsistorySet {
        frames: &frames,
        subject_words: &words,
        mapping,
        dropout: DropoutDraws::TorchCpu { seed: 0 },
        replays: &[],
        style: None,
    };
    let out = sd.consistory(&settings, &options, &set, &mut no_progress())?;
    let level_pair = levels.mask_levels();
    let res_names = ["32", "64"];
    for (tag, range) in [("anchor", 0..anchors), ("extra", anchors..anchors + 1)] {
        for (pass, trace) in [(1, &out.pass1), (2, &out.pass2)] {
            let last = trace.latents.last().ok_or_else(|| anyhow!("no steps"))?;
            let got = last.narrow(0, range.start, range.len())?;
            check_latents(
                case,
                &format!("{tag}_pass{pass}_final_latents"),
                &got,
                &format!("{tag}_pass{pass}_final_latents"),
            )?;
            let norms = step_norms(trace)?.narrow(1, range.start, range.len())?;
            check_latents(
                case,
                &format!("{tag}_pass{pass}_latents_step_norm"),
                &norms,
                &format!("{tag}_pass{pass}_latents_step_norm"),
            )?;
            for (k, &level) in level_pair.iter().enumerate() {
                let count_name = format!("{tag}_pass{pass}_subject_mask_{}_count", res_names[k]);
                if let Some(golden) = case.tensors.get(&count_name).cloned() {
                    let counts: Vec<f32> = trace
                        .masks
                        .iter()
                        .flat_map(|m| {
                            m[&level].subject[range.clone()]
                                .iter()
                                .map(|s| s.iter().filter(|&&x| x).count() as f32)
                        })
                        .collect();
                    let golden = golden.to_dtype(DType::F32)?;
                    let got = Tensor::from_vec(counts, golden.dims(), &Device::Cpu)?;
                    let tol = case.tolerance(&count_name, Tol::Abs(0.0))?;
                    case.check_against(&count_name, &got, &golden, tol)?;
                }
                let final_name = format!("{tag}_pass{pass}_subject_mask_{}_final", res_names[k]);
                if let Some(golden) = case.tensors.get(&final_name).cloned() {
                    let last = trace
                        .final_masks(level)
                        .ok_or_else(|| anyhow!("no final masks"))?;
                    let flat: Vec<u8> = last.subject[range.clone()]
                        .iter()
                        .flat_map(|s| s.iter().map(|&x| x as u8))
                        .collect();
                    let golden = golden.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
                    let diff = flat.iter().zip(&golden).filter(|(a, b)| a != b).count();
                    if diff > 0 {
                        case.notes.push(format!(
                            "{final_name}: {diff} of {} mask pixels differ",
                            golden.len()
                        ));
                    }
                    // As for the batch case's masks: a fraction, its tolerance under the
                    // mask's own name (module docs).
                    let fraction_tol = match case.tolerance(&final_name, Tol::Abs(0.0))? {
                        Tol::Abs(t) => t,
                        _ => 0.0,
                    };
                    case.checks.push(Check {
                        name: format!("{final_name} (fraction differing)"),
                        max_abs: diff as f32 / golden.len().max(1) as f32,
                        ref_absmax: 1.0,
                        tolerance: fraction_tol,
                    });
                }
            }
        }
    }
    // DIFT and correspondences: the anchors among themselves, the frame against the anchors.
    let (c, h, w) = out.correspondence.dift_shape;
    let smoothed = |r: std::ops::Range<usize>| -> Result<Tensor> {
        let n = r.len();
        Ok(Tensor::from_vec(
            out.correspondence.dift_smoothed[r].concat(),
            (n, c, h, w),
            &Device::Cpu,
        )?)
    };
    let tol = case.tolerance("anchor_dift_smoothed", Tol::Abs(1e-4))?;
    case.check("anchor_dift_smoothed", &smoothed(0..anchors)?, tol)?;
    let tol = case.tolerance("extra_dift_smoothed", Tol::Abs(1e-4))?;
    case.check("extra_dift_smoothed", &smoothed(anchors..anchors + 1)?, tol)?;
    let mut disagree = 0usize;
    let mut dist_err = 0f32;
    let anchor_maps = case
        .tensor("anchor_nn_map_64")?
        .to_dtype(DType::I64)?
        .to_vec3::<i64>()?;
    let anchor_dists = case.tensor("anchor_nn_dist_64")?.to_vec3::<f32>()?;
    let extra_maps = case
        .tensor("extra_nn_map_64")?
        .to_dtype(DType::I64)?
        .to_vec3::<i64>()?;
    let extra_dists = case.tensor("extra_nn_dist_64")?.to_vec3::<f32>()?;
    for (&(i, j), (map, dist)) in &out.correspondence.nn {
        let (gm, gd) = if i < anchors {
            (&anchor_maps[i][j], &anchor_dists[i][j])
        } else if i == anchors {
            (&extra_maps[0][j], &extra_dists[0][j])
        } else {
            continue;
        };
        for p in 0..map.len() {
            disagree += usize::from(map[p] as i64 != gm[p]);
            dist_err = dist_err.max((dist[p] - gd[p]).abs());
        }
    }
    push(
        case,
        "nn_map_64 (disagreeing patches)",
        disagree as f32,
        0.0,
        0.0,
    )?;
    push(case, "nn_dist_64", dist_err, 2.0, 1e-4)?;
    let plan = out.correspondence.injection.targets[anchors]
        .as_ref()
        .ok_or_else(|| anyhow!("the frame has no injection plan"))?;
    let src = case
        .tensor("extra_fi_source_anchor")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let patch = case
        .tensor("extra_fi_source_patch")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let inject = case
        .tensor("extra_fi_inject_mask")?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    let thr = case
        .tensor("extra_fi_threshold")?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?[0];
    let wrong_src = (0..src.len())
        .filter(|&p| {
            plan.source_image[p] as i64 != src[p] || plan.source_patch[p] as i64 != patch[p]
        })
        .count();
    let wrong_inject = (0..inject.len())
        .filter(|&p| plan.inject[p] != (inject[p] != 0))
        .count();
    push(
        case,
        "extra_fi_source (mismatches)",
        wrong_src as f32,
        0.0,
        0.0,
    )?;
    push(
        case,
        "extra_fi_inject_mask (mismatches)",
        wrong_inject as f32,
        0.0,
        0.0,
    )?;
    push(
        case,
        "extra_fi_threshold",
        (plan.threshold - thr).abs(),
        thr.abs(),
        1e-6,
    )?;
    case.notes.push("extra_dropout_drop_*: not used; the extra frame's own dropout never reaches its attention (it sees the anchors' masks only), so the set draws for the anchors alone".into());
    Ok(())
}

/// The extra frame's SDSA against cached anchor tokens: `k_ext`/`v_ext` are its own keys followed
/// by the anchors' kept tokens, so it is attention over a plain key set.
pub fn sdsa_anchor_cache(case: &mut Case) -> Result<()> {
    let heads: usize = case.setting("heads")?;
    let scale: f64 = case.setting("softmax_scale")?;
    let q = case.tensor("q")?;
    let k = case.tensor("k_ext")?;
    let v = case.tensor("v_ext")?;
    let inputs = storyfarm_diffusion::attention::AttentionInputs {
        qkv: Qkv { q, k, v, heads },
        extra: Vec::new(),
    };
    let out = attend(inputs, scale)?;
    let tol = case.tolerance("attn_out", Tol::Abs(1e-5))?;
    case.check("attn_out", &out, tol)
}

/// The extra frame's feature injection from the anchors' cached (injected) outputs, with the
/// plan the anchor case states.
pub fn feature_injection_anchor(case: &mut Case) -> Result<()> {
    let Some((_, tensors)) = sibling_of_kind(case, "consistory_anchor")? else {
        bail!("a consistory_feature_injection_anchor case needs its consistory_anchor case in the same folder (the plan is there)");
    };
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("anchor case: no `{name}`"))
    };
    let alpha: f64 = case.setting("alpha")?;
    let inp = case.tensor("inp")?;
    let anchors_out = case.tensor("anchor_outputs")?;
    let (a, tokens, channels) = anchors_out.dims3()?;
    let src = get("extra_fi_source_anchor")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let patch = get("extra_fi_source_patch")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let inject = get("extra_fi_inject_mask")?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    // The frame is image `a` of a set [anchors..., frame] whose anchors already hold their
    // injected outputs: the in-place loop reads them exactly as the official cache.
    let mut targets: Vec<Option<TargetInjection>> = vec![None; a];
    targets.push(Some(TargetInjection {
        source_image: src.iter().map(|&j| j as u32).collect(),
        source_patch: patch.iter().map(|&q| q as u32).collect(),
        inject: inject.iter().map(|&x| x != 0).collect(),
        best_distance: Vec::new(),
        threshold: f32::NAN,
    }));
    let plan = InjectionPlan { targets };
    let mut values = Tensor::cat(&[&anchors_out, &inp], 0)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    maths::apply_injection(&plan, &mut values, channels, alpha)?;
    let out = Tensor::from_vec(
        values[a * tokens * channels..].to_vec(),
        (1, tokens, channels),
        &Device::Cpu,
    )?;
    let tol = case.tolerance("out", Tol::Abs(1e-6))?;
    case.check("out", &out, tol)
}
