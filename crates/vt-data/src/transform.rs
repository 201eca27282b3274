//! Pixel transforms shared by training, evaluation and serving.
//!
//! Evaluation follows the model contract: resize so that the shorter side is
//! `round(image_size * 256 / 224)` with an antialiased bilinear (triangle) filter as PIL
//! uses, centre-crop `image_size`, scale to [0, 1] and normalise per channel.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use crate::error::{DataError, Result};

/// Per-channel normalisation, in the order R, G, B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// ImageNet statistics, the contract's default.
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// Every 8-bit level's normalised value, per channel: `levels()[c][v]` is what
    /// [`Normalize::write_chw`] writes for value `v` in channel `c`.
    pub fn levels(&self) -> [[f32; 256]; 3] {
        let (scale, shift) = self.scale_shift();
        std::array::from_fn(|c| std::array::from_fn(|v| f32::from(v as u8) * scale[c] + shift[c]))
    }

    /// `value / 255` then normalised, as one multiply-add per channel.
    fn scale_shift(&self) -> ([f32; 3], [f32; 3]) {
        (
            std::array::from_fn(|c| 1.0 / (255.0 * self.std[c])),
            std::array::from_fn(|c| -self.mean[c] / self.std[c]),
        )
    }

    /// Writes `img` into `out` as planar CHW floats, normalised.
    pub fn write_chw(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = (img.width() * img.height()) as usize;
        debug_assert_eq!(out.len(), 3 * plane);
        let (scale, shift) = self.scale_shift();
        let (red, rest) = out.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        let planes = red.iter_mut().zip(green).zip(blue);
        for (px, ((r, g), b)) in img.as_raw().chunks_exact(3).zip(planes) {
            *r = f32::from(px[0]) * scale[0] + shift[0];
            *g = f32::from(px[1]) * scale[1] + shift[1];
            *b = f32::from(px[2]) * scale[2] + shift[2];
        }
    }
}

/// A source rectangle in pixel coordinates (may be fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// Resizes the `crop` region of `img` to `width` x `height` with the antialiased bilinear
/// (triangle) filter that PIL's `BILINEAR` uses.
pub fn resize_region(
    resizer: &mut Resizer,
    img: &RgbImage,
    crop: CropBox,
    width: u32,
    height: u32,
) -> Result<RgbImage> {
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3)
        .map_err(|e| DataError::Resize(e.to_string()))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(crop.left, crop.top, crop.width, crop.height);
    resizer
        .resize(&src, &mut dst, &options)
        .map_err(|e| DataError::Resize(e.to_string()))?;
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| DataError::Resize("resized buffer has the wrong size".into()))
}

/// The contract's evaluation geometry: the resized size (width, height) and the centre
/// crop's offset (left, top) in it. 64-bit: a thin strip's long side grows with the scale.
pub fn eval_geometry(width: u32, height: u32, image_size: u32) -> ((u64, u64), (u64, u64)) {
    let short_target = (f64::from(image_size) * 256.0 / 224.0).round() as u64;
    let (short, long) = (width.min(height), width.max(height));
    let long_target = u64::from(long) * short_target / u64::from(short);
    let (w, h) = if width <= height {
        (short_target, long_target)
    } else {
        (long_target, short_target)
    };
    let size = u64::from(image_size);
    (
        (w, h),
        (w.saturating_sub(size) / 2, h.saturating_sub(size) / 2),
    )
}

/// Evaluation and serving preprocessing: returns `3 * image_size^2` floats, CHW.
pub fn eval_chw(
    resizer: &mut Resizer,
    img: &RgbImage,
    image_size: u32,
    norm: &Normalize,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0; 3 * (image_size as usize).pow(2)];
    eval_into(resizer, img, image_size, norm, &mut out)?;
    Ok(out)
}

/// [`eval_chw`] into a caller's buffer of `3 * image_size^2` floats.
///
/// Only the centre crop is resized: its box in source pixels goes to the resizer, which
/// (as PIL) still filters across the box's edges, so the result is the resize-then-crop of
/// the contract without the whole resized image, which for a 1 x 100,000 strip would take
/// gigabytes.
pub fn eval_into(
    resizer: &mut Resizer,
    img: &RgbImage,
    image_size: u32,
    norm: &Normalize,
    out: &mut [f32],
) -> Result<()> {
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Invalid("image has no pixels".into()));
    }
    let len = 3 * (image_size as usize).pow(2);
    if out.len() != len {
        return Err(DataError::Invalid(format!(
            "evaluation output holds {} floats, expected {len}",
            out.len()
        )));
    }
    let ((w, h), (left, top)) = eval_geometry(img.width(), img.height(), image_size);
    // Source pixels per resized pixel, along each axis.
    let (x_scale, y_scale) = (
        f64::from(img.width()) / w as f64,
        f64::from(img.height()) / h as f64,
    );
    let size = f64::from(image_size);
    let crop = CropBox {
        left: left as f64 * x_scale,
        top: top as f64 * y_scale,
        width: size * x_scale,
        height: size * y_scale,
    };
    let cropped = resize_region(resizer, img, crop, image_size, image_size)?;
    norm.write_chw(&cropped, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_geometry_follows_the_contract() {
        // 150 px photos at image size 224: shorter side round(256) = 256, crop at 16.
        assert_eq!(eval_geometry(150, 150, 224), ((256, 256), (16, 16)));
        // 500x374 at image size 150: S = round(171.43) = 171, long = floor(500*171/374) = 228.
        assert_eq!(eval_geometry(500, 374, 150), ((228, 171), (39, 10)));
        assert_eq!(eval_geometry(374, 500, 150), ((171, 228), (10, 39)));
    }

    /// Resizing only the crop's box gives what resizing the whole image and cropping gives.
    #[test]
    fn eval_resizes_only_the_centre_crop_with_the_same_pixels() {
        let mut resizer = Resizer::new();
        for (width, height, image_size) in [
            (150, 150, 224),
            (500, 374, 150),
            (374, 500, 64),
            (37, 1003, 32),
            (1, 300, 48),
            (300, 2, 48),
        ] {
            let img = RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (x ^ y) as u8])
            });
            let ((w, h), (left, top)) = eval_geometry(width, height, image_size);
            let full = CropBox {
                left: 0.0,
                top: 0.0,
                width: f64::from(width),
                height: f64::from(height),
            };
            let resized = resize_region(&mut resizer, &img, full, w as u32, h as u32).unwrap();
            let crop = image::imageops::crop_imm(
                &resized,
                left as u32,
                top as u32,
                image_size,
                image_size,
            )
            .to_image();
            let mut expected = vec![0.0; 3 * (image_size as usize).pow(2)];
            Normalize::IMAGENET.write_chw(&crop, &mut expected);
            let ours = eval_chw(&mut resizer, &img, image_size, &Normalize::IMAGENET).unwrap();
            assert_eq!(ours, expected, "{width}x{height} at {image_size}");
        }
    }

    #[test]
    fn a_thin_strip_keeps_its_long_side_in_64_bits() {
        // 1 x 20,000,000 at 224: the long side resizes to 5.12e9 pixels, past u32.
        assert_eq!(
            eval_geometry(1, 20_000_000, 224),
            ((256, 5_120_000_000), (16, 2_559_999_888))
        );
    }

    #[test]
    fn normalised_planes_are_channel_major() {
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([255 * x as u8, 0, 255]));
        let norm = Normalize {
            mean: [0.5, 0.0, 0.0],
            std: [0.5, 1.0, 1.0],
        };
        let mut out = vec![0.0; 6];
        norm.write_chw(&img, &mut out);
        assert_eq!(out, vec![-1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn a_uniform_image_stays_uniform_after_eval_preprocessing() {
        let img = RgbImage::from_pixel(300, 200, image::Rgb([10, 128, 250]));
        let out = eval_chw(&mut Resizer::new(), &img, 32, &Normalize::IMAGENET).unwrap();
        assert_eq!(out.len(), 3 * 32 * 32);
        let expected = (128.0 / 255.0 - 0.456) / 0.224;
        assert!(out[1024..2048].iter().all(|v| (v - expected).abs() < 1e-5));
    }
}
