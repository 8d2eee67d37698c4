//! Conversions between image files and the [-1, 1] NCHW tensors the VAE reads and writes.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::{DiffusionError, Result};

/// Reads an image file (PNG or JPEG) as a [1, 3, H, W] f32 CPU tensor in [-1, 1]
/// (`x = u8 / 255 * 2 - 1`), optionally resized to `resize_to` = (height, width) with Lanczos3.
pub fn load_image(path: &Path, resize_to: Option<(usize, usize)>) -> Result<Tensor> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| image_error(&name, e))?;
    image_from_bytes(&bytes, &name, resize_to)
}

/// As [`load_image`] for an encoded image held in memory; `name` identifies it in errors.
pub fn image_from_bytes(
    bytes: &[u8],
    name: &str,
    resize_to: Option<(usize, usize)>,
) -> Result<Tensor> {
    let image = decode_rgb8(bytes, name)?;
    let image = match resize_to {
        Some((height, width)) => resize_rgb8(&image, height, width, name)?,
        None => image,
    };
    rgb8_to_tensor(&image)
}

/// Decodes to 8-bit RGB, turning the picture upright as its EXIF orientation says (phone
/// JPEGs are often stored sideways); alpha is dropped.
fn decode_rgb8(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_error(name, e))?;
    let mut decoder = reader.into_decoder().map_err(|e| image_error(name, e))?;
    let orientation = decoder.orientation().map_err(|e| image_error(name, e))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| image_error(name, e))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

fn resize_rgb8(image: &RgbImage, height: usize, width: usize, name: &str) -> Result<RgbImage> {
    let (Ok(h), Ok(w)) = (u32::try_from(height), u32::try_from(width)) else {
        return Err(image_error(
            name,
            format!("resize target {height}x{width} is too large"),
        ));
    };
    if h == 0 || w == 0 {
        return Err(image_error(
            name,
            format!("resize target {height}x{width} is empty"),
        ));
    }
    if image.dimensions() == (w, h) {
        return Ok(image.clone());
    }
    Ok(image::imageops::resize(image, w, h, FilterType::Lanczos3))
}

/// [1, 3, H, W] f32 in [-1, 1] from 8-bit RGB.
pub fn rgb8_to_tensor(image: &RgbImage) -> Result<Tensor> {
    let (width, height) = image.dimensions();
    // The same f32 operations, in the same order, as the reference pipelines' preprocessing.
    let values: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
        .collect();
    let hwc = Tensor::from_vec(values, (height as usize, width as usize, 3), &Device::Cpu)?;
    Ok(hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// 8-bit RGB from a [3, H, W] or [1, 3, H, W] tensor in [-1, 1]:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, as diffusers' image processor.
pub fn tensor_to_rgb8(tensor: &Tensor) -> Result<RgbImage> {
    let chw = match tensor.dims() {
        [3, _, _] => tensor.clone(),
        [1, 3, _, _] => tensor.squeeze(0)?,
        dims => {
            return Err(DiffusionError::invalid_argument(
                "image tensor",
                format!("expected shape [3, H, W] or [1, 3, H, W], got {dims:?}"),
            ))
        }
    };
    let (_, height, width) = chw.dims3()?;
    let values = chw
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = values
        .into_iter()
        .map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(width as u32, height as u32, bytes).ok_or_else(|| {
        DiffusionError::invalid_argument("image tensor", "pixel buffer does not match its size")
    })
}

/// Writes a [3, H, W] or [1, 3, H, W] tensor in [-1, 1] as an 8-bit RGB PNG.
pub fn save_png(tensor: &Tensor, path: &Path) -> Result<()> {
    tensor_to_rgb8(tensor)?
        .save_with_format(path, ImageFormat::Png)
        .map_err(|e| image_error(&path.display().to_string(), e))
}

fn image_error(name: &str, error: impl std::fmt::Display) -> DiffusionError {
    DiffusionError::Image {
        name: name.to_string(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(FIXTURES).join(rel)
    }

    fn golden_tensor(rel: &str, name: &str) -> anyhow::Result<Tensor> {
        let mut tensors = candle_core::safetensors::load(fixture(rel), &Device::Cpu)?;
        tensors
            .remove(name)
            .ok_or_else(|| anyhow::anyhow!("{rel} has no tensor {name}"))
    }

    /// Largest per-channel difference between two 8-bit images of the same size.
    fn max_channel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        assert_eq!(a.dimensions(), b.dimensions());
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn decoded_tensors_render_like_the_reference_pngs() -> anyhow::Result<()> {
        for (golden, png) in [
            (
                "sd15/txt2img_64x64.safetensors",
                "sd15/txt2img_64x64_image.png",
            ),
            (
                "sd15/txt2img_96x64.safetensors",
                "sd15/txt2img_96x64_image.png",
            ),
            (
                "sdxl/txt2img_64x96.safetensors",
                "sdxl/txt2img_64x96_image.png",
            ),
        ] {
            let decoded = golden_tensor(golden, "decoded")?;
            let rendered = tensor_to_rgb8(&decoded)?;
            let reference = image::open(fixture(png))?.to_rgb8();
            let diff = max_channel_diff(&rendered, &reference);
            println!("{png}: max channel diff {diff}");
            assert!(diff <= 1, "{png}: max channel diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn loaded_png_equals_reference_tensor() -> anyhow::Result<()> {
        for model in ["sd15", "sdxl"] {
            let image = load_image(&fixture(&format!("{model}/inversion_image.png")), None)?;
            let expected = golden_tensor(&format!("{model}/inversion.safetensors"), "image")?;
            assert_eq!(image.dims(), expected.dims());
            let diff = (&image - &expected)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            println!("{model} inversion image: max abs diff {diff:e}");
            assert!(diff <= 1.2e-7, "{model}: max abs diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn png_round_trip_and_resize() -> anyhow::Result<()> {
        let path = fixture("sd15/vae_64x96_image.png");
        let image = load_image(&path, None)?;
        assert_eq!(image.dims(), &[1, 3, 64, 96]);
        let out =
            std::env::temp_dir().join(format!("storyfarm-image-io-{}.png", std::process::id()));
        save_png(&image, &out)?;
        let round_trip = load_image(&out, None);
        std::fs::remove_file(&out)?;
        let diff = (&round_trip? - &image)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);

        let resized = load_image(&path, Some((32, 40)))?;
        assert_eq!(resized.dims(), &[1, 3, 32, 40]);
        let (min, max) = (
            resized.flatten_all()?.min(0)?.to_scalar::<f32>()?,
            resized.flatten_all()?.max(0)?.to_scalar::<f32>()?,
        );
        assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));
        Ok(())
    }

    #[test]
    fn decodes_jpeg() -> anyhow::Result<()> {
        let png = fixture("sd15/vae_64x96_image.png");
        let reference = load_image(&png, None)?;
        let mut jpeg = Vec::new();
        image::open(&png)?.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)?;
        let decoded = image_from_bytes(&jpeg, "picture.jpg", None)?;
        assert_eq!(decoded.dims(), reference.dims());
        let mean_diff = (&decoded - &reference)?
            .abs()?
            .mean_all()?
            .to_scalar::<f32>()?;
        println!("jpeg: mean abs diff {mean_diff}");
        assert!(mean_diff < 0.05, "jpeg: mean abs diff {mean_diff}");
        Ok(())
    }

    #[test]
    fn errors_name_the_file() {
        let missing = load_image(Path::new("/no/such/picture.png"), None).err();
        assert!(
            matches!(&missing, Some(DiffusionError::Image { name, .. }) if name == "/no/such/picture.png"),
            "{missing:?}"
        );
        let garbage = image_from_bytes(b"not an image", "upload.jpg", None).err();
        assert!(
            matches!(&garbage, Some(DiffusionError::Image { name, .. }) if name == "upload.jpg"),
            "{garbage:?}"
        );
    }
}
