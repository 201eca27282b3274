//! Helpers of the vt-train integration tests: small data sets and the real binary.
#![allow(dead_code)]

pub mod events;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use vt_data::fetch::{fetch, FetchOptions, FetchSource};
use vt_data::source::synthetic::SyntheticConfig;
use vt_train::metrics::EpochRecord;

/// A synthetic data set (stripes and hues, 6 classes) at 32 px: train/ val/ test/ with a
/// manifest, as `cargo xtask fetch-data --source synthetic` writes it.
pub fn synthetic_data(root: &Path, train_per_class: usize) -> PathBuf {
    let dir = root.join("data");
    import_synthetic(&dir, train_per_class, 42);
    dir
}

/// [`synthetic_data`]'s images imported into `dir` with the train/val split of `split_seed`.
pub fn import_synthetic(dir: &Path, train_per_class: usize, split_seed: u64) {
    let source = FetchSource::Synthetic(SyntheticConfig {
        train_per_class,
        test_per_class: 4,
        pred: 0,
        image_size: 32,
        seed: 7,
    });
    let mut options = FetchOptions::new(dir, source);
    options.val_fraction = 0.25;
    options.seed = split_seed;
    fetch(&options).unwrap();
}

/// `vt-train init` of the tiny model with the Intel data set's classes, at `root/init`.
pub fn intel_init_checkpoint(root: &Path) -> PathBuf {
    let checkpoint = root.join("init");
    run_ok(
        vt_train()
            .args(["init", "--out"])
            .arg(&checkpoint)
            .args([
                "--class-names",
                "buildings,forest,glacier,mountain,sea,street",
            ])
            .args(TINY_MODEL),
    );
    checkpoint
}

/// Flags of a tiny, fast model.
pub const TINY_MODEL: [&str; 8] = [
    "--image-size",
    "32",
    "--tokens",
    "4",
    "--token-channels",
    "32",
    "--heads",
    "2",
];

/// One compute thread and one loader thread.
pub const ONE_THREAD: [&str; 4] = ["--threads", "1", "--loader-threads", "1"];

pub fn vt_train() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vt-train"));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// `vt-train train` of the tiny model on `data`, into `run`.
pub fn train_tiny(data: &Path, run: &Path) -> Command {
    let mut cmd = vt_train();
    cmd.args(["train", "--data"])
        .arg(data)
        .arg("--run-dir")
        .arg(run)
        .args(TINY_MODEL);
    cmd
}

/// Runs the binary and fails the test with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the binary, fails the test if it succeeds, and returns what it wrote to stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded: {err}");
    err
}

pub fn records(run_dir: &Path) -> Vec<EpochRecord> {
    let text = fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The TensorBoard points of a run, as TensorBoard shows them: the event files read in the
/// order of their names, a session start dropping the points read so far at its step and
/// after. (tag, step, value), sorted; and how many event files there are.
pub fn tensorboard_points(run_dir: &Path) -> (Vec<(String, i64, f32)>, usize) {
    let mut files: Vec<PathBuf> = fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    files.sort();
    let mut points = Vec::new();
    for file in &files {
        let events = events::read_scalars(file).unwrap();
        for start in events.session_starts {
            points.retain(|&(_, step, _): &(String, i64, f32)| step < start);
        }
        points.extend(events.scalars.into_iter().map(|p| (p.tag, p.step, p.value)));
    }
    points.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (points, files.len())
}

/// The points of one tag: (step, value).
pub fn tag_points(points: &[(String, i64, f32)], tag: &str) -> Vec<(i64, f32)> {
    points
        .iter()
        .filter(|p| p.0 == tag)
        .map(|p| (p.1, p.2))
        .collect()
}

pub fn is_png(path: &Path) -> bool {
    fs::read(path)
        .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}

/// `../shared/data/intel-sample` beside the repository, when present.
pub fn intel_sample() -> Option<PathBuf> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/intel-sample/seg_train");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: the real photos ({}) are absent", dir.display());
        None
    }
}

/// A data folder of real photos: `per_split` images per class copied into each of train/,
/// val/ and test/ (train gets `train_per_class`), no manifest (classes from folder names).
pub fn real_data(sample: &Path, root: &Path, train_per_class: usize, per_split: usize) -> PathBuf {
    let dir = root.join("real");
    let mut classes: Vec<PathBuf> = fs::read_dir(sample)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    for class in classes.iter().filter(|p| p.is_dir()) {
        let mut files: Vec<PathBuf> = fs::read_dir(class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let name = class.file_name().unwrap();
        let mut files = files.into_iter();
        for (split, count) in [
            ("train", train_per_class),
            ("val", per_split),
            ("test", per_split),
        ] {
            let target = dir.join(split).join(name);
            fs::create_dir_all(&target).unwrap();
            for file in files.by_ref().take(count) {
                fs::copy(&file, target.join(file.file_name().unwrap())).unwrap();
            }
        }
    }
    dir
}

/// The tensors of the checkpoint folder `dir`, by name.
pub fn checkpoint_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A run's checkpoint history: the epochs its training state lists (best first), and the
/// folders in its top/ (sorted by name).
pub fn checkpoint_history(run_dir: &Path) -> (Vec<usize>, Vec<String>) {
    let text = fs::read_to_string(run_dir.join("state/training.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let listed = state["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["epoch"].as_u64().unwrap() as usize)
        .collect();
    let mut folders: Vec<String> = match fs::read_dir(run_dir.join("top")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    folders.sort();
    (listed, folders)
}

/// `epoch-NNN` for each of `epochs`, sorted: the top/ folders that keep them.
pub fn epoch_folders(epochs: &[usize]) -> Vec<String> {
    let mut names: Vec<String> = epochs.iter().map(|e| format!("epoch-{e:03}")).collect();
    names.sort();
    names
}

/// The interpreter that `variable` names (default `python3`) when it can import `modules`
/// (as `import torch, safetensors`); otherwise says why the test is skipped, or fails when
/// `variable` named it.
pub fn python_with(variable: &str, modules: &str) -> Option<String> {
    let named = std::env::var(variable).ok();
    let python = named.clone().unwrap_or_else(|| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output();
    let reason = match probe {
        Ok(out) if out.status.success() => return Some(python),
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("the import failed")
            .to_string(),
        Err(e) => format!("cannot run it: {e}"),
    };
    assert!(
        named.is_none(),
        "{variable}={python} cannot import {modules} ({reason})"
    );
    eprintln!(
        "skipping: `{python}` cannot import {modules} ({reason}); pip install them, or set \
         {variable} to a Python that has them"
    );
    None
}
