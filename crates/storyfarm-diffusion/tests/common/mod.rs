//! Helpers shared by the integration tests on the tiny models: loading a bundled model, comparing
//! tensors, a progress callback that ignores progress.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use storyfarm_diffusion::model::{HubOptions, ModelFolder};
use storyfarm_diffusion::pipeline::{Progress, StableDiffusion};

pub fn load(model: &str) -> StableDiffusion {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(model);
    let folder = ModelFolder::open(dir.to_str().unwrap(), &HubOptions::default()).unwrap();
    StableDiffusion::load(&folder, DType::F32, &Device::Cpu).unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn absmax(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn no_progress(_: Progress) -> storyfarm_diffusion::Result<()> {
    Ok(())
}
