//! Calibration: whether the softmax confidences mean what they say. A model that answers
//! "90 %" should be right on about 90 % of such images; deployed scores are read as
//! probabilities, so `vt-train eval` measures how far they are from it.
//!
//! The expected calibration error (ECE) of Guo et al., "On Calibration of Modern Neural
//! Networks" (2017): the images are put in `M` equal-width bins by the confidence of their
//! prediction, bin `m` holding confidences in `((m-1)/M, m/M]`, and the ECE is the mean of
//! |accuracy - mean confidence| over the bins, weighted by their share of the images.
//!
//! Temperature scaling, from the same paper, is its remedy: one number T that divides every
//! logit, fitted to minimise the negative log-likelihood of held-out labels. It changes no
//! prediction (the argmax stays), only how sure each one says it is.

use serde::Serialize;

use vt_model::config::TEMPERATURE_RANGE;

use crate::eval::Prediction;

/// The number of bins of Guo et al. (and of torchmetrics' default).
pub const BINS: usize = 15;

/// One bin of the reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// The confidences this bin holds: above `low`, up to and including `high`.
    pub low: f64,
    pub high: f64,
    pub images: u64,
    /// The mean confidence of its images (0 when it is empty).
    pub confidence: f64,
    /// The fraction of its images predicted correctly (0 when it is empty).
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The expected calibration error, between 0 (calibrated) and 1.
    pub ece: f64,
    /// The largest gap of a non-empty bin (the maximum calibration error).
    pub mce: f64,
    pub bins: Vec<ReliabilityBin>,
}

impl Calibration {
    /// The calibration of `predictions` over `bins` equal-width confidence bins. A
    /// confidence that is not a number (a diverged model) counts in the lowest bin.
    pub fn of(predictions: &[Prediction], bins: usize) -> Calibration {
        let bins = bins.max(1);
        let mut images = vec![0u64; bins];
        let mut confidence = vec![0f64; bins];
        let mut correct = vec![0u64; bins];
        for p in predictions {
            // (m-1)/M < c <= m/M: bin m-1, counted from 0. In f32, as the confidences are,
            // so that one on a boundary (0.4 of 15 bins) is binned as PyTorch bins it.
            let bin = ((p.confidence() * bins as f32).ceil() as usize).clamp(1, bins) - 1;
            let c = f64::from(p.confidence());
            images[bin] += 1;
            if c.is_finite() {
                confidence[bin] += c;
            }
            correct[bin] += u64::from(p.correct());
        }
        let total = predictions.len().max(1) as f64;
        let mut ece = 0.0;
        let mut mce = 0.0f64;
        let bins = (0..bins)
            .map(|m| {
                let n = images[m];
                let (confidence, accuracy) = match n {
                    0 => (0.0, 0.0),
                    _ => (confidence[m] / n as f64, correct[m] as f64 / n as f64),
                };
                if n > 0 {
                    let gap = (accuracy - confidence).abs();
                    ece += gap * n as f64 / total;
                    mce = mce.max(gap);
                }
                ReliabilityBin {
                    low: m as f64 / bins as f64,
                    high: (m + 1) as f64 / bins as f64,
                    images: n,
                    confidence,
                    accuracy,
                }
            })
            .collect();
        Calibration { ece, mce, bins }
    }

    /// The mean confidence minus the accuracy, over all images: positive when the model is
    /// overconfident.
    pub fn overconfidence(&self) -> f64 {
        let total: u64 = self.bins.iter().map(|b| b.images).sum();
        if total == 0 {
            return 0.0;
        }
        self.bins
            .iter()
            .map(|b| (b.confidence - b.accuracy) * b.images as f64)
            .sum::<f64>()
            / total as f64
    }
}

/// log softmax(`logits` / `temperature`), in f64.
fn log_probabilities(logits: &[f32], temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&z| f64::from(z) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = max + scaled.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
    scaled.iter().map(|z| z - log_sum).collect()
}

/// The mean negative log-likelihood of the labels of `predictions` under
/// softmax(logits / `temperature`), in f64.
pub fn nll_at(predictions: &[Prediction], temperature: f64) -> f64 {
    let total: f64 = predictions
        .iter()
        .map(|p| -log_probabilities(&p.logits, temperature)[p.label])
        .sum();
    total / predictions.len().max(1) as f64
}

/// The temperature within the range a checkpoint may hold ([`TEMPERATURE_RANGE`]) that
/// minimises [`nll_at`]: a golden-section search over log(1/T), where the likelihood is
/// unimodal (it is convex in 1/T).
pub fn fit_temperature(predictions: &[Prediction]) -> f64 {
    let nll = |log_beta: f64| nll_at(predictions, (-log_beta).exp());
    let (lowest, highest) = TEMPERATURE_RANGE;
    let (mut low, mut high) = (-f64::from(highest).ln(), -f64::from(lowest).ln());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let mut a = high - ratio * (high - low);
    let mut b = low + ratio * (high - low);
    let (mut nll_a, mut nll_b) = (nll(a), nll(b));
    for _ in 0..100 {
        if nll_a <= nll_b {
            high = b;
            (b, nll_b) = (a, nll_a);
            a = high - ratio * (high - low);
            nll_a = nll(a);
        } else {
            low = a;
            (a, nll_a) = (b, nll_b);
            b = low + ratio * (high - low);
            nll_b = nll(b);
        }
    }
    (-(low + high) / 2.0).exp()
}

/// `predictions` with their probabilities recomputed as softmax(logits / `temperature`).
pub fn at_temperature(predictions: &[Prediction], temperature: f64) -> Vec<Prediction> {
    predictions
        .iter()
        .map(|p| Prediction {
            probabilities: log_probabilities(&p.logits, temperature)
                .into_iter()
                .map(|l| l.exp() as f32)
                .collect(),
            ..p.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::prediction;

    /// Two classes with logits (1, -1), right on 80 % of the images: the likelihood is
    /// highest where sigmoid(2 / T) = 0.8, T = 2 / ln 4.
    #[test]
    fn the_fitted_temperature_makes_confidence_the_accuracy() {
        let predictions: Vec<Prediction> = (0..10)
            .map(|i| Prediction {
                logits: vec![1.0, -1.0],
                ..prediction(i, usize::from(i >= 8), &[0.88, 0.12])
            })
            .collect();
        let t = fit_temperature(&predictions);
        assert!((t - 2.0 / 4f64.ln()).abs() < 1e-6, "{t}");
        assert!(nll_at(&predictions, t) < nll_at(&predictions, 1.0));
        let calibrated = at_temperature(&predictions, t);
        assert!((calibrated[0].probabilities[0] - 0.8).abs() < 1e-6);
        assert_eq!(calibrated[9].predicted, 0);
        // Every image right: the surer the better, until the likelihood is 1 in f64.
        let right: Vec<Prediction> = predictions
            .iter()
            .map(|p| Prediction {
                label: 0,
                ..p.clone()
            })
            .collect();
        let t = fit_temperature(&right);
        assert!((f64::from(TEMPERATURE_RANGE.0)..0.1).contains(&t), "{t}");
    }

    /// The values of Guo et al.'s own `_ECELoss` (github.com/gpleiss/temperature_scaling,
    /// its loop over `torch.linspace` bins) run with PyTorch 2 on these probabilities, and
    /// its largest gap; torchmetrics 1.9's `multiclass_calibration_error(n_bins=15)`, whose
    /// bins are `[low, high)`, gives the same error here (0.4 sits above its f32 edge).
    #[test]
    fn matches_guo_et_al() {
        let predictions = [
            prediction(0, 0, &[0.9, 0.05, 0.05]),
            prediction(1, 1, &[0.9, 0.05, 0.05]),
            prediction(2, 1, &[0.2, 0.7, 0.1]),
            prediction(3, 2, &[0.3, 0.3, 0.4]),
            prediction(4, 2, &[0.0, 0.0, 1.0]),
            prediction(5, 0, &[0.55, 0.45, 0.0]),
            prediction(6, 1, &[0.55, 0.45, 0.0]),
            prediction(7, 2, &[1.0 / 3.0 + 1e-3, 1.0 / 3.0, 1.0 / 3.0 - 1e-3]),
        ];
        let calibration = Calibration::of(&predictions, BINS);
        assert!((calibration.ece - GUO_ECE).abs() < 1e-6, "{calibration:?}");
        let counted: u64 = calibration.bins.iter().map(|b| b.images).sum();
        assert_eq!(counted, predictions.len() as u64);
        // 1.0 is in the last bin, (14/15, 1].
        assert_eq!(calibration.bins[BINS - 1].images, 1);
        assert_eq!(calibration.bins[BINS - 1].accuracy, 1.0);
        // 0.4 is in (1/3, 0.4], with the wrong answer at 1/3 + 1e-3.
        assert_eq!(calibration.bins[5].images, 2);
        assert_eq!(calibration.bins[5].accuracy, 0.5);
        // Two images at 0.9 in (13/15, 14/15], one of them right.
        assert_eq!(calibration.bins[13].images, 2);
        assert_eq!(calibration.bins[13].accuracy, 0.5);
        assert!((calibration.mce - GUO_MCE).abs() < 1e-6, "{calibration:?}");
    }

    const GUO_ECE: f64 = 0.183_208_331_465_721_13;
    const GUO_MCE: f64 = 0.399_999_976_158_142_1;

    #[test]
    fn calibrated_and_overconfident_models() {
        // Right on 3 of 4 images it gave 0.75: calibrated.
        let calibrated: Vec<Prediction> = (0..4)
            .map(|i| prediction(i, usize::from(i == 3), &[0.75, 0.25]))
            .collect();
        let c = Calibration::of(&calibrated, BINS);
        assert!(
            c.ece.abs() < 1e-7 && c.overconfidence().abs() < 1e-7,
            "{c:?}"
        );
        // Sure of itself and right half of the time.
        let overconfident: Vec<Prediction> = (0..4)
            .map(|i| prediction(i, i % 2, &[0.99, 0.01]))
            .collect();
        let c = Calibration::of(&overconfident, BINS);
        assert!((c.ece - 0.49).abs() < 1e-6, "{c:?}");
        assert!((c.overconfidence() - 0.49).abs() < 1e-6);
        assert!(Calibration::of(&[], BINS).ece == 0.0);
        // A NaN confidence is counted, not dropped, and does not poison the error.
        let nan = [prediction(0, 0, &[f32::NAN, f32::NAN])];
        let c = Calibration::of(&nan, BINS);
        assert_eq!(c.bins[0].images, 1);
        assert!(c.ece.is_finite());
    }
}
