//! `vt-train`: train, evaluate and initialise VT-ResNet checkpoints.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    vt_model::allocator::retain_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(vt_train::cli::run(vt_train::cli::Cli::parse())?)
}
