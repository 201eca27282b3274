//! Agreement with PIL/torchvision on the fixtures written by
//! tools/reference/data_fixtures.py (expected outputs are the uint8 images torchvision hands
//! to ToTensor, so both sides are normalised the same way here). The rotation, private to
//! the fused augmentation, is checked against PIL in `augment`'s own tests.

mod common;

use fast_image_resize::Resizer;
use image::RgbImage;
use vt_data::decode::{decode_rgb_limited, DEFAULT_MAX_PIXELS};
use vt_data::transform::{eval_chw, resize_region, CropBox, Normalize};

const EVAL_SIZE: u32 = 64;

fn input(name: &str) -> RgbImage {
    let bytes = std::fs::read(common::fixtures().join(name)).unwrap();
    decode_rgb_limited(&bytes, DEFAULT_MAX_PIXELS).unwrap()
}

fn expected(name: &str) -> RgbImage {
    image::open(common::fixtures().join("expected").join(name))
        .unwrap()
        .to_rgb8()
}

fn normalised(img: &RgbImage) -> Vec<f32> {
    let mut out = vec![0.0; 3 * (img.width() * img.height()) as usize];
    Normalize::IMAGENET.write_chw(img, &mut out);
    out
}

/// Mean and max absolute difference in units of 1/255 of the [0, 1] range (i.e. grey levels).
fn diff_levels(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), theirs.len());
    let plane = ours.len() / 3;
    let (mut sum, mut max) = (0.0f32, 0.0f32);
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let d = (a - b).abs() * Normalize::IMAGENET.std[i / plane] * 255.0;
        sum += d;
        max = max.max(d);
    }
    (sum / ours.len() as f32, max)
}

#[test]
fn eval_tensors_match_torchvision() {
    let mut resizer = Resizer::new();
    for (name, mean_tol) in [
        ("rgb.jpg", 1.0),
        ("grey.jpg", 1.0),
        ("grey_png_named.jpg", 0.5),
        ("palette.png", 0.5),
        ("rgba.png", 0.5),
        ("cmyk.jpg", 1.5),
    ] {
        let ours = eval_chw(&mut resizer, &input(name), EVAL_SIZE, &Normalize::IMAGENET).unwrap();
        let theirs = normalised(&expected(&format!("{name}.eval{EVAL_SIZE}.png")));
        let (mean, max) = diff_levels(&ours, &theirs);
        eprintln!("{name}: mean {mean:.3} max {max:.1} grey levels");
        assert!(
            mean <= mean_tol,
            "{name}: mean abs diff {mean} grey levels (max {max})"
        );
    }
}

#[test]
fn resized_crop_matches_torchvision() {
    let crop = CropBox {
        left: 10.0,
        top: 20.0,
        width: 100.0,
        height: 80.0,
    };
    let ours = resize_region(&mut Resizer::new(), &input("rgb.jpg"), crop, 48, 48).unwrap();
    let (mean, max) = diff_levels(
        &normalised(&ours),
        &normalised(&expected("rgb.jpg.rrc48.png")),
    );
    eprintln!("resized crop: mean {mean:.3} max {max:.1}");
    assert!(mean <= 1.0, "mean {mean} max {max}");
}
