//! Device and precision from the command line: `cpu`, `cuda`, `cuda:N` or `auto`, and
//! `f32`, `f16` or `bf16`.

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};

/// Parses a device name. `auto` takes the first CUDA GPU when the binary was built with
/// the `cuda` feature and one is present, and the CPU otherwise (a CUDA build on a machine
/// without a GPU included).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(ModelError::Device(format!(
                "unknown device `{other}` (expected cpu, cuda, cuda:N or auto)"
            ))),
        },
    }
}

/// The device as [`parse_device`] names it ("cpu", "cuda:0"), for logs.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Whether `name`, as [`parse_device`] takes it, picks a GPU; `auto` asks the driver whether
/// there is one, without opening it. Callers size CPU work by it (a GPU run wants the cores
/// for loading images); an unusable name is [`parse_device`]'s to report.
pub fn names_a_gpu(name: &str) -> bool {
    match name {
        "auto" => gpu_count() > 0,
        other => other == "cuda" || other.starts_with("cuda:"),
    }
}

/// How many GPUs the CUDA driver reports (none in a build without CUDA).
fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    return candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .map_or(0, |n| usize::try_from(n).unwrap_or(0));
    #[cfg(not(feature = "cuda"))]
    0
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Device(
            "this binary was built without CUDA support; rebuild with `--features cuda` \
             (see README, GPU build) or use --device cpu"
                .into(),
        ));
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Device(format!(
            "cannot open CUDA device {ordinal}: {e} (is a GPU present?)"
        ))
    })?;
    #[cfg(feature = "cuda")]
    cuda_runtime::configure(&device)
        .map_err(|e| ModelError::Device(format!("cannot configure CUDA device {ordinal}: {e}")))?;
    Ok(device)
}

/// What the CUDA driver does by default and a training loop or a server does not want.
#[cfg(feature = "cuda")]
mod cuda_runtime {
    use candle_core::cuda::cudarc::driver::{result, sys, DriverError};
    use candle_core::Device;

    pub(super) fn configure(device: &Device) -> Result<(), DriverError> {
        let Device::Cuda(cuda) = device else {
            return Ok(());
        };
        // candle allocates from the device's memory pool, which by default hands memory freed
        // by tensors back to the system at every synchronisation: once per training step
        // (the gradient norm is read) or per served batch, so every step mapped its
        // activations' gigabytes afresh. PyTorch's caching allocator keeps them; so does this.
        // (A GPU without memory pools allocates synchronously: there is no pool to keep.)
        let stream = cuda.cuda_stream();
        let context = stream.context();
        let pools = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED;
        if context.attribute(pools)? > 0 {
            let mut keep = u64::MAX;
            // SAFETY: the device is the context's, and the release threshold is a u64.
            unsafe {
                let pool = result::device::get_mem_pool(context.cu_device())?;
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )?;
            }
        }
        // cudarc creates two events with every allocation and destroys them with it (four
        // driver calls per tensor), to order work across streams. candle runs on the calling
        // thread's stream and never creates another, so cudarc never waits on those events;
        // the one hand-over between threads, a loader worker's batch, synchronises explicitly
        // (vt-data's staging).
        // SAFETY: as above, no work is ordered across streams by events.
        unsafe { cuda.disable_event_tracking() };
        Ok(())
    }
}

/// The precisions [`parse_dtype`] takes, as `--dtype` lists them.
pub const DTYPE_NAMES: [&str; 3] = ["f32", "f16", "bf16"];

/// Parses an inference precision and checks that `device` can run it. Checkpoints stay f32
/// on disk; the weights are converted when loaded.
pub fn parse_dtype(name: &str, device: &Device) -> Result<DType> {
    let dtype = match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => {
            return Err(ModelError::Precision(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )))
        }
    };
    if dtype == DType::BF16 && device.is_cpu() {
        // candle's CPU matrix product has no bf16 path.
        return Err(ModelError::Precision(
            "bf16 tensors run on CUDA devices only; on the CPU use f32 (fastest there), with \
             --bf16-products for bfloat16 products where the CPU has AVX512-BF16"
                .into(),
        ));
    }
    Ok(dtype)
}

/// Turns bfloat16 products for f32 work on or off ([`crate::kernels::allow_bf16_products`]):
/// a CPU option for a model computing in `dtype` f32, refused on other devices, with
/// another precision (whose layers they would not touch) and on CPUs without AVX512-BF16.
pub fn use_bf16_products(on: bool, device: &Device, dtype: DType) -> Result<()> {
    if on && dtype != DType::F32 {
        return Err(ModelError::Precision(format!(
            "bfloat16 products speed up f32 layers, and --dtype {} has none: leave one of \
             the two out",
            dtype.as_str()
        )));
    }
    if on && !device.is_cpu() {
        return Err(ModelError::Device(
            "bfloat16 products are a CPU option; on a GPU use --dtype bf16 for inference, \
             TF32 for training"
                .into(),
        ));
    }
    crate::kernels::allow_bf16_products(on).map_err(|e| ModelError::Device(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_named_as_the_option_takes_it() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }

    #[test]
    fn cpu_and_bad_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("auto").unwrap().is_cpu());
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
        }
    }

    /// A GPU opened by name keeps freed memory in its pool, allocates without events, and
    /// computes as before.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpus_keep_their_memory_pool_and_skip_events() {
        use candle_core::cuda::cudarc::driver::{result, sys};
        if crate::kernels::test_gpu().is_none() {
            return;
        }
        let device = parse_device("cuda").unwrap();
        let cuda = device.as_cuda_device().unwrap();
        assert!(!cuda.is_event_tracking());
        let mut threshold = 0u64;
        // SAFETY: the device is the context's, and the release threshold is a u64.
        unsafe {
            let pool = result::device::get_mem_pool(cuda.cuda_stream().context().cu_device());
            result::mem_pool::get_attribute(
                pool.unwrap(),
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .unwrap();
        }
        assert_eq!(threshold, u64::MAX);
        let x = candle_core::Tensor::arange(0f32, 4.0, &device).unwrap();
        let doubled = (&x + &x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(doubled, [0.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn which_names_pick_a_gpu() {
        for (name, gpu) in [
            ("cpu", false),
            ("cuda", true),
            ("cuda:1", true),
            ("tpu", false),
        ] {
            assert_eq!(names_a_gpu(name), gpu, "{name}");
        }
        let auto = parse_device("auto").unwrap();
        assert_eq!(names_a_gpu("auto"), auto.is_cuda());
    }

    #[test]
    fn dtypes_and_what_the_cpu_runs() {
        assert_eq!(parse_dtype("f32", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("f16", &Device::Cpu).unwrap(), DType::F16);
        let err = parse_dtype("bf16", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("CUDA devices only"), "{err}");
        let err = parse_dtype("f64", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("expected f32, f16 or bf16"), "{err}");
    }
}
