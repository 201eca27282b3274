//! Training augmentation with torchvision's semantics (the reference notebook's pipeline):
//! `RandomResizedCrop(size, scale, ratio)`, `RandomRotation(deg)`, `RandomHorizontalFlip()`,
//! `ToTensor()`, `Normalize(mean, std)`, in that order, on PIL-style RGB8 images; optionally
//! with timm's `ColorJitter()` and torchvision's modern-recipe `TrivialAugmentWide()` after the
//! flip (in that order) and `RandomErasing()` after normalisation, where timm's and
//! torchvision's training transforms put them.
//!
//! The random numbers come from the caller's generator (see [`crate::rng::sample_rng`]), so the
//! draws do not match torch's generator, only its distributions and geometry.

use fast_image_resize::Resizer;
use image::RgbImage;
use rand::Rng;

use crate::affine::InverseAffine;
use crate::color_jitter::ColorJitter;
use crate::error::{DataError, Result};
use crate::transform::{resize_region, CropBox, Normalize};
use crate::trivial_augment::Augmentation;

#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Output side length.
    pub image_size: u32,
    /// Crop area as a fraction of the image, (min, max).
    pub scale: (f32, f32),
    /// Crop aspect ratio width/height, (min, max); sampled log-uniformly.
    pub ratio: (f32, f32),
    /// Rotation angle drawn uniformly from [-rotation_deg, rotation_deg]; 0 disables it.
    pub rotation_deg: f32,
    /// Mirror left-right with this probability (`RandomHorizontalFlip(p)`); 0 disables it.
    pub hflip: f32,
    /// `ColorJitter`'s brightness, contrast and saturation strength, on the uint8 image
    /// after the flip (see [`ColorJitter`]); 0 disables it.
    pub color_jitter: f32,
    /// torchvision's `TrivialAugmentWide()` on the uint8 image after the flip.
    pub trivial_augment: bool,
    /// Probability of torchvision's `RandomErasing(value=0)` on the normalised tensor,
    /// with its default scale and ratio ([`ERASE_SCALE`], [`ERASE_RATIO`]); 0 disables it.
    pub random_erasing: f32,
    pub norm: Normalize,
}

impl AugmentConfig {
    /// The notebook's training transform: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3),
    /// RandomRotation(15), RandomHorizontalFlip(0.5), ImageNet normalisation.
    pub fn notebook(image_size: u32) -> AugmentConfig {
        AugmentConfig {
            image_size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            rotation_deg: 15.0,
            hflip: 0.5,
            color_jitter: 0.0,
            trivial_augment: false,
            random_erasing: 0.0,
            norm: Normalize::IMAGENET,
        }
    }

    /// Refuses settings torchvision would refuse (or silently misuse), naming the setting.
    fn check(&self) -> Result<()> {
        let fail = |what: String| Err(DataError::Invalid(what));
        let (scale, ratio) = (self.scale, self.ratio);
        if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1 <= 1.0) {
            return fail(format!(
                "crop scale {} to {} is not a range within (0, 1]",
                scale.0, scale.1
            ));
        }
        if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
            return fail(format!(
                "crop aspect ratio {} to {} is not a range of positive numbers",
                ratio.0, ratio.1
            ));
        }
        if !(0.0..=180.0).contains(&self.rotation_deg) {
            return fail(format!(
                "rotation of up to {} degrees is not in [0, 180]",
                self.rotation_deg
            ));
        }
        for (what, p) in [
            ("flip", self.hflip),
            ("random erasing", self.random_erasing),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return fail(format!("{what} probability {p} is not in [0, 1]"));
            }
        }
        if !(self.color_jitter.is_finite() && self.color_jitter >= 0.0) {
            return fail(format!(
                "colour jitter strength {} is not a number >= 0",
                self.color_jitter
            ));
        }
        Ok(())
    }
}

/// `RandomErasing`'s default range of the erased area, as a fraction of the image.
pub const ERASE_SCALE: (f64, f64) = (0.02, 0.33);
/// `RandomErasing`'s default range of the erased box's aspect ratio (height/width).
pub const ERASE_RATIO: (f64, f64) = (0.3, 3.3);

/// An integer crop rectangle: `left`, `top`, `width`, `height` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// `RandomResizedCrop.get_params`: ten tries at a crop of random area and log-uniform
/// aspect ratio that fits, else a centre crop clamped to the ratio range.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut impl Rng,
) -> Crop {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (f64::from(ratio.0).ln(), f64::from(ratio.1).ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, f64::from(scale.0), f64::from(scale.1));
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round();
        let h = (target_area / aspect).sqrt().round();
        if w > 0.0 && h > 0.0 && w <= f64::from(width) && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return Crop {
                left,
                top,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (lo, hi) = (
        f64::from(ratio.0.min(ratio.1)),
        f64::from(ratio.0.max(ratio.1)),
    );
    let (w, h) = if in_ratio < lo {
        (width, ((f64::from(width) / lo).round() as u32).min(height))
    } else if in_ratio > hi {
        (((f64::from(height) * hi).round() as u32).min(width), height)
    } else {
        (width, height)
    };
    Crop {
        left: (width - w) / 2,
        top: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// torch's `uniform_(lo, hi)`; tolerates lo == hi, which `random_range` refuses.
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Visits every output pixel of torchvision's `RandomRotation` (nearest neighbour, black
/// outside) followed by an optional left-right mirror: `visit(index, pixel)` with the
/// pixel's row-major index in the output and its source pixel, `None` where black.
#[inline]
fn rotate_flip_each(
    img: &RgbImage,
    angle_deg: f32,
    mirror: bool,
    mut visit: impl FnMut(usize, Option<[u8; 3]>),
) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (width, height) = (f64::from(img.width()), f64::from(img.height()));
    let rotation = InverseAffine::rotation(img.width(), img.height(), angle_deg);
    let src = img.as_raw();
    for y in 0..h {
        let yo = y as f64 + 0.5;
        let (b_yo, e_yo) = (rotation.b * yo, rotation.e * yo);
        // x + 0.5 stays exact when stepped by 1, so stepping finds the same source points as
        // mapping each pixel centre afresh (the tests' reference rotation does that).
        let mut xo = 0.5;
        for x in 0..w {
            let xin = rotation.a * xo + b_yo + rotation.c;
            let yin = rotation.d * xo + e_yo + rotation.f;
            xo += 1.0;
            let inside = xin >= 0.0 && yin >= 0.0 && xin < width && yin < height;
            let value = if inside {
                let at = (yin as u32 as usize * w + xin as u32 as usize) * 3;
                match src.get(at..at + 3) {
                    Some(&[r, g, b]) => Some([r, g, b]),
                    _ => None,
                }
            } else {
                None
            };
            let x = if mirror { w - 1 - x } else { x };
            visit(y * w + x, value);
        }
    }
}

/// `RandomRotation`, then an optional left-right mirror, then normalisation into planar
/// CHW floats: PIL's `Image.rotate`, `flip_horizontal` and [`Normalize::write_chw`] in one
/// pass, without the two intermediate images.
fn rotate_flip_normalize(
    img: &RgbImage,
    angle_deg: f32,
    mirror: bool,
    norm: &Normalize,
    out: &mut [f32],
) {
    let plane = (img.width() * img.height()) as usize;
    let levels = norm.levels();
    let black = [levels[0][0], levels[1][0], levels[2][0]];
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    rotate_flip_each(img, angle_deg, mirror, |at, px| {
        let value = match px {
            Some([r, g, b]) => [
                levels[0][usize::from(r)],
                levels[1][usize::from(g)],
                levels[2][usize::from(b)],
            ],
            None => black,
        };
        red[at] = value[0];
        green[at] = value[1];
        blue[at] = value[2];
    });
}

/// `RandomRotation` then an optional mirror, as an image: the same pixels as
/// [`rotate_flip_normalize`] before normalising, for TrivialAugmentWide to work on.
fn rotate_flip(img: &RgbImage, angle_deg: f32, mirror: bool) -> RgbImage {
    let mut out = RgbImage::new(img.width(), img.height());
    let dst = &mut *out;
    rotate_flip_each(img, angle_deg, mirror, |at, px| {
        if let Some(px) = px {
            dst[at * 3..at * 3 + 3].copy_from_slice(&px);
        }
    });
    out
}

/// `RandomErasing.get_params` for a `width` x `height` image: ten tries at a box of random
/// area and log-uniform aspect ratio (height/width) smaller than the image, placed
/// uniformly; `None` when no try fits, which torchvision treats as no erasing.
pub fn random_erasing_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> Option<Crop> {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let erase_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        // Python's round() halves to even.
        let h = (erase_area * aspect).sqrt().round_ties_even();
        let w = (erase_area / aspect).sqrt().round_ties_even();
        if !(h < f64::from(height) && w < f64::from(width)) {
            continue;
        }
        let (h, w) = (h as u32, w as u32);
        let top = rng.random_range(0..=height - h);
        let left = rng.random_range(0..=width - w);
        return Some(Crop {
            left,
            top,
            width: w,
            height: h,
        });
    }
    None
}

/// Sets `region` of every channel of a planar CHW `width`-wide image to 0, the value
/// `RandomErasing(value=0)` writes (after normalisation, so 0 is the mean colour).
pub fn erase_chw(out: &mut [f32], width: u32, region: Crop) {
    let (width, plane_len) = (width as usize, out.len() / 3);
    if width == 0 || plane_len == 0 {
        return;
    }
    for plane in out.chunks_exact_mut(plane_len) {
        for row in plane
            .chunks_exact_mut(width)
            .skip(region.top as usize)
            .take(region.height as usize)
        {
            let left = (region.left as usize).min(width);
            let right = (left + region.width as usize).min(width);
            row[left..right].fill(0.0);
        }
    }
}

/// Writes one augmented training sample into `out` as `3 * image_size^2` normalised
/// floats, CHW.
pub fn augment_into(
    resizer: &mut Resizer,
    img: &RgbImage,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
    out: &mut [f32],
) -> Result<()> {
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Invalid("image has no pixels".into()));
    }
    if cfg.image_size == 0 {
        return Err(DataError::Invalid("augmentation image size is 0".into()));
    }
    cfg.check()?;
    let len = 3 * (cfg.image_size as usize).pow(2);
    if out.len() != len {
        return Err(DataError::Invalid(format!(
            "augmentation output holds {} floats, expected {len}",
            out.len()
        )));
    }
    let crop = random_resized_crop_params(img.width(), img.height(), cfg.scale, cfg.ratio, rng);
    let region = CropBox {
        left: f64::from(crop.left),
        top: f64::from(crop.top),
        width: f64::from(crop.width),
        height: f64::from(crop.height),
    };
    let resized = resize_region(resizer, img, region, cfg.image_size, cfg.image_size)?;
    // Drawn in torchvision's order: the angle (when rotating), then the flip.
    let angle = if cfg.rotation_deg > 0.0 {
        uniform(
            rng,
            -f64::from(cfg.rotation_deg),
            f64::from(cfg.rotation_deg),
        ) as f32
    } else {
        0.0
    };
    let mirror = cfg.hflip > 0.0 && rng.random::<f64>() < f64::from(cfg.hflip);
    if cfg.color_jitter > 0.0 || cfg.trivial_augment {
        // Both work on the uint8 image, after the flip and before ToTensor.
        let mut img = rotate_flip(&resized, angle, mirror);
        if cfg.color_jitter > 0.0 {
            img = ColorJitter::sample(f64::from(cfg.color_jitter), rng)?.apply(&img)?;
        }
        if cfg.trivial_augment {
            img = Augmentation::sample(rng).apply(&img)?;
        }
        cfg.norm.write_chw(&img, out);
    } else {
        rotate_flip_normalize(&resized, angle, mirror, &cfg.norm, out);
    }
    if cfg.random_erasing > 0.0 && rng.random::<f64>() < f64::from(cfg.random_erasing) {
        let size = cfg.image_size;
        if let Some(region) = random_erasing_params(size, size, ERASE_SCALE, ERASE_RATIO, rng) {
            erase_chw(out, size, region);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode_rgb_limited;
    use crate::rng::sample_rng;
    use image::Rgb;

    /// The reference for the fused rotation: PIL's `Image.rotate` (nearest neighbour, no
    /// expansion), mapping every output pixel centre back to the source on its own.
    fn rotate(img: &RgbImage, angle_deg: f32) -> RgbImage {
        let (w, h) = img.dimensions();
        let r = InverseAffine::rotation(w, h, angle_deg);
        RgbImage::from_fn(w, h, |x, y| {
            let (xin, yin) = r.source(f64::from(x), f64::from(y));
            if xin >= 0.0 && yin >= 0.0 && xin < f64::from(w) && yin < f64::from(h) {
                *img.get_pixel(xin as u32, yin as u32)
            } else {
                Rgb([0, 0, 0])
            }
        })
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 99])
        })
    }

    #[test]
    fn crops_stay_in_bounds_and_follow_the_ranges() {
        let mut rng = sample_rng(0, 0, 0);
        for (w, h) in [(150, 150), (500, 374), (30, 200), (1, 1)] {
            for _ in 0..500 {
                let c = random_resized_crop_params(w, h, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
                assert!(c.width > 0 && c.height > 0);
                assert!(
                    c.left + c.width <= w && c.top + c.height <= h,
                    "{c:?} in {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn impossible_ratios_fall_back_to_a_centre_crop() {
        let mut rng = sample_rng(0, 0, 0);
        // Ratios of 10+ cannot fit a 100x100 image at these scales: centre crop at ratio 10.
        let c = random_resized_crop_params(100, 100, (0.9, 1.0), (10.0, 20.0), &mut rng);
        assert_eq!(
            c,
            Crop {
                left: 0,
                top: 45,
                width: 100,
                height: 10
            }
        );
        let c = random_resized_crop_params(100, 50, (0.9, 1.0), (0.75, 1.33), &mut rng);
        assert_eq!(
            c,
            Crop {
                left: 16,
                top: 0,
                width: 67,
                height: 50
            }
        );
    }

    #[test]
    fn full_scale_and_unit_ratio_crop_the_whole_square() {
        let mut rng = sample_rng(3, 0, 0);
        let c = random_resized_crop_params(64, 64, (1.0, 1.0), (1.0, 1.0), &mut rng);
        assert_eq!(
            c,
            Crop {
                left: 0,
                top: 0,
                width: 64,
                height: 64
            }
        );
    }

    #[test]
    fn rotation_keeps_size_and_turns_counter_clockwise() {
        let img = gradient(4, 4);
        let r = rotate(&img, 90.0);
        assert_eq!(r.dimensions(), (4, 4));
        // Counter-clockwise: the top-right pixel moves to the top-left.
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(3, 0));
        assert_eq!(r.get_pixel(0, 3), img.get_pixel(0, 0));
        assert_eq!(rotate(&img, 0.0), img);
        assert_eq!(rotate(&gradient(7, 3), 15.0).dimensions(), (7, 3));
        // Corners uncovered by a 45 degree turn are black.
        let white = RgbImage::from_pixel(20, 20, Rgb([255, 255, 255]));
        let r = rotate(&white, 45.0);
        assert_eq!(r.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(r.get_pixel(10, 10).0, [255, 255, 255]);
    }

    #[test]
    fn output_has_the_configured_size_and_is_deterministic() {
        let img = gradient(150, 120);
        let cfg = AugmentConfig::notebook(32);
        let mut resizer = Resizer::new();
        let mut run = |sample| {
            let mut out = vec![f32::NAN; 3 * 32 * 32];
            augment_into(
                &mut resizer,
                &img,
                &cfg,
                &mut sample_rng(1, 2, sample),
                &mut out,
            )
            .unwrap();
            out
        };
        let a = run(3);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, run(3));
        assert_ne!(a, run(4));
        let mut wrong_size = vec![0.0; 3 * 31 * 31];
        let err = augment_into(
            &mut resizer,
            &img,
            &cfg,
            &mut sample_rng(0, 0, 0),
            &mut wrong_size,
        );
        assert!(err.is_err());
    }

    #[test]
    fn fused_rotation_flip_and_normalisation_equal_the_separate_steps() {
        let img = RgbImage::from_fn(23, 17, |x, y| {
            Rgb([(x * 11 + y * 3) as u8, (y * 13) as u8, (x * y) as u8])
        });
        let norm = Normalize::IMAGENET;
        for angle in [0.0, 7.3, -15.0, 90.0] {
            for mirror in [false, true] {
                let mut separate = rotate(&img, angle);
                if mirror {
                    image::imageops::flip_horizontal_in_place(&mut separate);
                }
                let mut expected = vec![0.0; 3 * 23 * 17];
                norm.write_chw(&separate, &mut expected);
                let mut fused = vec![f32::NAN; 3 * 23 * 17];
                rotate_flip_normalize(&img, angle, mirror, &norm, &mut fused);
                assert_eq!(fused, expected, "angle {angle}, mirror {mirror}");
            }
        }
    }

    /// Agreement with PIL on the fixture that tools/reference/data_fixtures.py writes.
    #[test]
    fn rotation_matches_pil() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let photo = std::fs::read(fixtures.join("rgb.jpg")).unwrap();
        let photo = decode_rgb_limited(&photo, u64::MAX).unwrap();
        let corner = image::imageops::crop_imm(&photo, 0, 0, 48, 40).to_image();
        let pil = image::open(fixtures.join("expected/rgb.jpg.corner.rot10n.png"))
            .unwrap()
            .to_rgb8();
        let norm = Normalize::IMAGENET;
        let mut expected = vec![0.0; 3 * 48 * 40];
        norm.write_chw(&pil, &mut expected);
        let mut ours = vec![f32::NAN; 3 * 48 * 40];
        rotate_flip_normalize(&corner, 10.0, false, &norm, &mut ours);
        // In grey levels; the two JPEG decoders differ slightly.
        let plane = 48 * 40;
        let mean = ours
            .iter()
            .zip(&expected)
            .enumerate()
            .map(|(i, (a, b))| (a - b).abs() * norm.std[i / plane] * 255.0)
            .sum::<f32>()
            / ours.len() as f32;
        assert!(mean <= 1.0, "mean abs diff {mean} grey levels");
    }

    /// The pre-TrivialAugment pipeline step by step from the same generator: crop, resize,
    /// reference rotation, flip. Returns the uint8 image before normalisation.
    fn replay_until_flip(img: &RgbImage, cfg: &AugmentConfig, rng: &mut impl Rng) -> RgbImage {
        let c = random_resized_crop_params(img.width(), img.height(), cfg.scale, cfg.ratio, rng);
        let region = CropBox {
            left: f64::from(c.left),
            top: f64::from(c.top),
            width: f64::from(c.width),
            height: f64::from(c.height),
        };
        let size = cfg.image_size;
        let resized = resize_region(&mut Resizer::new(), img, region, size, size).unwrap();
        let deg = f64::from(cfg.rotation_deg);
        let angle = if deg > 0.0 {
            uniform(rng, -deg, deg) as f32
        } else {
            0.0
        };
        let mut out = rotate(&resized, angle);
        if cfg.hflip > 0.0 && rng.random::<f64>() < f64::from(cfg.hflip) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }

    fn augmented(cfg: &AugmentConfig, img: &RgbImage, rng: &mut impl Rng) -> Vec<f32> {
        let mut out = vec![f32::NAN; 3 * (cfg.image_size as usize).pow(2)];
        augment_into(&mut Resizer::new(), img, cfg, rng, &mut out).unwrap();
        out
    }

    /// With both modern-recipe options off, the output and the draws are the notebook
    /// pipeline's (training resumes replay them).
    #[test]
    fn options_off_keep_the_notebook_pipeline_and_its_draws() {
        let img = gradient(150, 120);
        let cfg = AugmentConfig::notebook(32);
        let explicit = AugmentConfig {
            trivial_augment: false,
            random_erasing: 0.0,
            ..AugmentConfig::notebook(32)
        };
        assert_eq!(cfg, explicit);
        for i in 0..20 {
            let mut rng = sample_rng(7, 1, i);
            let ours = augmented(&explicit, &img, &mut rng);
            let mut replay = sample_rng(7, 1, i);
            let mut expected = vec![0.0; ours.len()];
            cfg.norm
                .write_chw(&replay_until_flip(&img, &cfg, &mut replay), &mut expected);
            assert_eq!(ours, expected, "sample {i}");
            assert_eq!(ours, augmented(&cfg, &img, &mut sample_rng(7, 1, i)));
            assert_eq!(rng.random::<u64>(), replay.random::<u64>(), "sample {i}");
        }
    }

    /// TrivialAugmentWide runs on the rotated, flipped uint8 image with the draws that follow
    /// the flip's, before normalisation.
    #[test]
    fn trivial_augment_follows_the_flip_with_the_next_draws() {
        let img = gradient(150, 120);
        let cfg = AugmentConfig {
            trivial_augment: true,
            ..AugmentConfig::notebook(24)
        };
        let mut ops = std::collections::HashSet::new();
        for i in 0..60 {
            let mut rng = sample_rng(3, 0, i);
            let ours = augmented(&cfg, &img, &mut rng);
            let mut replay = sample_rng(3, 0, i);
            let flipped = replay_until_flip(&img, &cfg, &mut replay);
            let aug = Augmentation::sample(&mut replay);
            let mut expected = vec![0.0; ours.len()];
            cfg.norm
                .write_chw(&aug.apply(&flipped).unwrap(), &mut expected);
            assert_eq!(ours, expected, "sample {i}: {aug:?}");
            assert_eq!(rng.random::<u64>(), replay.random::<u64>(), "sample {i}");
            ops.insert(aug.op);
        }
        assert!(ops.len() > 8, "{ops:?}");
    }

    /// ColorJitter runs on the flipped uint8 image with the draws that follow the flip's,
    /// and TrivialAugmentWide, when on too, after it with the draws that follow its own.
    #[test]
    fn color_jitter_follows_the_flip_and_precedes_trivial_augment() {
        let img = gradient(150, 120);
        for trivial_augment in [false, true] {
            let cfg = AugmentConfig {
                color_jitter: 0.4,
                trivial_augment,
                ..AugmentConfig::notebook(24)
            };
            for i in 0..30 {
                let mut rng = sample_rng(5, 0, i);
                let ours = augmented(&cfg, &img, &mut rng);
                let mut replay = sample_rng(5, 0, i);
                let flipped = replay_until_flip(&img, &cfg, &mut replay);
                let jitter = ColorJitter::sample(0.4, &mut replay).unwrap();
                let mut expected_img = jitter.apply(&flipped).unwrap();
                if trivial_augment {
                    expected_img = Augmentation::sample(&mut replay)
                        .apply(&expected_img)
                        .unwrap();
                }
                let mut expected = vec![0.0; ours.len()];
                cfg.norm.write_chw(&expected_img, &mut expected);
                assert_eq!(ours, expected, "sample {i}: {jitter:?}");
                assert_eq!(rng.random::<u64>(), replay.random::<u64>(), "sample {i}");
            }
        }
    }

    /// A flip probability of 0 never mirrors and draws nothing for it (the notebook's draws
    /// without a flip); 1 always mirrors.
    #[test]
    fn the_flip_probability_is_respected() {
        let img = gradient(60, 50);
        let (never, always) = (
            AugmentConfig {
                hflip: 0.0,
                ..AugmentConfig::notebook(16)
            },
            AugmentConfig {
                hflip: 1.0,
                ..AugmentConfig::notebook(16)
            },
        );
        for i in 0..20 {
            let mut rng = sample_rng(6, 0, i);
            let ours = augmented(&never, &img, &mut rng);
            let mut replay = sample_rng(6, 0, i);
            let mut expected = vec![0.0; ours.len()];
            never
                .norm
                .write_chw(&replay_until_flip(&img, &never, &mut replay), &mut expected);
            assert_eq!(ours, expected, "sample {i}");
            assert_eq!(rng.random::<u64>(), replay.random::<u64>(), "sample {i}");

            let mut replay = sample_rng(6, 0, i);
            let mut mirrored = replay_until_flip(&img, &never, &mut replay);
            image::imageops::flip_horizontal_in_place(&mut mirrored);
            always.norm.write_chw(&mirrored, &mut expected);
            assert_eq!(augmented(&always, &img, &mut sample_rng(6, 0, i)), expected);
        }
    }

    /// Settings torchvision refuses are refused, each naming itself.
    #[test]
    fn impossible_settings_are_refused() {
        let img = gradient(40, 40);
        let plain = AugmentConfig::notebook(8);
        let cases = [
            (
                AugmentConfig {
                    scale: (0.5, 0.2),
                    ..plain.clone()
                },
                "crop scale",
            ),
            (
                AugmentConfig {
                    scale: (0.0, 1.0),
                    ..plain.clone()
                },
                "crop scale",
            ),
            (
                AugmentConfig {
                    ratio: (1.5, 0.5),
                    ..plain.clone()
                },
                "aspect ratio",
            ),
            (
                AugmentConfig {
                    rotation_deg: f32::NAN,
                    ..plain.clone()
                },
                "rotation",
            ),
            (
                AugmentConfig {
                    hflip: 1.5,
                    ..plain.clone()
                },
                "flip probability",
            ),
            (
                AugmentConfig {
                    color_jitter: -1.0,
                    ..plain.clone()
                },
                "colour jitter",
            ),
        ];
        let erasing = [-0.1, 1.5, f32::NAN].map(|p| {
            let cfg = AugmentConfig {
                random_erasing: p,
                ..plain.clone()
            };
            (cfg, "random erasing probability")
        });
        for (cfg, named) in cases.into_iter().chain(erasing) {
            let mut out = vec![0.0; 3 * 64];
            let err = augment_into(
                &mut Resizer::new(),
                &img,
                &cfg,
                &mut sample_rng(0, 0, 0),
                &mut out,
            )
            .unwrap_err();
            assert!(err.to_string().contains(named), "{cfg:?}: {err}");
        }
    }

    #[test]
    fn the_image_rotation_gives_the_fused_pixels() {
        let img = gradient(23, 17);
        for (angle, mirror) in [(0.0, false), (12.5, true), (-90.0, false)] {
            let mut expected = rotate(&img, angle);
            if mirror {
                image::imageops::flip_horizontal_in_place(&mut expected);
            }
            assert_eq!(rotate_flip(&img, angle, mirror), expected);
        }
    }

    #[test]
    fn erasing_boxes_fit_strictly_inside() {
        let mut rng = sample_rng(0, 0, 0);
        let mut sizes = std::collections::HashSet::new();
        for (w, h) in [(32, 32), (224, 150), (40, 24)] {
            for _ in 0..500 {
                let b = random_erasing_params(w, h, ERASE_SCALE, ERASE_RATIO, &mut rng);
                let b = b.expect("a 2-33% box fits these sizes within ten tries");
                assert!(b.width < w && b.height < h, "{b:?} in {w}x{h}");
                assert!(
                    b.left + b.width <= w && b.top + b.height <= h,
                    "{b:?} in {w}x{h}"
                );
                sizes.insert((b.width, b.height));
            }
        }
        assert!(sizes.len() > 50);
        // A box of the whole area at ratio 1 never fits strictly inside.
        for _ in 0..20 {
            assert_eq!(
                random_erasing_params(10, 10, (1.0, 1.0), (1.0, 1.0), &mut rng),
                None
            );
        }
    }

    #[test]
    fn erase_zeroes_the_box_in_every_channel() {
        let (w, h) = (5u32, 4u32);
        let mut out = vec![1.0f32; 3 * 20];
        let region = Crop {
            left: 1,
            top: 2,
            width: 3,
            height: 2,
        };
        erase_chw(&mut out, w, region);
        for (i, v) in out.iter().enumerate() {
            let (x, y) = ((i % 20) as u32 % w, (i % 20) as u32 / w);
            let inside = (1..4).contains(&x) && (2..h).contains(&y);
            assert_eq!(
                *v,
                if inside { 0.0 } else { 1.0 },
                "channel {}, ({x}, {y})",
                i / 20
            );
        }
    }

    /// p = 1 erases every sample (a box always fits at 32x32), with the draws after the
    /// augmentation's; the rest of the tensor is untouched.
    #[test]
    fn certain_erasing_erases_every_sample_after_the_other_draws() {
        let img = gradient(150, 120);
        let plain = AugmentConfig::notebook(32);
        for trivial_augment in [false, true] {
            let cfg = AugmentConfig {
                trivial_augment,
                random_erasing: 1.0,
                ..plain.clone()
            };
            let unerased = AugmentConfig {
                random_erasing: 0.0,
                ..cfg.clone()
            };
            for i in 0..30 {
                let ours = augmented(&cfg, &img, &mut sample_rng(2, 0, i));
                let mut replay = sample_rng(2, 0, i);
                let mut expected = augmented(&unerased, &img, &mut replay);
                assert!(replay.random::<f64>() < 1.0);
                let region = random_erasing_params(32, 32, ERASE_SCALE, ERASE_RATIO, &mut replay)
                    .expect("a box fits");
                erase_chw(&mut expected, 32, region);
                assert_eq!(ours, expected, "sample {i}");
                if region.width > 0 && region.height > 0 {
                    assert_ne!(ours, augmented(&unerased, &img, &mut sample_rng(2, 0, i)));
                }
            }
        }
    }

    #[test]
    fn erasing_at_a_half_erases_about_half() {
        let img = gradient(60, 60);
        let cfg = AugmentConfig {
            random_erasing: 0.5,
            ..AugmentConfig::notebook(16)
        };
        let plain = AugmentConfig::notebook(16);
        let erased = (0..200)
            .filter(|&i| {
                augmented(&cfg, &img, &mut sample_rng(4, 0, i))
                    != augmented(&plain, &img, &mut sample_rng(4, 0, i))
            })
            .count();
        assert!((70..130).contains(&erased), "{erased} of 200 erased");
    }

    #[test]
    fn the_flip_mirrors_the_identity_crop() {
        let img = gradient(16, 16);
        let cfg = AugmentConfig {
            image_size: 16,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            rotation_deg: 0.0,
            hflip: 0.5,
            color_jitter: 0.0,
            trivial_augment: false,
            random_erasing: 0.0,
            norm: Normalize {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            },
        };
        let mut resizer = Resizer::new();
        let (mut flipped, mut plain) = (0, 0);
        for i in 0..40 {
            let mut out = vec![0.0; 3 * 16 * 16];
            augment_into(&mut resizer, &img, &cfg, &mut sample_rng(0, 0, i), &mut out).unwrap();
            let px = |x: u32, y: u32| out[(y * 16 + x) as usize].round() as u8;
            if px(0, 5) == img.get_pixel(0, 5).0[0] {
                plain += 1;
                assert!((0..16).all(|x| px(x, 5) == img.get_pixel(x, 5).0[0]));
            } else {
                flipped += 1;
                assert!((0..16).all(|x| px(x, 5) == img.get_pixel(15 - x, 5).0[0]));
            }
        }
        assert!(flipped > 5 && plain > 5, "flipped {flipped}, plain {plain}");
    }
}
