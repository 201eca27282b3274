//! Image decoding: the format is sniffed from the bytes, never from the file name (the real
//! data set holds a greyscale PNG named `.jpg`), and every colour type becomes 8-bit RGB.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, RgbImage};

use crate::error::{DataError, Result};

/// Formats sniffed from content.
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat> {
    if bytes.is_empty() {
        return Err(DataError::EmptyImage);
    }
    match image::guess_format(bytes) {
        Ok(
            format @ (ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp),
        ) => Ok(format),
        _ => Err(DataError::UnknownFormat),
    }
}

/// Reads the image dimensions from its header without decoding the pixels.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    let format = sniff_format(bytes)?;
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    Ok(reader.into_dimensions()?)
}

/// Decodes to RGB8. Greyscale is replicated, alpha dropped, palettes and CMYK expanded;
/// EXIF orientation is ignored, as PIL does by default.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb_limited(bytes, u64::MAX)
}

/// Like [`decode_rgb`], but refuses images of more than `max_pixels` pixels before decoding
/// them, so that a tiny file declaring a huge image cannot exhaust memory.
pub fn decode_rgb_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let format = sniff_format(bytes)?;
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format).into_dimensions()?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DataError::TooManyPixels {
            width,
            height,
            pixels,
            max_pixels,
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits();
    Ok(reader.decode()?.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

    fn encode(img: image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode in memory");
        out.into_inner()
    }

    #[test]
    fn greyscale_png_becomes_rgb_whatever_its_name() {
        let grey: GrayImage = ImageBuffer::from_fn(5, 3, |x, _| Luma([(x * 40) as u8]));
        let bytes = encode(grey.into(), ImageFormat::Png);
        let rgb = decode_rgb(&bytes).unwrap();
        assert_eq!(rgb.dimensions(), (5, 3));
        assert_eq!(rgb.get_pixel(2, 1).0, [80, 80, 80]);
    }

    #[test]
    fn alpha_is_dropped() {
        let rgba: RgbaImage = ImageBuffer::from_pixel(2, 2, Rgba([10, 20, 30, 0]));
        let bytes = encode(rgba.into(), ImageFormat::Png);
        assert_eq!(decode_rgb(&bytes).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
    }

    #[test]
    fn empty_garbage_and_truncated_inputs_are_errors() {
        assert!(matches!(decode_rgb(&[]), Err(DataError::EmptyImage)));
        assert!(matches!(
            decode_rgb(b"definitely not an image"),
            Err(DataError::UnknownFormat)
        ));
        let rgb = RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        let bytes = encode(rgb.into(), ImageFormat::Png);
        assert!(decode_rgb(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let rgb = RgbImage::from_pixel(100, 50, image::Rgb([1, 2, 3]));
        let bytes = encode(rgb.into(), ImageFormat::Png);
        assert_eq!(dimensions(&bytes).unwrap(), (100, 50));
        let err = decode_rgb_limited(&bytes, 4_999).unwrap_err();
        assert!(matches!(err, DataError::TooManyPixels { pixels: 5000, .. }));
        assert!(decode_rgb_limited(&bytes, 5_000).is_ok());
    }
}
