//! Stochastic depth (Huang et al. 2016; timm's `--drop-path`), for training only: each
//! sample skips each residual branch with its block's probability p, and the branches it
//! keeps are scaled by 1 / (1 - p), so that a branch's expected output is unchanged and
//! evaluation (which keeps every branch whole) computes the contract's model as it is.
//!
//! The blocks are the stem's BasicBlocks, then the VT modules (whose transformer has two
//! residual branches, attention and feed-forward, dropped independently). The probability
//! rises linearly with depth, from 0 at the first block to the rate at the last, as timm's
//! ResNet spreads its `drop_path_rate` over its blocks.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::VtConfig;

/// The factor of each residual branch for each sample of one batch: 0 (dropped) or
/// 1 / (1 - p). `None` where a block's probability is 0.
#[derive(Debug, Clone)]
pub struct PathDrops {
    /// One N x 1 x 1 x 1 factor per stem block, in the order the blocks run.
    pub(crate) stem: Vec<Option<Tensor>>,
    /// The N x 1 x 1 factors of each VT module's attention and feed-forward branches.
    pub(crate) vt: Vec<[Option<Tensor>; 2]>,
}

impl PathDrops {
    /// Draws the branches of a batch of `batch` samples at the deepest block's drop
    /// probability `rate` (in [0, 1)), taking uniform numbers in [0, 1) from `uniform`, one
    /// per sample and branch whose probability is above 0.
    pub fn draw(
        rate: f64,
        config: &VtConfig,
        batch: usize,
        (device, dtype): (&Device, DType),
        mut uniform: impl FnMut() -> f64,
    ) -> Result<PathDrops> {
        if !(0.0..1.0).contains(&rate) {
            candle_core::bail!("drop-path rate {rate} is not in [0, 1)");
        }
        let stem_blocks: usize = config.arch.stem_blocks().iter().sum();
        let depth = stem_blocks + config.vt_modules;
        let probability = |block: usize| rate * block as f64 / (depth - 1).max(1) as f64;
        let mut factors = |block: usize, shape: &[usize]| -> Result<Option<Tensor>> {
            let p = probability(block);
            if p == 0.0 {
                return Ok(None);
            }
            let kept = (1.0 / (1.0 - p)) as f32;
            let values: Vec<f32> = (0..batch)
                .map(|_| if uniform() < p { 0.0 } else { kept })
                .collect();
            Tensor::from_vec(values, shape, device)?
                .to_dtype(dtype)
                .map(Some)
        };
        let stem = (0..stem_blocks)
            .map(|block| factors(block, &[batch, 1, 1, 1]))
            .collect::<Result<Vec<_>>>()?;
        let vt = (stem_blocks..depth)
            .map(|block| {
                Ok([
                    factors(block, &[batch, 1, 1])?,
                    factors(block, &[batch, 1, 1])?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PathDrops { stem, vt })
    }
}

/// `branch` scaled by its per-sample `factor`, or as it is.
pub(crate) fn scaled(branch: Tensor, factor: Option<&Tensor>) -> Result<Tensor> {
    match factor {
        Some(factor) => branch.broadcast_mul(factor),
        None => Ok(branch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    fn config(arch: Arch) -> VtConfig {
        VtConfig::new(arch, 3, 32)
    }

    fn values(factor: &Option<Tensor>) -> Option<Vec<f32>> {
        factor
            .as_ref()
            .map(|f| f.flatten_all().unwrap().to_vec1().unwrap())
    }

    /// timm's linear rule over 6 stem blocks and 2 VT modules: 0 at the first block, the
    /// rate at the last; each factor 0 or 1 / (1 - p).
    #[test]
    fn the_probability_rises_linearly_to_the_last_block() {
        let config = config(Arch::VtResNet18);
        let mut draws = (0..).map(|i| f64::from(i % 10) / 10.0 + 0.05);
        let drops = PathDrops::draw(0.35, &config, 10, (&Device::Cpu, DType::F32), || {
            draws.next().unwrap_or(0.5)
        })
        .unwrap();
        assert_eq!((drops.stem.len(), drops.vt.len()), (6, 2));
        assert!(drops.stem[0].is_none());
        for block in 1..8 {
            let p = 0.35 * block as f64 / 7.0;
            let factors = if block < 6 {
                vec![values(&drops.stem[block])]
            } else {
                drops.vt[block - 6].iter().map(values).collect()
            };
            for factor in factors {
                let factor = factor.unwrap();
                // Ten evenly spread draws: the share below p is dropped.
                let dropped = factor.iter().filter(|f| **f == 0.0).count();
                let below = (0..10).filter(|k| f64::from(*k) / 10.0 + 0.05 < p).count();
                assert_eq!(dropped, below, "block {block}");
                let kept = (1.0 / (1.0 - p)) as f32;
                assert!(
                    factor.iter().all(|f| *f == 0.0 || *f == kept),
                    "block {block}"
                );
            }
        }
    }

    #[test]
    fn a_zero_rate_drops_nothing_and_rates_past_one_fail() {
        let config = config(Arch::VtResNet34);
        let drops = PathDrops::draw(0.0, &config, 4, (&Device::Cpu, DType::F32), || 0.0).unwrap();
        assert_eq!((drops.stem.len(), drops.vt.len()), (13, 3));
        assert!(drops.stem.iter().all(Option::is_none));
        assert!(drops.vt.iter().flatten().all(Option::is_none));
        for bad in [1.0, -0.1, f64::NAN] {
            assert!(PathDrops::draw(bad, &config, 4, (&Device::Cpu, DType::F32), || 0.0).is_err());
        }
    }
}
