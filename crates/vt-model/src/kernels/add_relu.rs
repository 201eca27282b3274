//! `relu(a + b)`, the end of every residual block, in one pass each way.
//!
//! As two candle operations it allocates and writes twice forward, and its backward pass
//! builds a comparison mask, converts it and multiplies, before the addition copies the
//! gradient to both branches.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::{contiguous_f32, fused, FLOAT_DTYPES};

/// Values per parallel task: element-wise work needs long runs to beat its scheduling.
const CHUNK: usize = 16 * 1024;

/// `relu(a + b)` for tensors of one shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused(&[a, b], &FLOAT_DTYPES) {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

/// `f` of two equally long slices, element by element, in parallel chunks.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(dst, (a, b))| {
            for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                *d = f(x, y);
            }
        });
    out
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "vt-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add_relu: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (a, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = zip_map(a, b, |x, y| (x + y).max(0.0));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        super::cuda::zip("add_relu", (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = out.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// dL/d(a + b) from (relu output, dL/dy): the gradient where the output is positive.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "vt-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        if y.len() != g.len() {
            candle_core::bail!("relu grad: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = zip_map(y, g, |y, g| if y > 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        super::cuda::zip("relu_grad", (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_forward_and_backward() {
        for shape in [[2usize, 3, 5, 7], [1, 64, 38, 38]] {
            let var = |t: Tensor| Var::from_tensor(&t).unwrap();
            let a = var(Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap());
            let b = var(Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap());
            let probe = Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap();
            let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
            let reference = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
            let max_diff = |x: &Tensor, y: &Tensor| {
                (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(max_diff(&ours, &reference), 0.0, "{shape:?} forward");
            let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (g, g_ref) = (grads(&ours), grads(&reference));
            for v in [&a, &b] {
                let d = max_diff(
                    g.get(v.as_tensor()).unwrap(),
                    g_ref.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(d, 0.0, "{shape:?} gradient");
            }
        }
    }
}
