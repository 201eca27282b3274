//! A generated stand-in for the data set, for offline demos and tests: each class is a
//! stripe orientation and a hue, with random phase, jitter and pixel noise. A small network
//! learns it quickly; nothing about it resembles the real photos.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{DataError, Result};
use crate::import::{Importer, RawImage};
use crate::layout::Role;
use crate::rng::{derive_seed, TAG_SYNTH};

// The real data set's class names, so that a synthetic import drives the same pipeline; the
// manifest says `"source": "synthetic"` and files are named `synthetic-*`.
use crate::dataset::CLASSES;

#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    pub train_per_class: usize,
    pub test_per_class: usize,
    pub pred: usize,
    pub image_size: u32,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            train_per_class: 50,
            test_per_class: 10,
            pred: 12,
            image_size: 150,
            seed: 0,
        }
    }
}

/// Renders one image of class number `class` (an index into [`CLASSES`]); everything else
/// about it (angle and hue jitter, phase, noise) is drawn from `rng`.
pub fn render(class: usize, size: u32, rng: &mut impl Rng) -> RgbImage {
    let angle = (class as f32 * 30.0 + rng.random_range(-5.0..5.0)).to_radians();
    let (dx, dy) = (angle.cos(), angle.sin());
    let period = rng.random_range(10.0..16.0f32);
    let phase = rng.random_range(0.0..period);
    let hue = class as f32 * 60.0 + rng.random_range(-10.0..10.0);
    let base = hue_to_rgb(hue);
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let t = ((x as f32 * dx + y as f32 * dy + phase) / period * std::f32::consts::TAU).sin();
        let shade = 0.55 + 0.45 * t;
        let rgb: [u8; 3] = std::array::from_fn(|c| {
            let noise: f32 = rng.random_range(-20.0..20.0);
            (base[c] * shade * 255.0 + noise).clamp(0.0, 255.0) as u8
        });
        *px = Rgb(rgb);
    }
    img
}

fn hue_to_rgb(hue: f32) -> [f32; 3] {
    let h = hue.rem_euclid(360.0) / 60.0;
    let x = 1.0 - (h % 2.0 - 1.0).abs();
    let (r, g, b) = match h as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    // Lifted so no channel is black: keeps the images mid-range like photos.
    [0.25 + 0.75 * r, 0.25 + 0.75 * g, 0.25 + 0.75 * b]
}

fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Jpeg)
        .map_err(DataError::Encode)?;
    Ok(out.into_inner())
}

/// Generates the whole set into `importer`.
pub fn import_synthetic(cfg: &SyntheticConfig, importer: &mut Importer) -> Result<()> {
    if cfg.image_size == 0 || cfg.train_per_class == 0 {
        return Err(DataError::Invalid(
            "synthetic data needs a non-zero image size and training count".into(),
        ));
    }
    importer.set_classes(CLASSES.iter().map(|c| c.to_string()).collect());
    let mut serial = 0u64;
    let mut next = |role: Role, class: usize| -> Result<RawImage> {
        serial += 1;
        let mut rng = StdRng::seed_from_u64(derive_seed(&[TAG_SYNTH, cfg.seed, serial]));
        let name = format!("synthetic-{serial:06}.jpg");
        Ok(RawImage {
            source_path: format!("synthetic/{name}"),
            role,
            name,
            named_by_source: true,
            bytes: encode_jpeg(&render(class, cfg.image_size, &mut rng))?,
        })
    };
    for (class, class_name) in CLASSES.iter().enumerate() {
        for _ in 0..cfg.train_per_class {
            importer.add(next(Role::Train(class_name.to_string()), class)?)?;
        }
        for _ in 0..cfg.test_per_class {
            importer.add(next(Role::Test(class_name.to_string()), class)?)?;
        }
    }
    // Pred images cycle through the classes, so every kind appears among them.
    for i in 0..cfg.pred {
        importer.add(next(Role::Pred, i % CLASSES.len())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoding_failure_is_not_called_a_decoding_one() {
        let err = encode_jpeg(&RgbImage::new(0, 0)).unwrap_err();
        assert!(err.to_string().starts_with("cannot encode image"), "{err}");
    }
}
