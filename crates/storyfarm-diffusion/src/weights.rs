//! Named weight tensors for model construction: safetensors files, or synthetic weights for
//! benchmarks (random) and structure-only inspection (zeros that cost no memory).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{DiffusionError, Result};

enum Source {
    Safetensors {
        files: Arc<MmapedSafetensors>,
        location: Arc<str>,
    },
    /// Every tensor is a broadcast scalar zero: building a model costs no memory, running it
    /// computes nothing useful. For enumerating the structure of real-size configs.
    Zeros,
    /// Normal values scaled by fan-in: benchmark speed does not depend on values, so these are
    /// neither seeded nor reproducible.
    Random,
}

/// A view of a weight source under a name prefix (`down_blocks.1.attentions.0`), with the dtype
/// and device the model runs in. Cheap to clone.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Memory-maps one or more safetensors files (the shards of one model component).
    pub fn from_safetensors(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for path in paths {
            if !path.is_file() {
                return Err(DiffusionError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
        }
        let location = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: the files are opened read-only; the model folder must not be rewritten while a
        // model built from it is alive, which is the documented contract of a model folder.
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| {
            DiffusionError::ModelLayout {
                path: paths.first().cloned().unwrap_or_default(),
                message: format!("cannot read safetensors: {e}"),
            }
        })?;
        Ok(Self {
            source: Arc::new(Source::Safetensors {
                files: Arc::new(files),
                location: location.into(),
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn zeros(dtype: DType, device: &Device) -> Self {
        Self {
            source: Arc::new(Source::Zeros),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    pub fn random(dtype: DType, device: &Device) -> Self {
        Self {
            source: Arc::new(Source::Random),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The same source one level deeper in the name tree.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            source: self.source.clone(),
            prefix,
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self.source.as_ref() {
            Source::Safetensors { files, .. } => files.get(&self.path(name)).is_ok(),
            Source::Zeros | Source::Random => true,
        }
    }

    /// Loads `name` under this prefix, checks its shape and converts it to the model dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.path(name);
        match self.source.as_ref() {
            Source::Safetensors { files, location } => {
                let view = files
                    .get(&full)
                    .map_err(|_| DiffusionError::MissingTensor {
                        name: full.clone(),
                        location: location.to_string(),
                    })?;
                if view.shape() != shape {
                    return Err(DiffusionError::TensorShape {
                        name: full,
                        location: location.to_string(),
                        expected: shape.to_vec(),
                        found: view.shape().to_vec(),
                    });
                }
                let tensor = candle_core::safetensors::Load::load(&view, &self.device)?;
                Ok(tensor.to_dtype(self.dtype)?)
            }
            Source::Zeros => Ok(Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?),
            Source::Random => {
                let fan_in = shape.iter().skip(1).product::<usize>().max(1);
                let t = if shape.len() > 1 {
                    Tensor::randn(
                        0f32,
                        (1.0 / fan_in as f64).sqrt() as f32,
                        shape,
                        &Device::Cpu,
                    )?
                } else if name.ends_with("weight") {
                    Tensor::ones(shape, DType::F32, &Device::Cpu)? // norm scales
                } else {
                    Tensor::zeros(shape, DType::F32, &Device::Cpu)? // biases
                };
                Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
            }
        }
    }
}
