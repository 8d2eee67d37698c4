//! Matrix products through `gemm` with arbitrary strides, writing into a destination that was
//! prefilled with bias (and residual), so `x W^T + b (+ r)` is one pass over the output; and the
//! linear layers built on it, including the token <-> channel-map transposes of a
//! Transformer2D's projections folded into the operand strides.

use candle_core::{bail, Tensor};
use rayon::prelude::*;

use crate::view::{output, F32View};
use crate::Result;

/// A strided row-major-or-not matrix operand: element (r, c) at `ptr + r * rs + c * cs`.
///
/// Only a description: the functions that read through it are `unsafe` and ask their callers
/// for a `ptr` valid for the rows and columns they read.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale * lhs[m, k] rhs[k, n]`.
///
/// # Safety
/// - For every `i < m`, `p < k`, `j < n`: `lhs.ptr + i * lhs.rs + p * lhs.cs` and `rhs.ptr +
///   p * rhs.rs + j * rhs.cs` must be valid for reads of an `f32`, and `dst + i * dst_rs + j *
///   dst_cs` for reads and writes, each inside the allocation its base pointer points into.
/// - Distinct `(i, j)` must address distinct `dst` elements (with `parallel` the product is
///   written from several threads), and no `dst` element may overlap an operand element.
/// - Nothing else may write the operands or access the destination until the call returns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    // SAFETY: the same product under this function's own contract.
    #[cfg(feature = "openblas")]
    if unsafe {
        openblas::sgemm(
            m, n, k, dst, dst_rs, dst_cs, accumulate, lhs, rhs, scale, parallel,
        )
    } {
        return;
    }
    // SAFETY: the same product under this function's own contract.
    #[cfg(target_arch = "x86_64")]
    if unsafe {
        crate::sgemm::sgemm(
            m, n, k, dst, dst_rs, dst_cs, accumulate, lhs, rhs, scale, parallel,
        )
    } {
        return;
    }
    let par = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `gemm::gemm` computes `dst = 1.0 * dst + scale * lhs rhs` (reading `dst` only
    // when `accumulate`) through the same elements, strides given (column, row); this
    // function's contract makes them valid and the destination elements distinct and
    // separate from the operands.
    unsafe {
        gemm::gemm(
            m, n, k, dst, dst_cs, dst_rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs,
            rhs.rs, 1.0, scale, false, false, false, par,
        );
    }
}

/// `cblas_sgemm` from the system OpenBLAS (Debian: `libopenblas-dev`), whose AVX-512 kernels
/// `gemm` only reaches on nightly. OpenBLAS runs single-threaded: a `parallel` product is split
/// into one `cblas_sgemm` per rayon thread (along the longer of m, n), so its threads never
/// compete with rayon's.
#[cfg(feature = "openblas")]
mod openblas {
    use std::os::raw::c_int;

    use rayon::prelude::*;

    use super::Mat;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;
    /// Below this many multiply-adds a product is not worth splitting across threads.
    const MIN_SPLIT_MACS: usize = 1 << 22;

    #[link(name = "openblas")]
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn openblas_set_num_threads(n: c_int);
    }

    /// (transpose flag, leading dimension) of a `rows x cols` operand, if BLAS can address it.
    fn layout(mat: Mat, rows: usize, cols: usize) -> Option<(c_int, c_int)> {
        let ld = |v: isize, min: usize| {
            c_int::try_from(v)
                .ok()
                .filter(|&l| l as usize >= min.max(1))
        };
        if mat.cs == 1 {
            ld(mat.rs, cols).map(|l| (NO_TRANS, l))
        } else if mat.rs == 1 {
            ld(mat.cs, rows).map(|l| (TRANS, l))
        } else {
            None
        }
    }

    /// Shares the block closure (raw operand pointers) across rayon tasks.
    struct Shared<F>(F);
    // SAFETY: only built around `sgemm`'s `call` closure, which captures (by reference) sizes,
    // flags and the raw operand pointers, none mutated while the tasks run; each task's call
    // reads the operands and writes its own block of `dst` (the split along m or n is
    // disjoint), within `sgemm`'s contract.
    unsafe impl<F> Sync for Shared<F> {}
    impl<F> Shared<F> {
        fn get(&self) -> &F {
            &self.0
        }
    }

    /// Computes the product if OpenBLAS can express the strides; `false` leaves it to `gemm`
    /// (nothing written).
    ///
    /// # Safety
    /// As for [`super::gemm`]. (Only the layouts checked below reach `cblas_sgemm`: unit
    /// column stride of `dst` with a row stride of at least `n`, operands with one unit stride
    /// and a leading dimension covering their rows or columns, sizes that fit a C `int`.)
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: isize,
        dst_cs: isize,
        accumulate: bool,
        lhs: Mat,
        rhs: Mat,
        scale: f32,
        parallel: bool,
    ) -> bool {
        let fits = |v: usize| c_int::try_from(v).is_ok();
        if m == 0 || n == 0 || k == 0 || !fits(m) || !fits(n) || !fits(k) || dst_cs != 1 {
            return false;
        }
        let (Some((ta, lda)), Some((tb, ldb))) = (layout(lhs, m, k), layout(rhs, k, n)) else {
            return false;
        };
        let Some(ldc) = c_int::try_from(dst_rs).ok().filter(|&l| l as usize >= n) else {
            return false;
        };
        static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();
        // SAFETY: a plain setter with no pointer arguments, called once before any product.
        SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
        let beta = if accumulate { 1.0 } else { 0.0 };
        let call = |m0: usize, rows: usize, n0: usize, cols: usize| {
            // SAFETY: rows m0..m0 + rows, columns n0..n0 + cols of the product (sub-blocks of
            // the `m x n` the contract makes valid, with the transpose flags and leading
            // dimensions `layout` derived from the strides); concurrent calls get disjoint
            // blocks of `dst`.
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    ta,
                    tb,
                    rows as c_int,
                    cols as c_int,
                    k as c_int,
                    scale,
                    lhs.ptr.offset(m0 as isize * lhs.rs),
                    lda,
                    rhs.ptr.offset(n0 as isize * rhs.cs),
                    ldb,
                    beta,
                    dst.offset(m0 as isize * dst_rs + n0 as isize),
                    ldc,
                );
            }
        };
        let threads = rayon::current_num_threads();
        if !parallel || threads < 2 || m * n * k < MIN_SPLIT_MACS {
            call(0, m, 0, n);
            return true;
        }
        let (len, split_m) = if m > n { (m, true) } else { (n, false) };
        let step = len.div_ceil(threads).next_multiple_of(16);
        let call = Shared(call);
        (0..len.div_ceil(step)).into_par_iter().for_each(|i| {
            let (s0, sl) = (i * step, step.min(len - i * step));
            let call = call.get();
            if split_m {
                call(s0, sl, 0, n)
            } else {
                call(0, m, s0, sl)
            }
        });
        true
    }
}

/// A layer's weight in the panel layout of our sgemm (the same at AVX-512 and AVX2 width), packed once when the layer is
/// built: the per-call products then read it as is instead of re-packing it for every call
/// and every im2col tile, and the layer need not keep the tensor as well. Only exists where
/// that sgemm runs (x86-64 with AVX-512F or AVX2+FMA, not the `openblas` build); elsewhere the
/// constructors return `None` and callers keep the tensor.
pub struct PackedWeight {
    data: Vec<f32>,
    /// The product dimensions it was packed for: `(rows, depth)` of a left operand
    /// (convolutions) or `(depth, cols)` of a right one (linear layers).
    dims: (usize, usize),
    /// The weight tensor's own shape.
    shape: Vec<usize>,
    lhs: bool,
    /// A GEGLU projection's columns, interleaved in 16s (see [`PackedWeight::geglu`]).
    geglu: bool,
}

/// The weight row (output column) behind each column of a GEGLU projection packed by
/// [`PackedWeight::geglu`]: every 32 columns are 16 hidden ones and their 16 gates.
#[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
fn geglu_order(n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |q| {
        let (p, l) = (q / 32, q % 32);
        if l < 16 {
            16 * p + l
        } else {
            n / 2 + 16 * p + l - 16
        }
    })
}

impl PackedWeight {
    /// Broadcast weights (structure-only models of zeros) stay unpacked: packing would
    /// allocate what they save.
    #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
    fn usable(w: &Tensor) -> bool {
        crate::sgemm::available() && crate::supported(&[w]) && w.is_contiguous()
    }

    /// A convolution weight `[Cout, Cin, kh, kw]` as the `[Cout, Cin*kh*kw]` left operand.
    pub fn conv(weight: &Tensor) -> Result<Option<Self>> {
        #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
        if Self::usable(weight) {
            let (cout, cin, kh, kw) = weight.dims4()?;
            let k = cin * kh * kw;
            let v = F32View::new(weight)?;
            // SAFETY: the weight is a contiguous `[cout, k]` view that outlives the call.
            let data = unsafe {
                crate::sgemm::pack_lhs_all(
                    Mat {
                        ptr: v.slice().as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    cout,
                    k,
                )
            };
            return Ok(Some(Self {
                data,
                dims: (cout, k),
                shape: weight.dims().to_vec(),
                lhs: true,
                geglu: false,
            }));
        }
        let _ = weight;
        Ok(None)
    }

    /// A linear weight `[out, in]` as the `[in, out]` right operand of `x W^T`.
    pub fn linear(weight: &Tensor) -> Result<Option<Self>> {
        #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
        if Self::usable(weight) {
            let (out_f, inp) = weight.dims2()?;
            let v = F32View::new(weight)?;
            // SAFETY: `W^T` `[inp, out_f]` of the contiguous `[out_f, inp]` weight view, which
            // outlives the call.
            let data = unsafe {
                crate::sgemm::pack_rhs_all(
                    Mat {
                        ptr: v.slice().as_ptr(),
                        rs: 1,
                        cs: inp as isize,
                    },
                    inp,
                    out_f,
                )
            };
            return Ok(Some(Self {
                data,
                dims: (inp, out_f),
                shape: weight.dims().to_vec(),
                lhs: false,
                geglu: false,
            }));
        }
        let _ = weight;
        Ok(None)
    }

    /// A GEGLU projection weight `[2 * inner, in]` for [`linear_geglu`]: [`Self::linear`] with
    /// each hidden column next to its gate, so the gate is applied per tile. `None` also when
    /// `inner` is not a multiple of 16.
    pub fn geglu(weight: &Tensor) -> Result<Option<Self>> {
        #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
        if Self::usable(weight) {
            let (two, inp) = weight.dims2()?;
            if two.is_multiple_of(32) {
                let v = F32View::new(weight)?;
                let w = v.slice();
                let mut permuted = vec![0f32; two * inp];
                for (dst, src) in permuted.chunks_exact_mut(inp).zip(geglu_order(two)) {
                    dst.copy_from_slice(&w[src * inp..][..inp]);
                }
                // SAFETY: `W^T` `[inp, two]` of the owned `[two, inp]` matrix above.
                let data = unsafe {
                    crate::sgemm::pack_rhs_all(
                        Mat {
                            ptr: permuted.as_ptr(),
                            rs: 1,
                            cs: inp as isize,
                        },
                        inp,
                        two,
                    )
                };
                return Ok(Some(Self {
                    data,
                    dims: (inp, two),
                    shape: weight.dims().to_vec(),
                    lhs: false,
                    geglu: true,
                }));
            }
        }
        let _ = weight;
        Ok(None)
    }

    /// The shape of the weight tensor it was packed from.
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// The weight tensor it was packed from, for the paths the packed kernels do not take.
    pub fn unpack(&self) -> Result<Tensor> {
        #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
        {
            let (a, b) = self.dims;
            let mut data = if self.lhs {
                crate::sgemm::unpack_lhs_all(&self.data, a, b)
            } else {
                crate::sgemm::unpack_rhs_all(&self.data, a, b)
            };
            if self.geglu {
                let permuted = std::mem::take(&mut data);
                data = vec![0f32; permuted.len()];
                for (src, dst) in permuted.chunks_exact(a).zip(geglu_order(b)) {
                    data[dst * a..][..a].copy_from_slice(src);
                }
            }
            Tensor::from_vec(data, self.shape.as_slice(), &candle_core::Device::Cpu)
        }
        #[cfg(not(all(target_arch = "x86_64", not(feature = "openblas"))))]
        bail!(
            "packed weights {:?} {}: not built in this configuration",
            self.shape,
            self.lhs
        )
    }

    /// The packed data if it was packed for these product dimensions.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn for_dims(&self, dims: (usize, usize)) -> Option<&[f32]> {
        (self.dims == dims && !self.geglu).then_some(&self.data[..])
    }
}

/// Fills `dst`, seen as rows of `row_len`, with `bias[col] + residual[i]` (either optional);
/// `bias_per_row` instead takes `bias[row % bias.len()]` (channel-major maps).
pub(crate) fn prefill(
    dst: &mut [f32],
    row_len: usize,
    bias: Option<&[f32]>,
    bias_per_row: bool,
    residual: Option<&[f32]>,
) {
    let rows_per_task = (16384 / row_len.max(1)).max(1);
    dst.par_chunks_mut(row_len * rows_per_task)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                let r = task * rows_per_task + i;
                match residual {
                    Some(res) => row.copy_from_slice(&res[r * row_len..][..row_len]),
                    None => row.fill(0.0),
                }
                match bias {
                    Some(b) if bias_per_row => {
                        let v = b[r % b.len()];
                        row.iter_mut().for_each(|x| *x += v);
                    }
                    Some(b) => row.iter_mut().zip(b).for_each(|(x, v)| *x += v),
                    None => {}
                }
            }
        });
}

fn dims_of(x: &Tensor) -> (usize, usize) {
    let d = x.dims();
    let last = *d.last().unwrap_or(&1);
    (x.elem_count() / last.max(1), last)
}

/// `x W^T + bias + residual` for `x` `[.., in]`, `weight` `[out, in]`, `residual` shaped like
/// the output.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, inp) = dims_of(&x);
    let (out_f, w_in) = weight.dims2()?;
    if w_in != inp {
        bail!("linear: input has {inp} features, weight expects {w_in}");
    }
    let weight = weight.contiguous()?;
    let w = F32View::new(&weight)?;
    let xv = F32View::new(&x)?;
    let mut dst = linear_prefill(&x, out_f, bias, residual)?;
    // SAFETY: `x` `[rows, inp]` and `W^T` (`weight` `[out_f, inp]` read with strides (1, inp))
    // are contiguous views that outlive the call; `dst` is the owned `[rows, out_f]` buffer.
    unsafe {
        gemm(
            rows,
            out_f,
            inp,
            dst.as_mut_ptr(),
            out_f as isize,
            1,
            true,
            Mat {
                ptr: xv.slice().as_ptr(),
                rs: inp as isize,
                cs: 1,
            },
            Mat {
                ptr: w.slice().as_ptr(),
                rs: 1,
                cs: inp as isize,
            },
            1.0,
            true,
        );
    }
    output(dst, linear_shape(&x, out_f))
}

/// [`linear`] with the weight packed at load by [`PackedWeight::linear`].
pub fn linear_packed(
    x: &Tensor,
    packed: &PackedWeight,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, inp) = dims_of(&x);
    let &[out_f, w_in] = packed.dims() else {
        bail!(
            "linear_packed: weight {:?} is not a linear weight",
            packed.dims()
        );
    };
    if w_in != inp {
        bail!("linear: input has {inp} features, weight expects {w_in}");
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = packed.for_dims((inp, out_f)) {
        use crate::sgemm::{sgemm_ops, Lhs, Rhs};
        let xv = F32View::new(&x)?;
        let xm = Mat {
            ptr: xv.slice().as_ptr(),
            rs: inp as isize,
            cs: 1,
        };
        let mut dst = linear_prefill(&x, out_f, bias, residual)?;
        // SAFETY: `x` is a contiguous `[rows, inp]` view, `p` the weight packed by
        // `pack_rhs_all` for (k, n) = (inp, out_f) (checked by `for_dims`), and `dst` the owned
        // `[rows, out_f]` buffer.
        if unsafe {
            sgemm_ops(
                rows,
                out_f,
                inp,
                dst.as_mut_ptr(),
                out_f as isize,
                true,
                Lhs::Mat(xm),
                Rhs::Packed(p),
                1.0,
                true,
            )
        } {
            return output(dst, linear_shape(&x, out_f));
        }
    }
    linear(&x, &packed.unpack()?, bias, residual)
}

/// `geglu(x W^T + bias)` (hidden `* gelu_erf(gate)`, see [`crate::geglu`]) with `packed` from
/// [`PackedWeight::geglu`]: the gate is applied to each product tile, so the `[.., 2 * inner]`
/// projection is never written out.
pub fn linear_geglu(x: &Tensor, packed: &PackedWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let inp = dims_of(&x).1;
    let &[two, w_in] = packed.dims() else {
        bail!(
            "linear_geglu: weight {:?} is not a linear weight",
            packed.dims()
        );
    };
    if w_in != inp || !two.is_multiple_of(2) {
        bail!(
            "linear_geglu: input has {inp} features, weight {:?}",
            packed.dims()
        );
    }
    #[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
    if packed.geglu && packed.dims == (inp, two) {
        let mut b = vec![0f32; two];
        if let Some(bias) = bias {
            let bias = bias.contiguous()?;
            let bv = F32View::new(&bias)?;
            if bv.slice().len() != two {
                bail!("linear_geglu: bias {:?} for {two} outputs", bias.dims());
            }
            b.iter_mut()
                .zip(geglu_order(two))
                .for_each(|(o, src)| *o = bv.slice()[src]);
        }
        let xv = F32View::new(&x)?;
        let rows = dims_of(&x).0;
        let mut dst = vec![0f32; rows * two / 2];
        let xm = Mat {
            ptr: xv.slice().as_ptr(),
            rs: inp as isize,
            cs: 1,
        };
        // SAFETY: `x` is a contiguous `[rows, inp]` view, `packed.data` the GEGLU-ordered
        // weight packed by `pack_rhs_all` for (inp, two) (checked above), `b` holds `two`
        // floats, and `dst` is the owned `[rows, two / 2]` buffer.
        if unsafe {
            crate::sgemm::sgemm_geglu(rows, two, inp, dst.as_mut_ptr(), xm, &packed.data, &b, true)
        } {
            return output(dst, linear_shape(&x, two / 2));
        }
    }
    crate::geglu(&linear(&x, &packed.unpack()?, bias, None)?)
}

/// The output of `x W^T` for `out_f` features, prefilled with bias and residual.
fn linear_prefill(
    x: &Tensor,
    out_f: usize,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let mut dst = vec![0f32; dims_of(x).0 * out_f];
    with_bias_residual(bias, residual, |b, r| {
        prefill(&mut dst, out_f, b, false, r);
        Ok(())
    })?;
    Ok(dst)
}

fn linear_shape(x: &Tensor, out_f: usize) -> Vec<usize> {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = out_f;
    shape
}

/// A 1x1 projection of a channel map `[B, C, H, W]` straight to tokens `[B, H*W, out]`
/// (`weight` `[out, C]` or `[out, C, 1, 1]`), bias added.
pub fn linear_from_channels(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, c, h, w) = x.dims4()?;
    let out_f = weight.dim(0)?;
    if weight.elem_count() != out_f * c {
        bail!(
            "linear_from_channels: weight {:?} for {c} channels",
            weight.dims()
        );
    }
    let hw = h * w;
    let weight = weight.contiguous()?;
    let wv = F32View::new(&weight)?;
    let xv = F32View::new(&x)?;
    let mut dst = vec![0f32; b * hw * out_f];
    with_bias_residual(bias, None, |bias, _| {
        prefill(&mut dst, out_f, bias, false, None);
        Ok(())
    })?;
    for item in 0..b {
        // SAFETY: item `item < b` of the contiguous `[b, c, hw]` input (read as `[hw, c]`) and
        // of the owned `[b, hw, out_f]` output; the weight has `out_f * c` floats (checked),
        // read as `[c, out_f]`.
        unsafe {
            gemm(
                hw,
                out_f,
                c,
                dst.as_mut_ptr().add(item * hw * out_f),
                out_f as isize,
                1,
                true,
                Mat {
                    ptr: xv.slice().as_ptr().add(item * c * hw),
                    rs: 1,
                    cs: hw as isize,
                },
                Mat {
                    ptr: wv.slice().as_ptr(),
                    rs: 1,
                    cs: c as isize,
                },
                1.0,
                true,
            );
        }
    }
    output(dst, (b, hw, out_f))
}

/// A projection of tokens `[B, H*W, C]` back to a channel map `[B, out, H, W]` (`weight`
/// `[out, C]` or `[out, C, 1, 1]`), plus bias and a residual map shaped like the output.
pub fn linear_to_channels(
    tokens: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    height: usize,
    width: usize,
) -> Result<Tensor> {
    let tokens = tokens.contiguous()?;
    let (b, n, c) = tokens.dims3()?;
    let out_f = weight.dim(0)?;
    if n != height * width || weight.elem_count() != out_f * c {
        bail!(
            "linear_to_channels: tokens {:?}, weight {:?}",
            tokens.dims(),
            weight.dims()
        );
    }
    let weight = weight.contiguous()?;
    let wv = F32View::new(&weight)?;
    let tv = F32View::new(&tokens)?;
    let mut dst = vec![0f32; b * out_f * n];
    with_bias_residual(bias, residual, |bias, res| {
        prefill(&mut dst, n, bias, true, res);
        Ok(())
    })?;
    for item in 0..b {
        // SAFETY: item `item < b` of the contiguous `[b, n, c]` tokens (read as `[c, n]`) and of
        // the owned `[b, out_f, n]` output; the weight has `out_f * c` floats (checked).
        unsafe {
            gemm(
                out_f,
                n,
                c,
                dst.as_mut_ptr().add(item * out_f * n),
                n as isize,
                1,
                true,
                Mat {
                    ptr: wv.slice().as_ptr(),
                    rs: c as isize,
                    cs: 1,
                },
                Mat {
                    ptr: tv.slice().as_ptr().add(item * n * c),
                    rs: 1,
                    cs: c as isize,
                },
                1.0,
                true,
            );
        }
    }
    output(dst, (b, out_f, height, width))
}

/// Runs `f` with the f32 data of the optional bias and residual tensors.
pub(crate) fn with_bias_residual<R>(
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>, Option<&[f32]>) -> Result<R>,
) -> Result<R> {
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let bv = bias.as_ref().map(F32View::new).transpose()?;
    let rv = residual.as_ref().map(F32View::new).transpose()?;
    f(
        bv.as_ref().map(|v| v.slice()),
        rv.as_ref().map(|v| v.slice()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};
    use candle_core::Module;

    #[test]
    fn linear_matches_candle() {
        let x = rand(&[2, 7, 12], 1);
        let w = rand(&[5, 12], 2);
        let b = rand(&[5], 3);
        let r = rand(&[2, 7, 5], 4);
        let want = (candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap()
            + &r)
            .unwrap();
        assert!(max_abs(&linear(&x, &w, Some(&b), Some(&r)).unwrap(), &want) < 1e-5);
        let want = x
            .matmul(&w.t().unwrap().broadcast_left(2).unwrap())
            .unwrap();
        assert!(max_abs(&linear(&x, &w, None, None).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn packed_linear_matches_candle() {
        // Edge tiles in both directions, several k blocks and row blocks.
        for &(rows, inp, out) in &[(7, 12, 5), (300, 600, 70), (50, 40, 33)] {
            let x = rand(&[2, rows, inp], 11);
            let w = rand(&[out, inp], 12);
            let b = rand(&[out], 13);
            let r = rand(&[2, rows, out], 14);
            let want = (candle_nn::Linear::new(w.clone(), Some(b.clone()))
                .forward(&x)
                .unwrap()
                + &r)
                .unwrap();
            let Some(packed) = PackedWeight::linear(&w).unwrap() else {
                return;
            };
            assert_eq!(max_abs(&packed.unpack().unwrap(), &w), 0.0);
            let got = linear_packed(&x, &packed, Some(&b), Some(&r)).unwrap();
            let err = max_abs(&got, &want);
            assert!(err < 1e-4, "{rows}x{inp}->{out}: {err}");
        }
    }

    #[test]
    fn geglu_projection_matches_linear_then_geglu() {
        for &(rows, inp, inner) in &[(7, 12, 16), (300, 600, 48)] {
            let x = rand(&[2, rows, inp], 21);
            let w = rand(&[2 * inner, inp], 22);
            let b = rand(&[2 * inner], 23);
            let want = crate::geglu(&linear(&x, &w, Some(&b), None).unwrap()).unwrap();
            let Some(packed) = PackedWeight::geglu(&w).unwrap() else {
                return;
            };
            assert_eq!(max_abs(&packed.unpack().unwrap(), &w), 0.0);
            let err = max_abs(&linear_geglu(&x, &packed, Some(&b)).unwrap(), &want);
            assert!(err < 1e-4, "{rows}x{inp}->{inner}: {err}");
        }
    }

    #[test]
    fn channel_projections_match_permuted_linear() {
        let (b, c, h, w, o) = (2, 6, 3, 4, 5);
        let x = rand(&[b, c, h, w], 5);
        let wt = rand(&[o, c, 1, 1], 6);
        let bias = rand(&[o], 7);
        let tokens = x
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((b, h * w, c))
            .unwrap();
        let lin = candle_nn::Linear::new(wt.reshape((o, c)).unwrap(), Some(bias.clone()));
        let want = lin.forward(&tokens).unwrap();
        assert!(max_abs(&linear_from_channels(&x, &wt, Some(&bias)).unwrap(), &want) < 1e-5);

        let t = rand(&[b, h * w, c], 8);
        let res = rand(&[b, o, h, w], 9);
        let want = lin
            .forward(&t)
            .unwrap()
            .reshape((b, h, w, o))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let want = (want + &res).unwrap();
        let got = linear_to_channels(&t, &wt, Some(&bias), Some(&res), h, w).unwrap();
        assert!(max_abs(&got, &want) < 1e-5);
    }
}
