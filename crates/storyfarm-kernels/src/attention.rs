//! Multi-head attention `softmax(q k^T * scale) v` computed per (item, head, query chunk) in
//! parallel: logits for a chunk go to a small buffer through `gemm`, the softmax runs in place
//! and the product with the values is written straight into the `[B, N, H*d]` token output, so
//! no head split/merge copies and no full logit tensor exist. Extra key blocks (StyleAligned's
//! shared reference keys) join the same softmax, with their logit bias and key masks.

use candle_core::{bail, DType, Tensor};
use rayon::prelude::*;

use crate::flash;
use crate::isa::Isa;
use crate::matmul::{gemm, Mat};
use crate::simd::{exp, multiversion};
use crate::view::{output, F32View, SendPtr};
use crate::Result;

/// A query chunk's logit buffer holds about this many elements (1 MiB).
const CHUNK_LOGITS: usize = 256 * 1024;

/// Keys and values that batch items `items[r]` attend to beside their own:
/// `keys`/`values` `[items.len(), H, M, d]`, `logit_bias` added to their logits,
/// `key_mask` `[items.len(), M]` (0 drops a key).
pub struct ExtraBlock<'a> {
    pub items: &'a [usize],
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub logit_bias: f32,
    pub key_mask: Option<&'a Tensor>,
}

/// Element (item, head, token, 0) offsets of a `[B, N, H*d]` (rank 3) or `[B, H, N, d]`
/// (rank 4) contiguous operand.
#[derive(Clone, Copy)]
struct Strides {
    item: usize,
    head: usize,
    token: usize,
    tokens: usize,
}

fn strides(t: &Tensor, heads: usize, d: usize) -> Result<Strides> {
    Ok(match t.dims() {
        &[_, n, c] if c == heads * d => Strides {
            item: n * c,
            head: d,
            token: c,
            tokens: n,
        },
        &[_, h, n, dd] if h == heads && dd == d => Strides {
            item: h * n * d,
            head: n * d,
            token: d,
            tokens: n,
        },
        dims => bail!("attention: operand {dims:?} for {heads} heads of {d}"),
    })
}

struct Block<'a> {
    k: &'a [f32],
    v: &'a [f32],
    ks: Strides,
    vs: Strides,
    bias: f32,
    mask: Option<&'a [f32]>,
}

multiversion! {
    /// Softmax numerators of one logit row in place; returns their sum.
    fn softmax_row(row: &mut [f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut it = row.chunks_exact(16);
        for c in &mut it {
            for l in 0..16 {
                lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
            }
        }
        let mut max = it.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        for l in lanes {
            max = if l > max { l } else { max };
        }
        let mut sums = [0f32; 16];
        let mut it = row.chunks_exact_mut(16);
        for c in &mut it {
            for l in 0..16 {
                c[l] = exp(c[l] - max);
                sums[l] += c[l];
            }
        }
        let mut sum = 0f32;
        for x in it.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        sum + sums.iter().sum::<f32>()
    }
}

/// Attention of `q` over `k`/`v` (all `[B, N, H*d]` tokens or all `[B, H, N, d]`) plus
/// `extra` key blocks; returns `[B, N, H*d]` tokens.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    extra: &[ExtraBlock],
) -> Result<Tensor> {
    attention_with(q, k, v, heads, scale, extra, flash::isa())
}

/// [`attention`], through the queries-in-lanes kernel (`flash.rs`) at width `flash_isa` when
/// given (the CPU must have it), else through `gemm`.
pub(crate) fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    extra: &[ExtraBlock],
    flash_isa: Option<Isa>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let b = q.dim(0)?;
    let c = match q.dims() {
        &[_, _, c] => c,
        &[_, h, _, d] => h * d,
        dims => bail!("attention: query {dims:?}"),
    };
    if heads == 0 || c % heads != 0 || k.dim(0)? != b || v.dim(0)? != b {
        bail!(
            "attention: q {:?}, k {:?}, v {:?}, {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let d = c / heads;
    let (qs, ks, vs) = (
        strides(&q, heads, d)?,
        strides(&k, heads, d)?,
        strides(&v, heads, d)?,
    );
    let n = qs.tokens;
    // The `gemm` path reads `ks.tokens` value rows through raw pointers: a shorter `v` would be
    // read out of bounds.
    if ks.tokens != vs.tokens {
        bail!("attention: keys {:?} and values {:?}", k.dims(), v.dims());
    }
    let (qv, kv, vv) = (F32View::new(&q)?, F32View::new(&k)?, F32View::new(&v)?);

    let mut extra_t = Vec::with_capacity(extra.len());
    for e in extra {
        let mask = e
            .key_mask
            .map(|m| m.to_dtype(DType::F32)?.contiguous())
            .transpose()?;
        extra_t.push((e.keys.contiguous()?, e.values.contiguous()?, mask));
    }
    let mut extra_v = Vec::with_capacity(extra.len());
    for (ek, ev, m) in &extra_t {
        extra_v.push((
            F32View::new(ek)?,
            F32View::new(ev)?,
            m.as_ref().map(F32View::new).transpose()?,
        ));
    }
    // Per item: own keys first, then each extra block holding the item (its row's slices).
    let mut per_item: Vec<Vec<Block>> = Vec::with_capacity(b);
    for item in 0..b {
        let mut blocks = vec![Block {
            k: &kv.slice()[item * ks.item..],
            v: &vv.slice()[item * vs.item..],
            ks,
            vs,
            bias: 0.0,
            mask: None,
        }];
        for ((e, (ek, ev, _)), (ekv, evv, mv)) in extra.iter().zip(&extra_t).zip(&extra_v) {
            let Some(row) = e.items.iter().position(|&i| i == item) else {
                continue;
            };
            let (eks, evs) = (strides(ek, heads, d)?, strides(ev, heads, d)?);
            // Row `row` must exist in both: the slices below would otherwise be empty (row ==
            // dim 0) and the `gemm` path would read past them.
            if eks.tokens != evs.tokens || row >= ek.dim(0)? || row >= ev.dim(0)? {
                bail!(
                    "attention: extra keys {:?} and values {:?}",
                    ek.dims(),
                    ev.dims()
                );
            }
            blocks.push(Block {
                k: &ekv.slice()[row * eks.item..],
                v: &evv.slice()[row * evs.item..],
                ks: eks,
                vs: evs,
                bias: e.logit_bias,
                mask: mv
                    .as_ref()
                    .map(|m| &m.slice()[row * eks.tokens..][..eks.tokens]),
            });
        }
        per_item.push(blocks);
    }

    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = flash_isa {
        let sources: Vec<Vec<flash::Source>> = per_item
            .iter()
            .map(|blocks| {
                blocks
                    .iter()
                    .map(|bl| flash::Source {
                        k: bl.k,
                        v: bl.v,
                        k_token: bl.ks.token,
                        k_head: bl.ks.head,
                        v_token: bl.vs.token,
                        v_head: bl.vs.head,
                        tokens: bl.ks.tokens,
                        bias: bl.bias,
                        mask: bl.mask,
                    })
                    .collect()
            })
            .collect();
        let mut dst = vec![0f32; b * n * c];
        flash::run(
            isa,
            qv.slice(),
            qs.item,
            qs.token,
            qs.head,
            n,
            heads,
            d,
            scale,
            &sources,
            &mut dst,
        );
        return output(dst, (b, n, c));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = flash_isa;
    let max_keys = per_item
        .iter()
        .map(|bl| bl.iter().map(|x| x.ks.tokens).sum::<usize>())
        .max()
        .unwrap_or(1);
    let chunk = (CHUNK_LOGITS / max_keys.max(1)).clamp(8, n.max(8));
    let chunks = n.div_ceil(chunk);
    let mut dst = vec![0f32; b * n * c];
    let out = SendPtr(dst.as_mut_ptr());
    let qsl = qv.slice();
    (0..b * heads * chunks)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, task| {
            let (item, h, ci) = (
                task / (heads * chunks),
                (task / chunks) % heads,
                task % chunks,
            );
            let (n0, len) = (ci * chunk, chunk.min(n - ci * chunk));
            let blocks = &per_item[item];
            let total: usize = blocks.iter().map(|x| x.ks.tokens).sum();
            buf.resize(len * total, 0.0);
            let qp = qsl[item * qs.item + h * qs.head + n0 * qs.token..].as_ptr();
            let mut col = 0;
            for bl in blocks {
                let m = bl.ks.tokens;
                // SAFETY: `q` rows n0..n0 + len (`< n`) of head `h`, `d` floats each, lie in
                // `qsl` from `qp`; key rows `< m` of head `h` lie in `bl.k` (this item's row of a
                // keys tensor with `ks.tokens == m` tokens); the `[len, m]` logits at column
                // `col` (`col + m <= total`) lie in `buf` (`len * total` floats), which is this
                // task's own.
                unsafe {
                    gemm(
                        len,
                        m,
                        d,
                        buf.as_mut_ptr().add(col),
                        total as isize,
                        1,
                        false,
                        Mat {
                            ptr: qp,
                            rs: qs.token as isize,
                            cs: 1,
                        },
                        Mat {
                            ptr: bl.k[h * bl.ks.head..].as_ptr(),
                            rs: 1,
                            cs: bl.ks.token as isize,
                        },
                        scale,
                        false,
                    );
                }
                if bl.bias != 0.0 || bl.mask.is_some() {
                    for row in buf.chunks_mut(total) {
                        let row = &mut row[col..col + m];
                        match bl.mask {
                            Some(mask) => row.iter_mut().zip(mask).for_each(|(x, &keep)| {
                                *x = if keep != 0.0 {
                                    *x + bl.bias
                                } else {
                                    f32::NEG_INFINITY
                                }
                            }),
                            None => row.iter_mut().for_each(|x| *x += bl.bias),
                        }
                    }
                }
                col += m;
            }
            let inv: Vec<f32> = buf
                .chunks_mut(total)
                .map(|row| 1.0 / softmax_row(row))
                .collect();
            let o = out;
            // SAFETY: element (item, n0, h * d) of `dst` (`[b, n, c]`): in bounds as `item < b`,
            // `n0 < n`, `h * d < c`.
            let op = unsafe { o.0.add(item * n * c + n0 * c + h * d) };
            let mut col = 0;
            for (i, bl) in blocks.iter().enumerate() {
                let m = bl.ks.tokens;
                // SAFETY: probabilities `[len, m]` at column `col` of `buf`; value rows `< m` of
                // head `h` lie in `bl.v` (`vs.tokens == ks.tokens`, checked above); the output
                // is rows n0..n0 + len, columns h * d..(h + 1) * d of this item in `dst` (row
                // stride `c`), written by this task only, and `dst` is not otherwise accessed
                // until the loop has ended.
                unsafe {
                    gemm(
                        len,
                        d,
                        m,
                        op,
                        c as isize,
                        1,
                        i > 0,
                        Mat {
                            ptr: buf.as_ptr().add(col),
                            rs: total as isize,
                            cs: 1,
                        },
                        Mat {
                            ptr: bl.v[h * bl.vs.head..].as_ptr(),
                            rs: bl.vs.token as isize,
                            cs: 1,
                        },
                        1.0,
                        false,
                    );
                }
                col += m;
            }
            for (r, s) in inv.iter().enumerate() {
                // SAFETY: row n0 + r (`r < len`), columns h * d..(h + 1) * d of this item in
                // `dst`, this task's alone as above.
                let row = unsafe { std::slice::from_raw_parts_mut(op.add(r * c), d) };
                row.iter_mut().for_each(|x| *x *= s);
            }
        });
    output(dst, (b, n, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, rand};
    use candle_core::Device;

    fn split(x: &Tensor, heads: usize) -> Tensor {
        let (b, n, c) = x.dims3().unwrap();
        x.reshape((b, n, heads, c / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: &Tensor) -> Tensor {
        let logits = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        let p = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let o = p.matmul(v).unwrap();
        let (b, h, n, d) = o.dims4().unwrap();
        o.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    }

    /// The `gemm` path, then the flash kernel at every width this CPU has.
    fn paths() -> Vec<Option<Isa>> {
        std::iter::once(None)
            .chain(Isa::detected().into_iter().map(Some))
            .collect()
    }

    #[test]
    fn token_layout_matches_candle_softmax() {
        for flash in paths() {
            token_layout_case(flash);
        }
    }

    fn token_layout_case(flash: Option<Isa>) {
        let attention = |q: &Tensor, k: &Tensor, v: &Tensor, h: usize, s: f32, e: &[ExtraBlock]| {
            attention_with(q, k, v, h, s, e, flash)
        };
        let (b, n, m, heads, d) = (2, 37, 11, 3, 4);
        let q = rand(&[b, n, heads * d], 1);
        let k = rand(&[b, m, heads * d], 2);
        let v = rand(&[b, m, heads * d], 3);
        let got = attention(&q, &k, &v, heads, 0.5, &[]).unwrap();
        let zero = Tensor::zeros(m, DType::F32, &Device::Cpu).unwrap();
        let want = reference(
            &split(&q, heads),
            &split(&k, heads),
            &split(&v, heads),
            0.5,
            &zero,
        );
        assert!(max_abs(&got, &want) < 1e-5);
        // Head layout inputs give the same tokens.
        let got4 = attention(
            &split(&q, heads),
            &split(&k, heads),
            &split(&v, heads),
            heads,
            0.5,
            &[],
        )
        .unwrap();
        assert!(max_abs(&got4, &want) < 1e-5);
    }

    #[test]
    fn extra_blocks_equal_concatenated_keys() {
        for flash in paths() {
            for (n, m, heads, d) in [
                (9, 5, 2, 4),
                (300, 77, 2, 40),
                (70, 150, 1, 80),
                (20, 33, 2, 160),
            ] {
                extra_blocks_case(flash, n, m, heads, d);
            }
        }
    }

    /// A block whose every key is masked (a subject dropped whole at a step) adds nothing.
    #[test]
    fn fully_masked_block_is_no_block() {
        for flash in paths() {
            let (b, n, m, heads, d) = (2, 20, 7, 2, 8);
            let q = rand(&[b, n, heads * d], 11);
            let k = rand(&[b, n, heads * d], 12);
            let v = rand(&[b, n, heads * d], 13);
            let ek = rand(&[1, m, heads * d], 14);
            let mask = Tensor::zeros((1, m), DType::F32, &Device::Cpu).unwrap();
            let items = [1usize];
            let extra = [ExtraBlock {
                items: &items,
                keys: &ek,
                values: &ek,
                logit_bias: 0.0,
                key_mask: Some(&mask),
            }];
            let got = attention_with(&q, &k, &v, heads, 0.5, &extra, flash).unwrap();
            let plain = attention_with(&q, &k, &v, heads, 0.5, &[], flash).unwrap();
            assert!(max_abs(&got, &plain) < 1e-6, "flash {flash:?}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        // Operands the `gemm` path would read past through raw pointers: values with fewer
        // tokens than the keys, and an extra block with no row for an item that lists it.
        for flash in paths() {
            let (b, n, heads, d) = (2, 20, 2, 8);
            let q = rand(&[b, n, heads * d], 31);
            let k = rand(&[b, n, heads * d], 32);
            let short = rand(&[b, n - 1, heads * d], 33);
            assert!(attention_with(&q, &k, &short, heads, 0.5, &[], flash).is_err());
            let ek = rand(&[1, 5, heads * d], 34);
            let items = [0usize, 1];
            let extra = [ExtraBlock {
                items: &items,
                keys: &ek,
                values: &ek,
                logit_bias: 0.0,
                key_mask: None,
            }];
            assert!(attention_with(&q, &k, &k, heads, 0.5, &extra, flash).is_err());
        }
    }

    fn extra_blocks_case(flash: Option<Isa>, n: usize, m: usize, heads: usize, d: usize) {
        let b = 3;
        let q = split(&rand(&[b, n, heads * d], 4), heads);
        let k = split(&rand(&[b, n, heads * d], 5), heads);
        let v = split(&rand(&[b, n, heads * d], 6), heads);
        let ek = rand(&[2, heads, m, d], 7);
        let ev = rand(&[2, heads, m, d], 8);
        let keep: Vec<f32> = (0..2 * m)
            .map(|i| if i % 3 == 1 || i == 4 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(keep, (2, m), &Device::Cpu).unwrap();
        let items = [2usize, 0];
        let extra = [ExtraBlock {
            items: &items,
            keys: &ek,
            values: &ev,
            logit_bias: 0.7,
            key_mask: Some(&mask),
        }];
        let got = attention_with(&q, &k, &v, heads, 0.5, &extra, flash).unwrap();
        for (row, item) in [(0usize, 2usize), (1, 0)] {
            let kk = Tensor::cat(
                &[k.narrow(0, item, 1).unwrap(), ek.narrow(0, row, 1).unwrap()],
                2,
            )
            .unwrap();
            let vv = Tensor::cat(
                &[v.narrow(0, item, 1).unwrap(), ev.narrow(0, row, 1).unwrap()],
                2,
            )
            .unwrap();
            let keep: Vec<f32> = mask
                .narrow(0, row, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let shift: Vec<f32> = (0..n + m)
                .map(|j| {
                    if j < n {
                        0.0
                    } else if keep[j - n] != 0.0 {
                        0.7
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let shift = Tensor::from_vec(shift, n + m, &Device::Cpu).unwrap();
            let want = reference(&q.narrow(0, item, 1).unwrap(), &kk, &vv, 0.5, &shift);
            let err = max_abs(&got.narrow(0, item, 1).unwrap(), &want);
            assert!(
                err < 1e-5,
                "flash {flash:?}, n {n} m {m} d {d}, item {item}: {err}"
            );
        }
        let zero = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let want = reference(
            &q.narrow(0, 1, 1).unwrap(),
            &k.narrow(0, 1, 1).unwrap(),
            &v.narrow(0, 1, 1).unwrap(),
            0.5,
            &zero,
        );
        assert!(
            max_abs(&got.narrow(0, 1, 1).unwrap(), &want) < 1e-5,
            "flash {flash:?}, n {n} m {m} d {d}"
        );
    }
}
