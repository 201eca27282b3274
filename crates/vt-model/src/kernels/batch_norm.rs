//! Batch normalisation over (N, C, spatial...) with an optional fused ReLU: the per-channel
//! moments of a batch, and the normalisation with its backward pass.
//!
//! candle_nn's BatchNorm transposes the input to channel-major, copies it, normalises in
//! five broadcast passes, transposes back (so the next convolution copies again) and
//! differentiates all of that through autograd. Here the moments read the input twice, the
//! normalisation reads it once and writes once, and the backward pass reads input and
//! gradient twice and writes once.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::{contiguous_f32, fused};

/// The mean and biased variance of each channel over batch and spatial positions, as a
/// (2, C) tensor. Not differentiated by the fused kernels: [`batch_norm`] accounts for it
/// in its backward pass.
pub fn channel_moments(x: &Tensor) -> Result<Tensor> {
    if fused(&[x], &[DType::F32]) {
        x.contiguous()?.apply_op1_no_bwd(&Moments)
    } else {
        composite_moments(x)
    }
}

/// Training-mode batch norm: `gamma * (x - mean) / sqrt(var + eps) + beta`, then ReLU when
/// `relu`, per channel, where `moments` (2, C: mean and variance) are [`channel_moments`]
/// of `x` itself, so that the gradient flows through them too. `affine` is (2, C): gamma
/// and beta. (Evaluation-mode batch norm is folded into the convolution before it.)
pub fn batch_norm(
    x: &Tensor,
    moments: &Tensor,
    affine: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    if fused(&[x, moments, affine], &[DType::F32]) {
        x.contiguous()?.apply_op3(
            &moments.contiguous()?,
            &affine.contiguous()?,
            Normalize { eps, relu },
        )
    } else {
        composite_batch_norm(x, moments, affine, eps, relu)
    }
}

/// candle's own operations, for other devices and dtypes; autograd differentiates them.
fn composite_moments(x: &Tensor) -> Result<Tensor> {
    let by_channel = x.transpose(0, 1)?.flatten_from(1)?;
    let mean = by_channel.mean_keepdim(1)?;
    let var = by_channel.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
    Tensor::cat(&[mean.t()?, var.t()?], 0)
}

fn composite_batch_norm(
    x: &Tensor,
    moments: &Tensor,
    affine: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let mut per_channel = vec![1; x.rank()];
    per_channel[1] = x.dim(1)?;
    let row = |t: &Tensor, i: usize| t.get(i)?.reshape(per_channel.as_slice());
    let scale = row(affine, 0)?.broadcast_div(&(row(moments, 1)? + eps)?.sqrt()?)?;
    let shift = (row(affine, 1)? - row(moments, 0)?.broadcast_mul(&scale)?)?;
    let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// (batch, channels, positions per channel and image) of an (N, C, ...) shape.
fn channel_dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("batch norm needs an (N, C, ...) input, got {shape:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Per-plane work items of at least this many values, so that small planes do not cost a
/// task each.
fn min_planes_per_task(plane: usize) -> usize {
    (16 * 1024 / plane.max(1)).max(1)
}

/// Sum of `f` over a slice in eight independent lanes, so that the loop vectorises.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Over one plane of the input `x` and of the output gradient `dy`: the sums of g and of
/// g * x_hat, where g is dy, or 0 where the fused ReLU clipped. In eight independent lanes
/// with the mask as a select, so that the loop vectorises (as a closure returning pairs it
/// compiled to a branch per lane: 5 % of a training step).
fn gradient_sums(x: &[f32], dy: &[f32], ch: &Channel, relu: bool) -> (f32, f32) {
    let term = |v: f32, g: f32| {
        let g = if !relu || v * ch.scale + ch.shift > 0.0 {
            g
        } else {
            0.0
        };
        (g, g * (v - ch.mean) * ch.inv_std)
    };
    let (mut sum_g, mut sum_gx) = ([0f32; 8], [0f32; 8]);
    let (xs, gs) = (x.chunks_exact(8), dy.chunks_exact(8));
    let mut rest = (0f32, 0f32);
    for (&v, &g) in xs.remainder().iter().zip(gs.remainder()) {
        let (g, gx) = term(v, g);
        rest = (rest.0 + g, rest.1 + gx);
    }
    for (xc, gc) in xs.zip(gs) {
        let terms: [(f32, f32); 8] = std::array::from_fn(|i| term(xc[i], gc[i]));
        for i in 0..8 {
            sum_g[i] += terms[i].0;
            sum_gx[i] += terms[i].1;
        }
    }
    (
        sum_g.iter().sum::<f32>() + rest.0,
        sum_gx.iter().sum::<f32>() + rest.1,
    )
}

/// The planes of one channel across the batch.
fn channel_planes(
    data: &[f32],
    (batch, channels, plane): (usize, usize, usize),
    channel: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..batch).map(move |n| &data[(n * channels + channel) * plane..][..plane])
}

struct Moments;

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "vt-batch-norm-moments"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let dims @ (batch, channels, plane) = channel_dims(layout.shape())?;
        let count = (batch * plane) as f64;
        // Two passes (mean, then squared deviations) keep the variance exact when the mean
        // is large; partial sums are f32 per plane and f64 across planes.
        let moments: Vec<(f32, f32)> = (0..channels)
            .into_par_iter()
            .map(|c| {
                let mean = channel_planes(x, dims, c)
                    .map(|p| f64::from(lane_sum(p, |v| v)))
                    .sum::<f64>()
                    / count;
                let m = mean as f32;
                let var = channel_planes(x, dims, c)
                    .map(|p| f64::from(lane_sum(p, |v| (v - m) * (v - m))))
                    .sum::<f64>()
                    / count;
                (m, var as f32)
            })
            .collect();
        let out = moments
            .iter()
            .map(|m| m.0)
            .chain(moments.iter().map(|m| m.1))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((2, channels))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        super::cuda::moments(storage, layout)
    }
}

/// Per-channel constants of a normalisation.
#[derive(Debug, Clone)]
struct Channel {
    mean: f32,
    inv_std: f32,
    gamma: f32,
    /// `gamma * inv_std` and `beta - mean * scale`: y = x * scale + shift.
    scale: f32,
    shift: f32,
}

fn channels(moments: &[f32], affine: &[f32], eps: f64) -> Result<Vec<Channel>> {
    let c = moments.len() / 2;
    if moments.len() != 2 * c || affine.len() != 2 * c {
        candle_core::bail!(
            "batch norm: moments ({}) and affine ({}) must both be (2, C)",
            moments.len(),
            affine.len()
        );
    }
    Ok((0..c)
        .map(|i| {
            let (mean, var, gamma, beta) = (moments[i], moments[c + i], affine[i], affine[c + i]);
            let inv_std = (1.0 / (f64::from(var) + eps).sqrt()) as f32;
            let scale = gamma * inv_std;
            Channel {
                mean,
                inv_std,
                gamma,
                scale,
                shift: beta - mean * scale,
            }
        })
        .collect())
}

struct Normalize {
    eps: f64,
    relu: bool,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "vt-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let (_, c, plane) = channel_dims(l1.shape())?;
        let per_channel = channels(contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?, self.eps)?;
        if per_channel.len() != c {
            candle_core::bail!(
                "batch norm: {c} channels but statistics for {}",
                per_channel.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)))
            .enumerate()
            .with_min_len(min_planes_per_task(plane))
            .for_each(|(i, (dst, src))| {
                let Channel { scale, shift, .. } = per_channel[i % c];
                if self.relu {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, &v)| *d = (v * scale + shift).max(0.0));
                } else {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, &v)| *d = v * scale + shift);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        super::cuda::batch_norm((s1, l1), (s2, l2), (s3, l3), self.eps, self.relu)
    }

    fn bwd(
        &self,
        x: &Tensor,
        moments: &Tensor,
        affine: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = moments.dim(1)?;
        // One (4, C) operand, so that the statistics stay on the tensors' device.
        let stats = Tensor::cat(&[moments, affine], 0)?;
        let both = x.apply_op3_no_bwd(
            &grad.contiguous()?,
            &stats,
            &NormalizeGrad {
                eps: self.eps,
                relu: self.relu,
            },
        )?;
        let numel = x.elem_count();
        let grad_x = both.narrow(0, 0, numel)?.reshape(x.shape())?;
        let grad_affine = both.narrow(0, numel, 2 * c)?.reshape((2, c))?;
        Ok((Some(grad_x), None, Some(grad_affine)))
    }
}

/// The gradients of [`Normalize`] from (x, dL/dy, (4, C): mean, variance, gamma, beta):
/// dL/dx and then dL/dgamma, dL/dbeta, concatenated flat (a custom op has one output).
struct NormalizeGrad {
    eps: f64,
    relu: bool,
}

impl CustomOp3 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "vt-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let stats = contiguous_f32(s3, l3)?;
        let (moments, affine) = stats.split_at(stats.len() / 2);
        let per_channel = channels(moments, affine, self.eps)?;
        let dims @ (batch, c, plane) = channel_dims(l1.shape())?;
        if l2.shape() != l1.shape() || per_channel.len() != c {
            candle_core::bail!(
                "batch norm grad: input {:?}, output gradient {:?}, {} channels",
                l1.shape(),
                l2.shape(),
                per_channel.len()
            );
        }
        // The ReLU's gradient mask, recomputed exactly as the forward pass computed y.
        let relu = self.relu;
        // g, or exactly 0 where the ReLU clipped, as a bit mask: without a branch the
        // gradient loop below vectorises (its share of a training step fell from 4.7 % to
        // 1.8 %).
        let masked = |ch: &Channel, v: f32, g: f32| {
            let clipped = relu & (v * ch.scale + ch.shift <= 0.0);
            f32::from_bits(g.to_bits() & u32::from(clipped).wrapping_sub(1))
        };
        // Per channel: sum of g and of g * x_hat, i.e. dL/dbeta and dL/dgamma.
        let sums: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let k = &per_channel[ch];
                let (g, gx) = channel_planes(x, dims, ch)
                    .zip(channel_planes(dy, dims, ch))
                    .map(|(xp, gp)| {
                        let (g, gx) = gradient_sums(xp, gp, k, relu);
                        (f64::from(g), f64::from(gx))
                    })
                    .fold((0f64, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
                (g as f32, gx as f32)
            })
            .collect();
        let count = (batch * plane) as f32;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (grad_x, grad_affine) = out.split_at_mut(x.len());
        grad_x
            .par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)).zip(dy.par_chunks(plane.max(1))))
            .enumerate()
            .with_min_len(min_planes_per_task(plane))
            .for_each(|(i, (dst, (xp, gp)))| {
                let ch = i % c;
                let k = &per_channel[ch];
                let factor = k.gamma * k.inv_std;
                let (sum_g, sum_gx) = (sums[ch].0 / count, sums[ch].1 / count);
                for ((d, &v), &g) in dst.iter_mut().zip(xp).zip(gp) {
                    let x_hat = (v - k.mean) * k.inv_std;
                    *d = factor * (masked(k, v, g) - sum_g - x_hat * sum_gx);
                }
            });
        for (ch, (g, gx)) in sums.iter().enumerate() {
            grad_affine[ch] = *gx;
            grad_affine[c + ch] = *g;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        super::cuda::batch_norm_grad((s1, l1), (s2, l2), (s3, l3), self.eps, self.relu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_rel;
    use candle_core::{DType, Device, Var};

    /// Forward and gradients (input, gamma, beta) of the kernel against candle's own
    /// operations differentiated by autograd.
    fn check(shape: &[usize], relu: bool) {
        let dev = Device::Cpu;
        let c = shape[1];
        // An offset mean, so that the variance is not the mean square.
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 3.0).unwrap())
            .unwrap();
        let affine = Var::from_tensor(&Tensor::randn(0.5f32, 1.0, (2, c), &dev).unwrap()).unwrap();
        let ours = channel_moments(x.as_tensor()).unwrap();
        let reference = composite_moments(x.as_tensor()).unwrap();
        let case = format!("{shape:?} relu {relu}");
        assert!(
            max_rel(&ours, &reference.detach()) < 1e-5,
            "{case}: moments"
        );
        let y = batch_norm(x.as_tensor(), &ours, affine.as_tensor(), 1e-5, relu).unwrap();
        let y_ref = composite_batch_norm(x.as_tensor(), &reference, affine.as_tensor(), 1e-5, relu)
            .unwrap();
        assert!(max_rel(&y, &y_ref) < 1e-5, "{case}: forward");

        let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g, g_ref) = (grads(&y), grads(&y_ref));
        for (name, var) in [("input", &x), ("affine", &affine)] {
            let a = g.get(var.as_tensor()).unwrap();
            let b = g_ref.get(var.as_tensor()).unwrap();
            assert!(max_rel(a, b) < 1e-4, "{case}: {name} gradient");
        }
    }

    #[test]
    fn matches_candle_forward_and_backward() {
        for relu in [false, true] {
            check(&[4, 3, 5, 7], relu);
            check(&[2, 8, 13, 13], relu); // planes longer than the lanes
            check(&[1, 5, 3, 4], relu); // batch 1
            check(&[6, 4], relu); // no spatial dimensions
        }
    }

    #[test]
    fn normalised_batch_has_zero_mean_and_unit_variance() {
        let x = (Tensor::randn(0f32, 3.0, (8, 4, 6, 6), &Device::Cpu).unwrap() + 10.0).unwrap();
        let affine = Tensor::cat(
            &[
                Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(),
            ],
            0,
        )
        .unwrap();
        let moments = channel_moments(&x).unwrap();
        let y = batch_norm(&x, &moments, &affine, 0.0, false).unwrap();
        let m = channel_moments(&y).unwrap().to_vec2::<f32>().unwrap();
        for (mean, var) in m[0].iter().zip(&m[1]) {
            assert!(mean.abs() < 1e-5, "mean {mean}");
            assert!((var - 1.0).abs() < 1e-4, "variance {var}");
        }
    }
}
