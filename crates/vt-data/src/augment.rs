//! Training augmentation with torchvision's semantics (the reference notebook's pipeline):
//! `RandomResizedCrop(size, scale, ratio)`, `RandomRotation(deg)`, `RandomHorizontalFlip()`,
//! `ToTensor()`, `Normalize(mean, std)`, in that order, on PIL-style RGB8 images.
//!
//! The random numbers come from the caller's generator (see [`crate::rng::sample_rng`]), so the
//! draws do not match torch's generator, only its distributions and geometry.

use fast_image_resize::Resizer;
use image::{Rgb, RgbImage};
use rand::Rng;

use crate::error::{DataError, Result};
use crate::transform::{resize_region, CropBox, Normalize};

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
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
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
            hflip: true,
            norm: Normalize::IMAGENET,
        }
    }
}

/// How rotated pixels are sampled. torchvision's `RandomRotation` default is nearest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Bilinear,
}

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

/// Rotates counter-clockwise by `angle_deg` about the image centre, keeping the size and
/// filling uncovered corners with black, exactly as PIL's `Image.rotate` maps pixels.
pub fn rotate(img: &RgbImage, angle_deg: f32, interpolation: Interpolation) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let t = -f64::from(angle_deg).to_radians();
    let (a, b, d, e) = (t.cos(), t.sin(), -t.sin(), t.cos());
    let c = a * -cx + b * -cy + cx;
    let f = d * -cx + e * -cy + cy;
    let (wf, hf) = (f64::from(w), f64::from(h));
    // Starts black: uncovered pixels stay so.
    let mut out = RgbImage::new(w, h);
    let src = img.as_raw();
    let stride = w as usize * 3;
    for (y, row) in out.chunks_exact_mut(stride).enumerate() {
        let yo = y as f64 + 0.5;
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let xo = x as f64 + 0.5;
            let xin = a * xo + b * yo + c;
            let yin = d * xo + e * yo + f;
            if xin < 0.0 || yin < 0.0 || xin >= wf || yin >= hf {
                continue;
            }
            match interpolation {
                Interpolation::Nearest => {
                    let at = yin as usize * stride + xin as usize * 3;
                    px.copy_from_slice(&src[at..at + 3]);
                }
                Interpolation::Bilinear => {
                    px.copy_from_slice(&bilinear(img, xin - 0.5, yin - 0.5).0)
                }
            }
        }
    }
    out
}

/// PIL's bilinear sample with edge clamping, at pixel-centre coordinates.
fn bilinear(img: &RgbImage, x: f64, y: f64) -> Rgb<u8> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (dx, dy) = (x - x0, y - y0);
    let clamp_x = |v: i64| v.clamp(0, w - 1) as u32;
    let clamp_y = |v: i64| v.clamp(0, h - 1) as u32;
    let (xa, xb) = (clamp_x(x0 as i64), clamp_x(x0 as i64 + 1));
    let (ya, yb) = (clamp_y(y0 as i64), clamp_y(y0 as i64 + 1));
    let p = |xx, yy, c: usize| f64::from(img.get_pixel(xx, yy).0[c]);
    Rgb(std::array::from_fn(|c| {
        let top = p(xa, ya, c) + (p(xb, ya, c) - p(xa, ya, c)) * dx;
        let bottom = p(xa, yb, c) + (p(xb, yb, c) - p(xa, yb, c)) * dx;
        (top + (bottom - top) * dy).round().clamp(0.0, 255.0) as u8
    }))
}

/// One augmented training sample as `3 * image_size^2` normalised floats, CHW.
pub fn augment_chw(
    resizer: &mut Resizer,
    img: &RgbImage,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
) -> Result<Vec<f32>> {
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Invalid("image has no pixels".into()));
    }
    if cfg.image_size == 0 {
        return Err(DataError::Invalid("augmentation image size is 0".into()));
    }
    let crop = random_resized_crop_params(img.width(), img.height(), cfg.scale, cfg.ratio, rng);
    let region = CropBox {
        left: f64::from(crop.left),
        top: f64::from(crop.top),
        width: f64::from(crop.width),
        height: f64::from(crop.height),
    };
    let mut out = resize_region(resizer, img, region, cfg.image_size, cfg.image_size)?;
    if cfg.rotation_deg > 0.0 {
        let angle = uniform(
            rng,
            -f64::from(cfg.rotation_deg),
            f64::from(cfg.rotation_deg),
        );
        out = rotate(&out, angle as f32, Interpolation::Nearest);
    }
    if cfg.hflip && rng.random::<f64>() < 0.5 {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    let mut chw = vec![0.0; 3 * (cfg.image_size * cfg.image_size) as usize];
    cfg.norm.write_chw(&out, &mut chw);
    Ok(chw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::sample_rng;

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
        let r = rotate(&img, 90.0, Interpolation::Nearest);
        assert_eq!(r.dimensions(), (4, 4));
        // Counter-clockwise: the top-right pixel moves to the top-left.
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(3, 0));
        assert_eq!(r.get_pixel(0, 3), img.get_pixel(0, 0));
        assert_eq!(rotate(&img, 0.0, Interpolation::Nearest), img);
        assert_eq!(rotate(&img, 0.0, Interpolation::Bilinear), img);
        let odd = gradient(7, 3);
        assert_eq!(
            rotate(&odd, 15.0, Interpolation::Bilinear).dimensions(),
            (7, 3)
        );
        // Corners uncovered by a 45 degree turn are black.
        let white = RgbImage::from_pixel(20, 20, Rgb([255, 255, 255]));
        let r = rotate(&white, 45.0, Interpolation::Nearest);
        assert_eq!(r.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(r.get_pixel(10, 10).0, [255, 255, 255]);
    }

    #[test]
    fn output_has_the_configured_size_and_is_deterministic() {
        let img = gradient(150, 120);
        let cfg = AugmentConfig::notebook(32);
        let mut resizer = Resizer::new();
        let a = augment_chw(&mut resizer, &img, &cfg, &mut sample_rng(1, 2, 3)).unwrap();
        assert_eq!(a.len(), 3 * 32 * 32);
        let b = augment_chw(&mut resizer, &img, &cfg, &mut sample_rng(1, 2, 3)).unwrap();
        assert_eq!(a, b);
        let c = augment_chw(&mut resizer, &img, &cfg, &mut sample_rng(1, 2, 4)).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn the_flip_mirrors_the_identity_crop() {
        let img = gradient(16, 16);
        let cfg = AugmentConfig {
            image_size: 16,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            rotation_deg: 0.0,
            hflip: true,
            norm: Normalize {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            },
        };
        let mut resizer = Resizer::new();
        let (mut flipped, mut plain) = (0, 0);
        for i in 0..40 {
            let out = augment_chw(&mut resizer, &img, &cfg, &mut sample_rng(0, 0, i)).unwrap();
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
