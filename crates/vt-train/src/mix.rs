//! MixUp and CutMix on training batches, as torchvision's reference recipe applies them
//! (`RandomChoice([MixUp(alpha), CutMix(alpha)])` on every batch): each image is blended
//! with, or has a box pasted from, the previous image of its batch (the batch rolled by one),
//! and the loss weighs the two labels by the share `lambda` of the first.

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution};
use vt_data::rng::derive_seed;

/// Tags the draws of batch mixing in the seed derivation.
const TAG_MIX: u64 = 0x4D49_5845;

/// The Beta(alpha, alpha) parameters of MixUp and CutMix; 0 leaves a method out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mixing {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
}

/// A mixed batch.
pub struct Mixed {
    pub images: Tensor,
    /// The label of the image mixed into each one: the batch's labels rolled by one.
    pub partner_labels: Tensor,
    /// The share of each image's own label in its target.
    pub lambda: f64,
}

impl Mixed {
    /// The labels that weigh most in the targets, for the training accuracy (as
    /// torchvision's reference counts it, against the mixed target's argmax).
    pub fn dominant_labels<'a>(&'a self, labels: &'a Tensor) -> &'a Tensor {
        if self.lambda >= 0.5 {
            labels
        } else {
            &self.partner_labels
        }
    }
}

impl Mixing {
    fn is_off(&self) -> bool {
        self.mixup_alpha == 0.0 && self.cutmix_alpha == 0.0
    }

    /// Mixes the N x 3 x H x W `images` and their `labels` for optimiser step `step` of a
    /// run seeded with `seed` (so that a resumed run draws the same); `None` when both
    /// methods are off.
    pub fn apply(
        &self,
        images: &Tensor,
        labels: &Tensor,
        seed: u64,
        step: u64,
    ) -> Result<Option<Mixed>> {
        if self.is_off() {
            return Ok(None);
        }
        let mut rng = StdRng::seed_from_u64(derive_seed(&[TAG_MIX, seed, step]));
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random_bool(0.5),
            (mixup, _) => !mixup,
        };
        let alpha = if cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let lambda = Beta::new(alpha, alpha)
            .map_err(|e| candle_core::Error::Msg(format!("mixing alpha {alpha}: {e}")))?
            .sample(&mut rng);
        let partners = images.roll(1, 0)?;
        let partner_labels = labels.roll(1, 0)?;
        let (images, lambda) = if cutmix {
            cut_and_paste(images, &partners, lambda, &mut rng)?
        } else {
            (((images * lambda)? + (partners * (1.0 - lambda))?)?, lambda)
        };
        Ok(Some(Mixed {
            images,
            partner_labels,
            lambda,
        }))
    }
}

/// CutMix: a box of about `1 - lambda` of the area, centred anywhere, taken from `partners`;
/// returns the images and the share of the area left to each image.
fn cut_and_paste(
    images: &Tensor,
    partners: &Tensor,
    lambda: f64,
    rng: &mut StdRng,
) -> Result<(Tensor, f64)> {
    let (_, _, height, width) = images.dims4()?;
    let (centre_y, centre_x) = (rng.random_range(0..height), rng.random_range(0..width));
    let half = 0.5 * (1.0 - lambda).sqrt();
    let (half_h, half_w) = (
        (half * height as f64) as usize,
        (half * width as f64) as usize,
    );
    let (y1, y2) = (
        centre_y.saturating_sub(half_h),
        (centre_y + half_h).min(height),
    );
    let (x1, x2) = (
        centre_x.saturating_sub(half_w),
        (centre_x + half_w).min(width),
    );
    let inside: Vec<u8> = (0..height * width)
        .map(|i| {
            let (y, x) = (i / width, i % width);
            u8::from((y1..y2).contains(&y) && (x1..x2).contains(&x))
        })
        .collect();
    let inside = Tensor::from_vec(inside, (1, 1, height, width), images.device())?
        .broadcast_as(images.shape())?;
    let pasted = inside.where_cond(partners, images)?;
    let area = ((y2 - y1) * (x2 - x1)) as f64;
    Ok((pasted, 1.0 - area / (height * width) as f64))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::loss::cross_entropy;

    fn batch() -> (Tensor, Tensor) {
        let values: Vec<f32> = (0..4 * 3 * 8 * 8).map(|i| (i % 97) as f32 / 97.0).collect();
        let images = Tensor::from_vec(values, (4, 3, 8, 8), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
        (images, labels)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn mixup_blends_each_image_with_the_next_and_cutmix_pastes_a_box_of_it() {
        let (images, labels) = batch();
        let off = Mixing {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
        };
        assert!(off.apply(&images, &labels, 0, 0).unwrap().is_none());
        let partners = values(&images.roll(1, 0).unwrap());
        let own = values(&images);

        let mixup = Mixing {
            mixup_alpha: 0.2,
            cutmix_alpha: 0.0,
        };
        let mixed = mixup.apply(&images, &labels, 3, 5).unwrap().unwrap();
        let lambda = mixed.lambda as f32;
        assert!((0.0..=1.0).contains(&lambda));
        for ((m, a), b) in values(&mixed.images).iter().zip(&own).zip(&partners) {
            assert!((m - (lambda * a + (1.0 - lambda) * b)).abs() < 1e-6);
        }
        assert_eq!(
            mixed.partner_labels.to_vec1::<u32>().unwrap(),
            vec![1, 0, 1, 2]
        );
        // The same step of the same run draws the same.
        let again = mixup.apply(&images, &labels, 3, 5).unwrap().unwrap();
        assert_eq!(again.lambda, mixed.lambda);

        let cutmix = Mixing {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
        };
        for step in 0..20 {
            let mixed = cutmix.apply(&images, &labels, 3, step).unwrap().unwrap();
            let pasted: Vec<bool> = values(&mixed.images)
                .iter()
                .zip(&own)
                .zip(&partners)
                .map(|((m, a), b)| {
                    assert!(m == a || m == b, "CutMix blends no pixel");
                    m == b && a != b
                })
                .collect();
            // Every image of the batch gets the same box, whose area sets lambda.
            let per_image = 3 * 8 * 8;
            let taken = pasted[..per_image].iter().filter(|p| **p).count();
            let share = 1.0 - taken as f64 / per_image as f64;
            assert!((share - mixed.lambda).abs() < 1e-9, "step {step}");
        }
    }

    /// Weighing the two labels' losses by lambda is the cross-entropy against the mixed
    /// soft target, label smoothing included (the loss is linear in the target).
    #[test]
    fn the_mixed_loss_is_the_cross_entropy_of_the_mixed_target() {
        let logits = Tensor::new(&[[2.0f32, -1.0, 0.5], [0.1, 0.2, 3.0]], &Device::Cpu).unwrap();
        let (labels, partners) = (
            Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
            Tensor::new(&[1u32, 0], &Device::Cpu).unwrap(),
        );
        let (lambda, smoothing) = (0.7, 0.1);
        let loss = ((cross_entropy(&logits, &labels, smoothing).unwrap() * lambda).unwrap()
            + (cross_entropy(&logits, &partners, smoothing).unwrap() * (1.0 - lambda)).unwrap())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        let rows = [[2.0f64, -1.0, 0.5], [0.1, 0.2, 3.0]];
        let mut expected = 0.0;
        for (row, (own, partner)) in rows.iter().zip([(0, 1), (1, 0)]) {
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            for (k, v) in row.iter().enumerate() {
                let hot = |c: usize| if k == c { 1.0 } else { 0.0 };
                let mixed = lambda * hot(own) + (1.0 - lambda) * hot(partner);
                let target = (1.0 - smoothing) * mixed + smoothing / 3.0;
                expected -= target * (v - lse) / 2.0;
            }
        }
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }
}
