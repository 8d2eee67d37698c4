//! Stable Diffusion 1.x/2.x and XL in candle, with a typed attention seam, DDIM (and inversion),
//! and StyleAligned shared attention. Pure compute: no jobs, queues or storage.

pub mod attention;
pub mod error;
pub mod noise;
pub mod scheduler;
pub mod style_aligned;
pub mod unet;
pub mod weights;

pub use error::{DiffusionError, Result};
