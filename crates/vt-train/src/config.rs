//! Training options: from flags, a TOML file (`--config`, same names as the flags) and a
//! recipe's defaults, in that order of precedence, resolved into a [`TrainConfig`].
//!
//! A run writes its resolved config to `RUN/config.toml`, which is itself a valid
//! `--config` file.

use std::path::{Path, PathBuf};

use clap::builder::BoolishValueParser;
use serde::{Deserialize, Serialize};
use vt_data::augment::AugmentConfig;
use vt_data::fetch::DEFAULT_DATA_DIR;
use vt_data::transform::Normalize;
use vt_model::threads::MAX_THREADS;
use vt_model::Arch;

use crate::cli::thread_count;
use crate::error::{Result, TrainError};
use crate::mix::Mixing;
use crate::optim::Method;
use crate::schedule::Decay;
use crate::threads;

/// Where the modern recipe's cosine ends, for rates of at least 100 times this.
const COSINE_FLOOR: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The reference notebook: SGD (momentum 0.9, Nesterov), lr 0.01, StepLR (x0.1 every 7
    /// epochs), RandomResizedCrop(0.08-1) + RandomRotation(15) + flip, vt-resnet34; plus,
    /// against loss spikes, 1 warmup epoch and gradient clipping at 5 (`--warmup-epochs 0
    /// --clip-grad 0` is the notebook exactly).
    Seed,
    /// AdamW (lr 5e-4), 2 warmup epochs then cosine, label smoothing 0.1, weight decay 0.05,
    /// gradient clipping at 1, RandomResizedCrop(0.35-1) + flip, vt-resnet18.
    Modern,
}

impl Recipe {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Seed => "seed",
            Recipe::Modern => "modern",
        }
    }
}

/// The optimiser, by timm's `--opt` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum
    Sgd,
    /// SGD with plain momentum, as torchvision's reference recipe
    Momentum,
    /// AdamW: Adam with decoupled weight decay
    Adamw,
}

impl OptimizerKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Momentum => "momentum",
            OptimizerKind::Adamw => "adamw",
        }
    }
}

/// What follows the warmup, by timm's `--sched` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Half a cosine from --lr down to --min-lr over the rest of the run
    Cosine,
    /// --lr times --decay-rate every --decay-epochs (PyTorch's StepLR)
    Step,
}

/// The step schedule's defaults: the reference notebook's StepLR.
const DECAY_EPOCHS: usize = 7;
const DECAY_RATE: f64 = 0.1;

/// Options of `vt-train train`; every one is optional and falls back to the config file,
/// then the recipe.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainOptions {
    /// Data folder: train/, val/ [, test/] with a folder per class, as `cargo xtask
    /// fetch-data` makes it (with manifest.json) or in torchvision's ImageFolder layout
    /// [default: data/intel]
    #[arg(long, visible_alias = "data-dir", value_name = "DIR")]
    #[serde(alias = "data-dir")]
    pub data: Option<PathBuf>,
    /// Training recipe; its defaults apply to every option not given [default: modern]
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    /// vt-resnet18 or vt-resnet34 [default: seed recipe vt-resnet34, modern vt-resnet18]
    #[arg(long, visible_alias = "model")]
    #[serde(alias = "model")]
    pub arch: Option<Arch>,
    /// Input side in pixels (square) [default: 150, the photos' size]
    #[arg(long, visible_alias = "img-size")]
    #[serde(alias = "img-size")]
    pub image_size: Option<usize>,
    /// Visual tokens L [default: 16]
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Token channels CT [default: 1024]
    #[arg(long)]
    pub token_channels: Option<usize>,
    /// Attention heads [default: 16]
    #[arg(long)]
    pub heads: Option<usize>,
    /// Epochs to train [default: seed 25, modern 30]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per batch [default: 32]
    #[arg(long, short = 'b')]
    pub batch_size: Option<usize>,
    /// Batches per optimiser step: their gradients are summed (each batch's loss divided by
    /// the batches in its update: N, fewer in an epoch's last) before one update, for an
    /// effective batch of N x --batch-size where memory holds only one batch (timm's
    /// --grad-accum-steps). BatchNorm still sees one batch at a time; the schedule counts
    /// updates [default: 1]
    #[arg(long, value_name = "N")]
    pub grad_accum_steps: Option<usize>,
    /// Peak learning rate [default: seed 0.01, modern 5e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay, on conv/linear weights only (not BatchNorm or biases) [default: seed 0,
    /// modern 0.05]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Optimiser (timm's names) [default: seed sgd, modern adamw]
    #[arg(long, value_enum)]
    pub opt: Option<OptimizerKind>,
    /// SGD's momentum, AdamW's first beta (its second is 0.999, its epsilon 1e-8)
    /// [default: 0.9]
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Learning-rate schedule after the warmup (timm's names) [default: seed step, modern
    /// cosine]
    #[arg(long, value_enum)]
    pub sched: Option<ScheduleKind>,
    /// Epochs between the step schedule's drops, counted from the run's start [default: 7]
    #[arg(long, value_name = "N")]
    pub decay_epochs: Option<usize>,
    /// The step schedule's factor at each drop [default: 0.1]
    #[arg(long, value_name = "FACTOR")]
    pub decay_rate: Option<f64>,
    /// The learning rate the cosine schedule ends at [default: 1e-6, or a hundredth of --lr
    /// where that is lower]
    #[arg(long, value_name = "LR")]
    pub min_lr: Option<f64>,
    /// Epochs of linear learning-rate warmup, fractions allowed: over its W steps the rate
    /// rises each step from --lr/W to --lr [default: seed 1, modern 2]
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// Label smoothing of the cross-entropy [default: seed 0, modern 0.1]
    #[arg(long, visible_alias = "smoothing")]
    #[serde(alias = "smoothing")]
    pub label_smoothing: Option<f64>,
    /// MixUp: blend each training image with the previous of its batch, and their labels alike,
    /// in shares drawn from Beta(ALPHA, ALPHA) (torchvision's reference recipe: 0.2); 0
    /// disables. With --cutmix-alpha too, each batch takes one of the two [default: 0]
    #[arg(long, visible_alias = "mixup", value_name = "ALPHA")]
    #[serde(alias = "mixup")]
    pub mixup_alpha: Option<f64>,
    /// CutMix: paste a box of the previous image of the batch into each training image, the
    /// labels weighed by area, its share drawn from Beta(ALPHA, ALPHA) (torchvision's
    /// reference recipe: 1.0); 0 disables [default: 0]
    #[arg(long, visible_alias = "cutmix", value_name = "ALPHA")]
    #[serde(alias = "cutmix")]
    pub cutmix_alpha: Option<f64>,
    /// TrivialAugmentWide after the crop, rotation and flip: one of 14 photometric or
    /// geometric operations at a random strength per image, resampled bilinearly
    /// (torchvision's reference recipe) [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trivial_augment: Option<bool>,
    /// RandomErasing: with this probability, set a random box of each normalised training
    /// image to 0, the mean colour, as torchvision does (torchvision's reference recipe: 0.1;
    /// timm's default --remode pixel fills it with noise instead) [default: 0]
    #[arg(long, visible_alias = "reprob", value_name = "P")]
    #[serde(alias = "reprob")]
    pub random_erase: Option<f64>,
    /// RandomResizedCrop's range of the crop's area, as fractions of the photo's (timm's
    /// --scale; in a config file `scale = [MIN, MAX]`) [default: seed 0.08 1, modern 0.35 1]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub scale: Option<Vec<f64>>,
    /// RandomResizedCrop's range of the crop's aspect ratio, width / height, drawn
    /// log-uniformly (timm's --ratio) [default: 0.75 1.3333]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub ratio: Option<Vec<f64>>,
    /// RandomRotation: turn each training image by an angle drawn uniformly from [-DEG, DEG],
    /// black outside the photo; 0 disables [default: seed 15, modern 0]
    #[arg(long, value_name = "DEG")]
    pub rotation: Option<f64>,
    /// RandomHorizontalFlip: mirror each training image left-right with this probability
    /// (timm's --hflip) [default: 0.5]
    #[arg(long, value_name = "P")]
    pub hflip: Option<f64>,
    /// ColorJitter: change each training image's brightness, contrast and saturation, in a
    /// random order, each by a factor drawn from [1 - S, 1 + S] (timm's --color-jitter; timm
    /// trains with 0.4); before --trivial-augment when both are on; 0 disables [default: 0]
    #[arg(long, value_name = "S")]
    pub color_jitter: Option<f64>,
    /// Stochastic depth: in training, each image skips each residual branch (the stem's
    /// blocks, the transformers' attention and feed-forward) with a probability rising
    /// linearly from 0 at the first block to RATE at the last, as timm's --drop-path (timm's
    /// ResNet recipes: 0.05); 0 disables [default: 0]
    #[arg(long, value_name = "RATE")]
    pub drop_path: Option<f64>,
    /// Clip the global L2 gradient norm to this; 0 disables [default: seed 5, modern 1]
    #[arg(long, value_name = "NORM")]
    pub clip_grad: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999);
    /// validation, best/ and last/ then use the averaged weights; 0 disables [default: off]
    #[arg(long, visible_alias = "model-ema-decay", value_name = "DECAY")]
    #[serde(alias = "model-ema-decay")]
    pub ema: Option<f64>,
    /// Stop when validation accuracy has not improved for this many epochs; 0 disables
    /// [default: off]
    #[arg(long, value_name = "PATIENCE")]
    pub early_stop: Option<usize>,
    /// Keep the checkpoints of the N best epochs (ranked as best/: validation accuracy,
    /// then loss) in RUN/top/epoch-NNN/, for `vt-train average` (timm's
    /// --checkpoint-hist); 0 keeps none [default: 0]
    #[arg(long, value_name = "N")]
    pub checkpoint_hist: Option<usize>,
    /// Do not update the ResNet stem (conv1, bn1, layer1-3) for the first N epochs, e.g.
    /// while the VT stage adapts to a pretrained stem; it runs in evaluation mode meanwhile,
    /// its BatchNorm statistics kept, and without a backward pass [default: 0]
    #[arg(long, value_name = "N")]
    pub freeze_stem_epochs: Option<usize>,
    /// ImageNet ResNet weights for the stem: a safetensors or PyTorch (.pth) file, or a hub
    /// id such as timm/resnet34.a1_in1k (ResNet-34 for vt-resnet34, ResNet-18 for
    /// vt-resnet18)
    #[arg(long, value_name = "FILE|HUB-ID")]
    pub pretrained: Option<String>,
    /// Start from the weights of a vt checkpoint (e.g. runs/a/best) to fine-tune it: all of
    /// them when its classes are the data's, all but the head's otherwise. Its arch, tokens,
    /// token channels and heads must be this run's; the image size may differ
    #[arg(long, value_name = "DIR")]
    pub initial_checkpoint: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto [default: auto]
    #[arg(long)]
    pub device: Option<String>,
    /// Let f32 convolutions on a GPU use TF32 tensor cores, as PyTorch does by default
    /// (vt-serve and `vt-train eval` never use TF32) [default: true]
    #[arg(long, value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub tf32: Option<bool>,
    /// On the CPU, let f32 convolutions and linear layers multiply in bfloat16 with f32 sums
    /// (CPUs with AVX512-BF16; PyTorch's `torch.backends.mkldnn.fp32_precision = "bf16"`):
    /// faster products, each rounded to 8 significant bits. Validation runs the same way;
    /// `vt-train eval` computes in full f32 unless given --bf16-products [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub bf16_products: Option<bool>,
    /// Compute threads (sets RAYON_NUM_THREADS for candle) [default: all cores]
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
    /// Image decoding threads [default: the cores left by --threads, at least 1; on a GPU,
    /// all cores but one]
    #[arg(long, short = 'j', visible_alias = "workers", value_parser = thread_count)]
    #[serde(alias = "workers")]
    pub loader_threads: Option<usize>,
    /// Seed of the initialisation, data order and augmentation [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run folder [default: runs/<date-time>]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Train on a random subset of N training images (smoke runs)
    #[arg(long, value_name = "N")]
    pub limit_train: Option<usize>,
    /// Validate on a random subset of N validation images (smoke runs)
    #[arg(long, value_name = "N")]
    pub limit_val: Option<usize>,
}

impl TrainOptions {
    pub fn from_toml_file(path: &Path) -> Result<TrainOptions> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        toml::from_str(&text).map_err(|e| TrainError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// `self` with every option that `over` sets taken from `over`. Field by field, not
    /// through a serde map: JSON has no NaN, which would read as "not given". A schedule
    /// that `over` names drops what `self` set for the other one (a run's config.toml,
    /// resumed with another `--sched`).
    pub fn overridden_by(&self, over: &TrainOptions) -> TrainOptions {
        let merged = self.merged_with(over);
        match over.sched {
            Some(ScheduleKind::Step) => TrainOptions {
                min_lr: over.min_lr,
                ..merged
            },
            Some(ScheduleKind::Cosine) => TrainOptions {
                decay_epochs: over.decay_epochs,
                decay_rate: over.decay_rate,
                ..merged
            },
            None => merged,
        }
    }

    fn merged_with(&self, over: &TrainOptions) -> TrainOptions {
        macro_rules! either {
            ($($field:ident),* $(,)?) => {
                TrainOptions {
                    $($field: over.$field.as_ref().or(self.$field.as_ref()).cloned()),*
                }
            };
        }
        either!(
            data,
            recipe,
            arch,
            image_size,
            tokens,
            token_channels,
            heads,
            epochs,
            batch_size,
            grad_accum_steps,
            lr,
            weight_decay,
            opt,
            momentum,
            sched,
            decay_epochs,
            decay_rate,
            min_lr,
            warmup_epochs,
            label_smoothing,
            mixup_alpha,
            cutmix_alpha,
            trivial_augment,
            random_erase,
            scale,
            ratio,
            rotation,
            hflip,
            color_jitter,
            drop_path,
            clip_grad,
            ema,
            early_stop,
            checkpoint_hist,
            freeze_stem_epochs,
            pretrained,
            initial_checkpoint,
            device,
            tf32,
            bf16_products,
            threads,
            loader_threads,
            seed,
            run_dir,
            limit_train,
            limit_val,
        )
    }

    /// The options that `over` sets to a value different from `self`'s, as `name: old -> new`.
    pub fn changes(&self, over: &TrainOptions) -> Vec<String> {
        let base = as_map(self);
        as_map(over)
            .into_iter()
            .filter(|(key, value)| !value.is_null() && base.get(key) != Some(value))
            .map(|(key, value)| {
                format!(
                    "{key}: {} -> {value}",
                    base.get(&key).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect()
    }
}

fn as_map(options: &TrainOptions) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(options) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// The geometry of the training images' augmentation (torchvision semantics, see
/// vt_data::augment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentSpec {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub rotation_deg: f64,
    pub hflip: f64,
}

impl AugmentSpec {
    /// The recipe's: the notebook's for the seed recipe; a milder crop without rotation for
    /// the modern one (TrivialAugment and RandomErasing, when on, add variety).
    pub fn of(recipe: Recipe) -> AugmentSpec {
        let ratio = (3.0 / 4.0, 4.0 / 3.0);
        match recipe {
            Recipe::Seed => AugmentSpec {
                scale: (0.08, 1.0),
                ratio,
                rotation_deg: 15.0,
                hflip: 0.5,
            },
            Recipe::Modern => AugmentSpec {
                scale: (0.35, 1.0),
                ratio,
                rotation_deg: 0.0,
                hflip: 0.5,
            },
        }
    }
}

/// Every training setting, resolved. Serialised with the option names, so that a saved
/// config reads back as [`TrainOptions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainConfig {
    pub data: PathBuf,
    pub recipe: Recipe,
    pub arch: Arch,
    pub image_size: usize,
    pub tokens: usize,
    pub token_channels: usize,
    pub heads: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Absent from run folders written before the option existed: 1.
    #[serde(default = "one_batch_per_step")]
    pub grad_accum_steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Absent from run folders written before the option existed: the recipe's, as in
    /// [`TrainConfig::optimizer`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt: Option<OptimizerKind>,
    /// Absent from run folders written before the option existed: 0.9, both recipes'.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Absent from run folders written before the option existed: the recipe's, as in
    /// [`TrainConfig::schedule`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<ScheduleKind>,
    /// The step schedule's, None with the cosine (and in run folders written before the
    /// option existed: 7 and 0.1, as [`TrainConfig::decay`] reads them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_rate: Option<f64>,
    /// None: the default, which follows --lr (also when a resume changes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    /// Absent from run folders written before the option existed: off.
    #[serde(default)]
    pub mixup_alpha: f64,
    #[serde(default)]
    pub cutmix_alpha: f64,
    #[serde(default)]
    pub trivial_augment: bool,
    #[serde(default)]
    pub random_erase: f64,
    /// RandomResizedCrop's ranges, the rotation and the flip: absent from run folders
    /// written before the options existed, the recipe's, as [`TrainConfig::augment_spec`]
    /// reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hflip: Option<f64>,
    #[serde(default)]
    pub color_jitter: f64,
    #[serde(default)]
    pub drop_path: f64,
    pub clip_grad: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<usize>,
    /// Absent from run folders written before the option existed: none kept.
    #[serde(default)]
    pub checkpoint_hist: usize,
    pub freeze_stem_epochs: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_checkpoint: Option<PathBuf>,
    pub device: String,
    /// Absent from run folders written before the option existed: resuming takes the default.
    #[serde(default = "tf32_by_default")]
    pub tf32: bool,
    #[serde(default)]
    pub bf16_products: bool,
    pub threads: usize,
    pub loader_threads: usize,
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_train: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_val: Option<usize>,
}

fn tf32_by_default() -> bool {
    true
}

fn default_momentum() -> f64 {
    0.9
}

/// "1 step", "2 steps".
/// `options`, read from `file` when one is named, with `over` them, resolved. A refusal
/// names its option by its flag: when the value came from the file, the file is named too.
pub fn resolve_file_over(
    file: Option<&Path>,
    options: &TrainOptions,
    over: &TrainOptions,
) -> Result<TrainConfig> {
    TrainConfig::resolve(&options.overridden_by(over)).map_err(|e| match (e, file) {
        (TrainError::Config(message), Some(file)) => {
            let key = message
                .strip_prefix("--")
                .and_then(|rest| rest.split([' ', ',', ':']).next())
                .unwrap_or_default();
            let sets = |options: &TrainOptions| {
                toml::Value::try_from(options).is_ok_and(|table| table.get(key).is_some())
            };
            if sets(options) && !sets(over) {
                TrainError::Config(format!(
                    "{message} (the value in {}; the flag replaces it)",
                    file.display()
                ))
            } else {
                TrainError::Config(message)
            }
        }
        (e, _) => e,
    })
}

pub fn count_steps(steps: u64) -> String {
    format!("{steps} step{}", if steps == 1 { "" } else { "s" })
}

fn one_batch_per_step() -> usize {
    1
}

/// Refuses a learning rate that is not positive, or that the optimiser, which steps in f32,
/// would apply as zero, infinity or a rate with lost digits.
pub fn check_rate(flag: &str, lr: f64) -> Result<()> {
    let range = f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX);
    if range.contains(&lr) {
        return Ok(());
    }
    let why = if lr > 0.0 {
        format!(
            "the optimiser steps in f32: rates from {:e} to {:e}",
            f32::MIN_POSITIVE,
            f32::MAX
        )
    } else {
        "it must be positive".to_string()
    };
    Err(TrainError::Config(format!(
        "{flag} {lr:e} cannot be used: {why}"
    )))
}

impl TrainConfig {
    /// Fills what `options` leaves open from the recipe and checks every value.
    pub fn resolve(options: &TrainOptions) -> Result<TrainConfig> {
        let o = options;
        let recipe = o.recipe.unwrap_or(Recipe::Modern);
        let seed = recipe == Recipe::Seed;
        let threads = o
            .threads
            .unwrap_or_else(vt_model::threads::default_compute_threads);
        let device = o.device.clone().unwrap_or_else(|| "auto".into());
        let sched = o.sched.unwrap_or(if seed {
            ScheduleKind::Step
        } else {
            ScheduleKind::Cosine
        });
        let gpu = vt_model::names_a_gpu(&device);
        let augment = AugmentSpec::of(recipe);
        let config = TrainConfig {
            data: o
                .data
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            recipe,
            arch: o.arch.unwrap_or(if seed {
                Arch::VtResNet34
            } else {
                Arch::VtResNet18
            }),
            image_size: o.image_size.unwrap_or(150),
            tokens: o.tokens.unwrap_or(16),
            token_channels: o.token_channels.unwrap_or(1024),
            heads: o.heads.unwrap_or(16),
            epochs: o.epochs.unwrap_or(if seed { 25 } else { 30 }),
            batch_size: o.batch_size.unwrap_or(32),
            grad_accum_steps: o.grad_accum_steps.unwrap_or_else(one_batch_per_step),
            lr: o.lr.unwrap_or(if seed { 0.01 } else { 5e-4 }),
            weight_decay: o.weight_decay.unwrap_or(if seed { 0.0 } else { 0.05 }),
            opt: Some(o.opt.unwrap_or(if seed {
                OptimizerKind::Sgd
            } else {
                OptimizerKind::Adamw
            })),
            momentum: o.momentum.unwrap_or_else(default_momentum),
            sched: Some(sched),
            // Resolved for the step schedule; given for the cosine, they are refused.
            decay_epochs: match sched {
                ScheduleKind::Step => Some(o.decay_epochs.unwrap_or(DECAY_EPOCHS)),
                ScheduleKind::Cosine => o.decay_epochs,
            },
            decay_rate: match sched {
                ScheduleKind::Step => Some(o.decay_rate.unwrap_or(DECAY_RATE)),
                ScheduleKind::Cosine => o.decay_rate,
            },
            min_lr: o.min_lr,
            warmup_epochs: o.warmup_epochs.unwrap_or(if seed { 1.0 } else { 2.0 }),
            label_smoothing: o.label_smoothing.unwrap_or(if seed { 0.0 } else { 0.1 }),
            mixup_alpha: o.mixup_alpha.unwrap_or(0.0),
            cutmix_alpha: o.cutmix_alpha.unwrap_or(0.0),
            trivial_augment: o.trivial_augment.unwrap_or(false),
            random_erase: o.random_erase.unwrap_or(0.0),
            scale: Some(
                o.scale
                    .clone()
                    .unwrap_or(vec![augment.scale.0, augment.scale.1]),
            ),
            ratio: Some(
                o.ratio
                    .clone()
                    .unwrap_or(vec![augment.ratio.0, augment.ratio.1]),
            ),
            rotation: Some(o.rotation.unwrap_or(augment.rotation_deg)),
            hflip: Some(o.hflip.unwrap_or(augment.hflip)),
            color_jitter: o.color_jitter.unwrap_or(0.0),
            drop_path: o.drop_path.unwrap_or(0.0),
            clip_grad: o.clip_grad.unwrap_or(if seed { 5.0 } else { 1.0 }),
            ema: o.ema.filter(|d| *d != 0.0),
            early_stop: o.early_stop.filter(|p| *p != 0),
            checkpoint_hist: o.checkpoint_hist.unwrap_or(0),
            freeze_stem_epochs: o.freeze_stem_epochs.unwrap_or(0),
            pretrained: o.pretrained.clone(),
            initial_checkpoint: o.initial_checkpoint.clone(),
            device,
            tf32: o.tf32.unwrap_or_else(tf32_by_default),
            bf16_products: o.bf16_products.unwrap_or(false),
            threads,
            loader_threads: o
                .loader_threads
                .unwrap_or_else(|| threads::default_loader_threads(threads, gpu)),
            seed: o.seed.unwrap_or(0),
            run_dir: o.run_dir.clone(),
            limit_train: o.limit_train,
            limit_val: o.limit_val,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(TrainError::Config(msg));
        if self.pretrained.is_some() && self.initial_checkpoint.is_some() {
            return fail(
                "--pretrained and --initial-checkpoint both give the stem's weights: choose one"
                    .into(),
            );
        }
        let counts = [
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--grad-accum-steps", self.grad_accum_steps),
            ("--image-size", self.image_size),
            ("--tokens", self.tokens),
            ("--token-channels", self.token_channels),
            ("--heads", self.heads),
            ("--decay-epochs", self.decay_epochs.unwrap_or(DECAY_EPOCHS)),
            ("--threads", self.threads),
            ("--loader-threads", self.loader_threads),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return fail(format!("{flag} must be at least 1, got 0"));
        }
        for (flag, threads) in [
            ("--threads", self.threads),
            ("--loader-threads", self.loader_threads),
        ] {
            if threads > MAX_THREADS {
                return fail(format!(
                    "{flag} must be at most {MAX_THREADS}, got {threads}"
                ));
            }
        }
        check_rate("--lr", self.lr)?;
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return fail(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return fail(format!(
                "--momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        let step = self.schedule() == ScheduleKind::Step;
        if let Some(rate) = self.decay_rate.filter(|r| !(*r > 0.0 && *r <= 1.0)) {
            return fail(format!("--decay-rate must be in (0, 1], got {rate}"));
        }
        let step_options: Vec<String> = [
            self.decay_epochs.map(|n| format!("--decay-epochs {n}")),
            self.decay_rate.map(|r| format!("--decay-rate {r}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !step && !step_options.is_empty() {
            let (verb, them) = match step_options.len() {
                1 => ("sets", "it"),
                _ => ("set", "them"),
            };
            return fail(format!(
                "{} {verb} the step schedule, and the schedule is cosine: add --sched step, or \
                 leave {them} out",
                step_options.join(" and ")
            ));
        }
        if let Some(min_lr) = self.min_lr {
            if step {
                return fail(format!(
                    "--min-lr {min_lr:e} sets where the cosine schedule ends, and the schedule \
                     is step: add --sched cosine, or leave it out"
                ));
            }
            if !(min_lr >= 0.0 && min_lr < self.lr) {
                return fail(format!(
                    "--min-lr must be at least 0 and below --lr ({:e}), got {min_lr:e}",
                    self.lr
                ));
            }
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            return fail(format!(
                "--warmup-epochs must be >= 0, got {}",
                self.warmup_epochs
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail(format!(
                "--label-smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        for (flag, alpha) in [
            ("--mixup-alpha", self.mixup_alpha),
            ("--cutmix-alpha", self.cutmix_alpha),
        ] {
            if !(alpha.is_finite() && alpha >= 0.0) {
                return fail(format!("{flag} must be >= 0 (0 disables), got {alpha}"));
            }
        }
        for (flag, p) in [
            ("--random-erase", Some(self.random_erase)),
            ("--hflip", self.hflip),
        ] {
            if let Some(p) = p.filter(|p| !(0.0..=1.0).contains(p)) {
                return fail(format!("{flag} must be a probability in [0, 1], got {p}"));
            }
        }
        for (flag, range, within) in [
            ("--scale", &self.scale, "0 < MIN <= MAX <= 1"),
            ("--ratio", &self.ratio, "0 < MIN <= MAX"),
        ] {
            let Some(range) = range else { continue };
            // Checked as the transform gets them, in f32: 1e-50 would become 0 there.
            let fits = match range[..] {
                [min, max] => min as f32 > 0.0 && min <= max && (max as f32).is_finite(),
                _ => false,
            };
            if !fits || (flag == "--scale" && range.iter().any(|v| *v > 1.0)) {
                let got: Vec<String> = range.iter().map(f64::to_string).collect();
                return fail(format!(
                    "{flag} takes two numbers MIN MAX with {within}, got {}",
                    got.join(" ")
                ));
            }
        }
        if let Some(deg) = self.rotation.filter(|d| !(0.0..=180.0).contains(d)) {
            return fail(format!("--rotation must be 0 to 180 degrees, got {deg}"));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return fail(format!(
                "--drop-path must be in [0, 1) (0 disables), got {}",
                self.drop_path
            ));
        }
        if !((self.color_jitter as f32).is_finite() && self.color_jitter >= 0.0) {
            return fail(format!(
                "--color-jitter must be >= 0 (0 disables), got {}",
                self.color_jitter
            ));
        }
        if !(self.clip_grad.is_finite() && self.clip_grad >= 0.0) {
            return fail(format!(
                "--clip-grad must be >= 0 (0 disables), got {}",
                self.clip_grad
            ));
        }
        if let Some(decay) = self.ema {
            if !(0.0..1.0).contains(&decay) {
                return fail(format!("--ema must be in (0, 1), got {decay}"));
            }
        }
        for (flag, limit) in [
            ("--limit-train", self.limit_train),
            ("--limit-val", self.limit_val),
        ] {
            if limit == Some(0) {
                return fail(format!("{flag} must be at least 1, got 0"));
            }
        }
        Ok(())
    }

    /// Refuses, naming the flag and both values, what a resumed run (`self`) cannot change
    /// from the `run` it continues: the model's shape and image size (the saved weights
    /// have them), the recipe and optimiser (the saved moments are its optimiser's, kept with
    /// its momentum) and the pretrained stem (loaded at a run's start only).
    pub fn check_resume(&self, run: &TrainConfig) -> Result<()> {
        let fixed = [
            (
                "--recipe",
                run.recipe.name().into(),
                self.recipe.name().into(),
            ),
            (
                "--opt",
                run.optimizer().name().into(),
                self.optimizer().name().into(),
            ),
            (
                "--momentum",
                run.momentum.to_string(),
                self.momentum.to_string(),
            ),
            ("--arch", run.arch.to_string(), self.arch.to_string()),
            (
                "--image-size",
                run.image_size.to_string(),
                self.image_size.to_string(),
            ),
            ("--tokens", run.tokens.to_string(), self.tokens.to_string()),
            (
                "--token-channels",
                run.token_channels.to_string(),
                self.token_channels.to_string(),
            ),
            ("--heads", run.heads.to_string(), self.heads.to_string()),
        ];
        if let Some((flag, old, new)) = fixed.iter().find(|(_, old, new)| old != new) {
            return Err(TrainError::Config(format!(
                "{flag} cannot change on resume: the run has {old}, got {new}"
            )));
        }
        if self.pretrained != run.pretrained {
            return Err(TrainError::Config(format!(
                "--pretrained only applies to a new run: the run started from {}, got {}",
                run.pretrained.as_deref().unwrap_or("random weights"),
                self.pretrained.as_deref().unwrap_or("none")
            )));
        }
        if !same_folder(&self.initial_checkpoint, &run.initial_checkpoint) {
            let named = |dir: &Option<PathBuf>| {
                dir.as_ref()
                    .map_or_else(|| "none".to_string(), |d| d.display().to_string())
            };
            return Err(TrainError::Config(format!(
                "--initial-checkpoint only applies to a new run: the run started from {}, got {}",
                named(&run.initial_checkpoint),
                named(&self.initial_checkpoint)
            )));
        }
        Ok(())
    }

    /// Refuses a resume whose epochs would have `steps` optimiser steps where the run's
    /// had `run_steps`: the schedule (warmup, StepLR's epochs, the cosine's length) counts
    /// in steps, so its position would no longer match the epochs done.
    pub fn check_resume_steps(&self, run: &TrainConfig, run_steps: u64, steps: u64) -> Result<()> {
        if steps == run_steps {
            return Ok(());
        }
        let limit = |l: Option<usize>| l.map_or_else(|| "no limit".to_string(), |n| n.to_string());
        let changed: Vec<String> = [
            (
                "--batch-size",
                run.batch_size.to_string(),
                self.batch_size.to_string(),
            ),
            (
                "--grad-accum-steps",
                run.grad_accum_steps.to_string(),
                self.grad_accum_steps.to_string(),
            ),
            (
                "--limit-train",
                limit(run.limit_train),
                limit(self.limit_train),
            ),
            (
                "--data",
                run.data.display().to_string(),
                self.data.display().to_string(),
            ),
        ]
        .into_iter()
        .filter(|(_, old, new)| old != new)
        .map(|(flag, old, new)| format!("{flag} {new} (the run has {old})"))
        .collect();
        let why = format!(
            "an epoch would take {} instead of the run's {run_steps}, and the learning-rate \
             schedule counts in steps",
            count_steps(steps)
        );
        Err(TrainError::Config(if changed.is_empty() {
            format!(
                "the training images of {} changed since the run started: {why}; start a new run",
                self.data.display()
            )
        } else {
            format!("{} cannot be resumed: {why}", changed.join(", "))
        }))
    }

    /// The same settings as options (for merging with overrides on resume).
    pub fn to_options(&self) -> TrainOptions {
        TrainOptions {
            data: Some(self.data.clone()),
            recipe: Some(self.recipe),
            arch: Some(self.arch),
            image_size: Some(self.image_size),
            tokens: Some(self.tokens),
            token_channels: Some(self.token_channels),
            heads: Some(self.heads),
            epochs: Some(self.epochs),
            batch_size: Some(self.batch_size),
            grad_accum_steps: Some(self.grad_accum_steps),
            lr: Some(self.lr),
            weight_decay: Some(self.weight_decay),
            opt: self.opt,
            momentum: Some(self.momentum),
            sched: self.sched,
            decay_epochs: self.decay_epochs,
            decay_rate: self.decay_rate,
            min_lr: self.min_lr,
            warmup_epochs: Some(self.warmup_epochs),
            label_smoothing: Some(self.label_smoothing),
            mixup_alpha: Some(self.mixup_alpha),
            cutmix_alpha: Some(self.cutmix_alpha),
            trivial_augment: Some(self.trivial_augment),
            random_erase: Some(self.random_erase),
            scale: self.scale.clone(),
            ratio: self.ratio.clone(),
            rotation: self.rotation,
            hflip: self.hflip,
            color_jitter: Some(self.color_jitter),
            drop_path: Some(self.drop_path),
            clip_grad: Some(self.clip_grad),
            ema: self.ema,
            early_stop: self.early_stop,
            checkpoint_hist: Some(self.checkpoint_hist),
            freeze_stem_epochs: Some(self.freeze_stem_epochs),
            pretrained: self.pretrained.clone(),
            initial_checkpoint: self.initial_checkpoint.clone(),
            device: Some(self.device.clone()),
            tf32: Some(self.tf32),
            bf16_products: Some(self.bf16_products),
            threads: Some(self.threads),
            loader_threads: Some(self.loader_threads),
            seed: Some(self.seed),
            run_dir: self.run_dir.clone(),
            limit_train: self.limit_train,
            limit_val: self.limit_val,
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self)
            .map_err(|e| TrainError::Config(format!("cannot write the config as TOML: {e}")))
    }

    pub fn mixing(&self) -> Mixing {
        Mixing {
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
        }
    }

    /// `--opt`, or the recipe's for a run written before the option existed.
    pub fn optimizer(&self) -> OptimizerKind {
        self.opt.unwrap_or(match self.recipe {
            Recipe::Seed => OptimizerKind::Sgd,
            Recipe::Modern => OptimizerKind::Adamw,
        })
    }

    /// `--sched`, or the recipe's for a run written before the option existed.
    pub fn schedule(&self) -> ScheduleKind {
        self.sched.unwrap_or(match self.recipe {
            Recipe::Seed => ScheduleKind::Step,
            Recipe::Modern => ScheduleKind::Cosine,
        })
    }

    pub fn method(&self) -> Method {
        match self.optimizer() {
            // Nesterov's look-ahead needs a momentum (PyTorch refuses it without one).
            OptimizerKind::Sgd => Method::Sgd {
                momentum: self.momentum,
                nesterov: self.momentum > 0.0,
            },
            OptimizerKind::Momentum => Method::Sgd {
                momentum: self.momentum,
                nesterov: false,
            },
            OptimizerKind::Adamw => Method::AdamW {
                beta1: self.momentum,
                beta2: 0.999,
                eps: 1e-8,
            },
        }
    }

    pub fn decay(&self) -> Decay {
        match self.schedule() {
            ScheduleKind::Step => Decay::Step {
                every_epochs: self.decay_epochs.unwrap_or(DECAY_EPOCHS),
                gamma: self.decay_rate.unwrap_or(DECAY_RATE),
            },
            // By default 1e-6, or a hundredth of --lr where that is lower, so that the cosine
            // always decays (a floor above --lr would raise the rate).
            ScheduleKind::Cosine => Decay::Cosine {
                min_lr: self
                    .min_lr
                    .unwrap_or_else(|| COSINE_FLOOR.min(self.lr / 100.0)),
            },
        }
    }

    /// `--scale`, `--ratio`, `--rotation` and `--hflip`, or the recipe's where a run was
    /// written before they existed.
    pub fn augment_spec(&self) -> AugmentSpec {
        let recipe = AugmentSpec::of(self.recipe);
        let pair = |range: &Option<Vec<f64>>, default| match range.as_deref() {
            Some(&[min, max]) => (min, max),
            _ => default,
        };
        AugmentSpec {
            scale: pair(&self.scale, recipe.scale),
            ratio: pair(&self.ratio, recipe.ratio),
            rotation_deg: self.rotation.unwrap_or(recipe.rotation_deg),
            hflip: self.hflip.unwrap_or(recipe.hflip),
        }
    }

    pub fn augment(&self, norm: Normalize) -> AugmentConfig {
        let spec = self.augment_spec();
        let narrow = |(min, max): (f64, f64)| (min as f32, max as f32);
        AugmentConfig {
            image_size: self.image_size as u32,
            scale: narrow(spec.scale),
            ratio: narrow(spec.ratio),
            rotation_deg: spec.rotation_deg as f32,
            hflip: spec.hflip as f32,
            color_jitter: self.color_jitter as f32,
            trivial_augment: self.trivial_augment,
            random_erasing: self.random_erase as f32,
            norm,
        }
    }
}

/// Whether two optional folders are the same: equal paths, or paths to one folder
/// (`./runs/a/best` and `runs/a/best`).
fn same_folder(a: &Option<PathBuf>, b: &Option<PathBuf>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A value refused from a file names the file (the message names the flag, which the
    /// user never gave), and a flag given over it replaces it.
    #[test]
    fn a_files_refused_value_names_the_file_and_a_flag_replaces_it() {
        let path = Path::new("runs/x/config.toml");
        let file: TrainOptions = toml::from_str("lr = inf\nthreads = 100000\n").unwrap();
        let refused = |flags: &TrainOptions| {
            resolve_file_over(Some(path), &file, flags)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(&TrainOptions::default()),
            "--threads must be at most 1024, got 100000 (the value in runs/x/config.toml; the \
             flag replaces it)"
        );
        let flags = TrainOptions {
            threads: Some(2),
            ..Default::default()
        };
        let err = refused(&flags);
        assert!(
            err.starts_with("--lr inf cannot be used")
                && err.ends_with("(the value in runs/x/config.toml; the flag replaces it)"),
            "{err}"
        );
        let flags = TrainOptions {
            lr: Some(0.01),
            ..flags
        };
        let config = resolve_file_over(Some(path), &file, &flags).unwrap();
        assert_eq!((config.threads, config.lr), (2, 0.01));
        // A flag's own refusal is the flag's.
        let flags = TrainOptions {
            epochs: Some(0),
            ..flags
        };
        assert_eq!(refused(&flags), "--epochs must be at least 1, got 0");
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_recipe() {
        let file: TrainOptions =
            toml::from_str("recipe = \"seed\"\nlr = 0.05\nepochs = 3\n").unwrap();
        let flags = TrainOptions {
            epochs: Some(5),
            ..Default::default()
        };
        let config = TrainConfig::resolve(&file.overridden_by(&flags)).unwrap();
        assert_eq!(config.recipe, Recipe::Seed);
        assert_eq!(config.epochs, 5);
        assert_eq!(config.lr, 0.05);
        assert_eq!(config.arch, Arch::VtResNet34);
        assert_eq!(
            config.method(),
            Method::Sgd {
                momentum: 0.9,
                nesterov: true
            }
        );
        assert_eq!(
            config.decay(),
            Decay::Step {
                every_epochs: 7,
                gamma: 0.1
            }
        );
        assert_eq!(config.augment_spec().scale, (0.08, 1.0));
        let modern = TrainConfig::resolve(&TrainOptions::default()).unwrap();
        assert_eq!(
            (
                modern.label_smoothing,
                modern.weight_decay,
                modern.clip_grad
            ),
            (0.1, 0.05, 1.0)
        );
        assert!(matches!(modern.method(), Method::AdamW { .. }));
        assert!(modern.loader_threads >= 1);
        for (device, gpu) in [("cpu", false), ("cuda", true)] {
            let options = TrainOptions {
                device: Some(device.into()),
                threads: Some(2),
                ..TrainOptions::default()
            };
            let config = TrainConfig::resolve(&options).unwrap();
            let loader_threads = threads::default_loader_threads(2, gpu);
            assert_eq!(config.loader_threads, loader_threads, "{device}");
            let given = TrainOptions {
                loader_threads: Some(3),
                ..options
            };
            assert_eq!(TrainConfig::resolve(&given).unwrap().loader_threads, 3);
        }
        assert!(modern.tf32, "TF32 convolutions by default, as in PyTorch");
        let file: TrainOptions = toml::from_str("tf32 = false\n").unwrap();
        assert!(!TrainConfig::resolve(&file).unwrap().tf32);
        assert!(
            !modern.bf16_products,
            "full f32 products by default, as in PyTorch"
        );
        let file: TrainOptions = toml::from_str("bf16-products = true\n").unwrap();
        assert!(TrainConfig::resolve(&file).unwrap().bf16_products);
    }

    #[test]
    fn a_saved_config_reads_back_as_options() {
        let flags = TrainOptions {
            ema: Some(0.99),
            limit_train: Some(7),
            ..Default::default()
        };
        let config = TrainConfig::resolve(&flags).unwrap();
        let options: TrainOptions = toml::from_str(&config.to_toml().unwrap()).unwrap();
        assert_eq!(TrainConfig::resolve(&options).unwrap(), config);
        assert_eq!(config.to_options(), options);
        let changes = options.changes(&TrainOptions {
            epochs: Some(99),
            lr: config.lr.into(),
            ..Default::default()
        });
        assert_eq!(changes, vec!["epochs: 30 -> 99".to_string()]);
        // A run folder from before the option: TF32 takes its default.
        let older = config.to_toml().unwrap().replace("tf32 = true\n", "");
        assert!(!older.contains("tf32"));
        let options: TrainOptions = toml::from_str(&older).unwrap();
        assert!(TrainConfig::resolve(&options).unwrap().tf32);
        // Nor a checkpoint history: none is kept.
        let older = config
            .to_toml()
            .unwrap()
            .replace("checkpoint-hist = 0\n", "");
        assert!(!older.contains("checkpoint-hist"));
        let options: TrainOptions = toml::from_str(&older).unwrap();
        assert_eq!(TrainConfig::resolve(&options).unwrap().checkpoint_hist, 0);
        let file: TrainOptions = toml::from_str("checkpoint-hist = 3\n").unwrap();
        assert_eq!(TrainConfig::resolve(&file).unwrap().checkpoint_hist, 3);
    }

    /// Boolean flags read 1/0, on/off and yes/no too, as vt-serve's environment does.
    /// Each recipe's config as a run folder written before the options `keys` existed holds
    /// it (`keys` left out), beside the config resolved now.
    fn written_before(keys: &[&str]) -> Vec<(TrainConfig, TrainConfig)> {
        [Recipe::Seed, Recipe::Modern]
            .into_iter()
            .map(|recipe| {
                let current = TrainConfig::resolve(&TrainOptions {
                    recipe: Some(recipe),
                    ..Default::default()
                })
                .unwrap();
                let mut older = serde_json::to_value(&current).unwrap();
                for key in keys {
                    older.as_object_mut().unwrap().remove(*key);
                }
                (serde_json::from_value(older).unwrap(), current)
            })
            .collect()
    }

    /// The training options alone on a command line.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: TrainOptions,
    }

    #[test]
    fn boolean_flags_take_the_usual_spellings() {
        let cli = Cli::try_parse_from(["vt-train", "--bf16-products=on", "--tf32", "0"]).unwrap();
        assert_eq!(cli.options.bf16_products, Some(true));
        assert_eq!(cli.options.tf32, Some(false));
        let cli = Cli::try_parse_from(["vt-train", "--trivial-augment", "no"]).unwrap();
        assert_eq!(cli.options.trivial_augment, Some(false));
        assert!(Cli::try_parse_from(["vt-train", "--tf32", "maybe"]).is_err());
    }

    /// timm's names for the options it shares, as flags and in a --config file.
    #[test]
    fn timms_option_names_are_accepted() {
        let timm = "--data-dir d --model vt-resnet34 --img-size 64 -b 8 --smoothing 0.2 \
                    --mixup 0.2 --cutmix 1 --reprob 0.25 --model-ema-decay 0.99 -j 2";
        let cli =
            Cli::try_parse_from(["vt-train"].into_iter().chain(timm.split_whitespace())).unwrap();
        let expected = TrainOptions {
            data: Some("d".into()),
            arch: Some(Arch::VtResNet34),
            image_size: Some(64),
            batch_size: Some(8),
            label_smoothing: Some(0.2),
            mixup_alpha: Some(0.2),
            cutmix_alpha: Some(1.0),
            random_erase: Some(0.25),
            ema: Some(0.99),
            loader_threads: Some(2),
            ..Default::default()
        };
        assert_eq!(cli.options, expected);
        let file: TrainOptions = toml::from_str(
            "data-dir = \"d\"\nmodel = \"vt-resnet34\"\nimg-size = 64\nbatch-size = 8\n\
             smoothing = 0.2\nmixup = 0.2\ncutmix = 1.0\nreprob = 0.25\n\
             model-ema-decay = 0.99\nworkers = 2\n",
        )
        .unwrap();
        assert_eq!(file, expected);
    }

    /// NaN and infinities reach validation whether they come from a flag or a file, instead
    /// of falling back to the recipe's value.
    #[test]
    fn non_finite_options_are_refused() {
        for (text, flag) in [
            ("lr = nan\n", "--lr"),
            ("clip-grad = inf\n", "--clip-grad"),
            ("weight-decay = -inf\n", "--weight-decay"),
            ("ema = nan\n", "--ema"),
            ("momentum = nan\n", "--momentum"),
            ("decay-rate = nan\n", "--decay-rate"),
            ("min-lr = nan\n", "--min-lr"),
        ] {
            let file: TrainOptions = toml::from_str(text).unwrap();
            for options in [
                file.clone(),
                TrainOptions::default().overridden_by(&file),
                TrainConfig::resolve(&TrainOptions::default())
                    .unwrap()
                    .to_options()
                    .overridden_by(&file),
            ] {
                let refused = TrainConfig::resolve(&options).unwrap_err().to_string();
                assert!(refused.contains(flag), "{text}: {refused}");
            }
        }
    }

    /// timm's augmentation options reach the transform; without them each recipe keeps its
    /// own, also for a run folder written before they existed; impossible ones are refused.
    #[test]
    fn the_augmentation_follows_timms_options() {
        let config = |text: &str| {
            let options: TrainOptions = toml::from_str(text).unwrap();
            TrainConfig::resolve(&options)
        };
        let norm = Normalize::IMAGENET;
        let seed = config("recipe = \"seed\"\n").unwrap();
        assert_eq!(seed.augment(norm), AugmentConfig::notebook(150));
        let modern = config("").unwrap().augment(norm);
        assert_eq!(
            (modern.scale, modern.rotation_deg, modern.hflip),
            ((0.35, 1.0), 0.0, 0.5)
        );
        let chosen = config(
            "recipe = \"seed\"\nscale = [0.5, 1]\nratio = [0.5, 2.0]\nrotation = 0\n\
             hflip = 0.25\ncolor-jitter = 0.4\n",
        )
        .unwrap();
        assert_eq!(
            chosen.augment(norm),
            AugmentConfig {
                scale: (0.5, 1.0),
                ratio: (0.5, 2.0),
                rotation_deg: 0.0,
                hflip: 0.25,
                color_jitter: 0.4,
                ..AugmentConfig::notebook(150)
            }
        );
        let cli =
            Cli::try_parse_from(["vt-train", "--scale", "0.5", "1", "--hflip", "0.25"]).unwrap();
        assert_eq!(
            (cli.options.scale, cli.options.hflip),
            (Some(vec![0.5, 1.0]), Some(0.25))
        );
        let saved = chosen.to_toml().unwrap();
        let reread: TrainOptions = toml::from_str(&saved).unwrap();
        assert_eq!(TrainConfig::resolve(&reread).unwrap(), chosen);
        for (older, current) in
            written_before(&["scale", "ratio", "rotation", "hflip", "color-jitter"])
        {
            assert_eq!(older.augment(norm), current.augment(norm));
        }
        for (text, refusal) in [
            ("scale = [0.5]\n", "--scale takes two numbers MIN MAX"),
            ("scale = [0.5, 1, 1]\n", "--scale takes two numbers MIN MAX"),
            ("scale = [0.6, 0.5]\n", "0 < MIN <= MAX <= 1, got 0.6 0.5"),
            ("scale = [0.5, 1.5]\n", "0 < MIN <= MAX <= 1, got 0.5 1.5"),
            ("scale = [0, 1]\n", "--scale"),
            (
                "ratio = [2, 1]\n",
                "--ratio takes two numbers MIN MAX with 0 < MIN <= MAX",
            ),
            ("ratio = [1, inf]\n", "--ratio"),
            ("ratio = [1, 1e39]\n", "--ratio"),
            ("ratio = [1e-50, 1]\n", "--ratio"),
            ("scale = [1e-50, 1]\n", "--scale"),
            ("color-jitter = 1e39\n", "--color-jitter"),
            (
                "rotation = 200\n",
                "--rotation must be 0 to 180 degrees, got 200",
            ),
            ("rotation = -5\n", "--rotation"),
            (
                "hflip = 1.5\n",
                "--hflip must be a probability in [0, 1], got 1.5",
            ),
            ("color-jitter = -0.4\n", "--color-jitter must be >= 0"),
            ("color-jitter = nan\n", "--color-jitter"),
        ] {
            let err = config(text).unwrap_err().to_string();
            assert!(err.contains(refusal), "{text}: {err}");
        }
    }

    #[test]
    fn the_optimiser_and_schedule_are_chosen_by_timms_names() {
        let config = |text: &str| {
            let options: TrainOptions = toml::from_str(text).unwrap();
            TrainConfig::resolve(&options)
        };
        let seed =
            config("recipe = \"seed\"\nopt = \"adamw\"\nsched = \"cosine\"\nmin-lr = 1e-5\n")
                .unwrap();
        assert_eq!(
            (seed.method(), seed.decay()),
            (
                Method::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8
                },
                Decay::Cosine { min_lr: 1e-5 }
            )
        );
        let modern = config(
            "opt = \"momentum\"\nmomentum = 0.8\nsched = \"step\"\ndecay-epochs = 3\n\
             decay-rate = 0.5\n",
        )
        .unwrap();
        assert_eq!(
            (modern.method(), modern.decay()),
            (
                Method::Sgd {
                    momentum: 0.8,
                    nesterov: false
                },
                Decay::Step {
                    every_epochs: 3,
                    gamma: 0.5
                }
            )
        );
        let plain = config("opt = \"sgd\"\nmomentum = 0\n").unwrap();
        assert_eq!(
            plain.method(),
            Method::Sgd {
                momentum: 0.0,
                nesterov: false
            }
        );
        let beta1 = config("momentum = 0.95\n").unwrap();
        assert!(matches!(beta1.method(), Method::AdamW { beta1, .. } if beta1 == 0.95));
        for (text, refusal) in [
            ("momentum = 1\n", "--momentum must be in [0, 1), got 1"),
            ("decay-rate = 0\n", "--decay-rate must be in (0, 1], got 0"),
            (
                "sched = \"step\"\ndecay-rate = 2\n",
                "--decay-rate must be in (0, 1], got 2",
            ),
            (
                "sched = \"step\"\ndecay-epochs = 0\n",
                "--decay-epochs must be at least 1",
            ),
            (
                "decay-epochs = 5\n",
                "the schedule is cosine: add --sched step",
            ),
            (
                "decay-rate = 0.1\n",
                "--decay-rate 0.1 sets the step schedule",
            ),
            (
                "recipe = \"seed\"\nmin-lr = 1e-5\n",
                "the schedule is step: add --sched cosine",
            ),
            ("min-lr = 5e-4\n", "below --lr (5e-4), got 5e-4"),
            ("min-lr = -1\n", "--min-lr must be at least 0"),
        ] {
            let err = config(text).unwrap_err().to_string();
            assert!(err.contains(refusal), "{text}: {err}");
        }
        // A training state written before the options existed: the recipe's.
        for (older, current) in
            written_before(&["opt", "momentum", "sched", "decay-epochs", "decay-rate"])
        {
            assert_eq!(
                (older.method(), older.decay()),
                (current.method(), current.decay())
            );
            older.check_resume(&current).unwrap();
        }
        // A resume (or --config) naming the other schedule drops the file's settings of the
        // one it leaves.
        for (run, flags) in [
            (
                "sched = \"step\"\ndecay-epochs = 2\ndecay-rate = 0.5\n",
                "sched = \"cosine\"\n",
            ),
            ("min-lr = 1e-5\n", "sched = \"step\"\n"),
        ] {
            let run = config(run).unwrap().to_options();
            let flags: TrainOptions = toml::from_str(flags).unwrap();
            let resumed = TrainConfig::resolve(&run.overridden_by(&flags)).unwrap();
            assert_eq!(Some(resumed.schedule()), flags.sched);
            assert_eq!(
                (resumed.min_lr, resumed.decay_epochs.is_some()),
                (None, flags.sched == Some(ScheduleKind::Step))
            );
        }
        // A cosine run's config.toml holds no step settings, a step run's its own.
        let cosine = config("").unwrap().to_toml().unwrap();
        assert!(!cosine.contains("decay-"), "{cosine}");
        let step = config("sched = \"step\"\n").unwrap().to_toml().unwrap();
        assert!(
            step.contains("decay-epochs = 7\ndecay-rate = 0.1"),
            "{step}"
        );
        // The default floor follows a rate changed on resume; one given stays.
        let given = config("min-lr = 1e-7\n").unwrap();
        let toml = given.to_toml().unwrap();
        assert!(toml.contains("min-lr = 0.0000001"), "{toml}");
        let default = config("").unwrap().to_toml().unwrap();
        assert!(!default.contains("min-lr"), "{default}");
    }

    #[test]
    fn the_cosine_floor_stays_below_the_rate() {
        for (lr, floor) in [(5e-4, 1e-6), (1e-4, 1e-6), (1e-6, 1e-8), (1e-7, 1e-9)] {
            let config = TrainConfig::resolve(&TrainOptions {
                lr: Some(lr),
                ..Default::default()
            })
            .unwrap();
            let Decay::Cosine { min_lr } = config.decay() else {
                panic!("the modern recipe decays by a cosine")
            };
            assert!(
                (min_lr - floor).abs() <= 1e-12 * floor,
                "lr {lr}: floor {min_lr}"
            );
            let schedule = crate::schedule::LrSchedule {
                base_lr: lr,
                decay: config.decay(),
                warmup_steps: 0,
                steps_per_epoch: 10,
                total_steps: 100,
            };
            let lrs: Vec<f64> = (0..=100).map(|s| schedule.lr(s)).collect();
            assert!(
                lrs.windows(2).all(|w| w[1] < w[0] || w[1] == min_lr),
                "lr {lr}: {lrs:?}"
            );
            assert!(lrs.iter().all(|&r| r <= lr), "lr {lr}: {lrs:?}");
        }
    }

    #[test]
    fn a_resume_names_the_option_it_cannot_change() {
        let run = TrainConfig::resolve(&TrainOptions {
            image_size: Some(32),
            ..Default::default()
        })
        .unwrap();
        let with = |options: TrainOptions| {
            let merged = run.to_options().overridden_by(&options);
            TrainConfig::resolve(&merged).unwrap()
        };
        let same = with(TrainOptions {
            epochs: Some(99),
            lr: Some(1e-3),
            ..Default::default()
        });
        same.check_resume(&run).unwrap();
        for (options, message) in [
            (
                TrainOptions {
                    image_size: Some(48),
                    ..Default::default()
                },
                "--image-size cannot change on resume: the run has 32, got 48",
            ),
            (
                TrainOptions {
                    recipe: Some(Recipe::Seed),
                    ..Default::default()
                },
                "--recipe cannot change on resume: the run has modern, got seed",
            ),
            (
                TrainOptions {
                    opt: Some(OptimizerKind::Sgd),
                    ..Default::default()
                },
                "--opt cannot change on resume: the run has adamw, got sgd",
            ),
            (
                TrainOptions {
                    momentum: Some(0.5),
                    ..Default::default()
                },
                "--momentum cannot change on resume: the run has 0.9, got 0.5",
            ),
            (
                TrainOptions {
                    arch: Some(Arch::VtResNet34),
                    ..Default::default()
                },
                "--arch cannot change on resume: the run has vt-resnet18, got vt-resnet34",
            ),
            (
                TrainOptions {
                    pretrained: Some("stem.safetensors".into()),
                    ..Default::default()
                },
                "--pretrained only applies to a new run: the run started from random weights, \
                 got stem.safetensors",
            ),
        ] {
            let err = with(options).check_resume(&run).unwrap_err().to_string();
            assert_eq!(err, message);
        }

        same.check_resume_steps(&run, 3, 3).unwrap();
        let smaller = with(TrainOptions {
            batch_size: Some(8),
            ..Default::default()
        });
        let err = smaller
            .check_resume_steps(&run, 3, 6)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--batch-size 8 (the run has 32) cannot be resumed")
                && err.contains("6 steps instead of the run's 3"),
            "{err}"
        );
        let accumulating = with(TrainOptions {
            grad_accum_steps: Some(3),
            ..Default::default()
        });
        let err = accumulating
            .check_resume_steps(&run, 3, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--grad-accum-steps 3 (the run has 1) cannot be resumed"),
            "{err}"
        );
        let err = same.check_resume_steps(&run, 3, 4).unwrap_err().to_string();
        assert!(
            err.contains("training images of data/intel changed"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_are_reported() {
        let err = toml::from_str::<TrainOptions>("learning-rate = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning-rate"), "{err}");
        for (options, needle) in [
            (
                TrainOptions {
                    lr: Some(-1.0),
                    ..Default::default()
                },
                "--lr",
            ),
            (
                TrainOptions {
                    label_smoothing: Some(1.0),
                    ..Default::default()
                },
                "--label-smoothing",
            ),
            (
                TrainOptions {
                    ema: Some(1.5),
                    ..Default::default()
                },
                "--ema",
            ),
            (
                TrainOptions {
                    epochs: Some(0),
                    ..Default::default()
                },
                "--epochs",
            ),
            (
                TrainOptions {
                    grad_accum_steps: Some(0),
                    ..Default::default()
                },
                "--grad-accum-steps",
            ),
            (
                TrainOptions {
                    random_erase: Some(f64::NAN),
                    ..Default::default()
                },
                "--random-erase",
            ),
        ] {
            let err = TrainConfig::resolve(&options).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        // Each count names its own flag.
        for (options, flag) in [
            (
                TrainOptions {
                    image_size: Some(0),
                    ..Default::default()
                },
                "--image-size",
            ),
            (
                TrainOptions {
                    limit_val: Some(0),
                    ..Default::default()
                },
                "--limit-val",
            ),
            (
                TrainOptions {
                    heads: Some(0),
                    ..Default::default()
                },
                "--heads",
            ),
            (
                TrainOptions {
                    threads: Some(0),
                    ..Default::default()
                },
                "--threads",
            ),
            (
                TrainOptions {
                    loader_threads: Some(0),
                    ..Default::default()
                },
                "--loader-threads",
            ),
        ] {
            let err = TrainConfig::resolve(&options).unwrap_err().to_string();
            assert!(
                err.ends_with(&format!("{flag} must be at least 1, got 0")),
                "{err}"
            );
        }
        let off = TrainConfig::resolve(&TrainOptions {
            ema: Some(0.0),
            early_stop: Some(0),
            ..Default::default()
        });
        let off = off.unwrap();
        assert_eq!((off.ema, off.early_stop), (None, None));
    }
}
