//! Packed sgemm for stable Rust at AVX-512 or AVX2+FMA width (chosen at run time): the `gemm`
//! crate reaches its AVX-512 kernels only on nightly, its AVX2 micro-kernel leaves half of an
//! AVX-512 core's FMA throughput unused, and on AVX2-only CPUs its blocking (sized per product
//! from the cache sizes) packs both operands on every call where ours reads weights packed once.
//! Goto-style blocking: a `KC x NC` block of the right operand packed into 32-column panels
//! (shared by the threads), per thread an `MC x KC` block of the left operand packed into 12-row
//! panels, and a 12 x 32 register-blocked micro-kernel; edges go through a zero-padded tile. The
//! panel layout is the same at both widths (a weight packed once serves either kernel): AVX-512
//! holds the 12 x 32 tile in 24 registers, AVX2 (16 registers) runs it as four 6 x 16 blocks.

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::{sgemm, sgemm_ops, Lhs, Rhs};
// The `openblas` build keeps weights unpacked (OpenBLAS takes the products).
#[cfg(all(target_arch = "x86_64", not(feature = "openblas")))]
pub(crate) use imp::{
    available, pack_lhs_all, pack_rhs_all, sgemm_geglu, unpack_lhs_all, unpack_rhs_all,
};

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use crate::isa::Isa;
    use crate::matmul::Mat;

    const MR: usize = 12;
    const NR: usize = 32;
    const KC: usize = 256;
    const MC: usize = 192;
    const NC: usize = 4096;
    /// Below this many multiply-adds the `gemm` crate's lower overhead wins.
    const MIN_MACS: usize = 1 << 18;

    #[derive(Clone, Copy)]
    struct Ptr(*mut f32);
    // SAFETY: a `Ptr` is only an address (every write through it is an `unsafe` operation of
    // its own); the threads of one product write disjoint row blocks of the destination.
    unsafe impl Send for Ptr {}
    // SAFETY: as for `Send`: shared, it is only copied out, never written through by two
    // threads at the same element.
    unsafe impl Sync for Ptr {}
    impl Ptr {
        fn get(&self) -> *mut f32 {
            self.0
        }
    }

    /// The left operand: strided, or pre-packed by [`pack_lhs_all`] (a layer's weight).
    #[derive(Clone, Copy)]
    pub(crate) enum Lhs<'a> {
        Mat(Mat),
        Packed(&'a [f32]),
    }

    /// Writes `panel[kk][j] = rhs[pc + kk][j0 + j]` for `kk < kc`, `j < cols`; `(panel, pc,
    /// kc, j0, cols)`. Lets a convolution build its im2col panels in place.
    pub(crate) type Fill<'a> = &'a (dyn Fn(&mut [f32], usize, usize, usize, usize) + Sync);

    /// The right operand: strided, pre-packed by [`pack_rhs_all`], or built panel by panel.
    #[derive(Clone, Copy)]
    pub(crate) enum Rhs<'a> {
        Mat(Mat),
        Packed(&'a [f32]),
        Fill(Fill<'a>),
    }

    #[derive(Clone, Copy)]
    struct Ops<'a>(Lhs<'a>, Rhs<'a>);
    // SAFETY: the only non-`Send` parts are the operands' raw pointers, which every thread
    // only reads through while the product runs (the caller of `sgemm_ops` / `sgemm_geglu`
    // promises that nothing writes them meanwhile); a `Fill` is a `Sync` closure.
    unsafe impl Send for Ops<'_> {}
    // SAFETY: as for `Send`.
    unsafe impl Sync for Ops<'_> {}
    impl<'a> Ops<'a> {
        // Accessors, so closures capture the `Sync` wrapper rather than its fields.
        fn lhs(&self) -> Lhs<'a> {
            self.0
        }
        fn rhs(&self) -> Rhs<'a> {
            self.1
        }
    }

    #[cfg_attr(feature = "openblas", allow(dead_code))]
    pub(crate) fn available() -> bool {
        Isa::best().is_some()
    }

    /// The micro-kernel's signature: `c[12][32] = (overwrite ? 0 : c) + scale * a b` (see
    /// [`kernel_avx512`] for the contract, the same for every width).
    type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, f32, bool);

    /// The micro-kernel and GEGLU gate for an instruction set.
    ///
    /// # Safety
    /// The CPU must support `isa` (the functions returned assume it).
    unsafe fn kernels(isa: Isa) -> (Kernel, GateTile) {
        match isa {
            Isa::Avx512 => (kernel_avx512, crate::geglu::gate_tile_avx512),
            Isa::Avx2 => (kernel_avx2, crate::geglu::gate_tile_avx2),
        }
    }

    /// `gated[i][l]` from a `[rows][32]` tile (see `geglu.rs`).
    type GateTile = unsafe fn(&[f32], &[f32], &mut [f32]);

    /// The depth of every k block but the last; equal blocks, so no short block pays a full
    /// block's load and store of the destination tile. Packed operands use the same split.
    fn k_block(k: usize) -> usize {
        k.div_ceil(k.div_ceil(KC).max(1)).max(1)
    }

    /// `lhs` `[m, k]` in the 12-row panels [`sgemm_ops`] reads for [`Lhs::Packed`].
    ///
    /// # Safety
    /// `lhs` must be valid for reads of every element (i, p), `i < m`, `p < k` (each inside
    /// the allocation `lhs.ptr` points into), none of them written during the call.
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    pub(crate) unsafe fn pack_lhs_all(lhs: Mat, m: usize, k: usize) -> Vec<f32> {
        let (kb, rp) = (k_block(k), m.div_ceil(MR));
        let mut out = vec![0f32; rp * MR * k];
        for pc in (0..k).step_by(kb) {
            let kc = kb.min(k - pc);
            for r in 0..rp {
                let i0 = r * MR;
                // SAFETY: rows i0..i0 + min(MR, m - i0) (`i0 < m`), columns pc..pc + kc
                // (`pc + kc <= k`) of `lhs`, valid by the contract.
                unsafe {
                    pack_lhs(
                        &mut out[pc * rp * MR + r * kc * MR..][..kc * MR],
                        lhs,
                        i0,
                        MR.min(m - i0),
                        pc,
                        kc,
                    );
                }
            }
        }
        out
    }

    /// `rhs` `[k, n]` in the 32-column panels [`sgemm_ops`] reads for [`Rhs::Packed`].
    ///
    /// # Safety
    /// `rhs` must be valid for reads of every element (p, j), `p < k`, `j < n` (each inside
    /// the allocation `rhs.ptr` points into), none of them written during the call.
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    pub(crate) unsafe fn pack_rhs_all(rhs: Mat, k: usize, n: usize) -> Vec<f32> {
        let (kb, np) = (k_block(k), n.div_ceil(NR));
        let mut out = vec![0f32; np * NR * k];
        for pc in (0..k).step_by(kb) {
            let kc = kb.min(k - pc);
            for p in 0..np {
                let j0 = p * NR;
                // SAFETY: rows pc..pc + kc (`pc + kc <= k`), columns j0..j0 + min(NR, n - j0)
                // (`j0 < n`) of `rhs`, valid by the contract.
                unsafe {
                    pack_rhs(
                        &mut out[pc * np * NR + p * kc * NR..][..kc * NR],
                        rhs,
                        pc,
                        kc,
                        j0,
                        NR.min(n - j0),
                    );
                }
            }
        }
        out
    }

    /// The `[m, k]` matrix [`pack_lhs_all`] packed.
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    pub(crate) fn unpack_lhs_all(data: &[f32], m: usize, k: usize) -> Vec<f32> {
        unpack_panels(data, m, k, MR)
    }

    /// The `[n, k]` transpose of the `[k, n]` matrix [`pack_rhs_all`] packed (a linear
    /// weight's own layout).
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    pub(crate) fn unpack_rhs_all(data: &[f32], k: usize, n: usize) -> Vec<f32> {
        unpack_panels(data, n, k, NR)
    }

    /// Both packings store, per depth block, panels of `width` rows (lhs) or columns (rhs),
    /// each `kc` deep and `width` wide; this gathers them back into `[rows, k]`.
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    fn unpack_panels(data: &[f32], rows: usize, k: usize, width: usize) -> Vec<f32> {
        let (kb, panels) = (k_block(k), rows.div_ceil(width));
        let mut out = vec![0f32; rows * k];
        for pc in (0..k).step_by(kb) {
            let kc = kb.min(k - pc);
            for p in 0..panels {
                let panel = &data[pc * panels * width + p * kc * width..][..kc * width];
                for (kk, v) in panel.chunks_exact(width).enumerate() {
                    for (r, &x) in v.iter().enumerate().take(rows - p * width) {
                        out[(p * width + r) * k + pc + kk] = x;
                    }
                }
            }
        }
        out
    }

    /// `dst[m, n] = (accumulate ? dst : 0) + scale * lhs rhs` when the CPU has AVX-512F, the
    /// destination rows are contiguous and the product is large enough; `false` leaves it to
    /// the caller.
    ///
    /// # Safety
    /// As for [`crate::matmul::gemm`] (only `dst_cs == 1` is taken).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn sgemm(
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
        if dst_cs != 1 || m * n * k < MIN_MACS {
            return false;
        }
        // SAFETY: the same product under this function's contract, `dst_cs == 1` checked.
        unsafe {
            sgemm_ops(
                m,
                n,
                k,
                dst,
                dst_rs,
                accumulate,
                Lhs::Mat(lhs),
                Rhs::Mat(rhs),
                scale,
                parallel,
            )
        }
    }

    /// [`sgemm`] for any operand source and size; `false` (nothing written) when the CPU lacks
    /// both AVX-512F and AVX2+FMA, `k == 0` or the destination rows overlap.
    ///
    /// # Safety
    /// As for [`crate::matmul::gemm`] with `dst_cs == 1`: `dst` valid for reads and writes of
    /// `m` rows of `n` floats at row stride `dst_rs` (checked `>= n`, so rows never overlap).
    /// An [`Lhs::Packed`] must be the output of [`pack_lhs_all`] for this `m`, `k` and an
    /// [`Rhs::Packed`] that of [`pack_rhs_all`] for this `k`, `n`: the micro-kernel reads whole
    /// panels from offsets computed from these sizes, only the panel starts bounds-checked.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn sgemm_ops(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: isize,
        accumulate: bool,
        lhs: Lhs,
        rhs: Rhs,
        scale: f32,
        parallel: bool,
    ) -> bool {
        let Some(isa) = Isa::best() else {
            return false;
        };
        // SAFETY: this function's contract; `Isa::best` only names what the CPU has.
        unsafe {
            ops_at(
                isa, m, n, k, dst, dst_rs, accumulate, lhs, rhs, scale, parallel,
            )
        }
    }

    /// [`sgemm_ops`] at a given width.
    ///
    /// # Safety
    /// As for [`sgemm_ops`], and the CPU must support `isa`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn ops_at(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: isize,
        accumulate: bool,
        lhs: Lhs,
        rhs: Rhs,
        scale: f32,
        parallel: bool,
    ) -> bool {
        if dst_rs < n as isize || k == 0 || m == 0 || n == 0 {
            return false;
        }
        // SAFETY: the CPU supports `isa` (contract).
        let (kernel, _) = unsafe { kernels(isa) };
        let threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        // Row blocks of at most MC rows, as many as a multiple of the thread count so no
        // thread idles through the last round.
        let blocks = m.div_ceil(MC).next_multiple_of(threads);
        let mc = m.div_ceil(blocks).next_multiple_of(MR).max(MR);
        let (rpanels_all, panels_all) = (m.div_ceil(MR), n.div_ceil(NR));
        let kb = k_block(k);
        let (dst, ops) = (Ptr(dst), Ops(lhs, rhs));
        let ldc = dst_rs as usize;
        if let Rhs::Packed(b_all) = rhs {
            by_row_blocks(threads, m, mc, |ic, apack| {
                let rpanels = mc.min(m - ic).div_ceil(MR);
                // All of the block's k blocks: offsets of (k block, panel) into `ap`.
                let (ap, a_panels, r_off): (&[f32], usize, usize) = match ops.lhs() {
                    Lhs::Packed(all) => (all, rpanels_all, ic / MR),
                    Lhs::Mat(lhs) => {
                        if apack.len() < rpanels * MR * k {
                            apack.resize(rpanels * MR * k, 0.0);
                        }
                        for pc in (0..k).step_by(kb) {
                            let kc = kb.min(k - pc);
                            for r in 0..rpanels {
                                let i0 = ic + r * MR;
                                // SAFETY: rows i0..i0 + min(MR, m - i0) (`i0 < m`), columns
                                // pc..pc + kc of `lhs`, valid by the contract.
                                unsafe {
                                    pack_lhs(
                                        &mut apack[pc * rpanels * MR + r * kc * MR..][..kc * MR],
                                        lhs,
                                        i0,
                                        MR.min(m - i0),
                                        pc,
                                        kc,
                                    );
                                }
                            }
                        }
                        (&apack[..rpanels * MR * k], rpanels, 0)
                    }
                };
                // The whole depth per destination tile: the tile is read and written once
                // instead of once per k block, which is what bounds wide products (GEGLU).
                for p in 0..panels_all {
                    let j0 = p * NR;
                    let cols = NR.min(n - j0);
                    for r in 0..rpanels {
                        let i0 = ic + r * MR;
                        let rows = MR.min(m - i0);
                        // SAFETY: element (i0, j0) of the destination (`i0 < m`, `j0 < n`).
                        let c = unsafe { dst.get().add(i0 * ldc + j0) };
                        let full = rows == MR && cols == NR;
                        let mut tile = [0f32; MR * NR];
                        for pc in (0..k).step_by(kb) {
                            let kc = kb.min(k - pc);
                            let a = ap[pc * a_panels * MR + (r_off + r) * kc * MR..].as_ptr();
                            let b = b_all[pc * panels_all * NR + p * kc * NR..].as_ptr();
                            // SAFETY: `kernel` is for an instruction set the CPU has (contract);
                            // `a` and `b` start `kc x MR` / `kc x NR` panels inside the packed operands (the
                            // packings' layout, see the contract); a full tile is destination
                            // rows i0..i0 + MR, columns j0..j0 + NR, this row block's alone, and
                            // an edge tile goes to the local `tile`.
                            unsafe {
                                if full {
                                    kernel(kc, a, b, c, ldc, scale, !accumulate && pc == 0);
                                } else {
                                    kernel(kc, a, b, tile.as_mut_ptr(), NR, scale, pc == 0);
                                }
                            }
                        }
                        if !full {
                            // SAFETY: destination rows i0..i0 + rows, columns j0..j0 + cols,
                            // in bounds and this row block's alone.
                            unsafe { store_tile(&tile, c, ldc, rows, cols, !accumulate) };
                        }
                    }
                }
            });
            return true;
        }
        let mut bpack: Vec<f32> = Vec::new();
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let panels = nc.div_ceil(NR);
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                let bp: &[f32] = match ops.rhs() {
                    Rhs::Packed(all) => {
                        &all[pc * panels_all * NR + jc / NR * kc * NR..][..panels * kc * NR]
                    }
                    Rhs::Mat(_) | Rhs::Fill(_) => {
                        // Every element a kernel reads is rewritten below, so the buffer is
                        // only zeroed when it grows.
                        if bpack.len() < panels * kc * NR {
                            bpack.resize(panels * kc * NR, 0.0);
                        }
                        let pack_b = |(p, panel): (usize, &mut [f32])| {
                            let j0 = jc + p * NR;
                            let cols = NR.min(n - j0);
                            match ops.rhs() {
                                // SAFETY: rows pc..pc + kc, columns j0..j0 + cols (`j0 < n`) of
                                // `rhs`, valid by the contract.
                                Rhs::Mat(rhs) => unsafe { pack_rhs(panel, rhs, pc, kc, j0, cols) },
                                Rhs::Fill(fill) => fill(panel, pc, kc, j0, cols),
                                Rhs::Packed(_) => unreachable!(),
                            }
                        };
                        let bpack = &mut bpack[..panels * kc * NR];
                        if threads > 1 {
                            bpack.par_chunks_mut(kc * NR).enumerate().for_each(pack_b);
                        } else {
                            bpack.chunks_mut(kc * NR).enumerate().for_each(pack_b);
                        }
                        &bpack[..panels * kc * NR]
                    }
                };
                let overwrite = !accumulate && pc == 0;
                let block = move |ic: usize, apack: &mut Vec<f32>| {
                    let mcur = mc.min(m - ic);
                    let rpanels = mcur.div_ceil(MR);
                    let ap: &[f32] = match ops.lhs() {
                        Lhs::Packed(all) => {
                            &all[pc * rpanels_all * MR + ic / MR * kc * MR..][..rpanels * kc * MR]
                        }
                        Lhs::Mat(lhs) => {
                            if apack.len() < rpanels * kc * MR {
                                apack.resize(rpanels * kc * MR, 0.0);
                            }
                            for (r, panel) in apack.chunks_mut(kc * MR).take(rpanels).enumerate() {
                                let i0 = ic + r * MR;
                                // SAFETY: rows i0..i0 + min(MR, m - i0) (`i0 < m`), columns
                                // pc..pc + kc of `lhs`, valid by the contract.
                                unsafe { pack_lhs(panel, lhs, i0, MR.min(m - i0), pc, kc) };
                            }
                            &apack[..rpanels * kc * MR]
                        }
                    };
                    for p in 0..panels {
                        let j0 = jc + p * NR;
                        let cols = NR.min(n - j0);
                        let b = bp[p * kc * NR..].as_ptr();
                        for r in 0..rpanels {
                            let i0 = ic + r * MR;
                            let rows = MR.min(m - i0);
                            let a = ap[r * kc * MR..].as_ptr();
                            // SAFETY: `kernel` is for an instruction set the CPU has (contract);
                            // `a` and `b` are whole `kc x MR` / `kc x NR` panels of `ap` / `bp` (sliced to
                            // `rpanels` / `panels` of them); `c` is destination element (i0, j0)
                            // (`i0 < m`, `j0 < n`), and tile rows i0..i0 + rows, columns
                            // j0..j0 + cols are this row block's alone.
                            unsafe {
                                let c = dst.get().add(i0 * ldc + j0);
                                if rows == MR && cols == NR {
                                    kernel(kc, a, b, c, ldc, scale, overwrite);
                                } else {
                                    let mut tile = [0f32; MR * NR];
                                    kernel(kc, a, b, tile.as_mut_ptr(), NR, scale, true);
                                    store_tile(&tile, c, ldc, rows, cols, overwrite);
                                }
                            }
                        }
                    }
                };
                by_row_blocks(threads, m, mc, block);
            }
        }
        true
    }

    /// GEGLU straight from the projection: `dst[m, n / 2] = hidden * gelu_erf(gate)` of
    /// `lhs rhs + bias` for `rhs` packed by [`pack_rhs_all`] with its columns interleaved in
    /// 16s (each 32-column panel `[16 hidden | the 16 matching gate]`, `bias` likewise), so the
    /// `[m, n]` projection never goes through memory. `false` when the CPU lacks both AVX-512F
    /// and AVX2+FMA.
    ///
    /// # Safety
    /// `lhs` must be valid for reads as for [`crate::matmul::gemm`] (`[m, k]`); `b_all` must
    /// be the output of [`pack_rhs_all`] for this `k`, `n` (`k * n` floats: the micro-kernel
    /// reads whole panels from offsets computed from the sizes); `dst` must be valid for
    /// writes of `m * n / 2` contiguous floats (`[m, n / 2]`), not overlapping the operands
    /// or accessed by anything else during the call. (`n` a multiple of 32 and `bias.len() ==
    /// n` are checked.)
    #[cfg_attr(feature = "openblas", allow(dead_code))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn sgemm_geglu(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        lhs: Mat,
        b_all: &[f32],
        bias: &[f32],
        parallel: bool,
    ) -> bool {
        let Some(isa) = Isa::best() else {
            return false;
        };
        // SAFETY: this function's contract; `Isa::best` only names what the CPU has.
        unsafe { geglu_at(isa, m, n, k, dst, lhs, b_all, bias, parallel) }
    }

    /// [`sgemm_geglu`] at a given width.
    ///
    /// # Safety
    /// As for [`sgemm_geglu`], and the CPU must support `isa`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn geglu_at(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        lhs: Mat,
        b_all: &[f32],
        bias: &[f32],
        parallel: bool,
    ) -> bool {
        if k == 0 || m == 0 || !n.is_multiple_of(NR) || bias.len() != n {
            return false;
        }
        // SAFETY: the CPU supports `isa` (contract).
        let (kernel, gate_tile) = unsafe { kernels(isa) };
        let threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let blocks = m.div_ceil(MC).next_multiple_of(threads);
        let mc = m.div_ceil(blocks).next_multiple_of(MR).max(MR);
        let (panels, kb, ldd) = (n / NR, k_block(k), n / 2);
        let (dst, ops) = (Ptr(dst), Ops(Lhs::Mat(lhs), Rhs::Packed(b_all)));
        by_row_blocks(threads, m, mc, |ic, apack| {
            let Lhs::Mat(lhs) = ops.lhs() else { return };
            let rpanels = mc.min(m - ic).div_ceil(MR);
            if apack.len() < rpanels * MR * k {
                apack.resize(rpanels * MR * k, 0.0);
            }
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                for r in 0..rpanels {
                    let i0 = ic + r * MR;
                    // SAFETY: rows i0..i0 + min(MR, m - i0) (`i0 < m`), columns pc..pc + kc of
                    // `lhs`, valid by the contract.
                    unsafe {
                        pack_lhs(
                            &mut apack[pc * rpanels * MR + r * kc * MR..][..kc * MR],
                            lhs,
                            i0,
                            MR.min(m - i0),
                            pc,
                            kc,
                        );
                    }
                }
            }
            let mut tile = [0f32; MR * NR];
            let mut gated = [0f32; MR * NR / 2];
            for p in 0..panels {
                for r in 0..rpanels {
                    let i0 = ic + r * MR;
                    let rows = MR.min(m - i0);
                    for pc in (0..k).step_by(kb) {
                        let kc = kb.min(k - pc);
                        let a = apack[pc * rpanels * MR + r * kc * MR..].as_ptr();
                        let b = b_all[pc * panels * NR + p * kc * NR..].as_ptr();
                        // SAFETY: `kernel` is for an instruction set the CPU has (contract);
                        // `a` is a whole `kc x MR` panel of `apack`, `b` a `kc x NR` panel of `b_all` (the
                        // packing's layout, see the contract); the tile is local.
                        unsafe { kernel(kc, a, b, tile.as_mut_ptr(), NR, 1.0, pc == 0) };
                    }
                    // SAFETY: `gate_tile` is for an instruction set the CPU has (contract).
                    unsafe {
                        gate_tile(
                            &tile[..rows * NR],
                            &bias[p * NR..][..NR],
                            &mut gated[..rows * NR / 2],
                        );
                    }
                    for i in 0..rows {
                        // SAFETY: columns p * NR / 2.. + NR / 2 of destination row i0 + i
                        // (`i0 + i < m`, `p < n / NR`): in the `[m, n / 2]` output and this row
                        // block's alone.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add((i0 + i) * ldd + p * NR / 2),
                                NR / 2,
                            )
                        };
                        row.copy_from_slice(&gated[i * NR / 2..][..NR / 2]);
                    }
                }
            }
        });
        true
    }

    /// Runs `block(ic, scratch)` for every row block start, across threads when there are
    /// several.
    fn by_row_blocks(
        threads: usize,
        m: usize,
        mc: usize,
        block: impl Fn(usize, &mut Vec<f32>) + Send + Sync,
    ) {
        let starts: Vec<usize> = (0..m).step_by(mc).collect();
        if threads > 1 && starts.len() > 1 {
            starts
                .into_par_iter()
                .for_each_init(Vec::new, |ap, ic| block(ic, ap));
        } else {
            let mut ap = Vec::new();
            starts.into_iter().for_each(|ic| block(ic, &mut ap));
        }
    }

    /// The `rows x cols` corner of an edge tile into `c` (row stride `ldc`), written or added.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of `rows` rows of `cols` floats at row stride
    /// `ldc`, which nothing else accesses during the call (`rows <= MR` and `cols <= NR` are
    /// bounds-checked against `tile`).
    unsafe fn store_tile(
        tile: &[f32; MR * NR],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        overwrite: bool,
    ) {
        for i in 0..rows {
            // SAFETY: row `i < rows` of the block at `c`, valid by the contract.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
            let t = &tile[i * NR..][..cols];
            if overwrite {
                row.copy_from_slice(t);
            } else {
                row.iter_mut().zip(t).for_each(|(x, &v)| *x += v);
            }
        }
    }

    /// `panel[kk][r] = lhs[i0 + r][pc + kk]` for `rows` rows (zeros after).
    ///
    /// # Safety
    /// `lhs` must be valid for reads of the elements (i0 + r, pc + kk), `r < rows`, `kk < kc`
    /// (each inside the allocation `lhs.ptr` points into), none written during the call.
    unsafe fn pack_lhs(panel: &mut [f32], lhs: Mat, i0: usize, rows: usize, pc: usize, kc: usize) {
        // SAFETY: only called with `r < rows`: element (i0 + r, pc), in bounds by the contract.
        let at = |r: usize| unsafe {
            lhs.ptr
                .offset((i0 + r) as isize * lhs.rs + pc as isize * lhs.cs)
        };
        if lhs.cs == 1 {
            // Rows are contiguous: transpose through a small block instead of scattering
            // single floats across the panel.
            let mut tmp = [[0f32; 16]; MR];
            for k0 in (0..kc).step_by(16) {
                let w = 16.min(kc - k0);
                for (r, t) in tmp.iter_mut().enumerate().take(rows) {
                    // SAFETY: columns pc + k0..pc + k0 + w (`k0 + w <= kc`) of row i0 + r
                    // (`r < rows`), contiguous as `lhs.cs == 1`.
                    let src = unsafe { std::slice::from_raw_parts(at(r).add(k0), w) };
                    t[..w].copy_from_slice(src);
                }
                for (kk, o) in panel[k0 * MR..][..w * MR].chunks_exact_mut(MR).enumerate() {
                    let o: &mut [f32; MR] = o.try_into().expect("MR floats");
                    for (x, t) in o.iter_mut().zip(&tmp) {
                        *x = t[kk & 15];
                    }
                }
            }
            return;
        }
        for r in 0..rows {
            let base = at(r);
            for kk in 0..kc {
                // SAFETY: element (i0 + r, pc + kk), `r < rows`, `kk < kc`.
                panel[kk * MR + r] = unsafe { *base.offset(kk as isize * lhs.cs) };
            }
        }
    }

    /// `panel[kk][j] = rhs[pc + kk][j0 + j]` for `cols` columns (zeros after).
    ///
    /// # Safety
    /// `rhs` must be valid for reads of the elements (pc + kk, j0 + j), `kk < kc`, `j < cols`
    /// (each inside the allocation `rhs.ptr` points into), none written during the call.
    unsafe fn pack_rhs(panel: &mut [f32], rhs: Mat, pc: usize, kc: usize, j0: usize, cols: usize) {
        // SAFETY: only called with `j < cols`: element (pc, j0 + j), in bounds by the contract.
        let at = |j: usize| unsafe {
            rhs.ptr
                .offset(pc as isize * rhs.rs + (j0 + j) as isize * rhs.cs)
        };
        if rhs.cs == 1 {
            for kk in 0..kc {
                // SAFETY: columns j0..j0 + cols of row pc + kk (`kk < kc`), contiguous as
                // `rhs.cs == 1`.
                let src = unsafe {
                    std::slice::from_raw_parts(
                        rhs.ptr.offset((pc + kk) as isize * rhs.rs + j0 as isize),
                        cols,
                    )
                };
                panel[kk * NR..][..cols].copy_from_slice(src);
            }
        } else if rhs.rs == 1 {
            // Columns are contiguous (a transposed weight): transpose through a block.
            let mut tmp = [[0f32; 16]; NR];
            for k0 in (0..kc).step_by(16) {
                let w = 16.min(kc - k0);
                for (j, t) in tmp.iter_mut().enumerate().take(cols) {
                    // SAFETY: rows pc + k0..pc + k0 + w (`k0 + w <= kc`) of column j0 + j
                    // (`j < cols`), contiguous as `rhs.rs == 1`.
                    let src = unsafe { std::slice::from_raw_parts(at(j).add(k0), w) };
                    t[..w].copy_from_slice(src);
                }
                for (kk, o) in panel[k0 * NR..][..w * NR].chunks_exact_mut(NR).enumerate() {
                    let o: &mut [f32; NR] = o.try_into().expect("NR floats");
                    for (x, t) in o.iter_mut().zip(&tmp) {
                        *x = t[kk & 15];
                    }
                }
            }
        } else {
            for j in 0..cols {
                let base = at(j);
                for kk in 0..kc {
                    // SAFETY: element (pc + kk, j0 + j), `kk < kc`, `j < cols`.
                    panel[kk * NR + j] = unsafe { *base.offset(kk as isize * rhs.rs) };
                }
            }
        }
    }

    // Memory goes through masked intrinsics and `wrapping_add` (see flash.rs: the plain forms
    // carry debug-build UB checks in the innermost loop).

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

    /// `c[12][32] = (overwrite ? 0 : c) + scale * a b` for packed `a` `[kc][12]` and `b`
    /// `[kc][32]`, `c` row stride `ldc`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` must be valid for reads of `kc * MR` floats and `b`
    /// of `kc * NR`; `c` must be valid for writes (and, unless `overwrite`, reads) of `MR` rows
    /// of `NR` floats at row stride `ldc`, not overlapping `a` or `b` nor accessed by anything
    /// else during the call. (Any alignment.)
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_avx512(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        scale: f32,
        overwrite: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            // SAFETY: at step `kk < kc`, `b` is the original `b + kk * NR` (`NR` = 32 readable
            // floats) and `a` the original `a + kk * MR` (`MR` readable floats), by the contract.
            unsafe {
                let b0 = _mm512_maskz_loadu_ps(!0, b);
                let b1 = _mm512_maskz_loadu_ps(!0, b.wrapping_add(16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = bcast(a.wrapping_add(r));
                    acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
                }
            }
            a = a.wrapping_add(MR);
            b = b.wrapping_add(NR);
        }
        let s = _mm512_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let p = c.wrapping_add(r * ldc + h * 16);
                let v = if scale != 1.0 { _mm512_mul_ps(v, s) } else { v };
                let v = if overwrite {
                    v
                } else {
                    // SAFETY: floats h * 16..(h + 1) * 16 (`h < 2`) of row `r < MR` of `c`,
                    // readable when not `overwrite` (contract).
                    _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(!0, p) }, v)
                };
                // SAFETY: the same floats, writable (contract).
                unsafe { _mm512_mask_storeu_ps(p, !0, v) };
            }
        }
    }

    /// [`kernel_avx512`]'s tile at AVX2 width: four 6 x 16 blocks (12 accumulators, two
    /// `b` vectors and a broadcast fit AVX2's 16 registers), each over the whole depth. A
    /// block reads every other 64 bytes of the `b` panel's 128-byte rows and half of each `a`
    /// row, so at `KC` = 256 the two panels' touched lines (16 + 12 KiB) stay in a 32 KiB L1
    /// across the four passes.
    ///
    /// # Safety
    /// As for [`kernel_avx512`], with AVX2 and FMA in place of AVX-512F.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        scale: f32,
        overwrite: bool,
    ) {
        for col in [0, 16] {
            for row in [0, 6] {
                // SAFETY: rows row..row + 6 and columns col..col + 16 of the tile: inside the
                // panels and the destination block of this function's contract.
                unsafe {
                    block_6x16(
                        kc,
                        a.wrapping_add(row),
                        b.wrapping_add(col),
                        c.wrapping_add(row * ldc + col),
                        ldc,
                        scale,
                        overwrite,
                    );
                }
            }
        }
    }

    /// `c[6][16] = (overwrite ? 0 : c) + scale * a b` for `a` the 6 floats at `a + kk * MR`
    /// and `b` the 16 at `b + kk * NR` for `kk < kc` (a corner of the packed panels).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` must be valid for reads of the 6 floats at
    /// `a + kk * MR` and `b` of the 16 at `b + kk * NR` for every `kk < kc`; `c` must be valid
    /// for writes (and, unless `overwrite`, reads) of 6 rows of 16 floats at row stride `ldc`,
    /// not overlapping `a` or `b` nor accessed by anything else during the call.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_6x16(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        scale: f32,
        overwrite: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            // SAFETY: at step `kk < kc`, `b` is the original `b + kk * NR` and `a` the original
            // `a + kk * MR`: 16 and 6 readable floats by the contract. (`_mm256_loadu_ps` and
            // `_mm256_broadcast_ss` take raw pointers and need no alignment.)
            unsafe {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.wrapping_add(8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.wrapping_add(r));
                    acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                }
            }
            a = a.wrapping_add(MR);
            b = b.wrapping_add(NR);
        }
        let s = _mm256_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let p = c.wrapping_add(r * ldc + h * 8);
                let v = if scale != 1.0 { _mm256_mul_ps(v, s) } else { v };
                let v = if overwrite {
                    v
                } else {
                    // SAFETY: floats h * 8..(h + 1) * 8 (`h < 2`) of row `r < 6` of `c`,
                    // readable when not `overwrite` (contract).
                    _mm256_add_ps(unsafe { _mm256_loadu_ps(p) }, v)
                };
                // SAFETY: the same floats, writable (contract).
                unsafe { _mm256_storeu_ps(p, v) };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use crate::matmul::Mat;

    #[test]
    fn sgemm_matches_naive_product() {
        let isas = crate::isa::Isa::detected();
        eprintln!("instruction sets tested: {isas:?}");
        for isa in isas {
            naive_product_at(isa);
            geglu_at(isa);
        }
    }

    fn naive_product_at(isa: crate::isa::Isa) {
        for &(m, n, k, ta, tb, acc, scale) in &[
            (100, 70, 300, false, false, true, 1.0f32),
            (37, 130, 600, true, false, false, 0.5),
            (300, 33, 90, false, true, true, 1.0),
            (64, 2100, 20, true, true, false, 1.0),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32).collect();
            // Transposed operands are stored the other way round.
            let am = if ta {
                Mat {
                    ptr: a.as_ptr(),
                    rs: 1,
                    cs: m as isize,
                }
            } else {
                Mat {
                    ptr: a.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                }
            };
            let bm = if tb {
                Mat {
                    ptr: b.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                }
            } else {
                Mat {
                    ptr: b.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                }
            };
            let mut c = c0.clone();
            // SAFETY: buffers sized for the strides above; `isa` was detected on this CPU.
            let done = unsafe {
                super::imp::ops_at(
                    isa,
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    n as isize,
                    acc,
                    super::Lhs::Mat(am),
                    super::Rhs::Mat(bm),
                    scale,
                    true,
                )
            };
            assert!(done, "{isa:?} {m}x{n}x{k}");
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f64;
                    for p in 0..k {
                        // SAFETY: in bounds by construction.
                        let (x, y) = unsafe {
                            (
                                *am.ptr.offset(i as isize * am.rs + p as isize * am.cs),
                                *bm.ptr.offset(p as isize * bm.rs + j as isize * bm.cs),
                            )
                        };
                        s += x as f64 * y as f64;
                    }
                    let want = if acc { c0[i * n + j] as f64 } else { 0.0 } + scale as f64 * s;
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{isa:?} {m}x{n}x{k} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A pseudo-random `[rows, cols]` matrix in [-0.5, 0.5).
    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect()
    }

    fn product(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    out[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        out
    }

    /// Both operands pre-packed (a convolution's weight, a linear layer's), and the GEGLU
    /// product straight from a packed projection, at one width.
    fn geglu_at(isa: crate::isa::Isa) {
        let (m, n, k) = (50, 96, 300);
        let (a, b) = (matrix(m, k, 1), matrix(k, n, 2));
        let (am, bm) = (
            Mat {
                ptr: a.as_ptr(),
                rs: k as isize,
                cs: 1,
            },
            Mat {
                ptr: b.as_ptr(),
                rs: n as isize,
                cs: 1,
            },
        );
        // SAFETY: `a` is `[m, k]` and `b` `[k, n]`, contiguous.
        let (ap, bp) = unsafe {
            (
                super::imp::pack_lhs_all(am, m, k),
                super::imp::pack_rhs_all(bm, k, n),
            )
        };
        let want = product(&a, &b, m, n, k);
        for (lhs, rhs) in [
            (super::Lhs::Packed(&ap), super::Rhs::Mat(bm)),
            (super::Lhs::Mat(am), super::Rhs::Packed(&bp)),
            (super::Lhs::Packed(&ap), super::Rhs::Packed(&bp)),
        ] {
            let mut c = vec![1f32; m * n];
            // SAFETY: `c` is `[m, n]`; the packed operands come from the packers for these
            // sizes; `isa` was detected on this CPU.
            let done = unsafe {
                super::imp::ops_at(
                    isa,
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    n as isize,
                    true,
                    lhs,
                    rhs,
                    1.0,
                    true,
                )
            };
            assert!(done);
            for (i, (&got, &want)) in c.iter().zip(&want).enumerate() {
                let want = 1.0 + want;
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{isa:?} packed ({}, {}): {got} vs {want}",
                    i / n,
                    i % n
                );
            }
        }
        let bias: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.1 - 0.3).collect();
        let mut gated = vec![0f32; m * n / 2];
        // SAFETY: `gated` is `[m, n / 2]`, `bp` packs `b` for this `k`, `n`; `isa` was
        // detected on this CPU.
        let done =
            unsafe { super::imp::geglu_at(isa, m, n, k, gated.as_mut_ptr(), am, &bp, &bias, true) };
        assert!(done);
        for i in 0..m {
            for p in 0..n / 32 {
                for l in 0..16 {
                    let (h, g) = (p * 32 + l, p * 32 + 16 + l);
                    let hidden = want[i * n + h] as f32 + bias[h];
                    let gate = want[i * n + g] as f32 + bias[g];
                    let expect = hidden * crate::simd::gelu_erf(gate);
                    let got = gated[i * n / 2 + p * 16 + l];
                    assert!(
                        (got - expect).abs() < 1e-4 * (1.0 + expect.abs()),
                        "{isa:?} geglu ({i}, {}): {got} vs {expect}",
                        p * 16 + l
                    );
                }
            }
        }
    }
}
