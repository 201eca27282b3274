//! The command line: `vt-train [train] [OPTIONS]`, `vt-train eval`, `vt-train init`,
//! `vt-train compare`, `vt-train average`, `vt-train calibrate`, `vt-train explain`, `vt-train export`,
//! `vt-train import`, `vt-train lr-find`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::average::AverageArgs;
use crate::calibrate::CalibrateArgs;
use crate::compare::CompareArgs;
use crate::error::Result;
use crate::eval::EvalArgs;
use crate::explain::ExplainArgs;
use crate::export::ExportArgs;
use crate::import::ImportArgs;
use crate::init::InitArgs;
use crate::lr_find::LrFindArgs;
use crate::train::{Outcome, TrainArgs};

/// Parses a count of 1 or more, so that clap names the option given 0.
pub fn at_least_one(arg: &str) -> std::result::Result<usize, String> {
    match arg.parse() {
        Ok(0) => Err("must be at least 1".into()),
        parsed => parsed.map_err(|e: std::num::ParseIntError| e.to_string()),
    }
}

/// Parses a thread count: 1 to [`vt_model::threads::MAX_THREADS`].
pub fn thread_count(arg: &str) -> std::result::Result<usize, String> {
    let n = at_least_one(arg)?;
    match n <= vt_model::threads::MAX_THREADS {
        true => Ok(n),
        false => Err(format!(
            "must be at most {}",
            vt_model::threads::MAX_THREADS
        )),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "vt-train",
    version,
    about = "Train and evaluate VT-ResNet image classifiers",
    long_about = "Train and evaluate VT-ResNet image classifiers.\n\n\
        Without a subcommand, `vt-train [OPTIONS]` trains like `vt-train train [OPTIONS]`, \
        by default on data/intel with the modern recipe. A run folder (--run-dir) receives \
        config.toml, metrics.jsonl, metrics.csv, curves.png, confusion.png, best/ and last/ \
        (checkpoints), top/ (with --checkpoint-hist) and state/ (for --resume).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (the default without a subcommand)
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint: accuracy, per-class precision/recall/F1, confusion matrix
    Eval(EvalArgs),
    /// Write a freshly initialised checkpoint
    Init(InitArgs),
    /// Compare two evaluations of the same images (`eval` reports or their predictions
    /// CSVs): the accuracy difference, its 95% interval, and McNemar's exact test of whether
    /// it is more than chance
    Compare(CompareArgs),
    /// Show where the visual tokens look: for each image, every VT module's token attention
    /// maps drawn over the model's view of it, with the top classes (a PNG per image)
    Explain(ExplainArgs),
    /// Average checkpoints of one model configuration, every tensor element-wise (timm's
    /// avg_checkpoints): the folders given, or the best epochs a run kept with
    /// --checkpoint-hist (--run-dir RUN [--top K])
    #[command(long_about = "Average checkpoints of one model configuration (timm's \
        avg_checkpoints.py): every tensor's element-wise mean, BatchNorm running statistics \
        included (their mean is an approximation of the averaged model's statistics, as in \
        timm), summed in f64 and written as an f32 checkpoint to --out. Give the checkpoint \
        folders, or --run-dir RUN for the epochs a run kept in RUN/top/ with \
        --checkpoint-hist (--top K: the K best of them). Checkpoints whose config.json differ \
        are refused, naming the field. One checkpoint is allowed: the output is its copy.")]
    Average(AverageArgs),
    /// Calibrate a checkpoint's probabilities by temperature scaling, fitted on the
    /// validation split, into a new checkpoint (--out)
    #[command(
        long_about = "Calibrate a checkpoint's probabilities by temperature scaling \
        (Guo et al., 2017): the temperature T that makes the validation split's labels most \
        likely under softmax(logits / T) is fitted and written into the config.json of a new \
        checkpoint at --out, beside the same weights. Predictions do not change, only their \
        confidence: vt-serve, eval, explain and export of the new checkpoint compute their \
        probabilities with T (the logits stay the model's). It prints the validation split's \
        negative log-likelihood and expected calibration error before and after; evaluate \
        the new checkpoint on the test split to see the calibration it has there."
    )]
    Calibrate(CalibrateArgs),
    /// Export a checkpoint as an ONNX model (timm's onnx_export) for ONNX Runtime: input
    /// `image` (batch x 3 x S x S, preprocessed as vt's evaluation), outputs `logits` and
    /// `probabilities`
    #[command(
        long_about = "Export a checkpoint as an ONNX model (timm's onnx_export.py), \
        opset 17, to run in ONNX Runtime and the servers built on it. Input `image`: float32 \
        [batch, 3, S, S], S the checkpoint's image size, already preprocessed as vt's \
        evaluation does (resized so that the shorter side is round(S * 256 / 224) with an \
        antialiased bilinear filter, centre-cropped to S, scaled to [0, 1], normalised with \
        the checkpoint's mean and std). Outputs `logits` and `probabilities` (their \
        softmax, of the logits divided by the temperature of a checkpoint that `vt-train \
        calibrate` wrote), float32 [batch, num_classes]. The model's metadata holds arch, \
        class_names, image_size, mean, std, variant, tokens, token_channels, heads, the \
        sha256 of model.safetensors, a calibrated checkpoint's temperature and, as JSON, \
        the record of its training (`training` in the config.json that `vt-train train` \
        writes). The weights are the checkpoint's tensors, under their names."
    )]
    Export(ExportArgs),
    /// Import a VT-ResNet trained in PyTorch (a `torch.save`d state dict or a safetensors
    /// file named as the model contract names it) as a checkpoint
    #[command(
        long_about = "Import a VT-ResNet trained elsewhere, e.g. in PyTorch by \
        tools/reference/vt_resnet.py or a notebook whose model follows the model contract \
        (shared/spec/vt-resnet.md): its weights, a PyTorch file (`torch.save` of the \
        model's state_dict(), alone or under a `state_dict`, `model` or `model_state_dict` \
        key) or a safetensors file, in any float precision, become a checkpoint folder at \
        --out for eval, vt-serve, export and fine-tuning (--initial-checkpoint). The \
        tensors are named as the contract names them, after prefixes such as `module.` \
        (DataParallel) or `_orig_mod.` (torch.compile); `num_batches_tracked` is ignored. \
        Every tensor the model has must be there with its shape, and nothing else: the \
        error lists a few names missing and a few foreign ones, with their counts, or names \
        the tensor of the wrong shape or dtype. Give the model's shape (--arch, --image-size, \
        --tokens, --token-channels, --heads) and its classes in the order of its outputs."
    )]
    Import(ImportArgs),
    /// Find a learning rate: train with the rate growing exponentially from --start-lr to
    /// --end-lr and suggest where the loss falls fastest (fastai's lr_find)
    #[command(
        long_about = "Find a learning rate for `vt-train train --lr`: the range test \
        of fastai's lr_find. The model, optimiser, data and augmentation are those `train` \
        would start with for the same options; the rate grows exponentially from --start-lr \
        to --end-lr over --steps optimiser steps, without warmup or schedule. The loss is \
        smoothed (moving average, 0.98, bias-corrected); the test stops once the smoothed \
        loss exceeds 4 times its lowest, or is not finite. It suggests the rate where the \
        smoothed loss falls fastest against log10(lr), and reports a tenth of the rate of \
        the lowest loss. With --freeze-stem-epochs the stem stays frozen throughout, as in \
        train's first epochs. Writes a JSON report (--out) and a PNG plot beside it; no run \
        folder or checkpoint. Ctrl-C stops after the current step and writes the points so \
        far."
    )]
    LrFind(Box<LrFindArgs>),
}

/// Exit status of a training stopped by Ctrl-C, as a shell reports a command killed by
/// SIGINT: `vt-train train && next` does not go on with an unfinished run.
pub const INTERRUPTED_EXIT: u8 = 130;

pub fn run(cli: Cli) -> Result<ExitCode> {
    let outcome = match cli.command {
        None => crate::train::run(&cli.train)?,
        Some(Command::Train(args)) => crate::train::run(&args)?,
        Some(Command::LrFind(args)) => crate::lr_find::run(&args)?,
        Some(Command::Eval(args)) => return crate::eval::run(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Init(args)) => return crate::init::run(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Compare(args)) => {
            return crate::compare::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Explain(args)) => {
            return crate::explain::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Average(args)) => {
            return crate::average::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Calibrate(args)) => {
            return crate::calibrate::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Export(args)) => {
            return crate::export::run(&args).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Import(args)) => {
            return crate::import::run(&args).map(|()| ExitCode::SUCCESS)
        }
    };
    Ok(match outcome {
        Outcome::Finished => ExitCode::SUCCESS,
        Outcome::Interrupted => ExitCode::from(INTERRUPTED_EXIT),
    })
}
