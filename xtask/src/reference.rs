//! The PyTorch reference tools of `tools/reference`, used by the benchmarks as baselines.

use std::path::PathBuf;

use crate::cargo::workspace_root;

/// The venv that tools/reference/README.md sets up, else `python3`.
pub fn default_python() -> PathBuf {
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/vt/torch-venv/bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Path of a script in tools/reference: in the checkout xtask was built from, else (a
/// prebuilt xtask run from the root of another copy of the repository, as bench/gpu.sh does
/// on a GPU machine) under the current folder.
pub fn script(name: &str) -> PathBuf {
    let built_from = workspace_root().join("tools/reference").join(name);
    if built_from.exists() {
        built_from
    } else {
        PathBuf::from("tools/reference").join(name)
    }
}
