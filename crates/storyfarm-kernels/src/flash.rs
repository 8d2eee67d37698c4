//! AVX-512 attention with an online softmax over key tiles (chosen at run time; the `gemm`
//! path in `attention.rs` serves other CPUs). Queries sit in the SIMD lanes: a task takes 48
//! query rows of one head, transposed to `[d][48]`, and every key (or value) element is a
//! broadcast scalar. So no head size is padded (SD's 40 and 80 are not multiples of 16), the
//! softmax statistics of 48 rows are three vectors (the row maximum is a vertical max over the
//! tile's keys, not a horizontal reduction per row), and masked keys are dropped when a block is
//! packed instead of being computed and thrown away. An extra key block costs exactly its own
//! arithmetic; a tile's logits (`64 x 48`) stay in L1.

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::{available, run, Source};

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use crate::view::SendPtr;

    const LANES: usize = 16;
    /// Vectors of queries per task, and the query rows they hold.
    const NQ: usize = 3;
    const QW: usize = NQ * LANES;
    /// Keys per logit micro-tile and head dimensions per output micro-tile.
    const KB: usize = 8;
    /// Keys per tile of the online softmax; a tile's logits (`TILE x QW`) stay in L1.
    const TILE: usize = 64;

    pub(crate) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
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
    /// rows, zero rows up to a multiple of `KB`.
    struct Packed {
        keys: Vec<f32>,
        values: Vec<f32>,
        /// Kept (unmasked) keys.
        kept: usize,
        /// `kept` rounded up to a multiple of `KB`.
        mpad: usize,
        /// The block's logit bias, in base 2 like the logits.
        bias: f32,
    }

    fn pack(src: &Source, heads: usize, d: usize) -> Packed {
        let kept: Vec<usize> = match src.mask {
            Some(mask) => (0..src.tokens)
                .filter(|&j| mask.get(j).is_none_or(|&keep| keep != 0.0))
                .collect(),
            None => (0..src.tokens).collect(),
        };
        let mpad = kept.len().next_multiple_of(KB);
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
    /// * d]` tokens into `out`.
    ///
    /// # Panics
    /// If the CPU lacks AVX-512F (check [`available`] first), or `out` does not hold
    /// `items * rows * heads * d` floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
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
        // Both are what the unsafe blocks below rely on; once per call, outside the loops.
        assert!(available(), "flash attention needs AVX-512F");
        assert_eq!(
            out.len(),
            items * rows * heads * d,
            "flash attention: output of {items} x {rows} tokens of {heads} x {d}"
        );
        let jobs: Vec<(usize, usize)> = (0..items)
            .flat_map(|i| (0..sources[i].len()).map(move |b| (i, b)))
            .collect();
        let packed: Vec<Packed> = jobs
            .par_iter()
            .map(|&(i, b)| pack(&sources[i][b], heads, d))
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
        let chunks = rows.div_ceil(QW);
        let blk = d * QW;
        // Queries of each (item, chunk, head) scaled and transposed to `[d][QW]` in one pass
        // that reads whole token rows (a task gathering its own rows would miss the cache on
        // every one); each task then overwrites its block with its normalised output, which a
        // last pass writes back as whole token rows.
        let mut qo = vec![0f32; items * chunks * heads * blk];
        qo.par_chunks_mut(heads * blk)
            .enumerate()
            .for_each(|(ic, dst)| {
                let (item, ci) = (ic / chunks, ic % chunks);
                let (n0, len) = (ci * QW, QW.min(rows - ci * QW));
                for r in 0..len {
                    let base = item * q_item + (n0 + r) * q_token;
                    for (h, o) in dst.chunks_exact_mut(blk).enumerate() {
                        for (dd, &x) in q[base + h * q_head..][..d].iter().enumerate() {
                            o[dd * QW + r] = x * scale2;
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
                sc.reset(d);
                let mut state = Softmax::new();
                for p in &packed[first[item]..][..sources[item].len()] {
                    let kh = &p.keys[h * p.mpad * d..][..p.mpad * d];
                    let vh = &p.values[h * p.mpad * d..][..p.mpad * d];
                    let mut t0 = 0;
                    while t0 < p.mpad {
                        let tl = TILE.min(p.mpad - t0);
                        let valid = (p.kept - t0).min(tl);
                        // SAFETY: the CPU has AVX-512F (asserted at the top of `run`); `qt` is the
                        // task's `[d][QW]` block and `sc` was reset for `d` above; `tl <= TILE`
                        // is a multiple of `KB` (`TILE`, `mpad` and `t0` are), `valid <= tl`, and
                        // `kt`/`vt` are sliced to `tl` rows of `d` floats.
                        unsafe {
                            tile(
                                sc,
                                qt.as_ptr(),
                                &mut state,
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
                let inv = state.inverse_sums();
                for (o, x) in qt.chunks_exact_mut(QW).zip(sc.ot.chunks_exact(QW)) {
                    for ((o, &x), &inv) in o.iter_mut().zip(x).zip(&inv) {
                        *o = x * inv;
                    }
                }
            });
        let dst = SendPtr(out.as_mut_ptr());
        qo.par_chunks(heads * blk)
            .enumerate()
            .for_each(|(ic, src)| {
                let (item, ci) = (ic / chunks, ic % chunks);
                let (n0, len) = (ci * QW, QW.min(rows - ci * QW));
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
                            *x = b[dd * QW + r];
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
        fn reset(&mut self, d: usize) {
            self.s.resize(TILE * QW, 0.0);
            self.ot.clear();
            self.ot.resize(d * QW, 0.0);
        }
    }

    /// Running maximum and sum of the online softmax, one lane per query row.
    struct Softmax {
        m: [f32; QW],
        l: [f32; QW],
    }

    impl Softmax {
        fn new() -> Self {
            Self {
                m: [f32::NEG_INFINITY; QW],
                l: [0.0; QW],
            }
        }

        fn inverse_sums(&self) -> [f32; QW] {
            self.l.map(|l| 1.0 / l)
        }
    }

    /// One tile of `tl` packed keys (`valid` of them real, the rest zero padding) for the
    /// task's 48 query rows: logits, online-softmax update and the value product.
    ///
    /// # Safety
    /// - The CPU must support AVX-512F.
    /// - `qp` must be valid for reads of `d * QW` floats (the task's queries, `[d][QW]`).
    /// - `sc` must have been [`Scratch::reset`] for this `d`: `sc.s` holds `TILE * QW` floats
    ///   and `sc.ot` `d * QW`.
    /// - `tl` must be a multiple of `KB` with `tl <= TILE`, and `valid <= tl`.
    /// - `kt` and `vt` must hold at least `tl * d` floats (`tl` rows of `d`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        sc: &mut Scratch,
        qp: *const f32,
        st: &mut Softmax,
        d: usize,
        kt: &[f32],
        vt: &[f32],
        tl: usize,
        valid: usize,
        bias: f32,
    ) {
        let sp = sc.s.as_mut_ptr();
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); NQ];
        for j0 in (0..tl).step_by(KB) {
            // SAFETY: keys j0..j0 + KB of `kt` and logit rows j0..j0 + KB of `sc.s`, in bounds
            // as `j0 + KB <= tl <= TILE` (`tl` a multiple of `KB`); `qp` holds `[d][QW]`.
            unsafe {
                qk(
                    qp,
                    d,
                    kt.as_ptr().wrapping_add(j0 * d),
                    sp.wrapping_add(j0 * QW),
                    valid.saturating_sub(j0),
                    &mut mx,
                );
            }
        }
        let mut alpha = [_mm512_setzero_ps(); NQ];
        let mut m_new = [_mm512_setzero_ps(); NQ];
        let mut sum = [_mm512_setzero_ps(); NQ];
        let b = _mm512_set1_ps(bias);
        for c in 0..NQ {
            // SAFETY: lanes c * LANES..(c + 1) * LANES of the `QW` floats of `st.m` (`c < NQ`);
            // the CPU has AVX-512F (this function's contract).
            unsafe {
                let mx = mx[c];
                let m_old = load(st.m.as_ptr().wrapping_add(c * LANES));
                m_new[c] = _mm512_max_ps(m_old, _mm512_add_ps(mx, b));
                // 2^-inf is 0: the first tile scales the empty output by 0.
                alpha[c] = exp2_16(_mm512_sub_ps(m_old, m_new[c]));
                store(st.m.as_mut_ptr().wrapping_add(c * LANES), m_new[c]);
            }
        }
        let shift: [__m512; NQ] = std::array::from_fn(|c| _mm512_sub_ps(b, m_new[c]));
        for j in 0..valid {
            for c in 0..NQ {
                // SAFETY: logit row `j < valid <= tl <= TILE` of `sc.s` (`TILE * QW` floats),
                // lanes c * LANES.. with `c < NQ`; the CPU has AVX-512F.
                unsafe {
                    let at = sp.wrapping_add(j * QW + c * LANES);
                    let e = exp2_16(_mm512_add_ps(load(at), shift[c]));
                    sum[c] = _mm512_add_ps(sum[c], e);
                    store(at, e);
                }
            }
        }
        for j in valid..tl {
            for c in 0..NQ {
                // SAFETY: as above, rows `j < tl <= TILE`.
                unsafe { store(sp.wrapping_add(j * QW + c * LANES), _mm512_setzero_ps()) };
            }
        }
        for c in 0..NQ {
            let lp = st.l.as_mut_ptr().wrapping_add(c * LANES);
            // SAFETY: lanes c * LANES.. of the `QW` floats of `st.l` (`c < NQ`).
            unsafe { store(lp, _mm512_fmadd_ps(load(lp), alpha[c], sum[c])) };
        }
        let op = sc.ot.as_mut_ptr();
        let mut d0 = 0;
        while d0 < d {
            let (v, o) = (vt.as_ptr().wrapping_add(d0), op.wrapping_add(d0 * QW));
            // SAFETY: `ND = min(d - d0, KB)` head dimensions from d0: `v` reads `vt[j * d + d0
            // + e]`, `j < tl`, `e < ND`, below `tl * d`; `o` is rows d0..d0 + ND of the
            // `[d][QW]` `sc.ot`; `sp` holds the tile's `tl <= TILE` probability rows.
            unsafe {
                match d - d0 {
                    1 => pv::<1>(sp, tl, v, d, o, &alpha),
                    2 => pv::<2>(sp, tl, v, d, o, &alpha),
                    3 => pv::<3>(sp, tl, v, d, o, &alpha),
                    4 => pv::<4>(sp, tl, v, d, o, &alpha),
                    5 => pv::<5>(sp, tl, v, d, o, &alpha),
                    6 => pv::<6>(sp, tl, v, d, o, &alpha),
                    7 => pv::<7>(sp, tl, v, d, o, &alpha),
                    _ => pv::<KB>(sp, tl, v, d, o, &alpha),
                }
            }
            d0 += KB;
        }
    }

    // Pointer arithmetic in the micro-kernels is `wrapping_add`, and memory goes through masked
    // load/store intrinsics (full mask: the same instructions): `add`, `*p` and the plain
    // `loadu`/`storeu` (`read_unaligned`) carry UB checks in debug-assertion builds, which
    // would sit in the innermost loops and force spills.

    /// `*p` in every lane.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `p` must be valid for reads of one `f32` (any
    /// alignment).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bcast(p: *const f32) -> __m512 {
        // SAFETY: `p` is readable (this function's contract); `_mm_load_ss` needs no alignment.
        _mm512_broadcastss_ps(unsafe { _mm_load_ss(p) })
    }

    /// The 16 floats at `p`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `p` must be valid for reads of 16 consecutive `f32`s
    /// (any alignment).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: all 16 lanes of `p` are readable (contract); the load is unaligned.
        unsafe { _mm512_maskz_loadu_ps(!0, p) }
    }

    /// `a` into the 16 floats at `p`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `p` must be valid for writes of 16 consecutive `f32`s
    /// (any alignment).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, a: __m512) {
        // SAFETY: all 16 lanes of `p` are writable (contract); the store is unaligned.
        unsafe { _mm512_mask_storeu_ps(p, !0, a) }
    }

    /// `2^x` in every lane (`x <= 0` here, relative error below 2.5e-7): `2^n` by `scalef`
    /// and `2^f`, `|f| <= 1/2`, by a degree-5 polynomial fitted for least maximum relative
    /// error on that interval. Below -200 (and for `-inf`) the result is exactly 0.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp2_16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-200.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(1.327_647_1e-3);
        for c in [
            9.675_542e-3,
            5.550_713e-2,
            2.402_212e-1,
            6.931_469_4e-1,
            1.000_000_1,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `acc[r] += b[r * rs + i * is] * a[i]` over `n` steps `i`, where `a[i]` is the `NQ`
    /// vectors at `a + i * QW` and each `b` element is broadcast: the register-blocked loop
    /// under both products (key elements against queries, value elements against
    /// probabilities).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` must be valid for reads of `n * QW` floats, and `b`
    /// for reads of the floats at `r * rs + i * is` for every `r < R`, `i < n`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_rows<const R: usize>(
        acc: &mut [[__m512; NQ]; R],
        a: *const f32,
        n: usize,
        b: *const f32,
        rs: usize,
        is: usize,
    ) {
        for i in 0..n {
            // SAFETY: floats i * QW..(i + 1) * QW of `a` (`i < n`, `c < NQ`), readable by the
            // contract.
            let ai: [__m512; NQ] =
                std::array::from_fn(|c| unsafe { load(a.wrapping_add(i * QW + c * LANES)) });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `b[r * rs + i * is]` with `r < R`, `i < n`, readable by the contract.
                let br = unsafe { bcast(b.wrapping_add(r * rs + i * is)) };
                for c in 0..NQ {
                    acc[c] = _mm512_fmadd_ps(br, ai[c], acc[c]);
                }
            }
        }
    }

    /// Logits of `KB` keys (`k`, rows of `d` floats) against the task's queries (`qt`,
    /// `[d][QW]`) into `s` (`[KB][QW]`); the first `real` of them (the others are padding)
    /// also raise the running maximum `mx`, straight from the registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `qt` must be valid for reads of `d * QW` floats, `k` for
    /// reads of `KB * d` floats, and `s` for writes of `KB * QW` floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn qk(
        qt: *const f32,
        d: usize,
        k: *const f32,
        s: *mut f32,
        real: usize,
        mx: &mut [__m512; NQ],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NQ]; KB];
        // SAFETY: `qt` holds `d` steps of `QW` floats; key `r < KB` is `k[r * d..][..d]`.
        unsafe { fma_rows(&mut acc, qt, d, k, d, 1) };
        for (j, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: row `j < KB` of the `[KB][QW]` logits at `s`, lanes c * LANES..
                // with `c < NQ`.
                unsafe { store(s.wrapping_add(j * QW + c * LANES), a) };
                if j < real {
                    mx[c] = _mm512_max_ps(mx[c], a);
                }
            }
        }
    }

    /// `o[e][..] = alpha * o[e][..] + sum_j v[j][e] p[j][..]` for `ND` head dimensions `e`
    /// (`p` `[keys][QW]`, `v` row stride `vs`, `o` `[ND][QW]`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `p` must be valid for reads of `keys * QW` floats, `v`
    /// for reads of the floats at `j * vs + e` for every `j < keys`, `e < ND`, and `o` for
    /// reads and writes of `ND * QW` floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const ND: usize>(
        p: *const f32,
        keys: usize,
        v: *const f32,
        vs: usize,
        o: *mut f32,
        alpha: &[__m512; NQ],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NQ]; ND];
        for (e, acc) in acc.iter_mut().enumerate() {
            for (c, a) in acc.iter_mut().enumerate() {
                // SAFETY: row `e < ND` of the `[ND][QW]` output at `o`, lanes c * LANES..
                // with `c < NQ`.
                let x = unsafe { load(o.wrapping_add(e * QW + c * LANES)) };
                *a = _mm512_mul_ps(x, alpha[c]);
            }
        }
        // SAFETY: `p` holds `keys` steps of `QW` floats; `v[j * vs + e]`, `j < keys`, `e < ND`.
        unsafe { fma_rows(&mut acc, p, keys, v, 1, vs) };
        for (e, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { store(o.wrapping_add(e * QW + c * LANES), a) };
            }
        }
    }
}
