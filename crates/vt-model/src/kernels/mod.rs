//! Fast CPU kernels for what VT-ResNet spends its time on, as candle custom ops with forward
//! and backward passes. The model code calls these functions; each falls back to candle's
//! own operations on other devices and dtypes.

mod add_relu;
mod batch_norm;
mod conv2d;
#[cfg(feature = "cudnn")]
mod cudnn_conv;
mod gemm;
mod linear;
mod max_pool;
mod winograd;

pub use add_relu::add_relu;
pub use batch_norm::{batch_norm, channel_moments};
pub use conv2d::{conv2d, conv2d_affine};
pub use linear::linear_product;
pub use max_pool::max_pool_3x3_stride2_pad1;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The compute threads candle itself uses (RAYON_NUM_THREADS, else every core).
fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Whether the kernels here take these tensors: f32, on the CPU. Anything else goes to
/// candle's own operations.
fn f32_on_cpu(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The f32 slice of a contiguous CPU tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("vt kernels take f32 tensors, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("vt kernels take contiguous tensors"),
    }
}

/// The largest difference between two tensors relative to the largest magnitude of the
/// second: how the kernels' tests compare against candle's reference operations.
#[cfg(test)]
fn max_rel(actual: &candle_core::Tensor, expected: &candle_core::Tensor) -> f32 {
    let largest = |t: candle_core::Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>();
    let diff = largest((actual - expected).unwrap()).unwrap();
    diff / largest(expected.clone()).unwrap().max(1e-12)
}
