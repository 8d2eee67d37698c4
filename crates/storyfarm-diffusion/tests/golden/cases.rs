//! One function per case kind: build the component from the case's model folder and settings,
//! run it, compare every golden tensor.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use storyfarm_diffusion::attention::{BatchLayout, ForwardContext, Hooks, StepContext};
use storyfarm_diffusion::scheduler::{DdimConfig, DdimScheduler};
use storyfarm_diffusion::unet::{UNet, UNetConditioning, UNetConfig};
use storyfarm_diffusion::weights::Weights;

use crate::{Case, Tol};

pub fn run(case: &mut Case) -> Result<()> {
    match case.kind.as_str() {
        "unet_forward" => unet_forward(case),
        "scheduler" => scheduler(case),
        other => bail!("unknown case kind `{other}`"),
    }
}

fn load_unet(case: &Case) -> Result<UNet> {
    let dir = case.model_dir()?.join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::from_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok(UNet::new(config, &weights)?)
}

fn plain_context(batch: usize) -> StepContext {
    StepContext { step: 0, steps: 1, timestep: 0, layout: BatchLayout { images: batch, guidance: false } }
}

fn unet_forward(case: &mut Case) -> Result<()> {
    let unet = load_unet(case)?;
    let sample = case.tensor("sample")?;
    let t = case.tensor("timestep")?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    let context = case.tensor("encoder_hidden_states")?;
    let added = match (case.tensors.get("text_embeds"), case.tensors.get("time_ids")) {
        (Some(a), Some(b)) => Some((a.clone(), b.clone())),
        _ => None,
    };
    let cond = UNetConditioning { context: &context, added: added.as_ref().map(|(a, b)| (a, b)) };
    let ctx = ForwardContext { step: plain_context(sample.dim(0)?), hooks: Hooks::none() };
    let out = unet.forward_with_debug(&sample, t, &cond, &ctx)?;
    case.check("out", &out.out, Tol::Abs(1e-4))?;
    case.check("dbg_temb", &out.temb, Tol::Abs(1e-4))?;
    case.check("dbg_conv_in", &out.conv_in, Tol::Abs(1e-4))?;
    case.check("dbg_mid_out", &out.mid_out, Tol::Abs(1e-4))?;
    if case.tensors.contains_key("dbg_aug_emb") {
        let aug = out.aug.ok_or_else(|| anyhow::anyhow!("model produced no added embedding"))?;
        case.check("dbg_aug_emb", &aug, Tol::Abs(1e-4))?;
    }
    Ok(())
}

fn scheduler(case: &mut Case) -> Result<()> {
    let config = DdimConfig::from_json(&case.settings["config"])?;
    let steps: Vec<usize> = case.setting("steps")?;
    let s10 = DdimScheduler::new(&config, 10)?;
    let alphas = Tensor::new(s10.alphas_cumprod(), &Device::Cpu)?;
    case.check("alphas_cumprod", &alphas, Tol::Abs(1e-7))?;
    let fa = Tensor::new(&[s10.final_alpha_cumprod()], &Device::Cpu)?;
    case.check("final_alpha_cumprod", &fa, Tol::Exact)?;
    for n in steps {
        let s = DdimScheduler::new(&config, n)?;
        let ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        case.check(&format!("timesteps_{n}"), &Tensor::new(ts.as_slice(), &Device::Cpu)?, Tol::Exact)?;
    }
    let sample = case.tensor("step_sample")?;
    let eps = case.tensor("step_eps")?;
    let t = case.tensor("step_t")?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0] as usize;
    case.check("step_prev_sample", &s10.step(&eps, t, &sample)?, Tol::Abs(1e-5))?;
    // The inversion example moves the same sample up from t - 1000/N to t with the same eps.
    case.check("inv_step_next_sample", &s10.inversion_step(&eps, t, &sample)?, Tol::Abs(1e-5))?;
    Ok(())
}
