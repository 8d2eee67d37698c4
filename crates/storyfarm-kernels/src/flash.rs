//! Attention with an online softmax over key tiles, at AVX-512F or AVX2+FMA width (the widest
//! this CPU has, chosen at run time; the `gemm` path in `attention.rs` serves other CPUs).
//! Queries sit in the SIMD lanes: a task takes `QW` query rows of one head (48 at AVX-512: three
//! vectors; 16 at AVX2: two), transposed to `[d][QW]`, and every key (or value) element is a
//! broadcast scalar. So no head size is padded (SD's 40 and 80 are not multiples of 16), the
//! softmax statistics of a task are a few vectors (the row maximum is a vertical max over the
//! tile's keys, not a horizontal reduction per row), and masked keys are dropped when a block is
//! packed instead of being computed and thrown away. An extra key block costs exactly its own
//! arithmetic; a tile's logits (`64 x QW`) stay in L1.
//!
//! One algorithm serves both widths: it is generic over a small vector trait (`Simd`) whose
//! operations are `#[inline(always)]`, and each width's `#[target_feature]` entry compiles it
//! whole, so the intrinsics inline into one function per width (its hot loops are the same
//! instructions as the AVX-512-only kernel's were). Only the register tile differs: AVX-512's 32
//! registers hold 3 query vectors x 8 keys (or head dimensions) of accumulators, AVX2's 16 hold
//! 2 x 6 (see `AVX2_NQ`).

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::{isa, run, Source};

/// The width the kernel runs at on this CPU; `None` where it has neither AVX-512F nor AVX2+FMA.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn isa() -> Option<crate::isa::Isa> {
    None
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use crate::isa::Isa;
    use crate::view::SendPtr;

    /// Keys per tile of the online softmax (rounded down to a multiple of the key micro-tile);
    /// a tile's logits (`TILE x QW`) stay in L1.
    const TILE: usize = 64;
    /// The most query rows a task holds at any width (the normalisation's buffer).
    const MAX_QW: usize = 64;

    /// The width the kernel runs at on this CPU (`Isa::best`, so `STORYFARM_CPU_SIMD` caps it);
    /// `None` where it has neither AVX-512F nor AVX2+FMA.
    pub(crate) fn isa() -> Option<Isa> {
        Isa::best()
    }

    /// One key/value block of one item as the caller stores it: element (token, head, 0) of
    /// the keys at `token * k_token + head * k_head` (values alike), `d` contiguous floats.
    pub(crate) struct Source<'a> {
        pub k: &'a [f32],
        pub v: &'a [f32],
        pub k_token: usize,
        pub k_head: usize,
        pub v_token: usize,
        pub v_head: usize,
        pub tokens: usize,
        pub bias: f32,
        pub mask: Option<&'a [f32]>,
    }

    /// A source packed for one call: per head, the kept keys and their values as `[key][d]`
    /// rows, zero rows up to a multiple of the width's key micro-tile.
    struct Packed {
        keys: Vec<f32>,
        values: Vec<f32>,
        /// Kept (unmasked) keys.
        kept: usize,
        /// `kept` rounded up to a multiple of the key micro-tile.
        mpad: usize,
        /// The block's logit bias, in base 2 like the logits.
        bias: f32,
    }

    fn pack(src: &Source, heads: usize, d: usize, kq: usize) -> Packed {
        let kept: Vec<usize> = match src.mask {
            Some(mask) => (0..src.tokens)
                .filter(|&j| mask.get(j).is_none_or(|&keep| keep != 0.0))
                .collect(),
            None => (0..src.tokens).collect(),
        };
        let mpad = kept.len().next_multiple_of(kq);
        let bias = src.bias * std::f32::consts::LOG2_E;
        if mpad == 0 {
            // Every key masked (a subject dropped whole at this step): the block adds nothing.
            return Packed {
                keys: Vec::new(),
                values: Vec::new(),
                kept: 0,
                mpad: 0,
                bias,
            };
        }
        let mut keys = vec![0f32; heads * mpad * d];
        let mut values = vec![0f32; heads * mpad * d];
        keys.chunks_mut(mpad * d)
            .zip(values.chunks_mut(mpad * d))
            .enumerate()
            .for_each(|(h, (kh, vh))| {
                for (row, &j) in kept.iter().enumerate() {
                    kh[row * d..][..d]
                        .copy_from_slice(&src.k[j * src.k_token + h * src.k_head..][..d]);
                    vh[row * d..][..d]
                        .copy_from_slice(&src.v[j * src.v_token + h * src.v_head..][..d]);
                }
            });
        Packed {
            keys,
            values,
            kept: kept.len(),
            mpad,
            bias,
        }
    }

    /// Attention of `rows` query tokens (element (token, head, 0) at `token * q_token + head *
    /// q_head`, `d` floats) of each item over `sources[item]`, written as `[items, rows, heads
    /// * d]` tokens into `out`, at width `isa`.
    ///
    /// # Panics
    /// If the CPU lacks `isa` (take it from [`isa`] or `Isa::detected`), or `out` does not
    /// hold `items * rows * heads * d` floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        isa: Isa,
        q: &[f32],
        q_item: usize,
        q_token: usize,
        q_head: usize,
        rows: usize,
        heads: usize,
        d: usize,
        scale: f32,
        sources: &[Vec<Source>],
        out: &mut [f32],
    ) {
        // The width is checked once per call: the tokens below are the proof the kernels need.
        match isa {
            Isa::Avx512 => run_at(
                Avx512::new().expect("flash attention: the CPU lacks AVX-512F"),
                q,
                q_item,
                q_token,
                q_head,
                rows,
                heads,
                d,
                scale,
                sources,
                out,
            ),
            Isa::Avx2 => run_at(
                Avx2::new().expect("flash attention: the CPU lacks AVX2 and FMA"),
                q,
                q_item,
                q_token,
                q_head,
                rows,
                heads,
                d,
                scale,
                sources,
                out,
            ),
        }
    }

    /// [`run`] at the width of `s`.
    #[allow(clippy::too_many_arguments)]
    fn run_at<S: Simd>(
        s: S,
        q: &[f32],
        q_item: usize,
        q_token: usize,
        q_head: usize,
        rows: usize,
        heads: usize,
        d: usize,
        scale: f32,
        sources: &[Vec<Source>],
        out: &mut [f32],
    ) {
        let items = sources.len();
        // What the unsafe blocks below rely on; once per call, outside the loops.
        assert_eq!(
            out.len(),
            items * rows * heads * d,
            "flash attention: output of {items} x {rows} tokens of {heads} x {d}"
        );
        let qw = S::QW;
        let jobs: Vec<(usize, usize)> = (0..items)
            .flat_map(|i| (0..sources[i].len()).map(move |b| (i, b)))
            .collect();
        let packed: Vec<Packed> = jobs
            .par_iter()
            .map(|&(i, b)| pack(&sources[i][b], heads, d, S::KQ))
            .collect();
        let mut first = Vec::with_capacity(items);
        let mut at = 0;
        for s in sources {
            first.push(at);
            at += s.len();
        }
        // Logits in base 2 (`log2(e)` folded into the query scale and the block bias): the
        // softmax is the same, and `2^x` is cheaper than `e^x`.
        let scale2 = scale * std::f32::consts::LOG2_E;
        let c = heads * d;
        let chunks = rows.div_ceil(qw);
        let blk = d * qw;
        // Queries of each (item, chunk, head) scaled and transposed to `[d][QW]` in one pass
        // that reads whole token rows (a task gathering its own rows would miss the cache on
        // every one); each task then overwrites its block with its normalised output, which a
        // last pass writes back as whole token rows.
        let mut qo = vec![0f32; items * chunks * heads * blk];
        qo.par_chunks_mut(heads * blk)
            .enumerate()
            .for_each(|(ic, dst)| {
                let (item, ci) = (ic / chunks, ic % chunks);
                let (n0, len) = (ci * qw, qw.min(rows - ci * qw));
                for r in 0..len {
                    let base = item * q_item + (n0 + r) * q_token;
                    for (h, o) in dst.chunks_exact_mut(blk).enumerate() {
                        for (dd, &x) in q[base + h * q_head..][..d].iter().enumerate() {
                            o[dd * qw + r] = x * scale2;
                        }
                    }
                }
            });
        let qp = SendPtr(qo.as_mut_ptr());
        (0..items * heads * chunks)
            .into_par_iter()
            .for_each_init(Scratch::default, |sc, task| {
                // Consecutive tasks share a head's keys and values.
                let (item, h, ci) = (
                    task / (heads * chunks),
                    (task / chunks) % heads,
                    task % chunks,
                );
                #[allow(clippy::redundant_locals)]
                let qp = qp;
                // SAFETY: `qo` holds `items * chunks * heads` blocks of `blk` floats and `task`
                // maps one-to-one onto (item, ci, h), so block (item, ci, h) is in bounds and
                // this task's alone; `qo` itself is not touched until the loop has ended.
                let qt = unsafe {
                    std::slice::from_raw_parts_mut(
                        qp.0.add(((item * chunks + ci) * heads + h) * blk),
                        blk,
                    )
                };
                s.task(sc, qt, &packed[first[item]..][..sources[item].len()], h, d);
            });
        let dst = SendPtr(out.as_mut_ptr());
        qo.par_chunks(heads * blk)
            .enumerate()
            .for_each(|(ic, src)| {
                let (item, ci) = (ic / chunks, ic % chunks);
                let (n0, len) = (ci * qw, qw.min(rows - ci * qw));
                #[allow(clippy::redundant_locals)]
                let dst = dst;
                // SAFETY: rows n0..n0 + len of this item in `out` (`[items, rows, c]`, its length
                // asserted at the top): in bounds, this chunk's alone, and `out` is not otherwise
                // accessed until the loop has ended.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.0.add((item * rows + n0) * c), len * c)
                };
                for (r, row) in o.chunks_exact_mut(c).enumerate() {
                    for (h, x) in row.chunks_exact_mut(d).enumerate() {
                        let b = &src[h * blk..][..blk];
                        for (dd, x) in x.iter_mut().enumerate() {
                            *x = b[dd * qw + r];
                        }
                    }
                }
            });
    }

    #[derive(Default)]
    struct Scratch {
        /// A tile's logits, then probabilities, `[TILE][QW]`.
        s: Vec<f32>,
        /// Unnormalised output `[d][QW]`.
        ot: Vec<f32>,
    }

    impl Scratch {
        fn reset(&mut self, d: usize, qw: usize) {
            self.s.resize(TILE * qw, 0.0);
            self.ot.clear();
            self.ot.resize(d * qw, 0.0);
        }
    }

    /// The vector operations the kernel is written in, at one width. A value of an
    /// implementing type exists only where the CPU has its instruction set (`new` checks), which
    /// is what makes the arithmetic safe to call. Every operation is `#[inline(always)]`: the
    /// intrinsics only inline into code compiled for their instruction set, which the generic
    /// kernel becomes inside its width's `#[target_feature]` entry ([`Simd::task`]); anywhere
    /// else they are calls (correct, but slow).
    trait Simd: Copy + Send + Sync {
        type V: Copy;
        /// Floats per vector.
        const LANES: usize;
        /// Query rows per task (`NQ` vectors of the width's register tile).
        const QW: usize;
        /// Keys per logit micro-tile: blocks are padded to a multiple of it.
        const KQ: usize;

        fn zero(self) -> Self::V;
        fn splat(self, x: f32) -> Self::V;
        fn add(self, a: Self::V, b: Self::V) -> Self::V;
        fn sub(self, a: Self::V, b: Self::V) -> Self::V;
        fn mul(self, a: Self::V, b: Self::V) -> Self::V;
        fn max(self, a: Self::V, b: Self::V) -> Self::V;
        /// `a * b + c`, rounded once.
        fn fmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// `2^x` for `x <= 0`: relative error below 2.5e-7 down to `x = -125`; below, 0 or a
        /// subnormal as the impl documents, and exactly 0 for `-inf` and below -150.
        fn exp2(self, x: Self::V) -> Self::V;

        /// The `LANES` floats at `p`.
        ///
        /// # Safety
        /// `p` must be valid for reads of `LANES` consecutive `f32`s (any alignment).
        unsafe fn load(self, p: *const f32) -> Self::V;

        /// `a` into the `LANES` floats at `p`.
        ///
        /// # Safety
        /// `p` must be valid for writes of `LANES` consecutive `f32`s (any alignment).
        unsafe fn store(self, p: *mut f32, a: Self::V);

        /// `*p` in every lane.
        ///
        /// # Safety
        /// `p` must be valid for reads of one `f32` (any alignment).
        unsafe fn bcast(self, p: *const f32) -> Self::V;

        /// [`task`] compiled for this width: its `#[target_feature]` entry.
        fn task(self, sc: &mut Scratch, qt: &mut [f32], blocks: &[Packed], h: usize, d: usize);
    }

    /// The safe arithmetic of a [`Simd`] impl, each operation one intrinsic.
    macro_rules! ops {
        ($($name:ident($($a:ident),*) => $f:ident;)*) => {$(
            #[inline(always)]
            fn $name(self, $($a: Self::V),*) -> Self::V {
                // SAFETY: a value of `Self` exists only where the CPU has its instruction set
                // (`new` checks).
                unsafe { $f($($a),*) }
            }
        )*};
    }

    // Pointer arithmetic in the micro-kernels is `wrapping_add`, and memory goes through masked
    // load/store intrinsics (full mask: LLVM emits the plain instructions, folded into the
    // FMAs): `add`, `*p` and the plain `loadu`/`storeu` (`read_unaligned`,
    // `copy_nonoverlapping`) carry UB checks in debug-assertion builds, which would sit in the
    // innermost loops and force spills.

    /// AVX-512F: 16 lanes, 32 registers.
    #[derive(Clone, Copy)]
    struct Avx512(());

    impl Avx512 {
        fn new() -> Option<Self> {
            is_x86_feature_detected!("avx512f").then_some(Self(()))
        }
    }

    /// The AVX-512 register tile: query vectors per task, keys per logit micro-tile, head
    /// dimensions per output micro-tile (3 x 8 accumulators, 3 query vectors, 1 broadcast).
    const AVX512_NQ: usize = 3;
    const AVX512_KQ: usize = 8;
    const AVX512_KD: usize = 8;

    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        const QW: usize = AVX512_NQ * 16;
        const KQ: usize = AVX512_KQ;

        ops! {
            add(a, b) => _mm512_add_ps;
            sub(a, b) => _mm512_sub_ps;
            mul(a, b) => _mm512_mul_ps;
            max(a, b) => _mm512_max_ps;
            fmadd(a, b, c) => _mm512_fmadd_ps;
        }

        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY: `Avx512` values exist only on CPUs with AVX-512F (`new`).
            unsafe { _mm512_setzero_ps() }
        }

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: as for `zero`.
            unsafe { _mm512_set1_ps(x) }
        }

        /// `2^n` by `scalef` and `2^f`, `|f| <= 1/2`, by a degree-5 polynomial fitted for least
        /// maximum relative error on that interval. Below -126 the result is subnormal (`scalef`
        /// rounds), below -150 (and for `-inf`) exactly 0.
        #[inline(always)]
        fn exp2(self, x: __m512) -> __m512 {
            // SAFETY: as for `zero`.
            unsafe {
                let x = _mm512_max_ps(x, _mm512_set1_ps(-200.0));
                let n =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let p = poly(self, _mm512_sub_ps(x, n));
                _mm512_scalef_ps(p, n)
            }
        }

        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            // SAFETY: all 16 lanes of `p` are readable (contract); the load is unaligned, and
            // the CPU has AVX-512F (`new`).
            unsafe { _mm512_maskz_loadu_ps(!0, p) }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32, a: __m512) {
            // SAFETY: all 16 lanes of `p` are writable (contract); the store is unaligned, and
            // the CPU has AVX-512F (`new`).
            unsafe { _mm512_mask_storeu_ps(p, !0, a) }
        }

        #[inline(always)]
        unsafe fn bcast(self, p: *const f32) -> __m512 {
            // SAFETY: `p` is readable (contract); `_mm_load_ss` needs no alignment, and the CPU
            // has AVX-512F (`new`).
            unsafe { _mm512_broadcastss_ps(_mm_load_ss(p)) }
        }

        fn task(self, sc: &mut Scratch, qt: &mut [f32], blocks: &[Packed], h: usize, d: usize) {
            #[target_feature(enable = "avx512f")]
            fn entry(
                s: Avx512,
                sc: &mut Scratch,
                qt: &mut [f32],
                b: &[Packed],
                h: usize,
                d: usize,
            ) {
                task::<Avx512, AVX512_NQ, AVX512_KQ, AVX512_KD>(s, sc, qt, b, h, d);
            }
            // SAFETY: `Avx512` values exist only on CPUs with AVX-512F (`new`).
            unsafe { entry(self, sc, qt, blocks, h, d) }
        }
    }

    /// AVX2 and FMA: 8 lanes, 16 registers.
    #[derive(Clone, Copy)]
    struct Avx2(());

    impl Avx2 {
        fn new() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Self(()))
        }
    }

    /// The AVX2 register tile: 2 query vectors x 6 keys (or head dimensions) of accumulators,
    /// the 2 query vectors and the broadcast scalar take 15 of the 16 registers. 3 x 4 would
    /// reuse each key and value element more, but needs all 16, and LLVM's allocator then
    /// spills an accumulator and shuffles the others through `vmovaps` in every step of both
    /// loops (1.9x slower on Zen 3). 3 x 3 (13 registers) was 5-18% slower at d = 40, 80 and
    /// 160 and within noise at 64; 2 x 4, 2 x 5 and tiles of 96 or 128 keys were slower too.
    const AVX2_NQ: usize = 2;
    const AVX2_KQ: usize = 6;
    const AVX2_KD: usize = 6;

    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        const QW: usize = AVX2_NQ * 8;
        const KQ: usize = AVX2_KQ;

        ops! {
            add(a, b) => _mm256_add_ps;
            sub(a, b) => _mm256_sub_ps;
            mul(a, b) => _mm256_mul_ps;
            max(a, b) => _mm256_max_ps;
            fmadd(a, b, c) => _mm256_fmadd_ps;
        }

        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY: `Avx2` values exist only on CPUs with AVX2 and FMA (`new`).
            unsafe { _mm256_setzero_ps() }
        }

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_set1_ps(x) }
        }

        /// `2^f`, `f = x - round(x)`, by the polynomial, times `2^round(x)` added into its
        /// exponent field (AVX2 has no `scalef`). That is exact while the result stays normal,
        /// which `x >= -125` guarantees (`2^f >= 2^-1/2`); below (and for `-inf` and NaN) a
        /// compare mask makes the result exactly 0 instead of a wrapped exponent.
        #[inline(always)]
        fn exp2(self, x: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-125.0));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let p = poly(self, _mm256_sub_ps(x, n));
                let e = _mm256_slli_epi32::<23>(_mm256_cvtps_epi32(n));
                let r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
                _mm256_and_ps(r, keep)
            }
        }

        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            // SAFETY: all 8 lanes of `p` are readable (contract); the load is unaligned, and the
            // CPU has AVX2 (`new`).
            unsafe { _mm256_maskload_ps(p, _mm256_set1_epi32(-1)) }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32, a: __m256) {
            // SAFETY: all 8 lanes of `p` are writable (contract); the store is unaligned, and
            // the CPU has AVX2 (`new`).
            unsafe { _mm256_maskstore_ps(p, _mm256_set1_epi32(-1), a) }
        }

        #[inline(always)]
        unsafe fn bcast(self, p: *const f32) -> __m256 {
            // SAFETY: `p` is readable (contract); `_mm_load_ss` needs no alignment, and the CPU
            // has AVX2 (`new`).
            unsafe { _mm256_broadcastss_ps(_mm_load_ss(p)) }
        }

        fn task(self, sc: &mut Scratch, qt: &mut [f32], blocks: &[Packed], h: usize, d: usize) {
            #[target_feature(enable = "avx2,fma")]
            fn entry(s: Avx2, sc: &mut Scratch, qt: &mut [f32], b: &[Packed], h: usize, d: usize) {
                task::<Avx2, AVX2_NQ, AVX2_KQ, AVX2_KD>(s, sc, qt, b, h, d);
            }
            // SAFETY: `Avx2` values exist only on CPUs with AVX2 and FMA (`new`).
            unsafe { entry(self, sc, qt, blocks, h, d) }
        }
    }

    /// `2^f` for `|f| <= 1/2`: the degree-5 polynomial fitted for least maximum relative error
    /// on that interval.
    #[inline(always)]
    fn poly<S: Simd>(s: S, f: S::V) -> S::V {
        let mut p = s.splat(1.327_647_1e-3);
        for c in [
            9.675_542e-3,
            5.550_713e-2,
            2.402_212e-1,
            6.931_469_4e-1,
            1.000_000_1,
        ] {
            p = s.fmadd(p, f, s.splat(c));
        }
        p
    }

    /// Running maximum and sum of the online softmax, one lane per query row.
    struct Softmax<V, const NQ: usize> {
        m: [V; NQ],
        l: [V; NQ],
    }

    /// One task: the `[d][QW]` queries `qt` of head `h` against every block of its item, then
    /// the normalised output written over `qt`. `NQ` query vectors, `KQ` keys per logit
    /// micro-tile, `KD` head dimensions per output micro-tile.
    #[inline(always)]
    fn task<S: Simd, const NQ: usize, const KQ: usize, const KD: usize>(
        s: S,
        sc: &mut Scratch,
        qt: &mut [f32],
        blocks: &[Packed],
        h: usize,
        d: usize,
    ) {
        const {
            assert!(NQ * S::LANES == S::QW && S::QW <= MAX_QW);
            assert!(KQ == S::KQ && KQ <= TILE && KD >= 1 && KD <= 8);
        }
        let (lanes, qw) = (S::LANES, S::QW);
        let tile_keys = TILE / KQ * KQ;
        // What `tile`'s contract needs of the queries and the scratch.
        assert_eq!(qt.len(), d * qw, "flash attention: a task's queries");
        sc.reset(d, qw);
        let mut st = Softmax {
            m: [s.splat(f32::NEG_INFINITY); NQ],
            l: [s.zero(); NQ],
        };
        for p in blocks {
            // A tile must be whole micro-tiles (`pack` pads to them).
            assert_eq!(
                p.mpad % KQ,
                0,
                "flash attention: a block packed for another width"
            );
            let kh = &p.keys[h * p.mpad * d..][..p.mpad * d];
            let vh = &p.values[h * p.mpad * d..][..p.mpad * d];
            let mut t0 = 0;
            while t0 < p.mpad {
                let tl = tile_keys.min(p.mpad - t0);
                let valid = p.kept.saturating_sub(t0).min(tl);
                // SAFETY: `qt` holds `[d][qw]` (asserted above) and `sc` was reset for `d` and
                // `qw`; `tl <= tile_keys <= TILE` is a multiple of `KQ` (`tile_keys`, `mpad` and
                // `t0` are), `valid <= tl`, and `kt`/`vt` are sliced to `tl` rows of `d` floats.
                unsafe {
                    tile::<S, NQ, KQ, KD>(
                        s,
                        sc,
                        qt.as_ptr(),
                        &mut st,
                        d,
                        &kh[t0 * d..][..tl * d],
                        &vh[t0 * d..][..tl * d],
                        tl,
                        valid,
                        p.bias,
                    );
                }
                t0 += tl;
            }
        }
        let mut inv = [0f32; MAX_QW];
        for (c, &l) in st.l.iter().enumerate() {
            // SAFETY: lanes c * lanes..(c + 1) * lanes of `inv`, below `qw <= MAX_QW`.
            unsafe { s.store(inv.as_mut_ptr().wrapping_add(c * lanes), l) };
        }
        let inv = &mut inv[..qw];
        inv.iter_mut().for_each(|x| *x = 1.0 / *x);
        for (o, x) in qt.chunks_exact_mut(qw).zip(sc.ot.chunks_exact(qw)) {
            for ((o, &x), &inv) in o.iter_mut().zip(x).zip(&*inv) {
                *o = x * inv;
            }
        }
    }

    /// One tile of `tl` packed keys (`valid` of them real, the rest zero padding) for the
    /// task's query rows: logits, online-softmax update and the value product.
    ///
    /// # Safety
    /// - `qp` must be valid for reads of `d * QW` floats (the task's queries, `[d][QW]`).
    /// - `sc` must have been [`Scratch::reset`] for this `d` and `QW`: `sc.s` holds `TILE * QW`
    ///   floats and `sc.ot` `d * QW`.
    /// - `tl` must be a multiple of `KQ` with `tl <= TILE`, and `valid <= tl`.
    /// - `kt` and `vt` must hold at least `tl * d` floats (`tl` rows of `d`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<S: Simd, const NQ: usize, const KQ: usize, const KD: usize>(
        s: S,
        sc: &mut Scratch,
        qp: *const f32,
        st: &mut Softmax<S::V, NQ>,
        d: usize,
        kt: &[f32],
        vt: &[f32],
        tl: usize,
        valid: usize,
        bias: f32,
    ) {
        let (lanes, qw) = (S::LANES, S::QW);
        let sp = sc.s.as_mut_ptr();
        let mut mx = [s.splat(f32::NEG_INFINITY); NQ];
        for j0 in (0..tl).step_by(KQ) {
            // SAFETY: keys j0..j0 + KQ of `kt` and logit rows j0..j0 + KQ of `sc.s`, in bounds
            // as `j0 + KQ <= tl <= TILE` (`tl` a multiple of `KQ`); `qp` holds `[d][QW]`.
            unsafe {
                qk::<S, NQ, KQ>(
                    s,
                    qp,
                    d,
                    kt.as_ptr().wrapping_add(j0 * d),
                    sp.wrapping_add(j0 * qw),
                    valid.saturating_sub(j0),
                    &mut mx,
                );
            }
        }
        let b = s.splat(bias);
        let mut alpha = [s.zero(); NQ];
        let mut shift = [s.zero(); NQ];
        for c in 0..NQ {
            let m_new = s.max(st.m[c], s.add(mx[c], b));
            // 2^-inf is 0: the first tile scales the empty output by 0.
            alpha[c] = s.exp2(s.sub(st.m[c], m_new));
            shift[c] = s.sub(b, m_new);
            st.m[c] = m_new;
        }
        let mut sum = [s.zero(); NQ];
        for j in 0..valid {
            for c in 0..NQ {
                let at = sp.wrapping_add(j * qw + c * lanes);
                // SAFETY: logit row `j < valid <= tl <= TILE` of `sc.s` (`TILE * QW` floats),
                // lanes c * LANES.. with `c < NQ`.
                unsafe {
                    let e = s.exp2(s.add(s.load(at), shift[c]));
                    sum[c] = s.add(sum[c], e);
                    s.store(at, e);
                }
            }
        }
        for j in valid..tl {
            for c in 0..NQ {
                // SAFETY: as above, rows `j < tl <= TILE`.
                unsafe { s.store(sp.wrapping_add(j * qw + c * lanes), s.zero()) };
            }
        }
        for c in 0..NQ {
            st.l[c] = s.fmadd(st.l[c], alpha[c], sum[c]);
        }
        let op = sc.ot.as_mut_ptr();
        let mut d0 = 0;
        while d0 < d {
            let (v, o) = (vt.as_ptr().wrapping_add(d0), op.wrapping_add(d0 * qw));
            let nd = (d - d0).min(KD);
            // SAFETY: `nd = min(d - d0, KD)` head dimensions from d0 (each arm's `ND` is `nd`;
            // `KD <= 8`): `v` reads `vt[j * d + d0 + e]`, `j < tl`, `e < nd`, below `tl * d`;
            // `o` is rows d0..d0 + nd of the `[d][QW]` `sc.ot`; `sp` holds the tile's
            // `tl <= TILE` probability rows.
            unsafe {
                match nd {
                    1 => pv::<S, NQ, 1>(s, sp, tl, v, d, o, &alpha),
                    2 => pv::<S, NQ, 2>(s, sp, tl, v, d, o, &alpha),
                    3 => pv::<S, NQ, 3>(s, sp, tl, v, d, o, &alpha),
                    4 if KD > 4 => pv::<S, NQ, 4>(s, sp, tl, v, d, o, &alpha),
                    5 if KD > 5 => pv::<S, NQ, 5>(s, sp, tl, v, d, o, &alpha),
                    6 if KD > 6 => pv::<S, NQ, 6>(s, sp, tl, v, d, o, &alpha),
                    7 if KD > 7 => pv::<S, NQ, 7>(s, sp, tl, v, d, o, &alpha),
                    _ => pv::<S, NQ, KD>(s, sp, tl, v, d, o, &alpha),
                }
            }
            d0 += nd;
        }
    }

    /// `acc[r] += b[r * rs + i * is] * a[i]` over `n` steps `i`, where `a[i]` is the `NQ`
    /// vectors at `a + i * QW` and each `b` element is broadcast: the register-blocked loop
    /// under both products (key elements against queries, value elements against
    /// probabilities).
    ///
    /// # Safety
    /// `a` must be valid for reads of `n * QW` floats, and `b` for reads of the floats at
    /// `r * rs + i * is` for every `r < R`, `i < n`.
    #[inline(always)]
    unsafe fn fma_rows<S: Simd, const NQ: usize, const R: usize>(
        s: S,
        acc: &mut [[S::V; NQ]; R],
        a: *const f32,
        n: usize,
        b: *const f32,
        rs: usize,
        is: usize,
    ) {
        let (lanes, qw) = (S::LANES, S::QW);
        for i in 0..n {
            let mut ai = [s.zero(); NQ];
            for (c, ai) in ai.iter_mut().enumerate() {
                // SAFETY: floats i * QW + c * LANES.. of `a` (`i < n`, `c < NQ`), readable by
                // the contract.
                *ai = unsafe { s.load(a.wrapping_add(i * qw + c * lanes)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `b[r * rs + i * is]` with `r < R`, `i < n`, readable by the contract.
                let br = unsafe { s.bcast(b.wrapping_add(r * rs + i * is)) };
                for c in 0..NQ {
                    acc[c] = s.fmadd(br, ai[c], acc[c]);
                }
            }
        }
    }

    /// Logits of `KQ` keys (`k`, rows of `d` floats) against the task's queries (`qt`,
    /// `[d][QW]`) into `sp` (`[KQ][QW]`); the first `real` of them (the others are padding)
    /// also raise the running maximum `mx`, straight from the registers.
    ///
    /// # Safety
    /// `qt` must be valid for reads of `d * QW` floats, `k` for reads of `KQ * d` floats, and
    /// `sp` for writes of `KQ * QW` floats.
    #[inline(always)]
    unsafe fn qk<S: Simd, const NQ: usize, const KQ: usize>(
        s: S,
        qt: *const f32,
        d: usize,
        k: *const f32,
        sp: *mut f32,
        real: usize,
        mx: &mut [S::V; NQ],
    ) {
        let (lanes, qw) = (S::LANES, S::QW);
        let mut acc = [[s.zero(); NQ]; KQ];
        // SAFETY: `qt` holds `d` steps of `QW` floats; key `r < KQ` is `k[r * d..][..d]`.
        unsafe { fma_rows(s, &mut acc, qt, d, k, d, 1) };
        for (j, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: row `j < KQ` of the `[KQ][QW]` logits at `sp`, lanes c * LANES..
                // with `c < NQ`.
                unsafe { s.store(sp.wrapping_add(j * qw + c * lanes), a) };
                if j < real {
                    mx[c] = s.max(mx[c], a);
                }
            }
        }
    }

    /// `o[e][..] = alpha * o[e][..] + sum_j v[j][e] p[j][..]` for `ND` head dimensions `e`
    /// (`p` `[keys][QW]`, `v` row stride `vs`, `o` `[ND][QW]`).
    ///
    /// # Safety
    /// `p` must be valid for reads of `keys * QW` floats, `v` for reads of the floats at
    /// `j * vs + e` for every `j < keys`, `e < ND`, and `o` for reads and writes of `ND * QW`
    /// floats.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv<S: Simd, const NQ: usize, const ND: usize>(
        s: S,
        p: *const f32,
        keys: usize,
        v: *const f32,
        vs: usize,
        o: *mut f32,
        alpha: &[S::V; NQ],
    ) {
        let (lanes, qw) = (S::LANES, S::QW);
        let mut acc = [[s.zero(); NQ]; ND];
        for (e, acc) in acc.iter_mut().enumerate() {
            for (c, a) in acc.iter_mut().enumerate() {
                // SAFETY: row `e < ND` of the `[ND][QW]` output at `o`, lanes c * LANES..
                // with `c < NQ`.
                let x = unsafe { s.load(o.wrapping_add(e * qw + c * lanes)) };
                *a = s.mul(x, alpha[c]);
            }
        }
        // SAFETY: `p` holds `keys` steps of `QW` floats; `v[j * vs + e]`, `j < keys`, `e < ND`.
        unsafe { fma_rows(s, &mut acc, p, keys, v, 1, vs) };
        for (e, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { s.store(o.wrapping_add(e * qw + c * lanes), a) };
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Deterministic pseudo-random values in [-1, 1).
        fn rand(n: usize, seed: u64) -> Vec<f32> {
            let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        }

        /// A key/value block as `Source` reads it, owning its data.
        struct Block {
            k: Vec<f32>,
            v: Vec<f32>,
            tokens: usize,
            /// `[tokens][heads][d]` when true, else `[heads][tokens][d]`.
            token_major: bool,
            bias: f32,
            mask: Option<Vec<f32>>,
        }

        impl Block {
            fn new(tokens: usize, heads: usize, d: usize, seed: u64) -> Self {
                Self {
                    k: rand(tokens * heads * d, seed),
                    v: rand(tokens * heads * d, seed + 1),
                    tokens,
                    token_major: true,
                    bias: 0.0,
                    mask: None,
                }
            }

            /// (token, head) strides.
            fn strides(&self, heads: usize, d: usize) -> (usize, usize) {
                if self.token_major {
                    (heads * d, d)
                } else {
                    (d, self.tokens * d)
                }
            }

            fn source(&self, heads: usize, d: usize) -> Source<'_> {
                let (t, h) = self.strides(heads, d);
                Source {
                    k: &self.k,
                    v: &self.v,
                    k_token: t,
                    k_head: h,
                    v_token: t,
                    v_head: h,
                    tokens: self.tokens,
                    bias: self.bias,
                    mask: self.mask.as_deref(),
                }
            }
        }

        /// Softmax attention in f64, straight from the definition; the largest logit
        /// magnitude beside (the f32 kernel's error grows with it).
        fn reference(
            q: &[f32],
            rows: usize,
            heads: usize,
            d: usize,
            scale: f32,
            items: &[Vec<Block>],
        ) -> (Vec<f64>, f64) {
            let mut out = vec![0f64; items.len() * rows * heads * d];
            let mut big = 0f64;
            for (i, blocks) in items.iter().enumerate() {
                for r in 0..rows {
                    for h in 0..heads {
                        let qr = &q[((i * rows + r) * heads + h) * d..][..d];
                        let mut logits = Vec::new();
                        for b in blocks {
                            let (t, hs) = b.strides(heads, d);
                            for j in 0..b.tokens {
                                if b.mask.as_ref().is_some_and(|m| m[j] == 0.0) {
                                    continue;
                                }
                                let kr = &b.k[j * t + h * hs..][..d];
                                let dot: f64 =
                                    qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                                let x = dot * scale as f64 + b.bias as f64;
                                big = big.max(x.abs());
                                logits.push((x, &b.v[j * t + h * hs..][..d]));
                            }
                        }
                        let m = logits.iter().map(|l| l.0).fold(f64::NEG_INFINITY, f64::max);
                        let o = &mut out[((i * rows + r) * heads + h) * d..][..d];
                        let mut sum = 0.0;
                        for (x, vr) in &logits {
                            let p = (x - m).exp();
                            sum += p;
                            for (o, &v) in o.iter_mut().zip(*vr) {
                                *o += p * v as f64;
                            }
                        }
                        o.iter_mut().for_each(|o| *o /= sum);
                    }
                }
            }
            (out, big)
        }

        fn check(isa: Isa, rows: usize, heads: usize, d: usize, scale: f32, items: &[Vec<Block>]) {
            let q = rand(items.len() * rows * heads * d, 99 + d as u64);
            let sources: Vec<Vec<Source>> = items
                .iter()
                .map(|bl| bl.iter().map(|b| b.source(heads, d)).collect())
                .collect();
            let mut got = vec![f32::NAN; items.len() * rows * heads * d];
            let c = heads * d;
            run(
                isa,
                &q,
                rows * c,
                c,
                d,
                rows,
                heads,
                d,
                scale,
                &sources,
                &mut got,
            );
            let (want, big) = reference(&q, rows, heads, d, scale, items);
            let err = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max);
            // f32 logits of magnitude `big` are off by about `big * 2^-24` (times a few roundings).
            let tol = 2e-6 + 2e-7 * big;
            assert!(
                err <= tol,
                "{isa:?}: rows {rows} heads {heads} d {d} scale {scale}: error {err:.3e} > {tol:.3e}"
            );
        }

        /// Three items: own keys plus a masked extra block with a bias and a fully masked one;
        /// own keys only; own keys plus a long head-major block (several tiles, a partial last
        /// one) with a negative bias and a block with a single kept key.
        fn items(heads: usize, d: usize, own: usize) -> Vec<Vec<Block>> {
            let mut a = Block::new(70, heads, d, 10);
            a.bias = 0.7;
            a.mask = Some((0..70).map(|j| f32::from(j % 3 != 1 && j != 4)).collect());
            let mut none = Block::new(9, heads, d, 20);
            none.mask = Some(vec![0.0; 9]);
            let mut long = Block::new(139, heads, d, 30);
            long.token_major = false;
            long.bias = -1.3;
            let mut one = Block::new(12, heads, d, 40);
            one.bias = 2.0;
            one.mask = Some((0..12).map(|j| f32::from(j == 7)).collect());
            vec![
                vec![Block::new(own, heads, d, 1), a, none],
                vec![Block::new(own, heads, d, 2)],
                vec![Block::new(own, heads, d, 3), long, one],
            ]
        }

        #[test]
        fn every_width_matches_f64_softmax() {
            let isas = Isa::detected();
            if isas.is_empty() {
                eprintln!("no AVX2+FMA or AVX-512F: nothing to test");
            }
            for isa in isas {
                for (d, rows, own) in [
                    (40, 37, 29),
                    (64, 50, 64),
                    (80, 25, 5),
                    (1, 97, 33),
                    (3, 1, 17),
                ] {
                    for heads in [1, 3] {
                        let scale = 1.0 / (d as f32).sqrt();
                        check(isa, rows, heads, d, scale, &items(heads, d, own));
                    }
                }
                // Logits spread over hundreds: most probabilities underflow `2^x`'s range.
                check(isa, 30, 2, 64, 20.0, &items(2, 64, 40));
            }
        }

        /// `2^x` at one width against f64 over [-200, 0] and beyond; `floor` is where its results
        /// stop being normal (exactly 0 below it at AVX2, subnormal at AVX-512).
        fn exp2_case<S: Simd>(s: S, zero_below: f32) {
            let mut xs: Vec<f32> = (0..=200_000).map(|i| -(i as f32) * 1e-3).collect();
            xs.extend([
                -0.0,
                -0.5,
                -0.499_999_97,
                -0.500_000_06,
                -1.5,
                -124.5,
                -124.999_99,
                -125.0,
                -125.000_01,
                -125.5,
                -126.0,
                -149.0,
                -150.5,
                -200.0,
                -200.5,
                -1000.0,
                -1e30,
                f32::MIN,
                f32::NEG_INFINITY,
            ]);
            xs.resize(xs.len().next_multiple_of(S::LANES), 0.0);
            let mut got = vec![f32::NAN; xs.len()];
            let mut worst = 0f64;
            for (x, y) in xs
                .chunks_exact(S::LANES)
                .zip(got.chunks_exact_mut(S::LANES))
            {
                // SAFETY: `LANES` floats in each chunk.
                unsafe { s.store(y.as_mut_ptr(), s.exp2(s.load(x.as_ptr()))) };
            }
            for (&x, &y) in xs.iter().zip(&got) {
                let want = (x as f64).exp2();
                if x >= -125.0 {
                    let rel = (y as f64 - want).abs() / want;
                    worst = worst.max(rel);
                    assert!(rel < 2.5e-7, "2^{x}: {y} vs {want} ({rel:.3e})");
                } else if x < zero_below {
                    assert_eq!(y.to_bits(), 0, "2^{x}: {y} is not +0");
                } else {
                    // Subnormal: `scalef` rounds to the nearest multiple of 2^-149.
                    assert!(
                        (y as f64 - want).abs() <= 2f64.powi(-149),
                        "2^{x}: {y} vs {want}"
                    );
                }
            }
            eprintln!("worst relative error of 2^x: {worst:.3e}");
        }

        #[test]
        fn exp2_matches_f64() {
            if let Some(s) = Avx2::new() {
                exp2_case(s, -125.0);
            }
            if let Some(s) = Avx512::new() {
                exp2_case(s, -150.0);
            }
        }
    }
}
