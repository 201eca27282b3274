//! Checkpoint folders: `config.json` and `model.safetensors` (f32, contract names).
//!
//! Loading is strict: every tensor of the model must be present with its exact shape and
//! dtype, and nothing else may be (BatchNorm's `num_batches_tracked` is ignored whatever its
//! dtype); every weight must be finite and every BatchNorm running variance non-negative
//! (the contract's square root of it is NaN otherwise). Writing is atomic: the folder is
//! built beside its destination and renamed into place, so a crash leaves either the
//! previous checkpoint or the new one, never a mix. Only writers repair what an interrupted
//! write left: a reader that renamed folders could race a writer between its two renames.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::config::VtConfig;
use crate::error::{ModelError, Result};
use crate::temporary::{self, Kind};
use crate::torch_file;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// What marks a vt-train run folder, and the checkpoints it writes there: named when a run
/// folder is given where a checkpoint is expected. Its options file alone may be a user's
/// own `config.toml`: a run also holds one of `RUN_OUTPUTS` (its lock from the start).
const RUN_OPTIONS_FILE: &str = "config.toml";
const RUN_OUTPUTS: [&str; 3] = [".lock", "metrics.jsonl", RUN_STATE];
const RUN_CHECKPOINTS: [&str; 2] = ["best", "last"];
/// A run's saved training state, a checkpoint among other files.
const RUN_STATE: &str = "state";
/// The weight average (`--ema`) in a run's state, beside the raw weights.
const RUN_STATE_AVERAGE: &str = "ema.safetensors";

/// The SHA-256 of a weights file's bytes, in hex: the checkpoint's identity, as vt-serve's
/// `/v1/models` and an ONNX export's metadata give it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads and validates `DIR/config.json`. A run's `state/` that keeps a weight average is
/// refused: its `model.safetensors` holds the raw weights, not the averaged ones that the run
/// validated and wrote to `best/` and `last/` ([`read_run_state_config`] reads it to resume).
pub fn read_config(dir: &Path) -> Result<VtConfig> {
    // The folder's own name, whatever the path calls it (`.`, a link).
    let folder = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if folder.file_name().is_some_and(|name| name == RUN_STATE)
        && dir.join(RUN_STATE_AVERAGE).is_file()
    {
        return Err(ModelError::AveragedRunState {
            path: dir.to_path_buf(),
        });
    }
    // A run's folder with a config.json put in it is still no checkpoint.
    if is_run(dir) {
        refuse_non_checkpoint(dir)?;
    }
    read_run_state_config(dir)
}

/// Whether `dir` is a training run's folder: its `config.toml` and a trace of its training
/// (its state, metrics, or the lock a run takes first). A `config.toml` alone may be a
/// user's options file.
pub fn is_run(dir: &Path) -> bool {
    dir.join(RUN_OPTIONS_FILE).is_file()
        && RUN_OUTPUTS.iter().any(|output| dir.join(output).exists())
}

/// As [`read_config`], a run's `state/` included, whatever it keeps: for resuming it.
pub fn read_run_state_config(dir: &Path) -> Result<VtConfig> {
    refuse_interrupted_write(dir)?;
    let path = dir.join(CONFIG_FILE);
    if !path.exists() {
        refuse_non_checkpoint(dir)?;
    }
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: VtConfig = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
        path: path.clone(),
        cause,
    })?;
    config.validate().map_err(|e| ModelError::Invalid {
        path,
        message: e.to_string(),
    })?;
    Ok(config)
}

/// Says what `dir`, which holds no `config.json`, is instead, when that explains it better
/// than the missing file: nothing at all, a file (its `model.safetensors`, say), a folder
/// of checkpoints, or a training run's folder. A checkpoint folder passes: commands that
/// derive outputs from the path call this before they load it.
pub fn refuse_non_checkpoint(dir: &Path) -> Result<()> {
    if !dir.exists() {
        refuse_interrupted_write(dir)?;
        // `best` is in `.`, which names its folder to a reader (`""` names none).
        let run = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let in_run = dir
            .file_name()
            .is_some_and(|name| RUN_CHECKPOINTS.iter().any(|c| name == *c))
            && run.join(RUN_OPTIONS_FILE).is_file()
            && run.join(RUN_STATE).join(CONFIG_FILE).is_file();
        return Err(if in_run {
            ModelError::RunCheckpointMissing {
                path: dir.to_path_buf(),
                run: run.to_path_buf(),
            }
        } else {
            ModelError::NoCheckpoint {
                path: dir.to_path_buf(),
            }
        });
    }
    if !dir.is_dir() {
        return Err(ModelError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }
    let mut inner: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .flatten()
        // Hidden ones are writers' temporaries and backups, not checkpoints to offer.
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .map(|entry| entry.path())
        .filter(|path| path.join(CONFIG_FILE).is_file())
        .collect();
    inner.sort();
    if !is_run(dir) {
        if inner.is_empty() {
            return Ok(());
        }
        return Err(ModelError::FolderOfCheckpoints {
            path: dir.to_path_buf(),
            checkpoints: inner
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let candidates = RUN_CHECKPOINTS.map(|name| dir.join(name));
    let found: Vec<String> = candidates
        .iter()
        .filter(|c| c.join(CONFIG_FILE).is_file())
        .map(|c| c.display().to_string())
        .collect();
    let checkpoints = if found.is_empty() {
        format!(
            "{} or {}, once its first epoch has ended",
            candidates[0].display(),
            candidates[1].display()
        )
    } else {
        found.join(" or ")
    };
    Err(ModelError::RunFolder {
        path: dir.to_path_buf(),
        checkpoints,
    })
}

/// Writes `config` and every variable of `varmap` to `dir`, atomically.
pub fn write(dir: &Path, config: &VtConfig, varmap: &VarMap) -> Result<()> {
    let json = serde_json::to_string_pretty(config).map_err(|cause| ModelError::Json {
        path: dir.join(CONFIG_FILE),
        cause,
    })?;
    write_dir_atomically(dir, |tmp| {
        let config_path = tmp.join(CONFIG_FILE);
        fs::write(&config_path, json.as_bytes()).map_err(|e| ModelError::io(&config_path, e))?;
        let weights = tmp.join(WEIGHTS_FILE);
        varmap.save(&weights).map_err(|cause| ModelError::Write {
            path: weights,
            cause: Box::new(cause),
        })?;
        Ok(())
    })
}

/// Reads a safetensors file as named f32 tensors on `device`, checking each dtype and that
/// every value is finite. Tensors named `*.num_batches_tracked` are dropped.
pub fn read_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| ModelError::io(path, e))?;
    tensors_of(path, &bytes, device)
}

/// [`read_tensors`] of a file's `bytes`, read once from `path` (which errors name), e.g. to
/// hash the same bytes the tensors come from.
pub fn tensors_of(path: &Path, bytes: &[u8], device: &Device) -> Result<BTreeMap<String, Tensor>> {
    select_tensors(
        path,
        bytes,
        device,
        |name| (!name.ends_with(".num_batches_tracked")).then(|| name.to_string()),
        Floats::F32Only,
    )
}

/// Checks that the safetensors file's `bytes` (read from `path`) hold exactly the tensors
/// `expected` names, with those shapes (`*.num_batches_tracked` aside), from its header
/// alone: before a model of the config's sizes is allocated, so that a config claiming
/// absurd sizes is refused by name instead of aborting on the allocation.
pub fn check_shapes(
    path: &Path,
    bytes: &[u8],
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| invalid_safetensors(path, bytes, e))?;
    let found: BTreeMap<String, Vec<usize>> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.ends_with(".num_batches_tracked"))
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    if let Some(name) = expected.keys().find(|n| !found.contains_key(n.as_str())) {
        return Err(ModelError::MissingTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    if let Some(name) = found.keys().find(|n| !expected.contains_key(n.as_str())) {
        return Err(ModelError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    for (name, shape) in expected {
        if &found[name] != shape {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: shape.clone(),
                found: found[name].clone(),
            });
        }
    }
    Ok(())
}

/// Why `bytes`, read from `path`, are no safetensors file: where the header's numbers
/// disagree, the tensor at fault (the safetensors crate names none) or the file's cut or
/// extra bytes; else the crate's reason.
fn invalid_safetensors(
    path: &Path,
    bytes: &[u8],
    error: safetensors::SafeTensorError,
) -> ModelError {
    let reason = header_fault(bytes).unwrap_or_else(|| error.to_string());
    ModelError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {reason}"),
    }
}

/// The first disagreement in a safetensors file between a tensor's shape and dtype and its
/// `data_offsets`, or between the offsets and the bytes the file holds after its header.
/// None where the header does not read as JSON of tensors, or agrees.
fn header_fault(bytes: &[u8]) -> Option<String> {
    let length = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..length.checked_add(8)?)?;
    let data = bytes.len() - 8 - length;
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut spans = Vec::new();
    for (name, entry) in entries.iter().filter(|(name, _)| *name != "__metadata__") {
        let dtype: safetensors::Dtype = serde_json::from_value(entry.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(entry.get("shape")?.clone()).ok()?;
        let [begin, end]: [usize; 2] =
            serde_json::from_value(entry.get("data_offsets")?.clone()).ok()?;
        let needed = shape
            .iter()
            .try_fold(dtype.bitsize(), |n, &d| n.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        if needed != end.checked_sub(begin) {
            let needed = needed.map_or_else(|| "more than a usize of".into(), |n| n.to_string());
            let given = end
                .checked_sub(begin)
                .map_or_else(|| "a negative length".into(), |n| format!("{n} bytes"));
            return Some(format!(
                "tensor `{name}`: its shape {shape:?} of {dtype:?} takes {needed} bytes, its \
                 data_offsets [{begin}, {end}] give {given}"
            ));
        }
        spans.push((begin, end, name));
    }
    // In the order of the data: the first tensor past its end is the one a cut falls in.
    spans.sort();
    if let Some((_, end, name)) = spans.iter().find(|(_, end, _)| *end > data) {
        return Some(format!(
            "tensor `{name}` ends at byte {end} of the data after the header, which holds \
             {data} bytes: the file is cut short (or its header is wrong)"
        ));
    }
    let last_end = spans.iter().map(|(_, end, _)| *end).max().unwrap_or(0);
    (last_end < data).then(|| {
        format!(
            "{} bytes follow the last tensor's data, which no safetensors writer leaves \
             (a file written over, or appended to?)",
            data - last_end
        )
    })
}

/// Which dtypes [`read_selected`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Floats {
    /// Checkpoints are f32 by contract.
    F32Only,
    /// f16, bf16 and f64 are converted to f32 (pretrained files come in any precision).
    AnyToF32,
}

/// Reads the tensors of a safetensors file that `select` keeps, under the names it returns,
/// as f32 on `device`. Selection comes first, so that a tensor dropped anyway cannot fail the
/// read by its dtype. A value that is not finite, or a negative running variance, is an
/// error naming the tensor.
pub(crate) fn read_selected(
    path: &Path,
    device: &Device,
    select: impl FnMut(&str) -> Option<String>,
    floats: Floats,
) -> Result<BTreeMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| ModelError::io(path, e))?;
    if torch_file::is_torch_zip(&bytes) {
        return torch_file::read_selected(path, device, select, floats);
    }
    let invalid = |message: &str| ModelError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    };
    if bytes.is_empty() {
        return Err(invalid("the file is empty"));
    }
    if torch_file::is_legacy_torch(&bytes) {
        return Err(invalid(
            "PyTorch's format before 1.6 (or _use_new_zipfile_serialization=False), which \
             cannot be read: load it in PyTorch and torch.save it again",
        ));
    }
    select_tensors(path, &bytes, device, select, floats)
}

/// [`read_selected`] of the file's `bytes`, read from `path`.
fn select_tensors(
    path: &Path,
    bytes: &[u8],
    device: &Device,
    mut select: impl FnMut(&str) -> Option<String>,
    floats: Floats,
) -> Result<BTreeMap<String, Tensor>> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| invalid_safetensors(path, bytes, e))?;
    let mut tensors = BTreeMap::new();
    // The file's name for each kept name: two that select the same one are an error.
    let mut origins = BTreeMap::new();
    for (name, view) in file.tensors() {
        let Some(kept) = select(&name) else {
            continue;
        };
        if let Some(other) = origins.insert(kept.clone(), name.clone()) {
            // In name order: the file's tensor order is not fixed.
            let (a, b) = if other < name {
                (other, name)
            } else {
                (name, other)
            };
            return Err(ModelError::Invalid {
                path: path.to_path_buf(),
                message: format!("tensors `{a}` and `{b}` would both load as `{kept}`"),
            });
        }
        let convertible = matches!(
            view.dtype(),
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F64
        );
        if view.dtype() != safetensors::Dtype::F32 && !(floats == Floats::AnyToF32 && convertible) {
            return Err(ModelError::DType {
                path: path.to_path_buf(),
                name,
                found: format!("{:?}", view.dtype()),
            });
        }
        let tensor = checked_f32(path, name, &kept, view.load(&Device::Cpu), device)?;
        tensors.insert(kept, tensor);
    }
    Ok(tensors)
}

/// `loaded` (the tensor `name` of the file at `path`, to be kept as `kept`) in f32 on
/// `device`, once every value is known finite and, for a running variance, not negative:
/// errors name the tensor.
pub(crate) fn checked_f32(
    path: &Path,
    name: String,
    kept: &str,
    loaded: candle_core::Result<Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let tensor_error = |cause| ModelError::Tensor {
        path: path.to_path_buf(),
        name: name.clone(),
        cause: Box::new(cause),
    };
    let loaded = loaded.map_err(tensor_error)?;
    let values = loaded
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(tensor_error)?;
    if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            name,
            index,
            value: *value,
        });
    }
    if kept.ends_with(".running_var") {
        if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(ModelError::NegativeVariance {
                path: path.to_path_buf(),
                name,
                index,
                value: *value,
            });
        }
    }
    Tensor::from_vec(values, loaded.dims(), device).map_err(tensor_error)
}

/// Copies `tensors` into the variables of `varmap` that `wanted` names: the two name sets
/// must be equal and every shape must match. Nothing is copied unless all is well.
pub fn assign_strict(
    path: &Path,
    varmap: &VarMap,
    tensors: &BTreeMap<String, Tensor>,
    wanted: impl Fn(&str) -> bool,
) -> Result<()> {
    let all = varmap.data().lock().map_err(|_| ModelError::Invalid {
        path: path.to_path_buf(),
        message: "variable map lock poisoned".into(),
    })?;
    let vars: BTreeMap<&String, &Var> = all.iter().filter(|(name, _)| wanted(name)).collect();
    let expected: BTreeSet<&String> = vars.keys().copied().collect();
    if let Some(name) = expected.iter().find(|n| !tensors.contains_key(n.as_str())) {
        return Err(ModelError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    if let Some(name) = tensors.keys().find(|n| !expected.contains(n)) {
        return Err(ModelError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    for (&name, var) in &vars {
        let tensor = &tensors[name];
        if tensor.dims() != var.dims() {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
    }
    for (&name, var) in &vars {
        var.set(&tensors[name].to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// `dir` with a last component to name its siblings by: `.`, `..` and paths ending in them
/// have none, so they are resolved to the folder they name.
fn named(dir: &Path) -> Result<Cow<'_, Path>> {
    if dir.file_name().is_some() {
        return Ok(Cow::Borrowed(dir));
    }
    let resolved = fs::canonicalize(dir).map_err(|e| ModelError::io(dir, e))?;
    if resolved.file_name().is_none() {
        return Err(ModelError::Invalid {
            path: dir.to_path_buf(),
            message: "a checkpoint path must name a folder".into(),
        });
    }
    Ok(Cow::Owned(resolved))
}

/// `.NAME.SUFFIX` beside `dir`, which must have a last component (see [`named`]).
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| ModelError::Invalid {
        path: dir.to_path_buf(),
        message: "a checkpoint path must name a folder".into(),
    })?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// The previous version of `dir` at `.NAME.old` when nothing is at `NAME`: what a crash
/// between the two renames of [`write_dir_atomically`] leaves, the only copy of the
/// checkpoint.
pub fn previous_version(dir: &Path) -> Result<Option<PathBuf>> {
    let dir = named(dir)?;
    let old = sibling(&dir, "old")?;
    Ok((!dir.exists() && old.is_dir()).then_some(old))
}

/// Finishes what a crash left of a [`write_dir_atomically`]: between its two renames, the
/// previous version at `.NAME.old` and nothing at `NAME`, put back; after the second, before
/// the removal of the previous version (or during it), a stale `.NAME.old` beside the new
/// `NAME`, removed, as long as `NAME` has every file it has: a `NAME` someone else made
/// (a copy interrupted) leaves both for its reader to refuse. For writers only (see the
/// module doc).
pub fn recover_interrupted_write(dir: &Path) -> Result<()> {
    let dir = named(dir)?;
    let old = sibling(&dir, "old")?;
    if !old.is_dir() {
        return Ok(());
    }
    // Named with what the folder is: `.best.old` alone says nothing to a reader.
    let failed = |doing: &str, e: std::io::Error| ModelError::Invalid {
        path: old.clone(),
        message: format!(
            "the previous version of {} that an interrupted write left cannot be {doing}: {e}",
            dir.display()
        ),
    };
    if !dir.exists() {
        return fs::rename(&old, &dir).map_err(|e| failed("put back", e));
    }
    let files = |folder: &Path| -> Result<Vec<std::ffi::OsString>> {
        fs::read_dir(folder)
            .map_err(|e| ModelError::io(folder, e))?
            .map(|entry| {
                entry
                    .map(|e| e.file_name())
                    .map_err(|e| ModelError::io(folder, e))
            })
            .collect()
    };
    let present = files(&dir)?;
    if files(&old)?.iter().all(|name| present.contains(name)) {
        fs::remove_dir_all(&old).map_err(|e| failed("removed", e))?;
    }
    Ok(())
}

/// The readers' side of [`recover_interrupted_write`]: say what happened instead of a bare
/// "file not found", and leave the repair to the writer.
pub fn refuse_interrupted_write(dir: &Path) -> Result<()> {
    let dir = named(dir)?;
    if let Some(old) = previous_version(&dir)? {
        return Err(ModelError::Invalid {
            path: dir.to_path_buf(),
            message: format!(
                "missing: a write of this checkpoint was interrupted (or is under way) and its \
                 previous version is at {}; the next save to it (a training run or --resume) \
                 puts that back, or rename it to {} yourself",
                old.display(),
                dir.display()
            ),
        });
    }
    Ok(())
}

/// What a folder that a checkpoint write would replace holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirContents {
    /// Missing or empty.
    Empty,
    /// Only `*.json` and `*.safetensors` files, `config.json` or `model.safetensors` among
    /// them: a checkpoint or a training state.
    Checkpoint,
    /// Anything else, described: replacing it would delete files that are not ours.
    Foreign(String),
}

/// Classifies `dir` for [`write_dir_atomically`], which replaces only a checkpoint.
pub fn dir_contents(dir: &Path) -> Result<DirContents> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirContents::Empty),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Ok(DirContents::Foreign("it is a file, not a folder".into()))
        }
        Err(e) => return Err(ModelError::io(dir, e)),
    };
    let (mut any, mut checkpoint) = (false, false);
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| ModelError::io(entry.path(), e))?
            .is_file();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(is_file && (name.ends_with(".json") || name.ends_with(".safetensors"))) {
            return Ok(DirContents::Foreign(format!(
                "it holds `{name}`, which is not part of a checkpoint"
            )));
        }
        any = true;
        checkpoint |= name == CONFIG_FILE || name == WEIGHTS_FILE;
    }
    Ok(match (any, checkpoint) {
        (false, _) => DirContents::Empty,
        (true, true) => DirContents::Checkpoint,
        (true, false) => {
            DirContents::Foreign(format!("it holds neither {CONFIG_FILE} nor {WEIGHTS_FILE}"))
        }
    })
}

/// Builds a folder with `write` in a temporary sibling, flushes it to disk and renames it to
/// `dir`, replacing any previous version. The temporaries of writers killed midway are
/// removed first ([`temporary::create`]). A `dir` that holds something other than a
/// checkpoint ([`dir_contents`]) is refused, not replaced.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover_interrupted_write(dir)?;
    let dir = named(dir)?;
    let dir = &*dir;
    if let DirContents::Foreign(reason) = dir_contents(dir)? {
        return Err(ModelError::NotACheckpoint {
            path: dir.to_path_buf(),
            reason,
        });
    }
    let old = sibling(dir, "old")?;
    if let Some(parent) = old.parent() {
        fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    // Locked until this function returns, so that no other writer takes it for a killed
    // one's and removes it; those of killed writers go here.
    let temporary = temporary::create(dir, "", Kind::Folder)?;
    let tmp = temporary.path();
    let result = write(tmp).and_then(|()| finish_files(tmp));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(tmp);
        return Err(e);
    }
    let moved_in = (|| {
        if dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
            }
            fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
        }
        fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))
    })();
    if let Err(e) = moved_in {
        // Best effort: the previous version back in place, no copy left beside it.
        if !dir.exists() && old.is_dir() {
            let _ = fs::rename(&old, dir);
        }
        let _ = fs::remove_dir_all(tmp);
        return Err(e);
    }
    // The new version is in place and the write succeeded: a previous version that cannot
    // be removed now (its file system gone read-only) is removed by the next write of `dir`
    // ([`recover_interrupted_write`]).
    if old.exists() {
        let _ = fs::remove_dir_all(&old);
    }
    // Persist the renames themselves.
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// Flushes a folder's entries (the names of files created or renamed in it) to disk. A
/// file system that cannot flush folders (EINVAL: some network and FUSE ones) is no error:
/// the entries are in place, and it offers no way to make them more durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    match fs::File::open(dir).and_then(|f| f.sync_all()) {
        Err(e) if e.kind() != std::io::ErrorKind::InvalidInput => Err(ModelError::io(dir, e)),
        _ => Ok(()),
    }
}

/// Gives every file of `dir` the permissions of an ordinary new file and flushes it, then
/// the folder.
/// safetensors writes through a temporary file created with mode 0600 whatever the umask,
/// and a server running as another user could not read the weights.
fn finish_files(dir: &Path) -> Result<()> {
    let probe = dir.join(".permissions");
    let ordinary = fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map_err(|e| ModelError::io(&probe, e))?
        .permissions();
    fs::remove_file(&probe).map_err(|e| ModelError::io(&probe, e))?;
    for entry in fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
        if path.is_file() {
            fs::set_permissions(&path, ordinary.clone())
                .and_then(|()| fs::File::open(&path))
                .and_then(|f| f.sync_all())
                .map_err(|e| ModelError::io(&path, e))?;
        }
    }
    // Their names too, before the folder is renamed into place.
    sync_dir(dir)
}
