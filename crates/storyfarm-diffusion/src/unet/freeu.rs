//! FreeU's skip-connection filter and backbone scaling, as diffusers' `apply_freeu` runs them.
//!
//! diffusers' `fourier_filter(x, threshold=1, scale)` takes a 2-D FFT over (H, W), shifts it,
//! multiplies the 2x2 centre box by `scale` and transforms back. After the shift the centre box
//! holds exactly the frequencies {-1, 0} x {-1, 0} whatever the parity of H and W, so the filter
//! is `x + (scale - 1) * Re(P x)` where `P` projects onto those four Fourier modes. That projection
//! is a handful of weighted sums, computed here in f64 with tensor ops (so it runs on any device)
//! instead of a whole FFT.

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor};

use crate::attention::FreeU;
use crate::error::Result;

/// `apply_freeu(resolution_idx, hidden, skip)`: returns the scaled backbone and filtered skip for
/// up block `index` (0 and 1 are changed, the others pass through).
pub fn apply(
    freeu: &FreeU,
    index: usize,
    hidden: &Tensor,
    skip: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, s) = match index {
        0 => (freeu.b1, freeu.s1),
        1 => (freeu.b2, freeu.s2),
        _ => return Ok((hidden.clone(), skip.clone())),
    };
    let channels = hidden.dim(1)?;
    let half = channels / 2;
    let scaled = (hidden.narrow(1, 0, half)? * b)?;
    let hidden = Tensor::cat(&[&scaled, &hidden.narrow(1, half, channels - half)?], 1)?;
    Ok((hidden, fourier_filter(skip, s)?))
}

/// `fourier_filter(x, threshold=1, scale)` over `[B, C, H, W]`.
pub fn fourier_filter(x: &Tensor, scale: f64) -> Result<Tensor> {
    let (bsz, ch, h, w) = x.dims4()?;
    let device = x.device();
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F64)?;
    // Mode -1 along an axis of length n: e^{+2 pi i m / n} in the forward transform.
    let basis = |n: usize, device: &Device| -> Result<(Tensor, Tensor)> {
        let angles: Vec<f64> = (0..n).map(|m| 2.0 * PI * m as f64 / n as f64).collect();
        let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
        Ok((
            Tensor::from_vec(cos, n, device)?,
            Tensor::from_vec(sin, n, device)?,
        ))
    };
    let (cos_h, sin_h) = basis(h, device)?;
    let (cos_w, sin_w) = basis(w, device)?;
    let col = |t: &Tensor, n: usize| t.reshape((n, 1));

    let rows = xf.sum(3)?; // [B, C, H]
    let cols = xf.sum(2)?; // [B, C, W]
    let total = rows.sum(2)?; // [B, C]
    let flat_rows = rows.reshape((bsz * ch, h))?;
    let flat_cols = cols.reshape((bsz * ch, w))?;
    let r_re = flat_rows.matmul(&col(&cos_h, h)?)?; // [BC, 1]
    let r_im = flat_rows.matmul(&col(&sin_h, h)?)?;
    let c_re = flat_cols.matmul(&col(&cos_w, w)?)?;
    let c_im = flat_cols.matmul(&col(&sin_w, w)?)?;
    // Mode (-1, -1): Z = sum x e^{i(theta_m + phi_n)}.
    let flat = xf.reshape((bsz * ch * h, w))?;
    let xc = flat.matmul(&col(&cos_w, w)?)?.reshape((bsz * ch, h))?;
    let xs = flat.matmul(&col(&sin_w, w)?)?.reshape((bsz * ch, h))?;
    let cc = xc.matmul(&col(&cos_h, h)?)?;
    let sc = xc.matmul(&col(&sin_h, h)?)?;
    let cs = xs.matmul(&col(&cos_h, h)?)?;
    let ss = xs.matmul(&col(&sin_h, h)?)?;
    let z_re = (&cc - &ss)?;
    let z_im = (&sc + &cs)?;

    let row_h = |t: &Tensor| t.reshape((1, h));
    let row_w = |t: &Tensor| t.reshape((1, w));
    // Inverse transform of the four modes, real part, per (item, channel): [BC, H, W].
    let term_rows = (r_re.matmul(&row_h(&cos_h)?)? + r_im.matmul(&row_h(&sin_h)?)?)?; // [BC, H]
    let term_cols = (c_re.matmul(&row_w(&cos_w)?)? + c_im.matmul(&row_w(&sin_w)?)?)?; // [BC, W]
    let cos_cos = col(&cos_h, h)?.matmul(&row_w(&cos_w)?)?;
    let sin_sin = col(&sin_h, h)?.matmul(&row_w(&sin_w)?)?;
    let sin_cos = col(&sin_h, h)?.matmul(&row_w(&cos_w)?)?;
    let cos_sin = col(&cos_h, h)?.matmul(&row_w(&sin_w)?)?;
    let cos_sum = (&cos_cos - &sin_sin)?.reshape((1, h, w))?; // cos(theta + phi)
    let sin_sum = (&sin_cos + &cos_sin)?.reshape((1, h, w))?; // sin(theta + phi)
    let low = z_re
        .reshape((bsz * ch, 1, 1))?
        .broadcast_mul(&cos_sum)?
        .add(&z_im.reshape((bsz * ch, 1, 1))?.broadcast_mul(&sin_sum)?)?
        .broadcast_add(&term_rows.reshape((bsz * ch, h, 1))?)?
        .broadcast_add(&term_cols.reshape((bsz * ch, 1, w))?)?
        .broadcast_add(&total.reshape((bsz * ch, 1, 1))?)?;
    let delta = (low * ((scale - 1.0) / (h * w) as f64))?.reshape((bsz, ch, h, w))?;
    Ok((xf + delta)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct 2-D DFT of the four modes, written from the definition, against the fast form;
    /// the golden ConsiStory cases check it against torch.fft.
    fn reference(x: &[f64], h: usize, w: usize, scale: f64) -> Vec<f64> {
        let mut out = x.to_vec();
        for (km, kn) in [(0i64, 0i64), (-1, 0), (0, -1), (-1, -1)] {
            let (mut re, mut im) = (0.0, 0.0);
            for m in 0..h {
                for n in 0..w {
                    let a = -2.0
                        * PI
                        * (km as f64 * m as f64 / h as f64 + kn as f64 * n as f64 / w as f64);
                    re += x[m * w + n] * a.cos();
                    im += x[m * w + n] * a.sin();
                }
            }
            for m in 0..h {
                for n in 0..w {
                    let a = 2.0
                        * PI
                        * (km as f64 * m as f64 / h as f64 + kn as f64 * n as f64 / w as f64);
                    out[m * w + n] +=
                        (scale - 1.0) * (re * a.cos() - im * a.sin()) / (h * w) as f64;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_four_mode_dft() {
        for (h, w) in [(8, 8), (5, 7), (6, 3)] {
            let n = 2 * h * w;
            let v: Vec<f32> =
                crate::noise::NoiseGenerator::new(h as u64 * 31 + w as u64).normal_vec(n);
            let x = Tensor::from_vec(v.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
            let got = fourier_filter(&x, 0.4)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for c in 0..2 {
                let plane: Vec<f64> = v[c * h * w..(c + 1) * h * w]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let expected = reference(&plane, h, w, 0.4);
                for (g, e) in got[c * h * w..(c + 1) * h * w].iter().zip(&expected) {
                    assert!((*g as f64 - e).abs() < 1e-5, "{h}x{w}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn scale_one_is_the_identity_and_blocks_past_one_pass_through() {
        let x = Tensor::from_vec(
            crate::noise::NoiseGenerator::new(3).normal_vec(64),
            (1, 4, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let same = fourier_filter(&x, 1.0).unwrap();
        let diff: f32 = (same - &x)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6);
        let f = FreeU {
            s1: 0.6,
            s2: 0.4,
            b1: 1.1,
            b2: 1.2,
        };
        let (h, s) = apply(&f, 2, &x, &x).unwrap();
        let d: f32 = (h - &x)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let e: f32 = (s - &x)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!((d, e), (0.0, 0.0));
        let (h, _) = apply(&f, 0, &x, &x).unwrap();
        let v = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Channels 0-1 of 4 scaled by b1, 2-3 untouched.
        assert!((v[0] - 1.1 * xv[0]).abs() < 1e-6 && v[40] == xv[40]);
    }
}
