//! The golden harness: runs every case file (`*.json` with a `kind`) under a fixtures root laid out
//! like ../shared/fixtures against the reference tensors, and prints max-abs and relative error
//! per tensor. Root: `STORYFARM_GOLDEN_DIR`, else the copy vendored in `tests/fixtures`.
//! An unknown kind, a missing tensor or a value outside tolerance fails; nothing is skipped.
//! `STORYFARM_GOLDEN_DEVICE` (`cpu`, `cuda`, `cuda:N`; default cpu) runs the cases on another
//! device, in f32 and against the same tolerances.

mod cases;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// One case file and its tensors.
pub struct Case {
    /// Where models run and golden inputs are loaded; checks compare on the CPU.
    pub device: Device,
    pub root: PathBuf,
    pub path: PathBuf,
    pub kind: String,
    pub settings: Value,
    pub tensors: HashMap<String, Tensor>,
    pub checks: Vec<Check>,
}

pub struct Check {
    pub name: String,
    pub max_abs: f32,
    pub ref_absmax: f32,
    pub tolerance: f32,
}

impl Check {
    fn passed(&self) -> bool {
        self.max_abs.is_finite() && self.max_abs <= self.tolerance
    }
}

/// Tolerances of fixtures/README.md section 11.
#[derive(Clone, Copy)]
pub enum Tol {
    Exact,
    Abs(f32),
    /// Long denoising runs: 5e-3, or 1e-4 x the largest reference magnitude if that is larger.
    Trajectory,
}

impl Case {
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: golden tensor `{name}` missing", self.path.display()))
    }

    pub fn model_dir(&self) -> Result<PathBuf> {
        let model = self.settings["model"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: settings.model missing", self.path.display()))?;
        Ok(self.root.join(model))
    }

    pub fn setting<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_value(self.settings[key].clone())
            .with_context(|| format!("{}: settings.{key}", self.path.display()))
    }

    pub fn hw(&self) -> Result<(usize, usize)> {
        let hw: Vec<usize> = self.setting("image_size_hw")?;
        Ok((hw[0], hw[1]))
    }

    /// Compares `got` with the golden tensor `name` (shape must match exactly).
    pub fn check(&mut self, name: &str, got: &Tensor, tol: Tol) -> Result<()> {
        let expected = self.tensor(name)?;
        self.check_against(name, got, &expected, tol)
    }

    pub fn check_against(&mut self, name: &str, got: &Tensor, expected: &Tensor, tol: Tol) -> Result<()> {
        if got.dims() != expected.dims() {
            bail!("{name}: shape {:?}, golden {:?}", got.dims(), expected.dims());
        }
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let expected = expected.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let max_abs: f32 = (&got - &expected)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        let ref_absmax: f32 = expected.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        let tolerance = match tol {
            Tol::Exact => 0.0,
            Tol::Abs(t) => t,
            Tol::Trajectory => (5e-3f32).max(1e-4 * ref_absmax),
        };
        self.checks.push(Check { name: name.to_string(), max_abs, ref_absmax, tolerance });
        Ok(())
    }

    pub fn check_ids(&mut self, name: &str, got: &[Vec<u32>]) -> Result<()> {
        let expected = self.tensor(name)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mismatches = expected
            .iter()
            .zip(got)
            .filter(|(e, g)| e.iter().map(|&x| x as u32).ne(g.iter().copied()))
            .count()
            + expected.len().abs_diff(got.len());
        self.checks.push(Check {
            name: name.to_string(),
            max_abs: mismatches as f32,
            ref_absmax: expected.len() as f32,
            tolerance: 0.0,
        });
        Ok(())
    }
}

fn fixtures_root() -> PathBuf {
    match std::env::var_os("STORYFARM_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

fn discover(root: &Path) -> Result<Vec<(PathBuf, String, Value)>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                // Model folders hold configs, not cases.
                if path.file_name().is_some_and(|n| n == "models" || n == "real-configs") {
                    continue;
                }
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let value: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                    .with_context(|| path.display().to_string())?;
                if let Some(kind) = value.get("kind").and_then(Value::as_str) {
                    found.push((path, kind.to_string(), value["settings"].clone()));
                }
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn device() -> Result<Device> {
    let spec: storyfarm_diffusion::device::DeviceSpec = match std::env::var("STORYFARM_GOLDEN_DEVICE") {
        Ok(spec) => spec.parse()?,
        Err(_) => Default::default(),
    };
    Ok(spec.device()?)
}

fn main() -> ExitCode {
    let root = fixtures_root();
    let device = match device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("STORYFARM_GOLDEN_DEVICE: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let cases = match discover(&root) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot read fixtures under {}: {e:#}", root.display());
            return ExitCode::FAILURE;
        }
    };
    if cases.is_empty() {
        eprintln!("no golden cases under {}", root.display());
        return ExitCode::FAILURE;
    }
    println!("golden cases under {} on {device:?}", root.display());
    let mut failed = Vec::new();
    let mut ran = 0;
    for (path, kind, settings) in cases {
        let rel = path.strip_prefix(&root).unwrap_or(&path).display().to_string();
        if filter.as_ref().is_some_and(|f| !rel.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let started = std::time::Instant::now();
        let result = (|| -> Result<Case> {
            let tensors = candle_core::safetensors::load(path.with_extension("safetensors"), &device)
                .with_context(|| format!("{rel}: tensors"))?;
            let mut case = Case { device: device.clone(), root: root.clone(), path: path.clone(), kind: kind.clone(), settings, tensors, checks: Vec::new() };
            cases::run(&mut case)?;
            Ok(case)
        })();
        match result {
            Ok(case) => {
                let ok = !case.checks.is_empty() && case.checks.iter().all(Check::passed);
                println!("{} {rel} ({kind}, {:.1}s)", if ok { "PASS" } else { "FAIL" }, started.elapsed().as_secs_f32());
                for c in &case.checks {
                    println!(
                        "    {:<4} {:<32} max_abs {:>10.3e}  rel {:>10.3e}  tol {:.1e}",
                        if c.passed() { "ok" } else { "BAD" },
                        c.name,
                        c.max_abs,
                        c.max_abs / c.ref_absmax.max(f32::MIN_POSITIVE),
                        c.tolerance
                    );
                }
                if !ok {
                    failed.push(rel);
                }
            }
            Err(e) => {
                // Candle errors may carry a backtrace; the first line names the problem.
                let message = format!("{e:#}");
                println!("FAIL {rel} ({kind}): {}", message.lines().next().unwrap_or(""));
                failed.push(rel);
            }
        }
    }
    if ran == 0 {
        eprintln!("no case matched the filter");
        return ExitCode::FAILURE;
    }
    if failed.is_empty() {
        println!("all {ran} golden cases passed");
        ExitCode::SUCCESS
    } else {
        println!("{} of {ran} golden cases failed: {}", failed.len(), failed.join(", "));
        ExitCode::FAILURE
    }
}
