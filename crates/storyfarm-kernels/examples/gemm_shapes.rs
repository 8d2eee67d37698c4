//! Times the gemm shapes that dominate an SD-1.5 UNet forward through the `gemm` crate and,
//! with `--features openblas`, through OpenBLAS's `cblas_sgemm` (threaded, and single-threaded
//! calls split across rayon). Prints wall and process CPU seconds per call and GFLOP/s.
//! `RAYON_NUM_THREADS=2 cargo run -p storyfarm-kernels --example gemm_shapes [--features openblas]`
#![deny(unsafe_op_in_unsafe_fn)]

use rayon::prelude::*;
use std::time::Instant;

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

#[cfg(feature = "openblas")]
mod cblas {
    use std::os::raw::c_int;
    pub const ROW_MAJOR: c_int = 101;
    pub const NO_TRANS: c_int = 111;
    pub const TRANS: c_int = 112;
    #[link(name = "openblas")]
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            order: c_int,
            ta: c_int,
            tb: c_int,
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
        pub fn openblas_set_num_threads(n: c_int);
        pub fn openblas_get_config() -> *const std::os::raw::c_char;
        pub fn openblas_get_corename() -> *const std::os::raw::c_char;
    }
}

/// One operand: (rs, cs) strides.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: (isize, isize),
    b: (isize, isize),
    /// independent calls (issued in parallel over rayon when > 1)
    calls: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    GemmPar,
    GemmSeq,
    #[cfg(feature = "openblas")]
    BlasThreaded,
    #[cfg(feature = "openblas")]
    BlasSplit,
}

/// `c = a b` for shape `s` through backend `be`.
///
/// # Safety
/// `a` must be valid for reads of the `s.m x s.k` elements at strides `s.a`, `b` of the
/// `s.k x s.n` at strides `s.b`, and `c` for writes of `s.m * s.n` contiguous floats (row-major
/// `[m, n]`) that overlap neither and that nothing else accesses during the call. The OpenBLAS
/// backends also need one unit stride per operand (see [`blas`]).
unsafe fn call(be: Backend, s: &Shape, a: *const f32, b: *const f32, c: *mut f32, par: bool) {
    let (m, n, k) = (s.m, s.n, s.k);
    match be {
        Backend::GemmPar | Backend::GemmSeq => {
            let p = if par && be == Backend::GemmPar {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the operands and the `[m, n]` destination this function's contract makes
            // valid, strides given (column, row).
            unsafe {
                gemm::gemm(
                    m, n, k, c, 1, n as isize, false, a, s.a.1, s.a.0, b, s.b.1, s.b.0, 1.0, 1.0,
                    false, false, false, p,
                );
            }
        }
        // SAFETY: the whole product, under this function's contract.
        #[cfg(feature = "openblas")]
        Backend::BlasThreaded => unsafe { blas(s, 0, m, 0, n, a, b, c) },
        #[cfg(feature = "openblas")]
        Backend::BlasSplit => {
            // as the library does: one single-threaded call per rayon thread, along the longer of m, n
            let t = if par { rayon::current_num_threads() } else { 1 };
            let (len, split_m) = if m > n { (m, true) } else { (n, false) };
            let step = len.div_ceil(t).next_multiple_of(16);
            let (ap, bp, cp) = (a as usize, b as usize, c as usize);
            (0..len.div_ceil(step)).into_par_iter().for_each(|i| {
                let (s0, sl) = (i * step, step.min(len - i * step));
                let (a, b, c) = (ap as *const f32, bp as *const f32, cp as *mut f32);
                // SAFETY: rows s0..s0 + sl (or columns) of the product this function's contract
                // makes valid; the tasks' blocks of `c` are disjoint.
                unsafe {
                    if split_m {
                        blas(s, s0, sl, 0, n, a, b, c)
                    } else {
                        blas(s, 0, m, s0, sl, a, b, c)
                    }
                }
            });
        }
    }
}

/// Rows `m0..m0 + mm`, columns `n0..n0 + nn` of `c = a b` for shape `s` through one
/// `cblas_sgemm`.
///
/// # Safety
/// As for [`call`], with `m0 + mm <= s.m`, `n0 + nn <= s.n`, and each of `s.a`, `s.b` with a
/// unit column stride (`(ld, 1)`) or a unit row stride (`(1, ld)`), the sizes fitting a C
/// `int`. Only the addressed block of `c` is written.
#[cfg(feature = "openblas")]
#[allow(clippy::too_many_arguments)]
unsafe fn blas(
    s: &Shape,
    m0: usize,
    mm: usize,
    n0: usize,
    nn: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
) {
    use cblas::*;
    let op = |(rs, cs): (isize, isize)| if cs == 1 { (NO_TRANS, rs) } else { (TRANS, cs) };
    let (ta, lda) = op(s.a);
    let (tb, ldb) = op(s.b);
    // SAFETY: the block of the product this function's contract makes valid: `a` from row m0,
    // `b` from column n0, `c` from element (m0, n0) of the row-major `[m, n]` destination.
    unsafe {
        cblas_sgemm(
            ROW_MAJOR,
            ta,
            tb,
            mm as _,
            nn as _,
            s.k as _,
            1.0,
            a.offset(m0 as isize * s.a.0),
            lda as _,
            b.offset(n0 as isize * s.b.1),
            ldb as _,
            0.0,
            c.add(m0 * s.n + n0),
            s.n as _,
        );
    }
}

fn main() {
    // SAFETY: OpenBLAS returns pointers to its static NUL-terminated configuration strings.
    #[cfg(feature = "openblas")]
    unsafe {
        let s = |p: *const std::os::raw::c_char| {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        eprintln!(
            "openblas: {} / core {}",
            s(cblas::openblas_get_config()),
            s(cblas::openblas_get_corename())
        );
    }
    let shapes = [
        // conv 3x3 at 64x64, 320 ch: [Cout, K] x [K, p] tile of 22 rows (MAX_COL_ELEMS)
        Shape {
            name: "conv64 320x1408x2880",
            m: 320,
            n: 1408,
            k: 2880,
            a: (2880, 1),
            b: (1408, 1),
            calls: 1,
        },
        Shape {
            name: "conv64 full 320x4096x2880",
            m: 320,
            n: 4096,
            k: 2880,
            a: (2880, 1),
            b: (4096, 1),
            calls: 1,
        },
        Shape {
            name: "conv32 640x704x5760",
            m: 640,
            n: 704,
            k: 5760,
            a: (5760, 1),
            b: (704, 1),
            calls: 1,
        },
        Shape {
            name: "conv16 1280x352x11520",
            m: 1280,
            n: 352,
            k: 11520,
            a: (11520, 1),
            b: (352, 1),
            calls: 1,
        },
        Shape {
            name: "conv8 1280x64x11520",
            m: 1280,
            n: 64,
            k: 11520,
            a: (11520, 1),
            b: (64, 1),
            calls: 1,
        },
        // linear (GEGLU proj): x [rows, in] W^T
        Shape {
            name: "linear 8192x2560x320",
            m: 8192,
            n: 2560,
            k: 320,
            a: (320, 1),
            b: (1, 320),
            calls: 1,
        },
        Shape {
            name: "ff2 8192x320x1280",
            m: 8192,
            n: 320,
            k: 1280,
            a: (1280, 1),
            b: (1, 1280),
            calls: 1,
        },
        // attention per rayon task at 64x64: chunk 64 rows, 8 heads x d=40, token stride 320
        Shape {
            name: "attn QK 64x4096x40 x64",
            m: 64,
            n: 4096,
            k: 40,
            a: (320, 1),
            b: (1, 320),
            calls: 64,
        },
        Shape {
            name: "attn PV 64x40x4096 x64",
            m: 64,
            n: 40,
            k: 4096,
            a: (4096, 1),
            b: (320, 1),
            calls: 64,
        },
    ];
    #[allow(unused_mut)]
    let mut backends = vec![
        ("gemm rayon", Backend::GemmPar),
        ("gemm 1t", Backend::GemmSeq),
    ];
    #[cfg(feature = "openblas")]
    {
        backends.push(("blas thr", Backend::BlasThreaded));
        backends.push(("blas split", Backend::BlasSplit));
    }
    println!(
        "{:<28} {:<11} {:>9} {:>9} {:>8} {:>9}",
        "shape", "backend", "wall ms", "cpu ms", "GFLOP/s", "GF/cpu-s"
    );
    for s in &shapes {
        let max = |(rs, cs): (isize, isize), r: usize, c: usize| {
            (r - 1) * rs as usize + (c - 1) * cs as usize + 1
        };
        let a: Vec<f32> = (0..max(s.a, s.m, s.k).max(s.m * 320))
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b: Vec<f32> = (0..max(s.b, s.k, s.n).max(s.n * 320))
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let mut reference: Option<Vec<f32>> = None;
        for &(bname, be) in &backends {
            // SAFETY: a plain setter with no pointer arguments; no product is running.
            #[cfg(feature = "openblas")]
            unsafe {
                cblas::openblas_set_num_threads(if be == Backend::BlasThreaded && s.calls == 1 {
                    rayon::current_num_threads() as _
                } else {
                    1
                })
            };
            let mut c = vec![0f32; s.m * s.n * s.calls];
            let flops = 2.0 * (s.m * s.n * s.k * s.calls) as f64;
            let run = |c: &mut Vec<f32>| {
                let (ap, bp) = (a.as_ptr() as usize, b.as_ptr() as usize);
                if s.calls == 1 {
                    // SAFETY: `a` and `b` hold the largest offset their strides reach for this
                    // shape (`max` above), and `c` holds `m * n` floats.
                    unsafe {
                        call(
                            be,
                            s,
                            ap as *const f32,
                            bp as *const f32,
                            c.as_mut_ptr(),
                            true,
                        )
                    };
                } else {
                    // SAFETY: as above; each task writes its own `m * n` chunk of `c`, and `a`
                    // and `b` are only read.
                    c.par_chunks_mut(s.m * s.n).for_each(|c| unsafe {
                        call(
                            be,
                            s,
                            ap as *const f32,
                            bp as *const f32,
                            c.as_mut_ptr(),
                            false,
                        )
                    });
                }
            };
            run(&mut c);
            let reps = ((3e9 / flops).ceil() as usize).max(2);
            let (w0, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..reps {
                run(&mut c);
            }
            let (wall, cpu) = (
                w0.elapsed().as_secs_f64() / reps as f64,
                (cpu_seconds() - c0) / reps as f64,
            );
            let err = match &reference {
                None => {
                    reference = Some(c[..s.m * s.n].to_vec());
                    0.0
                }
                Some(r) => r
                    .iter()
                    .zip(&c)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max),
            };
            println!(
                "{:<28} {:<11} {:>9.2} {:>9.2} {:>8.1} {:>9.1}  (maxdiff {err:.1e})",
                s.name,
                bname,
                wall * 1e3,
                cpu * 1e3,
                flops / wall * 1e-9,
                flops / cpu.max(1e-9) * 1e-9
            );
        }
    }
}
