//! ConsiStory's numeric building blocks, computed the way the official code (NVlabs/consistory
//! with numpy, scikit-image and torch on the CPU) computes them: Otsu thresholds, bilinear
//! resizing, subject masks, mask-dropout draws, DIFT smoothing, nearest-neighbour maps, the
//! feature-injection plan and its application, and the query-blend schedule.
//!
//! Everything works on row-major `f32` slices on the CPU. Wherever a discrete decision depends on
//! rounding (an Otsu bin, a mask pixel, an argmin), the float32/float64 choices and the order of
//! operations follow the reference libraries, so the decisions match theirs bit for bit; METHOD.md
//! (shared/tools/consistory-goldens) §1.4-1.6 and §2 describe the algorithm itself.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{DiffusionError, Result};
use storyfarm_kernels as kernels;

/// Histogram bins of `skimage.filters.threshold_otsu`.
pub const OTSU_BINS: usize = 256;
/// Probability that a subject patch of another image is dropped at a step (`mask_dropout`).
pub const MASK_DROPOUT: f32 = 0.5;
/// Weight of the source features in feature injection (`inject_range_alpha`'s α).
pub const INJECTION_ALPHA: f64 = 0.8;
/// Steps with feature injection, both ends included (`n_steps // 10 ..= n_steps // 3` at 50 steps).
pub const INJECTION_STEPS: std::ops::RangeInclusive<usize> = 5..=16;
/// σ of the Gaussian that smooths the DIFT features.
pub const DIFT_SIGMA: f64 = 1.0;
/// `QueryStore(strength_start, strength_end)` over steps `0..=5`.
/// f32 lanes of the torch CPU kernels the goldens were recorded with (`AVX512`; an `AVX2` build
/// has 8). torch's channels-last bilinear kernel sums the full vectors in another order than the
/// leftover channels, so the resize of many-channel features depends on it (in the last bit).
pub const TORCH_VECTOR_LANES: usize = 16;

/// `F.normalize`'s default `eps`.
const NORMALIZE_EPS: f32 = 1e-12;
/// Target patches per matrix product in the nearest-neighbour search: bounds the distance block
/// (rows × masked source patches) to a few MiB.
const NN_TARGET_CHUNK: usize = 512;

fn check_len<T>(field: &str, values: &[T], expected: usize) -> Result<()> {
    if values.len() == expected {
        Ok(())
    } else {
        Err(DiffusionError::invalid_argument(
            field,
            format!("has {} values, expected {expected}", values.len()),
        ))
    }
}

fn check_nonzero(field: &str, value: usize) -> Result<()> {
    if value == 0 {
        Err(DiffusionError::invalid_argument(
            field,
            "must be at least 1",
        ))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Otsu
// ---------------------------------------------------------------------------------------------

/// `skimage.filters.threshold_otsu(values)` for a float32 array (scikit-image 0.26, numpy 2.x).
///
/// All-equal input returns that value. Otherwise the histogram is `np.histogram(values, 256)`:
/// float32 edges `k·step + min` (`step = (max − min)/256`, the last edge exactly `max`), a value
/// goes to bin `⌊(v − min)/(max − min)·256⌋` corrected by one against the actual edges, the last
/// bin closed. skimage then casts the counts to float32, so the class weights, means and
/// between-class variances are all float32 running sums; the threshold is the centre of the first
/// bin of maximal variance. Errors where numpy/skimage raise: empty input, NaN or infinite values,
/// and a range too narrow for 256 distinct float32 edges.
pub fn otsu_threshold(values: &[f32]) -> Result<f32> {
    let Some(&first) = values.first() else {
        return Err(DiffusionError::invalid_argument(
            "values",
            "is empty; Otsu needs at least one value",
        ));
    };
    if values.iter().all(|&v| v == first) {
        return Ok(first);
    }
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &v in values {
        if v.is_nan() {
            return Err(DiffusionError::invalid_argument("values", "contains NaN"));
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let delta = hi - lo;
    if !(lo.is_finite() && hi.is_finite() && delta.is_finite()) {
        return Err(DiffusionError::invalid_argument(
            "values",
            format!("range [{lo}, {hi}] is not finite"),
        ));
    }
    let edges = histogram_edges(lo, hi)?;

    let mut counts = [0u32; OTSU_BINS];
    for &v in values {
        // numpy divides by the range and multiplies by the bin count in the input dtype.
        let scaled = (v - lo) / delta * OTSU_BINS as f32;
        let mut bin = (scaled as usize).min(OTSU_BINS - 1);
        if v < edges[bin] {
            bin = bin.saturating_sub(1);
        }
        if bin != OTSU_BINS - 1 && v >= edges[bin + 1] {
            bin += 1;
        }
        counts[bin] += 1;
    }

    let mut centers = [0f32; OTSU_BINS];
    for (k, c) in centers.iter_mut().enumerate() {
        *c = (edges[k] + edges[k + 1]) / 2.0;
    }
    let counts: [f32; OTSU_BINS] = counts.map(|c| c as f32);
    let mut weight1 = [0f32; OTSU_BINS];
    let mut mean1 = [0f32; OTSU_BINS];
    let (mut w, mut s) = (0f32, 0f32);
    for k in 0..OTSU_BINS {
        w += counts[k];
        s += counts[k] * centers[k];
        weight1[k] = w;
        mean1[k] = s / w;
    }
    let mut weight2 = [0f32; OTSU_BINS];
    let mut mean2 = [0f32; OTSU_BINS];
    let (mut w, mut s) = (0f32, 0f32);
    for k in (0..OTSU_BINS).rev() {
        w += counts[k];
        s += counts[k] * centers[k];
        weight2[k] = w;
        mean2[k] = s / w;
    }
    // np.argmax: the first maximum, and a NaN counts as the maximum.
    let mut best = 0;
    let mut best_var = f32::NEG_INFINITY;
    for k in 0..OTSU_BINS - 1 {
        let diff = mean1[k] - mean2[k + 1];
        let var = weight1[k] * weight2[k + 1] * (diff * diff);
        if var.is_nan() {
            best = k;
            break;
        }
        if var > best_var {
            best = k;
            best_var = var;
        }
    }
    Ok(centers[best])
}

/// `np.linspace(lo, hi, 257, dtype=float32)`, and numpy's refusal of edges that do not increase.
fn histogram_edges(lo: f32, hi: f32) -> Result<[f32; OTSU_BINS + 1]> {
    let delta = hi - lo;
    let step = delta / OTSU_BINS as f32;
    let mut edges = [0f32; OTSU_BINS + 1];
    for (k, e) in edges.iter_mut().enumerate().take(OTSU_BINS) {
        let offset = if step == 0.0 {
            // numpy's branch for a step that underflows: divide first, then scale.
            (k as f32 / OTSU_BINS as f32) * delta
        } else {
            k as f32 * step
        };
        *e = offset + lo;
    }
    edges[OTSU_BINS] = hi;
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(DiffusionError::invalid_argument(
            "values",
            format!("range [{lo}, {hi}] is too narrow for {OTSU_BINS} float32 histogram bins"),
        ));
    }
    Ok(edges)
}

// ---------------------------------------------------------------------------------------------
// Bilinear resize
// ---------------------------------------------------------------------------------------------

/// One output coordinate's two source taps and their weights.
#[derive(Clone, Copy, Debug)]
struct Tap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// torch's `compute_source_index_and_lambda` (align_corners=False). The channels-last kernel's
/// build fuses `scale·(d + ½) − ½` into one FMA and the generic kernel's does not; the rounding of
/// the source coordinate differs accordingly.
fn taps(input: usize, output: usize, fused: bool) -> Vec<Tap> {
    if input == output {
        return (0..output)
            .map(|d| Tap {
                i0: d,
                i1: d,
                l0: 1.0,
                l1: 0.0,
            })
            .collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| {
            let x = d as f32 + 0.5;
            let src = if fused {
                scale.mul_add(x, -0.5)
            } else {
                scale * x - 0.5
            };
            let src = if src < 0.0 { 0.0 } else { src };
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            Tap {
                i0,
                i1,
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// `F.interpolate(x[None, None], (dst_h, dst_w), mode="bilinear", align_corners=False)` of one
/// `src_h × src_w` plane, bit for bit as torch's CPU kernels compute it (see
/// [`resize_bilinear_channels`]).
pub fn resize_bilinear(
    src: &[f32],
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
) -> Result<Vec<f32>> {
    resize_bilinear_channels(src, 1, src_h, src_w, dst_h, dst_w)
}

/// `F.interpolate(x[None], (dst_h, dst_w), mode="bilinear", align_corners=False)` of planar
/// `[channels, src_h, src_w]` data (no antialias), as torch 2.x computes it on the CPU.
///
/// torch picks its kernel by output size: when `dst_h + dst_w <= 128` (every ConsiStory resize)
/// the channels-last kernel, which weights the four corners with `w00 = λh0·λw0` … and sums them
/// with FMAs, full vectors of [`TORCH_VECTOR_LANES`] channels in one order and the leftover
/// channels in another; above that the generic separable kernel, which blends along the width
/// first. Equal sizes copy. (With exactly 3 channels and a single torch thread torch also takes
/// the channels-last kernel for large outputs; that case is not reproduced.)
pub fn resize_bilinear_channels(
    src: &[f32],
    channels: usize,
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
) -> Result<Vec<f32>> {
    for (field, value) in [
        ("channels", channels),
        ("src_h", src_h),
        ("src_w", src_w),
        ("dst_h", dst_h),
        ("dst_w", dst_w),
    ] {
        check_nonzero(field, value)?;
    }
    check_len("src", src, channels * src_h * src_w)?;
    if (src_h, src_w) == (dst_h, dst_w) {
        return Ok(src.to_vec());
    }
    let channels_last = dst_h + dst_w <= 128;
    let th = taps(src_h, dst_h, channels_last);
    let tw = taps(src_w, dst_w, channels_last);
    let vector_channels = channels - channels % TORCH_VECTOR_LANES;
    let mut out = vec![0f32; channels * dst_h * dst_w];
    for c in 0..channels {
        let plane = &src[c * src_h * src_w..(c + 1) * src_h * src_w];
        let dst = &mut out[c * dst_h * dst_w..(c + 1) * dst_h * dst_w];
        for (oh, h) in th.iter().enumerate() {
            let row0 = &plane[h.i0 * src_w..(h.i0 + 1) * src_w];
            let row1 = &plane[h.i1 * src_w..(h.i1 + 1) * src_w];
            for (ow, w) in tw.iter().enumerate() {
                let (x00, x01, x10, x11) = (row0[w.i0], row0[w.i1], row1[w.i0], row1[w.i1]);
                dst[oh * dst_w + ow] = if !channels_last {
                    let t0 = x00.mul_add(w.l0, x01 * w.l1);
                    let t1 = x10.mul_add(w.l0, x11 * w.l1);
                    t0.mul_add(h.l0, t1 * h.l1)
                } else {
                    let (w00, w01) = (h.l0 * w.l0, h.l0 * w.l1);
                    let (w10, w11) = (h.l1 * w.l0, h.l1 * w.l1);
                    if c < vector_channels {
                        x00.mul_add(w00, x01.mul_add(w01, x11.mul_add(w11, x10 * w10)))
                    } else {
                        x11.mul_add(w11, x10.mul_add(w10, x00.mul_add(w00, x01 * w01)))
                    }
                };
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Subject masks and dropout
// ---------------------------------------------------------------------------------------------

/// One concept's subject mask of one image at `res × res` (METHOD.md §1.4 step 3): the
/// `map_res × map_res` token map resized bilinearly, then `value > otsu(resized)`. Returns the
/// mask and the threshold.
pub fn subject_mask(token_map: &[f32], map_res: usize, res: usize) -> Result<(Vec<bool>, f32)> {
    let resized = resize_bilinear(token_map, map_res, map_res, res, res)?;
    let threshold = otsu_threshold(&resized)?;
    Ok((resized.iter().map(|&v| v > threshold).collect(), threshold))
}

/// An image's subject mask: the union of [`subject_mask`] over its present concepts, and the
/// threshold of each. The official code has no mask for an image without a present concept (it
/// fails), so at least one map is required.
pub fn union_subject_mask(
    token_maps: &[&[f32]],
    map_res: usize,
    res: usize,
) -> Result<(Vec<bool>, Vec<f32>)> {
    if token_maps.is_empty() {
        return Err(DiffusionError::invalid_argument(
            "token_maps",
            "is empty; an image needs at least one present concept",
        ));
    }
    let mut union = vec![false; res * res];
    let mut thresholds = Vec::with_capacity(token_maps.len());
    for map in token_maps {
        let (mask, threshold) = subject_mask(map, map_res, res)?;
        for (u, m) in union.iter_mut().zip(mask) {
            *u |= m;
        }
        thresholds.push(threshold);
    }
    Ok((union, thresholds))
}

/// A stream of uniforms in `[0, 1)` for mask dropout, consumed in row-major order.
///
/// Both passes of a set must draw the same numbers (the official code re-seeds at every pass), so
/// make a fresh source at the start of each pass.
pub trait DropoutSource {
    /// Fills `out` with the next uniforms of the stream.
    fn fill_uniform(&mut self, out: &mut [f32]);

    /// The next `n` uniforms of the stream.
    fn draw(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.fill_uniform(&mut out);
        out
    }
}

/// `torch.rand` on the CPU after `torch.manual_seed(seed)`: MT19937 seeded by
/// `init_genrand(seed as u32)`, each float `(next_u32() & 0xFFFFFF) · 2⁻²⁴` (METHOD.md §2).
#[derive(Clone)]
pub struct TorchCpuRand {
    state: Box<[u32; 624]>,
    index: usize,
}

impl TorchCpuRand {
    pub fn new(seed: u64) -> Self {
        // torch keeps only the low 32 bits of the seed for its Mersenne Twister.
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7FFF_FFFF);
                let mag = if y & 1 == 1 { 0x9908_B0DF } else { 0 };
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    pub fn next_uniform(&mut self) -> f32 {
        (self.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }
}

impl DropoutSource for TorchCpuRand {
    fn fill_uniform(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.next_uniform();
        }
    }
}

/// storyfarm's own dropout stream, seeded per frame (the official draws come from torch's global
/// CUDA generator and cannot be reproduced).
///
/// Definition (stable; changing it changes every ConsiStory frame): the key of
/// [`crate::noise::NoiseGenerator`] (the seed as 8 little-endian bytes, then 24 zero bytes) with
/// ChaCha20 stream [`SeededUniform::STREAM`] instead of 0, so the draws are independent of the
/// frame's initial noise; each uniform is `(next_u32() >> 8) · 2⁻²⁴`.
#[derive(Clone)]
pub struct SeededUniform {
    rng: ChaCha20Rng,
}

impl SeededUniform {
    /// `b"cs-drop\0"` read as a little-endian `u64`.
    pub const STREAM: u64 = u64::from_le_bytes(*b"cs-drop\0");

    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = ChaCha20Rng::from_seed(key);
        rng.set_stream(Self::STREAM);
        Self { rng }
    }

    pub fn next_uniform(&mut self) -> f32 {
        (self.rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

impl DropoutSource for SeededUniform {
    fn fill_uniform(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.next_uniform();
        }
    }
}

/// The patches that stay in the shared keys: `mask & !(uniform < p)` (torch compares the float32
/// uniforms with `p` rounded to float32).
pub fn dropout_keep(mask: &[bool], uniforms: &[f32], p: f32) -> Result<Vec<bool>> {
    check_len("uniforms", uniforms, mask.len())?;
    Ok(mask
        .iter()
        .zip(uniforms)
        .map(|(&m, &u)| {
            let dropped = u < p;
            m && !dropped
        })
        .collect())
}

/// One step's dropout in the official order: one uniform per patch of `subject_32` (all images,
/// row-major), then one per patch of `subject_64`. Returns the kept masks at both resolutions.
pub fn draw_dropout(
    source: &mut dyn DropoutSource,
    subject_32: &[bool],
    subject_64: &[bool],
    p: f32,
) -> Result<(Vec<bool>, Vec<bool>)> {
    let u32s = source.draw(subject_32.len());
    let u64s = source.draw(subject_64.len());
    Ok((
        dropout_keep(subject_32, &u32s, p)?,
        dropout_keep(subject_64, &u64s, p)?,
    ))
}

// ---------------------------------------------------------------------------------------------
// DIFT smoothing
// ---------------------------------------------------------------------------------------------

/// The official `gaussian_smooth` kernel (3×3, row-major): `exp(−(dx² + dy²)/2σ²)/(2πσ²)` in
/// float64, divided by its numpy sum, rounded to float32 by `torch.Tensor`.
pub fn gaussian_kernel_3x3(sigma: f64) -> [f32; 9] {
    let mut k = [0f64; 9];
    for (i, v) in k.iter_mut().enumerate() {
        let dy = (i / 3) as f64 - 1.0;
        let dx = (i % 3) as f64 - 1.0;
        let norm = 1.0 / (2.0 * std::f64::consts::PI * (sigma * sigma));
        *v = norm * libm::exp(-(dy * dy + dx * dx) / (2.0 * (sigma * sigma)));
    }
    // numpy's pairwise sum of 9 values: eight in a tree, then the ninth.
    let sum = ((k[0] + k[1]) + (k[2] + k[3])) + ((k[4] + k[5]) + (k[6] + k[7])) + k[8];
    k.map(|v| (v / sum) as f32)
}

/// The official DIFT smoothing of planar `[channels, height, width]` features: every channel
/// convolved with [`gaussian_kernel_3x3`], zero padding, the nine products summed in kernel
/// order in float32 (which reproduces torch's CPU `conv2d` for this case bit for bit).
pub fn gaussian_smooth_3x3(
    features: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    sigma: f64,
) -> Result<Vec<f32>> {
    check_len("features", features, channels * height * width)?;
    let k = gaussian_kernel_3x3(sigma);
    let mut out = vec![0f32; features.len()];
    let plane_len = height * width;
    for c in 0..channels {
        let plane = &features[c * plane_len..(c + 1) * plane_len];
        let dst = &mut out[c * plane_len..(c + 1) * plane_len];
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0f32;
                for ky in 0..3 {
                    let Some(sy) = (y + ky).checked_sub(1).filter(|&sy| sy < height) else {
                        continue;
                    };
                    for kx in 0..3 {
                        let Some(sx) = (x + kx).checked_sub(1).filter(|&sx| sx < width) else {
                            continue;
                        };
                        acc += plane[sy * width + sx] * k[ky * 3 + kx];
                    }
                }
                dst[y * width + x] = acc;
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Nearest-neighbour maps
// ---------------------------------------------------------------------------------------------

/// Nearest-neighbour maps keyed by `(target, source)` image: per target patch, the source patch
/// and its cosine distance.
pub type NnMaps = HashMap<(usize, usize), (Vec<u32>, Vec<f32>)>;

/// The patch vectors `gen_nn_map` compares: planar `[channels, height, width]` features resized
/// bilinearly to `res_h × res_w` (equal sizes are the identity), laid out `[patch, channel]` and
/// L2-normalised as `x / max(‖x‖, 1e-12)`.
pub fn normalized_patches(
    features: &[f32],
    channels: usize,
    (height, width): (usize, usize),
    (res_h, res_w): (usize, usize),
) -> Result<Vec<f32>> {
    let resized = resize_bilinear_channels(features, channels, height, width, res_h, res_w)?;
    let n = res_h * res_w;
    let mut patches = vec![0f32; n * channels];
    for c in 0..channels {
        for p in 0..n {
            patches[p * channels + c] = resized[c * n + p];
        }
    }
    for row in patches.chunks_exact_mut(channels) {
        // The norm in float64, rounded once: within an ulp of torch's float32 reduction.
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt() as f32;
        let denom = norm.max(NORMALIZE_EPS);
        for v in row {
            *v /= denom;
        }
    }
    Ok(patches)
}

/// `gen_nn_map(source, source_mask, target, …, tgt_size=res)` (METHOD.md §1.5) on raw features:
/// both `[channels, height, width]` maps are resized to `res` and normalised
/// ([`normalized_patches`]); `D[q, p] = 1 − ŝ[q]·t̂[p]`, `2` for every source patch outside
/// `source_mask` (`res_h·res_w` values); per target patch `p` the first `q` of minimal `D`.
pub fn nearest_neighbours(
    target: &[f32],
    source: &[f32],
    source_mask: &[bool],
    channels: usize,
    size: (usize, usize),
    res: (usize, usize),
) -> Result<(Vec<u32>, Vec<f32>)> {
    let t = normalized_patches(target, channels, size, res)?;
    let s = normalized_patches(source, channels, size, res)?;
    nearest_neighbours_normalized(&t, &s, source_mask, channels)
}

/// [`nearest_neighbours`] on patch vectors already made by [`normalized_patches`]
/// (`[patch, channel]`), so a batch normalises each image once.
///
/// Only the source patches inside the mask go through the matrix product: a masked-out patch has
/// distance exactly 2, so the first of them is the only one that can win (when every kept
/// distance is ≥ 2, or ties at 2 with a later index). NaN distances win as in `torch.min`.
pub fn nearest_neighbours_normalized(
    target: &[f32],
    source: &[f32],
    source_mask: &[bool],
    channels: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    check_nonzero("channels", channels)?;
    if !target.len().is_multiple_of(channels) {
        return Err(DiffusionError::invalid_argument(
            "target",
            format!(
                "has {} values, not a multiple of {channels} channels",
                target.len()
            ),
        ));
    }
    check_len("source", source, source_mask.len() * channels)?;
    let targets = target.len() / channels;
    let kept: Vec<usize> = (0..source_mask.len()).filter(|&q| source_mask[q]).collect();
    let first_masked = source_mask.iter().position(|&m| !m);
    let mut map = vec![0u32; targets];
    let mut dist = vec![2f32; targets];
    if kept.is_empty() {
        // Every distance is 2: the argmin is patch 0.
        return Ok((map, dist));
    }
    let mut packed = Vec::with_capacity(kept.len() * channels);
    for &q in &kept {
        packed.extend_from_slice(&source[q * channels..(q + 1) * channels]);
    }
    let weight = Tensor::from_vec(packed, (kept.len(), channels), &Device::Cpu)?;
    for start in (0..targets).step_by(NN_TARGET_CHUNK) {
        let rows = NN_TARGET_CHUNK.min(targets - start);
        let x = Tensor::from_slice(
            &target[start * channels..(start + rows) * channels],
            (rows, channels),
            &Device::Cpu,
        )?;
        let dots: Vec<f32> = kernels::linear(&x, &weight, None, None)?
            .flatten_all()?
            .to_vec1()?;
        for (r, row) in dots.chunks_exact(kept.len()).enumerate() {
            let (mut best_q, mut best_d) = (kept[0], 1.0 - row[0]);
            for (&q, &dot) in kept.iter().zip(row).skip(1) {
                let d = 1.0 - dot;
                if best_d.is_nan() {
                    break;
                }
                if d < best_d || d.is_nan() {
                    (best_q, best_d) = (q, d);
                }
            }
            if let Some(q0) = first_masked {
                if !best_d.is_nan() && (2.0 < best_d || (2.0 == best_d && q0 < best_q)) {
                    (best_q, best_d) = (q0, 2.0);
                }
            }
            map[start + r] = best_q as u32;
            dist[start + r] = best_d;
        }
    }
    Ok((map, dist))
}

/// `cyclic_nn_map` for the ordered pairs `(target i, source j)`, `i ≠ j`, with `pairs(i, j)`:
/// `features[i]` are planar `[channels, height, width]`, `masks[j]` the source masks at `res`.
/// The official code computes every pair; passing the anchor mapping computes only the pairs that
/// feature injection reads.
pub fn nn_maps(
    features: &[Vec<f32>],
    masks: &[Vec<bool>],
    channels: usize,
    size: (usize, usize),
    res: (usize, usize),
    pairs: impl Fn(usize, usize) -> bool,
) -> Result<NnMaps> {
    check_len("masks", masks, features.len())?;
    let patches = features
        .iter()
        .map(|f| normalized_patches(f, channels, size, res))
        .collect::<Result<Vec<_>>>()?;
    let mut maps = NnMaps::new();
    for i in 0..features.len() {
        for j in 0..features.len() {
            if i != j && pairs(i, j) {
                let found =
                    nearest_neighbours_normalized(&patches[i], &patches[j], &masks[j], channels)?;
                maps.insert((i, j), found);
            }
        }
    }
    Ok(maps)
}

// ---------------------------------------------------------------------------------------------
// Feature injection
// ---------------------------------------------------------------------------------------------

/// What feature injection does for one target image (METHOD.md §1.6), per patch `p`.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetInjection {
    /// `j*(p)`: the source image with the smallest distance (first on ties, increasing index).
    pub source_image: Vec<u32>,
    /// `q(p)`: the matched patch of that source.
    pub source_patch: Vec<u32>,
    /// `d(p)`: the distance to it.
    pub best_distance: Vec<f32>,
    /// `τ = otsu(d)` over all patches.
    pub threshold: f32,
    /// `mask[p] && d(p) < τ`.
    pub inject: Vec<bool>,
}

/// The injection of every image of a batch, in batch order; `None` for an image without sources.
/// It depends only on pass-1 results, so one plan serves every injection call of pass 2.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InjectionPlan {
    pub targets: Vec<Option<TargetInjection>>,
}

fn nn_entry(nn: &NnMaps, i: usize, j: usize, patches: usize) -> Result<(&[u32], &[f32])> {
    let (map, dist) = nn.get(&(i, j)).ok_or_else(|| {
        DiffusionError::invalid_argument(
            "nn",
            format!("has no nearest-neighbour map for target {i}, source {j}"),
        )
    })?;
    check_len("nn", map, patches)?;
    check_len("nn", dist, patches)?;
    Ok((map, dist))
}

/// One target over candidate sources in increasing order; `own` is the target itself when it is
/// among them (distance +∞, as the official `nn_distances[i, i]`).
fn plan_target(
    nn: &NnMaps,
    target: usize,
    sources: &[usize],
    own: bool,
    mask: &[bool],
) -> Result<TargetInjection> {
    let n = mask.len();
    let entries = sources
        .iter()
        .map(|&j| {
            if own && j == target {
                Ok(None)
            } else {
                nn_entry(nn, target, j, n).map(Some)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut source_image = vec![0u32; n];
    let mut source_patch = vec![u32::MAX; n];
    let mut best_distance = vec![0f32; n];
    for p in 0..n {
        // torch.argmin over the mapped rows: the first minimum, and a NaN wins.
        let distance = |k: usize| entries[k].map_or(f32::INFINITY, |(_, dist)| dist[p]);
        let (mut best_k, mut best_d) = (0, distance(0));
        for k in 1..sources.len() {
            if best_d.is_nan() {
                break;
            }
            let d = distance(k);
            if d < best_d || d.is_nan() {
                (best_k, best_d) = (k, d);
            }
        }
        source_image[p] = sources[best_k] as u32;
        best_distance[p] = best_d;
        if let Some((map, _)) = entries[best_k] {
            source_patch[p] = map[p];
        }
    }
    let threshold = otsu_threshold(&best_distance)?;
    // A patch whose best source is the target itself (every mapped distance infinite) has no
    // match; the official code would read an uninitialised `nn_map[i, i]` there.
    let inject = (0..n)
        .map(|p| mask[p] && best_distance[p] < threshold && source_patch[p] != u32::MAX)
        .collect();
    Ok(TargetInjection {
        source_image,
        source_patch,
        best_distance,
        threshold,
        inject,
    })
}

/// The batch-mode plan (`FeatureInjector.inject_outputs`): image `i` draws from
/// `S = {j : sees(i, j)}` plus itself at distance +∞, and is skipped when `S` has no `j ≠ i`.
/// `masks[i]` is image `i`'s pass-1 final subject mask at the injection resolution; `nn` needs
/// every `(i, j)` with `j ≠ i` in `S`.
pub fn injection_plan(
    nn: &NnMaps,
    masks: &[Vec<bool>],
    sees: impl Fn(usize, usize) -> bool,
) -> Result<InjectionPlan> {
    let images = masks.len();
    let targets = (0..images)
        .map(|i| {
            let sources: Vec<usize> = (0..images).filter(|&j| j == i || sees(i, j)).collect();
            if sources.len() < 2 {
                return Ok(None);
            }
            plan_target(nn, i, &sources, true, &masks[i]).map(Some)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(InjectionPlan { targets })
}

/// The float32 weights torch applies: `alpha` and `1 − alpha` (computed in float64) each rounded
/// to float32.
pub fn injection_weights(alpha: f64) -> (f32, f32) {
    (alpha as f32, (1.0 - alpha) as f32)
}

fn plan_patches(plan: &InjectionPlan) -> usize {
    plan.targets
        .iter()
        .flatten()
        .map(|t| t.inject.len())
        .next()
        .unwrap_or(0)
}

/// Batch-mode injection on the cond half's attention output `out` `[images, patches, channels]`:
/// `out[i, p] = α·out[j*, q] + (1 − α)·out[i, p]` (two float32 products, then their sum) for
/// the planned patches, **in place, image after image**: a target reads sources that earlier
/// targets have already changed, as the official code does.
pub fn apply_injection(
    plan: &InjectionPlan,
    out: &mut [f32],
    channels: usize,
    alpha: f64,
) -> Result<()> {
    let n = plan_patches(plan);
    check_len("out", out, plan.targets.len() * n * channels)?;
    let (a, b) = injection_weights(alpha);
    for (i, target) in plan.targets.iter().enumerate() {
        let Some(t) = target else { continue };
        check_len("plan", &t.inject, n)?;
        for p in (0..n).filter(|&p| t.inject[p]) {
            let (j, q) = (t.source_image[p] as usize, t.source_patch[p] as usize);
            if j >= plan.targets.len() || q >= n || j == i {
                return Err(DiffusionError::invalid_argument(
                    "plan",
                    format!("target {i} patch {p} points at image {j} patch {q}"),
                ));
            }
            let (dst, src) = ((i * n + p) * channels, (j * n + q) * channels);
            for k in 0..channels {
                out[dst + k] = a * out[src + k] + b * out[dst + k];
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Query blending
// ---------------------------------------------------------------------------------------------

/// `np.linspace(start, stop, num)` in float64: `i·step + start` with `step = (stop − start)/(num − 1)`,
/// the last value exactly `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let delta = stop - start;
    let div = num.saturating_sub(1) as f64;
    let step = delta / div;
    let mut out: Vec<f64> = (0..num)
        .map(|i| {
            let offset = if num <= 1 {
                i as f64 * delta
            } else if step == 0.0 {
                (i as f64 / div) * delta
            } else {
                i as f64 * step
            };
            offset + start
        })
        .collect();
    if num > 1 {
        out[num - 1] = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    // Expected values come from the reference libraries and the official code, computed by the
    // script below (inputs are generated by the same formulas on both sides, so only results are
    // literals; "hash" is FNV-1a 64 over the little-endian bytes of every value).
    //
    // ```python
    // # Regenerates the expected values below. Needs numpy 2.x, scikit-image 0.26, torch 2.x (CPU,
    // # AVX-512 kernels) and the unmodified official code (commit 8158d41) on CONSISTORY_OFFICIAL.
    // import os, sys, numpy as np, torch, torch.nn.functional as F
    // sys.path.insert(0, os.environ.get("CONSISTORY_OFFICIAL", "/work/scratch/consistory-official"))
    // from skimage.filters import threshold_otsu
    // from utils.general_utils import gaussian_smooth, gen_nn_map, attn_map_to_binary
    // from consistory_utils import FeatureInjector, AnchorCache
    // f32 = np.float32
    //
    // def xs32(seed, n):  # xorshift32 -> 24-bit uniforms, mirrored by `xs32` in the tests
    //     x, out = seed, []
    //     for _ in range(n):
    //         x ^= (x << 13) & 0xFFFFFFFF; x ^= x >> 17; x ^= (x << 5) & 0xFFFFFFFF
    //         out.append((x >> 8) * 2.0**-24)
    //     return np.array(out, f32)
    //
    // def fnv(a):  # FNV-1a 64 over the little-endian bytes of the values
    //     h = 0xCBF29CE484222325
    //     for b in np.ascontiguousarray(a).tobytes():
    //         h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    //     return hex(h)
    //
    // def blob(n, r0, c0, s, seed):  # f64 arithmetic, rounded once, mirrored by `blob` in the tests
    //     u = xs32(seed, n * n)
    //     return np.array([0.05 / (1.0 + ((i // n - r0) ** 2 + (i % n - c0) ** 2) / s)
    //                      + 0.01 * float(u[i]) for i in range(n * n)]).astype(f32)
    //
    // print("otsu")
    // u2, u3 = xs32(2, 1024), xs32(3, 4096)
    // for x in [np.array([3.4771605, 3.4883976, 3.489513, 3.2989657, 3.3659549, 3.472039, 3.4692757,
    //                     3.4811227, 3.4514124, 3.3322299, 3.3179555, 3.406283], f32),
    //           np.array([0.96004015, 0.4573404, 1.0221004, 0.38257527, 0.5717171, 1.0290368,
    //                     0.95970225, 0.9148418, 0.85354716, 0.6174226, 0.88939595, 0.97887707], f32),
    //           xs32(1, 1024), u2 * u2 * u2 * u2 * f32(0.01), f32(1) - f32(0.5) * (u3 * u3),
    //           xs32(4, 7), blob(32, 12, 17, 40.0, 5)]:
    //     print(repr(threshold_otsu(x)))
    //
    // print("bilinear")
    // def up(x, c, h, w, oh, ow):
    //     x = torch.from_numpy(x).view(1, c, h, w)
    //     return F.interpolate(x, size=(oh, ow), mode="bilinear").numpy().ravel()
    // for (seed, c, h, w, oh, ow) in [(7, 1, 32, 32, 64, 64), (8, 1, 7, 5, 11, 13),
    //                                 (9, 19, 8, 8, 4, 4), (10, 19, 6, 5, 9, 7),
    //                                 (11, 1, 32, 32, 100, 100), (12, 2, 17, 23, 90, 95)]:
    //     o = up(xs32(seed, c * h * w), c, h, w, oh, ow)
    //     print(seed, fnv(o), repr(o[:3]), repr(o[-1]))
    //
    // print("subject masks")  # exactly AttentionStore.aggregate_last_steps_attention, two concepts
    // maps = torch.stack([torch.from_numpy(blob(32, 12, 17, 40.0, 5)),
    //                     torch.from_numpy(blob(32, 25, 6, 10.0, 6))]).view(2, 32, 32)
    // for res in (32, 64):
    //     r = F.interpolate(maps.unsqueeze(1), size=res, mode="bilinear").squeeze(1)
    //     m = [torch.from_numpy(attn_map_to_binary(r[k], 1.)).bool().view(-1) for k in range(2)]
    //     u = torch.stack(m).max(dim=0).values
    //     print(res, [repr(threshold_otsu(r[k].numpy())) for k in range(2)],
    //           [int(x.sum()) for x in m], int(u.sum()), fnv(u.numpy().astype(np.uint8)))
    //
    // print("torch.rand")
    // torch.manual_seed(0)
    // a, b = torch.rand(2, 1024).numpy().ravel(), torch.rand(2, 4096).numpy().ravel()
    // print(repr(a[:8]), repr(a[2040:2048]), repr(b[:4]), repr(b[-4:]), fnv(a), fnv(b))
    // torch.manual_seed(40); print(repr(torch.rand(4).numpy()))
    //
    // print("gaussian")
    // impulse = torch.zeros(1, 3, 3); impulse[0, 1, 1] = 1
    // print([str(v) for v in gaussian_smooth(impulse, kernel_size=3, sigma=1).numpy().ravel()])
    // feat = (xs32(13, 2 * 64 * 64) * f32(2) - f32(1)).reshape(2, 64, 64)
    // g = gaussian_smooth(torch.from_numpy(feat), kernel_size=3, sigma=1).numpy().ravel()
    // print(fnv(g), [str(v) for v in g[:3]], str(g[4096 + 130]))
    //
    // print("nn maps")  # gen_nn_map(source j, source mask, target i, target mask, res)
    // src = torch.from_numpy(xs32(14, 6 * 8 * 8) - f32(0.5)).view(6, 8, 8)
    // tgt = torch.from_numpy(xs32(15, 6 * 8 * 8) - f32(0.5)).view(6, 8, 8)
    // for res in (8, 4):
    //     smask = torch.from_numpy(xs32(16, res * res) < f32(0.5))
    //     idx, dist = gen_nn_map(src, smask, tgt, None, "cpu", batch_size=None, tgt_size=res)
    //     print(res, idx.tolist(), repr(dist.numpy()))
    // e = torch.eye(3)  # ties and masked rows: 2x2 "images" of 3 channels
    // src = torch.stack([e[0], e[0], e[1], e[0]]).T.reshape(3, 2, 2)  # patches: e0 e0 e1 e0
    // tgt = torch.stack([e[0], e[1], e[2], -e[0]]).T.reshape(3, 2, 2)
    // for smask in (torch.tensor([False, True, True, True]), torch.zeros(4, dtype=torch.bool)):
    //     idx, dist = gen_nn_map(src, smask, tgt, None, "cpu", batch_size=None, tgt_size=2)
    //     print("ties", idx.tolist(), dist.tolist())
    //
    // print("feature injection")  # FeatureInjector on 4x4 layers (inject_res patched to 4)
    // B, N, C = 3, 16, 2
    // mapping = torch.eye(B, dtype=torch.bool); mapping[:, 0] = True; mapping[:, 1] = True
    // nn_map = torch.from_numpy((xs32(17, B * B * N) * f32(N)).astype(np.int64)).view(B, B, N)
    // nn_dist = torch.from_numpy(xs32(18, B * B * N) * f32(1.5)).view(B, B, N)
    // for i in range(B): nn_dist[i, i] = float("inf")
    // masks = torch.from_numpy(xs32(19, B * N) < f32(0.6)).view(B, N)
    // out = torch.from_numpy(xs32(20, B * N * C) * f32(2) - f32(1)).view(B, N, C)
    // fi = FeatureInjector({4: nn_map}, {4: nn_dist}, {4: masks}, inject_range_alpha=[(5, 16, 0.8)],
    //                      dist_thr="dynamic", inject_unet_parts=["up", "down"]); fi.inject_res = [4]
    // def best(i):
    //     j = nn_dist[i][mapping[i]].argmin(0)
    //     d = nn_dist[i][mapping[i]][j, torch.arange(N)]
    //     q = nn_map[i][mapping[i]][j, torch.arange(N)]
    //     return j, q, d, masks[i] & (d < threshold_otsu(d.numpy()))
    // for i in range(B):
    //     print("target", i, repr(threshold_otsu(best(i)[2].numpy())), int(best(i)[3].sum()))
    // res = fi.inject_outputs(out.clone(), 8, 4, mapping, "up_24").numpy()
    // print("aliased", fnv(res), repr(res.ravel()[:4]))
    // ref, o = out.clone(), out.clone()  # the same with every source read from a copy
    // for i in range(B):
    //     j, q, _, m = best(i)
    //     o[i][m] = 0.8 * ref[mapping[i]][j, q][m] + (1 - 0.8) * ref[i][m]
    // print("copying", fnv(o.numpy()))
    // A = 2; cache = AnchorCache()
    // anchor_out = torch.from_numpy(xs32(21, A * N * C) * f32(2) - f32(1)).view(A, N, C)
    // cache.h_out_cache = {"up_24": {8: anchor_out}}
    // a_map = torch.from_numpy((xs32(22, A * N) * f32(N)).astype(np.int64)).view(1, A, N)
    // a_dist = torch.from_numpy(xs32(23, A * N) * f32(1.5)).view(1, A, N)
    // a_mask = torch.from_numpy(xs32(24, N) < f32(0.6)).view(1, N)
    // fa = FeatureInjector({4: a_map}, {4: a_dist}, {4: a_mask}, inject_range_alpha=[(5, 16, 0.8)],
    //                      dist_thr="dynamic", inject_unet_parts=["up", "down"]); fa.inject_res = [4]
    // res = fa.inject_anchors(out[:1].clone(), 8, 4, None, "up_24", cache).numpy()
    // print("anchors", fnv(res), repr(res.ravel()[:4]))
    //
    // print("linspace", [hex(np.float64(v).view(np.uint64)) for v in np.linspace(0.9, 0.81836735, 6)])
    // ```

    use super::*;

    fn xs32(seed: u32, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 * (1.0 / 16_777_216.0)
            })
            .collect()
    }

    fn fnv_bytes(bytes: impl IntoIterator<Item = u8>) -> u64 {
        bytes.into_iter().fold(0xCBF2_9CE4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
        })
    }

    fn fnv(values: &[f32]) -> u64 {
        fnv_bytes(values.iter().flat_map(|v| v.to_le_bytes()))
    }

    fn fnv_mask(mask: &[bool]) -> u64 {
        fnv_bytes(mask.iter().map(|&m| u8::from(m)))
    }

    fn blob(n: usize, r0: f64, c0: f64, s: f64, seed: u32) -> Vec<f32> {
        let u = xs32(seed, n * n);
        (0..n * n)
            .map(|i| {
                let (dr, dc) = ((i / n) as f64 - r0, (i % n) as f64 - c0);
                (0.05 / (1.0 + (dr * dr + dc * dc) / s) + 0.01 * f64::from(u[i])) as f32
            })
            .collect()
    }

    fn scaled(seed: u32, n: usize, scale: f32, shift: f32) -> Vec<f32> {
        xs32(seed, n).iter().map(|&u| u * scale - shift).collect()
    }

    fn below(seed: u32, n: usize, p: f32) -> Vec<bool> {
        xs32(seed, n).iter().map(|&u| u < p).collect()
    }

    #[test]
    fn otsu_matches_skimage() {
        // Arrays where numpy's correction of the computed bin against the float32 edges moves a
        // value, and the threshold with it (naive binning gives 3.3655827 and 0.61616).
        let edge_a = [
            3.4771605f32,
            3.4883976,
            3.489513,
            3.2989657,
            3.3659549,
            3.472039,
            3.4692757,
            3.4811227,
            3.4514124,
            3.3322299,
            3.3179555,
            3.406283,
        ];
        let edge_b = [
            0.96004015f32,
            0.4573404,
            1.0221004,
            0.38257527,
            0.5717171,
            1.0290368,
            0.95970225,
            0.9148418,
            0.85354716,
            0.6174226,
            0.88939595,
            0.97887707,
        ];
        let u2 = xs32(2, 1024);
        let u3 = xs32(3, 4096);
        let cases: Vec<(Vec<f32>, f32)> = vec![
            (edge_a.to_vec(), 3.366327),
            (edge_b.to_vec(), 0.61868525),
            (xs32(1, 1024), 0.5015581),
            (
                u2.iter().map(|&u| u * u * u * u * 0.01).collect(),
                0.0035163467,
            ),
            (u3.iter().map(|&u| 1.0 - 0.5 * (u * u)).collect(), 0.7920181),
            (xs32(4, 7), 0.38192943),
            (blob(32, 12.0, 17.0, 40.0, 5), 0.024505086),
        ];
        for (k, (values, expected)) in cases.iter().enumerate() {
            assert_eq!(otsu_threshold(values).unwrap(), *expected, "case {k}");
        }
    }

    #[test]
    fn otsu_degenerate_inputs() {
        assert_eq!(otsu_threshold(&[0.25; 10]).unwrap(), 0.25);
        assert_eq!(otsu_threshold(&[-3.0]).unwrap(), -3.0);
        // Where skimage raises: nothing, NaN, infinities, a range of one ulp.
        assert!(otsu_threshold(&[]).is_err());
        assert!(otsu_threshold(&[0.0, f32::NAN]).is_err());
        assert!(otsu_threshold(&[0.0, f32::INFINITY]).is_err());
        assert!(otsu_threshold(&[1.0, 1.0 + f32::EPSILON]).is_err());
    }

    #[test]
    fn bilinear_matches_torch() {
        // (seed, channels, h, w, out h, out w, hash, first three, last): the channels-last kernel
        // with leftover channels only, with full 16-lane vectors plus 3 leftovers, and (outputs
        // over 128 rows + columns) the generic kernel.
        type Case = (u32, usize, usize, usize, usize, usize, u64, [f32; 4]);
        let cases: [Case; 6] = [
            (
                7,
                1,
                32,
                32,
                64,
                64,
                0x184eee1d16c8c8a9,
                [0.0004406, 0.02771071, 0.08225092, 0.06091988],
            ),
            (
                8,
                1,
                7,
                5,
                11,
                13,
                0xd24a031a4eccf65f,
                [0.0005036, 0.01008281, 0.05797888, 0.12871838],
            ),
            (
                9,
                19,
                8,
                8,
                4,
                4,
                0x4a666ac4d5cd0679,
                [0.42937732, 0.41155308, 0.5632806, 0.23987693],
            ),
            (
                10,
                19,
                6,
                5,
                9,
                7,
                0xbaa5168c703446e8,
                [0.00062948, 0.08957934, 0.27233264, 0.73550105],
            ),
            (
                11,
                1,
                32,
                32,
                100,
                100,
                0x4b6b746be2482903,
                [0.00069243, 0.00069243, 0.05209629, 0.6627084],
            ),
            (
                12,
                2,
                17,
                23,
                90,
                95,
                0x65c27fcd0a12865b,
                [0.00075537, 0.00075537, 0.02041777, 0.9098084],
            ),
        ];
        for (seed, c, h, w, oh, ow, hash, samples) in cases {
            let out = resize_bilinear_channels(&xs32(seed, c * h * w), c, h, w, oh, ow).unwrap();
            let got = [out[0], out[1], out[2], out[out.len() - 1]];
            for (g, e) in got.iter().zip(samples) {
                assert!((g - e).abs() <= 1e-7, "case {seed}: {got:?} vs {samples:?}");
            }
            assert_eq!(fnv(&out), hash, "case {seed}: not bit-identical to torch");
        }
        let plane = xs32(7, 32 * 32);
        assert_eq!(resize_bilinear(&plane, 32, 32, 32, 32).unwrap(), plane);
        assert!(resize_bilinear(&plane, 32, 31, 64, 64).is_err());
    }

    #[test]
    fn subject_masks_match_official_aggregation() {
        let maps = [blob(32, 12.0, 17.0, 40.0, 5), blob(32, 25.0, 6.0, 10.0, 6)];
        let maps: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        // (res, thresholds, pixels per concept, union pixels, union hash)
        let cases = [
            (
                32,
                [0.024505086f32, 0.01697471],
                [204, 111],
                315,
                0x3774ea55e4d5b128u64,
            ),
            (
                64,
                [0.024688326, 0.01663779],
                [786, 464],
                1250,
                0x6f5c10c588ab6d8d,
            ),
        ];
        for (res, thresholds, counts, union_count, hash) in cases {
            for k in 0..2 {
                let (mask, threshold) = subject_mask(maps[k], 32, res).unwrap();
                assert_eq!(threshold, thresholds[k], "res {res} concept {k}");
                assert_eq!(mask.iter().filter(|&&m| m).count(), counts[k]);
            }
            let (union, got) = union_subject_mask(&maps, 32, res).unwrap();
            assert_eq!(got, thresholds);
            assert_eq!(union.iter().filter(|&&m| m).count(), union_count);
            assert_eq!(fnv_mask(&union), hash, "res {res}");
        }
        assert!(union_subject_mask(&[], 32, 64).is_err());
    }

    #[test]
    fn torch_cpu_rand_replays_torch() {
        // torch.manual_seed(0); torch.rand(2, 1024) then torch.rand(2, 4096).
        let mut rng = TorchCpuRand::new(0);
        let a = rng.draw(2 * 1024);
        let b = rng.draw(2 * 4096);
        let a_head = [
            0.4962566, 0.7682218, 0.08847743, 0.13203049, 0.30742282, 0.6340787, 0.4900934,
            0.89644474,
        ];
        let a_2040 = [
            0.3735612, 0.48991418, 0.84797287, 0.9904706, 0.7432953, 0.5874913, 0.82631713,
            0.2909161,
        ];
        assert_eq!(a[..8], a_head);
        assert_eq!(a[2040..], a_2040);
        assert_eq!(b[..4], [0.23869848, 0.3556071, 0.17638803, 0.7149844]);
        assert_eq!(b[8188..], [0.23372, 0.6109412, 0.8316812, 0.9479163]);
        assert_eq!(fnv(&a), 0xcb124395953e5799);
        assert_eq!(fnv(&b), 0x813454a272a1fd1);
        let seed_40 = TorchCpuRand::new(40).draw(4);
        assert_eq!(seed_40, [0.36787832, 0.8661019, 0.17370647, 0.7157081]);
    }

    #[test]
    fn seeded_uniform_is_pinned() {
        let v = SeededUniform::new(42).draw(4);
        assert_eq!(v, SeededUniform::new(42).draw(4));
        assert_ne!(v, SeededUniform::new(43).draw(4));
        // Pinned when the definition was written: a change alters every ConsiStory frame.
        assert_eq!(v, SEEDED_42, "dropout definition changed: {v:?}");
        let many = SeededUniform::new(7).draw(100_000);
        let mean = many.iter().map(|&u| f64::from(u)).sum::<f64>() / many.len() as f64;
        assert!(many.iter().all(|&u| (0.0..1.0).contains(&u)));
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    }

    #[test]
    fn dropout_keeps_mask_and_draw_order() {
        let mask = [true, true, false, true];
        let keep = dropout_keep(&mask, &[0.2, 0.7, 0.1, 0.5], MASK_DROPOUT).unwrap();
        assert_eq!(keep, [false, true, false, true]);
        assert!(dropout_keep(&mask, &[0.2], MASK_DROPOUT).is_err());
        // One step of two images: all of res 32 first, then res 64, from one stream.
        let (m32, m64) = (vec![true; 2 * 1024], vec![true; 2 * 4096]);
        let (k32, k64) = draw_dropout(&mut TorchCpuRand::new(0), &m32, &m64, 0.5).unwrap();
        let mut rng = TorchCpuRand::new(0);
        let (u32s, u64s) = (rng.draw(2 * 1024), rng.draw(2 * 4096));
        assert_eq!(k32, u32s.iter().map(|&u| u >= 0.5).collect::<Vec<_>>());
        assert_eq!(k64, u64s.iter().map(|&u| u >= 0.5).collect::<Vec<_>>());
    }

    #[test]
    fn gaussian_smoothing_matches_official() {
        assert_eq!(
            gaussian_kernel_3x3(DIFT_SIGMA),
            [
                0.07511361,
                0.123841405,
                0.07511361,
                0.123841405,
                0.20417996,
                0.123841405,
                0.07511361,
                0.123841405,
                0.07511361
            ]
        );
        let features = scaled(13, 2 * 64 * 64, 2.0, 1.0);
        let out = gaussian_smooth_3x3(&features, 2, 64, 64, DIFT_SIGMA).unwrap();
        assert_eq!(out[..3], [-0.27063274, -0.1798288, 0.02431637]);
        assert_eq!(out[4096 + 130], 0.028519813);
        assert_eq!(
            fnv(&out),
            0x3998d80cfeafae2a,
            "not bit-identical to the official smoothing"
        );
    }

    #[test]
    fn nearest_neighbours_match_gen_nn_map() {
        let source = scaled(14, 6 * 8 * 8, 1.0, 0.5);
        let target = scaled(15, 6 * 8 * 8, 1.0, 0.5);
        let map_8: [u32; 64] = [
            63, 27, 1, 1, 28, 46, 36, 18, 18, 47, 18, 3, 28, 11, 23, 17, 17, 35, 51, 13, 62, 13,
            15, 3, 36, 63, 17, 0, 14, 35, 28, 8, 8, 1, 62, 59, 47, 3, 60, 20, 8, 17, 20, 14, 48,
            24, 56, 14, 13, 1, 18, 15, 60, 41, 1, 28, 36, 20, 62, 52, 31, 15, 0, 59,
        ];
        let dist_8: [f32; 64] = [
            0.53849417, 0.3066622, 0.28384876, 0.12953633, 0.20869917, 0.3431955, 0.22846884,
            0.21347874, 0.2892307, 0.12333775, 0.0967986, 0.15624309, 0.27615154, 0.11734891,
            0.2702291, 0.40014774, 0.11162096, 0.27830166, 0.22361815, 0.3099544, 0.24879688,
            0.2629943, 0.109999, 0.1850155, 0.36178702, 0.37911618, 0.17391956, 0.10838288,
            0.20998442, 0.2443766, 0.18342018, 0.27431077, 0.1718607, 0.03795576, 0.23854953,
            0.21788388, 0.23888963, 0.06132782, 0.46752125, 0.14800757, 0.20958418, 0.40131426,
            0.15917587, 0.14307249, 0.36135542, 0.27990156, 0.08184671, 0.20432037, 0.3541656,
            0.11410028, 0.1941151, 0.18613607, 0.27381325, 0.25936568, 0.19502103, 0.01653546,
            0.22871184, 0.39739525, 0.08397597, 0.17374665, 0.3191092, 0.25857264, 0.16231251,
            0.08948666,
        ];
        let map_4: [u32; 16] = [15, 5, 3, 3, 0, 10, 15, 5, 0, 10, 0, 11, 0, 3, 0, 15];
        let dist_4: [f32; 16] = [
            0.74447966, 0.15458876, 0.5658835, 0.29197222, 0.6151134, 0.3523612, 0.70729744,
            0.34721208, 0.17233896, 0.6119693, 0.43079984, 0.4344448, 0.3347128, 0.35264277,
            0.37072456, 0.3729059,
        ];
        for (res, map, dist) in [(8, &map_8[..], &dist_8[..]), (4, &map_4[..], &dist_4[..])] {
            let mask = below(16, res * res, 0.5);
            let (m, d) =
                nearest_neighbours(&target, &source, &mask, 6, (8, 8), (res, res)).unwrap();
            assert_eq!(m, map, "res {res}");
            for (p, (g, e)) in d.iter().zip(dist).enumerate() {
                // The matrix product is not torch's: distances agree to float32 noise.
                assert!((g - e).abs() <= 1e-6, "res {res} patch {p}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn nearest_neighbours_ties_and_masked_rows() {
        // 2×2 maps of 3 channels: source patches e0 e0 e1 e0, target patches e0 e1 e2 −e0.
        let planar = |patches: [[f32; 3]; 4]| -> Vec<f32> {
            (0..3)
                .flat_map(|c| patches.iter().map(move |p| p[c]))
                .collect()
        };
        let source = planar([[1., 0., 0.], [1., 0., 0.], [0., 1., 0.], [1., 0., 0.]]);
        let target = planar([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.], [-1., 0., 0.]]);
        let mask = [false, true, true, true];
        let (map, dist) = nearest_neighbours(&target, &source, &mask, 3, (2, 2), (2, 2)).unwrap();
        assert_eq!(map, [1, 2, 1, 2]);
        assert_eq!(dist, [0.0, 0.0, 1.0, 1.0]);
        let (map, dist) =
            nearest_neighbours(&target, &source, &[false; 4], 3, (2, 2), (2, 2)).unwrap();
        assert_eq!(map, [0, 0, 0, 0]);
        assert_eq!(dist, [2.0; 4]);
        // A kept patch at distance 2 ties with the masked patch 0 at 2: the first index wins.
        let (map, dist) = nearest_neighbours(
            &target[..],
            &source,
            &[false, true, false, false],
            3,
            (2, 2),
            (2, 2),
        )
        .unwrap();
        assert_eq!((map[3], dist[3]), (0, 2.0));
        assert_eq!((map[0], dist[0]), (1, 0.0));
    }

    #[test]
    fn batch_maps_are_the_pairwise_maps() {
        let (c, side) = (4, 6);
        let features: Vec<Vec<f32>> = (0..3)
            .map(|i| scaled(30 + i, c * side * side, 1.0, 0.5))
            .collect();
        let masks: Vec<Vec<bool>> = (0..3).map(|i| below(40 + i, 9, 0.5)).collect();
        let sees = |i: usize, j: usize| j < 2 || i == j;
        let maps = nn_maps(&features, &masks, c, (side, side), (3, 3), sees).unwrap();
        let mut keys: Vec<_> = maps.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, [(0, 1), (1, 0), (2, 0), (2, 1)]);
        for (&(i, j), found) in &maps {
            let single = nearest_neighbours(
                &features[i],
                &features[j],
                &masks[j],
                c,
                (side, side),
                (3, 3),
            )
            .unwrap();
            assert_eq!(*found, single);
        }
    }

    /// The official `FeatureInjector` case of the script: 3 images of 4×4 patches, 2 channels,
    /// anchors 0 and 1.
    fn injection_case() -> (NnMaps, Vec<Vec<bool>>, Vec<f32>) {
        let (b, n) = (3, 16);
        let map = xs32(17, b * b * n);
        let dist = xs32(18, b * b * n);
        let mut nn = NnMaps::new();
        for i in 0..b {
            for j in (0..b).filter(|&j| j != i) {
                let at = (i * b + j) * n..(i * b + j + 1) * n;
                let m = map[at.clone()]
                    .iter()
                    .map(|&u| (u * n as f32) as u32)
                    .collect();
                let d = dist[at].iter().map(|&u| u * 1.5).collect();
                nn.insert((i, j), (m, d));
            }
        }
        let masks = below(19, b * n, 0.6)
            .chunks(n)
            .map(<[bool]>::to_vec)
            .collect();
        (nn, masks, scaled(20, b * n * 2, 2.0, 1.0))
    }

    #[test]
    fn feature_injection_matches_official_with_aliasing() {
        let (nn, masks, out) = injection_case();
        let sees = |_: usize, j: usize| j < 2;
        let plan = injection_plan(&nn, &masks, sees).unwrap();
        let expected = [(0.6288417f32, 8usize), (0.54077774, 7), (0.5061125, 4)];
        for (t, (threshold, count)) in plan.targets.iter().zip(expected) {
            let t = t.as_ref().unwrap();
            assert_eq!(t.threshold, threshold);
            assert_eq!(t.inject.iter().filter(|&&k| k).count(), count);
        }
        let mut injected = out.clone();
        apply_injection(&plan, &mut injected, 2, INJECTION_ALPHA).unwrap();
        assert_eq!(
            injected[..4],
            [-0.99748206, -0.3709302, 0.37840515, -0.17714131]
        );
        assert_eq!(
            fnv(&injected),
            0xa5a779bd7ac1ee5b,
            "not bit-identical to inject_outputs"
        );
        // Every target reading the original outputs instead gives the official code's numbers
        // only without its in-place aliasing: image 1 would miss image 0's injected values.
        let mut copying = out.clone();
        for i in 0..3 {
            let mut single = InjectionPlan {
                targets: vec![None; 3],
            };
            single.targets[i] = plan.targets[i].clone();
            let mut fresh = out.clone();
            apply_injection(&single, &mut fresh, 2, INJECTION_ALPHA).unwrap();
            copying[i * 32..(i + 1) * 32].copy_from_slice(&fresh[i * 32..(i + 1) * 32]);
        }
        assert_eq!(fnv(&copying), 0x1ee549364b90d91a);
        assert_ne!(copying, injected);
        // Without any mapped source an image is skipped.
        let alone = injection_plan(&nn, &masks, |_, _| false).unwrap();
        assert!(alone.targets.iter().all(Option::is_none));
        assert!(injection_plan(&NnMaps::new(), &masks, sees).is_err());
    }

    #[test]
    fn anchor_injection_matches_official() {
        let (a, n) = (2, 16);
        let map = xs32(22, a * n);
        let dist = xs32(23, a * n);
        // The target is image `a` of a set [anchors..., target] that sees the anchors, whose
        // outputs (the official cache) precede its own in one buffer: the production path.
        let mut nn = NnMaps::new();
        for j in 0..a {
            let m = map[j * n..(j + 1) * n]
                .iter()
                .map(|&u| (u * n as f32) as u32)
                .collect();
            let d = dist[j * n..(j + 1) * n].iter().map(|&u| u * 1.5).collect();
            nn.insert((a, j), (m, d));
        }
        let mut masks = vec![vec![false; n]; a];
        masks.push(below(24, n, 0.6));
        let plan = injection_plan(&nn, &masks, |i, j| i == a && j < a).unwrap();
        let mut all = scaled(21, a * n * 2, 2.0, 1.0);
        all.extend(scaled(20, n * 2, 2.0, 1.0));
        apply_injection(&plan, &mut all, 2, INJECTION_ALPHA).unwrap();
        let out = &all[a * n * 2..];
        assert_eq!(out[..4], [-0.9973813, -0.34573507, 0.4417877, 0.83757746]);
        assert_eq!(
            fnv(out),
            0x244684bc329fb57a,
            "not bit-identical to inject_anchors"
        );
    }

    #[test]
    fn query_blend_is_numpy_linspace() {
        let bits = [
            0x3feccccccccccccd,
            0x3fec470d95bfc553,
            0x3febc14e5eb2bdd8,
            0x3feb3b8f27a5b65e,
            0x3feab5cff098aee3,
            0x3fea3010b98ba769,
        ];
        let strengths = linspace(0.9, 0.81836735, 6);
        assert_eq!(
            strengths.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            bits
        );
        // The options blend from step 1 to n/10 with exactly these weights.
        let options = crate::consistory::ConsistoryOptions::default();
        for (step, &b) in bits.iter().enumerate().skip(1) {
            assert_eq!(
                options.query_blend_weight(step, 50).map(f64::to_bits),
                Some(b)
            );
        }
        assert_eq!(options.query_blend_weight(0, 50), None);
        assert_eq!(options.query_blend_weight(6, 50), None);
        assert_eq!(linspace(1.0, 2.0, 1), [1.0]);
        assert!(linspace(1.0, 2.0, 0).is_empty());
    }

    const SEEDED_42: [f32; 4] = [0.14697194, 0.33648354, 0.39995533, 0.93797165];
}
