//! PyTorch's checkpoint files (`torch.save`'s zip format, PyTorch 1.6 and later: `.pth`,
//! `.pt`, `.bin`), parsed with candle's pickle reader: a state dict, or one under a
//! `state_dict`, `model` or `model_state_dict` key as training scripts save them beside
//! their epoch, optimiser or best accuracy. Tensors are read whatever their memory layout
//! (channels-last, slices, transposes): each gathers its elements from its storage by its
//! strides.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{checked_f32, Floats};
use crate::error::{ModelError, Result};

/// The keys a state dict is looked for under, before the file's top level.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "model_state_dict"];

/// Whether `bytes` start as a zip archive does, as `torch.save`'s files do.
pub(crate) fn is_torch_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Whether `bytes` start as a pickle does: `torch.save` before PyTorch 1.6, or with
/// `_use_new_zipfile_serialization=False`.
pub(crate) fn is_legacy_torch(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x80)
}

/// A state dict's entry: where its tensor lies, or why it cannot be read.
type Entry = std::result::Result<TensorInfo, String>;

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
    let mut zip = File::open(path)
        .map_err(|e| ModelError::io(path, e))
        .and_then(|file| {
            zip::ZipArchive::new(BufReader::new(file))
                .map_err(|e| invalid(format!("not a readable PyTorch checkpoint: {e}")))
        })?;
    let entries = state_dict(&mut zip).map_err(invalid)?;
    let mut tensors = BTreeMap::new();
    let mut budget = MAX_ELEMENTS;
    for (name, entry) in entries {
        let Some(kept) = select(&name) else {
            continue;
        };
        if tensors.contains_key(&kept) {
            return Err(invalid(format!(
                "two tensors, one of them `{name}`, would both load as `{kept}`"
            )));
        }
        let info = entry.map_err(|cause| invalid(format!("tensor `{name}`: {cause}")))?;
        let float = matches!(info.dtype, DType::F16 | DType::BF16 | DType::F64);
        if info.dtype != DType::F32 && !(floats == Floats::AnyToF32 && float) {
            return Err(ModelError::DType {
                path: path.to_path_buf(),
                name,
                found: format!("{:?}", info.dtype),
            });
        }
        let loaded = gather(&mut zip, &info, &mut budget);
        tensors.insert(
            kept.clone(),
            checked_f32(path, name, &kept, loaded, device)?,
        );
    }
    Ok(tensors)
}

/// The entries of the file's state dict, sorted by name: the dict under one of
/// [`STATE_DICT_KEYS`] that holds tensors, else the top level.
fn state_dict(
    zip: &mut zip::ZipArchive<BufReader<File>>,
) -> std::result::Result<Vec<(String, Entry)>, String> {
    let pickle = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
        .find(|name| name.ends_with("data.pkl"))
        .ok_or("a zip archive without data.pkl: not a PyTorch checkpoint")?;
    let dir = PathBuf::from(pickle.trim_end_matches(".pkl"));
    let mut stack = Stack::empty();
    let entry = zip.by_name(&pickle).map_err(|e| e.to_string())?;
    stack
        .read_loop(&mut BufReader::new(entry))
        .map_err(|e| format!("its pickle cannot be read: {e}"))?;
    let top = match stack.finalize().map_err(|e| e.to_string())? {
        // A TorchScript module's attributes.
        Object::Build { callable, args } => match *callable {
            Object::Reduce { callable, .. }
                if matches!(&*callable, Object::Class { module_name, class_name }
                    if module_name == "__torch__" && class_name == "Module") =>
            {
                *args
            }
            other => Object::Build {
                callable: Box::new(other),
                args,
            },
        },
        other => other,
    };
    let Object::Dict(top) = top else {
        return Err(
            "no state dict: the file holds no dict of tensors (a whole pickled \
                    module cannot be read: save its state_dict())"
                .into(),
        );
    };
    let entries = |dict: Vec<(Object, Object)>| -> Vec<(String, Entry)> {
        let mut entries: Vec<(String, Entry)> = dict
            .into_iter()
            .filter_map(|(key, value)| {
                let name = key.clone().unicode().ok()?;
                match value.into_tensor_info(key, &dir) {
                    Ok(Some(info)) => Some((name, Ok(info))),
                    // Not a tensor: an epoch, a nested dict beside the weights.
                    Ok(None) => None,
                    Err(e) => Some((name, Err(e.to_string()))),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    };
    let nested = STATE_DICT_KEYS.iter().find_map(|key| {
        top.iter().find_map(|(k, v)| match (k, v) {
            (Object::Unicode(k), Object::Dict(dict)) if k == key => {
                let found = entries(dict.clone());
                (!found.is_empty()).then_some(found)
            }
            _ => None,
        })
    });
    let found = nested.unwrap_or_else(|| entries(top));
    if found.is_empty() {
        return Err(format!(
            "no state dict of tensors, at its top level or under {}",
            STATE_DICT_KEYS.map(|k| format!("`{k}`")).join(", ")
        ));
    }
    Ok(found)
}

/// The most elements the tensors read from one file, or the part of a storage one tensor
/// reaches, may span: 1 GiB of f32, far beyond the ResNets and VT-ResNets read here
/// (ResNet-34 holds 22 million).
const MAX_ELEMENTS: usize = 1 << 28;

/// The tensor `info` describes, its elements gathered from its storage in the archive by
/// its shape, strides and offset, on the CPU; its elements are taken from what is left of
/// the file's `budget` (a tensor of stride 0 spans many elements of a few bytes).
fn gather(
    zip: &mut zip::ZipArchive<BufReader<File>>,
    info: &TensorInfo,
    budget: &mut usize,
) -> candle_core::Result<Tensor> {
    let size = info.dtype.size_in_bytes();
    let layout = &info.layout;
    // candle's reader gives the offset in bytes; the strides are in elements.
    let offset = layout.start_offset() / size;
    let dims = layout.dims();
    // The shape, strides and offset are the file's own numbers, as is its zip entry's size:
    // a damaged or crafted file can make them absurd. They are bounded before anything is
    // allocated, and only the storage the tensor reaches is read.
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= *budget);
    let reach = if count == Some(0) {
        Some(0)
    } else {
        dims.iter()
            .zip(layout.stride())
            .try_fold(offset, |at, (&d, &s)| {
                at.checked_add(d.saturating_sub(1).checked_mul(s)?)
            })
            .and_then(|last| last.checked_add(1))
            .filter(|&n| n <= MAX_ELEMENTS)
    };
    let shape = || {
        format!(
            "its shape {dims:?} (strides {:?}, offset {offset})",
            layout.stride()
        )
    };
    let (Some(count), Some(reach)) = (count, reach) else {
        return Err(candle_core::Error::Msg(format!(
            "{}, with the tensors before it, spans more than {MAX_ELEMENTS} elements, beyond \
             any model read here",
            shape()
        )));
    };
    *budget -= count;
    let mut bytes = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| candle_core::Error::Msg(format!("its storage {}: {e}", info.path)))?
        .take((reach * size) as u64)
        .read_to_end(&mut bytes)?;
    if bytes.len() < reach * size {
        return Err(candle_core::Error::Msg(format!(
            "{} reaches element {reach} of its storage, which holds {}",
            shape(),
            bytes.len() / size
        )));
    }
    let elements = bytes.len() / size;
    let storage = Tensor::from_raw_buffer(
        &bytes[..elements * size],
        info.dtype,
        &[elements],
        &Device::Cpu,
    )?
    .to_dtype(DType::F32)?
    .to_vec1::<f32>()?;
    let mut values = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let at = offset
            + index
                .iter()
                .zip(layout.stride())
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let value = storage.get(at).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "element {at} lies past its storage of {elements} elements"
            ))
        })?;
        values.push(*value);
        for axis in (0..dims.len()).rev() {
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Tensor::from_vec(values, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::read_selected as read_any;

    /// Written by tools/reference/torch_file_fixture.py with PyTorch.
    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-state-dict.pth")
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn read_fixture(
        select: impl FnMut(&str) -> Option<String>,
        floats: Floats,
    ) -> Result<BTreeMap<String, Tensor>> {
        read_any(&fixture(), &Device::Cpu, select, floats)
    }

    /// All but the named tensors, under their own names.
    fn all_but(dropped: &'static [&'static str]) -> impl FnMut(&str) -> Option<String> {
        move |name| (!dropped.contains(&name)).then(|| name.to_string())
    }

    /// The state dict under `state_dict` (not the tensor beside it), its prefix removed by
    /// the caller's selection, in f32 whatever its precision; a view reads its own elements,
    /// and transposed, channels-last and strided tensors their logical order.
    #[test]
    fn a_torch_save_state_dict_reads_as_f32_tensors() {
        let read = read_fixture(
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
            [
                "bn.running_var",
                "channels_last",
                "conv.weight",
                "offset",
                "strided",
                "transposed"
            ]
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
        let channels_last = &read["channels_last"];
        assert_eq!(channels_last.dims(), [1, 4, 2, 2]);
        assert_eq!(
            values(channels_last),
            (0..16).map(|v| v as f32).collect::<Vec<_>>()
        );
        assert_eq!(values(&read["strided"]), [0.0, 3.0, 6.0, 9.0]);
        assert!(read.values().all(|t| t.dtype() == DType::F32));
    }

    /// Checkpoints hold f32 only: the f16 tensor is refused by name. Tensors that are kept
    /// are checked: the integer counter by its dtype, the bool tensor (which candle cannot
    /// read) by its storage type, two names that become one; dropped ones are never read.
    #[test]
    fn precision_and_selection_are_checked_as_for_safetensors() {
        const COUNTER: &str = "module.bn.num_batches_tracked";
        fn refusal(select: impl FnMut(&str) -> Option<String>, floats: Floats) -> String {
            read_fixture(select, floats).unwrap_err().to_string()
        }
        let err = refusal(all_but(&["flag", COUNTER]), Floats::F32Only);
        assert!(err.contains("module.bn.running_var"), "{err}");
        let err = refusal(all_but(&["flag"]), Floats::AnyToF32);
        assert!(err.contains(COUNTER), "{err}");
        let err = refusal(all_but(&[COUNTER]), Floats::AnyToF32);
        assert!(
            err.contains("tensor `flag`") && err.contains("BoolStorage"),
            "{err}"
        );
        let same = |name: &str| {
            (name.starts_with("module.conv") || name.starts_with("module.offset"))
                .then(|| "same".to_string())
        };
        let err = refusal(same, Floats::AnyToF32);
        assert!(err.contains("would both load as `same`"), "{err}");
    }

    /// The fixture with its pickle's bytes `from` replaced by `to`, at `dir/edited.pth`.
    fn fixture_edited(dir: &Path, from: &[u8], to: &[u8]) -> PathBuf {
        use std::io::Write;
        let mut source = zip::ZipArchive::new(File::open(fixture()).unwrap()).unwrap();
        let path = dir.join("edited.pth");
        let mut edited = zip::ZipWriter::new(File::create(&path).unwrap());
        for i in 0..source.len() {
            let mut entry = source.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            if entry.name().ends_with("data.pkl") {
                let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
                bytes.splice(at..at + from.len(), to.iter().copied());
            }
            edited
                .start_file(entry.name(), zip::write::SimpleFileOptions::default())
                .unwrap();
            edited.write_all(&bytes).unwrap();
        }
        edited.finish().unwrap();
        path
    }

    /// A shape or strides that reach past the tensor's storage, or span more than any
    /// tensor read here, as a damaged or crafted file's may, is refused naming the tensor
    /// before anything is allocated for it (here 16 PiB, which would abort the process); an
    /// expanded tensor (a stride 0) reads as its elements repeated.
    #[test]
    fn shapes_beyond_their_storage_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let conv_weight = |path: &Path| {
            read_any(
                path,
                &Device::Cpu,
                |n| (n == "module.conv.weight").then(|| n.into()),
                Floats::F32Only,
            )
            .map(|mut read| read.remove("module.conv.weight").unwrap())
        };
        // `module.conv.weight`: shape (2, 3, 4) and strides (12, 4, 1), pickled as BININT1s
        // in TUPLE3s, the shape's memoised (BINPUT) before the strides'.
        let shape_and_strides = b"K\x02K\x03K\x04\x87q\x12K\x0cK\x04K\x01\x87";
        let huge = b"J\x00\x00\x00\x40J\x00\x00\x10\x00K\x04\x87q\x12K\x0cK\x04K\x01\x87";
        let past_the_end = b"K\x03K\x03K\x04\x87q\x12K\x0cK\x04K\x01\x87";
        for (edited, needle) in [
            (&huge[..], "spans more than 268435456 elements"),
            (
                &past_the_end[..],
                "reaches element 36 of its storage, which holds 24",
            ),
        ] {
            let path = fixture_edited(dir.path(), shape_and_strides, edited);
            let err = conv_weight(&path).unwrap_err().to_string();
            assert!(
                err.contains("module.conv.weight") && err.contains(needle),
                "{err}"
            );
        }
        let expanded = b"K\x64K\x03K\x04\x87q\x12K\x00K\x04K\x01\x87";
        let path = fixture_edited(dir.path(), shape_and_strides, expanded);
        let read = conv_weight(&path).unwrap();
        assert_eq!(read.dims(), [100, 3, 4]);
        let first: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(values(&read), first.repeat(100));
    }

    #[test]
    fn files_that_are_not_state_dicts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let read = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = read_any(&path, &Device::Cpu, |n| Some(n.into()), Floats::AnyToF32)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            err
        };
        let err = read("cut.pth", b"PK\x03\x04");
        assert!(err.contains("not a readable PyTorch checkpoint"), "{err}");
        // A zip archive's end record alone: an archive of no files.
        let mut no_files = b"PK\x03\x04PK\x05\x06".to_vec();
        no_files.extend([0u8; 18]);
        let err = read("no-files.pth", &no_files);
        assert!(err.contains("without data.pkl"), "{err}");
        // torch.save's format before PyTorch 1.6: a pickle, protocol 2.
        let err = read("legacy.pth", b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.");
        assert!(err.contains("PyTorch's format before 1.6"), "{err}");
        let err = read("empty.pth", b"");
        assert!(err.contains("the file is empty"), "{err}");
    }
}
