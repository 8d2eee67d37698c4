//! The golden harness: runs every case file (`*.json` with a string `kind` and a `settings`
//! object) under a fixtures root laid out like ../shared/fixtures against the reference tensors,
//! and prints max-abs and relative error per tensor. Root: `STORYFARM_GOLDEN_DIR`, else the copy
//! vendored in `tests/fixtures`; the first argument that is not a flag filters cases by a
//! substring of their path under the root (`cargo test --test golden -- tokenizer`).
//! An unknown kind, a missing tensor or a value outside tolerance fails; nothing is skipped.
//! `STORYFARM_GOLDEN_DEVICE` (`cpu`, `cuda`, `cuda:N`; default cpu) runs the cases on another
//! device, in f32 and against the same tolerances.
//!
//! Everything a case file states is read from it, nothing is assumed about names or numbers:
//! model folders (`settings.model`), tokenizer files (`settings.tokenizer_json_<x>` for the golden
//! `ids_<x>`), sizes, steps, guidance, the inversion file and tensor of a StyleAligned case, and
//! the step count of the scheduler case's one-step example (`settings.step_example_steps` if
//! present, else the `(with N steps)` of `tensors.step_t.meaning`, else the one schedule of
//! `settings.steps` that contains `step_t`; ambiguity fails). Folders holding a
//! `model_index.json` are model folders and are not searched for cases.
//!
//! Tolerances are those of fixtures/README.md section 11 unless the case file has a top-level
//! `tolerance` object: `"tolerance": {"final_latents": 1e-2}` makes that number the max-abs
//! tolerance of the check of that name (for a check named `farm:<tensor>`, `tolerance.<tensor>`
//! applies too, the full name wins). See [`Case::tolerance`].

mod cases;
mod consistory;

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
    /// The whole case file (`settings`, `tensors` descriptions, optional `tolerance`, ...).
    pub json: Value,
    pub settings: Value,
    pub tensors: HashMap<String, Tensor>,
    pub checks: Vec<Check>,
    /// Printed under the case's result: what the harness derived from the case file.
    pub notes: Vec<String>,
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

    /// A setting that may be absent (`null` or missing gives `None`).
    pub fn optional_setting<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.settings.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.setting(key).map(Some),
        }
    }

    /// The tolerance of the check `name`: `tolerance.<name>` of the case file as a max-abs number
    /// if the file states one (for `farm:<tensor>` also `tolerance.<tensor>`), else `default`.
    pub fn tolerance(&self, name: &str, default: Tol) -> Result<Tol> {
        let Some(table) = self.json.get("tolerance") else {
            return Ok(default);
        };
        let table = table
            .as_object()
            .ok_or_else(|| anyhow!("{}: `tolerance` must be an object", self.path.display()))?;
        let tensor = name.rsplit(':').next().unwrap_or(name);
        match table.get(name).or_else(|| table.get(tensor)) {
            None => Ok(default),
            Some(value) => match value.as_f64() {
                Some(t) if t >= 0.0 => Ok(Tol::Abs(t as f32)),
                _ => bail!(
                    "{}: tolerance.{name} must be a non-negative number, got {value}",
                    self.path.display()
                ),
            },
        }
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

    pub fn check_against(
        &mut self,
        name: &str,
        got: &Tensor,
        expected: &Tensor,
        tol: Tol,
    ) -> Result<()> {
        if got.dims() != expected.dims() {
            bail!(
                "{name}: shape {:?}, golden {:?}",
                got.dims(),
                expected.dims()
            );
        }
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let expected = expected.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let max_abs: f32 = (&got - &expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        let ref_absmax: f32 = expected.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        let tolerance = match self.tolerance(name, tol)? {
            Tol::Exact => 0.0,
            Tol::Abs(t) => t,
            Tol::Trajectory => (5e-3f32).max(1e-4 * ref_absmax),
        };
        self.checks.push(Check {
            name: name.to_string(),
            max_abs,
            ref_absmax,
            tolerance,
        });
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
            tolerance: match self.tolerance(name, Tol::Exact)? {
                Tol::Abs(t) => t,
                _ => 0.0,
            },
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

/// Case files: every `*.json` with a string `kind` and a `settings` object, outside model folders
/// (a folder with a `model_index.json`; its `tiny_init.json` has a `kind` too).
fn discover(root: &Path) -> Result<Vec<(PathBuf, String, Value)>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                if !path.join("model_index.json").is_file() {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "json") {
                let value: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                    .with_context(|| path.display().to_string())?;
                let kind = value
                    .get("kind")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                if let (Some(kind), true) =
                    (kind, value.get("settings").is_some_and(Value::is_object))
                {
                    found.push((path, kind, value));
                }
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn device() -> Result<Device> {
    let spec: storyfarm_diffusion::device::DeviceSpec =
        match std::env::var("STORYFARM_GOLDEN_DEVICE") {
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
    for (path, kind, json) in cases {
        let rel = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        if filter.as_ref().is_some_and(|f| !rel.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let started = std::time::Instant::now();
        let result = (|| -> Result<Case> {
            let tensors =
                candle_core::safetensors::load(path.with_extension("safetensors"), &device)
                    .with_context(|| format!("{rel}: tensors"))?;
            let settings = json["settings"].clone();
            let mut case = Case {
                device: device.clone(),
                root: root.clone(),
                path: path.clone(),
                kind: kind.clone(),
                json,
                settings,
                tensors,
                checks: Vec::new(),
                notes: Vec::new(),
            };
            cases::run(&mut case)?;
            Ok(case)
        })();
        match result {
            Ok(case) => {
                let ok = !case.checks.is_empty() && case.checks.iter().all(Check::passed);
                println!(
                    "{} {rel} ({kind}, {:.1}s)",
                    if ok { "PASS" } else { "FAIL" },
                    started.elapsed().as_secs_f32()
                );
                for note in &case.notes {
                    println!("    note {note}");
                }
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
                println!(
                    "FAIL {rel} ({kind}): {}",
                    message.lines().next().unwrap_or("")
                );
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
        println!(
            "{} of {ran} golden cases failed: {}",
            failed.len(),
            failed.join(", ")
        );
        ExitCode::FAILURE
    }
}
