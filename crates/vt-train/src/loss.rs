//! The training loss: cross-entropy with optional label smoothing, as PyTorch's
//! `CrossEntropyLoss(label_smoothing = s)`: the target is `(1 - s) * one_hot + s / K`, so
//! the loss is `(1 - s) * nll + s * mean_k(-log p_k)`, averaged over the batch.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// `logits`: N x K; `labels`: N (u32). Returns the scalar mean loss.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let log_probs = log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&log_probs, labels)?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = log_probs.mean(D::Minus1)?.mean_all()?.neg()?;
    (nll * (1.0 - smoothing))? + (uniform * smoothing)?
}

/// The predicted class of each row of N x K logits.
pub fn predictions(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()
}

/// How many rows of `logits` have their largest value at `labels` (u32), as a u32 scalar
/// tensor: counted where the logits are, without waiting for them.
pub fn correct_predictions(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let predicted = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    predicted.eq(labels)?.to_dtype(DType::U32)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(logits: &[[f64; 3]], labels: &[usize], s: f64) -> f64 {
        let mut total = 0.0;
        for (row, &label) in logits.iter().zip(labels) {
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            for (k, v) in row.iter().enumerate() {
                let target = if k == label { 1.0 - s } else { 0.0 } + s / 3.0;
                total -= target * (v - lse);
            }
        }
        total / labels.len() as f64
    }

    #[test]
    fn smoothing_matches_the_soft_target_formula() {
        let rows = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]];
        let labels = [0usize, 1];
        let flat: Vec<f32> = rows.iter().flatten().map(|v| *v as f32).collect();
        let logits = Tensor::from_vec(flat, (2, 3), &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        for s in [0.0, 0.1, 0.5] {
            let loss = cross_entropy(&logits, &targets, s)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let expected = reference(&rows, &labels, s);
            assert!(
                (f64::from(loss) - expected).abs() < 1e-5,
                "s={s}: {loss} vs {expected}"
            );
        }
        let plain = cross_entropy(&logits, &targets, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let smoothed = cross_entropy(&logits, &targets, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_ne!(plain, smoothed);
        assert_eq!(predictions(&logits).unwrap(), vec![0, 2]);
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let correct = correct_predictions(&logits, &labels).unwrap();
        assert_eq!(correct.to_scalar::<u32>().unwrap(), 1);
    }
}
