//! torchvision's `TrivialAugmentWide` (31 magnitude bins, bilinear resampling as in
//! torchvision's reference recipe, black fill) on RGB8 images, with the PIL-path semantics of
//! torchvision's `_apply_op`: geometry through `F.affine`/`F.rotate` (PIL's bilinear affine
//! transform), the colour operations through `ImageEnhance` and `ImageOps`, including
//! Pillow's integer and single-precision rounding, so that each operation gives PIL's pixels
//! exactly.
//!
//! The draws come from the caller's generator: torchvision's order and distributions, not
//! torch's random stream.

use std::fmt;
use std::str::FromStr;

use image::RgbImage;
use rand::Rng;

use crate::affine::InverseAffine;
use crate::error::{DataError, Result};

/// torchvision's default `num_magnitude_bins`.
pub const NUM_MAGNITUDE_BINS: usize = 31;

/// `torch.linspace(0.0, 0.99, 31)` as torch's CPU kernel computes it in float32 (torch 2.15,
/// AVX2). Its vectorised loop rounds some entries differently from `start + i * step` (bins
/// 19 and 25 here), so the table holds torch's values rather than a formula; the golden test
/// compares it with the table the fixtures were written with.
const LINSPACE_0_99: [f32; NUM_MAGNITUDE_BINS] = [
    0.0,
    0.033,
    0.066,
    0.099,
    0.132,
    0.164_999_99,
    0.198,
    0.231,
    0.264,
    0.297,
    0.329_999_98,
    0.363,
    0.396,
    0.429,
    0.462,
    0.495,
    0.528,
    0.561,
    0.594,
    0.627_000_03,
    0.66,
    0.693,
    0.726,
    0.759,
    0.792,
    0.825,
    0.858_000_04,
    0.891_000_03,
    0.924,
    0.957,
    0.99,
];

/// `torch.linspace(0.0, 32.0, 31)`, likewise torch's float32 values: bin 15 is 15.999999,
/// which `int()` turns into a 15-pixel translation.
const LINSPACE_0_32: [f32; NUM_MAGNITUDE_BINS] = [
    0.0,
    1.066_666_7,
    2.133_333_4,
    3.200_000_3,
    4.266_667,
    5.333_333_5,
    6.400_000_6,
    7.466_667,
    8.533_334,
    9.6,
    10.666_667,
    11.733_334,
    12.800_001,
    13.866_668,
    14.933_334,
    15.999_999,
    17.066_666,
    18.133_333,
    19.199_999,
    20.266_666,
    21.333_332,
    22.4,
    23.466_667,
    24.533_333,
    25.6,
    26.666_666,
    27.733_334,
    28.8,
    29.866_667,
    30.933_332,
    32.0,
];

/// One of TrivialAugmentWide's operations, in torchvision's order (the order the op index
/// is drawn in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

impl Op {
    /// All operations, in torchvision's `_augmentation_space` order.
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Rotate,
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::Posterize,
        Op::Solarize,
        Op::AutoContrast,
        Op::Equalize,
    ];

    /// torchvision's name for the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
            Op::Rotate => "Rotate",
            Op::Brightness => "Brightness",
            Op::Color => "Color",
            Op::Contrast => "Contrast",
            Op::Sharpness => "Sharpness",
            Op::Posterize => "Posterize",
            Op::Solarize => "Solarize",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
        }
    }

    /// Whether the magnitude's sign is drawn too.
    pub fn signed(self) -> bool {
        matches!(
            self,
            Op::ShearX
                | Op::ShearY
                | Op::TranslateX
                | Op::TranslateY
                | Op::Rotate
                | Op::Brightness
                | Op::Color
                | Op::Contrast
                | Op::Sharpness
        )
    }

    /// torchvision's magnitude per bin (float32, as torch holds them); `None` for the
    /// operations without a magnitude, which draw no bin.
    pub fn magnitudes(self) -> Option<[f32; NUM_MAGNITUDE_BINS]> {
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => None,
            Op::ShearX | Op::ShearY | Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
                Some(LINSPACE_0_99)
            }
            Op::TranslateX | Op::TranslateY => Some(LINSPACE_0_32),
            // linspace(0, 135) and linspace(255, 0) are exact multiples of 4.5 and 8.5.
            Op::Rotate => Some(std::array::from_fn(|i| 4.5 * i as f32)),
            Op::Solarize => Some(std::array::from_fn(|i| 255.0 - 8.5 * i as f32)),
            // 8 - round(i / 5): no bin lands on a half, so the rounding mode does not matter.
            Op::Posterize => Some(std::array::from_fn(|i| 8.0 - (i as f32 / 5.0).round())),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Op> {
        Op::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| DataError::Invalid(format!("unknown TrivialAugmentWide op {s:?}")))
    }
}

/// One draw of TrivialAugmentWide: an operation and its (signed) magnitude.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    pub op: Op,
    pub magnitude: f64,
}

impl Augmentation {
    /// Draws as torchvision's `forward`: the op uniformly, then a bin (only for ops with
    /// magnitudes), then the sign (only for signed ops).
    pub fn sample(rng: &mut impl Rng) -> Augmentation {
        let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
        let mut magnitude = op.magnitudes().map_or(0.0, |table| {
            f64::from(table[rng.random_range(0..NUM_MAGNITUDE_BINS)])
        });
        if op.signed() && rng.random::<bool>() {
            magnitude = -magnitude;
        }
        Augmentation { op, magnitude }
    }

    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        apply_op(img, self.op, self.magnitude)
    }
}

/// torchvision's `_apply_op(img, op, magnitude, BILINEAR, fill=None)` on a PIL RGB image.
/// Fails on a magnitude that is not finite or, for Posterize, not 1 to 8 bits (PIL's
/// range).
pub fn apply_op(img: &RgbImage, op: Op, magnitude: f64) -> Result<RgbImage> {
    if !magnitude.is_finite() {
        return Err(DataError::Invalid(format!(
            "{op} magnitude {magnitude} is not finite"
        )));
    }
    let (w, h) = img.dimensions();
    let centre = (f64::from(w) * 0.5, f64::from(h) * 0.5);
    let affine = |center, translate, shear| {
        InverseAffine::torchvision(center, 0.0, translate, 1.0, shear).warp_bilinear(img)
    };
    Ok(match op {
        Op::Identity => img.clone(),
        // Shear angle degrees(atan(m)) about the top-left corner: x_in = x + m y.
        Op::ShearX => affine((0.0, 0.0), (0.0, 0.0), (shear_degrees(magnitude), 0.0)),
        Op::ShearY => affine((0.0, 0.0), (0.0, 0.0), (0.0, shear_degrees(magnitude))),
        // `int(magnitude)`: whole pixels, truncated towards zero.
        Op::TranslateX => affine(centre, (magnitude.trunc(), 0.0), (0.0, 0.0)),
        Op::TranslateY => affine(centre, (0.0, magnitude.trunc()), (0.0, 0.0)),
        Op::Rotate => rotate(img, magnitude),
        Op::Brightness => blend(RgbImage::new(w, h), img, 1.0 + magnitude),
        Op::Color => blend(grey(img), img, 1.0 + magnitude),
        Op::Contrast => {
            let mean = mean_grey(img);
            blend(
                RgbImage::from_pixel(w, h, image::Rgb([mean; 3])),
                img,
                1.0 + magnitude,
            )
        }
        Op::Sharpness => blend(smooth(img), img, 1.0 + magnitude),
        Op::Posterize => {
            let bits = magnitude.trunc();
            if !(1.0..=8.0).contains(&bits) {
                return Err(DataError::Invalid(format!(
                    "Posterize keeps 1 to 8 bits, not {magnitude}"
                )));
            }
            let mask = !((1u16 << (8 - bits as u16)) - 1) as u8;
            map_levels(img, |_| std::array::from_fn(|v| v as u8 & mask))
        }
        Op::Solarize => map_levels(img, |_| {
            std::array::from_fn(|v| {
                if (v as f64) < magnitude {
                    v as u8
                } else {
                    255 - v as u8
                }
            })
        }),
        Op::AutoContrast => map_levels(img, autocontrast_lut),
        Op::Equalize => map_levels(img, equalize_lut),
    })
}

/// `math.degrees(math.atan(m))`, the shear angle `_apply_op` passes to `F.affine`.
fn shear_degrees(magnitude: f64) -> f64 {
    magnitude.atan().to_degrees()
}

/// PIL's `Image.rotate(angle)`: whole turns copy, half and (square) quarter turns
/// transpose, anything else goes through the affine warp.
fn rotate(img: &RgbImage, angle: f64) -> RgbImage {
    let turn = angle.rem_euclid(360.0);
    let square = img.width() == img.height();
    if turn == 0.0 {
        img.clone()
    } else if turn == 180.0 {
        image::imageops::rotate180(img)
    } else if turn == 90.0 && square {
        // PIL turns counter-clockwise; image's rotate270 is a counter-clockwise quarter.
        image::imageops::rotate270(img)
    } else if turn == 270.0 && square {
        image::imageops::rotate90(img)
    } else {
        InverseAffine::pil_rotation(img.width(), img.height(), angle).warp_bilinear(img)
    }
}

/// PIL's RGB to L conversion (`L24` in Convert.c): ITU-R 601-2 weights in 16-bit fixed
/// point, rounded.
fn luma(px: &[u8]) -> u8 {
    let (r, g, b) = (u32::from(px[0]), u32::from(px[1]), u32::from(px[2]));
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// `img.convert("L").convert("RGB")`, ImageEnhance.Color's degenerate image.
fn grey(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for px in out.chunks_exact_mut(3) {
        let l = luma(px);
        px.fill(l);
    }
    out
}

/// ImageEnhance.Contrast's grey level: `int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)`.
fn mean_grey(img: &RgbImage) -> u8 {
    let (sum, count) = img
        .chunks_exact(3)
        .fold((0u64, 0u64), |(s, n), px| (s + u64::from(luma(px)), n + 1));
    if count == 0 {
        return 0;
    }
    // The mean is at most 255, so the truncation stays in range.
    (sum as f64 / count as f64 + 0.5) as u8
}

/// `img.filter(ImageFilter.SMOOTH)`, ImageEnhance.Sharpness's degenerate image: Pillow's
/// 3x3 kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 in single precision, summed row by row as
/// `ImagingFilter3x3` does, rounded; the one-pixel border keeps the original pixels, and
/// an image under 3x3 is copied.
fn smooth(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < 3 || h < 3 {
        return out;
    }
    // Pillow divides the float32 kernel by the float32 scale.
    let (edge, centre) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let src = img.as_raw();
    let row = |y: usize, x: usize, c: usize, k: [f32; 3]| {
        let at = |x: usize| f32::from(src[(y * w + x) * 3 + c]);
        at(x - 1) * k[0] + at(x) * k[1] + at(x + 1) * k[2]
    };
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let mut sum = 0.5f32;
                sum += row(y + 1, x, c, [edge; 3]);
                sum += row(y, x, c, [edge, centre, edge]);
                sum += row(y - 1, x, c, [edge; 3]);
                out[(x as u32, y as u32)].0[c] = sum.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `Image.blend(degenerate, img, factor)` (ImageEnhance's `enhance`): Pillow's
/// `ImagingBlend` with the factor in single precision, truncating, and clipping only when
/// extrapolating.
fn blend(mut degenerate: RgbImage, img: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    if alpha == 1.0 {
        return img.clone();
    }
    if alpha == 0.0 {
        return degenerate;
    }
    let interpolate = (0.0..=1.0).contains(&alpha);
    for (d, &v) in degenerate.iter_mut().zip(img.iter()) {
        let base = i32::from(*d);
        let temp = base as f32 + alpha * (i32::from(v) - base) as f32;
        *d = if interpolate || (temp > 0.0 && temp < 255.0) {
            temp as u8
        } else if temp <= 0.0 {
            0
        } else {
            255
        };
    }
    degenerate
}

/// Applies a per-channel lookup table built from each channel's histogram.
fn map_levels(img: &RgbImage, lut: impl Fn(&[u64; 256]) -> [u8; 256]) -> RgbImage {
    let mut hist = [[0u64; 256]; 3];
    for px in img.chunks_exact(3) {
        for c in 0..3 {
            hist[c][usize::from(px[c])] += 1;
        }
    }
    let luts = [lut(&hist[0]), lut(&hist[1]), lut(&hist[2])];
    let mut out = img.clone();
    for px in out.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][usize::from(px[c])];
        }
    }
    out
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|v| v as u8)
}

/// ImageOps.autocontrast with no cutoff: stretches [lowest, highest] level to [0, 255].
fn autocontrast_lut(hist: &[u64; 256]) -> [u8; 256] {
    let lo = hist.iter().position(|&n| n > 0);
    let hi = hist.iter().rposition(|&n| n > 0);
    match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            std::array::from_fn(|v| (v as f64 * scale + offset).trunc().clamp(0.0, 255.0) as u8)
        }
        _ => identity_lut(),
    }
}

/// ImageOps.equalize: a cumulative histogram in steps of (pixels - last level's count) / 255.
fn equalize_lut(hist: &[u64; 256]) -> [u8; 256] {
    let used: Vec<u64> = hist.iter().copied().filter(|&n| n > 0).collect();
    let (Some(&last), true) = (used.last(), used.len() > 1) else {
        return identity_lut();
    };
    let step = (used.iter().sum::<u64>() - last) / 255;
    if step == 0 {
        return identity_lut();
    }
    let mut n = step / 2;
    std::array::from_fn(|v| {
        let level = (n / step).min(255) as u8;
        n += hist[v];
        level
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::sample_rng;
    use image::Rgb;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 37 + y * 11) as u8,
                (x * y * 3 + 40) as u8,
                (200 - x * 5) as u8,
            ])
        })
    }

    #[test]
    fn names_round_trip_and_unknown_names_fail() {
        for op in Op::ALL {
            assert_eq!(op.name().parse::<Op>().unwrap(), op);
        }
        assert!("Invert".parse::<Op>().is_err());
    }

    #[test]
    fn tables_follow_torchvision() {
        let rotate = Op::Rotate.magnitudes().unwrap();
        assert_eq!((rotate[10], rotate[30]), (45.0, 135.0));
        let solarize = Op::Solarize.magnitudes().unwrap();
        assert_eq!(
            (solarize[0], solarize[10], solarize[30]),
            (255.0, 170.0, 0.0)
        );
        let posterize = Op::Posterize.magnitudes().unwrap();
        assert_eq!((posterize[0], posterize[2], posterize[3]), (8.0, 8.0, 7.0));
        assert_eq!((posterize[10], posterize[30]), (6.0, 2.0));
        for op in [Op::Identity, Op::AutoContrast, Op::Equalize] {
            assert!(op.magnitudes().is_none() && !op.signed());
        }
        assert!(!Op::Posterize.signed() && !Op::Solarize.signed() && Op::Rotate.signed());
    }

    /// Every op gets drawn, magnitudes come from its table with both signs where signed,
    /// and the draw consumes the generator as documented.
    #[test]
    fn sampling_covers_the_ops_and_signs() {
        let mut rng = sample_rng(5, 0, 0);
        let mut seen = std::collections::HashMap::<Op, (bool, bool)>::new();
        for _ in 0..3000 {
            let aug = Augmentation::sample(&mut rng);
            match aug.op.magnitudes() {
                None => assert_eq!(aug.magnitude, 0.0),
                Some(table) => assert!(table.iter().any(|&m| f64::from(m) == aug.magnitude.abs())),
            }
            let entry = seen.entry(aug.op).or_default();
            if aug.magnitude < 0.0 {
                entry.0 = true;
            } else if aug.magnitude > 0.0 {
                entry.1 = true;
            }
        }
        assert_eq!(seen.len(), 14);
        for (op, (negative, positive)) in seen {
            assert_eq!(negative, op.signed(), "{op}");
            assert_eq!(positive, op.magnitudes().is_some(), "{op}");
        }
        // Identity draws only its index: the next draw matches a fresh stream's second.
        let mut rng = sample_rng(0, 0, 0);
        let mut replay = sample_rng(0, 0, 0);
        loop {
            let index = replay.random_range(0..14usize);
            let aug = Augmentation::sample(&mut rng);
            assert_eq!(aug.op, Op::ALL[index]);
            if aug.op == Op::Identity {
                break;
            }
            if aug.op.magnitudes().is_some() {
                replay.random_range(0..NUM_MAGNITUDE_BINS);
            }
            if aug.op.signed() {
                replay.random::<bool>();
            }
        }
        assert_eq!(rng.random::<u64>(), replay.random::<u64>());
    }

    #[test]
    fn unit_factors_and_zero_magnitudes_keep_the_image() {
        let img = pattern(9, 7);
        for op in Op::ALL {
            let m = match op {
                Op::Posterize => 8.0,
                Op::Solarize => 256.0,
                _ => 0.0,
            };
            let out = apply_op(&img, op, m).unwrap();
            if !matches!(op, Op::AutoContrast | Op::Equalize) {
                assert_eq!(out, img, "{op}");
            }
        }
    }

    #[test]
    fn bad_magnitudes_are_errors() {
        let img = pattern(4, 4);
        assert!(apply_op(&img, Op::Posterize, 0.0).is_err());
        assert!(apply_op(&img, Op::Posterize, 9.0).is_err());
        assert!(apply_op(&img, Op::Rotate, f64::NAN).is_err());
        assert!(apply_op(&img, Op::Posterize, 1.0).is_ok());
    }

    #[test]
    fn level_maps_follow_imageops() {
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([[10, 20, 30, 40][x as usize], 7, 7]));
        // Red 10..40 stretches to 0..255; the flat channels stay.
        let out = apply_op(&img, Op::AutoContrast, 0.0).unwrap();
        let red: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(red, vec![0, 85, 170, 255]);
        assert!(out.pixels().all(|p| p.0[1] == 7 && p.0[2] == 7));
        // Posterize to 2 bits keeps the top two; solarize at 25 inverts 30 and 40.
        let out = apply_op(&img, Op::Posterize, 2.0).unwrap();
        assert!(out.pixels().all(|p| p.0[0] == 0 && p.0[1] == 0));
        let out = apply_op(&img, Op::Solarize, 25.0).unwrap();
        let red: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(red, vec![10, 20, 225, 215]);
        // Brightness 0.5 halves, truncating; 2 doubles and clips.
        let out = apply_op(&img, Op::Brightness, -0.5).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [5, 3, 3]);
    }

    #[test]
    fn smoothing_keeps_the_border_and_averages_inside() {
        let mut img = RgbImage::from_pixel(5, 4, Rgb([13, 0, 255]));
        img.put_pixel(2, 1, Rgb([130, 130, 0]));
        let s = smooth(&img);
        // Centre weight 5/13: 130*5/13 + 13*8/13 = 58; a neighbour gets 13 + (130 - 13)/13.
        assert_eq!(s.get_pixel(2, 1).0[0], 58);
        assert_eq!(s.get_pixel(1, 2).0[0], 22);
        assert_eq!(s.get_pixel(2, 0), img.get_pixel(2, 0));
        assert_eq!(s.get_pixel(0, 1), img.get_pixel(0, 1));
        assert_eq!(smooth(&pattern(2, 9)), pattern(2, 9));
    }
}
