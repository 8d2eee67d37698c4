//! Models loaded once and kept: an LRU of loaded pipelines by model id, so a worker switching
//! between a few models does not reload them for every task.

use std::sync::{Arc, Mutex};

use storyfarm_diffusion::device::{default_precision, DeviceSpec, Precision};
use storyfarm_diffusion::model::{HubOptions, ModelFolder};
use storyfarm_diffusion::pipeline::StableDiffusion;
use storyfarm_diffusion::DiffusionError;

use storyfarm_telemetry::WorkerMetrics;

use crate::{Cause, TaskFailure};

/// How models are found and where they run.
#[derive(Clone, Debug)]
pub struct ModelLoader {
    pub device: DeviceSpec,
    pub precision: Option<Precision>,
    pub hub: HubOptions,
}

impl ModelLoader {
    fn load(&self, model: &str) -> Result<StableDiffusion, DiffusionError> {
        let device = self.device.device()?;
        let dtype = self
            .precision
            .unwrap_or_else(|| default_precision(&device))
            .to_dtype();
        let folder = ModelFolder::open_for_dtype(model, &self.hub, dtype)?;
        StableDiffusion::load(&folder, dtype, &device)
    }
}

/// Loaded models, most recently used last.
pub struct ModelCache {
    loader: ModelLoader,
    capacity: usize,
    loaded: Mutex<Vec<(String, Arc<StableDiffusion>)>>,
}

impl ModelCache {
    pub fn new(loader: ModelLoader, capacity: usize) -> Self {
        Self {
            loader,
            capacity: capacity.max(1),
            loaded: Mutex::new(Vec::new()),
        }
    }

    /// The model, loaded on first use (on a blocking thread).
    pub(crate) async fn get(
        &self,
        model: &str,
        metrics: &WorkerMetrics,
    ) -> Result<Arc<StableDiffusion>, TaskFailure> {
        {
            let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = loaded.iter().position(|(id, _)| id == model) {
                let entry = loaded.remove(i);
                let sd = entry.1.clone();
                loaded.push(entry);
                metrics.model_lookup(true);
                return Ok(sd);
            }
        }
        metrics.model_lookup(false);
        let loader = self.loader.clone();
        let id = model.to_string();
        let started = std::time::Instant::now();
        let sd = tokio::task::spawn_blocking(move || loader.load(&id))
            .await
            .map_err(|e| TaskFailure::Failed {
                reason: format!("model loading panicked: {e}"),
                retryable: false,
                cause: Cause::Model,
            })?
            .map_err(|e| match TaskFailure::from(e) {
                TaskFailure::Failed {
                    reason, retryable, ..
                } => TaskFailure::Failed {
                    reason,
                    retryable,
                    cause: Cause::Model,
                },
                other => other,
            })?;
        metrics.model_loaded(started.elapsed().as_secs_f64());
        tracing::info!(
            model,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let sd = Arc::new(sd);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.push((model.to_string(), sd.clone()));
        while loaded.len() > self.capacity {
            let (evicted, _) = loaded.remove(0);
            tracing::info!(model = %evicted, "model evicted");
        }
        Ok(sd)
    }
}
