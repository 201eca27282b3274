//! 2-D convolution on the CPU as im2col + matrix products, forward and backward.
//!
//! candle's CPU backward pass computes the input gradient with a direct-loop transposed
//! convolution and the weight gradient as a convolution whose kernel is the whole output
//! map, 3-9x the cost of the forward pass. Here all three products are GEMMs:
//! y_n = W col(x_n), dW = sum_n dy_n col(x_n)^T, dx_n = col2im(W^T dy_n). Same-size 3x3
//! convolutions, most of the model, go to Winograd's algorithms instead (`winograd.rs`).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_prepared, LhsPacking, MatRef, PreparedLhs};
use super::winograd;
use super::{contiguous_f32, f32_on_cpu, threads};

/// Sizes of one convolution (square stride and padding, no dilation, one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    in_channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel_h: usize,
    kernel_w: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn new(input: &Layout, weight: &Layout, stride: usize, padding: usize) -> Result<Self> {
        let (batch, in_channels, height, width) = input.shape().dims4()?;
        let (out_channels, weight_in, kernel_h, kernel_w) = weight.shape().dims4()?;
        if weight_in != in_channels {
            candle_core::bail!(
                "conv2d: input has {in_channels} channels, weight expects {weight_in}"
            );
        }
        let out =
            |size: usize, k: usize| (size + 2 * padding).checked_sub(k).map(|v| v / stride + 1);
        let (Some(out_h), Some(out_w)) = (out(height, kernel_h), out(width, kernel_w)) else {
            candle_core::bail!(
                "conv2d: kernel {kernel_h}x{kernel_w} larger than padded input {height}x{width}"
            );
        };
        Ok(Geometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            out_h,
            out_w,
        })
    }

    /// Rows of the im2col matrix: C_in * k_h * k_w.
    fn patch(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    fn in_image(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    fn out_image(&self) -> usize {
        self.out_channels * self.out_plane()
    }

    /// A 1x1, stride 1, unpadded convolution reads its input as the im2col matrix directly.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// The Winograd shape of a same-size 3x3 convolution (stride 1, padding 1), if this is one
    /// with enough work to pay for it.
    fn winograd(&self) -> Option<winograd::Shape> {
        let same_size_3x3 =
            self.kernel_h == 3 && self.kernel_w == 3 && self.stride == 1 && self.padding == 1;
        let shape = winograd::Shape {
            batch: self.batch,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            height: self.height,
            width: self.width,
        };
        (same_size_3x3 && shape.worthwhile()).then_some(shape)
    }

    /// Output columns `ox` whose input column `ox * stride + kx - padding` is inside the image.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let first = self.padding.saturating_sub(kx).div_ceil(self.stride);
        // None: the kernel column lies right of every input column, in the padding.
        let last = (self.width + self.padding)
            .checked_sub(kx + 1)
            .map_or(0, |span| span / self.stride + 1);
        (
            first.min(self.out_w),
            last.min(self.out_w).max(first.min(self.out_w)),
        )
    }

    /// Fills `col` (patch x out_plane, row-major) from one image, its channels spread over
    /// the thread pool when `parallel`.
    fn im2col(&self, image: &[f32], col: &mut [f32], parallel: bool) {
        let rows = self.kernel_h * self.kernel_w * self.out_plane();
        let channel_size = self.height * self.width;
        let fill = |(c, dst): (usize, &mut [f32])| {
            self.im2col_channel(&image[c * channel_size..(c + 1) * channel_size], dst)
        };
        if parallel {
            col.par_chunks_mut(rows).enumerate().for_each(fill);
        } else {
            col.chunks_mut(rows).enumerate().for_each(fill);
        }
    }

    /// The k_h * k_w rows of the im2col matrix that come from one input channel.
    ///
    /// A strided convolution reads every `stride`-th input column; the channel's rows are
    /// first split into their `stride` phases (columns `r, r + stride, ...`), so that each
    /// output row is one contiguous copy instead of a gather.
    fn im2col_channel(&self, channel: &[f32], col: &mut [f32]) {
        let plane = self.out_plane();
        let s = self.stride;
        let phase_w = self.width.div_ceil(s);
        let phased: Cow<[f32]> = if s == 1 {
            Cow::Borrowed(channel)
        } else {
            let mut phased = vec![0.0; self.height * s * phase_w];
            for (src, dst) in channel
                .chunks_exact(self.width)
                .zip(phased.chunks_exact_mut(s * phase_w))
            {
                for (r, phase) in dst.chunks_exact_mut(phase_w).enumerate() {
                    for (d, v) in phase.iter_mut().zip(src.iter().skip(r).step_by(s)) {
                        *d = *v;
                    }
                }
            }
            Cow::Owned(phased)
        };
        for ky in 0..self.kernel_h {
            for kx in 0..self.kernel_w {
                let row = ky * self.kernel_w + kx;
                let dst = &mut col[row * plane..(row + 1) * plane];
                let (first, last) = self.valid_columns(kx);
                for oy in 0..self.out_h {
                    let out_row = &mut dst[oy * self.out_w..(oy + 1) * self.out_w];
                    let iy = (oy * s + ky) as isize - self.padding as isize;
                    if iy < 0 || iy >= self.height as isize {
                        out_row.fill(0.0);
                        continue;
                    }
                    out_row[..first].fill(0.0);
                    out_row[last..].fill(0.0);
                    if first == last {
                        continue;
                    }
                    let ix0 = first * s + kx - self.padding;
                    let src = &phased[(iy as usize * s + ix0 % s) * phase_w..][..phase_w];
                    let start = ix0 / s;
                    out_row[first..last].copy_from_slice(&src[start..start + (last - first)]);
                }
            }
        }
    }

    /// Adds `col` (patch x out_plane) back onto one image gradient: the adjoint of im2col.
    fn col2im(&self, col: &[f32], image: &mut [f32]) {
        let plane = self.out_plane();
        image.fill(0.0);
        for c in 0..self.in_channels {
            let channel =
                &mut image[c * self.height * self.width..(c + 1) * self.height * self.width];
            for ky in 0..self.kernel_h {
                for kx in 0..self.kernel_w {
                    let row = (c * self.kernel_h + ky) * self.kernel_w + kx;
                    let src = &col[row * plane..(row + 1) * plane];
                    let (first, last) = self.valid_columns(kx);
                    for oy in 0..self.out_h {
                        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                        if iy < 0 || iy >= self.height as isize || first == last {
                            continue;
                        }
                        let dst =
                            &mut channel[iy as usize * self.width..(iy as usize + 1) * self.width];
                        let from = &src[oy * self.out_w + first..oy * self.out_w + last];
                        let ix0 = first * self.stride + kx - self.padding;
                        if self.stride == 1 {
                            let to = &mut dst[ix0..ix0 + from.len()];
                            to.iter_mut().zip(from).for_each(|(d, v)| *d += v);
                        } else {
                            for (o, v) in from.iter().enumerate() {
                                dst[ix0 + o * self.stride] += v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The im2col matrix of image `n`, borrowed when the convolution is pointwise; built by
    /// the thread pool when the product that reads it gets more than one thread.
    fn columns<'a>(
        &self,
        input: &'a [f32],
        n: usize,
        scratch: &'a mut Vec<f32>,
        threads: usize,
    ) -> &'a [f32] {
        let image = &input[n * self.in_image()..(n + 1) * self.in_image()];
        if self.is_pointwise() {
            return image;
        }
        scratch.resize(self.patch() * self.out_plane(), 0.0);
        self.im2col(image, scratch, threads > 1);
        scratch
    }
}

thread_local! {
    /// Each thread's column buffer, kept between images and calls: allocating megabytes per
    /// image costs page faults that rival the products themselves.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's column buffer. The buffer is taken out of its cell meanwhile,
/// so a nested call (rayon may run another image's work on this thread while it waits)
/// gets a fresh one instead of a conflicting borrow.
fn with_columns<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buffer = COLUMNS.take();
    let result = f(&mut buffer);
    COLUMNS.set(buffer);
    result
}

/// Runs `per_image` for every image: in parallel across images when there are enough of
/// them, else one image at a time with the thread pool inside the matrix products.
fn for_each_image(
    geometry: &Geometry,
    out: &mut [f32],
    chunk: usize,
    per_image: impl Fn(usize, &mut [f32], usize) + Sync,
) {
    let threads = threads();
    if geometry.batch >= threads {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(n, dst)| per_image(n, dst, 1));
    } else {
        for (n, dst) in out.chunks_mut(chunk).enumerate() {
            per_image(n, dst, threads);
        }
    }
}

/// A per-output-channel scale and shift and optional ReLU applied to each image's output
/// while it is still in cache: an evaluation-mode batch norm fused into the convolution.
/// Scaling the output rather than the weights spares a copy of every weight per call.
#[derive(Debug, Clone)]
struct Epilogue {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl Epilogue {
    fn apply(&self, image: &mut [f32], plane: usize) {
        for (k, channel) in image.chunks_mut(plane).enumerate() {
            self.apply_channel(k, channel);
        }
    }

    fn apply_channel(&self, k: usize, channel: &mut [f32]) {
        let (scale, shift) = (self.scale[k], self.shift[k]);
        if self.relu {
            channel
                .iter_mut()
                .for_each(|v| *v = (*v * scale + shift).max(0.0));
        } else {
            channel.iter_mut().for_each(|v| *v = *v * scale + shift);
        }
    }
}

/// What inference derives from a convolution's weights, kept from call to call while they
/// are frozen: the weights packed for the products (bfloat16 products) or moved into
/// Winograd's transform domain, each made at its first use. For weights that never change
/// (the layers keep one for weights that are not candle variables).
#[derive(Default)]
pub struct FrozenConv {
    im2col: OnceLock<LhsPacking>,
    winograd: OnceLock<winograd::Weights>,
}

impl std::fmt::Debug for FrozenConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenConv")
            .field("im2col", &self.im2col.get().is_some())
            .field("winograd", &self.winograd.get().is_some())
            .finish()
    }
}

fn forward(
    g: &Geometry,
    input: &[f32],
    weight: &[f32],
    epilogue: Option<&Epilogue>,
    frozen: Option<&FrozenConv>,
) -> Vec<f32> {
    if let Some(shape) = g.winograd() {
        let transform = || winograd::Weights::new(weight, g.out_channels, g.in_channels, false);
        let transformed;
        let weights = match frozen {
            Some(frozen) => frozen.winograd.get_or_init(transform),
            None => {
                transformed = transform();
                &transformed
            }
        };
        return winograd::conv3x3(&shape, input, weights, |k, plane| {
            if let Some(epilogue) = epilogue {
                epilogue.apply_channel(k, plane);
            }
        });
    }
    let mut out = vec![0.0; g.batch * g.out_image()];
    let view = MatRef::row_major(weight, g.out_channels, g.patch());
    let packed;
    let packing = match frozen {
        Some(frozen) => frozen.im2col.get_or_init(|| LhsPacking::new(view)),
        None => {
            packed = LhsPacking::new(view);
            &packed
        }
    };
    let w = PreparedLhs::new(view, packing);
    for_each_image(g, &mut out, g.out_image(), |n, dst, threads| {
        with_columns(|scratch| {
            let col = g.columns(input, n, scratch, threads);
            matmul_prepared(
                dst,
                &w,
                MatRef::row_major(col, g.patch(), g.out_plane()),
                false,
                threads,
            );
        });
        if let Some(epilogue) = epilogue {
            epilogue.apply(dst, g.out_plane());
        }
    });
    out
}

fn weight_grad(g: &Geometry, input: &[f32], grad_out: &[f32]) -> Vec<f32> {
    if let Some(shape) = g.winograd() {
        return winograd::weight_grad3x3(&shape, input, grad_out);
    }
    let size = g.out_channels * g.patch();
    let accumulate = |mut acc: Vec<f32>, n: usize, threads: usize| {
        with_columns(|scratch| {
            let col = g.columns(input, n, scratch, threads);
            let dy = &grad_out[n * g.out_image()..(n + 1) * g.out_image()];
            let dy = MatRef::row_major(dy, g.out_channels, g.out_plane());
            matmul(
                &mut acc,
                dy,
                MatRef::row_major(col, g.patch(), g.out_plane()).t(),
                true,
                threads,
            );
        });
        acc
    };
    let threads = threads();
    if g.batch >= threads {
        // One fixed run of images per thread, the runs' sums added in order: the result does
        // not depend on how rayon shares out the work (its fold + reduce did), so a training
        // run repeats exactly.
        let per_run = g.batch.div_ceil(threads);
        let runs: Vec<Vec<f32>> = (0..g.batch.div_ceil(per_run))
            .into_par_iter()
            .map(|run| {
                let images = run * per_run..((run + 1) * per_run).min(g.batch);
                images.fold(vec![0.0; size], |acc, n| accumulate(acc, n, 1))
            })
            .collect();
        let mut runs = runs.into_iter();
        let mut total = runs.next().unwrap_or_else(|| vec![0.0; size]);
        for run in runs {
            total.iter_mut().zip(&run).for_each(|(t, r)| *t += r);
        }
        total
    } else {
        (0..g.batch).fold(vec![0.0; size], |acc, n| accumulate(acc, n, threads))
    }
}

fn input_grad(g: &Geometry, grad_out: &[f32], weight: &[f32]) -> Vec<f32> {
    // The input gradient of a same-size 3x3 convolution is another one, with the kernels
    // rotated and the channels swapped.
    if let Some(shape) = g.winograd() {
        let shape = winograd::Shape {
            in_channels: g.out_channels,
            out_channels: g.in_channels,
            ..shape
        };
        let weights = winograd::Weights::new(weight, g.out_channels, g.in_channels, true);
        return winograd::conv3x3(&shape, grad_out, &weights, |_, _| {});
    }
    let mut out = vec![0.0; g.batch * g.in_image()];
    let view = MatRef::row_major(weight, g.out_channels, g.patch()).t();
    let packing = LhsPacking::new(view);
    let w_t = PreparedLhs::new(view, &packing);
    for_each_image(g, &mut out, g.in_image(), |n, dst, threads| {
        let dy = &grad_out[n * g.out_image()..(n + 1) * g.out_image()];
        let dy = MatRef::row_major(dy, g.out_channels, g.out_plane());
        if g.is_pointwise() {
            matmul_prepared(dst, &w_t, dy, false, threads);
        } else {
            with_columns(|col| {
                // Every element is overwritten by the product.
                col.resize(g.patch() * g.out_plane(), 0.0);
                matmul_prepared(col, &w_t, dy, false, threads);
                g.col2im(col, dst);
            });
        }
    });
    out
}

/// The forward op: (input, weight) -> output.
struct Conv2d {
    stride: usize,
    padding: usize,
    /// Only for inference: an op with an epilogue has no backward pass.
    epilogue: Option<Epilogue>,
    /// Only for inference with frozen weights.
    frozen: Option<Arc<FrozenConv>>,
}

/// dL/dW from (input, dL/dy).
struct Conv2dWeightGrad {
    stride: usize,
    padding: usize,
    weight_shape: Shape,
}

/// dL/dx from (dL/dy, weight).
struct Conv2dInputGrad {
    stride: usize,
    padding: usize,
    input_shape: Shape,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "vt-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1, l2, self.stride, self.padding)?;
        let out = forward(
            &g,
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            self.epilogue.as_ref(),
            self.frozen.as_deref(),
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.out_channels, g.out_h, g.out_w)),
        ))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.epilogue.is_some() {
            candle_core::bail!("a convolution with a folded batch norm is for inference only");
        }
        let grad = grad.contiguous()?;
        let grad_weight = input.apply_op2_no_bwd(
            &grad,
            &Conv2dWeightGrad {
                stride: self.stride,
                padding: self.padding,
                weight_shape: weight.shape().clone(),
            },
        )?;
        // The first convolution's input is the image batch, which needs no gradient.
        let grad_input = if input.track_op() {
            Some(grad.apply_op2_no_bwd(
                weight,
                &Conv2dInputGrad {
                    stride: self.stride,
                    padding: self.padding,
                    input_shape: input.shape().clone(),
                },
            )?)
        } else {
            None
        };
        Ok((grad_input, Some(grad_weight)))
    }
}

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "vt-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let weight_layout = Layout::contiguous(self.weight_shape.clone());
        let g = Geometry::new(l1, &weight_layout, self.stride, self.padding)?;
        if l2.shape().dims() != [g.batch, g.out_channels, g.out_h, g.out_w] {
            candle_core::bail!(
                "conv2d weight grad: output gradient has shape {:?}",
                l2.shape()
            );
        }
        let out = weight_grad(&g, contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        Ok((CpuStorage::F32(out), self.weight_shape.clone()))
    }
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "vt-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input_layout = Layout::contiguous(self.input_shape.clone());
        let g = Geometry::new(&input_layout, l2, self.stride, self.padding)?;
        if l1.shape().dims() != [g.batch, g.out_channels, g.out_h, g.out_w] {
            candle_core::bail!(
                "conv2d input grad: output gradient has shape {:?}",
                l1.shape()
            );
        }
        let out = input_grad(&g, contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        Ok((CpuStorage::F32(out), self.input_shape.clone()))
    }
}

/// A bias-free convolution (square stride and padding): this module's GEMM kernels for f32
/// tensors on the CPU, cuDNN on CUDA devices when built with the `cudnn` feature, candle's
/// own convolution elsewhere.
pub fn conv2d(input: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if f32_on_cpu(&[input, weight]) {
        input.contiguous()?.apply_op2(
            &weight.contiguous()?,
            Conv2d {
                stride,
                padding,
                epilogue: None,
                frozen: None,
            },
        )
    } else {
        other_device_conv2d(input, weight, stride, padding)
    }
}

fn other_device_conv2d(
    input: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if input.device().is_cuda() {
        return super::cudnn_conv::conv2d(input, weight, stride, padding);
    }
    input.conv2d(weight, padding, stride, 1, 1)
}

/// A per-output-channel `x * scale + shift` (an evaluation-mode batch norm), its values
/// read out once for the CPU kernels.
#[derive(Debug)]
pub struct ChannelAffine {
    scale: Tensor,
    shift: Tensor,
    values: Option<(Vec<f32>, Vec<f32>)>,
}

impl ChannelAffine {
    /// `scale` and `shift` hold one value per output channel.
    pub fn new(scale: Tensor, shift: Tensor) -> Result<Self> {
        let values = if f32_on_cpu(&[&scale, &shift]) {
            Some((scale.to_vec1()?, shift.to_vec1()?))
        } else {
            None
        };
        Ok(ChannelAffine {
            scale,
            shift,
            values,
        })
    }
}

/// `conv2d(input, weight) * scale + shift` per output channel, then ReLU when `relu`: an
/// evaluation-mode convolution and batch norm in one pass, for inference (on the CPU it has
/// no backward pass). With `frozen`, what the call derives from the weights is kept there
/// for the next one: the caller guarantees the weights never change.
pub fn conv2d_affine(
    input: &Tensor,
    weight: &Tensor,
    affine: &ChannelAffine,
    relu: bool,
    stride: usize,
    padding: usize,
    frozen: Option<&Arc<FrozenConv>>,
) -> Result<Tensor> {
    let cpu_values = affine
        .values
        .as_ref()
        .filter(|_| f32_on_cpu(&[input, weight]));
    if let Some((scale, shift)) = cpu_values {
        return input.contiguous()?.apply_op2(
            &weight.contiguous()?,
            Conv2d {
                stride,
                padding,
                epilogue: Some(Epilogue {
                    scale: scale.clone(),
                    shift: shift.clone(),
                    relu,
                }),
                frozen: frozen.cloned(),
            },
        );
    }
    let (scale, shift) = (&affine.scale, &affine.shift);
    #[cfg(feature = "cuda")]
    if input.device().is_cuda() && super::FLOAT_DTYPES.contains(&input.dtype()) {
        let y = other_device_conv2d(input, weight, stride, padding)?;
        return super::cuda::channel_affine(&y, scale, shift, relu);
    }
    let folded = weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
    let y = other_device_conv2d(input, &folded, stride, padding)?
        .broadcast_add(&shift.reshape((1, (), 1, 1))?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_rel;
    use candle_core::{Device, Var};

    /// Forward and both gradients against candle's reference convolution.
    fn check(input: [usize; 4], c_out: usize, k: usize, stride: usize, padding: usize) {
        let [batch, c_in, h, w] = input;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, c_in, h, w), &dev).unwrap())
            .unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).unwrap())
            .unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, padding).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)
            .unwrap();
        let case = format!("n{batch} c{c_in} {h}x{w} -> c{c_out} k{k} s{stride} p{padding}");
        assert_eq!(ours.dims(), reference.dims(), "{case}");
        assert!(max_rel(&ours, &reference) < 1e-5, "{case}: forward");

        let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g_ours = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("input", &x), ("weight", &wt)] {
            let a = g_ours.get(var.as_tensor()).unwrap();
            let b = g_ref.get(var.as_tensor()).unwrap();
            assert!(max_rel(a, b) < 1e-4, "{case}: {name} gradient");
        }
    }

    #[test]
    fn matches_candle_on_the_stem_shapes_and_odd_ones() {
        // candle's reference backward derives the output padding of a strided convolution
        // from the height alone, so height and width share their parity in strided cases.
        check([2, 3, 19, 17], 8, 7, 2, 3); // conv1, odd sizes
        check([3, 4, 9, 6], 5, 3, 1, 1); // 3x3 stride 1, non-square
        check([2, 3, 23, 22], 4, 3, 1, 1); // 3x3 stride 1 with enough tiles for Winograd
        check([2, 4, 10, 8], 6, 3, 2, 1); // 3x3 stride 2, even
        check([2, 4, 9, 11], 6, 3, 2, 1); // 3x3 stride 2, odd
        check([2, 4, 9, 9], 6, 1, 2, 0); // downsample 1x1 stride 2
        check([2, 5, 6, 6], 3, 1, 1, 0); // pointwise
        check([1, 3, 8, 8], 4, 3, 1, 1); // batch 1: parallel inside the products
        check([1, 2, 3, 3], 2, 3, 2, 1); // tiny map
        check([2, 3, 1, 1], 4, 3, 2, 1); // one pixel: kernel columns fall in the padding
        check([2, 3, 2, 1], 4, 3, 1, 1);
        // The stem on images smaller than its kernel (sizes whose gradient candle's
        // transposed convolution, the reference, gets right).
        check([1, 3, 1, 1], 4, 7, 2, 3);
        check([1, 3, 3, 3], 4, 7, 2, 3);
    }

    /// The weight gradient sums over the batch in parallel: the sum must not depend on how
    /// the work was shared between threads, or training runs could not be repeated.
    #[test]
    fn the_weight_gradient_is_the_same_every_time() {
        let dev = Device::Cpu;
        // Strided: not Winograd's path. Many images, so that every thread gets several.
        let x = Tensor::randn(0f32, 1.0, (37, 8, 15, 15), &dev).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, 8, 3, 3), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (37, 16, 8, 8), &dev).unwrap();
        let weight_grad = || {
            let y = conv2d(&x, wt.as_tensor(), 2, 1).unwrap();
            let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = grads.get(wt.as_tensor()).unwrap();
            grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let first = weight_grad();
        for run in 1..40 {
            assert!(weight_grad() == first, "run {run} differs from the first");
        }
    }

    #[test]
    fn folded_affine_matches_convolution_then_affine() {
        let dev = Device::Cpu;
        for (input, c_out, k, stride, padding) in [
            ([2, 3, 11, 9], 4, 3, 2, 1),
            ([1, 5, 6, 6], 3, 1, 1, 0),
            ([3, 4, 8, 8], 6, 7, 2, 3),
            ([2, 4, 23, 22], 6, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, &input, &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (c_out, input[1], k, k), &dev).unwrap();
            let scale = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let shift = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let per_channel = |t: &Tensor| t.reshape((1, c_out, 1, 1)).unwrap();
            let affine = conv2d(&x, &w, stride, padding)
                .unwrap()
                .broadcast_mul(&per_channel(&scale))
                .unwrap()
                .broadcast_add(&per_channel(&shift))
                .unwrap();
            let channel_affine = ChannelAffine::new(scale, shift).unwrap();
            let frozen = Arc::new(FrozenConv::default());
            for (relu, frozen) in [
                (false, None),
                (true, None),
                (false, Some(&frozen)),
                (true, Some(&frozen)),
            ] {
                let ours =
                    conv2d_affine(&x, &w, &channel_affine, relu, stride, padding, frozen).unwrap();
                let reference = if relu {
                    affine.relu().unwrap()
                } else {
                    affine.clone()
                };
                assert!(
                    max_rel(&ours, &reference) < 1e-5,
                    "{input:?} k{k} s{stride} relu {relu}"
                );
            }
        }
    }
}
