//! `vt-train init`: write a freshly initialised checkpoint, optionally with a pretrained stem.

use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vt_data::rng::{derive_seed, hash_str};
use vt_model::checkpoint::{dir_contents, previous_version, DirContents};
use vt_model::pretrained::{load_stem, Source};
use vt_model::{Arch, Model, VtConfig};

use crate::cli::at_least_one;
use crate::error::{Result, ResultExt, TrainError};
use crate::outputs;

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Architecture: vt-resnet18 or vt-resnet34.
    #[arg(long, default_value = "vt-resnet18")]
    pub arch: Arch,
    /// Input side in pixels (square); 150 is the photos' size, as for `train`.
    #[arg(long, default_value_t = 150, value_parser = at_least_one)]
    pub image_size: usize,
    /// Visual tokens L.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub tokens: usize,
    /// Token channels CT.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    pub token_channels: usize,
    /// Attention heads h.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub heads: usize,
}

impl ModelArgs {
    pub fn config(&self, class_names: Vec<String>) -> VtConfig {
        VtConfig {
            tokens: self.tokens,
            token_channels: self.token_channels,
            heads: self.heads,
            class_names,
            ..VtConfig::new(self.arch, 0, self.image_size)
        }
        .with_num_classes()
    }
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of classes (class names default to class0, class1, ...).
    #[arg(long, required_unless_present = "class_names", value_parser = at_least_one)]
    pub num_classes: Option<usize>,
    /// Comma-separated class names, in label order.
    #[arg(long, value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
    /// ImageNet ResNet weights for the stem: a safetensors or PyTorch (.pth) file, or a hub
    /// id such as timm/resnet34.a1_in1k.
    #[arg(long)]
    pub pretrained: Option<String>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output checkpoint folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the checkpoint that --out already holds (never a folder holding anything
    /// else).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &InitArgs) -> Result<()> {
    let class_names = match (&args.class_names, args.num_classes) {
        (Some(names), Some(n)) if names.len() != n => {
            return Err(TrainError::Config(format!(
                "--num-classes {n} disagrees with {} --class-names",
                names.len()
            )))
        }
        (Some(names), _) => {
            check_class_names(names)?;
            names.clone()
        }
        (None, Some(n)) => (0..n).map(|i| format!("class{i}")).collect(),
        (None, None) => {
            return Err(TrainError::Config(
                "give --num-classes or --class-names".into(),
            ))
        }
    };
    // Checked before a pretrained stem is downloaded.
    check_out_dir(&args.out, args.force)?;
    let model = seeded_model(args.model.config(class_names), &Device::Cpu, args.seed)?;
    if let Some(spec) = &args.pretrained {
        let loaded = load_stem(&model, &Source::parse(spec)?)
            .with_context(|| format!("loading the pretrained stem from {spec}"))?;
        eprintln!("loaded {loaded} stem tensors from {spec}");
    }
    write_checkpoint(&model, &args.out)
}

/// Refuses a `--class-names` entry with white space at an end, as `fetch-data` refuses
/// such class folders: a label `" forest"` would never match the data's `forest` (empty
/// and repeated names are the model config's to refuse).
pub fn check_class_names(names: &[String]) -> Result<()> {
    match names
        .iter()
        .find(|name| name.trim() != name.as_str() && !name.trim().is_empty())
    {
        Some(name) => Err(TrainError::Config(format!(
            "--class-names {name:?} starts or ends with white space: leave it out"
        ))),
        None => Ok(()),
    }
}

/// Saves `model` to `out` and says so, with what it is.
pub fn write_checkpoint(model: &Model, out: &Path) -> Result<()> {
    model
        .save(out)
        .with_context(|| format!("writing checkpoint {}", out.display()))?;
    eprintln!(
        "wrote {} ({}, {} parameters, {} classes, {} px)",
        out.display(),
        model.config.arch,
        model.num_parameters(),
        model.config.num_classes,
        model.config.image_size
    );
    Ok(())
}

/// Refuses an `--out` folder that holds a checkpoint, unless `force`, or anything else: a
/// trained checkpoint (e.g. runs/NAME/best) is not overwritten by accident, and a folder of
/// other files never is; nor, even with `force`, one a training run manages (its `best/`,
/// `state/`, ...) or one inside a checkpoint. For the commands that write one checkpoint,
/// before their work.
pub fn check_out_dir(out: &Path, force: bool) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    outputs::refuse_managed_folder("--out", out, parent)?;
    outputs::refuse_run_folder("--out", out)?;
    // A write interrupted between its two renames left `out`'s checkpoint at `.NAME.old`,
    // and the next write puts it back before replacing it: it is there all the same.
    let previous = previous_version(out)?;
    let (held, place) = match &previous {
        Some(previous) => (
            previous.as_path(),
            format!(
                " (at {}, where an interrupted write left it)",
                previous.display()
            ),
        ),
        None => (out, String::new()),
    };
    match dir_contents(held)? {
        DirContents::Empty => Ok(()),
        DirContents::Checkpoint if force => Ok(()),
        DirContents::Checkpoint => Err(TrainError::Config(format!(
            "--out {} already holds a checkpoint{place}: choose another folder, or add \
             --force to replace it",
            out.display()
        ))),
        DirContents::Foreign(reason) => Err(TrainError::Config(format!(
            "--out {} is not a checkpoint folder{place} ({reason}): choose a new or empty \
             folder (--force only replaces a checkpoint)",
            out.display()
        ))),
    }
}

/// A freshly initialised model whose random tensors depend only on `seed`.
///
/// candle 0.11 cannot seed its CPU generator, so the random tensors of [`Model::init`] are
/// redrawn from a seeded generator per tensor name, with the distributions of vt-model's
/// layers: convolutions Kaiming-normal (fan-out, ReLU) as in torchvision's ResNet, linear
/// weights and biases uniform in +-1/sqrt(fan_in) as in PyTorch. BatchNorm tensors are
/// constants and stay.
pub fn seeded_model(config: VtConfig, device: &Device, seed: u64) -> Result<Model> {
    // Named by the options that set them: the model's own errors name its config's fields.
    let options = format!(
        "--arch {} --image-size {} --tokens {} --token-channels {} --heads {}",
        config.arch, config.image_size, config.tokens, config.token_channels, config.heads
    );
    let model =
        Model::init(config, device).with_context(|| format!("building the model of {options}"))?;
    // The model is this function's own: no other thread can have poisoned its lock.
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for (name, var) in vars.iter() {
        let dims = var.dims().to_vec();
        let mut rng = StdRng::seed_from_u64(derive_seed(&[seed, hash_str(name)]));
        let count = var.elem_count();
        let values: Vec<f32> = match dims.as_slice() {
            [out, _, kh, kw] => {
                let std = (2.0 / (out * kh * kw) as f64).sqrt();
                (0..count)
                    .map(|_| (std * standard_normal(&mut rng)) as f32)
                    .collect()
            }
            [_, fan_in] => uniform(&mut rng, count, *fan_in),
            [_] if name.ends_with(".bias") => {
                let weight = format!("{}.weight", name.trim_end_matches(".bias"));
                match vars.get(&weight).map(|w| w.dims().to_vec()).as_deref() {
                    Some([_, fan_in]) => uniform(&mut rng, count, *fan_in),
                    _ => continue, // BatchNorm bias
                }
            }
            _ => continue,
        };
        var.set(&Tensor::from_vec(values, dims, device)?)?;
    }
    drop(vars);
    Ok(model)
}

fn uniform(rng: &mut StdRng, count: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..count)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// Box-Muller.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }

    #[test]
    fn a_zero_count_is_refused_by_its_option_name() {
        for flag in [
            "--image-size",
            "--tokens",
            "--token-channels",
            "--heads",
            "--num-classes",
        ] {
            let err =
                Init::try_parse_from(["init", "--out", "o", "--class-names", "a,b", flag, "0"])
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
            assert!(
                err.contains(&format!("'{flag}")) && err.contains("must be at least 1"),
                "{flag}: {err}"
            );
        }
        assert!(
            Init::try_parse_from(["init", "--out", "o", "--num-classes", "6", "--heads", "1"])
                .is_ok()
        );
    }

    fn tiny() -> VtConfig {
        VtConfig {
            tokens: 4,
            token_channels: 32,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 6, 32)
        }
    }

    fn tensors(model: &Model) -> std::collections::BTreeMap<String, Vec<f32>> {
        let vars = model.varmap.data().lock().unwrap();
        vars.iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect()
    }

    fn std_of(v: &[f32]) -> f64 {
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
        (v.iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64)
            .sqrt()
    }

    #[test]
    fn force_never_replaces_a_runs_folders_nor_writes_inside_a_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(crate::train::CONFIG_TOML), "").unwrap();
        std::fs::write(run.join(crate::train::LOCK_FILE), "").unwrap();
        for folder in [crate::state::STATE_DIR, crate::state::BEST_DIR] {
            let checkpoint = run.join(folder);
            seeded_model(tiny(), &Device::Cpu, 1)
                .unwrap()
                .save(&checkpoint)
                .unwrap();
            let err = check_out_dir(&checkpoint, true).unwrap_err().to_string();
            assert!(err.contains("is its training run's"), "{err}");
            let err = check_out_dir(&checkpoint.join("sub"), true)
                .unwrap_err()
                .to_string();
            assert!(err.contains("inside the checkpoint folder"), "{err}");
        }
        let elsewhere = root.path().join("ck");
        seeded_model(tiny(), &Device::Cpu, 1)
            .unwrap()
            .save(&elsewhere)
            .unwrap();
        check_out_dir(&elsewhere, true).unwrap();
        assert!(check_out_dir(&elsewhere, false).is_err());
        check_out_dir(&run.join("new"), false).unwrap();
    }

    /// A model the options cannot make is named by them, not by its config's field names.
    #[test]
    fn a_model_the_options_cannot_make_is_named_by_them() {
        let config = VtConfig { heads: 3, ..tiny() };
        let Err(err) = seeded_model(config, &Device::Cpu, 1) else {
            panic!("made a model of 32 token channels and 3 heads");
        };
        assert!(
            err.to_string().ends_with("--token-channels 32 --heads 3"),
            "{err}"
        );
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(cause.is_some_and(|c| c.contains("divisible")), "{err:?}");
    }

    #[test]
    fn the_seed_fixes_every_tensor_with_vt_models_distributions() {
        let a = tensors(&seeded_model(tiny(), &Device::Cpu, 3).unwrap());
        assert_eq!(a, tensors(&seeded_model(tiny(), &Device::Cpu, 3).unwrap()));
        let b = tensors(&seeded_model(tiny(), &Device::Cpu, 4).unwrap());
        assert_ne!(a["head.weight"], b["head.weight"]);
        assert_ne!(
            a["vt.0.transformer.ffn1.bias"],
            b["vt.0.transformer.ffn1.bias"]
        );
        assert_eq!(a["bn1.running_var"], b["bn1.running_var"]);
        // Same spread as candle's own draw from vt-model's layer definitions.
        let reference = tensors(&Model::init(tiny(), &Device::Cpu).unwrap());
        for (name, values) in &a {
            let (ours, theirs) = (std_of(values), std_of(&reference[name]));
            if values.len() >= 256 {
                assert!(
                    (ours - theirs).abs() <= 0.15 * theirs,
                    "{name}: std {ours} vs {theirs}"
                );
            } else if theirs == 0.0 {
                assert_eq!(ours, 0.0, "{name} should stay constant");
            }
        }
    }
}
