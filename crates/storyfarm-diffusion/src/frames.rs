//! Bytes in, bytes out: the operations a worker (farm or local) runs, with tensors kept inside
//! this crate. Trajectories and latents travel as safetensors files, frames as PNG files.

use candle_core::{DType, Device, Tensor};

use crate::error::{DiffusionError, Result};
use crate::image_io::{image_from_bytes, tensor_to_rgb8};
use crate::pipeline::{
    FrameInput, GenerationSettings, ProgressFn, ReferenceInput, ReferenceLatents, StableDiffusion,
};
use crate::style_aligned::StyleAlignedOptions;

/// Tensor name inside a trajectory file.
const TRAJECTORY: &str = "zts";
/// Tensor name inside a latents file.
const LATENTS: &str = "latents";

/// One frame to render.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameRequest {
    pub index: u32,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

/// The style a batch of frames is rendered in: a stored reference trajectory and how to replay it.
#[derive(Clone, Debug)]
pub struct StyleRequest<'a> {
    /// A trajectory file as written by [`invert_image`].
    pub trajectory: &'a [u8],
    pub reference_prompt: &'a str,
    pub offset: usize,
    pub options: StyleAlignedOptions,
}

/// A rendered frame: an 8-bit PNG and its final latents (safetensors, before 1/scaling_factor).
#[derive(Clone, Debug)]
pub struct RenderedFrame {
    pub index: u32,
    pub png: Vec<u8>,
    pub latents: Vec<u8>,
}

fn to_safetensors(name: &str, tensor: &Tensor) -> Result<Vec<u8>> {
    let tensor = tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    safetensors::serialize([(name, &tensor)], None).map_err(|e| {
        DiffusionError::invalid_argument(name, format!("cannot encode safetensors: {e}"))
    })
}

fn from_safetensors(name: &str, bytes: &[u8], what: &str) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        DiffusionError::InvalidArgument {
            field: what.to_string(),
            reason: format!("not a safetensors file: {e}"),
        }
    })?;
    tensors
        .remove(name)
        .ok_or_else(|| DiffusionError::MissingTensor {
            name: name.to_string(),
            location: what.to_string(),
        })
}

/// Final latents `[1, 4, h, w]` of a frame from its latents file.
pub fn latents_from_bytes(bytes: &[u8]) -> Result<Tensor> {
    from_safetensors(LATENTS, bytes, "latents file")
}

/// The largest absolute difference between two latents files, and the largest magnitude of the
/// first (the farm's invariance contract compares frames with these).
pub fn compare_latents(a: &[u8], b: &[u8]) -> Result<(f32, f32)> {
    let a = latents_from_bytes(a)?;
    let b = latents_from_bytes(b)?;
    if a.dims() != b.dims() {
        return Err(DiffusionError::invalid_argument(
            "latents",
            format!("shapes {:?} and {:?} differ", a.dims(), b.dims()),
        ));
    }
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok((diff, scale))
}

/// DDIM-inverts an encoded image (resized to the settings' size) and returns the trajectory file.
pub fn invert_image(
    sd: &StableDiffusion,
    image: &[u8],
    image_name: &str,
    prompt: &str,
    settings: &GenerationSettings,
    guidance_scale: f64,
    progress: ProgressFn,
) -> Result<Vec<u8>> {
    settings.validate()?;
    let image = image_from_bytes(image, image_name, Some((settings.height, settings.width)))?;
    let inversion = sd.invert(&image, prompt, settings.steps, guidance_scale, progress)?;
    to_safetensors(TRAJECTORY, &inversion.zts)
}

/// Renders frames, in the style of a stored trajectory when given. Each frame's result depends
/// only on its own prompt and seed and the style, not on the other frames of the batch.
pub fn render_frames(
    sd: &StableDiffusion,
    settings: &GenerationSettings,
    style: Option<&StyleRequest>,
    frames: &[FrameRequest],
    progress: ProgressFn,
) -> Result<Vec<RenderedFrame>> {
    settings.validate()?;
    let inputs: Vec<FrameInput> = frames
        .iter()
        .map(|f| {
            Ok(FrameInput {
                prompt: f.prompt.clone(),
                negative_prompt: (!f.negative_prompt.is_empty()).then(|| f.negative_prompt.clone()),
                init_latents: sd.seeded_latents(f.seed, settings)?,
            })
        })
        .collect::<Result<_>>()?;
    let (latents, first) = match style {
        None => (sd.txt2img(settings, &inputs, progress)?.final_latents, 0),
        Some(style) => {
            let trajectory = from_safetensors(TRAJECTORY, style.trajectory, "trajectory file")?
                .to_device(sd.device())?
                .to_dtype(sd.dtype())?;
            let reference = ReferenceInput {
                prompt: style.reference_prompt.to_string(),
                negative_prompt: None,
                latents: ReferenceLatents::Replay {
                    trajectory,
                    offset: style.offset,
                },
            };
            (
                sd.style_aligned(settings, &style.options, &reference, &inputs, progress)?
                    .final_latents,
                1,
            )
        }
    };
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let l = latents.narrow(0, first + i, 1)?;
            let image = sd.decode(&l)?;
            let rgb = tensor_to_rgb8(&image)?;
            let mut png = Vec::new();
            rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| DiffusionError::Image {
                    name: format!("frame {}", f.index),
                    message: e.to_string(),
                })?;
            Ok(RenderedFrame {
                index: f.index,
                png,
                latents: to_safetensors(LATENTS, &l)?,
            })
        })
        .collect()
}
