//! One function per case kind: build the component from the case's model folder and settings,
//! run it, compare every golden tensor.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use storyfarm_diffusion::attention::{
    AttentionKind, BatchLayout, ForwardContext, Hooks, StepContext,
};
use storyfarm_diffusion::model::{HubOptions, ModelFolder};
use storyfarm_diffusion::pipeline::{
    FrameInput, GenerationSettings, ReferenceInput, ReferenceLatents, StableDiffusion,
};
use storyfarm_diffusion::scheduler::{DdimConfig, DdimScheduler};
use storyfarm_diffusion::style_aligned::{StyleAligned, StyleAlignedOptions};
use storyfarm_diffusion::text::TextConditioner;
use storyfarm_diffusion::tokenizer::PromptTokenizer;
use storyfarm_diffusion::unet::{UNet, UNetConditioning, UNetConfig};
use storyfarm_diffusion::vae::AutoencoderKl;
use storyfarm_diffusion::weights::Weights;

use crate::{consistory, Case, Tol};

pub fn run(case: &mut Case) -> Result<()> {
    match case.kind.as_str() {
        "unet_forward" => unet_forward(case),
        "scheduler" => scheduler(case),
        "tokenizer" => tokenizer(case),
        "text_encoder" => text_encoder(case),
        "vae" => vae(case),
        "txt2img" => txt2img(case),
        "ddim_inversion" => inversion(case),
        "style_aligned" => style_aligned(case),
        "consistory_batch" => consistory::batch(case),
        "consistory_anchor" => consistory::anchor(case),
        "consistory_sdsa" => consistory::sdsa(case),
        "consistory_sdsa_anchor_cache" => consistory::sdsa_anchor_cache(case),
        "consistory_feature_injection" => consistory::feature_injection(case),
        "consistory_feature_injection_anchor" => consistory::feature_injection_anchor(case),
        other => bail!("unknown case kind `{other}`"),
    }
}

fn load_unet(case: &Case) -> Result<UNet> {
    let dir = case.model_dir()?.join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::from_safetensors(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        DType::F32,
        &case.device,
    )?;
    Ok(UNet::new(config, &weights)?)
}

fn plain_context(batch: usize) -> StepContext {
    StepContext {
        step: 0,
        steps: 1,
        timestep: 0,
        layout: BatchLayout {
            images: batch,
            guidance: false,
        },
    }
}

fn unet_forward(case: &mut Case) -> Result<()> {
    let unet = load_unet(case)?;
    let sample = case.tensor("sample")?;
    let t = case
        .tensor("timestep")?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?[0];
    let context = case.tensor("encoder_hidden_states")?;
    let added = match (
        case.tensors.get("text_embeds"),
        case.tensors.get("time_ids"),
    ) {
        (Some(a), Some(b)) => Some((a.clone(), b.clone())),
        _ => None,
    };
    let cond = UNetConditioning {
        context: &context,
        added: added.as_ref().map(|(a, b)| (a, b)),
    };
    let ctx = ForwardContext {
        step: plain_context(sample.dim(0)?),
        hooks: Hooks::none(),
    };
    let out = unet.forward_with_debug(&sample, t, &cond, &ctx)?;
    case.check("out", &out.out, Tol::Abs(1e-4))?;
    case.check("dbg_temb", &out.temb, Tol::Abs(1e-4))?;
    case.check("dbg_conv_in", &out.conv_in, Tol::Abs(1e-4))?;
    case.check("dbg_mid_out", &out.mid_out, Tol::Abs(1e-4))?;
    if case.tensors.contains_key("dbg_aug_emb") {
        let aug = out
            .aug
            .ok_or_else(|| anyhow!("model produced no added embedding"))?;
        case.check("dbg_aug_emb", &aug, Tol::Abs(1e-4))?;
    }
    Ok(())
}

fn scheduler(case: &mut Case) -> Result<()> {
    let config = DdimConfig::from_json(&case.settings["config"])?;
    let steps: Vec<usize> = case.setting("steps")?;
    let t = case
        .tensor("step_t")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?[0];
    let t = usize::try_from(t).map_err(|_| anyhow!("step_t {t} is negative"))?;
    let n = step_example_steps(case, &config, &steps, t)?;
    let step = DdimScheduler::new(&config, n)?;
    // alphas_cumprod and final_alpha_cumprod do not depend on the step count.
    let alphas = Tensor::new(step.alphas_cumprod(), &Device::Cpu)?;
    case.check("alphas_cumprod", &alphas, Tol::Abs(1e-7))?;
    let fa = Tensor::new(&[step.final_alpha_cumprod()], &Device::Cpu)?;
    case.check("final_alpha_cumprod", &fa, Tol::Exact)?;
    for n in steps {
        let s = DdimScheduler::new(&config, n)?;
        let ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        case.check(
            &format!("timesteps_{n}"),
            &Tensor::new(ts.as_slice(), &Device::Cpu)?,
            Tol::Exact,
        )?;
    }
    let sample = case.tensor("step_sample")?;
    let eps = case.tensor("step_eps")?;
    case.check(
        "step_prev_sample",
        &step.step(&eps, t, &sample)?,
        Tol::Abs(1e-5),
    )?;
    // The inversion example moves the same sample up from t - 1000/N to t with the same eps.
    case.check(
        "inv_step_next_sample",
        &step.inversion_step(&eps, t, &sample)?,
        Tol::Abs(1e-5),
    )?;
    Ok(())
}

/// The schedule of the scheduler case's one-step example (`step_t` -> the previous timestep):
/// `settings.step_example_steps`, else the "(with N steps)" of the `step_t` description, else the
/// one schedule of `settings.steps` that contains `step_t`. The schedule must contain `step_t`.
fn step_example_steps(
    case: &mut Case,
    config: &DdimConfig,
    steps: &[usize],
    t: usize,
) -> Result<usize> {
    let stated: Option<usize> = case.optional_setting("step_example_steps")?;
    let described = case.json["tensors"]["step_t"]["meaning"]
        .as_str()
        .and_then(steps_in_description);
    let (n, source) = match (stated, described) {
        (Some(a), Some(b)) if a != b => {
            bail!("settings.step_example_steps = {a} but tensors.step_t.meaning says {b} steps")
        }
        (Some(n), _) => (n, "settings.step_example_steps"),
        (None, Some(n)) => (n, "tensors.step_t.meaning"),
        (None, None) => {
            let mut candidates = Vec::new();
            for &n in steps {
                if DdimScheduler::new(config, n)?.timesteps().contains(&t) {
                    candidates.push(n);
                }
            }
            match candidates[..] {
                [n] => (n, "the only schedule of settings.steps containing step_t"),
                [] => bail!("step_t {t} is in none of the schedules of settings.steps {steps:?}; state settings.step_example_steps"),
                _ => {
                    let prev: Vec<String> = candidates
                        .iter()
                        .map(|&n| format!("{n} steps -> {}", t as isize - (config.num_train_timesteps / n) as isize))
                        .collect();
                    bail!(
                        "ambiguous step example: step_t {t} is in several schedules ({}); state settings.step_example_steps",
                        prev.join(", ")
                    )
                }
            }
        }
    };
    let schedule = DdimScheduler::new(config, n)?;
    if !schedule.timesteps().contains(&t) {
        bail!(
            "{source} gives {n} steps, but step_t {t} is not in that schedule {:?}",
            schedule.timesteps()
        );
    }
    let prev = t as isize - (config.num_train_timesteps / n) as isize;
    case.notes.push(format!(
        "step example: {n} steps (from {source}), t {t} -> {prev}"
    ));
    Ok(n)
}

/// `N` from a description containing "with N steps" (the generator's "t (with 10 steps)").
fn steps_in_description(text: &str) -> Option<usize> {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .collect();
    let found: Vec<usize> = words
        .windows(3)
        .filter(|w| w[0] == "with" && (w[2] == "steps" || w[2] == "step"))
        .filter_map(|w| w[1].parse().ok())
        .collect();
    match found[..] {
        [n] => Some(n),
        _ => None,
    }
}

pub(crate) fn load_pipeline(case: &Case) -> Result<StableDiffusion> {
    let folder = ModelFolder::open(
        &case.model_dir()?.display().to_string(),
        &HubOptions::default(),
    )?;
    Ok(StableDiffusion::load(&folder, DType::F32, &case.device)?)
}

/// Every golden `ids_<x>` is checked against the tokenizer file `settings.tokenizer_json_<x>`
/// (relative to the fixtures root); a golden without its setting, or a setting without its
/// golden, fails.
fn tokenizer(case: &mut Case) -> Result<()> {
    const SETTING: &str = "tokenizer_json_";
    const GOLDEN: &str = "ids_";
    let prompts: Vec<String> = case.setting("prompts")?;
    let max_length: Option<usize> = case.optional_setting("max_length")?;
    let eos_id: Option<u32> = case.optional_setting("eos_id")?;
    let bos_id: Option<u32> = case.optional_setting("bos_id")?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (key, value) in case.settings.as_object().into_iter().flatten() {
        if let Some(suffix) = key.strip_prefix(SETTING) {
            let file = value
                .as_str()
                .ok_or_else(|| anyhow!("settings.{key} must be a path"))?;
            pairs.push((format!("{GOLDEN}{suffix}"), file.to_string()));
        }
    }
    pairs.sort();
    for golden in case.tensors.keys() {
        if let Some(suffix) = golden.strip_prefix(GOLDEN) {
            if !pairs.iter().any(|(g, _)| g == golden) {
                bail!("golden `{golden}` has no settings.{SETTING}{suffix}");
            }
        }
    }
    if pairs.is_empty() {
        bail!("no settings.{SETTING}* names a tokenizer file");
    }
    for (golden, file) in pairs {
        let tok = PromptTokenizer::from_file(&case.root.join(&file))?;
        if let Some(n) = max_length.filter(|&n| n != tok.max_length()) {
            bail!(
                "{file}: {} ids per prompt, settings.max_length is {n}",
                tok.max_length()
            );
        }
        if let Some(id) = eos_id.filter(|&id| id != tok.eos_id()) {
            bail!("{file}: eos id {}, settings.eos_id is {id}", tok.eos_id());
        }
        let ids = prompts
            .iter()
            .map(|p| tok.encode(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(bos) = bos_id {
            if let Some(first) = ids
                .iter()
                .find_map(|row| row.first().filter(|&&id| id != bos))
            {
                bail!("{file}: ids start with {first}, settings.bos_id is {bos}");
            }
        }
        case.notes.push(format!("{golden}: {file}"));
        case.check_ids(&golden, &ids)?;
    }
    Ok(())
}

fn text_encoder(case: &mut Case) -> Result<()> {
    let prompts: Vec<String> = case.setting("prompts")?;
    let text = TextConditioner::load(&case.model_dir()?, DType::F32, &case.device)?;
    let mut contexts = Vec::new();
    let mut pooled = Vec::new();
    for p in &prompts {
        let e = text.encode(p)?;
        contexts.push(e.context);
        if let Some(x) = e.pooled {
            pooled.push(x);
        }
    }
    let context = Tensor::cat(&contexts, 0)?;
    if text.is_xl() {
        case.check("prompt_embeds", &context, Tol::Abs(1e-4))?;
        case.check("te2_text_embeds", &Tensor::cat(&pooled, 0)?, Tol::Abs(1e-4))?;
    } else {
        case.check("last_hidden_state", &context, Tol::Abs(1e-4))?;
    }
    Ok(())
}

fn vae(case: &mut Case) -> Result<()> {
    let vae = AutoencoderKl::load(&case.model_dir()?.join("vae"), DType::F32, &case.device)?;
    if let Some(sf) = case.optional_setting::<f64>("scaling_factor")? {
        // The goldens use raw latents; a different factor means a different model folder.
        if (sf - vae.scaling_factor()).abs() > 1e-9 {
            bail!(
                "settings.scaling_factor {sf}, but the VAE's config says {}",
                vae.scaling_factor()
            );
        }
    }
    let image = case.tensor("image")?;
    let dist = vae.encode(&image)?;
    case.check("latent_mean", &dist.mean, Tol::Abs(5e-4))?;
    case.check("latent_logvar", &dist.logvar, Tol::Abs(1e-4))?;
    case.check("latent_std", &dist.std()?, Tol::Abs(1e-4))?;
    case.check(
        "decode_out",
        &vae.decode(&case.tensor("decode_in")?)?,
        Tol::Abs(1e-4),
    )?;
    case.check(
        "recon_out",
        &vae.decode(&case.tensor("latent_mean")?)?,
        Tol::Abs(1e-4),
    )?;
    Ok(())
}

/// The pipelines run DDIM with eta 0; a case stating another eta can not be reproduced.
fn require_eta_zero(case: &Case) -> Result<()> {
    match case.optional_setting::<f64>("eta")? {
        Some(eta) if eta != 0.0 => {
            bail!("settings.eta = {eta}: only DDIM with eta 0 is implemented")
        }
        _ => Ok(()),
    }
}

fn settings_of(case: &Case) -> Result<GenerationSettings> {
    require_eta_zero(case)?;
    let (height, width) = case.hw()?;
    Ok(GenerationSettings {
        height,
        width,
        steps: case.setting("steps")?,
        guidance_scale: case.setting("guidance_scale")?,
    })
}

pub(crate) fn no_progress(
) -> impl FnMut(storyfarm_diffusion::pipeline::Progress) -> storyfarm_diffusion::Result<()> {
    |_| Ok(())
}

/// The conditioning the pipeline feeds the UNet, in CFG order, against the golden.
fn check_conditioning(
    case: &mut Case,
    sd: &StableDiffusion,
    prompts: &[String],
    negative: Option<&str>,
    guidance: bool,
) -> Result<()> {
    let mut cond = Vec::new();
    let mut uncond = Vec::new();
    for p in prompts {
        cond.push(sd.text.encode(p)?);
        uncond.push(sd.text.encode_negative(negative)?);
    }
    let ordered: Vec<_> = if guidance {
        uncond.iter().chain(cond.iter()).collect()
    } else {
        cond.iter().collect()
    };
    let ctx = Tensor::cat(
        &ordered
            .iter()
            .map(|e| e.context.clone())
            .collect::<Vec<_>>(),
        0,
    )?;
    case.check("unet_encoder_hidden_states", &ctx, Tol::Abs(1e-4))?;
    if case.tensors.contains_key("unet_text_embeds") {
        let pooled: Vec<Tensor> = ordered.iter().filter_map(|e| e.pooled.clone()).collect();
        case.check(
            "unet_text_embeds",
            &Tensor::cat(&pooled, 0)?,
            Tol::Abs(1e-4),
        )?;
    }
    Ok(())
}

fn txt2img(case: &mut Case) -> Result<()> {
    let sd = load_pipeline(case)?;
    let settings = settings_of(case)?;
    let prompt: String = case.setting("prompt")?;
    let negative: Option<String> = case.setting("negative_prompt")?;
    check_conditioning(
        case,
        &sd,
        std::slice::from_ref(&prompt),
        negative.as_deref(),
        settings.uses_guidance(),
    )?;
    let ts = storyfarm_diffusion::scheduler::DdimScheduler::new(&sd.scheduler, settings.steps)?;
    let ts: Vec<i64> = ts.timesteps().iter().map(|&t| t as i64).collect();
    case.check(
        "timesteps",
        &Tensor::new(ts.as_slice(), &Device::Cpu)?,
        Tol::Exact,
    )?;
    let frame = FrameInput {
        prompt,
        negative_prompt: negative,
        init_latents: case.tensor("init_noise")?,
    };
    let out = sd.txt2img(&settings, &[frame], &mut no_progress())?;
    case.check("unet_out_step0", &out.first_unet_output, Tol::Abs(1e-4))?;
    case.check(
        "latents_per_step",
        &Tensor::stack(&out.latents_per_step, 0)?,
        Tol::Trajectory,
    )?;
    case.check("final_latents", &out.final_latents, Tol::Trajectory)?;
    case.check(
        "decoded",
        &sd.decode(&case.tensor("final_latents")?)?,
        Tol::Abs(1e-3),
    )?;
    Ok(())
}

fn inversion(case: &mut Case) -> Result<()> {
    let sd = load_pipeline(case)?;
    let prompt: String = case.setting("prompt")?;
    let steps: usize = case.setting("steps")?;
    let guidance: f64 = case.setting("guidance_scale")?;
    let inv = sd.invert(
        &case.tensor("image")?,
        &prompt,
        steps,
        guidance,
        &mut no_progress(),
    )?;
    case.check("z0", &inv.z0, Tol::Abs(5e-4))?;
    case.check("zts", &inv.zts, Tol::Abs(5e-4))?;
    case.check("inv_eps", &inv.eps, Tol::Abs(5e-4))?;
    let forward: Vec<Tensor> = (0..=steps)
        .rev()
        .map(|k| inv.zts.get(k))
        .collect::<Result<_, _>>()?;
    case.check(
        "trajectory_forward",
        &Tensor::stack(&forward, 0)?
            .squeeze(1)
            .or_else(|_| Tensor::stack(&forward, 0))?,
        Tol::Abs(5e-4),
    )?;
    // Plain DDIM sampling from the golden zts[0] with the same prompt, guidance 1.
    let (height, width) = case.hw()?;
    let settings = GenerationSettings {
        height,
        width,
        steps,
        guidance_scale: guidance,
    };
    let frame = FrameInput {
        prompt,
        negative_prompt: None,
        init_latents: case.tensor("zts")?.get(0)?.unsqueeze(0)?,
    };
    let recon = sd.txt2img(&settings, &[frame], &mut no_progress())?;
    case.check("recon_latents", &recon.final_latents, Tol::Trajectory)?;
    Ok(())
}

fn style_aligned(case: &mut Case) -> Result<()> {
    let sd = load_pipeline(case)?;
    let settings = settings_of(case)?;
    let prompts: Vec<String> = case.setting("prompts")?;
    let negative: Option<String> = case.setting("negative_prompt")?;
    let options: StyleAlignedOptions = case.setting("style_aligned")?;
    // The pipelines (like the official code) take image 0 as the style reference.
    if let Some(index) = case
        .optional_setting::<usize>("style_image_index")?
        .filter(|&i| i != 0)
    {
        bail!("settings.style_image_index = {index}: only image 0 can be the style reference");
    }
    let init = case.tensor("init_latents")?;
    check_conditioning(
        case,
        &sd,
        &prompts,
        negative.as_deref(),
        settings.uses_guidance(),
    )?;

    // The first shared self-attention layer, fed the golden input.
    let layer_name: String = case.setting("first_shared_self_attn_layer")?;
    let hook = StyleAligned::new(options.clone(), &sd.unet)?;
    let id = sd
        .unet
        .attention_ids()
        .into_iter()
        .find(|id| id.kind == AttentionKind::SelfAttention && id.to_string() == layer_name)
        .ok_or_else(|| anyhow!("no attention layer {layer_name}"))?;
    let x = case.tensor("attn1_first_in")?;
    let (h, w) = (settings.height / 8, settings.width / 8);
    let scale = (h * w / x.dim(1)?) as f64;
    let (lh, lw) = if scale == 1.0 {
        (h, w)
    } else {
        let f = scale.sqrt() as usize;
        (h / f, w / f)
    };
    let ctx = ForwardContext {
        step: StepContext {
            step: 0,
            steps: settings.steps,
            timestep: 0,
            layout: BatchLayout {
                images: prompts.len(),
                guidance: settings.uses_guidance(),
            },
        },
        hooks: Hooks {
            attention: Some(&hook),
            norm: Some(&hook),
            ..Hooks::none()
        },
    };
    let out = sd.unet.run_attention(&id, &x, None, lh, lw, &ctx)?;
    case.check("attn1_first_out", &out, Tol::Abs(1e-4))?;

    let reference_latents = match case.settings.get("inversion_file").and_then(|v| v.as_str()) {
        Some(setting) => {
            // "sd15/inversion.safetensors (tensor zts)": the file, relative to the root, and the
            // trajectory tensor in it (`zts` unless stated).
            let (file, tensor) = match setting.split_once(" (") {
                Some((file, rest)) => {
                    let tensor = rest
                        .strip_prefix("tensor ")
                        .and_then(|r| r.strip_suffix(')'));
                    let tensor = tensor.ok_or_else(|| {
                        anyhow!(
                            "settings.inversion_file {setting:?}: expected `FILE (tensor NAME)`"
                        )
                    })?;
                    (file, tensor.trim())
                }
                None => (setting, "zts"),
            };
            let zts = candle_core::safetensors::load(case.root.join(file), &case.device)?
                .remove(tensor)
                .ok_or_else(|| anyhow!("{file}: no tensor {tensor}"))?;
            case.notes
                .push(format!("reference trajectory: {file} tensor {tensor}"));
            ReferenceLatents::Replay {
                trajectory: zts,
                offset: case.setting("inversion_offset")?,
            }
        }
        None => ReferenceLatents::Generate(init.get(0)?.unsqueeze(0)?),
    };
    let reference = ReferenceInput {
        prompt: prompts[0].clone(),
        negative_prompt: negative.clone(),
        latents: reference_latents,
    };
    let targets: Vec<FrameInput> = prompts[1..]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(FrameInput {
                prompt: p.clone(),
                negative_prompt: negative.clone(),
                init_latents: init.get(i + 1)?.unsqueeze(0)?,
            })
        })
        .collect::<Result<_>>()?;

    // The official layout (reference in the batch) ...
    let batch = sd.style_aligned_batch(
        &settings,
        &options,
        &reference,
        &targets,
        &mut no_progress(),
    )?;
    case.check(
        "latents_per_step",
        &Tensor::stack(&batch.latents_per_step, 0)?,
        Tol::Trajectory,
    )?;
    case.check("final_latents", &batch.final_latents, Tol::Trajectory)?;
    // ... and the farm's (reference features captured per step, targets batched on their own).
    let farm = sd.style_aligned(
        &settings,
        &options,
        &reference,
        &targets,
        &mut no_progress(),
    )?;
    let golden = case.tensor("latents_per_step")?;
    case.check_against(
        "farm:latents_per_step",
        &Tensor::stack(&farm.latents_per_step, 0)?,
        &golden,
        Tol::Trajectory,
    )?;
    let golden = case.tensor("final_latents")?;
    case.check_against(
        "farm:final_latents",
        &farm.final_latents,
        &golden,
        Tol::Trajectory,
    )?;
    if case.tensors.contains_key("decoded") {
        case.check(
            "decoded",
            &sd.decode(&case.tensor("final_latents")?)?,
            Tol::Abs(1e-3),
        )?;
    }
    // Without StyleAligned: independent images.
    let frames: Vec<FrameInput> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(FrameInput {
                prompt: p.clone(),
                negative_prompt: negative.clone(),
                init_latents: init.get(i)?.unsqueeze(0)?,
            })
        })
        .collect::<Result<_>>()?;
    if matches!(reference.latents, ReferenceLatents::Generate(_)) {
        let plain = sd.txt2img(&settings, &frames, &mut no_progress())?;
        case.check(
            "baseline_final_latents",
            &plain.final_latents,
            Tol::Trajectory,
        )?;
    }
    Ok(())
}
