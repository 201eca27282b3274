//! Image decoding: the format is sniffed from the bytes, never from the file name (the real
//! data set holds a greyscale PNG named `.jpg`), and every colour type becomes 8-bit RGB.

use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits, RgbImage};

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
        Ok(other) => Err(DataError::UnsupportedFormat(
            format!("{other:?}").to_ascii_uppercase(),
        )),
        Err(_) if is_heif(bytes) => Err(DataError::UnsupportedFormat("HEIC/HEIF".into())),
        Err(_) => Err(DataError::UnknownFormat),
    }
}

/// An ISO media file whose brand is HEIF's (iPhones' photos), which `image` does not know.
fn is_heif(bytes: &[u8]) -> bool {
    const BRANDS: [&[u8; 4]; 10] = [
        b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1",
    ];
    bytes.len() >= 12 && &bytes[4..8] == b"ftyp" && BRANDS.iter().any(|b| &bytes[8..12] == *b)
}

/// The largest image decoded unless a command says otherwise, in pixels (width x height):
/// the same for serving, `predict`, training, `eval`, `explain` and the import, so that an
/// image one of them scores none of the others refuses. The data set's are 150x150; this
/// stops decompression bombs.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Room a decoder has beyond the decoded image, for its working buffers and an image's
/// metadata; all a header read may take.
const DECODER_WORKSPACE_BYTES: u64 = 64 << 20;
/// The widest decoded pixel: RGBA at 16 bits a channel.
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// The most bytes an image of `pixels` pixels takes, in a file or decoded: its pixels at
/// the widest, and a decoder's workspace or a file's metadata.
pub fn max_image_bytes(pixels: u64) -> u64 {
    pixels
        .saturating_mul(MAX_BYTES_PER_PIXEL)
        .saturating_add(DECODER_WORKSPACE_BYTES)
}

/// Reads an image file whole. Refused unless it is a regular file (reading a pipe could
/// block forever, a device never end), or when larger than an image of `max_pixels` pixels
/// can be.
pub fn read_image_file(path: &Path, max_pixels: u64) -> Result<Vec<u8>> {
    let io = |cause| DataError::io(path, cause);
    // Before opening: opening a pipe blocks until something writes to it.
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(DataError::NotAFile(path.to_path_buf()));
    }
    let limit = max_image_bytes(max_pixels);
    let too_large = |len| DataError::FileTooLarge {
        path: path.to_path_buf(),
        len,
        max_pixels,
    };
    if metadata.len() > limit {
        return Err(too_large(metadata.len()));
    }
    let mut bytes = Vec::new();
    // A file that grew since is read only to past the limit.
    File::open(path)
        .and_then(|file| file.take(limit + 1).read_to_end(&mut bytes))
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Decodes to RGB8. Greyscale is replicated, alpha dropped, palettes and CMYK expanded;
/// EXIF orientation is ignored, as PIL does by default. Images of more than `max_pixels`
/// pixels are refused from their header, before decoding, so that a tiny file declaring a
/// huge image cannot exhaust memory; and the decoder may allocate only what an image of its
/// size needs, so that what the header does not declare cannot either (a GIF frame larger
/// than its image, a PNG colour profile that inflates to gigabytes).
pub fn decode_rgb_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let format = sniff_format(bytes)?;
    if format == ImageFormat::Jpeg {
        check_jpeg(bytes)?;
    }
    let limits = |pixels: u64| {
        let mut limits = Limits::default();
        limits.max_alloc = Some(max_image_bytes(pixels));
        limits
    };
    // Reading the header already inflates some chunks (a PNG's colour profile), and
    // decodes no pixel.
    let mut header = ImageReader::with_format(Cursor::new(bytes), format);
    header.limits(limits(0));
    let (width, height) = header.into_dimensions()?;
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
    reader.limits(limits(pixels));
    Ok(reader.decode()?.to_rgb8())
}

/// zune-jpeg, the `image` crate's JPEG decoder, fills data missing at the end with grey
/// instead of failing (its strict mode, which `image` does not expose, still accepts a missing
/// end marker), so completeness is checked here as PIL does: every segment is whole and the
/// end-of-image marker follows the last scan. Bytes after that marker are allowed. The rare
/// kinds of JPEG it does not decode are named here too: its own error names a marker.
fn check_jpeg(bytes: &[u8]) -> Result<()> {
    const EOI: u8 = 0xD9;
    const SOS: u8 = 0xDA;
    const END: &str = "the data ends before its end-of-image marker";
    // Past SOI, which sniffing found at the start.
    let mut i = 2;
    loop {
        // Like libjpeg, tolerate stray bytes and 0xFF fill bytes before a marker.
        i += bytes
            .get(i..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
            .ok_or(DataError::TruncatedJpeg(END))?;
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let marker = *bytes.get(i).ok_or(DataError::TruncatedJpeg(END))?;
        i += 1;
        match marker {
            EOI => return Ok(()),
            // Markers without a payload (SOI, RSTn, TEM), and 0x00, which is no marker.
            0xD8 | 0xD0..=0xD7 | 0x01 | 0x00 => continue,
            0xC3 => return Err(DataError::UnsupportedFormat("lossless JPEG".into())),
            0xC5..=0xC7 => return Err(DataError::UnsupportedFormat("hierarchical JPEG".into())),
            0xC9..=0xCF => {
                return Err(DataError::UnsupportedFormat("arithmetic-coded JPEG".into()))
            }
            _ => {}
        }
        let len = match bytes.get(i..i + 2) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Err(DataError::TruncatedJpeg(END)),
        };
        // The length counts its own two bytes; less is corruption, not truncation, and is
        // left to the decoder.
        i += len.max(2);
        if i > bytes.len() {
            return Err(DataError::TruncatedJpeg("a segment is cut short"));
        }
        if marker == SOS {
            i = end_of_scan(bytes, i).ok_or(DataError::TruncatedJpeg(END))?;
        }
    }
}

/// The position of the marker that ends the entropy-coded data starting at `start`: the
/// first 0xFF not followed by a stuffed 0x00 or a restart marker. None if the data ends first.
fn end_of_scan(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    loop {
        i += bytes.get(i..)?.iter().position(|&b| b == 0xFF)?;
        match bytes.get(i + 1)? {
            0x00 | 0xD0..=0xD7 => i += 2,
            // Fill bytes: the marker proper comes after them.
            0xFF => i += 1,
            _ => return Some(i),
        }
    }
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

    fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
        decode_rgb_limited(bytes, u64::MAX)
    }

    #[test]
    fn greyscale_png_becomes_rgb_whatever_its_name() {
        let grey: GrayImage = ImageBuffer::from_fn(5, 3, |x, _| Luma([(x * 40) as u8]));
        let bytes = encode(grey.into(), ImageFormat::Png);
        let rgb = decode_rgb(&bytes).unwrap();
        assert_eq!(rgb.dimensions(), (5, 3));
        assert_eq!(rgb.get_pixel(2, 1).0, [80, 80, 80]);
    }

    /// What decoding needs beyond the limit is refused as over a limit, not allocated.
    fn assert_over_the_limits(result: Result<RgbImage>) {
        match result {
            Err(DataError::Decode(image::ImageError::Limits(_))) => {}
            other => panic!("expected a decoding limit error, got {other:?}"),
        }
    }

    #[test]
    fn a_gif_frame_larger_than_its_image_is_refused() {
        // A 1x1 image whose one frame says 6000x6000: 144 MB of RGBA that the header
        // check, which reads the image's size, lets through.
        let mut gif = b"GIF89a".to_vec();
        gif.extend([1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
        gif.push(b',');
        for value in [0u16, 0, 6000, 6000] {
            gif.extend(value.to_le_bytes());
        }
        // No local palette; LZW minimum code size 2, a clear and an end code, the trailer.
        gif.extend([0, 2, 1, 0b0010_1100, 0, b';']);
        assert_over_the_limits(decode_rgb_limited(&gif, 100));
    }

    /// A pipe and a device named as images are refused before they are opened (a pipe's
    /// read blocked training forever, `/dev/zero`'s took all memory), and so is a file too
    /// large for any image allowed, before it is read.
    #[cfg(unix)]
    #[test]
    fn only_regular_files_of_an_images_size_are_read() {
        let root = tempfile::tempdir().unwrap();
        let pipe = root.path().join("pipe.jpg");
        assert!(std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap()
            .success());
        let zeros = root.path().join("zeros.jpg");
        std::os::unix::fs::symlink("/dev/zero", &zeros).unwrap();
        for path in [&pipe, &zeros] {
            let err = read_image_file(path, DEFAULT_MAX_PIXELS).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{}: not a regular file", path.display())
            );
        }
        // Sparse: no disk is used.
        let huge = root.path().join("huge.png");
        let limit = max_image_bytes(10);
        File::create(&huge).unwrap().set_len(limit + 1).unwrap();
        let err = read_image_file(&huge, 10).unwrap_err().to_string();
        assert!(
            err.ends_with("more than an image of at most 10 pixels can take"),
            "{err}"
        );
        let photo = root.path().join("photo.png");
        std::fs::write(&photo, b"png").unwrap();
        assert_eq!(read_image_file(&photo, 10).unwrap(), b"png");
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
        let named = |bytes: &[u8]| match decode_rgb(bytes) {
            Err(DataError::UnsupportedFormat(name)) => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(named(b"II*\0\x08\0\0\0"), "TIFF");
        // Start of frame, arithmetic coding (SOF9).
        assert_eq!(
            named(b"\xFF\xD8\xFF\xC9\0\x0B\x08\0\x10\0\x10\x01\x01\x11\0"),
            "arithmetic-coded JPEG"
        );
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic";
        assert_eq!(named(heic), "HEIC/HEIF");
        assert_eq!(
            decode_rgb(heic).unwrap_err().to_string(),
            "HEIC/HEIF images are not supported (supported: JPEG, baseline or progressive, PNG, WebP, GIF, BMP)"
        );
        let rgb = RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        let bytes = encode(rgb.into(), ImageFormat::Png);
        assert!(decode_rgb(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn truncated_jpegs_are_errors_and_intact_images_decode() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut jpegs = 0;
        for name in [
            "rgb.jpg",
            "grey.jpg",
            "cmyk.jpg",
            "grey_png_named.jpg",
            "palette.png",
            "rgba.png",
        ] {
            let bytes = std::fs::read(fixtures.join(name)).unwrap();
            assert!(decode_rgb(&bytes).is_ok(), "{name}");
            if sniff_format(&bytes).unwrap() != ImageFormat::Jpeg {
                continue;
            }
            jpegs += 1;
            // Half the data, and everything but the end-of-image marker.
            for cut in [bytes.len() / 2, bytes.len() - 2] {
                match decode_rgb(&bytes[..cut]) {
                    Err(err @ DataError::TruncatedJpeg(_)) => {
                        let text = err.to_string();
                        assert_eq!(text.trim_end(), text, "{name}");
                    }
                    Err(err) => panic!("{name} cut at {cut}: {err}"),
                    Ok(_) => panic!("{name} cut at {cut} decoded"),
                }
            }
            // Bytes after the end marker are harmless.
            let mut trailing = bytes.clone();
            trailing.extend_from_slice(b"\0\0trailer");
            assert!(decode_rgb(&trailing).is_ok(), "{name}");
        }
        assert_eq!(jpegs, 3);
    }

    #[test]
    fn jpeg_scans_end_only_at_a_real_marker() {
        // SOI, a comment holding an EOI look-alike, SOS, entropy data with a stuffed 0xFF and
        // a restart marker, then fill bytes before EOI.
        let head = [0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x04, 0xFF, 0xD9];
        let scan = [
            0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56,
        ];
        let whole = [&head[..], &scan, &[0xFF, 0xFF, 0xD9]].concat();
        assert!(check_jpeg(&whole).is_ok());
        for cut in 3..whole.len() {
            assert!(check_jpeg(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let rgb = RgbImage::from_pixel(100, 50, image::Rgb([1, 2, 3]));
        let bytes = encode(rgb.into(), ImageFormat::Png);
        let err = decode_rgb_limited(&bytes, 4_999).unwrap_err();
        assert!(matches!(
            err,
            DataError::TooManyPixels {
                width: 100,
                height: 50,
                pixels: 5000,
                ..
            }
        ));
        assert!(decode_rgb_limited(&bytes, 5_000).is_ok());
    }
}
