//! ResNet's max-pool (3x3 window, stride 2, padding 1, floor rounding), forward and backward.
//!
//! candle's own max-pool has no backward pass when the window is larger than the stride, and
//! building it from nine strided views and element-wise maxima costs nine copies each way.
//! Here each output scans its window once. Ties go to the first maximum in the window, as in
//! PyTorch, which matters after a ReLU where whole windows are zero.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::{contiguous_f32, fused, FLOAT_DTYPES};

const WINDOW: usize = 3;
const STRIDE: usize = 2;
const PADDING: usize = 1;

/// Max-pool 3x3, stride 2, padding 1 over an (N, C, H, W) tensor.
pub fn max_pool_3x3_stride2_pad1(x: &Tensor) -> Result<Tensor> {
    if fused(&[x], &FLOAT_DTYPES) {
        x.contiguous()?.apply_op1(MaxPool)
    } else {
        composite(x)
    }
}

/// Output size along one dimension.
fn pooled(size: usize) -> usize {
    (size + 2 * PADDING - WINDOW) / STRIDE + 1
}

/// The input position of the window maximum `max` of output (oy, ox) of a plane: the first
/// one in row-major order, or the last NaN when `max` is NaN (PyTorch's choices). Knowing
/// the value makes the scan a run of independent comparisons, free of mispredicted branches.
fn argmax(plane: &[f32], (h, w): (usize, usize), (oy, ox): (usize, usize), max: f32) -> usize {
    let rows = (oy * STRIDE).saturating_sub(PADDING)..(oy * STRIDE + WINDOW - PADDING).min(h);
    let cols = (ox * STRIDE).saturating_sub(PADDING)..(ox * STRIDE + WINDOW - PADDING).min(w);
    let mut best = rows.start * w + cols.start;
    if max.is_nan() {
        for i in rows.flat_map(|iy| cols.clone().map(move |ix| iy * w + ix)) {
            best = if plane[i].is_nan() { i } else { best };
        }
    } else {
        // Backwards, so that the earliest match is the one kept.
        for i in rows
            .rev()
            .flat_map(|iy| cols.clone().rev().map(move |ix| iy * w + ix))
        {
            best = if plane[i] == max { i } else { best };
        }
    }
    best
}

/// The larger of two values, NaN if either is (as PyTorch's max-pool propagates NaN).
fn max_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// The forward values of one plane, window maxima taken as a pass along each row (three
/// columns at stride 2) and then one down the columns (three of those rows), both over
/// whole rows so that they vectorise; `columns` holds the first pass.
fn pool_plane(src: &[f32], (h, w): (usize, usize), columns: &mut Vec<f32>, dst: &mut [f32]) {
    let out_w = pooled(w);
    columns.resize(h * out_w, 0.0);
    for (row, pooled_row) in src.chunks_exact(w).zip(columns.chunks_exact_mut(out_w)) {
        for (ox, v) in pooled_row.iter_mut().enumerate() {
            let centre = ox * STRIDE;
            let mut m = row[centre];
            if centre >= PADDING {
                m = max_nan(m, row[centre - PADDING]);
            }
            if centre + 1 < w {
                m = max_nan(m, row[centre + 1]);
            }
            *v = m;
        }
    }
    for (oy, out_row) in dst.chunks_exact_mut(out_w).enumerate() {
        let centre = oy * STRIDE;
        out_row.copy_from_slice(&columns[centre * out_w..(centre + 1) * out_w]);
        let neighbours = [
            centre.checked_sub(PADDING),
            Some(centre + 1).filter(|&r| r < h),
        ];
        for r in neighbours.into_iter().flatten() {
            let other = &columns[r * out_w..(r + 1) * out_w];
            out_row
                .iter_mut()
                .zip(other)
                .for_each(|(v, &o)| *v = max_nan(*v, o));
        }
    }
}

fn plane_dims(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("max-pool of an empty {h}x{w} map");
    }
    Ok((n * c, h, w))
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "vt-max-pool-3x3s2p1"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (planes, h, w) = plane_dims(layout)?;
        let (out_h, out_w) = (pooled(h), pooled(w));
        let mut out = vec![0f32; planes * out_h * out_w];
        out.par_chunks_mut(out_h * out_w)
            .zip(x.par_chunks(h * w))
            .for_each_init(Vec::new, |columns, (dst, src)| {
                pool_plane(src, (h, w), columns, dst)
            });
        let (n, c, _, _) = layout.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((n, c, out_h, out_w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        super::cuda::max_pool(storage, layout)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &grad.contiguous()?,
            &MaxPoolGrad,
        )?))
    }
}

/// dL/dx from (x, y, dL/dy): each output's gradient goes to its window's maximum, found
/// again from the output value y.
struct MaxPoolGrad;

impl CustomOp3 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "vt-max-pool-3x3s2p1-grad"
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
        let (x, y, dy) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (planes, h, w) = plane_dims(l1)?;
        let (out_h, out_w) = (pooled(h), pooled(w));
        if dy.len() != planes * out_h * out_w || y.len() != dy.len() {
            candle_core::bail!(
                "max-pool grad: output {:?} and its gradient {:?} for input {:?}",
                l2.shape(),
                l3.shape(),
                l1.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .zip(
                y.par_chunks(out_h * out_w)
                    .zip(dy.par_chunks(out_h * out_w)),
            )
            .for_each(|((dst, src), (max, g))| {
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let o = oy * out_w + ox;
                        dst[argmax(src, (h, w), (oy, ox), max[o])] += g[o];
                    }
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
        super::cuda::max_pool_grad((s1, l1), (s2, l2), (s3, l3))
    }
}

/// candle's own operations, for other devices and dtypes: nine strided views and their
/// element-wise maximum. Zero padding is exact because the stem pools post-ReLU maps (>= 0).
fn composite(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (out_h, out_w) = (pooled(h), pooled(w));
    // One extra zero row/column on the far side lets every strided view take 2 * out elements.
    let padded = x
        .pad_with_zeros(2, PADDING, STRIDE)?
        .pad_with_zeros(3, PADDING, STRIDE)?;
    let mut result: Option<Tensor> = None;
    for dy in 0..WINDOW {
        let rows = strided(&padded, 2, dy, out_h)?;
        for dx in 0..WINDOW {
            let window = strided(&rows, 3, dx, out_w)?;
            result = Some(match result {
                Some(r) => r.maximum(&window)?,
                None => window,
            });
        }
    }
    result.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// Every STRIDE-th element of `dim` from `start`, `len` of them.
fn strided(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    shape[dim] = len;
    shape.insert(dim + 1, STRIDE);
    x.narrow(dim, start, len * STRIDE)?
        .reshape(shape)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_matches_candle_on_the_padded_map() {
        for (h, w) in [(5, 5), (6, 7), (1, 1), (2, 3), (75, 75)] {
            let x = Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let ours = max_pool_3x3_stride2_pad1(&x).unwrap();
            let reference = x
                .pad_with_zeros(2, 1, 1)
                .unwrap()
                .pad_with_zeros(3, 1, 1)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{h}x{w}");
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{h}x{w}");
        }
    }

    #[test]
    fn gradient_matches_the_composite_without_ties() {
        for (h, w) in [(5, 5), (6, 7), (2, 3), (10, 9)] {
            let x = Var::from_tensor(&Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap())
                .unwrap();
            let probe =
                Tensor::randn(0f32, 1.0, (2, 3, pooled(h), pooled(w)), &Device::Cpu).unwrap();
            let grad = |y: Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().clone()
            };
            let ours = grad(max_pool_3x3_stride2_pad1(x.as_tensor()).unwrap());
            let reference = grad(composite(x.as_tensor()).unwrap());
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{h}x{w}");
        }
    }

    #[test]
    fn padding_never_wins_and_nan_propagates() {
        // All-negative values: zero padding would win every border window, PyTorch's
        // implicit -inf padding never does.
        let mut values = vec![-1f32; 25];
        values[12] = f32::NAN;
        let x = Tensor::from_vec(values, (1, 1, 5, 5), &Device::Cpu).unwrap();
        let y = max_pool_3x3_stride2_pad1(&x)
            .unwrap()
            .flatten_all()
            .unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        // Input (2, 2) lies only in the window of output (1, 1) (rows and columns 1..=3).
        for (i, v) in y.iter().enumerate() {
            let (oy, ox) = (i / 3, i % 3);
            if (oy, ox) == (1, 1) {
                assert!(v.is_nan(), "output {oy},{ox} = {v}");
            } else {
                assert_eq!(*v, -1.0, "output {oy},{ox}");
            }
        }
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum() {
        // An all-zero 4x4 map: the windows start at rows and columns 0 and 1 (the padding
        // clipped off), and each output's gradient lands on its window's top-left input.
        let x = Var::from_tensor(&Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let y = max_pool_3x3_stride2_pad1(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let mut expected = vec![0f32; 16];
        for i in [0, 1, 4, 5] {
            expected[i] = 1.0;
        }
        assert_eq!(g.to_vec1::<f32>().unwrap(), expected);
    }

    #[test]
    fn a_nan_window_sends_its_gradient_to_its_last_nan() {
        // Windows of a 3x3 map: (0,0) holds both NaNs (inputs 1 and 3), (0,1) only input 1,
        // (1,0) only input 3, and (1,1) none: its maximum is input 8.
        let values = [0.0, f32::NAN, 2.0, f32::NAN, 4.0, 5.0, 6.0, 7.0, 8.0];
        let x = Var::from_tensor(
            &Tensor::from_vec(values.to_vec(), (1, 1, 3, 3), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = max_pool_3x3_stride2_pad1(x.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let expected = [0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(g.to_vec1::<f32>().unwrap(), expected);
    }
}
