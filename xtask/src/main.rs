//! Project tasks: `cargo xtask <command>`. Each command lives in its own module.

use clap::{Parser, Subcommand};
use std::io::IsTerminal;

use xtask::{bench_data, bench_model, bench_serve, e2e, fetch_data};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks for vt")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download or import the Intel Image Classification data set (or import your own images
    /// in its layout) into train/val/test/pred.
    FetchData(fetch_data::Args),
    /// The whole journey: data, training, evaluation, a served prediction, checked.
    E2e(e2e::Args),
    /// Throughput measurements.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// Loader throughput (decode + augment + batch) on a folder of images.
    Data(bench_data::Args),
    /// Model forward and training-step throughput, side by side with PyTorch.
    Model(bench_model::Args),
    /// HTTP serving throughput and latency: vt-serve against a plain PyTorch server.
    Serve(bench_serve::Args),
}

fn main() -> anyhow::Result<()> {
    vt_model::allocator::retain_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::FetchData(args) => fetch_data::run(args),
        Command::E2e(args) => e2e::run(args),
        Command::Bench(Bench::Data(args)) => bench_data::run(args),
        Command::Bench(Bench::Model(args)) => bench_model::run(args),
        Command::Bench(Bench::Serve(args)) => bench_serve::run(args),
    }
}
