//! The CUDA side of the fused kernels (feature `cuda`): launches of `cuda/vt_kernels.cu`,
//! compiled to PTX by the build script. The CPU ops in `batch_norm`, `add_relu` and
//! `max_pool` call these from their `cuda_fwd`, so that a training step on a GPU runs the
//! same few passes as on the CPU instead of candle's broadcast chains: on an H100 those
//! chains and their gradient sums took most of the 186 ms of kernel time of a vt-resnet18
//! step at 224 px, batch 128, once cuDNN ran the convolutions (bench/RESULTS.md). The
//! optimisers' fused updates (`optimizer`) launch one kernel per parameter here.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, StorageRef, Tensor, WithDType,
};
use half::{bf16, f16};

use super::optimizer::AdamWScalars;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Threads per block, as the kernels' shared-memory reductions assume.
const THREADS: u32 = 256;
/// Blocks of a grid-stride loop: enough to fill an H100 several times over.
const MAX_BLOCKS: usize = 8192;
/// Blocks wanted for a per-channel reduction, split across the batch to reach them.
const REDUCTION_BLOCKS: usize = 1024;

/// The contiguous data of a storage as a typed view.
pub(super) fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("vt CUDA kernels take contiguous tensors"),
    }
}

/// A buffer for a kernel to fill completely (so not zeroed first).
fn output<T: DeviceRepr>(device: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `len` elements before the
    // buffer is read.
    unsafe { device.alloc::<T>(len) }
}

/// Launches kernel `$name` of this crate's PTX over `$grid` = (x, y) blocks of [`THREADS`]
/// with the given arguments (references to buffers and scalars), as the kernel declares them.
macro_rules! launch {
    ($device:expr, $name:expr, $grid:expr, $($arg:expr),+ $(,)?) => {{
        let func = $device.get_or_load_custom_func($name, "vt-kernels", ptx::VT_KERNELS)?;
        let mut args = func.builder();
        $(args.arg($arg);)+
        let (x, y): (u32, u32) = $grid;
        let config = LaunchConfig {
            grid_dim: (x, y, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every call site passes the arguments its kernel declares, in order, with
        // buffers of the sizes the kernel indexes.
        unsafe { args.launch(config) }.map_err(candle_core::Error::wrap)?;
    }};
}

/// Blocks for a grid-stride loop over `len` elements.
fn stride_blocks(len: usize) -> u32 {
    len.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32
}

/// The contiguous f32 data of a tensor on a GPU, read through its storage guard.
fn tensor_view<'a>((storage, layout): &'a (StorageRef<'_>, &Layout)) -> Result<CudaView<'a, f32>> {
    match &**storage {
        Storage::Cuda(storage) => view::<f32>(storage, layout),
        _ => candle_core::bail!("vt CUDA kernels take tensors on the GPU"),
    }
}

/// A tensor of `shape` on `device`'s GPU, outside any autograd graph.
fn tensor(data: CudaSlice<f32>, device: &CudaDevice, shape: &Shape) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(data, device.clone());
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape.clone(),
        BackpropOp::none(),
        false,
    )
}

/// AdamW's step (`optimizer.rs`) for contiguous f32 tensors of one shape: (parameter, first
/// moment, second moment), one kernel launch.
pub(super) fn adamw(
    s: &AdamWScalars,
    theta: &Tensor,
    grad: &Tensor,
    moments: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = theta.device().as_cuda_device()?;
    let (theta_storage, grad_storage) = (theta.storage_and_layout(), grad.storage_and_layout());
    let moment_storage = moments.map(|(m, v)| (m.storage_and_layout(), v.storage_and_layout()));
    let (theta_data, grad_data) = (tensor_view(&theta_storage)?, tensor_view(&grad_storage)?);
    // The first step reads no moments: the kernel is given the parameter in their place.
    let (m, v) = match &moment_storage {
        Some((m, v)) => (tensor_view(m)?, tensor_view(v)?),
        None => (tensor_view(&theta_storage)?, tensor_view(&theta_storage)?),
    };
    let len = theta_data.len();
    let n = u32_of(len, "parameter size")?;
    let fresh = i32::from(moments.is_none());
    let (next, m_next, v_next) = (
        output::<f32>(device, len)?,
        output::<f32>(device, len)?,
        output::<f32>(device, len)?,
    );
    launch!(
        device,
        "adamw_f32",
        (stride_blocks(len), 1),
        &theta_data,
        &grad_data,
        &m,
        &v,
        &next,
        &m_next,
        &v_next,
        &n,
        &fresh,
        &s.decay,
        &s.beta1,
        &s.beta2,
        &s.keep1,
        &s.keep2,
        &s.inv_bias2_sqrt,
        &s.eps,
        &s.step
    );
    let shape = theta.shape();
    Ok((
        tensor(next, device, shape),
        tensor(m_next, device, shape),
        tensor(v_next, device, shape),
    ))
}

/// SGD's scalars as the kernel takes them (`weight_decay` 0 when none applies).
pub(super) struct SgdScalars {
    pub weight_decay: f32,
    pub momentum: f32,
    pub nesterov: i32,
    pub lr: f32,
}

/// SGD's step with momentum (`optimizer.rs`) for contiguous f32 tensors of one shape:
/// (parameter, momentum buffer), one kernel launch.
pub(super) fn sgd(
    s: &SgdScalars,
    theta: &Tensor,
    grad: &Tensor,
    buffer: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let device = theta.device().as_cuda_device()?;
    let (theta_storage, grad_storage) = (theta.storage_and_layout(), grad.storage_and_layout());
    let buffer_storage = buffer.map(|b| b.storage_and_layout());
    let (theta_data, grad_data) = (tensor_view(&theta_storage)?, tensor_view(&grad_storage)?);
    // The first step reads no buffer: the kernel is given the parameter in its place.
    let buf = tensor_view(buffer_storage.as_ref().unwrap_or(&theta_storage))?;
    let len = theta_data.len();
    let n = u32_of(len, "parameter size")?;
    let fresh = i32::from(buffer.is_none());
    let (next, buf_next) = (output::<f32>(device, len)?, output::<f32>(device, len)?);
    launch!(
        device,
        "sgd_f32",
        (stride_blocks(len), 1),
        &theta_data,
        &grad_data,
        &buf,
        &next,
        &buf_next,
        &n,
        &fresh,
        &s.weight_decay,
        &s.momentum,
        &s.nesterov,
        &s.lr
    );
    let shape = theta.shape();
    Ok((tensor(next, device, shape), tensor(buf_next, device, shape)))
}

/// (N, C, H * W) of an NCHW layout, as the kernels index it.
fn nchw(layout: &Layout) -> Result<(usize, usize, usize)> {
    let dims = layout.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("vt CUDA kernels need an (N, C, ...) tensor, got {dims:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

fn u32_of(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| candle_core::Error::Msg(format!("{what} {value} too large")))
}

/// Batch splits of a per-channel reduction: enough blocks to fill the GPU.
fn splits(n: usize, channels: usize) -> usize {
    (REDUCTION_BLOCKS / channels.max(1)).clamp(1, n.max(1))
}

/// The (2, C) mean and biased variance of each channel of an f32 (N, C, ...) tensor.
pub(super) fn moments(x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (n, c, plane) = nchw(layout)?;
    let xs = view::<f32>(x, layout)?;
    let s = splits(n, c);
    // (count, mean, M2) per block, as the kernel's `Moments`.
    let partial = output::<f64>(device, 3 * c * s)?;
    let (n32, c32, plane32) = (
        u32_of(n, "batch")?,
        u32_of(c, "channels")?,
        u32_of(plane, "plane")?,
    );
    launch!(
        device,
        "bn_moments_partial",
        (c32, s as u32),
        &xs,
        &partial,
        &n32,
        &c32,
        &plane32
    );
    let moments = output::<f32>(device, 2 * c)?;
    let s32 = s as u32;
    launch!(
        device,
        "bn_moments_finish",
        (c32.div_ceil(THREADS), 1),
        &partial,
        &moments,
        &c32,
        &s32
    );
    Ok((
        CudaStorage::wrap_cuda_slice(moments, device.clone()),
        Shape::from((2, c)),
    ))
}

/// Per-channel (scale, shift, inv_std) of a batch norm, (3, C), from its moments and affine.
fn batch_norm_params(
    device: &CudaDevice,
    moments: &CudaView<f32>,
    affine: &CudaView<f32>,
    channels: u32,
    eps: f64,
) -> Result<CudaSlice<f32>> {
    let params = output::<f32>(device, 3 * channels as usize)?;
    launch!(
        device,
        "bn_params",
        (channels.div_ceil(THREADS), 1),
        moments,
        affine,
        &params,
        &channels,
        &eps
    );
    Ok(params)
}

fn check_channels(what: &str, len: usize, channels: usize) -> Result<()> {
    if len != 2 * channels {
        candle_core::bail!("batch norm: {what} has {len} values for {channels} channels");
    }
    Ok(())
}

/// Training-mode batch norm (then ReLU when `relu`) of f32 `x` with its `moments` and
/// `affine` (both (2, C)).
pub(super) fn batch_norm(
    (x, x_layout): (&CudaStorage, &Layout),
    (moments, m_layout): (&CudaStorage, &Layout),
    (affine, a_layout): (&CudaStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (_, c, _) = nchw(x_layout)?;
    let (moments, affine) = (
        view::<f32>(moments, m_layout)?,
        view::<f32>(affine, a_layout)?,
    );
    check_channels("moments", moments.len(), c)?;
    check_channels("affine", affine.len(), c)?;
    let c32 = u32_of(c, "channels")?;
    let params = batch_norm_params(device, &moments, &affine, c32, eps)?;
    let (scale, shift) = (params.slice(0..c), params.slice(c..2 * c));
    affine_planes::<f32>((x, x_layout), (&scale, &shift), relu)
}

/// `x * scale[c] + shift[c]` (then ReLU) over every (image, channel) plane of (N, C, ...) `x`.
fn affine_planes<T: CudaDType + DeviceRepr + WithDType>(
    (x, x_layout): (&CudaStorage, &Layout),
    (scale, shift): (&CudaView<T>, &CudaView<T>),
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (_, channels, plane) = nchw(x_layout)?;
    let xs = view::<T>(x, x_layout)?;
    let y = output::<T>(device, xs.len())?;
    let planes = u32_of(xs.len() / plane.max(1), "planes")?;
    let (c32, plane32, relu) = (
        u32_of(channels, "channels")?,
        u32_of(plane, "plane")?,
        i32::from(relu),
    );
    if planes > 0 {
        launch!(
            device,
            &typed::<T>("channel_affine"),
            (planes, 1),
            &xs,
            scale,
            shift,
            &y,
            &c32,
            &plane32,
            &relu
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, device.clone()),
        x_layout.shape().clone(),
    ))
}

/// The gradients of [`batch_norm`] from (x, dL/dy, stats = (4, C): mean, variance, gamma,
/// beta): dL/dx, then dL/dgamma and dL/dbeta, flat, as the CPU op lays them out.
pub(super) fn batch_norm_grad(
    (x, x_layout): (&CudaStorage, &Layout),
    (dy, dy_layout): (&CudaStorage, &Layout),
    (stats, s_layout): (&CudaStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (n, c, plane) = nchw(x_layout)?;
    if dy_layout.shape() != x_layout.shape() {
        candle_core::bail!(
            "batch norm grad: input {:?}, output gradient {:?}",
            x_layout.shape(),
            dy_layout.shape()
        );
    }
    let stats = view::<f32>(stats, s_layout)?;
    if stats.len() != 4 * c {
        candle_core::bail!(
            "batch norm grad: {} statistics for {c} channels",
            stats.len()
        );
    }
    let (moments, affine) = (stats.slice(0..2 * c), stats.slice(2 * c..4 * c));
    let (xs, dys) = (view::<f32>(x, x_layout)?, view::<f32>(dy, dy_layout)?);
    let (n32, c32, plane32) = (
        u32_of(n, "batch")?,
        u32_of(c, "channels")?,
        u32_of(plane, "plane")?,
    );
    let relu = i32::from(relu);
    let params = batch_norm_params(device, &moments, &affine, c32, eps)?;
    let s = splits(n, c);
    // (sum g, sum g * x_hat) per block, as the kernel's `GradSums`.
    let partial = output::<f64>(device, 2 * c * s)?;
    launch!(
        device,
        "bn_grad_partial",
        (c32, s as u32),
        &xs,
        &dys,
        &moments,
        &params,
        &partial,
        &n32,
        &c32,
        &plane32,
        &relu
    );
    let numel = xs.len();
    let mut out = output::<f32>(device, numel + 2 * c)?;
    let s32 = s as u32;
    {
        let mut grad_affine = out.slice_mut(numel..numel + 2 * c);
        launch!(
            device,
            "bn_grad_finish",
            (c32.div_ceil(THREADS), 1),
            &partial,
            &mut grad_affine,
            &c32,
            &s32
        );
    }
    let count = (n * plane) as f32;
    let planes = u32_of(n * c, "planes")?;
    if planes > 0 {
        let (mut dx, mut grad_affine) = out.split_at_mut(numel);
        launch!(
            device,
            "bn_grad_input",
            (planes, 1),
            &xs,
            &dys,
            &moments,
            &affine,
            &params,
            &mut grad_affine,
            &mut dx,
            &c32,
            &plane32,
            &count,
            &relu
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, device.clone()),
        Shape::from(numel + 2 * c),
    ))
}

/// `f::<T>(args)` for the element type `T` of `dtype`, or an error naming `what`.
macro_rules! by_dtype {
    ($what:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            other => candle_core::bail!("{}: no CUDA kernel for {other:?}", $what),
        }
    };
}

/// The name of kernel `base` for element type `T`: `{base}_f32`, `_bf16` or `_f16`.
fn typed<T: WithDType>(base: &str) -> String {
    format!("{base}_{}", T::DTYPE.as_str())
}

/// An element-wise kernel `base(a, b, out, len)` over two tensors of one shape and type.
pub(super) fn zip(
    base: &str,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(base, a.0.dtype(), zip_typed(base, a, b))
}

fn zip_typed<T: CudaDType + DeviceRepr + WithDType>(
    base: &str,
    (a, a_layout): (&CudaStorage, &Layout),
    (b, b_layout): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    if a_layout.shape() != b_layout.shape() {
        candle_core::bail!(
            "{base}: shapes {:?} and {:?}",
            a_layout.shape(),
            b_layout.shape()
        );
    }
    let device = &a.device;
    let (a, b) = (view::<T>(a, a_layout)?, view::<T>(b, b_layout)?);
    let len = a.len();
    let out = output::<T>(device, len)?;
    launch!(
        device,
        &typed::<T>(base),
        (stride_blocks(len), 1),
        &a,
        &b,
        &out,
        &len
    );
    Ok((
        CudaStorage::wrap_cuda_slice(out, device.clone()),
        a_layout.shape().clone(),
    ))
}

/// (planes, h, w, out_h, out_w) of a 3x3 stride-2 padding-1 max-pool.
fn pool_dims(layout: &Layout) -> Result<(usize, u32, u32, u32, u32)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("max-pool of an empty {h}x{w} map");
    }
    let pooled = |size: usize| u32_of((size - 1) / 2 + 1, "pooled size");
    Ok((
        n * c,
        u32_of(h, "height")?,
        u32_of(w, "width")?,
        pooled(h)?,
        pooled(w)?,
    ))
}

/// The stem's 3x3, stride-2, padding-1 max-pool of an (N, C, H, W) tensor.
pub(super) fn max_pool(x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    by_dtype!("max-pool", x.dtype(), max_pool_typed(x, layout))
}

fn max_pool_typed<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (planes, h, w, out_h, out_w) = pool_dims(layout)?;
    let xs = view::<T>(x, layout)?;
    let len = planes * out_h as usize * out_w as usize;
    let y = output::<T>(device, len)?;
    launch!(
        device,
        &typed::<T>("max_pool"),
        (u32_of(planes, "planes")?, 1),
        &xs,
        &y,
        &h,
        &w,
        &out_h,
        &out_w
    );
    let (n, c, _, _) = layout.shape().dims4()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, device.clone()),
        Shape::from((n, c, out_h as usize, out_w as usize)),
    ))
}

/// dL/dx of [`max_pool`] from (x, y, dL/dy).
pub(super) fn max_pool_grad(
    x: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    by_dtype!("max-pool grad", x.0.dtype(), max_pool_grad_typed(x, y, dy))
}

fn max_pool_grad_typed<T: CudaDType + DeviceRepr + WithDType>(
    (x, x_layout): (&CudaStorage, &Layout),
    (y, y_layout): (&CudaStorage, &Layout),
    (dy, dy_layout): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let device = &x.device;
    let (planes, h, w, out_h, out_w) = pool_dims(x_layout)?;
    let pooled = planes * out_h as usize * out_w as usize;
    if y_layout.shape().elem_count() != pooled || dy_layout.shape() != y_layout.shape() {
        candle_core::bail!(
            "max-pool grad: output {:?} and its gradient {:?} for input {:?}",
            y_layout.shape(),
            dy_layout.shape(),
            x_layout.shape()
        );
    }
    let (xs, ys, dys) = (
        view::<T>(x, x_layout)?,
        view::<T>(y, y_layout)?,
        view::<T>(dy, dy_layout)?,
    );
    let grid = (u32_of(planes, "planes")?, 1);
    // Each output's argmax as its place in the window (the kernels' comment).
    let code = output::<u8>(device, pooled)?;
    launch!(
        device,
        &typed::<T>("max_pool_argmax"),
        grid,
        &xs,
        &ys,
        &code,
        &h,
        &w,
        &out_h,
        &out_w
    );
    let dx = output::<T>(device, xs.len())?;
    launch!(
        device,
        &typed::<T>("max_pool_grad"),
        grid,
        &code,
        &dys,
        &dx,
        &h,
        &w,
        &out_h,
        &out_w
    );
    Ok((
        CudaStorage::wrap_cuda_slice(dx, device.clone()),
        x_layout.shape().clone(),
    ))
}

/// `x * scale[c] + shift[c]`, then ReLU when `relu`, for (N, C, ...) `x` on a CUDA device in
/// f32, bf16 or f16 (scale and shift (C) of the same type): evaluation-mode batch norm
/// after a convolution. Not differentiable (evaluation only).
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &scale.contiguous()?,
        &shift.contiguous()?,
        &ChannelAffine { relu },
    )
}

struct ChannelAffine {
    relu: bool,
}

fn channel_affine_typed<T: CudaDType + DeviceRepr + WithDType>(
    relu: bool,
    (x, x_layout): (&CudaStorage, &Layout),
    (scale, s_layout): (&CudaStorage, &Layout),
    (shift, t_layout): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (_, c, _) = nchw(x_layout)?;
    let (scale, shift) = (view::<T>(scale, s_layout)?, view::<T>(shift, t_layout)?);
    if scale.len() != c || shift.len() != c {
        candle_core::bail!(
            "channel affine: {} scales and {} shifts for {c} channels",
            scale.len(),
            shift.len()
        );
    }
    affine_planes::<T>((x, x_layout), (&scale, &shift), relu)
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "vt-channel-affine"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        scale: &CudaStorage,
        s_layout: &Layout,
        shift: &CudaStorage,
        t_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let operands = ((x, x_layout), (scale, s_layout), (shift, t_layout));
        by_dtype!(
            self.name(),
            x.dtype(),
            channel_affine_typed(self.relu, operands.0, operands.1, operands.2)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, max_rel, test_gpu};
    use candle_core::{Device, Var};

    /// `f`'s output and the gradients of its inputs, for a fixed probe of the output, on
    /// `device` (results copied to the CPU).
    fn run(
        inputs: &[Tensor],
        device: &Device,
        f: impl Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&tensors);
        // Made on the CPU: the GPU's sin differs in the last bit.
        let probe = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .and_then(|t| t.reshape(y.shape())?.sin()?.to_device(device))
            .unwrap();
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let grads = tensors.iter().map(|t| cpu(grads.get(t).unwrap())).collect();
        (cpu(&y), grads)
    }

    /// `f` on the GPU against `f` on the CPU's kernels: output and every input gradient.
    fn check(case: &str, inputs: &[Tensor], tolerance: f32, f: impl Fn(&[Tensor]) -> Tensor) {
        let Some(gpu) = test_gpu() else { return };
        let (y_cpu, g_cpu) = run(inputs, &Device::Cpu, &f);
        let (y_gpu, g_gpu) = run(inputs, &gpu, &f);
        let rel = max_rel(&y_gpu, &y_cpu);
        assert!(rel <= tolerance, "{case}: output differs by {rel:e}");
        for (i, (g, expected)) in g_gpu.iter().zip(&g_cpu).enumerate() {
            let rel = max_rel(g, expected);
            assert!(rel <= tolerance, "{case}: gradient {i} differs by {rel:e}");
        }
    }

    fn randn(shape: &[usize], mean: f32, std: f32) -> Tensor {
        Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn batch_norm_matches_the_cpu() {
        // Not two values per channel: those normalise to +-1 whatever x is, so that the input
        // gradient is rounding noise.
        for shape in [
            [4, 8, 7, 5],
            [3, 16, 13, 13],
            [5, 3, 1, 1],
            [1, 5, 2, 3],
            [6, 64, 4, 4],
        ] {
            for relu in [false, true] {
                let c = shape[1];
                // An offset mean: the variance must not lose it to cancellation.
                let inputs = [
                    randn(&shape, 3.0, 2.0),
                    randn(&[c], 1.0, 0.5),
                    randn(&[c], 0.0, 0.5),
                ];
                check(&format!("{shape:?} relu {relu}"), &inputs, 1e-4, |t| {
                    let affine = Tensor::stack(&[&t[1], &t[2]], 0).unwrap();
                    let moments = kernels::channel_moments(&t[0]).unwrap();
                    kernels::batch_norm(&t[0], &moments, &affine, 1e-5, relu).unwrap()
                });
            }
        }
    }

    #[test]
    fn add_relu_matches_the_cpu() {
        let inputs = [
            randn(&[3, 5, 7, 9], 0.0, 1.0),
            randn(&[3, 5, 7, 9], 0.0, 1.0),
        ];
        check("add_relu", &inputs, 0.0, |t| {
            kernels::add_relu(&t[0], &t[1]).unwrap()
        });
    }

    #[test]
    fn max_pool_matches_the_cpu() {
        for shape in [[2, 3, 9, 9], [1, 2, 8, 11], [2, 4, 1, 1], [1, 1, 2, 5]] {
            // After a ReLU, as in the stem: many windows tie at zero.
            let x = randn(&shape, 0.0, 1.0).relu().unwrap();
            check(&format!("{shape:?}"), &[x], 0.0, |t| {
                kernels::max_pool_3x3_stride2_pad1(&t[0]).unwrap()
            });
        }
        let Some(gpu) = test_gpu() else { return };
        let with_nan =
            Tensor::new(&[[[[1f32, f32::NAN, 2.0], [0.5, 3.0, f32::NAN]]]], &gpu).unwrap();
        let pooled = kernels::max_pool_3x3_stride2_pad1(&with_nan).unwrap();
        let values = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            values.iter().all(|v| v.is_nan()),
            "NaN propagates: {values:?}"
        );
        // A NaN window's gradient goes to its last NaN, as on the CPU.
        let grad_on = |device: &Device| {
            let x = Var::from_tensor(&with_nan.to_device(device).unwrap()).unwrap();
            let y = kernels::max_pool_3x3_stride2_pad1(x.as_tensor()).unwrap();
            let probe = Tensor::new(&[[[[1f32, 10.0]]]], device).unwrap();
            let grads = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = grads.get(x.as_tensor()).unwrap();
            grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(grad_on(&gpu), grad_on(&Device::Cpu));
    }

    /// bf16 and f16 (inference at reduced precision): max-pool picks exactly the maxima of
    /// the rounded input, add + ReLU rounds once.
    #[test]
    fn max_pool_and_add_relu_take_half_types() {
        let Some(gpu) = test_gpu() else { return };
        for dtype in [DType::BF16, DType::F16] {
            let rounded = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let a = rounded(randn(&[2, 3, 9, 7], 0.0, 1.0));
            let b = rounded(randn(&[2, 3, 9, 7], 0.0, 1.0));
            let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let back = |t: Tensor| {
                t.to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let pooled = back(kernels::max_pool_3x3_stride2_pad1(&on_gpu(&a)).unwrap());
            let expected = kernels::max_pool_3x3_stride2_pad1(&a).unwrap();
            assert_eq!(max_rel(&pooled, &expected), 0.0, "{dtype:?} max-pool");
            let sum = back(kernels::add_relu(&on_gpu(&a), &on_gpu(&b)).unwrap());
            let rel = max_rel(&sum, &kernels::add_relu(&a, &b).unwrap());
            assert!(rel < 1e-2, "{dtype:?} add_relu differs by {rel:e}");
        }
    }

    #[test]
    fn channel_affine_follows_the_cpu_in_every_dtype() {
        let Some(gpu) = test_gpu() else { return };
        let (x, scale, shift) = (
            randn(&[2, 6, 5, 7], 0.0, 1.0),
            randn(&[6], 1.0, 0.5),
            randn(&[6], 0.0, 0.5),
        );
        for relu in [false, true] {
            let per_channel = |t: &Tensor| t.reshape((1, 6, 1, 1)).unwrap();
            let mut expected = x
                .broadcast_mul(&per_channel(&scale))
                .unwrap()
                .broadcast_add(&per_channel(&shift))
                .unwrap();
            if relu {
                expected = expected.relu().unwrap();
            }
            for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
                let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
                let y = channel_affine(&on_gpu(&x), &on_gpu(&scale), &on_gpu(&shift), relu)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let rel = max_rel(&y, &expected);
                assert!(
                    rel <= tolerance,
                    "{dtype:?} relu {relu}: differs by {rel:e}"
                );
            }
        }
    }
    #[test]
    fn adamw_matches_the_cpu() {
        let Some(gpu) = test_gpu() else { return };
        // Ragged: not a multiple of a block, more elements than one grid pass covers.
        let shape = [7, 300_001];
        let mut cpu_state: Option<(Tensor, Tensor, Tensor)> = None;
        let mut gpu_state: Option<(Tensor, Tensor, Tensor)> = None;
        let theta = randn(&shape, 0.0, 1.0);
        for t in 1..=3 {
            let step = kernels::AdamWStep::at_step(t, 0.01, 0.05, (0.9, 0.999), 1e-8);
            let grad = randn(&shape, 0.0, 1.0);
            let on_cpu = match &cpu_state {
                None => step.fused(&theta, &grad, None),
                Some((p, m, v)) => step.fused(p, &grad, Some((m, v))),
            };
            let on_gpu = {
                let grad = grad.to_device(&gpu).unwrap();
                match &gpu_state {
                    None => step.fused(&theta.to_device(&gpu).unwrap(), &grad, None),
                    Some((p, m, v)) => step.fused(p, &grad, Some((m, v))),
                }
            };
            let on_cpu = on_cpu.unwrap().unwrap();
            let on_gpu = on_gpu.unwrap().unwrap();
            for (what, got, want) in [
                ("parameter", &on_gpu.0, &on_cpu.0),
                ("first moment", &on_gpu.1, &on_cpu.1),
                ("second moment", &on_gpu.2, &on_cpu.2),
            ] {
                assert!(got.device().is_cuda(), "{what} left the GPU");
                let rel = max_rel(&got.to_device(&Device::Cpu).unwrap(), want);
                // Same operations in the same order, without fused multiply-adds.
                assert!(rel <= 1e-6, "step {t}: {what} differs by {rel:e}");
            }
            (cpu_state, gpu_state) = (Some(on_cpu), Some(on_gpu));
        }
    }
    #[test]
    fn sgd_matches_the_cpu() {
        let Some(gpu) = test_gpu() else { return };
        let shape = [7, 300_001];
        for (weight_decay, nesterov) in [(0.0, true), (5e-4, true), (5e-4, false)] {
            let step = kernels::SgdStep {
                lr: 0.05,
                weight_decay,
                momentum: 0.9,
                nesterov,
            };
            let theta = randn(&shape, 0.0, 1.0);
            let mut on_cpu = (theta.clone(), None::<Tensor>);
            let mut on_gpu = (theta.to_device(&gpu).unwrap(), None::<Tensor>);
            for t in 1..=3 {
                let grad = randn(&shape, 0.0, 1.0);
                let cpu_next = step.fused(&on_cpu.0, &grad, on_cpu.1.as_ref());
                let gpu_grad = grad.to_device(&gpu).unwrap();
                let gpu_next = step.fused(&on_gpu.0, &gpu_grad, on_gpu.1.as_ref());
                let (cpu_next, gpu_next) = (cpu_next.unwrap().unwrap(), gpu_next.unwrap().unwrap());
                for (what, got, want) in [
                    ("parameter", &gpu_next.0, &cpu_next.0),
                    ("momentum buffer", &gpu_next.1, &cpu_next.1),
                ] {
                    assert!(got.device().is_cuda(), "{what} left the GPU");
                    let rel = max_rel(&got.to_device(&Device::Cpu).unwrap(), want);
                    assert!(rel <= 1e-6, "{step:?} step {t}: {what} differs by {rel:e}");
                }
                on_cpu = (cpu_next.0, Some(cpu_next.1));
                on_gpu = (gpu_next.0, Some(gpu_next.1));
            }
        }
    }
}
