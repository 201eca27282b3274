//! The full training state, `RUN/state/`, written atomically after every epoch: the model
//! (a strict-loading checkpoint, BatchNorm statistics included), the optimiser moments, the
//! EMA weights and `training.json` (epoch, step, best metric, config). Data order and
//! augmentation derive from (seed, epoch, sample), so the seed is the whole RNG state.
//!
//! Every folder of a run (`best/`, `last/`, `state/`) is replaced by a rename, so a kill at
//! any moment leaves the previous or the next version, never a mix.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use vt_model::checkpoint::{
    assign_strict, read_tensors, recover_interrupted_write, refuse_interrupted_write,
    write_dir_atomically, CONFIG_FILE, WEIGHTS_FILE,
};
use vt_model::{Model, ModelError};

use crate::config::TrainConfig;
use crate::data::DataUsed;
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::history::Kept;
use crate::optim::{Optimizer, StepCounts};

pub const STATE_DIR: &str = "state";
pub const BEST_DIR: &str = "best";
pub const LAST_DIR: &str = "last";
const TRAINING_FILE: &str = "training.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const FORMAT: u32 = 1;

/// `training.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    /// Completed epochs; the next epoch to run has this 0-based index.
    pub epochs_done: usize,
    pub global_step: u64,
    pub best_val_acc: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_epoch: Option<usize>,
    /// Epochs since validation accuracy last rose (what `--early-stop` counts): a tie in
    /// accuracy with a lower loss makes a new best epoch without resetting it.
    pub epochs_since_best: usize,
    pub stopped_early: bool,
    pub optimizer_steps: StepCounts,
    pub config: TrainConfig,
    /// The epochs whose checkpoints `top/` keeps (`--checkpoint-hist`), best first. Absent
    /// from states written before the option existed: none.
    #[serde(default)]
    pub top: Vec<Kept>,
    /// The images the run trains and validates on. Absent from states written before it
    /// was recorded: a resume of one records them.
    #[serde(default)]
    pub data: Option<DataUsed>,
}

impl Progress {
    pub fn new(config: TrainConfig, data: DataUsed) -> Self {
        Progress {
            format: FORMAT,
            epochs_done: 0,
            global_step: 0,
            best_val_acc: None,
            best_val_loss: None,
            best_epoch: None,
            epochs_since_best: 0,
            stopped_early: false,
            optimizer_steps: StepCounts::new(),
            config,
            top: Vec::new(),
            data: Some(data),
        }
    }

    /// Whether (accuracy, loss) beats the best so far ([`ranks_above`]).
    pub fn improves(&self, val_acc: f64, val_loss: f64) -> bool {
        match self.best_val_acc {
            None => val_loss.is_finite(),
            Some(acc) => ranks_above(val_acc, val_loss, acc, self.best_val_loss),
        }
    }
}

/// Whether an epoch of validation (accuracy, loss) ranks above one of (`than_acc`,
/// `than_loss`): higher accuracy, or the same accuracy with a lower loss (ties are common on
/// small validation sets). A loss that is not finite (a diverged model) never does. A
/// `than_loss` of None beside an accuracy is a NaN that an earlier version kept and JSON
/// wrote as null: any finite loss beats it.
pub fn ranks_above(val_acc: f64, val_loss: f64, than_acc: f64, than_loss: Option<f64>) -> bool {
    val_loss.is_finite()
        && (val_acc > than_acc
            || (val_acc == than_acc && than_loss.is_none_or(|loss| val_loss < loss)))
}

/// The name of a tensor of `model` holding a value that is not finite, if any: such weights
/// could be saved but never loaded.
pub fn first_non_finite(model: &Model) -> Result<Option<String>> {
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // 0x is 0 for every finite x and NaN otherwise, so the sum is not finite exactly when an
    // element is not (a sum of the values could overflow).
    let found = first_flagged(
        vars.iter().map(|(name, var)| (name, var.as_tensor())),
        |t| (t.to_dtype(DType::F32)? * 0.0)?.sum_all(),
        |sum| !sum.is_finite(),
    )?;
    Ok(found.cloned())
}

/// The name of a tensor among `tensors` holding a NaN, if any. Training never saves one in
/// the optimiser's moments: a NaN there reaches the weights at the step that makes it, and
/// an epoch's end refuses to save those. A saved state holding one was damaged since, and
/// resuming from it would only diverge. (Weights, which may not be infinite either, are
/// checked as they are read.)
fn first_nan<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> Result<Option<&'a String>> {
    // NaN is the one value unequal to itself.
    first_flagged(
        tensors,
        |t| t.ne(t)?.to_dtype(DType::F32)?.sum_all(),
        |count| count > 0.0,
    )
}

/// The name of the first floating-point tensor among `tensors` whose `measure` (a scalar)
/// `flags`. Every measure is computed before any is read back, so that a GPU waits once.
fn first_flagged<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    measure: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    flags: impl Fn(f32) -> bool,
) -> Result<Option<&'a String>> {
    let mut names = Vec::new();
    let mut measures = Vec::new();
    for (name, tensor) in tensors.into_iter().filter(|(_, t)| t.dtype().is_float()) {
        measures.push(measure(tensor)?);
        names.push(name);
    }
    if measures.is_empty() {
        return Ok(None);
    }
    let measures = Tensor::stack(&measures, 0)?.to_vec1::<f32>()?;
    Ok(names
        .into_iter()
        .zip(measures)
        .find(|&(_, measure)| flags(measure))
        .map(|(name, _)| name))
}

/// Refuses the tensors of `path`, a file of `run_dir`'s state, when one holds a NaN.
fn refuse_nan<'a>(
    run_dir: &Path,
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> Result<()> {
    let Some(name) = first_nan(tensors)? else {
        return Ok(());
    };
    Err(TrainError::State {
        path: path.to_path_buf(),
        message: format!(
            "`{name}` holds NaN, which training never saves: the file was damaged, and \
             resuming from it would diverge; start a new run from the run's weights \
             (vt-train train --initial-checkpoint {} --run-dir NEW_RUN)",
            run_dir.join(LAST_DIR).display()
        ),
    })
}

fn model_error(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `RUN/state/` atomically.
pub fn save(
    run_dir: &Path,
    progress: &Progress,
    model: &Model,
    optimizer: &Optimizer,
    ema: Option<&Ema>,
) -> Result<()> {
    let dir = run_dir.join(STATE_DIR);
    let (moments, steps) = optimizer.state();
    let progress = Progress {
        optimizer_steps: steps,
        ..progress.clone()
    };
    let training =
        serde_json::to_string_pretty(&progress).map_err(|cause| TrainError::JsonWrite {
            path: dir.join(TRAINING_FILE),
            cause,
        })?;
    let config =
        serde_json::to_string_pretty(&model.config).map_err(|cause| TrainError::JsonWrite {
            path: dir.join(CONFIG_FILE),
            cause,
        })?;
    write_dir_atomically(&dir, |tmp| {
        let write_text = |name: &str, text: &str| {
            let path = tmp.join(name);
            fs::write(&path, text).map_err(|cause| ModelError::Io { path, cause })
        };
        write_text(CONFIG_FILE, &config)?;
        let path = tmp.join(WEIGHTS_FILE);
        model
            .varmap
            .save(&path)
            .map_err(|e| model_error(&path, e))?;
        let path = tmp.join(OPTIMIZER_FILE);
        candle_core::safetensors::save(&moments, &path).map_err(|e| model_error(&path, e))?;
        if let Some(ema) = ema {
            let path = tmp.join(EMA_FILE);
            ema.model
                .varmap
                .save(&path)
                .map_err(|e| model_error(&path, e))?;
        }
        // Last, so that a state folder with training.json is complete.
        write_text(TRAINING_FILE, &training)
    })?;
    Ok(())
}

/// Whether `RUN/state/` holds a saved state.
pub fn exists(run_dir: &Path) -> Result<bool> {
    let dir = run_dir.join(STATE_DIR);
    recover_interrupted_write(&dir)?;
    Ok(dir.join(TRAINING_FILE).is_file())
}

/// Reads `RUN/state/training.json`, first putting back a state whose write was interrupted:
/// for the process that holds the run's lock.
pub fn read_progress(run_dir: &Path) -> Result<Progress> {
    recover_interrupted_write(&run_dir.join(STATE_DIR))?;
    read_saved_progress(run_dir)
}

/// Reads `RUN/state/training.json` as it is, repairing nothing: for readers, which could
/// race the training process's two renames (see [`vt_model::checkpoint`]).
pub fn read_saved_progress(run_dir: &Path) -> Result<Progress> {
    refuse_interrupted_write(&run_dir.join(STATE_DIR))?;
    let path = run_dir.join(STATE_DIR).join(TRAINING_FILE);
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let progress: Progress = serde_json::from_str(&text).map_err(|cause| TrainError::Json {
        path: path.clone(),
        cause,
    })?;
    if progress.format != FORMAT {
        return Err(TrainError::State {
            path,
            message: format!(
                "state format {} is not supported (expected {FORMAT})",
                progress.format
            ),
        });
    }
    Ok(progress)
}

/// Loads the model (strictly) from `RUN/state/`.
pub fn load_model(run_dir: &Path, device: &Device) -> Result<Model> {
    Ok(Model::load_run_state(&run_dir.join(STATE_DIR), device)?)
}

/// The weights the run served when its state was saved (what `best/` and `last/` got): the
/// weight average's when it kept one, else the model's. Whatever `--ema` says now.
pub fn load_served(run_dir: &Path, device: &Device) -> Result<Model> {
    let model = load_model(run_dir, device)?;
    let path = run_dir.join(STATE_DIR).join(EMA_FILE);
    if path.is_file() {
        let tensors = read_tensors(&path, device)?;
        assign_strict(&path, &model.varmap, &tensors, |_| true)?;
    }
    Ok(model)
}

/// Whether the checkpoint in `dir` holds exactly `model`'s weights, bit for bit; `false`
/// when it cannot be read.
pub fn holds(dir: &Path, model: &Model) -> bool {
    let Ok(saved) = read_tensors(&dir.join(WEIGHTS_FILE), &Device::Cpu) else {
        return false;
    };
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let bits = |tensor: &Tensor| {
        tensor
            .flatten_all()
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.to_vec1::<f32>())
            .map(|values| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    saved.len() == vars.len()
        && vars.iter().all(|(name, var)| {
            saved
                .get(name)
                .is_some_and(|tensor| matches!((bits(tensor), bits(var)), (Ok(a), Ok(b)) if a == b))
        })
}

/// Restores the optimiser moments and the EMA weights saved with `progress`.
pub fn load_training(
    run_dir: &Path,
    progress: &Progress,
    optimizer: &mut Optimizer,
    ema: Option<&Ema>,
    device: &Device,
) -> Result<()> {
    let dir = run_dir.join(STATE_DIR);
    // Checked here, not by the optimiser, whose errors are the moments file's.
    if let Some(unknown) = progress
        .optimizer_steps
        .keys()
        .find(|name| !optimizer.params().any(|p| &&p.name == name))
    {
        return Err(TrainError::State {
            path: dir.join(TRAINING_FILE),
            message: format!(
                "optimizer_steps counts the steps of `{unknown}`, which is no trainable \
                 parameter of the model"
            ),
        });
    }
    let path = dir.join(OPTIMIZER_FILE);
    let moments: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, device).map_err(|e| TrainError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
    refuse_nan(run_dir, &path, &moments)?;
    optimizer
        .load_state(moments, &progress.optimizer_steps)
        .map_err(|e| TrainError::State {
            path,
            message: e.to_string(),
        })?;
    if let Some(ema) = ema {
        let path = dir.join(EMA_FILE);
        if !path.is_file() {
            // EMA switched on when resuming: start the average from the current weights.
            tracing::info!("{} absent: the weight average starts now", path.display());
            return Ok(());
        }
        let tensors = read_tensors(&path, device)?;
        assign_strict(&path, &ema.model.varmap, &tensors, |_| true)?;
    }
    Ok(())
}

/// Cleans up after a killed process's writes of the run's own `outputs` in the run folder:
/// removes their temporary siblings (`.NAME.tmp-PID...`), whose folders are rebuilt anyway,
/// and finishes their interrupted replacements ([`recover_interrupted_write`]): a stale
/// `.NAME.old` beside a `NAME` holding all its files goes (a whole state's worth of disk,
/// which a later resume without `NAME` would bring back), a `.NAME.old` with no `NAME`, the
/// only copy, is put back. Other commands' files (an `average --out` or `eval` writing into the folder) are
/// theirs: the run's lock does not cover those commands.
pub fn finish_interrupted_writes(run_dir: &Path, outputs: &[&str]) -> Result<()> {
    let entries = match fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(run_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(run_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let output = name
            .strip_prefix('.')
            .and_then(|rest| rest.split_once(".tmp-"))
            .map(|(output, _)| output);
        if !output.is_some_and(|output| outputs.contains(&output)) {
            continue;
        }
        let path: PathBuf = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| TrainError::io(&path, e))?;
    }
    for output in outputs {
        recover_interrupted_write(&run_dir.join(output))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vt_model::{Arch, VtConfig};

    use super::*;
    use crate::config::{TrainConfig, TrainOptions};
    use crate::optim::{trainable_params, Method};

    fn progress() -> Progress {
        let images = |count| crate::data::ImagesUsed {
            count,
            sha256: "0".repeat(64),
        };
        let data = DataUsed {
            train: images(8),
            val: images(2),
        };
        Progress::new(
            TrainConfig::resolve(&TrainOptions::default()).unwrap(),
            data,
        )
    }

    /// A state written before the images were recorded reads as recording none.
    #[test]
    fn a_state_without_its_images_reads() {
        let progress = progress();
        let mut json = serde_json::to_value(&progress).unwrap();
        json.as_object_mut().unwrap().remove("data").unwrap();
        let read: Progress = serde_json::from_value(json).unwrap();
        assert_eq!(read.data, None);
        assert_eq!(read.config, progress.config);
    }

    #[test]
    fn only_the_runs_own_leftovers_are_removed() {
        let run = tempfile::tempdir().unwrap();
        // `.best.old` beside `best/`: a kill after the new `best/` was renamed into place,
        // before the previous one was removed.
        let mine = [".best.tmp-11", ".metrics.jsonl.tmp-12", ".best.old"];
        let others = [
            ".avg.tmp-13",
            ".eval-best-test.json.tmp-14",
            "best.tmp-15",
            ".avg.old",
        ];
        for name in mine.iter().chain(&others).chain(&["best", "avg"]) {
            fs::create_dir_all(run.path().join(name)).unwrap();
        }
        // `.last.old` without `last/`: a kill between the two renames, the only copy.
        fs::create_dir_all(run.path().join(".last.old")).unwrap();
        fs::write(run.path().join(".last.old/model.safetensors"), "kept").unwrap();
        finish_interrupted_writes(run.path(), &["best", "last", "metrics.jsonl"]).unwrap();
        for name in mine.iter().chain(&[".last.old"]) {
            assert!(!run.path().join(name).exists(), "{name}");
        }
        for name in others.iter().chain(&["best"]) {
            assert!(run.path().join(name).exists(), "{name}");
        }
        assert_eq!(
            fs::read_to_string(run.path().join("last/model.safetensors")).unwrap(),
            "kept"
        );
    }

    fn model_and_optimizer() -> (Model, Optimizer) {
        let config = VtConfig {
            tokens: 4,
            token_channels: 32,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 3, 32)
        };
        let model = Model::init(config, &Device::Cpu).unwrap();
        let optimizer = Optimizer::new(
            Method::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.0,
            trainable_params(&model.varmap),
        );
        (model, optimizer)
    }

    #[test]
    fn step_counts_of_unknown_parameters_are_reported_against_training_json() {
        let dir = tempfile::tempdir().unwrap();
        let (model, mut optimizer) = model_and_optimizer();
        let mut saved = progress();
        save(dir.path(), &saved, &model, &optimizer, None).unwrap();
        saved.optimizer_steps.insert("nope.weight".into(), 3);
        let err = load_training(dir.path(), &saved, &mut optimizer, None, &Device::Cpu)
            .unwrap_err()
            .to_string();
        let json = dir.path().join(STATE_DIR).join(TRAINING_FILE);
        assert!(
            err.starts_with(&json.display().to_string()) && err.contains("`nope.weight`"),
            "{err}"
        );
    }

    #[test]
    fn weights_that_are_not_finite_are_named() {
        let (model, _) = model_and_optimizer();
        assert_eq!(first_non_finite(&model).unwrap(), None);
        // Large but finite: their sum would overflow.
        let var = model.varmap.data().lock().unwrap()["bn1.running_var"].clone();
        var.set(&Tensor::full(1e37f32, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(first_non_finite(&model).unwrap(), None);
        let name = "head.bias";
        let var = model.varmap.data().lock().unwrap()[name].clone();
        let mut values: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        values[1] = f32::INFINITY;
        var.set(&Tensor::new(values, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(first_non_finite(&model).unwrap().as_deref(), Some(name));
    }

    #[test]
    fn saved_progress_reads_back_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (model, optimizer) = model_and_optimizer();
        // 22/96 read back as 0.22916666666666663 without serde_json's float_roundtrip, and
        // a later epoch of equal accuracy then counted as better.
        let saved = Progress {
            epochs_done: 2,
            global_step: 6,
            best_val_acc: Some(22.0 / 96.0),
            best_val_loss: Some(0.1 + 0.2),
            best_epoch: Some(1),
            epochs_since_best: 1,
            top: vec![Kept {
                epoch: 1,
                val_acc: 22.0 / 96.0,
                val_loss: 0.1 + 0.2,
            }],
            ..progress()
        };
        save(dir.path(), &saved, &model, &optimizer, None).unwrap();
        let read = read_progress(dir.path()).unwrap();
        assert_eq!(read, saved);
        // A state written before the checkpoint history existed: none is kept.
        let mut older = serde_json::to_value(&saved).unwrap();
        older.as_object_mut().unwrap().remove("top");
        older["config"]
            .as_object_mut()
            .unwrap()
            .remove("checkpoint-hist");
        let older: Progress = serde_json::from_value(older).unwrap();
        assert_eq!(older.top, []);
        assert_eq!(
            read.best_val_acc.map(f64::to_bits),
            Some((22.0f64 / 96.0).to_bits())
        );
        assert!(!read.improves(22.0 / 96.0, 0.1 + 0.2));
        assert!(!read.improves(22.0 / 96.0, 0.31));
        assert!(read.improves(22.0 / 96.0, 0.29));
    }

    #[test]
    fn a_loss_that_is_not_finite_never_improves() {
        let mut p = progress();
        assert!(!p.improves(0.5, f64::NAN));
        assert!(!p.improves(0.5, f64::INFINITY));
        assert!(p.improves(0.0, 2.0));
        p.best_val_acc = Some(0.5);
        p.best_val_loss = Some(1.0);
        assert!(!p.improves(0.9, f64::NAN));
        assert!(p.improves(0.9, 5.0) && p.improves(0.5, 0.9) && !p.improves(0.5, 1.0));
        // A NaN best loss of an earlier version, written as null: finite losses beat it.
        let text = serde_json::to_string(&Progress {
            best_val_loss: Some(f64::NAN),
            ..p
        })
        .unwrap();
        let read: Progress = serde_json::from_str(&text).unwrap();
        assert_eq!(read.best_val_loss, None);
        assert!(read.improves(0.5, 3.0) && !read.improves(0.4, 0.1));
    }
}
