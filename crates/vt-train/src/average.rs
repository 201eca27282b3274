//! `vt-train average`: the element-wise mean of checkpoints of one model configuration
//! (timm's `avg_checkpoints.py`), typically the best epochs a run kept with
//! `--checkpoint-hist` (`RUN/top/`). Every tensor is averaged, BatchNorm running statistics
//! included, as timm does: the mean of running variances is not the variance the averaged
//! weights would produce, an approximation that works in practice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use candle_core::{Device, Tensor};
use vt_model::checkpoint::CONFIG_FILE;
use vt_model::{Model, VtConfig};

use crate::error::{Result, ResultExt, TrainError};
use crate::history::{epoch_dir, Kept, TOP_DIR};
use crate::init::{check_out_dir, write_checkpoint};
use crate::outputs::{is_checkpoint, is_run, resolved, RUN_FOLDERS};
use crate::state;

#[derive(Debug, Clone, clap::Args)]
pub struct AverageArgs {
    /// Checkpoint folders (config.json + model.safetensors) of one model configuration
    #[arg(
        value_name = "CHECKPOINT",
        required_unless_present = "run_dir",
        conflicts_with = "run_dir"
    )]
    pub checkpoints: Vec<PathBuf>,
    /// Average the checkpoints a run kept with --checkpoint-hist (RUN/top/), best first
    #[arg(long, value_name = "RUN")]
    pub run_dir: Option<PathBuf>,
    /// With --run-dir: only the K best kept epochs [default: all]
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,
    /// Output checkpoint folder (new or empty)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the checkpoint that --out already holds (never a folder holding anything
    /// else)
    #[arg(long)]
    pub force: bool,
}

/// A checkpoint to average; `kept` says which epoch of a run's history it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub dir: PathBuf,
    pub kept: Option<Kept>,
}

/// The `k` best epochs (all without `k`) that `run_dir`'s training state lists in its
/// checkpoint history, best first.
pub fn history_inputs(run_dir: &Path, k: Option<usize>) -> Result<Vec<Input>> {
    refuse_checkpoint_as_run(run_dir)?;
    let progress = state::read_saved_progress(run_dir)
        .with_context(|| format!("reading the training state of {}", run_dir.display()))?;
    let kept = progress.top;
    if kept.is_empty() {
        return Err(TrainError::Config(format!(
            "{} keeps no checkpoint history in {TOP_DIR}/: train with --checkpoint-hist N \
             (a resumed run keeps its next epochs)",
            run_dir.display()
        )));
    }
    let k = k.unwrap_or(kept.len());
    if k == 0 || k > kept.len() {
        return Err(TrainError::Config(format!(
            "--top {k}: {} keeps {} epoch{} in {TOP_DIR}/; give 1 to {}",
            run_dir.display(),
            kept.len(),
            if kept.len() == 1 { "" } else { "s" },
            kept.len()
        )));
    }
    Ok(kept[..k]
        .iter()
        .map(|k| Input {
            dir: epoch_dir(run_dir, k.epoch),
            kept: Some(*k),
        })
        .collect())
}

/// Refuses a checkpoint folder given as `--run-dir` (typically `RUN/best`), naming the two
/// ways it may have been meant, rather than failing on the run state it lacks.
fn refuse_checkpoint_as_run(run_dir: &Path) -> Result<()> {
    if !is_checkpoint(run_dir) {
        return Ok(());
    }
    let run = resolved(run_dir)
        .parent()
        .filter(|parent| is_run(parent))
        .map(|run| format!(" (--run-dir {})", run.display()))
        .unwrap_or_default();
    Err(TrainError::Config(format!(
        "--run-dir {}: a checkpoint folder, not a run: give the run folder{run} to average \
         the epochs it keeps in {TOP_DIR}/, or give checkpoints as arguments without \
         --run-dir (vt-train average --out DIR CHECKPOINT...)",
        run_dir.display()
    )))
}

/// `first`'s and `other`'s configs' differing fields, as `field: first's vs other's`, for
/// the message of configs that differ.
fn differences(first: &VtConfig, other: &VtConfig) -> String {
    let fields = |config: &VtConfig| match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(first), fields(other));
    let listed: Vec<String> = a
        .iter()
        .filter(|(name, value)| b.get(*name) != Some(value))
        .map(|(name, value)| {
            let theirs = b.get(name).unwrap_or(&serde_json::Value::Null);
            format!("{name}: {value} vs {theirs}")
        })
        .collect();
    if listed.is_empty() {
        format!("{first:?} vs {other:?}")
    } else {
        listed.join(", ")
    }
}

/// The element-wise mean of every tensor of the checkpoints in `dirs` (each loaded
/// strictly), as a model of their common config. Sums are taken in f64 (29 more bits than
/// the f32 values) and divided once: far from f32 accumulation's drift over many inputs,
/// though not exact for values of widely different magnitudes. A temperature that
/// `calibrate` gave an input is not the average's, which has none, nor is the training
/// record of an epoch (but of the one checkpoint of an average of one, its copy).
pub fn average(dirs: &[PathBuf], device: &Device) -> Result<Model> {
    let load = |dir: &Path| {
        let mut model = Model::load(dir, device)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        // Each epoch's record is its own; the mean of two or more is none of them.
        if dirs.len() > 1 {
            model.config.training = None;
        }
        if model.config.temperature.take().is_some() {
            tracing::warn!(
                "{} is calibrated: the average has no temperature (`vt-train calibrate` it)",
                dir.display()
            );
        }
        Ok::<_, TrainError>(model)
    };
    let Some((first_dir, others)) = dirs.split_first() else {
        return Err(TrainError::Config("no checkpoint to average".into()));
    };
    let model = load(first_dir)?;
    let mut sums = values(&model)?;
    for dir in others {
        let other = load(dir)?;
        if other.config != model.config {
            return Err(TrainError::ConfigMismatch {
                first: first_dir.join(CONFIG_FILE),
                other: dir.join(CONFIG_FILE),
                differences: differences(&model.config, &other.config),
            });
        }
        // One config, loaded strictly: the same tensor names and shapes.
        for (name, values) in values(&other)? {
            if let Some(sum) = sums.get_mut(&name) {
                sum.iter_mut().zip(values).for_each(|(s, v)| *s += v);
            }
        }
    }
    let count = dirs.len() as f64;
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for (name, var) in vars.iter() {
        let sum = sums
            .get(name)
            .ok_or_else(|| TrainError::Config(format!("no sum for tensor {name}")))?;
        let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
        var.set(&Tensor::from_vec(mean, var.dims(), device)?)?;
    }
    drop(vars);
    Ok(model)
}

/// Refuses an `--out` that is one of the checkpoints averaged, or lies in a folder that a
/// training run manages: in `--run-dir`'s, or in the run of an input kept in `RUN/top/`.
/// Writing there would replace a checkpoint the run lists (or later replaces or removes).
fn refuse_out_among_inputs(out: &Path, inputs: &[Input], run_dir: Option<&Path>) -> Result<()> {
    let out = resolved(out);
    let runs = run_dir.map(Path::to_path_buf).into_iter().chain(
        inputs
            .iter()
            .filter_map(|input| input.dir.parent())
            .filter(|parent| parent.file_name().is_some_and(|n| n == TOP_DIR))
            .filter_map(Path::parent)
            .map(Path::to_path_buf),
    );
    for run in runs {
        let run = resolved(&run);
        if let Some(folder) = RUN_FOLDERS.iter().find(|f| out.starts_with(run.join(f))) {
            let (is, folder) = (out == run.join(folder), run.join(folder));
            return Err(TrainError::Config(format!(
                "--out {}: {} {}, which its training run manages; choose a folder outside it \
                 (e.g. {}/avg)",
                out.display(),
                if is { "is" } else { "inside" },
                folder.display(),
                run.display()
            )));
        }
    }
    if let Some(input) = inputs.iter().find(|i| resolved(&i.dir) == out) {
        return Err(TrainError::Config(format!(
            "--out {} is one of the checkpoints averaged ({}); choose another folder",
            out.display(),
            input.dir.display()
        )));
    }
    Ok(())
}

/// Refuses a checkpoint given twice (however spelled): it would weigh double in the mean.
fn refuse_repeated_inputs(inputs: &[Input]) -> Result<()> {
    let mut seen = BTreeMap::new();
    for input in inputs {
        if let Some(first) = seen.insert(resolved(&input.dir), &input.dir) {
            return Err(TrainError::Config(format!(
                "{} is given twice (also as {}): it would count double in the mean",
                first.display(),
                input.dir.display()
            )));
        }
    }
    Ok(())
}

/// Every tensor of `model`, by name, widened to f64.
fn values(model: &Model) -> Result<BTreeMap<String, Vec<f64>>> {
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    vars.iter()
        .map(|(name, var)| {
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            Ok((name.clone(), values.into_iter().map(f64::from).collect()))
        })
        .collect()
}

pub fn run(args: &AverageArgs) -> Result<()> {
    let inputs = match &args.run_dir {
        Some(run_dir) => history_inputs(run_dir, args.top)?,
        // clap's `requires` does not hold against a positional that conflicts with its
        // target: checked here, or the checkpoints given would all be averaged.
        None if args.top.is_some() => {
            return Err(TrainError::Config(
                "--top picks among the epochs a run kept: give it with --run-dir, or list \
                 the checkpoints to average without it"
                    .into(),
            ))
        }
        None => args
            .checkpoints
            .iter()
            .map(|dir| Input {
                dir: dir.clone(),
                kept: None,
            })
            .collect(),
    };
    refuse_repeated_inputs(&inputs)?;
    refuse_out_among_inputs(&args.out, &inputs, args.run_dir.as_deref())?;
    check_out_dir(&args.out, args.force)?;
    let dirs: Vec<PathBuf> = inputs.iter().map(|i| i.dir.clone()).collect();
    // Announced once written.
    let model = average(&dirs, &Device::Cpu)?;
    write_checkpoint(&model, &args.out)?;
    println!(
        "averaged {} checkpoint{}:",
        inputs.len(),
        if inputs.len() == 1 { "" } else { "s" }
    );
    for input in &inputs {
        match input.kept {
            Some(k) => println!(
                "  {}  epoch {}, val acc {:.2}%, val loss {:.4}",
                input.dir.display(),
                k.epoch,
                100.0 * k.val_acc,
                k.val_loss
            ),
            None => println!("  {}", input.dir.display()),
        }
    }
    if dirs.len() == 1 {
        eprintln!(
            "one checkpoint averaged: {} is a copy of it",
            args.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vt_model::Arch;

    use super::*;
    use crate::init::seeded_model;

    #[test]
    fn the_output_stays_out_of_the_inputs_and_the_runs_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let kept = epoch_dir(&run, 1);
        std::fs::create_dir_all(&kept).unwrap();
        let inputs = [Input {
            dir: kept.clone(),
            kept: None,
        }];
        let refused = |out: PathBuf, run_dir: Option<&Path>| {
            refuse_out_among_inputs(&out, &inputs, run_dir)
                .unwrap_err()
                .to_string()
        };
        for run_dir in [None, Some(run.as_path())] {
            for folder in ["top/avg", "top/epoch-002", "state", "best", "last/x"] {
                let err = refused(run.join(folder), run_dir);
                assert!(err.contains("which its training run manages"), "{err}");
            }
        }
        // The folder itself is said to be it, not to be inside it.
        let run_path = resolved(&run);
        let err = refused(run.join("best"), Some(&run));
        assert!(
            err.contains(&format!(": is {}, which", run_path.join("best").display())),
            "{err}"
        );
        let err = refused(run.join("last/x"), Some(&run));
        assert!(
            err.contains(&format!(
                ": inside {}, which",
                run_path.join("last").display()
            )),
            "{err}"
        );
        let outside = tmp.path().join("elsewhere");
        let err = refuse_out_among_inputs(&kept, &inputs, None);
        assert!(err.is_err());
        let other = [Input {
            dir: outside.clone(),
            kept: None,
        }];
        let err = refuse_out_among_inputs(&outside.join("."), &other, None).unwrap_err();
        assert!(
            err.to_string().contains("one of the checkpoints averaged"),
            "{err}"
        );
        refuse_out_among_inputs(&run.join("avg"), &inputs, Some(&run)).unwrap();
    }

    #[test]
    fn a_checkpoint_given_twice_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let inputs = |dirs: &[PathBuf]| -> Vec<Input> {
            dirs.iter()
                .map(|dir| Input {
                    dir: dir.clone(),
                    kept: None,
                })
                .collect()
        };
        refuse_repeated_inputs(&inputs(&[a.clone(), b.clone()])).unwrap();
        let again = b.join("../a");
        let err = refuse_repeated_inputs(&inputs(&[a.clone(), b, again.clone()]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "{} is given twice (also as {})",
                a.display(),
                again.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn top_without_a_run_is_refused() {
        let args = AverageArgs {
            checkpoints: vec!["a".into(), "b".into()],
            run_dir: None,
            top: Some(1),
            out: "avg".into(),
            force: false,
        };
        let err = run(&args).unwrap_err().to_string();
        assert!(
            err.contains("--top picks among the epochs a run kept"),
            "{err}"
        );
    }

    fn tiny(image_size: usize) -> VtConfig {
        VtConfig {
            tokens: 4,
            token_channels: 32,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 3, image_size)
        }
    }

    /// A checkpoint in `root/NAME` with weights drawn from `seed` and the first BatchNorm's
    /// running statistics set to `stat`.
    fn checkpoint(root: &Path, name: &str, config: VtConfig, seed: u64, stat: f32) -> PathBuf {
        let model = seeded_model(config, &Device::Cpu, seed).unwrap();
        for tensor in ["bn1.running_mean", "bn1.running_var"] {
            let var = model.varmap.data().lock().unwrap()[tensor].clone();
            let values = Tensor::full(stat, var.dims(), &Device::Cpu).unwrap();
            var.set(&values).unwrap();
        }
        let dir = root.join(name);
        model.save(&dir).unwrap();
        dir
    }

    fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
        let model = Model::load(dir, &Device::Cpu).unwrap();
        values(&model)
            .unwrap()
            .into_iter()
            .map(|(name, v)| (name, v.into_iter().map(|x| x as f32).collect()))
            .collect()
    }

    #[test]
    fn every_tensor_is_the_exact_mean_of_the_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = [(1, 1.0), (2, 2.5), (3, 6.0)]
            .iter()
            .map(|&(seed, stat)| checkpoint(root.path(), &format!("c{seed}"), tiny(32), seed, stat))
            .collect();
        let inputs: Vec<_> = dirs.iter().map(|d| tensors(d)).collect();
        for count in [2, 3] {
            let model = average(&dirs[..count], &Device::Cpu).unwrap();
            assert_eq!(model.config, tiny(32));
            let out = root.path().join(format!("mean{count}"));
            model.save(&out).unwrap();
            // Written as a checkpoint that loads strictly.
            let mean = tensors(&out);
            assert_eq!(mean.len(), inputs[0].len());
            for (name, values) in &mean {
                for (i, value) in values.iter().enumerate() {
                    let sum: f64 = inputs[..count].iter().map(|t| f64::from(t[name][i])).sum();
                    assert_eq!(*value, (sum / count as f64) as f32, "{name}[{i}]");
                }
            }
            let stat = if count == 2 { 1.75 } else { 9.5 / 3.0 };
            assert!(mean["bn1.running_var"].iter().all(|v| *v == stat as f32));
            assert!(mean["bn1.running_mean"].iter().all(|v| *v == stat as f32));
        }
        // One checkpoint: its copy, bit for bit.
        let copy = average(&dirs[..1], &Device::Cpu).unwrap();
        let copied: BTreeMap<String, Vec<f32>> = values(&copy)
            .unwrap()
            .into_iter()
            .map(|(name, v)| (name, v.into_iter().map(|x| x as f32).collect()))
            .collect();
        assert_eq!(copied, inputs[0]);
    }

    /// Each epoch's training record differs: no reason to refuse, and none is the mean's;
    /// the copy of one checkpoint keeps its own.
    #[test]
    fn training_records_differ_between_inputs_and_the_mean_has_none() {
        let root = tempfile::tempdir().unwrap();
        let trained = |epoch: u64| VtConfig {
            training: serde_json::json!({ "epoch": epoch }).as_object().cloned(),
            ..tiny(32)
        };
        let dirs = [
            checkpoint(root.path(), "a", trained(1), 1, 1.0),
            checkpoint(root.path(), "b", trained(2), 2, 1.0),
        ];
        assert_eq!(average(&dirs, &Device::Cpu).unwrap().config, tiny(32));
        let copy = average(&dirs[1..], &Device::Cpu).unwrap();
        assert_eq!(copy.config, trained(2));
    }

    #[test]
    fn checkpoints_of_different_configs_are_refused_naming_the_field() {
        let root = tempfile::tempdir().unwrap();
        let a = checkpoint(root.path(), "a", tiny(32), 1, 1.0);
        let b = checkpoint(root.path(), "b", tiny(48), 2, 1.0);
        let renamed = VtConfig {
            class_names: vec!["x".into(), "y".into(), "z".into()],
            ..tiny(32)
        };
        let c = checkpoint(root.path(), "c", renamed, 3, 1.0);
        let refusal = |dirs: &[PathBuf]| match average(dirs, &Device::Cpu) {
            Ok(_) => panic!("{dirs:?} were averaged"),
            Err(e) => e.to_string(),
        };
        let err = refusal(&[a.clone(), b.clone()]);
        assert_eq!(
            err,
            format!(
                "{} and {} differ in image_size: 32 vs 48: only checkpoints of one model \
                 configuration can be averaged",
                a.join(CONFIG_FILE).display(),
                b.join(CONFIG_FILE).display()
            )
        );
        let err = refusal(&[a, c]);
        assert!(
            err.contains(r#"class_names: ["class0","class1","class2"] vs ["x","y","z"]"#),
            "{err}"
        );
        assert_eq!(refusal(&[]), "no checkpoint to average");
    }
}
