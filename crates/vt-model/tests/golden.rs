//! Golden tests against the independent PyTorch implementation in tools/reference (values
//! computed there in float64): logits in evaluation and training mode, gradients of a scalar
//! loss with respect to the input and to parameters of every part of the model, and
//! BatchNorm running statistics after one training-mode pass.

mod common;

use candle_core::{DType, Device};
use common::fixture::Fixture;

#[test]
fn vt_resnet18_matches_pytorch_in_f32() {
    let fx = Fixture::load("vt-resnet18");
    fx.check_formula();
    fx.check_eval_logits(DType::F32, &Device::Cpu, 1e-4);
    fx.check_token_attention(DType::F32, &Device::Cpu, 1e-4);
    fx.check_training(DType::F32, &Device::Cpu, 1e-4, 1e-3);
}

#[test]
fn vt_resnet34_matches_pytorch() {
    let fx = Fixture::load("vt-resnet34");
    fx.check_formula();
    fx.check_eval_logits(DType::F32, &Device::Cpu, 1e-4);
    fx.check_token_attention(DType::F32, &Device::Cpu, 1e-4);
    // Layer3's batch statistics cover 8 values per channel in this tiny config, so f32
    // rounding flips ReLU kinks and no f32 implementation (PyTorch's included) gets the stem
    // gradients within 10%; the same code in f64 matches the float64 reference.
    fx.check_training(DType::F64, &Device::Cpu, 1e-5, 1e-3);
}

/// The same checks on a GPU, where one is present (f32: the CUDA kernels take no f64): the
/// CUDA kernels for batch norm, add + ReLU and max-pool, and the CUDA convolutions.
#[cfg(feature = "cuda")]
#[test]
fn vt_resnet18_matches_pytorch_on_cuda() {
    let gpu = match Device::new_cuda(0) {
        Ok(gpu) => gpu,
        Err(e) if std::env::var_os("VT_REQUIRE_GPU").is_some() => {
            panic!("VT_REQUIRE_GPU is set, but no CUDA device opens: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            return;
        }
    };
    let fx = Fixture::load("vt-resnet18");
    fx.check_eval_logits(DType::F32, &gpu, 1e-4);
    fx.check_token_attention(DType::F32, &gpu, 1e-4);
    fx.check_training(DType::F32, &gpu, 1e-4, 1e-3);
    Fixture::load("vt-resnet34").check_eval_logits(DType::F32, &gpu, 1e-4);
}
