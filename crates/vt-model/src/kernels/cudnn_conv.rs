//! Convolution on CUDA through cuDNN (feature `cudnn`): the forward pass, the input gradient
//! and the weight gradient are one cuDNN call each. candle's own CUDA convolution unfolds the
//! input with an im2col kernel and differentiates through a direct transposed-convolution
//! kernel; on an H100 those two took 160 of the 343 ms of kernel time of a vt-resnet18
//! training step at 224 px, batch 128 (bench/RESULTS.md).
//!
//! f32 runs with FMA math (no TF32) unless [`super::allow_tf32`] was called, so that GPU
//! predictions agree with the CPU's;
//! bf16 and f16 store half precision and compute in f32 on the tensor cores.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionFwdAlgo_t,
    cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use candle_core::cuda::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::algorithm_picks::{batch_bucket, Picks};
use super::cuda::view;

const FORWARD_ALGORITHMS: [cudnnConvolutionFwdAlgo_t; 8] = {
    use cudnnConvolutionFwdAlgo_t::*;
    [
        // Usually among the fastest: tried first, it makes the hopeless ones quick to skip.
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
};

const INPUT_GRAD_ALGORITHMS: [cudnnConvolutionBwdDataAlgo_t; 6] = {
    use cudnnConvolutionBwdDataAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ]
};

const WEIGHT_GRAD_ALGORITHMS: [cudnnConvolutionBwdFilterAlgo_t; 7] = {
    use cudnnConvolutionBwdFilterAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ]
};

/// A convolution as cuDNN sees it: the device (algorithms differ between GPUs), the sizes,
/// the element type and whether f32 may run in TF32.
type AlgorithmKey = (DeviceId, Geometry, DType, bool);

// Picking takes far longer than the convolution itself (asking cuDNN's heuristics took about
// 1.5 ms; at batch 1 vt-resnet18 inferred 30 instead of 130 images/s on an H100), so it
// happens once per shape and batch bucket, as PyTorch picks once per shape.
static FORWARD: Picks<AlgorithmKey, cudnnConvolutionFwdAlgo_t> = Picks::new();
static INPUT_GRAD: Picks<AlgorithmKey, cudnnConvolutionBwdDataAlgo_t> = Picks::new();
static WEIGHT_GRAD: Picks<AlgorithmKey, cudnnConvolutionBwdFilterAlgo_t> = Picks::new();

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

/// `key` with its batch rounded up to its bucket.
fn bucket_of(key: AlgorithmKey) -> AlgorithmKey {
    let (device, mut geometry, dtype, tf32) = key;
    geometry.input[0] = batch_bucket(geometry.input[0]);
    (device, geometry, dtype, tf32)
}

/// The workspace an algorithm needs, where it runs the convolution within our limit.
fn usable(workspace: std::result::Result<usize, CudnnError>) -> Option<usize> {
    workspace.ok().filter(|&bytes| bytes <= MAX_WORKSPACE_BYTES)
}

/// Workspaces larger than this are not tried (some FFT algorithms ask for gigabytes).
const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// A candidate whose first call took this many times the best time so far is not timed
/// again: some algorithms take 20-30x the best (at the first call, which may also load the
/// algorithm's kernels, a few milliseconds at most).
const HOPELESS: u32 = 10;

/// The fastest of `candidates` that runs this convolution, timed on the GPU, with its
/// workspace size: what PyTorch's `cudnn.benchmark` does (timm's training script turns it
/// on), because the heuristics' first choice is often not the fastest. The first call of each
/// new shape (and batch bucket) pays for it: about a second for a vt-resnet18 training step
/// on an H100.
fn fastest<A: Copy + std::fmt::Debug>(
    device: &CudaDevice,
    candidates: &[A],
    workspace: impl Fn(A) -> Option<usize>,
    mut run: impl FnMut(A, &mut CudaSlice<u8>) -> std::result::Result<(), CudnnError>,
) -> Result<(A, usize)> {
    let stream = device.cuda_stream();
    let sync = || stream.synchronize().map_err(candle_core::Error::wrap);
    let mut best: Option<(Duration, A, usize)> = None;
    sync()?;
    for &algo in candidates {
        let Some(bytes) = workspace(algo) else {
            continue;
        };
        let Ok(mut workspace) = scratch(device, bytes) else {
            continue;
        };
        let start = Instant::now();
        if run(algo, &mut workspace).is_err() {
            continue;
        }
        sync()?;
        let first = start.elapsed();
        if best.is_some_and(|(fastest, _, _)| first > fastest * HOPELESS) {
            continue;
        }
        let start = Instant::now();
        run(algo, &mut workspace).map_err(candle_core::Error::wrap)?;
        sync()?;
        let took = start.elapsed();
        if best.is_none_or(|(fastest, _, _)| took < fastest) {
            best = Some((took, algo, bytes));
        }
    }
    match best {
        Some((_, algo, bytes)) => Ok((algo, bytes)),
        None => candle_core::bail!("no cuDNN algorithm runs this convolution ({candidates:?})"),
    }
}

fn handle(device: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(handle) = handles.borrow().get(&device.id()) {
            return Ok(handle.clone());
        }
        let handle = Cudnn::new(device.cuda_stream()).map_err(candle_core::Error::wrap)?;
        handles.borrow_mut().insert(device.id(), handle.clone());
        Ok(handle)
    })
}

/// The sizes of one convolution: input (N, C, H, W), weight (K, C, k, k), square stride and
/// zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Geometry {
    input: [usize; 4],
    weight: [usize; 4],
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn output(&self) -> [usize; 4] {
        let [n, _, h, w] = self.input;
        let [k_out, _, kh, kw] = self.weight;
        let out = |size: usize, k: usize| (size + 2 * self.padding - k) / self.stride + 1;
        [n, k_out, out(h, kh), out(w, kw)]
    }
}

/// What one op computes: each is a cuDNN call over (first, second) operands.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// (input, weight) -> output
    Forward,
    /// (output gradient, weight) -> input gradient
    InputGrad,
    /// (input, output gradient) -> weight gradient
    WeightGrad,
}

#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    pass: Pass,
    geometry: Geometry,
}

fn dims(shape: [usize; 4]) -> [i32; 4] {
    shape.map(|d| d as i32)
}

/// cuDNN's workspace: scratch memory it initialises itself.
fn scratch(device: &CudaDevice, bytes: usize) -> Result<CudaSlice<u8>> {
    // SAFETY: cuDNN reads no workspace byte it has not written in the same call.
    unsafe { device.alloc::<u8>(bytes) }
}

impl CudnnConv {
    fn run<T>(
        &self,
        (a, a_layout): (&CudaStorage, &Layout),
        (b, b_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: CudaDType + CudnnDataType + DeviceRepr + WithDType,
    {
        let device = a.device.clone();
        let cudnn = handle(&device)?;
        let g = self.geometry;
        let wrap = candle_core::Error::wrap;
        let (p, s) = (g.padding as i32, g.stride as i32);
        let mut conv: ConvDescriptor<f32> = cudnn
            .create_conv2d::<f32>(
                [p, p],
                [s, s],
                [1, 1],
                cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(wrap)?;
        let tf32 = T::DTYPE == DType::F32 && super::tf32_allowed();
        let math = match T::DTYPE {
            // DEFAULT lets cuDNN use TF32 tensor cores for f32 (on Ampere and later).
            DType::F32 if tf32 => cudnnMathType_t::CUDNN_DEFAULT_MATH,
            DType::F32 => cudnnMathType_t::CUDNN_FMA_MATH,
            _ => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        conv.set_math_type(math).map_err(wrap)?;
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x: TensorDescriptor<T> = cudnn.create_4d_tensor(nchw, dims(g.input)).map_err(wrap)?;
        let w: FilterDescriptor<T> = cudnn.create_4d_filter(nchw, dims(g.weight)).map_err(wrap)?;
        let y: TensorDescriptor<T> = cudnn
            .create_4d_tensor(nchw, dims(g.output()))
            .map_err(wrap)?;
        let result_shape = match self.pass {
            Pass::Forward => g.output(),
            Pass::InputGrad => g.input,
            Pass::WeightGrad => g.weight,
        };
        // SAFETY: cuDNN writes every element (beta = 0: the output is not read).
        let mut result = unsafe { device.alloc::<T>(result_shape.iter().product()) }?;
        let (a, b) = (view::<T>(a, a_layout)?, view::<T>(b, b_layout)?);
        let scale = (T::from_f64(1.0), T::from_f64(0.0));
        let key = (device.id(), g, T::DTYPE, tf32);
        match self.pass {
            Pass::Forward => {
                let op = ConvForward {
                    conv: &conv,
                    x: &x,
                    w: &w,
                    y: &y,
                };
                let workspace = |algo| usable(op.get_workspace_size(algo));
                let (algo, bytes) = FORWARD.pick(key, bucket_of(key), workspace, || {
                    fastest(&device, &FORWARD_ALGORITHMS, workspace, |algo, ws| unsafe {
                        op.launch(algo, Some(ws), scale, &a, &b, &mut result)
                    })
                })?;
                let mut workspace = scratch(&device, bytes)?;
                unsafe { op.launch(algo, Some(&mut workspace), scale, &a, &b, &mut result) }
                    .map_err(wrap)?;
            }
            Pass::InputGrad => {
                let op = ConvBackwardData {
                    conv: &conv,
                    dx: &x,
                    w: &w,
                    dy: &y,
                };
                let workspace = |algo| usable(op.get_workspace_size(algo));
                let (algo, bytes) = INPUT_GRAD.pick(key, bucket_of(key), workspace, || {
                    fastest(
                        &device,
                        &INPUT_GRAD_ALGORITHMS,
                        workspace,
                        |algo, ws| unsafe { op.launch(algo, Some(ws), scale, &mut result, &b, &a) },
                    )
                })?;
                let mut workspace = scratch(&device, bytes)?;
                unsafe { op.launch(algo, Some(&mut workspace), scale, &mut result, &b, &a) }
                    .map_err(wrap)?;
            }
            Pass::WeightGrad => {
                let op = ConvBackwardFilter {
                    conv: &conv,
                    x: &x,
                    dw: &w,
                    dy: &y,
                };
                let workspace = |algo| usable(op.get_workspace_size(algo));
                let (algo, bytes) = WEIGHT_GRAD.pick(key, bucket_of(key), workspace, || {
                    fastest(
                        &device,
                        &WEIGHT_GRAD_ALGORITHMS,
                        workspace,
                        |algo, ws| unsafe { op.launch(algo, Some(ws), scale, &a, &mut result, &b) },
                    )
                })?;
                let mut workspace = scratch(&device, bytes)?;
                unsafe { op.launch(algo, Some(&mut workspace), scale, &a, &mut result, &b) }
                    .map_err(wrap)?;
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(result, device),
            Shape::from(result_shape.to_vec()),
        ))
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "cudnn-conv2d",
            Pass::InputGrad => "cudnn-conv2d-input-grad",
            Pass::WeightGrad => "cudnn-conv2d-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = a.dtype();
        let (a, b) = ((a, a_layout), (b, b_layout));
        match dtype {
            DType::F32 => self.run::<f32>(a, b),
            DType::BF16 => self.run::<bf16>(a, b),
            DType::F16 => self.run::<f16>(a, b),
            other => candle_core::bail!("{}: no cuDNN path for {other:?}", self.name()),
        }
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _output: &Tensor,
        output_grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let output_grad = output_grad.contiguous()?;
        let op = |pass| CudnnConv {
            pass,
            geometry: self.geometry,
        };
        // The first convolution's input is the image batch, which needs no gradient.
        let input_grad = if input.track_op() {
            Some(output_grad.apply_op2_no_bwd(weight, &op(Pass::InputGrad))?)
        } else {
            None
        };
        let weight_grad = input.apply_op2_no_bwd(&output_grad, &op(Pass::WeightGrad))?;
        Ok((input_grad, Some(weight_grad)))
    }
}

/// A bias-free convolution through cuDNN, differentiable; `input` and `weight` on one CUDA
/// device.
pub fn conv2d(input: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (input, weight) = (input.contiguous()?, weight.contiguous()?);
    let geometry = Geometry {
        input: input.dims4()?.into(),
        weight: weight.dims4()?.into(),
        stride,
        padding,
    };
    input.apply_op2(
        &weight,
        CudnnConv {
            pass: Pass::Forward,
            geometry,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_rel, test_gpu};
    use candle_core::{Device, Var};

    /// Forward and both gradients against the CPU kernels, on the model's convolution shapes.
    #[test]
    fn matches_the_cpu_forward_and_gradients() {
        let Some(gpu) = test_gpu() else { return };
        let cpu = Device::Cpu;
        for (input, c_out, k, stride, padding) in [
            ([2, 3, 19, 17], 8, 7, 2, 3),
            // Batch 3 runs the algorithms timed for batch 4 (one bucket).
            ([4, 4, 9, 6], 5, 3, 1, 1),
            ([3, 4, 9, 6], 5, 3, 1, 1),
            ([2, 4, 10, 10], 6, 3, 2, 1),
            ([2, 4, 9, 9], 6, 1, 2, 0),
            ([1, 16, 14, 14], 32, 3, 1, 1),
        ] {
            let case = format!("{input:?} -> {c_out} k{k} s{stride} p{padding}");
            let x = Tensor::randn(0f32, 1.0, &input, &cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (c_out, input[1], k, k), &cpu).unwrap();
            let mut results = Vec::new();
            for device in [&cpu, &gpu] {
                let x = Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
                let w = Var::from_tensor(&w.to_device(device).unwrap()).unwrap();
                let y =
                    crate::kernels::conv2d(x.as_tensor(), w.as_tensor(), stride, padding).unwrap();
                let probe = Tensor::arange(0f32, y.elem_count() as f32, device)
                    .unwrap()
                    .reshape(y.shape())
                    .unwrap()
                    .sin()
                    .unwrap();
                let grads = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let on_cpu = |t: &Tensor| t.to_device(&cpu).unwrap();
                results.push([
                    on_cpu(&y),
                    on_cpu(grads.get(x.as_tensor()).unwrap()),
                    on_cpu(grads.get(w.as_tensor()).unwrap()),
                ]);
            }
            for (i, name) in ["output", "input gradient", "weight gradient"]
                .iter()
                .enumerate()
            {
                let rel = max_rel(&results[1][i], &results[0][i]);
                assert!(rel < 1e-4, "{case}: {name} differs by {rel:e}");
            }
        }
    }

    /// bf16 follows f32 to its precision.
    #[test]
    fn bf16_follows_f32() {
        let Some(gpu) = test_gpu() else { return };
        let x = Tensor::randn(0f32, 1.0, (2, 8, 12, 12), &gpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (16, 8, 3, 3), &gpu).unwrap();
        let full = conv2d(&x, &w, 1, 1).unwrap();
        let half = conv2d(
            &x.to_dtype(DType::BF16).unwrap(),
            &w.to_dtype(DType::BF16).unwrap(),
            1,
            1,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        let rel = max_rel(&half, &full);
        assert!(rel < 2e-2, "bf16 differs by {rel:e}");
    }
}
