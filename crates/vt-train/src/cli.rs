//! The command line: `vt-train [train] [OPTIONS]`, `vt-train eval`, `vt-train init`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::Result;
use crate::eval::EvalArgs;
use crate::init::InitArgs;
use crate::train::{Outcome, TrainArgs};

#[derive(Debug, Parser)]
#[command(
    name = "vt-train",
    version,
    about = "Train and evaluate VT-ResNet image classifiers",
    long_about = "Train and evaluate VT-ResNet image classifiers.\n\n\
        Without a subcommand, `vt-train [OPTIONS]` trains like `vt-train train [OPTIONS]`, \
        by default on data/intel with the modern recipe. A run folder (--run-dir) receives \
        config.toml, metrics.jsonl, metrics.csv, curves.png, confusion.png, best/ and last/ \
        (checkpoints) and state/ (for --resume).",
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
}

/// Exit status of a training stopped by Ctrl-C, as a shell reports a command killed by
/// SIGINT: `vt-train train && next` does not go on with an unfinished run.
pub const INTERRUPTED_EXIT: u8 = 130;

pub fn run(cli: Cli) -> Result<ExitCode> {
    let outcome = match cli.command {
        None => crate::train::run(&cli.train)?,
        Some(Command::Train(args)) => crate::train::run(&args)?,
        Some(Command::Eval(args)) => return crate::eval::run(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Init(args)) => return crate::init::run(&args).map(|()| ExitCode::SUCCESS),
    };
    Ok(match outcome {
        Outcome::Finished => ExitCode::SUCCESS,
        Outcome::Interrupted => ExitCode::from(INTERRUPTED_EXIT),
    })
}
