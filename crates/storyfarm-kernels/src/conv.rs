//! 2-D convolution as im2col + gemm straight into an NCHW output that was prefilled with bias,
//! a per-(item, channel) addend (a ResNet block's time embedding) and/or a residual map. Unlike
//! candle's tiled CPU path it never reorders the weight or the input per call: the im2col rows
//! of channel `c` are shifted copies of its plane, and `[out, in, kh, kw]` already is the
//! `[out, in*kh*kw]` left operand. 1x1 stride-1 convolutions use the input as is.

use candle_core::{bail, Tensor};
use rayon::prelude::*;

use crate::matmul::{gemm, prefill, with_bias_residual, Mat, PackedWeight};
use crate::view::{output, F32View};
use crate::Result;

/// im2col tiles hold at most this many elements (16 MiB; tiny in tests to exercise tiling).
const MAX_COL_ELEMS: usize = if cfg!(test) { 4096 } else { 4 << 20 };

/// `conv2d(x, weight) + bias[c] + channel_add[b, c] + residual[b, c, y, x]` (each optional);
/// `x` `[B, Cin, H, W]`, `weight` `[Cout, Cin, kh, kw]`, symmetric zero `padding`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    channel_add: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    conv(
        x,
        Weight::Tensor(weight),
        bias,
        stride,
        padding,
        channel_add,
        residual,
    )
}

/// [`conv2d`] with the weight packed at load by [`PackedWeight::conv`]; the im2col panels
/// are then built straight in the sgemm's packed layout, with no im2col matrix in between.
pub fn conv2d_packed(
    x: &Tensor,
    weight: &PackedWeight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    channel_add: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    conv(
        x,
        Weight::Packed(weight),
        bias,
        stride,
        padding,
        channel_add,
        residual,
    )
}

enum Weight<'a> {
    Tensor(&'a Tensor),
    Packed(&'a PackedWeight),
}

fn conv(
    x: &Tensor,
    weight: Weight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    channel_add: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = match weight {
        Weight::Tensor(t) => t.dims4()?,
        Weight::Packed(p) => match *p.dims() {
            [o, i, kh, kw] => (o, i, kh, kw),
            _ => bail!(
                "conv2d_packed: weight {:?} is not a convolution weight",
                p.dims()
            ),
        },
    };
    if wcin != cin || stride == 0 {
        bail!(
            "conv2d: input {:?}, weight [{cout}, {wcin}, {kh}, {kw}], stride {stride}",
            x.dims()
        );
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("conv2d: kernel larger than the padded input");
    }
    let ho = (h + 2 * padding - kh) / stride + 1;
    let wo = (w + 2 * padding - kw) / stride + 1;
    let plane = ho * wo;
    let k = cin * kh * kw;
    let xv = F32View::new(&x)?;
    let xs = xv.slice();

    let mut dst = vec![0f32; b * cout * plane];
    with_bias_residual(bias, residual, |bias, res| {
        prefill(&mut dst, plane, bias, true, res);
        Ok(())
    })?;
    if let Some(add) = channel_add {
        let add = add.contiguous()?;
        if add.elem_count() != b * cout {
            bail!(
                "conv2d: channel_add {:?} for output [{b}, {cout}, ..]",
                add.dims()
            );
        }
        let av = F32View::new(&add)?;
        let a = av.slice();
        dst.par_chunks_mut(plane)
            .zip(a.par_iter())
            .for_each(|(row, v)| {
                row.iter_mut().for_each(|x| *x += v);
            });
    }

    let direct = kh == 1 && kw == 1 && stride == 1 && padding == 0;
    #[cfg(target_arch = "x86_64")]
    if let Some(pw) = match weight {
        Weight::Packed(p) => p.for_dims((cout, k)),
        Weight::Tensor(_) => None,
    } {
        use crate::sgemm::{sgemm_ops, Lhs, Rhs};
        let mut done = true;
        for item in 0..b {
            let x_item = &xs[item * cin * h * w..][..cin * h * w];
            let dst_item = dst[item * cout * plane..].as_mut_ptr();
            let geom = Geometry {
                h,
                w,
                kh,
                kw,
                stride,
                padding,
                wo,
                r0: 0,
                rows: ho,
            };
            let fill = |panel: &mut [f32], pc: usize, kc: usize, j0: usize, cols: usize| {
                fill_panel(x_item, panel, pc, kc, j0, cols, &geom);
            };
            let rhs = if direct {
                Rhs::Mat(Mat {
                    ptr: x_item.as_ptr(),
                    rs: plane as isize,
                    cs: 1,
                })
            } else {
                Rhs::Fill(&fill)
            };
            // SAFETY: `pw` is the weight packed by `pack_lhs_all` for (cout, k) (checked by
            // `for_dims`); the right operand is this item's contiguous `[cin, h * w]` input
            // (`[k, plane]` when `direct`) or `fill`'s safe im2col panels; `dst_item` is this
            // item's `[cout, plane]` block of the owned output.
            done &= unsafe {
                sgemm_ops(
                    cout,
                    plane,
                    k,
                    dst_item,
                    plane as isize,
                    true,
                    Lhs::Packed(pw),
                    rhs,
                    1.0,
                    true,
                )
            };
        }
        // Only the first item can fail (no AVX-512F nor AVX2), before anything was written.
        if done {
            return output(dst, (b, cout, ho, wo));
        }
    }
    let weight = match weight {
        Weight::Tensor(t) => t.contiguous()?,
        Weight::Packed(p) => p.unpack()?,
    };
    let wv = F32View::new(&weight)?;
    let ws = wv.slice();
    let rows_per_tile = (MAX_COL_ELEMS / (k * wo).max(1)).clamp(1, ho);
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0f32; k * rows_per_tile * wo]
    };
    for item in 0..b {
        let x_item = &xs[item * cin * h * w..][..cin * h * w];
        let dst_item = dst[item * cout * plane..].as_mut_ptr();
        if direct {
            // SAFETY: the contiguous `[cout, cin]` weight (`k == cin` for 1x1) times this item's
            // contiguous `[cin, plane]` input into its `[cout, plane]` block of the owned output.
            unsafe {
                gemm(
                    cout,
                    plane,
                    cin,
                    dst_item,
                    plane as isize,
                    1,
                    true,
                    Mat {
                        ptr: ws.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: x_item.as_ptr(),
                        rs: plane as isize,
                        cs: 1,
                    },
                    1.0,
                    true,
                );
            }
            continue;
        }
        let mut r0 = 0;
        while r0 < ho {
            let rows = rows_per_tile.min(ho - r0);
            let p = rows * wo;
            let geom = Geometry {
                h,
                w,
                kh,
                kw,
                stride,
                padding,
                wo,
                r0,
                rows,
            };
            col[..k * p]
                .par_chunks_mut(kh * kw * p)
                .enumerate()
                .for_each(|(c, chunk)| {
                    im2col_channel(&x_item[c * h * w..][..h * w], chunk, &geom);
                });
            // SAFETY: the contiguous `[cout, k]` weight times the `[k, p]` im2col tile (`col`
            // holds `k * rows_per_tile * wo >= k * p` floats) into output rows r0..r0 + rows of
            // this item's `[cout, plane]` block: element (o, j) at `(r0 * wo + j) + o * plane`,
            // with `r0 * wo + p <= plane`.
            unsafe {
                gemm(
                    cout,
                    p,
                    k,
                    dst_item.add(r0 * wo),
                    plane as isize,
                    1,
                    true,
                    Mat {
                        ptr: ws.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: col.as_ptr(),
                        rs: p as isize,
                        cs: 1,
                    },
                    1.0,
                    true,
                );
            }
            r0 += rows;
        }
    }
    output(dst, (b, cout, ho, wo))
}

struct Geometry {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    wo: usize,
    r0: usize,
    rows: usize,
}

/// Rows `pc..pc + kc`, columns `j0..j0 + cols` of the im2col matrix of one item `x` `[Cin, H,
/// W]` (all output rows) as an sgemm panel `[kc][panel.len() / kc]`.
#[cfg(target_arch = "x86_64")]
fn fill_panel(
    x: &[f32],
    panel: &mut [f32],
    pc: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    g: &Geometry,
) {
    let width = panel.len() / kc;
    let taps = g.kh * g.kw;
    // The (channel, tap row, tap column) of row pc, stepped instead of divided per row.
    let (mut c, mut i, mut j) = (pc / taps, pc % taps / g.kw, pc % g.kw);
    for out in panel.chunks_exact_mut(width).take(kc) {
        let src = &x[c * g.h * g.w..][..g.h * g.w];
        let mut t = 0;
        while t < cols {
            let pix = j0 + t;
            let (oy, ox0) = (pix / g.wo, pix % g.wo);
            let run = (g.wo - ox0).min(cols - t);
            let o = &mut out[t..t + run];
            let iy = (oy * g.stride + i) as isize - g.padding as isize;
            if iy < 0 || iy >= g.h as isize {
                o.fill(0.0);
            } else {
                let row = &src[iy as usize * g.w..][..g.w];
                if g.stride == 1 {
                    // Output column ox reads input column ox + j - padding.
                    let lo = g.padding.saturating_sub(j + ox0).min(run);
                    let hi = (g.w + g.padding).saturating_sub(j + ox0).min(run).max(lo);
                    o[..lo].fill(0.0);
                    o[hi..].fill(0.0);
                    let s0 = ox0 + lo + j - g.padding;
                    o[lo..hi].copy_from_slice(&row[s0..s0 + hi - lo]);
                } else {
                    for (d, v) in o.iter_mut().enumerate() {
                        let ix = ((ox0 + d) * g.stride + j) as isize - g.padding as isize;
                        *v = if ix >= 0 && ix < g.w as isize {
                            row[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
            t += run;
        }
        j += 1;
        if j == g.kw {
            j = 0;
            i += 1;
            if i == g.kh {
                i = 0;
                c += 1;
            }
        }
    }
}

/// The `kh * kw` im2col rows of one input channel for output rows `r0..r0 + rows`.
fn im2col_channel(plane: &[f32], out: &mut [f32], g: &Geometry) {
    let p = g.rows * g.wo;
    for i in 0..g.kh {
        for j in 0..g.kw {
            let row = &mut out[(i * g.kw + j) * p..][..p];
            for (t, oy) in (g.r0..g.r0 + g.rows).enumerate() {
                let o = &mut row[t * g.wo..][..g.wo];
                let iy = (oy * g.stride + i) as isize - g.padding as isize;
                if iy < 0 || iy >= g.h as isize {
                    o.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * g.w..][..g.w];
                if g.stride == 1 {
                    // Output column ox reads input column ox + j - padding.
                    let lo = g.padding.saturating_sub(j).min(g.wo);
                    let hi = (g.w + g.padding).saturating_sub(j).min(g.wo).max(lo);
                    o[..lo].fill(0.0);
                    o[hi..].fill(0.0);
                    let s0 = lo + j - g.padding;
                    o[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                } else {
                    for (ox, v) in o.iter_mut().enumerate() {
                        let ix = (ox * g.stride + j) as isize - g.padding as isize;
                        *v = if ix >= 0 && ix < g.w as isize {
                            src[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};

    #[test]
    fn conv2d_matches_candle() {
        for &(cin, cout, h, w, k, stride, pad) in &[
            (3, 5, 7, 6, 3, 1, 1),
            (4, 6, 8, 8, 3, 2, 1),
            (5, 3, 6, 5, 1, 1, 0),
            (2, 3, 5, 5, 3, 1, 0),
            (300, 4, 9, 9, 3, 1, 1),   // several im2col tiles
            (40, 30, 12, 20, 3, 1, 1), // several k blocks; panels span output rows
            (7, 200, 11, 11, 3, 2, 1), // several row blocks, strided
            (64, 26, 10, 10, 1, 1, 0), // packed 1x1
        ] {
            let x = rand(&[2, cin, h, w], 1);
            let wt = rand(&[cout, cin, k, k], 2);
            let bias = rand(&[cout], 3);
            let want = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            let (ho, wo) = (want.dim(2).unwrap(), want.dim(3).unwrap());
            let add = rand(&[2, cout], 4);
            let res = rand(&[2, cout, ho, wo], 5);
            let want = want
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&add.reshape((2, cout, 1, 1)).unwrap())
                .unwrap()
                .add(&res)
                .unwrap();
            let got = conv2d(&x, &wt, Some(&bias), stride, pad, Some(&add), Some(&res)).unwrap();
            let err = max_abs(&got, &want);
            assert!(
                err < 1e-4,
                "{cin}->{cout} {h}x{w} k{k} s{stride} p{pad}: {err}"
            );
            let Some(packed) = PackedWeight::conv(&wt).unwrap() else {
                continue;
            };
            assert_eq!(max_abs(&packed.unpack().unwrap(), &wt), 0.0);
            let got = conv2d_packed(
                &x,
                &packed,
                Some(&bias),
                stride,
                pad,
                Some(&add),
                Some(&res),
            )
            .unwrap();
            let err = max_abs(&got, &want);
            assert!(
                err < 1e-4,
                "packed {cin}->{cout} {h}x{w} k{k} s{stride} p{pad}: {err}"
            );
        }
    }
}
