//! Times the fused linear and convolution kernels on SD-1.5 shapes at 64x64 latents (batch 2),
//! through whichever sgemm this build and CPU use. Prints wall and process CPU milliseconds per
//! call and GFLOP/s.
//! `RAYON_NUM_THREADS=2 cargo run -p storyfarm-kernels --example fused_shapes`
use std::time::Instant;

use candle_core::{Device, Tensor};
use storyfarm_kernels::PackedWeight;

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

fn time(
    name: &str,
    flops: f64,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    f()?;
    let reps = ((20e9 / flops).ceil() as usize).clamp(2, 50);
    let (w0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        f()?;
    }
    let wall = w0.elapsed().as_secs_f64() / reps as f64;
    let cpu = (cpu_seconds() - c0) / reps as f64;
    println!(
        "{name:<28} wall {:>8.1} ms cpu {:>8.1} ms {:>7.1} GFLOP/s",
        wall * 1e3,
        cpu * 1e3,
        flops / wall * 1e-9
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev);
    for &(c, side) in &[(320usize, 64usize), (640, 32), (1280, 16)] {
        let x = r(&[2, c, side, side])?;
        let w = r(&[c, c, 3, 3])?;
        let b = r(&[c])?;
        let flops = 2.0 * (2 * c * c * 9 * side * side) as f64;
        time(&format!("conv3x3 {c} at {side}"), flops, || {
            storyfarm_kernels::conv2d(&x, &w, Some(&b), 1, 1, None, None)
        })?;
        // The weight packed at load, as the UNet's layers hold it (no-op without AVX-512F or AVX2).
        if let Some(pw) = PackedWeight::conv(&w)? {
            time(&format!("conv3x3 {c} at {side} packed"), flops, || {
                storyfarm_kernels::conv2d_packed(&x, &pw, Some(&b), 1, 1, None, None)
            })?;
        }
        let t = r(&[2, side * side, c])?;
        let w1 = r(&[8 * c, c])?;
        let b1 = r(&[8 * c])?;
        let flops = 2.0 * (2 * side * side * 8 * c * c) as f64;
        time(&format!("geglu proj {c} at {side}"), flops, || {
            storyfarm_kernels::linear(&t, &w1, Some(&b1), None)
        })?;
        if let Some(pw1) = PackedWeight::linear(&w1)? {
            time(&format!("geglu proj {c} at {side} packed"), flops, || {
                storyfarm_kernels::linear_packed(&t, &pw1, Some(&b1), None)
            })?;
        }
        time(&format!("geglu proj+gate {c} at {side}"), flops, || {
            storyfarm_kernels::geglu(&storyfarm_kernels::linear(&t, &w1, Some(&b1), None)?)
        })?;
        if let Some(pg) = PackedWeight::geglu(&w1)? {
            time(
                &format!("geglu proj+gate {c} at {side} fused"),
                flops,
                || storyfarm_kernels::linear_geglu(&t, &pg, Some(&b1)),
            )?;
        }
        let t4 = r(&[2, side * side, 4 * c])?;
        let w2 = r(&[c, 4 * c])?;
        let flops = 2.0 * (2 * side * side * 4 * c * c) as f64;
        time(&format!("ff out {c} at {side}"), flops, || {
            storyfarm_kernels::linear(&t4, &w2, Some(&b), Some(&t))
        })?;
        if let Some(pw2) = PackedWeight::linear(&w2)? {
            time(&format!("ff out {c} at {side} packed"), flops, || {
                storyfarm_kernels::linear_packed(&t4, &pw2, Some(&b), Some(&t))
            })?;
        }
        let wq = r(&[c, c])?;
        let flops = 2.0 * (2 * side * side * c * c) as f64;
        time(&format!("to_q {c} at {side}"), flops, || {
            storyfarm_kernels::linear(&t, &wq, None, None)
        })?;
    }
    Ok(())
}
