//! Building and locating the workspace's binaries from xtask.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context};

/// The workspace root (xtask lives one folder below it).
pub fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the workspace's binaries in the dev profile, the one profile this project uses.
/// Building the whole workspace keeps cargo's feature resolution, and so the artifacts,
/// the same as the test build's: after `cargo test` this is a no-op.
pub fn build_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--workspace", "--bins"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build --workspace --bins failed");
    Ok(())
}

/// Path of a binary built by [`build_binaries`].
pub fn binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}
