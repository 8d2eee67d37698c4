//! AVX-512 attention with an online softmax over key tiles (chosen at run time; the `gemm`
//! path in `attention.rs` serves other CPUs). `gemm` runs the small-`d` products of attention
//! poorly: it re-packs the strided keys for every query chunk and its micro-kernel is only
//! AVX2. Here every (item, key block, head) is packed once per call into 16-key panels and
//! zero-padded value rows, and register-blocked micro-kernels compute the logits of 8 queries
//! x 32 keys and accumulate 8 output rows, so a tile's logits stay in L1/L2 and an extra key
//! block costs exactly its own arithmetic.

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

    use crate::simd::exp;
    use crate::view::SendPtr;

    /// Query rows per micro-tile and keys per logit panel.
    const MR: usize = 8;
    const LANES: usize = 16;
    /// Keys per tile of the online softmax; a tile's logits (`rows x TILE`) stay cache-resident.
    const TILE: usize = 128;
    /// Query rows per task.
    const ROWS: usize = 64;

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

    /// A source packed for one call: per head, keys as `[key / 16][d][16]` panels (zero keys
    /// past the end) and values as `[key][dpad]` rows (zero columns past `d`).
    struct Packed {
        keys: Vec<f32>,
        values: Vec<f32>,
        /// Keys rounded up to a multiple of 16.
        mpad: usize,
    }

    fn pack(src: &Source, heads: usize, d: usize, dpad: usize) -> Packed {
        let m = src.tokens;
        let mpad = m.next_multiple_of(LANES);
        let mut keys = vec![0f32; heads * mpad * d];
        let mut values = vec![0f32; heads * mpad * dpad];
        keys.chunks_mut(mpad * d).zip(values.chunks_mut(mpad * dpad)).enumerate().for_each(
            |(h, (kh, vh))| {
                for j in 0..m {
                    let k = &src.k[j * src.k_token + h * src.k_head..][..d];
                    let panel = &mut kh[(j / LANES) * d * LANES..][..d * LANES];
                    for (dd, &x) in k.iter().enumerate() {
                        panel[dd * LANES + j % LANES] = x;
                    }
                    vh[j * dpad..][..d].copy_from_slice(&src.v[j * src.v_token + h * src.v_head..][..d]);
                }
            },
        );
        Packed { keys, values, mpad }
    }

    /// Attention of `rows` query tokens (element (token, head, 0) at `token * q_token + head *
    /// q_head`, `d` floats) of each item over `sources[item]`, written as `[items, rows, heads
    /// * d]` tokens into `out`.
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
        let dpad = d.next_multiple_of(LANES);
        let items = sources.len();
        let jobs: Vec<(usize, usize)> =
            (0..items).flat_map(|i| (0..sources[i].len()).map(move |b| (i, b))).collect();
        let packed: Vec<Packed> =
            jobs.par_iter().map(|&(i, b)| pack(&sources[i][b], heads, d, dpad)).collect();
        let mut first = Vec::with_capacity(items);
        let mut at = 0;
        for s in sources {
            first.push(at);
            at += s.len();
        }
        let c = heads * d;
        let chunks = rows.div_ceil(ROWS);
        let dst = SendPtr(out.as_mut_ptr());
        (0..items * heads * chunks).into_par_iter().for_each_init(Scratch::default, |sc, task| {
            let (item, h, ci) = (task / (heads * chunks), (task / chunks) % heads, task % chunks);
            let (n0, len) = (ci * ROWS, ROWS.min(rows - ci * ROWS));
            let rpad = len.next_multiple_of(MR);
            sc.reset(rpad, d, dpad);
            for r in 0..len {
                let src = &q[item * q_item + (n0 + r) * q_token + h * q_head..][..d];
                sc.q[r * d..][..d].iter_mut().zip(src).for_each(|(x, &s)| *x = s * scale);
            }
            for (b, src) in sources[item].iter().enumerate() {
                let p = &packed[first[item] + b];
                let kh = &p.keys[h * p.mpad * d..][..p.mpad * d];
                let vh = &p.values[h * p.mpad * dpad..][..p.mpad * dpad];
                let mut t0 = 0;
                while t0 < p.mpad {
                    let tl = TILE.min(p.mpad - t0);
                    // SAFETY: the CPU has AVX-512F (checked by the caller through `available`).
                    unsafe {
                        tile(sc, rpad, d, dpad, &kh[t0 * d..][..tl * d], &vh[t0 * dpad..][..tl * dpad], tl, t0, src);
                    }
                    t0 += tl;
                }
            }
            #[allow(clippy::redundant_locals)]
            let dst = dst;
            for r in 0..len {
                // SAFETY: row n0 + r, columns h*d..(h+1)*d of this item: this task's alone.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(item * rows * c + (n0 + r) * c + h * d), d) };
                let inv = 1.0 / sc.l[r];
                o.iter_mut().zip(&sc.o[r * dpad..][..d]).for_each(|(x, &v)| *x = v * inv);
            }
        });
    }

    #[derive(Default)]
    struct Scratch {
        q: Vec<f32>,
        s: Vec<f32>,
        o: Vec<f32>,
        m: Vec<f32>,
        l: Vec<f32>,
    }

    impl Scratch {
        fn reset(&mut self, rpad: usize, d: usize, dpad: usize) {
            self.q.clear();
            self.q.resize(rpad * d, 0.0);
            self.s.resize(rpad * TILE, 0.0);
            self.o.clear();
            self.o.resize(rpad * dpad, 0.0);
            self.m.clear();
            self.m.resize(rpad, f32::NEG_INFINITY);
            self.l.clear();
            self.l.resize(rpad, 0.0);
        }
    }

    /// One key tile (`tl` keys from key `t0` of `src`, a multiple of 16) for all `rpad` rows:
    /// logits, bias/mask, online-softmax update and the value product.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        sc: &mut Scratch,
        rpad: usize,
        d: usize,
        dpad: usize,
        kt: &[f32],
        vt: &[f32],
        tl: usize,
        t0: usize,
        src: &Source,
    ) {
        let sp = sc.s.as_mut_ptr();
        for r0 in (0..rpad).step_by(MR) {
            let qp = sc.q.as_ptr().add(r0 * d);
            let mut g = 0;
            while g + 2 * LANES <= tl {
                qk::<2>(qp, d, kt.as_ptr().add(g * d), sp.add(r0 * TILE + g));
                g += 2 * LANES;
            }
            if g < tl {
                qk::<1>(qp, d, kt.as_ptr().add(g * d), sp.add(r0 * TILE + g));
            }
        }
        // Keys past the end of the block (zero padding) and masked keys get -inf: exp makes
        // their probability exactly 0.
        let valid = src.tokens.saturating_sub(t0).min(tl);
        let mask = src.mask.map(|m| &m[t0.min(m.len())..(t0 + valid).min(m.len())]);
        for r in 0..rpad {
            let row = &mut sc.s[r * TILE..][..tl];
            if src.bias != 0.0 || mask.is_some() {
                match mask {
                    Some(mask) => row[..valid].iter_mut().zip(mask).for_each(|(x, &keep)| {
                        *x = if keep != 0.0 { *x + src.bias } else { f32::NEG_INFINITY }
                    }),
                    None => row[..valid].iter_mut().for_each(|x| *x += src.bias),
                }
            }
            row[valid..].fill(f32::NEG_INFINITY);
            let o = &mut sc.o[r * dpad..][..dpad];
            softmax_update(row, &mut sc.m[r], &mut sc.l[r], o);
        }
        let op = sc.o.as_mut_ptr();
        for r0 in (0..rpad).step_by(MR) {
            let mut c0 = 0;
            while c0 < dpad {
                let p = sp.add(r0 * TILE);
                let (v, o) = (vt.as_ptr().add(c0), op.add(r0 * dpad + c0));
                match (dpad - c0) / LANES {
                    1 => pv::<1>(p, tl, v, dpad, o, dpad),
                    2 => pv::<2>(p, tl, v, dpad, o, dpad),
                    _ => pv::<3>(p, tl, v, dpad, o, dpad),
                }
                c0 += LANES * ((dpad - c0) / LANES).min(3);
            }
        }
    }

    /// Turns a row of logits into probabilities relative to the row's running maximum `m`,
    /// rescaling the running sum `l` and output row `o` when the maximum grows.
    #[inline(always)]
    fn softmax_update(row: &mut [f32], m: &mut f32, l: &mut f32, o: &mut [f32]) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for c in row.chunks_exact(LANES) {
            for i in 0..LANES {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        let tmax = lanes.iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
        let new = if tmax > *m { tmax } else { *m };
        if new == f32::NEG_INFINITY {
            // Everything so far is masked: nothing to add.
            row.fill(0.0);
            return;
        }
        let mut sums = [0f32; LANES];
        for c in row.chunks_exact_mut(LANES) {
            for i in 0..LANES {
                c[i] = exp(c[i] - new);
                sums[i] += c[i];
            }
        }
        let sum: f32 = sums.iter().sum();
        if new != *m {
            let alpha = exp(*m - new);
            *l *= alpha;
            o.iter_mut().for_each(|x| *x *= alpha);
            *m = new;
        }
        *l += sum;
    }

    // Pointer arithmetic in the micro-kernels is `wrapping_add`, and memory goes through masked
    // load/store intrinsics (full mask: the same instructions): `add`, `*p` and the plain
    // `loadu`/`storeu` (`read_unaligned`) carry UB checks in debug-assertion builds such as the
    // dev profile, which would sit in the innermost loops and force spills.

    /// `*p` in every lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bcast(p: *const f32) -> __m512 {
        _mm512_broadcastss_ps(_mm_load_ss(p))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_maskz_loadu_ps(!0, p)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, a: __m512) {
        _mm512_mask_storeu_ps(p, !0, a)
    }

    /// Logits of 8 query rows (`q`, `d` floats each) against `NP` 16-key panels (`kp`,
    /// `[NP][d][16]`) into `s` (row stride `TILE`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn qk<const NP: usize>(q: *const f32, d: usize, kp: *const f32, s: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for dd in 0..d {
            let mut k = [_mm512_setzero_ps(); NP];
            for (p, k) in k.iter_mut().enumerate() {
                *k = load(kp.wrapping_add((p * d + dd) * LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let qb = bcast(q.wrapping_add(r * d + dd));
                for p in 0..NP {
                    acc[p] = _mm512_fmadd_ps(qb, k[p], acc[p]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, &a) in acc.iter().enumerate() {
                store(s.wrapping_add(r * TILE + p * LANES), a);
            }
        }
    }

    /// `o[r][0..16 NV] += sum_j p[r][j] v[j][0..16 NV]` for 8 rows (`p` row stride `TILE`,
    /// `v` row stride `vs`, `o` row stride `os`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const NV: usize>(p: *const f32, keys: usize, v: *const f32, vs: usize, o: *mut f32, os: usize) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (c, a) in acc.iter_mut().enumerate() {
                *a = load(o.wrapping_add(r * os + c * LANES));
            }
        }
        for j in 0..keys {
            let mut vv = [_mm512_setzero_ps(); NV];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = load(v.wrapping_add(j * vs + c * LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let pb = bcast(p.wrapping_add(r * TILE + j));
                for c in 0..NV {
                    acc[c] = _mm512_fmadd_ps(pb, vv[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                store(o.wrapping_add(r * os + c * LANES), a);
            }
        }
    }
}
