//! bfloat16 products (`kernels::allow_bf16_products`) against full f32 and the PyTorch
//! float64 golden values: within what rounding each product's operands to 8 significant
//! bits costs. Its own test binary, because the switch is process-wide.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Device, Result, Tensor, Var};
use common::fixture::Fixture;
use common::relative_error;
use vt_model::kernels;

/// Held by each test while it flips the process-wide switch.
static SWITCH: Mutex<()> = Mutex::new(());

/// The switch, for the calling test to hold; None (after a message) on a CPU without
/// AVX512-BF16, where the test has nothing to check.
fn take_switch() -> Option<MutexGuard<'static, ()>> {
    if !kernels::bf16_products_available() {
        eprintln!("skipping: this CPU has no AVX512-BF16");
        return None;
    }
    Some(SWITCH.lock().unwrap())
}

/// The output and the gradients of `op(x, w)` for a fixed upstream gradient, with bfloat16
/// products on or off.
fn output_and_gradients(
    op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    (x, w): (&Var, &Var),
    grad: &Tensor,
    bf16: bool,
) -> [Tensor; 3] {
    kernels::allow_bf16_products(bf16).unwrap();
    let y = op(x.as_tensor(), w.as_tensor()).unwrap();
    let grads = (&y * grad).unwrap().sum_all().unwrap().backward().unwrap();
    let of = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    let result = [y, of(x), of(w)];
    kernels::allow_bf16_products(false).unwrap();
    result
}

/// `op` with bfloat16 products: output, input gradient and weight gradient within 1e-2
/// (relative to the largest value) of the f32 products, and not equal to them.
fn check(name: &str, op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>, x: &[usize], w: &[usize]) {
    let device = Device::Cpu;
    let x = Var::randn(0f32, 1.0, x, &device).unwrap();
    let w = Var::randn(0f32, 1.0, w, &device).unwrap();
    let y = op(x.as_tensor(), w.as_tensor()).unwrap();
    let grad = Tensor::randn(0f32, 1.0, y.shape(), &device).unwrap();
    let f32 = output_and_gradients(&op, (&x, &w), &grad, false);
    let bf16 = output_and_gradients(&op, (&x, &w), &grad, true);
    for ((what, a), b) in ["output", "input gradient", "weight gradient"]
        .iter()
        .zip(&bf16)
        .zip(&f32)
    {
        let err = relative_error(a, b);
        assert!(
            err < 1e-2 && err > 1e-5,
            "{name}: {what} relative error {err:e}"
        );
    }
}

#[test]
fn convolutions_and_linear_layers_stay_near_f32() {
    let Some(_switch) = take_switch() else {
        return;
    };
    // Each convolution path: Winograd 3x3, strided 3x3 and 1x1, the 7x7 stem; products
    // large enough for bfloat16 (small ones stay f32, see kernels::gemm).
    for (name, x, w, stride, padding) in [
        ("3x3", [2, 64, 14, 14], [64, 64, 3, 3], 1, 1),
        ("3x3 stride 2", [2, 64, 20, 20], [64, 64, 3, 3], 2, 1),
        ("1x1 stride 2", [2, 64, 20, 20], [128, 64, 1, 1], 2, 0),
        ("7x7 stride 2", [2, 3, 32, 32], [64, 3, 7, 7], 2, 3),
    ] {
        let conv = |x: &Tensor, w: &Tensor| kernels::conv2d(x, w, stride, padding);
        check(name, conv, &x, &w);
    }
    check(
        "linear",
        |x: &Tensor, w: &Tensor| kernels::linear_product(x, w, None),
        &[4, 16, 256],
        &[1024, 256],
    );
}

/// Weights packed once and kept (`FrozenConv`, `FrozenLinear`: inference on a frozen model)
/// give exactly the products of weights packed at each call, at the first call and after.
#[test]
fn kept_packings_give_the_same_products() {
    let Some(_switch) = take_switch() else {
        return;
    };
    let device = Device::Cpu;
    let random = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &device).unwrap();
    kernels::allow_bf16_products(true).unwrap();
    // Winograd (enough tiles), strided 3x3 and 1x1 by im2col.
    for (x, w, stride, padding) in [
        ([2, 64, 24, 24], [64, 64, 3, 3], 1, 1),
        ([2, 64, 20, 20], [128, 64, 3, 3], 2, 1),
        ([2, 64, 20, 20], [128, 64, 1, 1], 2, 0),
    ] {
        let (x, w) = (random(&x), random(&w));
        let affine =
            kernels::ChannelAffine::new(random(&[w.dim(0).unwrap()]), random(&[w.dim(0).unwrap()]))
                .unwrap();
        let conv = |frozen| {
            kernels::conv2d_affine(&x, &w, &affine, true, stride, padding, frozen).unwrap()
        };
        let fresh = conv(None);
        let frozen = Arc::new(kernels::FrozenConv::default());
        for call in ["first", "second"] {
            let err = relative_error(&conv(Some(&frozen)), &fresh);
            assert_eq!(err, 0.0, "{w:?} stride {stride}, {call} call");
        }
    }
    // 64 rows into 1024 outputs: the transposed product, whose left operand is the weight.
    let (x, w) = (random(&[4, 16, 1024]), random(&[1024, 1024]));
    let fresh = kernels::linear_product(&x, &w, None).unwrap();
    let frozen = Arc::new(kernels::FrozenLinear::default());
    for call in ["first", "second"] {
        let kept = kernels::linear_product(&x, &w, Some(&frozen)).unwrap();
        assert_eq!(relative_error(&kept, &fresh), 0.0, "linear, {call} call");
    }
    kernels::allow_bf16_products(false).unwrap();
}

#[test]
fn logits_stay_near_pytorch() {
    let Some(_switch) = take_switch() else {
        return;
    };
    for name in ["vt-resnet18", "vt-resnet34"] {
        let fx = Fixture::load(name);
        kernels::allow_bf16_products(true).unwrap();
        let err = fx.check_eval_logits(candle_core::DType::F32, &Device::Cpu, 2e-2);
        kernels::allow_bf16_products(false).unwrap();
        assert!(err > 1e-5, "{name}: the products did not change ({err:e})");
    }
}
