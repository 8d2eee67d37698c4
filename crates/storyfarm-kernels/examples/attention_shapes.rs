//! Times the fused attention kernel on the self-attention shapes of SD 1.5 at 64x64 latents
//! (8 heads) and SDXL at 128x128 latents (head size 64), 2 items, plain and with one extra key
//! block as StyleAligned's targets use it.
//! Prints wall and process CPU milliseconds per call and GFLOP/s.
//! `RAYON_NUM_THREADS=2 cargo run -p storyfarm-kernels --example attention_shapes`
use std::time::Instant;

use candle_core::{Device, Tensor};
use storyfarm_kernels::{attention, ExtraBlock};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // SD 1.5 at 512x512 (8 heads), then SDXL at 1024x1024 (head size 64: 10 and 20 heads).
    for &(n, c, heads) in &[
        (4096usize, 320usize, 8usize),
        (1024, 640, 8),
        (256, 1280, 8),
        (4096, 640, 10),
        (1024, 1280, 20),
    ] {
        let d = c / heads;
        let q = Tensor::randn(0f32, 1.0, (2, n, c), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, n, c), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, n, c), &dev)?;
        let ek = Tensor::randn(0f32, 1.0, (2, n, c), &dev)?;
        let ev = Tensor::randn(0f32, 1.0, (2, n, c), &dev)?;
        let items = [0usize, 1];
        let scale = 1.0 / (d as f32).sqrt();
        for with_extra in [false, true] {
            let extra = [ExtraBlock {
                items: &items,
                keys: &ek,
                values: &ev,
                logit_bias: 0.0,
                key_mask: None,
            }];
            let blocks: &[ExtraBlock] = if with_extra { &extra } else { &[] };
            attention(&q, &k, &v, heads, scale, blocks)?;
            let reps = (4096 * 4096 / (n * n)).clamp(2, 20);
            let (w0, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..reps {
                attention(&q, &k, &v, heads, scale, blocks)?;
            }
            let wall = w0.elapsed().as_secs_f64() / reps as f64;
            let cpu = (cpu_seconds() - c0) / reps as f64;
            let keys = if with_extra { 2 * n } else { n };
            let flops = 2.0 * 2.0 * (2 * n * keys * c) as f64;
            println!(
                "N {n:>5} d {d:>3} keys {keys:>5}: wall {:>8.1} ms cpu {:>8.1} ms  {:>6.1} GFLOP/s",
                wall * 1e3,
                cpu * 1e3,
                flops / wall * 1e-9
            );
        }
    }
    Ok(())
}
