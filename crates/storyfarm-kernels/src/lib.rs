//! Fused f32 CPU kernels for the UNet hot path: convolutions and linear layers that write
//! bias (and residual) in the same pass as the matrix product, GroupNorm (+SiLU) in one pass
//! with caller-supplied statistics, GEGLU, AdaIN on tokens, and a per-(batch, head) attention
//! kernel with a fused softmax. Every kernel takes and returns candle tensors and only applies to
//! contiguous-able f32 tensors on the CPU; callers keep their candle-op path for anything else
//! (see [`supported`]).

// Unsafe operations need their own `unsafe { }` blocks (each with its safety comment) inside
// `unsafe fn`s too, whose `# Safety` sections state their contracts.
#![deny(unsafe_op_in_unsafe_fn)]

mod adain;
mod attention;
mod conv;
mod flash;
mod geglu;
mod isa;
mod matmul;
mod norm;
mod sgemm;
mod simd;
mod view;

pub use adain::{restyle, token_mean_std};
pub use attention::{attention, ExtraBlock};
pub use conv::{conv2d, conv2d_packed};
pub use geglu::geglu;
pub use matmul::{
    linear, linear_from_channels, linear_geglu, linear_packed, linear_to_channels, PackedWeight,
};
pub use norm::{group_norm_apply, group_norm_stats};
pub use view::supported;

pub type Result<T> = candle_core::Result<T>;

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random values in [-1, 1).
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
