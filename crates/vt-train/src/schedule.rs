//! Learning-rate schedules, evaluated from the global optimiser step so that a resumed run
//! continues on exactly the same curve.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// What follows the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Decay {
    /// PyTorch's `StepLR` stepped once per epoch: `lr * gamma^floor(epoch / every_epochs)`.
    Step { every_epochs: usize, gamma: f64 },
    /// Half a cosine from `lr` down to `min_lr` over the steps after the warmup.
    Cosine { min_lr: f64 },
}

/// As the logs name it: "step x0.1 every 7 epochs", "cosine to 1e-6".
impl std::fmt::Display for Decay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Decay::Step {
                every_epochs,
                gamma,
            } => write!(
                f,
                "step x{gamma} every {every_epochs} epoch{}",
                if every_epochs == 1 { "" } else { "s" }
            ),
            Decay::Cosine { min_lr } => write!(f, "cosine to {min_lr:e}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub decay: Decay,
    /// Steps of linear warmup from `base_lr / warmup_steps` up to `base_lr`.
    pub warmup_steps: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Step {
                every_epochs,
                gamma,
            } => {
                let epoch = step / self.steps_per_epoch.max(1);
                let drops = epoch / every_epochs.max(1) as u64;
                self.base_lr * gamma.powi(i32::try_from(drops).unwrap_or(i32::MAX))
            }
            Decay::Cosine { min_lr } => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                min_lr + (self.base_lr - min_lr) * 0.5 * (1.0 + (PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn step_decay_drops_by_gamma_every_seven_epochs() {
        let s = LrSchedule {
            base_lr: 0.01,
            decay: Decay::Step {
                every_epochs: 7,
                gamma: 0.1,
            },
            warmup_steps: 0,
            steps_per_epoch: 10,
            total_steps: 250,
        };
        for (step, lr) in [
            (0, 0.01),
            (69, 0.01),
            (70, 0.001),
            (139, 0.001),
            (140, 1e-4),
            (249, 1e-5),
        ] {
            assert!(close(s.lr(step), lr), "step {step}: {} != {lr}", s.lr(step));
        }
    }

    #[test]
    fn warmup_is_linear_then_cosine_reaches_min_lr() {
        let s = LrSchedule {
            base_lr: 1e-3,
            decay: Decay::Cosine { min_lr: 1e-5 },
            warmup_steps: 4,
            steps_per_epoch: 4,
            total_steps: 104,
        };
        for step in 0..4 {
            assert!(close(s.lr(step), 1e-3 * (step + 1) as f64 / 4.0));
        }
        assert!(close(s.lr(4), 1e-3));
        // Half-way through the 100 cosine steps the rate is the mean of both ends.
        assert!(close(s.lr(54), (1e-3 + 1e-5) / 2.0));
        let t = 99.0 / 100.0;
        assert!(close(
            s.lr(103),
            1e-5 + (1e-3 - 1e-5) * 0.5 * (1.0 + (PI * t).cos())
        ));
        assert!(close(s.lr(500), 1e-5));
        let lrs: Vec<f64> = (4..104).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "cosine must decrease");
    }

    #[test]
    fn warmup_also_precedes_step_decay() {
        let s = LrSchedule {
            base_lr: 0.01,
            decay: Decay::Step {
                every_epochs: 1,
                gamma: 0.5,
            },
            warmup_steps: 2,
            steps_per_epoch: 2,
            total_steps: 6,
        };
        let lrs: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        let expected = [0.005, 0.01, 0.005, 0.005, 0.0025, 0.0025];
        assert!(
            lrs.iter().zip(expected).all(|(a, b)| close(*a, b)),
            "{lrs:?}"
        );
    }
}
