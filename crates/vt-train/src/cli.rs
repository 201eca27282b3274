//! The command line: `vt-train [train] [OPTIONS]`, `vt-train eval`, `vt-train init`.

use clap::{Parser, Subcommand};

use crate::eval::EvalArgs;
use crate::init::InitArgs;
use crate::train::TrainArgs;

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

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => crate::train::run(&cli.train),
        Some(Command::Train(args)) => crate::train::run(&args),
        Some(Command::Eval(args)) => crate::eval::run(&args),
        Some(Command::Init(args)) => crate::init::run(&args),
    }
}
