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

/// Path of a script in tools/reference.
pub fn script(name: &str) -> PathBuf {
    workspace_root().join("tools/reference").join(name)
}
