//! Device selection from the command line: `cpu`, `cuda`, `cuda:N` or `auto`.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// Parses a device name. `auto` takes the first CUDA GPU when the binary was built with
/// the `cuda` feature and one is present, and the CPU otherwise.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(ModelError::Device(format!(
                "unknown device `{other}` (expected cpu, cuda, cuda:N or auto)"
            ))),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Device(
            "this binary was built without CUDA support; rebuild with `--features cuda` \
             (see README, GPU build) or use --device cpu"
                .into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Device(format!(
            "cannot open CUDA device {ordinal}: {e} (is a GPU present?)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
