//! Borrowing the f32 data of CPU tensors, and building output tensors from vectors.

use candle_core::{bail, DType, Device, Shape, Storage, StorageRef, Tensor};

use crate::Result;

/// Whether the fused kernels can take these tensors (all f32 on the CPU).
pub fn supported(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// The f32 elements of a contiguous CPU tensor, in logical order.
pub(crate) struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    /// `t` must be contiguous (call `.contiguous()` first) f32 on the CPU.
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!(
                "storyfarm-kernels: tensor of shape {:?} is not contiguous",
                t.dims()
            )
        };
        match &*guard {
            Storage::Cpu(s) => {
                s.as_slice::<f32>()?;
            }
            _ => bail!("storyfarm-kernels: tensor is not on the CPU"),
        }
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(s) => {
                &s.as_slice::<f32>().expect("checked in new")[self.start..][..self.len]
            }
            _ => unreachable!("checked in new"),
        }
    }
}

pub(crate) fn output<S: Into<Shape>>(data: Vec<f32>, shape: S) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: a `SendPtr` is only an address: it owns nothing, and every access through it is an
// `unsafe` operation whose SAFETY comment shows that the tasks touch disjoint parts of a
// buffer that outlives them (attention, flash, norm).
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared, it is only copied out.
unsafe impl Sync for SendPtr {}
