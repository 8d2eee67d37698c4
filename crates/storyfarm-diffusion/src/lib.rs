//! Stable Diffusion 1.x/2.x and XL in candle, with a typed attention seam, DDIM (and inversion),
//! and StyleAligned shared attention. Pure compute: no jobs, queues or storage.

pub mod attention;
pub mod component;
pub mod consistory;
pub mod device;
pub mod error;
pub mod frames;
pub mod image_io;
pub mod layers;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod scheduler;
pub mod style_aligned;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{DiffusionError, Result};
