//! GEGLU's gate in one pass: `hidden * gelu_erf(gate)` from the `[.., 2 * inner]` projection
//! without materialising the two halves.

use candle_core::{bail, Tensor};
use rayon::prelude::*;

use crate::simd::{gelu_erf, multiversion};
use crate::view::{output, F32View};
use crate::Result;

multiversion! {
    fn gate_row(src: &[f32], dst: &mut [f32]) {
        let (hidden, gate) = src.split_at(dst.len());
        dst.iter_mut().zip(hidden.iter().zip(gate)).for_each(|(d, (&h, &g))| *d = h * gelu_erf(g));
    }
}

/// Gates sgemm tiles of `[16 hidden | 16 gate]` columns (before bias): `gated[i][l] =
/// (t[i][l] + bias[l]) * gelu_erf(t[i][16 + l] + bias[16 + l])`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn gate_tile_body(tile: &[f32], bias: &[f32], gated: &mut [f32]) {
    let (bh, bg) = bias[..32].split_at(16);
    for (t, g) in tile.chunks_exact(32).zip(gated.chunks_exact_mut(16)) {
        let (h, gt) = t.split_at(16);
        for ((o, (&h, &gv)), (&bh, &bg)) in
            g.iter_mut().zip(h.iter().zip(gt)).zip(bh.iter().zip(bg))
        {
            *o = (h + bh) * gelu_erf(gv + bg);
        }
    }
}

/// [`gate_tile_body`] at AVX-512 width (for the AVX-512 sgemm's tiles; the zip form lets it
/// vectorise across the 16 columns).
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA (the features enabled below; every AVX-512F
/// CPU has the other two). The slices are only indexed safely: `bias` needs 32 floats, and
/// short `tile`/`gated` end the loop early.
#[cfg(target_arch = "x86_64")]
#[cfg_attr(feature = "openblas", allow(dead_code))]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn gate_tile_avx512(tile: &[f32], bias: &[f32], gated: &mut [f32]) {
    gate_tile_body(tile, bias, gated)
}

/// [`gate_tile_body`] at AVX2 width, for the AVX2 sgemm's tiles.
///
/// # Safety
/// The CPU must support AVX2 and FMA. The slices are only indexed safely, as for
/// [`gate_tile_avx512`].
#[cfg(target_arch = "x86_64")]
#[cfg_attr(feature = "openblas", allow(dead_code))]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gate_tile_avx2(tile: &[f32], bias: &[f32], gated: &mut [f32]) {
    gate_tile_body(tile, bias, gated)
}

/// `x[.., :inner] * gelu_erf(x[.., inner:])` for `x` `[.., 2 * inner]`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let two = *x.dims().last().unwrap_or(&0);
    if two % 2 != 0 || two == 0 {
        bail!("geglu: last dim {two} is not even");
    }
    let inner = two / 2;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = inner;
    let xv = F32View::new(&x)?;
    let mut dst = vec![0f32; x.elem_count() / 2];
    dst.par_chunks_mut(inner)
        .zip(xv.slice().par_chunks(two))
        .for_each(|(d, s)| gate_row(s, d));
    output(dst, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};
    use candle_core::D;

    #[test]
    fn geglu_matches_candle_ops() {
        let x = (rand(&[2, 3, 10], 1) * 3.0).unwrap();
        let want = (x.narrow(D::Minus1, 0, 5).unwrap()
            * x.narrow(D::Minus1, 5, 5).unwrap().gelu_erf().unwrap())
        .unwrap();
        assert!(max_abs(&geglu(&x).unwrap(), &want) < 1e-5);
    }
}
