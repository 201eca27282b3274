//! Building and locating the workspace's binaries from xtask.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{ensure, Context};
use serde::Deserialize;

/// The workspace root (xtask lives one folder below it).
pub fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}

/// A folder of the shared photo sample beside the repository, wherever xtask runs from.
pub fn shared_sample(folder: &str) -> PathBuf {
    workspace_root()
        .join("../shared/data/intel-sample")
        .join(folder)
}

/// Where cargo builds the workspace (`target/`, or wherever `CARGO_TARGET_DIR` or a
/// `build.target-dir` setting puts it), as `cargo metadata` reports it (asked once).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    #[derive(Deserialize)]
    struct Metadata {
        target_directory: PathBuf,
    }
    static TARGET_DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = TARGET_DIR.get() {
        return Ok(dir.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()
        .context("running cargo metadata")?;
    ensure!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let metadata: Metadata =
        serde_json::from_slice(&output.stdout).context("reading cargo metadata's answer")?;
    Ok(TARGET_DIR.get_or_init(|| metadata.target_directory).clone())
}

/// Builds the workspace's binaries in the dev profile, the one profile this project uses.
/// Building the whole workspace resolves the dependencies' features as `cargo xtask` does
/// (xtask depends on every library crate for that), so they are built once for both.
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
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    Ok(target_dir()?.join("debug").join(name))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// Each package's feature sets (one per build kind: host and target) in the builds of
    /// `selection`, as `cargo tree` resolves them.
    fn features(selection: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .args([
                "tree",
                "--offline",
                "--locked",
                "--edges",
                "normal,build",
                "--prefix",
                "none",
            ])
            .args(["--format", "{p} {f}"])
            .args(selection)
            .current_dir(workspace_root())
            .output()
            .expect("running cargo tree");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "cargo tree {selection:?}: {stderr}"
        );
        let mut packages = BTreeMap::<String, BTreeSet<String>>::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // "name vX.Y.Z [(path)] [(proc-macro)] [feature,feature] [(*)]"
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let [name, version, rest @ ..] = tokens.as_slice() else {
                continue;
            };
            let features = rest
                .iter()
                .rfind(|token| !token.starts_with('('))
                .copied()
                .unwrap_or_default();
            packages
                .entry(format!("{name} {version}"))
                .or_default()
                .insert(features.to_owned());
        }
        packages
    }

    #[test]
    fn cargo_xtask_builds_the_dependencies_as_the_workspace_does() {
        let xtask = features(&["--package", "xtask"]);
        let workspace = features(&["--workspace"]);
        assert!(
            xtask
                .keys()
                .any(|package| package.starts_with("candle-core ")),
            "cargo tree's listing was not read: {xtask:?}"
        );
        let differing: Vec<String> = xtask
            .iter()
            .filter_map(|(package, sets)| {
                let other = workspace.get(package)?;
                (other != sets).then(|| format!("{package}: xtask {sets:?}, workspace {other:?}"))
            })
            .collect();
        assert!(
            differing.is_empty(),
            "`cargo xtask` would build these again for `cargo build --workspace`:\n{}",
            differing.join("\n")
        );
    }
}
