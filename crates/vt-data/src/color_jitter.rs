//! torchvision's `ColorJitter(brightness=s, contrast=s, saturation=s)` on a PIL-style RGB8
//! image, as timm's `--color-jitter s` builds it: the three adjustments in a random order,
//! each by its own factor drawn uniformly from [max(0, 1 - s), 1 + s]. The adjustments are
//! PIL's `ImageEnhance` (Brightness, Contrast, Color), those of [`crate::trivial_augment`].

use rand::seq::SliceRandom;
use rand::Rng;

use image::RgbImage;

use crate::error::{DataError, Result};
use crate::trivial_augment::{apply_op, Op};

/// One draw of the jitter: the adjustments in the order they apply, each with its factor
/// (1 keeps the image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitter {
    pub steps: [(Op, f64); 3],
}

impl ColorJitter {
    /// Draws as torchvision's `get_params`: the order first, then the brightness, contrast
    /// and saturation factors. Fails on a strength that is negative or not finite.
    pub fn sample(strength: f64, rng: &mut impl Rng) -> Result<ColorJitter> {
        if !(strength.is_finite() && strength >= 0.0) {
            return Err(DataError::Invalid(format!(
                "colour jitter strength {strength} is not a number >= 0"
            )));
        }
        let mut order = [0, 1, 2];
        order.shuffle(rng);
        let (lo, hi) = ((1.0 - strength).max(0.0), 1.0 + strength);
        let factors: [f64; 3] = std::array::from_fn(|_| lo + (hi - lo) * rng.random::<f64>());
        let ops = [Op::Brightness, Op::Contrast, Op::Color];
        Ok(ColorJitter {
            steps: order.map(|i| (ops[i], factors[i])),
        })
    }

    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        self.steps
            .iter()
            .try_fold(img.clone(), |img, &(op, factor)| {
                apply_op(&img, op, factor - 1.0)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::sample_rng;
    use std::collections::HashSet;

    fn photo() -> RgbImage {
        RgbImage::from_fn(12, 9, |x, y| {
            image::Rgb([(x * 20) as u8, (y * 25) as u8, ((x + y) * 9) as u8])
        })
    }

    /// Every order turns up, each factor stays in its range and covers it.
    #[test]
    fn draws_cover_the_orders_and_the_factor_range() {
        let mut orders = HashSet::new();
        let (mut low, mut high) = (f64::MAX, f64::MIN);
        for i in 0..600 {
            let jitter = ColorJitter::sample(0.4, &mut sample_rng(1, 0, i)).unwrap();
            let ops: Vec<Op> = jitter.steps.iter().map(|(op, _)| *op).collect();
            let distinct: HashSet<&Op> = ops.iter().collect();
            assert_eq!(distinct.len(), 3, "{jitter:?}");
            orders.insert(ops);
            for (_, factor) in jitter.steps {
                assert!((0.6..1.4).contains(&factor), "{jitter:?}");
                low = low.min(factor);
                high = high.max(factor);
            }
        }
        assert_eq!(orders.len(), 6);
        assert!(low < 0.62 && high > 1.38, "factors {low} to {high}");
        // Strengths above 1 never go below a factor of 0 (a black or grey image).
        let strong = ColorJitter::sample(3.0, &mut sample_rng(2, 0, 0)).unwrap();
        assert!(strong.steps.iter().all(|(_, f)| (0.0..4.0).contains(f)));
    }

    /// The image is each adjustment in turn, in the drawn order (the order matters: a
    /// brightness change moves the grey level contrast blends towards).
    #[test]
    fn the_adjustments_apply_in_the_drawn_order() {
        let img = photo();
        let mut differs_by_order = false;
        for i in 0..40 {
            let jitter = ColorJitter::sample(0.8, &mut sample_rng(3, 0, i)).unwrap();
            let mut expected = img.clone();
            for (op, factor) in jitter.steps {
                expected = apply_op(&expected, op, factor - 1.0).unwrap();
            }
            let ours = jitter.apply(&img).unwrap();
            assert_eq!(ours, expected, "{jitter:?}");
            assert_ne!(ours, img, "{jitter:?}");
            let mut reversed = jitter;
            reversed.steps.reverse();
            differs_by_order |= reversed.apply(&img).unwrap() != ours;
        }
        assert!(differs_by_order);
    }

    #[test]
    fn zero_strength_keeps_the_image_and_bad_strengths_fail() {
        let img = photo();
        let jitter = ColorJitter::sample(0.0, &mut sample_rng(0, 0, 0)).unwrap();
        assert_eq!(jitter.apply(&img).unwrap(), img);
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            assert!(ColorJitter::sample(bad, &mut sample_rng(0, 0, 0)).is_err());
        }
    }
}
