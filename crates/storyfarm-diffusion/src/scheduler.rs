//! DDIM as diffusers' `DDIMScheduler` computes it (eta 0), and the DDIM inversion step of the
//! official StyleAligned code.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{DiffusionError, Result};

const COMPONENT: &str = "scheduler";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The `scheduler/scheduler_config.json` fields DDIM uses. Other schedulers' configs are read too
/// (SD checkpoints ship PNDM or Euler configs with the same beta fields); DDIM is what we run.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }
}

impl DdimConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DiffusionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DiffusionError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let d = Self::default();
        let get = |field: &str| value.get(field).filter(|v| !v.is_null());
        fn parse<T: serde::de::DeserializeOwned>(field: &str, v: &Value) -> Result<T> {
            serde_json::from_value(v.clone())
                .map_err(|_| DiffusionError::unsupported(COMPONENT, field, v))
        }
        // Features that change the math and that we do not implement.
        for (field, allowed) in [
            ("clip_sample", Value::Bool(false)),
            ("thresholding", Value::Bool(false)),
            ("rescale_betas_zero_snr", Value::Bool(false)),
            ("trained_betas", Value::Null),
        ] {
            if let Some(v) = get(field) {
                if *v != allowed {
                    return Err(DiffusionError::unsupported(COMPONENT, field, v));
                }
            }
        }
        let usize_field = |field: &str, default: usize| -> Result<usize> {
            match get(field) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| DiffusionError::unsupported(COMPONENT, field, v)),
            }
        };
        let f64_field = |field: &str, default: f64| -> Result<f64> {
            match get(field) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| DiffusionError::unsupported(COMPONENT, field, v)),
            }
        };
        Ok(Self {
            num_train_timesteps: usize_field("num_train_timesteps", d.num_train_timesteps)?,
            beta_start: f64_field("beta_start", d.beta_start)?,
            beta_end: f64_field("beta_end", d.beta_end)?,
            beta_schedule: match get("beta_schedule") {
                Some(v) => parse("beta_schedule", v)?,
                None => d.beta_schedule,
            },
            set_alpha_to_one: match get("set_alpha_to_one") {
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| DiffusionError::unsupported(COMPONENT, "set_alpha_to_one", v))?,
                // diffusers' DDIM default; SD checkpoints ship PNDM configs without the field.
                None => true,
            },
            steps_offset: usize_field("steps_offset", 0)?,
            prediction_type: match get("prediction_type") {
                Some(v) => parse("prediction_type", v)?,
                None => d.prediction_type,
            },
            timestep_spacing: match get("timestep_spacing") {
                Some(v) => parse("timestep_spacing", v)?,
                None => d.timestep_spacing,
            },
        })
    }
}

/// DDIM with a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
}

impl DdimScheduler {
    pub fn new(config: &DdimConfig, steps: usize) -> Result<Self> {
        let t = config.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(DiffusionError::invalid_argument(
                "steps",
                format!("must be between 1 and {t}, got {steps}"),
            ));
        }
        let betas: Vec<f32> = match config.beta_schedule {
            BetaSchedule::Linear => {
                linspace_f32(config.beta_start as f32, config.beta_end as f32, t)
            }
            BetaSchedule::ScaledLinear => linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                t,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
        };
        // torch.cumprod on CPU accumulates float32 inputs in double.
        let mut acc = 1f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps: Vec<usize> = match config.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((t as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            TimestepSpacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    let x = if steps == 1 {
                        0.0
                    } else {
                        i as f64 * (t - 1) as f64 / (steps - 1) as f64
                    };
                    x.round() as usize
                })
                .collect(),
        };
        if let Some(&bad) = timesteps.iter().find(|&&ts| ts >= t) {
            return Err(DiffusionError::invalid_config(
                COMPONENT,
                "steps_offset",
                format!("timestep {bad} is outside 0..{t} with {steps} steps"),
            ));
        }
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
        })
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    fn step_ratio(&self) -> usize {
        self.config.num_train_timesteps / self.timesteps.len()
    }

    fn alpha_at(&self, timestep: isize) -> f32 {
        if timestep >= 0 {
            self.alphas_cumprod[timestep as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// `DDIMScheduler.step(model_output, timestep, sample, eta=0).prev_sample`.
    pub fn step(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        let prev = timestep as isize - self.step_ratio() as isize;
        let a_t = self.alpha_at(timestep as isize);
        let a_prev = self.alpha_at(prev);
        let beta_t = 1.0 - a_t;
        let (x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * beta_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * a_t.sqrt() as f64)? - (model_output * beta_t.sqrt() as f64)?)?;
                let eps = ((model_output * a_t.sqrt() as f64)? + (sample * beta_t.sqrt() as f64)?)?;
                (x0, eps)
            }
        };
        Ok(((x0 * a_prev.sqrt() as f64)? + (eps * (1.0 - a_prev).sqrt() as f64)?)?)
    }

    /// One DDIM inversion step (official StyleAligned `_next_step`): `sample` sits at
    /// `timestep - ratio` and moves up to `timestep` using the noise predicted at `timestep`.
    pub fn inversion_step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        if self.config.prediction_type != PredictionType::Epsilon {
            return Err(DiffusionError::unsupported(
                COMPONENT,
                "prediction_type",
                "v_prediction (DDIM inversion needs an epsilon-prediction model)",
            ));
        }
        let current = (timestep as isize - self.step_ratio() as isize).min(999);
        let a_c = self.alpha_at(current);
        let a_n = self.alphas_cumprod[timestep];
        let x0 = ((sample - (model_output * (1.0 - a_c).sqrt() as f64)?)? / a_c.sqrt() as f64)?;
        Ok(((x0 * a_n.sqrt() as f64)? + (model_output * (1.0 - a_n).sqrt() as f64)?)?)
    }
}

/// `torch.linspace` in float32, which fills the first half forwards from `start` and the second
/// half backwards from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers() {
        let mut c = DdimConfig::default();
        let s = DdimScheduler::new(&c, 10).unwrap();
        assert_eq!(
            s.timesteps(),
            [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        assert_eq!(
            DdimScheduler::new(&c, 7).unwrap().timesteps(),
            [853, 711, 569, 427, 285, 143, 1]
        );
        c.timestep_spacing = TimestepSpacing::Trailing;
        c.steps_offset = 0;
        assert_eq!(
            DdimScheduler::new(&c, 4).unwrap().timesteps(),
            [999, 749, 499, 249]
        );
        c.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(
            DdimScheduler::new(&c, 4).unwrap().timesteps(),
            [999, 666, 333, 0]
        );
        assert!(DdimScheduler::new(&c, 0).is_err());
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = DdimConfig::from_json(&serde_json::json!({"clip_sample": true})).unwrap_err();
        assert!(e.to_string().contains("clip_sample"), "{e}");
        let e =
            DdimConfig::from_json(&serde_json::json!({"prediction_type": "sample"})).unwrap_err();
        assert!(
            e.to_string().contains("prediction_type") && e.to_string().contains("sample"),
            "{e}"
        );
        let e = DdimConfig::from_json(&serde_json::json!({"beta_schedule": "squaredcos_cap_v2"}))
            .unwrap_err();
        assert!(e.to_string().contains("squaredcos_cap_v2"), "{e}");
    }

    #[test]
    fn v_prediction_recovers_x0_and_eps() {
        // With x = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0, one step
        // must equal the epsilon-model step given the true eps.
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[0.3f32, -1.2, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[1.0f32, 0.5, -0.7], &dev).unwrap();
        let mut c = DdimConfig::default();
        let s_eps = DdimScheduler::new(&c, 10).unwrap();
        let a = s_eps.alphas_cumprod()[501] as f64;
        let x = ((&x0 * a.sqrt()).unwrap() + (&eps * (1.0 - a).sqrt()).unwrap()).unwrap();
        let v = ((&eps * a.sqrt()).unwrap() - (&x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
        let expected = s_eps.step(&eps, 501, &x).unwrap();
        c.prediction_type = PredictionType::VPrediction;
        let got = DdimScheduler::new(&c, 10)
            .unwrap()
            .step(&v, 501, &x)
            .unwrap();
        let err: f32 = (expected - got)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-5, "{err}");
    }
}
