//! Fast CPU kernels for what VT-ResNet spends its time on, as candle custom ops with forward
//! and backward passes, and the optimisers' updates in one pass; batch norm, the residual
//! add + ReLU, the max-pool and the updates also run on CUDA devices (feature `cuda`). The
//! model and the optimisers call these functions; each falls back to candle's own
//! operations on other devices and dtypes.

mod add_relu;
#[cfg(any(test, feature = "cudnn"))]
mod algorithm_picks;
mod batch_norm;
mod conv2d;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cudnn")]
mod cudnn_conv;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16;
mod linear;
mod max_pool;
mod optimizer;
mod winograd;

pub use add_relu::add_relu;
pub use batch_norm::{batch_norm, channel_moments};
pub use conv2d::{conv2d, conv2d_affine, ChannelAffine, FrozenConv};
pub use linear::{linear_product, FrozenLinear};
pub use max_pool::max_pool_3x3_stride2_pad1;
pub use optimizer::{AdamWStep, SgdStep, OPTIMIZER_CHUNK};

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

static TF32: AtomicBool = AtomicBool::new(false);

/// Lets f32 convolutions on CUDA devices run in TF32 on the tensor cores (products of 10-bit
/// mantissas, f32 sums), as PyTorch does by default (`torch.backends.cudnn.allow_tf32`).
/// Off until called: vt-train turns it on for training (`--tf32`), inference keeps the
/// f32 results that agree with the CPU's. Read by cuDNN's convolutions (feature `cudnn`).
pub fn allow_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
}

#[cfg(feature = "cudnn")]
fn tf32_allowed() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Time spent so far choosing cuDNN's convolution algorithms by timing them on the GPU, once
/// per convolution shape and batch bucket (feature `cudnn`; zero without it).
pub fn algorithm_search_time() -> std::time::Duration {
    #[cfg(feature = "cudnn")]
    return algorithm_picks::search_time();
    #[cfg(not(feature = "cudnn"))]
    std::time::Duration::ZERO
}

static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Lets f32 convolutions on the CPU multiply in bfloat16 and sum in f32 (AVX512-BF16:
/// twice the multiply-adds per instruction), as PyTorch's
/// `torch.backends.mkldnn.fp32_precision = "bf16"`. Off until called; an error where the
/// CPU cannot (rather than a silent f32 product).
pub fn allow_bf16_products(allow: bool) -> Result<()> {
    if allow && !bf16_products_available() {
        candle_core::bail!("bfloat16 products need a CPU with AVX512-BF16, which this one lacks");
    }
    BF16_PRODUCTS.store(allow, Ordering::Relaxed);
    Ok(())
}

/// Whether this CPU has the bfloat16 products of [`allow_bf16_products`].
pub fn bf16_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return gemm_bf16::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn bf16_products_allowed() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

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

/// Every float type: the CUDA kernels for element-wise work take them all.
const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Whether the fused kernels (batch norm, add + ReLU, max-pool) take these tensors: f32 on
/// the CPU or, built with `cuda`, all on one CUDA device in one of `cuda_dtypes`.
fn fused(tensors: &[&Tensor], cuda_dtypes: &[DType]) -> bool {
    let on_cuda = cfg!(feature = "cuda")
        && tensors
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == tensors[0].dtype())
        && tensors
            .first()
            .is_some_and(|t| cuda_dtypes.contains(&t.dtype()))
        && tensors
            .windows(2)
            .all(|pair| pair[0].device().same_device(pair[1].device()));
    on_cuda || f32_on_cpu(tensors)
}

/// The f32 data of a CPU tensor's storage.
fn f32_storage(storage: &CpuStorage) -> Result<&[f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("vt kernels take f32 tensors, got {:?}", storage.dtype()),
    }
}

/// The f32 slice of a contiguous CPU tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = f32_storage(storage)?;
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

/// The first GPU, or None (with a message) where there is none: the CUDA kernels' tests run
/// only where one is present.
#[cfg(all(test, feature = "cuda"))]
pub(crate) fn test_gpu() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("VT_REQUIRE_GPU").is_some() => {
            panic!("VT_REQUIRE_GPU is set, but no CUDA device opens: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}
