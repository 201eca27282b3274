//! Checkpoint folders: `config.json` and `model.safetensors` (f32, contract names).
//!
//! Loading is strict: every tensor of the model must be present with its exact shape and
//! dtype, and nothing else may be (BatchNorm's `num_batches_tracked` is ignored whatever its
//! dtype). Writing is atomic: the folder is built beside its destination and renamed into
//! place, so a crash leaves either the previous checkpoint or the new one, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use safetensors::SafeTensors;

use crate::config::VtConfig;
use crate::error::{ModelError, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Reads and validates `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<VtConfig> {
    recover_interrupted_write(dir)?;
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: VtConfig = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
        path: path.clone(),
        cause,
    })?;
    config.validate().map_err(|e| ModelError::Weights {
        path,
        message: e.to_string(),
    })?;
    Ok(config)
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
        varmap.save(tmp.join(WEIGHTS_FILE))?;
        Ok(())
    })
}

/// Reads a safetensors file as named f32 tensors on `device`, checking each dtype.
/// Tensors named `*.num_batches_tracked` are dropped.
pub fn read_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        if name.ends_with(".num_batches_tracked") {
            continue;
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ModelError::DType {
                path: path.to_path_buf(),
                name,
                found: format!("{:?}", view.dtype()),
            });
        }
        let tensor = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu)?
            .to_device(device)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// Copies `tensors` into the variables of `varmap`: the two name sets must be equal and
/// every shape must match.
pub fn assign_strict(
    path: &Path,
    varmap: &VarMap,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| ModelError::Weights {
        path: path.to_path_buf(),
        message: "variable map lock poisoned".into(),
    })?;
    let expected: BTreeSet<&String> = vars.keys().collect();
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
    for (name, var) in vars.iter() {
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
    for (name, var) in vars.iter() {
        var.set(&tensors[name].to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| ModelError::Weights {
        path: dir.to_path_buf(),
        message: "a checkpoint path must name a folder".into(),
    })?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// A crash between the two renames of [`write_dir_atomically`] leaves the previous version
/// at `.NAME.old` and nothing at `NAME`: put it back.
pub fn recover_interrupted_write(dir: &Path) -> Result<()> {
    let old = sibling(dir, "old")?;
    if !dir.exists() && old.is_dir() {
        fs::rename(&old, dir).map_err(|e| ModelError::io(dir, e))?;
    }
    Ok(())
}

/// Builds a folder with `write` in a temporary sibling, flushes it to disk and renames it to
/// `dir`, replacing any previous version.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover_interrupted_write(dir)?;
    let tmp = sibling(dir, &format!("tmp-{}", std::process::id()))?;
    let old = sibling(dir, "old")?;
    if let Some(parent) = tmp.parent() {
        fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = write(&tmp).and_then(|()| sync_dir_files(&tmp));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        }
        fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
    }
    fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Persist the renames themselves.
        fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(parent, e))?;
    }
    Ok(())
}

fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
        if path.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}
