//! Bytes in, bytes out: the operations a worker (farm or local) runs, with tensors kept inside
//! this crate. Trajectories and latents travel as safetensors files, frames as PNG files.

use candle_core::{DType, Device, Tensor};

use crate::consistory::run::{ConsistorySet, DropoutDraws, SetStyle};
use crate::consistory::{AnchorMapping, ConsistoryOptions};
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

/// Guidance of a character picture's DDIM inversion: the plain (conditional) inversion, so the
/// replayed anchor is the picture itself whatever guidance the frames use.
pub const CHARACTER_INVERSION_GUIDANCE: f64 = 1.0;

/// A style reference generated from its prompt: its trajectory file (the same file an inversion
/// makes: frames replay it from the first step, offset 0) and its picture.
pub struct GeneratedReference {
    pub trajectory: Vec<u8>,
    pub png: Vec<u8>,
}

/// Generates a style reference from its prompt.
pub fn generate_reference(
    sd: &StableDiffusion,
    prompt: &str,
    seed: u64,
    settings: &GenerationSettings,
    progress: ProgressFn,
) -> Result<GeneratedReference> {
    settings.validate()?;
    let init = sd.seeded_latents(seed, settings)?;
    let zts = sd.reference_trajectory(settings, prompt, None, &init, progress)?;
    let last = zts.dim(0)? - 1;
    let picture = encode_frame(sd, 0, &zts.narrow(0, last, 1)?)?;
    Ok(GeneratedReference {
        trajectory: to_safetensors(TRAJECTORY, &zts)?,
        png: picture.png,
    })
}

/// A character as a task sees it: what its anchors are made from.
#[derive(Clone, Debug)]
pub struct CharacterRequest {
    pub description: String,
    pub subject_words: Vec<String>,
    /// Initial-noise seeds of the generated anchors.
    pub anchor_seeds: Vec<u64>,
    /// The character's own mask-dropout stream.
    pub dropout_seed: u64,
    /// The trajectory file of its picture's inversion: the first anchor replays it.
    pub picture: Option<Vec<u8>>,
}

impl CharacterRequest {
    pub fn anchors(&self) -> usize {
        usize::from(self.picture.is_some()) + self.anchor_seeds.len()
    }
}

/// A frame that shows characters (indices into the task's characters).
#[derive(Clone, Debug, PartialEq)]
pub struct CharacterFrameRequest {
    pub frame: FrameRequest,
    pub characters: Vec<usize>,
}

/// One ConsiStory set of a task: its characters' anchors, then its frames.
#[derive(Clone, Copy)]
pub struct CharacterRenderRequest<'a> {
    pub options: &'a ConsistoryOptions,
    /// The style of every image of the set.
    pub style: Option<&'a StyleRequest<'a>>,
    /// The anchors' negative prompt (the board's).
    pub anchor_negative_prompt: &'a str,
    pub characters: &'a [CharacterRequest],
    /// Empty for an anchor task.
    pub frames: &'a [CharacterFrameRequest],
}

/// What a character render leaves: each character's anchors (latents `[1, 4, h, w]` each, in
/// anchor order) and the frames.
pub struct CharacterRender {
    pub anchors: Vec<Vec<Tensor>>,
    pub frames: Vec<RenderedFrame>,
}

/// Anchors then frames in one ConsiStory set: every character's anchors share attention among
/// themselves, each frame with the anchors of the characters it shows (and nothing else), in
/// the style when given. A frame's result depends only on its own inputs and its characters'
/// anchors, and the anchors only on their own characters: the same frame renders the same in
/// any task, and a task of anchors alone makes exactly the anchors every frame task recomputes.
pub fn render_characters(
    sd: &StableDiffusion,
    settings: &GenerationSettings,
    request: &CharacterRenderRequest,
    progress: ProgressFn,
) -> Result<CharacterRender> {
    let CharacterRenderRequest {
        options,
        style,
        anchor_negative_prompt,
        characters,
        frames,
    } = *request;
    settings.validate()?;
    if characters.is_empty() {
        return Err(DiffusionError::invalid_argument(
            "characters",
            "a character render needs at least one character",
        ));
    }
    let negative = (!anchor_negative_prompt.is_empty()).then(|| anchor_negative_prompt.to_string());
    let mut inputs = Vec::new();
    let mut replays = Vec::new();
    let mut counts = Vec::with_capacity(characters.len());
    let mut words: Vec<String> = Vec::new();
    for (c, character) in characters.iter().enumerate() {
        if character.anchors() == 0 {
            return Err(DiffusionError::invalid_argument(
                format!("characters[{c}]"),
                "has no anchors",
            ));
        }
        if let Some(picture) = &character.picture {
            let zts = from_safetensors(TRAJECTORY, picture, "character picture trajectory")?
                .to_device(sd.device())?
                .to_dtype(sd.dtype())?;
            replays.push((inputs.len(), zts.clone()));
            inputs.push(FrameInput {
                prompt: character.description.clone(),
                negative_prompt: negative.clone(),
                init_latents: zts.get(0)?.unsqueeze(0)?,
            });
        }
        for &seed in &character.anchor_seeds {
            inputs.push(FrameInput {
                prompt: character.description.clone(),
                negative_prompt: negative.clone(),
                init_latents: sd.seeded_latents(seed, settings)?,
            });
        }
        counts.push(character.anchors());
        for w in &character.subject_words {
            if !words.contains(w) {
                words.push(w.clone());
            }
        }
    }
    let first_frame = inputs.len();
    for (i, f) in frames.iter().enumerate() {
        if let Some(&bad) = f.characters.iter().find(|&&c| c >= characters.len()) {
            return Err(DiffusionError::invalid_argument(
                format!("frames[{i}].characters"),
                format!("character {bad} of {}", characters.len()),
            ));
        }
        inputs.push(FrameInput {
            prompt: f.frame.prompt.clone(),
            negative_prompt: (!f.frame.negative_prompt.is_empty())
                .then(|| f.frame.negative_prompt.clone()),
            init_latents: sd.seeded_latents(f.frame.seed, settings)?,
        });
    }
    let shows: Vec<Vec<usize>> = frames.iter().map(|f| f.characters.clone()).collect();
    let reference = match style {
        Some(style) => Some(ReferenceInput {
            prompt: style.reference_prompt.to_string(),
            negative_prompt: None,
            latents: ReferenceLatents::Replay {
                trajectory: from_safetensors(TRAJECTORY, style.trajectory, "trajectory file")?
                    .to_device(sd.device())?
                    .to_dtype(sd.dtype())?,
                offset: style.offset,
            },
        }),
        None => None,
    };
    let set = ConsistorySet {
        frames: &inputs,
        subject_words: &words,
        mapping: AnchorMapping::characters(&counts, &shows),
        dropout: DropoutDraws::Seeded {
            seeds: characters.iter().map(|c| c.dropout_seed).collect(),
        },
        replays: &replays,
        style: style
            .zip(reference.as_ref())
            .map(|(s, reference)| SetStyle {
                options: &s.options,
                reference,
            }),
    };
    let out = sd.consistory(settings, options, &set, progress)?;
    let mut anchors = Vec::with_capacity(characters.len());
    let mut at = 0;
    for &n in &counts {
        anchors.push(
            (at..at + n)
                .map(|i| out.final_latents.narrow(0, i, 1))
                .collect::<candle_core::Result<Vec<_>>>()?,
        );
        at += n;
    }
    let frames = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            encode_frame(
                sd,
                f.frame.index,
                &out.final_latents.narrow(0, first_frame + i, 1)?,
            )
        })
        .collect::<Result<_>>()?;
    Ok(CharacterRender { anchors, frames })
}

/// A character's anchors file: the anchors' final latents and, for a character with a picture,
/// the picture's inversion trajectory (what every frame task replays).
pub fn anchors_file(anchors: &[Tensor], picture: Option<&[u8]>) -> Result<Vec<u8>> {
    let latents = Tensor::cat(anchors, 0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let mut tensors = vec![(LATENTS.to_string(), latents)];
    if let Some(picture) = picture {
        let zts = from_safetensors(TRAJECTORY, picture, "character picture trajectory")?
            .to_dtype(DType::F32)?
            .contiguous()?;
        tensors.push((TRAJECTORY.to_string(), zts));
    }
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).map_err(|e| {
        DiffusionError::invalid_argument("anchors", format!("cannot encode safetensors: {e}"))
    })
}

/// The picture trajectory inside an anchors file (as a trajectory file), when it has one.
pub fn picture_from_anchors_file(bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        DiffusionError::invalid_argument("anchors file", format!("not a safetensors file: {e}"))
    })?;
    tensors
        .remove(TRAJECTORY)
        .map(|zts| to_safetensors(TRAJECTORY, &zts))
        .transpose()
}

/// An anchor's (or frame's) PNG and latents file.
pub fn encode_frame(sd: &StableDiffusion, index: u32, latents: &Tensor) -> Result<RenderedFrame> {
    let image = sd.decode(latents)?;
    let rgb = tensor_to_rgb8(&image)?;
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| DiffusionError::Image {
            name: format!("frame {index}"),
            message: e.to_string(),
        })?;
    Ok(RenderedFrame {
        index,
        png,
        latents: to_safetensors(LATENTS, latents)?,
    })
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
        .map(|(i, f)| encode_frame(sd, f.index, &latents.narrow(0, first + i, 1)?))
        .collect()
}
