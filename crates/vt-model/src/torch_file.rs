//! PyTorch's checkpoint files (`torch.save`'s zip format, PyTorch 1.6 and later: `.pth`,
//! `.pt`, `.bin`), read with candle's pickle reader: a state dict, or one under a
//! `state_dict`, `model` or `model_state_dict` key as training scripts save them beside
//! their epoch and optimiser.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{checked_f32, Floats};
use crate::error::{ModelError, Result};

/// The keys a state dict is looked for under, in order, when the file's top level holds
/// none (`None`: the top level itself).
const STATE_DICT_KEYS: [Option<&str>; 4] = [
    None,
    Some("state_dict"),
    Some("model"),
    Some("model_state_dict"),
];

/// Whether `bytes` start as a zip archive does, as `torch.save`'s files do.
pub(crate) fn is_torch_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// The tensors of the PyTorch file at `path` that `select` keeps, under the names it
/// returns, as f32 on `device`, checked as [`crate::checkpoint::read_selected`] checks a
/// safetensors file's.
pub(crate) fn read_selected(
    path: &Path,
    device: &Device,
    mut select: impl FnMut(&str) -> Option<String>,
    floats: Floats,
) -> Result<BTreeMap<String, Tensor>> {
    let invalid = |message: String| ModelError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let file = STATE_DICT_KEYS
        .iter()
        .map(|key| PthTensors::new(path, *key))
        .find(|read| {
            read.as_ref()
                .is_ok_and(|file| !file.tensor_infos().is_empty())
        })
        .unwrap_or_else(|| PthTensors::new(path, None))
        .map_err(|e| invalid(format!("not a readable PyTorch checkpoint: {e}")))?;
    if file.tensor_infos().is_empty() {
        return Err(invalid(
            "a PyTorch file without a state dict of tensors (at its top level or under \
             `state_dict`, `model` or `model_state_dict`); a whole pickled module cannot be \
             read: save its `state_dict()`"
                .into(),
        ));
    }
    let mut names: Vec<&String> = file.tensor_infos().keys().collect();
    names.sort();
    let mut tensors = BTreeMap::new();
    for name in names {
        let Some(kept) = select(name) else {
            continue;
        };
        if tensors.contains_key(&kept) {
            return Err(invalid(format!(
                "two tensors, one of them `{name}`, would both load as `{kept}`"
            )));
        }
        let dtype = file.tensor_infos()[name].dtype;
        let float = matches!(dtype, DType::F16 | DType::BF16 | DType::F64);
        if dtype != DType::F32 && !(floats == Floats::AnyToF32 && float) {
            return Err(ModelError::DType {
                path: path.to_path_buf(),
                name: name.clone(),
                found: format!("{dtype:?}"),
            });
        }
        let loaded = file.get(name).and_then(|tensor| {
            tensor.ok_or_else(|| candle_core::Error::Msg("listed but not stored".into()))
        });
        let tensor = checked_f32(path, name.clone(), &kept, loaded, device)?;
        tensors.insert(kept, tensor);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::read_selected as read_any;

    /// Written by tools/reference/torch_file_fixture.py with PyTorch.
    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-state-dict.pth")
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The state dict under `state_dict`, its prefix removed by the caller's selection, in
    /// f32 whatever its precision; a view reads its own elements, a transposed tensor its
    /// logical order.
    #[test]
    fn a_torch_save_state_dict_reads_as_f32_tensors() {
        let read = read_any(
            &fixture(),
            &Device::Cpu,
            |name| {
                let name = name.strip_prefix("module.")?;
                (!name.ends_with("num_batches_tracked")).then(|| name.to_string())
            },
            Floats::AnyToF32,
        )
        .unwrap();
        let names: Vec<&str> = read.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["bn.running_var", "conv.weight", "offset", "transposed"]
        );
        let conv = &read["conv.weight"];
        assert_eq!(conv.dims(), [2, 3, 4]);
        assert_eq!(values(conv), (0..24).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(
            values(&read["bn.running_var"]),
            [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
        );
        assert_eq!(values(&read["offset"]), [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        let transposed = &read["transposed"];
        assert_eq!(transposed.dims(), [3, 2]);
        assert_eq!(values(transposed), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(read.values().all(|t| t.dtype() == DType::F32));
    }

    /// Checkpoints hold f32 only: the f16 tensor is refused by name; the integer counter,
    /// dropped by the selection, is never read.
    #[test]
    fn precision_and_selection_are_checked_as_for_safetensors() {
        let err = read_any(
            &fixture(),
            &Device::Cpu,
            |name| (!name.ends_with("num_batches_tracked")).then(|| name.to_string()),
            Floats::F32Only,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("module.bn.running_var"), "{err}");
        let err = read_any(
            &fixture(),
            &Device::Cpu,
            |name| (!name.ends_with("num_batches_tracked")).then(|| "same".to_string()),
            Floats::AnyToF32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("would both load as `same`"), "{err}");
        // Not dropped, the integer counter is refused by its dtype.
        let err = read_any(
            &fixture(),
            &Device::Cpu,
            |n| Some(n.into()),
            Floats::AnyToF32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("module.bn.num_batches_tracked"), "{err}");
    }

    #[test]
    fn files_that_are_not_state_dicts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty_zip = dir.path().join("empty.pth");
        // A zip archive's end record alone: an archive of no files.
        let mut end = b"PK\x05\x06".to_vec();
        end.extend([0u8; 18]);
        std::fs::write(&empty_zip, b"PK\x03\x04").unwrap();
        let err = read_any(
            &empty_zip,
            &Device::Cpu,
            |n| Some(n.into()),
            Floats::AnyToF32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a readable PyTorch checkpoint"), "{err}");
        let no_files = dir.path().join("no-files.pth");
        std::fs::write(&no_files, [b"PK\x03\x04".as_slice(), &end].concat()).unwrap();
        let err = read_any(
            &no_files,
            &Device::Cpu,
            |n| Some(n.into()),
            Floats::AnyToF32,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&no_files.display().to_string()) && err.contains("without a state dict"),
            "{err}"
        );
    }
}
