//! GroupNorm split in two so a hook can replace the statistics in between:
//! [`group_norm_stats`] gives per-(item, group) mean and biased variance, and
//! [`group_norm_apply`] normalises with whatever statistics it is given, applies the affine
//! and optionally SiLU, in one pass.

use candle_core::{bail, Tensor};
use rayon::prelude::*;

use crate::simd::{multiversion, silu};
use crate::view::{output, F32View, SendPtr};
use crate::Result;

multiversion! {
    /// Sum of `xs - shift` and of its squares, in f32 lanes flushed to f64 every block.
    fn sums(xs: &[f32], shift: f32) -> (f64, f64) {
        let (mut s, mut q) = (0f64, 0f64);
        for block in xs.chunks(4096) {
            let mut ls = [0f32; 16];
            let mut lq = [0f32; 16];
            let mut it = block.chunks_exact(16);
            for c in &mut it {
                for l in 0..16 {
                    let d = c[l] - shift;
                    ls[l] += d;
                    lq[l] += d * d;
                }
            }
            for &v in it.remainder() {
                let d = v - shift;
                ls[0] += d;
                lq[0] += d * d;
            }
            s += ls.iter().map(|&v| v as f64).sum::<f64>();
            q += lq.iter().map(|&v| v as f64).sum::<f64>();
        }
        (s, q)
    }
}

/// Per-(item, group) mean and biased variance of `x` `[B, C, ..]`, each `B * groups` long.
pub fn group_norm_stats(x: &Tensor, groups: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let x = x.contiguous()?;
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {c} channels in {groups} groups");
    }
    let len = x.elem_count() / (b * groups);
    let xv = F32View::new(&x)?;
    let stats: Vec<(f32, f32)> = xv
        .slice()
        .par_chunks(len.max(1))
        .map(|g| {
            let (s, _) = sums(g, 0.0);
            let mean = s / len as f64;
            // Second pass around the mean, as the centred reference computes the variance.
            let (ds, dq) = sums(g, mean as f32);
            let var = (dq - ds * ds / len as f64) / len as f64;
            (mean as f32, var.max(0.0) as f32)
        })
        .collect();
    Ok(stats.into_iter().unzip())
}

multiversion! {
    fn affine(src: &[f32], dst: &mut [f32], a: f32, b: f32, act: bool) {
        if act {
            dst.iter_mut().zip(src).for_each(|(d, &x)| *d = silu(x * a + b));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x * a + b);
        }
    }
}

/// `((x - mean) / sqrt(var + eps)) * weight[c] + bias[c]`, then SiLU if `silu`; `mean`/`var`
/// per (item, group) as [`group_norm_stats`] returns them.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply(
    x: &Tensor,
    groups: usize,
    mean: &[f32],
    var: &[f32],
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 || mean.len() != b * groups || var.len() != b * groups {
        bail!(
            "group_norm: {c} channels, {groups} groups, {} statistics",
            mean.len()
        );
    }
    let spatial = x.elem_count() / (b * c);
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let (wv, bv, xv) = (
        F32View::new(&weight)?,
        F32View::new(&bias)?,
        F32View::new(&x)?,
    );
    let (w, bs) = (wv.slice(), bv.slice());
    if w.len() != c || bs.len() != c {
        bail!("group_norm: affine of {} for {c} channels", w.len());
    }
    let mut dst = vec![0f32; x.elem_count()];
    let out = SendPtr(dst.as_mut_ptr());
    let per_group = c / groups;
    // One task per (item, channel) plane; planes are disjoint in `dst`.
    xv.slice()
        .par_chunks(spatial.max(1))
        .enumerate()
        .for_each(|(plane, src)| {
            let (item, ch) = (plane / c, plane % c);
            let stat = item * groups + ch / per_group;
            let inv = 1.0 / ((var[stat] as f64 + eps).sqrt() as f32);
            let a = w[ch] * inv;
            let shift = bs[ch] - mean[stat] * a;
            // Rebinding captures the whole `Send` wrapper rather than its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let out = out;
            // SAFETY: plane `plane` of `dst` (`x.elem_count()` floats, `plane * spatial +
            // spatial` at most that, as `src` is that plane of `x`), written by this task only;
            // `dst` is not otherwise accessed until the loop has ended.
            let d = unsafe { std::slice::from_raw_parts_mut(out.0.add(plane * spatial), spatial) };
            affine(src, d, a, shift, silu);
        });
    output(dst, x.dims())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};
    use candle_core::D;

    #[test]
    fn group_norm_matches_candle_ops() {
        let (b, c, h, w, g) = (2, 12, 5, 3, 4);
        let x = ((rand(&[b, c, h, w], 1) * 3.0).unwrap() + 1.5).unwrap();
        let weight = rand(&[c], 2);
        let bias = rand(&[c], 3);
        let grouped = x.reshape((b, g, ())).unwrap();
        let mean = grouped.mean_keepdim(D::Minus1).unwrap();
        let centered = grouped.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = centered
            .broadcast_div(&(var.clone() + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((b, c, h, w))
            .unwrap()
            .broadcast_mul(&weight.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        let (m, v) = group_norm_stats(&x, g).unwrap();
        let want_m: Vec<f32> = mean.flatten_all().unwrap().to_vec1().unwrap();
        let want_v: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..b * g {
            assert!((m[i] - want_m[i]).abs() < 1e-5 && (v[i] - want_v[i]).abs() < 1e-4);
        }
        let got = group_norm_apply(&x, g, &m, &v, 1e-5, &weight, &bias, false).unwrap();
        assert!(max_abs(&got, &want) < 1e-5);
        let got = group_norm_apply(&x, g, &m, &v, 1e-5, &weight, &bias, true).unwrap();
        assert!(max_abs(&got, &want.silu().unwrap()) < 1e-5);
    }
}
