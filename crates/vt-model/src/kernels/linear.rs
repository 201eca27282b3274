//! `x W^T` for a linear layer, with the weight in PyTorch's (out, in) layout.
//!
//! The `gemm` crate vectorises along the output's contiguous axis and gathers the operand
//! indexed by that axis one float at a time when its rows are not contiguous there. For
//! `y = x W^T` with row-major `y` that operand is `W`; for `y^T = W x^T` it is `x`. With
//! few rows (batch-1 inference: 16 tokens) gathering `W` cost three times the product
//! itself, so those products run as `y^T = W x^T`, put back by a blocked transpose. With
//! enough rows the gather is paid back and the direct product avoids the transpose; how
//! many depends on the length of `W`'s rows (see [`runs_directly`]).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::gemm::{matmul, matmul_prepared, LhsPacking, MatRef, PreparedLhs};
use super::{contiguous_f32, f32_on_cpu, f32_storage, threads};

/// What inference derives from a linear layer's weights, kept from call to call while they
/// are frozen: the weights packed for the products (bfloat16 products) at their first use.
#[derive(Debug, Default)]
pub struct FrozenLinear {
    packing: OnceLock<LhsPacking>,
}

/// `x W^T` over the last axis of `x`: (..., in) x (out, in) -> (..., out). With `frozen`,
/// what the call derives from the weights is kept there for the next one: the caller
/// guarantees the weights never change.
pub fn linear_product(
    x: &Tensor,
    weight: &Tensor,
    frozen: Option<&Arc<FrozenLinear>>,
) -> Result<Tensor> {
    if f32_on_cpu(&[x, weight]) {
        x.contiguous()?.apply_op2(
            &weight.contiguous()?,
            LinearProduct {
                frozen: frozen.cloned(),
            },
        )
    } else {
        // One product over every row: a product per image, against the weight broadcast
        // over the batch, made its gradient one small product per image and a sum (cuBLAS on
        // an H100 spent 4.5 ms of a 53 ms training step in such products).
        let mut dims = x.dims().to_vec();
        let rows = x.flatten_to(x.rank().saturating_sub(2))?;
        if let Some(last) = dims.last_mut() {
            *last = weight.dim(0)?;
        }
        rows.matmul(&weight.t()?)?.reshape(dims)
    }
}

struct LinearProduct {
    frozen: Option<Arc<FrozenLinear>>,
}

/// Whether `x W^T` runs as the direct product rather than the transposed one. Measured
/// (best of 30, 2 threads): with 256-float weight rows the direct product wins from 32 rows
/// (49 rows into 1024 outputs: 105 against 55 GFLOP/s); with 1024-float rows, strided
/// 4 KB apart, the gather costs more and the transposed product wins up to about 256 rows
/// (128 rows: 135 against 92 GFLOP/s; 512 rows: 160 against 128).
fn runs_directly(rows: usize, in_dim: usize, out_dim: usize) -> bool {
    rows >= out_dim || rows >= if in_dim <= 256 { 32 } else { 256 }
}

impl CustomOp2 for LinearProduct {
    fn name(&self) -> &'static str {
        "vt-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let x_dims = l1.shape().dims();
        if x_dims.last() != Some(&in_dim) {
            candle_core::bail!("linear: input {x_dims:?} against weight ({out_dim}, {in_dim})");
        }
        let rows = x.len() / in_dim.max(1);
        let (x, weight) = (
            MatRef::row_major(x, rows, in_dim),
            MatRef::row_major(weight, out_dim, in_dim),
        );
        let mut y = vec![0f32; rows * out_dim];
        if runs_directly(rows, in_dim, out_dim) {
            matmul(&mut y, x, weight.t(), false, threads());
        } else {
            let mut y_t = vec![0f32; out_dim * rows];
            let weight = match &self.frozen {
                Some(frozen) => PreparedLhs::new(
                    weight,
                    frozen.packing.get_or_init(|| LhsPacking::new(weight)),
                ),
                None => PreparedLhs::unpacked(weight),
            };
            matmul_prepared(&mut y_t, &weight, x.t(), false, threads());
            transpose::transpose(&y_t, &mut y, rows, out_dim);
        }
        let mut dims = x_dims.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = weight.dims2()?;
        let grad_2d = grad.reshape(((), out_dim))?;
        let x_2d = x.reshape(((), in_dim))?;
        let grad_x = gradient_product(&grad_2d, weight)?.reshape(x.shape())?;
        let grad_weight = gradient_product(&grad_2d.t()?, &x_2d)?;
        Ok((Some(grad_x), Some(grad_weight)))
    }
}

/// A product of two 2-D f32 CPU tensors of the backward pass. With row-major operands
/// both suit candle's own products, which ran faster than [`matmul`]'s at these shapes;
/// with bfloat16 products allowed they go to [`matmul`], which has them.
fn gradient_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::bf16_products_allowed() {
        a.apply_op2_no_bwd(b, &StridedProduct)
    } else {
        a.matmul(b)
    }
}

/// `a b` for 2-D f32 CPU tensors in any strided layout (a transpose is a view, not a copy).
struct StridedProduct;

/// A 2-D layout's view of its storage.
fn view<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<MatRef<'a>> {
    let data = f32_storage(storage)?;
    let (rows, cols) = layout.shape().dims2()?;
    let [row_stride, col_stride] = layout.stride() else {
        candle_core::bail!("a 2-D product takes 2-D tensors");
    };
    Ok(MatRef {
        data: &data[layout.start_offset()..],
        rows,
        cols,
        row_stride: *row_stride,
        col_stride: *col_stride,
    })
}

impl CustomOp2 for StridedProduct {
    fn name(&self) -> &'static str {
        "vt-strided-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (view(s1, l1)?, view(s2, l2)?);
        if a.cols != b.rows {
            candle_core::bail!("product of {:?} and {:?}", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; a.rows * b.cols];
        matmul(&mut out, a, b, false, threads());
        Ok((CpuStorage::F32(out), Shape::from((a.rows, b.cols))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::max_rel;

    #[test]
    fn matches_candle_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Fewer rows than outputs (the transposed product) and more (the direct one).
        for (x_shape, out_dim) in [
            (vec![1, 16, 64], 48),
            (vec![3, 7, 33], 5),
            (vec![40, 9], 70),
            (vec![2, 1, 1], 1),
        ] {
            let in_dim = *x_shape.last().unwrap();
            let x = Var::randn(0f32, 1.0, x_shape.as_slice(), &dev)?;
            let w = Var::randn(0f32, 1.0, (out_dim, in_dim), &dev)?;
            let y = linear_product(&x, &w, None)?;
            let expected = x.broadcast_matmul(&w.t()?)?;
            assert_eq!(y.dims(), expected.dims());
            assert!(max_rel(&y, &expected) < 1e-5, "{x_shape:?} x {out_dim}");

            let probe = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let reference = (&expected * &probe)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), w.as_tensor()] {
                let (got, want) = (grads.get(v).unwrap(), reference.get(v).unwrap());
                assert!(
                    max_rel(got, want) < 1e-5,
                    "gradient for {x_shape:?} x {out_dim}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn strided_product_reads_views_in_place() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (70, 9), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (70, 40), &dev)?;
        // A transpose, a column range (an offset and a row stride), and a broadcast row.
        let cases = [
            (a.t()?, b.clone()),
            (b.narrow(1, 3, 30)?.t()?, b.narrow(1, 5, 20)?),
            (a.narrow(0, 2, 1)?.broadcast_as((4, 9))?, a.t()?),
        ];
        for (x, y) in cases {
            let got = x.apply_op2_no_bwd(&y, &StridedProduct)?;
            let want = x.contiguous()?.matmul(&y.contiguous()?)?;
            assert!(
                max_rel(&got, &want) < 1e-5,
                "{:?} x {:?}",
                x.dims(),
                y.dims()
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_inner_dimension() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &dev)?;
        assert!(linear_product(&x, &w, None).is_err());
        Ok(())
    }
}
