//! AdaIN on `[B, N, C]` tokens without a head split: per (item, channel) mean and standard
//! deviation over the tokens in one pass over the rows, and the restyle
//! `(x - mean) / std * target_std + target_mean` in one more. A head's `(head, d)` channel is
//! channel `head * d + d` of the tokens, so the statistics are those of the `[B, H, N, d]` view.

use candle_core::{bail, Tensor};
use rayon::prelude::*;

use crate::simd::multiversion;
use crate::view::{output, F32View};
use crate::Result;

multiversion! {
    /// `acc[c] += (row[c] - shift[c])` and `sq[c] += (row[c] - shift[c])^2` over `rows`.
    fn accumulate(rows: &[f32], shift: &[f32], acc: &mut [f64], sq: &mut [f64]) {
        let c = shift.len();
        // f32 partial sums per block of rows, flushed to f64: vectorised and still accurate
        // over thousands of tokens.
        let mut ps = vec![0f32; c];
        let mut pq = vec![0f32; c];
        for block in rows.chunks(64 * c) {
            ps.fill(0.0);
            pq.fill(0.0);
            for row in block.chunks_exact(c) {
                for i in 0..c {
                    let x = row[i] - shift[i];
                    ps[i] += x;
                    pq[i] += x * x;
                }
            }
            for i in 0..c {
                acc[i] += ps[i] as f64;
                sq[i] += pq[i] as f64;
            }
        }
    }
}

/// Mean and standard deviation over the tokens of `x` `[B, N, C]`, per (item, channel), each
/// `[B, 1, C]`: unbiased variance, `eps` added before the square root (StyleAligned's
/// `calc_mean_std`).
pub fn token_mean_std(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let (b, n, c) = x.dims3()?;
    let xv = F32View::new(&x)?;
    let xs = xv.slice();
    // One task per (item, channel slab) keeps both cores busy for a batch of one or two.
    let slab = c.div_ceil(4).max(1);
    let slabs = c.div_ceil(slab);
    let parts: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..b * slabs)
        .into_par_iter()
        .map(|task| {
            let (item, s) = (task / slabs, task % slabs);
            let (c0, w) = (s * slab, slab.min(c - s * slab));
            let item_x = &xs[item * n * c..][..n * c];
            let mut sum = vec![0f64; w];
            let mut sq = vec![0f64; w];
            let zero = vec![0f32; w];
            strided(item_x, c, c0, w, &zero, &mut sum, &mut sq);
            let mean: Vec<f32> = sum.iter().map(|&s| (s / n as f64) as f32).collect();
            // Second pass around the mean, as the reference computes the variance.
            let (mut ds, mut dq) = (vec![0f64; w], vec![0f64; w]);
            strided(item_x, c, c0, w, &mean, &mut ds, &mut dq);
            let denom = (n.max(2) - 1) as f64;
            let std: Vec<f32> = ds
                .iter()
                .zip(&dq)
                .map(|(&s, &q)| {
                    let var = ((q - s * s / n as f64) / denom).max(0.0);
                    (var + eps).sqrt() as f32
                })
                .collect();
            (item, c0, mean, std)
        })
        .collect();
    let mut mean = vec![0f32; b * c];
    let mut std = vec![0f32; b * c];
    for (item, c0, m, s) in parts {
        mean[item * c + c0..][..m.len()].copy_from_slice(&m);
        std[item * c + c0..][..s.len()].copy_from_slice(&s);
    }
    Ok((output(mean, (b, 1, c))?, output(std, (b, 1, c))?))
}

/// Sums over the rows of `x` (row length `c`) of columns `c0..c0 + w`.
fn strided(
    x: &[f32],
    c: usize,
    c0: usize,
    w: usize,
    shift: &[f32],
    sum: &mut [f64],
    sq: &mut [f64],
) {
    if c0 == 0 && w == c {
        accumulate(x, shift, sum, sq);
        return;
    }
    let mut slab = Vec::with_capacity(64 * w);
    for rows in x.chunks(64 * c) {
        slab.clear();
        for row in rows.chunks_exact(c) {
            slab.extend_from_slice(&row[c0..c0 + w]);
        }
        accumulate(&slab, shift, sum, sq);
    }
}

multiversion! {
    fn restyle_row(src: &[f32], dst: &mut [f32], mean: &[f32], std: &[f32], tmean: &[f32], tstd: &[f32]) {
        for i in 0..dst.len() {
            dst[i] = (src[i] - mean[i]) / std[i] * tstd[i] + tmean[i];
        }
    }
}

/// `(x - mean) / std * target_std + target_mean` for `x` `[B, N, C]` and per-(item, channel)
/// statistics of `B * C` elements each (`[B, 1, C]` or `[B, C]`).
pub fn restyle(
    x: &Tensor,
    mean: &Tensor,
    std: &Tensor,
    target_mean: &Tensor,
    target_std: &Tensor,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, n, c) = x.dims3()?;
    let stats = [mean, std, target_mean, target_std].map(|t| t.contiguous());
    let [m, s, tm, ts] = stats;
    let (m, s, tm, ts) = (m?, s?, tm?, ts?);
    for t in [&m, &s, &tm, &ts] {
        if t.elem_count() != b * c {
            bail!(
                "restyle: statistics {:?} for tokens {:?}",
                t.dims(),
                x.dims()
            );
        }
    }
    let (mv, sv, tmv, tsv, xv) = (
        F32View::new(&m)?,
        F32View::new(&s)?,
        F32View::new(&tm)?,
        F32View::new(&ts)?,
        F32View::new(&x)?,
    );
    let (ms, ss, tms, tss) = (mv.slice(), sv.slice(), tmv.slice(), tsv.slice());
    let mut dst = vec![0f32; b * n * c];
    let rows_per_task = (16384 / c.max(1)).max(1);
    dst.par_chunks_mut(rows_per_task * c)
        .zip(xv.slice().par_chunks(rows_per_task * c))
        .enumerate()
        .for_each(|(task, (d, src))| {
            for (i, (d, src)) in d.chunks_mut(c).zip(src.chunks(c)).enumerate() {
                let item = (task * rows_per_task + i) / n;
                let at = item * c;
                restyle_row(
                    src,
                    d,
                    &ms[at..at + c],
                    &ss[at..at + c],
                    &tms[at..at + c],
                    &tss[at..at + c],
                );
            }
        });
    output(dst, (b, n, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};

    fn reference(x: &Tensor) -> (Tensor, Tensor) {
        let n = x.dim(1).unwrap();
        let mean = x.mean_keepdim(1).unwrap();
        let var = (x
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            / (n - 1) as f64)
            .unwrap();
        (mean, (var + 1e-5).unwrap().sqrt().unwrap())
    }

    #[test]
    fn statistics_and_restyle_match_candle_ops() {
        for (b, n, c) in [(2, 37, 12), (1, 300, 40), (3, 5, 1)] {
            let x = ((rand(&[b, n, c], 1) * 3.0).unwrap() + 0.7).unwrap();
            let (m, s) = token_mean_std(&x, 1e-5).unwrap();
            let (wm, ws) = reference(&x);
            assert!(
                max_abs(&m, &wm) < 1e-5 && max_abs(&s, &ws) < 1e-5,
                "{b}x{n}x{c}"
            );
            let tm = rand(&[b, 1, c], 2);
            let ts = (rand(&[b, 1, c], 3).abs().unwrap() + 0.5).unwrap();
            let want = x
                .broadcast_sub(&wm)
                .unwrap()
                .broadcast_div(&ws)
                .unwrap()
                .broadcast_mul(&ts)
                .unwrap()
                .broadcast_add(&tm)
                .unwrap();
            let got = restyle(&x, &m, &s, &tm, &ts).unwrap();
            assert!(max_abs(&got, &want) < 1e-5, "{b}x{n}x{c}");
        }
    }
}
