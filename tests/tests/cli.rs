//! Command-line behaviour of the real binaries: help, bad arguments and missing files give a
//! non-zero exit and a message that says what to do; `init` and `predict` work together.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn bin(name: &str) -> Command {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| xtask::cargo::build_binaries().unwrap());
    Command::new(xtask::cargo::binary(name).unwrap())
}

fn run(command: &mut Command) -> (Output, String) {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

fn fails_saying(command: &mut Command, needles: &[&str]) {
    let (output, text) = run(command);
    assert!(!output.status.success(), "{command:?} should fail:\n{text}");
    for needle in needles {
        assert!(
            text.contains(needle),
            "{command:?}: expected `{needle}` in:\n{text}"
        );
    }
}

fn init_checkpoint(dir: &Path) -> PathBuf {
    let out = dir.join("ckpt");
    let (output, text) = run(bin("vt-train")
        .args(["init", "--arch", "vt-resnet18", "--image-size", "32"])
        .args([
            "--tokens",
            "4",
            "--token-channels",
            "32",
            "--heads",
            "2",
            "--class-names",
            "buildings,forest,glacier",
            "--out",
        ])
        .arg(&out));
    assert!(output.status.success(), "init failed:\n{text}");
    out
}

#[test]
fn help_lists_the_commands_and_options() {
    let (output, text) = run(bin("vt-train").arg("--help"));
    assert!(output.status.success());
    // Each command summarised in its own words (not those of options it shares).
    let summaries = [
        "calibrate  Calibrate a checkpoint's probabilities",
        "eval       Evaluate a checkpoint",
    ];
    for needle in ["train", "eval", "init", "--data", "--recipe", "--resume"]
        .into_iter()
        .chain(summaries)
    {
        assert!(
            text.contains(needle),
            "vt-train --help lacks {needle}:\n{text}"
        );
    }
    let (output, text) = run(bin("vt-serve").arg("--help"));
    assert!(output.status.success());
    for needle in ["predict", "--checkpoint", "--max-batch", "--port"] {
        assert!(
            text.contains(needle),
            "vt-serve --help lacks {needle}:\n{text}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_a_usage_message() {
    fails_saying(
        bin("vt-train").args(["train", "--epochs", "many"]),
        &["--epochs", "invalid"],
    );
    fails_saying(
        bin("vt-train").args([
            "init",
            "--arch",
            "vt-resnet50",
            "--num-classes",
            "6",
            "--out",
            "x",
        ]),
        &["vt-resnet50"],
    );
    fails_saying(
        bin("vt-serve").args(["--checkpoint", "x", "--port", "99999"]),
        &["--port"],
    );
    fails_saying(bin("vt-serve").arg("predict"), &["--checkpoint"]);
    // Zero counts are refused, not run as one.
    fails_saying(
        bin("vt-train").args(["eval", "--checkpoint", "x", "--threads", "0"]),
        &["--threads", "must be at least 1"],
    );
    fails_saying(
        bin("vt-serve").args(["predict", "--checkpoint", "x", "--batch-size", "0", "a.jpg"]),
        &["--batch-size"],
    );
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-checkpoint");
    fails_saying(
        bin("vt-serve")
            .arg("predict")
            .arg("--checkpoint")
            .arg(&missing)
            .arg("a.jpg"),
        &["no checkpoint folder at", "no-such-checkpoint"],
    );
    fails_saying(
        bin("vt-train")
            .arg("eval")
            .arg("--checkpoint")
            .arg(&missing)
            .arg("--data")
            .arg(tmp.path()),
        &["no-such-checkpoint"],
    );
    fails_saying(
        bin("vt-train")
            .args(["train", "--epochs", "1", "--data"])
            .arg(tmp.path().join("no-data"))
            .arg("--run-dir")
            .arg(tmp.path().join("run")),
        &["no-data", "fetch-data"],
    );
    fails_saying(
        bin("vt-serve")
            .arg("--checkpoint")
            .arg(&missing)
            .args(["--port", "0"]),
        &["no-such-checkpoint"],
    );
}

#[test]
fn init_then_predict_prints_one_json_line_per_image() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = init_checkpoint(tmp.path());
    let photo = tmp.path().join("photo.png");
    image_file(&photo);
    let not_an_image = tmp.path().join("notes.jpg");
    std::fs::write(&not_an_image, b"plain text").unwrap();

    let (output, text) = run(bin("vt-serve")
        .arg("predict")
        .arg("--checkpoint")
        .arg(&checkpoint)
        .arg(&photo)
        .arg(&photo));
    assert!(output.status.success(), "{text}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let line = &lines[0];
    assert_eq!(line["image"], photo.to_string_lossy().as_ref());
    let probs: Vec<f64> = line["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    assert_eq!(probs.len(), 3);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    assert_eq!(line["logits"].as_array().unwrap().len(), 3);
    let top = line["top"].as_array().unwrap();
    assert!(["buildings", "forest", "glacier"].contains(&top[0]["label"].as_str().unwrap()));
    assert_eq!(lines[0], lines[1], "the same image scores the same");

    fails_saying(
        bin("vt-serve")
            .arg("predict")
            .arg("--checkpoint")
            .arg(&checkpoint)
            .arg(&not_an_image),
        &["notes.jpg"],
    );
}

/// A small colour gradient as a PNG.
fn image_file(path: &Path) {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 128])
    });
    img.save(path).unwrap();
}
