//! Which device a model runs on (`cpu`, `cuda`, `cuda:N`) and in which floating point precision.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{DiffusionError, Result};

/// A device as written on the command line or in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal; `cuda` alone means ordinal 0.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device. Fails when the CUDA device can not be initialised (no driver, bad
    /// ordinal).
    pub fn device(&self) -> Result<Device> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda_device(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        DiffusionError::invalid_argument("device", format!("cannot open cuda:{ordinal}: {e}"))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(cuda_not_built(&format!("cuda:{ordinal}")))
}

fn cuda_not_built(value: &str) -> DiffusionError {
    DiffusionError::invalid_argument(
        "device",
        format!(
            "`{value}` needs CUDA support, but this binary was built without it; \
             rebuild with `--features cuda`"
        ),
    )
}

impl FromStr for DeviceSpec {
    type Err = DiffusionError;

    fn from_str(value: &str) -> Result<Self> {
        let normalized = value.trim().to_ascii_lowercase();
        let spec = match normalized.as_str() {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            other => {
                let ordinal = other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        DiffusionError::invalid_argument(
                            "device",
                            format!("expected `cpu`, `cuda` or `cuda:N`, got {value:?}"),
                        )
                    })?;
                Self::Cuda(ordinal)
            }
        };
        // Refusing at parse time makes a CPU-only binary fail before it loads any weights.
        if matches!(spec, Self::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(cuda_not_built(value));
        }
        Ok(spec)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// The floating point type weights and activations are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn to_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl FromStr for Precision {
    type Err = DiffusionError;

    fn from_str(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(DiffusionError::invalid_argument(
                "precision",
                format!("expected `f32`, `f16` or `bf16`, got {value:?}"),
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// f32 on the CPU (candle's CPU half-precision kernels are slow and gain nothing), f16 on GPUs
/// (half the memory, tensor cores).
pub fn default_precision(device: &Device) -> Precision {
    if device.is_cpu() {
        Precision::F32
    } else {
        Precision::F16
    }
}

/// Reads a GPU's memory figures for metrics; holds the device open so a scrape opens nothing.
pub struct GpuMemoryProbe {
    device: Device,
}

impl GpuMemoryProbe {
    /// `None` for the CPU.
    pub fn open(spec: DeviceSpec) -> Result<Option<Self>> {
        match spec {
            DeviceSpec::Cpu => Ok(None),
            spec => Ok(Some(Self {
                device: spec.device()?,
            })),
        }
    }

    /// (in use, in all) bytes.
    pub fn read(&self) -> Option<(u64, u64)> {
        gpu_memory(&self.device)
    }
}

/// Memory in use and in all on the device, in bytes, as its driver counts it (every process
/// on the GPU, which is what an operator sizing workers needs); `None` off CUDA.
fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(((total - free) as u64, total as u64));
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reports_no_gpu_memory() {
        assert_eq!(gpu_memory(&Device::Cpu), None);
    }

    #[test]
    fn parses_cpu_in_any_case() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CPU ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::Cpu.to_string(), "cpu");
        assert!(DeviceSpec::Cpu.device().unwrap().is_cpu());
    }

    #[test]
    fn rejects_unknown_devices_naming_the_value() {
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "metal", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            let message = err.to_string();
            let field = match &err {
                DiffusionError::InvalidArgument { field, .. } => field.as_str(),
                _ => "",
            };
            assert_eq!(field, "device", "{message}");
            assert!(message.contains(&format!("{bad:?}")), "{message}");
            assert!(message.contains("cuda:N"), "{message}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        for value in ["cuda", "cuda:1", "CUDA:0"] {
            let message = value.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(message.contains("--features cuda"), "{message}");
            assert!(message.contains(value), "{message}");
        }
        let message = DeviceSpec::Cuda(2).device().unwrap_err().to_string();
        assert!(
            message.contains("cuda:2") && message.contains("--features cuda"),
            "{message}"
        );
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn parses_cuda_ordinals() {
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn parses_precisions() {
        let cases = [
            ("f32", Precision::F32, DType::F32),
            ("FP32", Precision::F32, DType::F32),
            ("float32", Precision::F32, DType::F32),
            ("f16", Precision::F16, DType::F16),
            ("fp16", Precision::F16, DType::F16),
            ("half", Precision::F16, DType::F16),
            ("bf16", Precision::Bf16, DType::BF16),
            ("bfloat16", Precision::Bf16, DType::BF16),
        ];
        for (text, precision, dtype) in cases {
            let parsed: Precision = text.parse().unwrap();
            assert_eq!(parsed, precision, "{text}");
            assert_eq!(parsed.to_dtype(), dtype, "{text}");
            assert_eq!(parsed.to_string().parse::<Precision>().unwrap(), parsed);
        }
    }

    #[test]
    fn rejects_unknown_precision_naming_the_value() {
        let message = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(
            message.contains("\"f8\"") && message.contains("precision"),
            "{message}"
        );
    }

    #[test]
    fn cpu_defaults_to_f32() {
        assert_eq!(default_precision(&Device::Cpu), Precision::F32);
    }
}
