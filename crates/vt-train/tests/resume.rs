//! A killed or interrupted run resumes where its last completed epoch left off.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use candle_core::Device;
use common::*;
use vt_model::Model;

fn epochs_done(run: &Path) -> usize {
    std::fs::read_to_string(run.join("state/training.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["epochs_done"].as_u64())
        .unwrap_or(0) as usize
}

fn wait_for_epoch(child: &mut Child, run: &Path, epoch: usize) {
    while epochs_done(run) < epoch {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("vt-train exited ({status}) before finishing epoch {epoch}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tiny model trained for `epochs` on synthetic images, in `root`/run.
fn tiny_run(root: &Path, epochs: &str) -> std::path::PathBuf {
    let data = synthetic_data(root, 4);
    let run = root.join("run");
    run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", epochs]),
    );
    run
}

fn train(data: &Path, run: &Path, epochs: &str) -> Command {
    let mut cmd = train_tiny(data, run);
    cmd.args(ONE_THREAD).args([
        "--batch-size",
        "12",
        "--epochs",
        epochs,
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "1",
        "--ema",
        "0.9",
        // Mixing draws from the seed and the step: a resumed run draws as the whole one.
        "--mixup-alpha",
        "0.2",
        "--cutmix-alpha",
        "1.0",
        // Three batches an epoch, an update after the first two and one after the third.
        "--grad-accum-steps",
        "2",
        "--seed",
        "5",
        "--checkpoint-hist",
        "2",
    ]);
    cmd
}

#[test]
fn a_run_killed_after_an_epoch_resumes_each_epoch_exactly_once_and_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 8);
    let killed = tmp.path().join("killed");
    let mut child = train(&data, &killed, "3")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_epoch(&mut child, &killed, 1);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first_line = |run: &Path| {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines().next().unwrap().to_string()
    };
    let logged = first_line(&killed);
    assert!(
        epochs_done(&killed) < 3,
        "the run finished before it was killed"
    );
    // `best/` and `last/` follow the state: the kill may come between them.
    Model::load_run_state(&killed.join("state"), &Device::Cpu).unwrap();
    // What a process killed later in its epoch would have logged past the saved state (the
    // kill above may come before any of it): points that TensorBoard must no longer show.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("state/training.json")).unwrap())
            .unwrap();
    let saved_step = saved["global_step"].as_u64().unwrap();
    let mut stale = vt_train::tensorboard::EventWriter::create(&killed, saved_step + 1).unwrap();
    for step in saved_step + 1..=saved_step + 3 {
        stale.scalars(step, &[("train/loss_step", 99.0), ("val/loss", 99.0)]);
    }

    // A kept epoch's folder that the state does not list, as a process killed between
    // writing it and the state leaves it.
    let stray = killed.join("top/epoch-099");
    std::fs::create_dir_all(&stray).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(killed.join("state").join(file), stray.join(file)).unwrap();
    }

    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&killed),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("resuming"), "{log}");
    assert!(
        log.contains(&format!("removing {}", stray.display())),
        "{log}"
    );
    assert!(!stray.exists());
    for dir in ["best", "last"] {
        Model::load(&killed.join(dir), &Device::Cpu).unwrap();
    }
    let resumed = records(&killed);
    assert_eq!(
        resumed.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(epochs_done(&killed), 3);
    // Read and rewritten on resume, an epoch's line keeps every bit of its numbers.
    assert_eq!(first_line(&killed), logged);
    // TensorBoard shows each step once, whatever was logged past the saved state: 2 updates
    // an epoch (below), a file per process and the stale one.
    let (points, files) = tensorboard_points(&killed);
    assert_eq!(files, 3);
    assert!(points.iter().all(|p| p.2 != 99.0), "{points:?}");
    let steps = |tag: &str| -> Vec<i64> { tag_points(&points, tag).iter().map(|p| p.0).collect() };
    assert_eq!(steps("train/loss_step"), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        tag_points(&points, "val/loss"),
        resumed
            .iter()
            .map(|r| (r.global_step as i64, r.val_loss as f32))
            .collect::<Vec<_>>()
    );

    // The same run without interruption: identical numbers, so the optimiser moments, the
    // EMA, BatchNorm statistics and the schedule position were all restored.
    let straight = tmp.path().join("straight");
    run_ok(&mut train(&data, &straight, "3"));
    let reference = records(&straight);
    // 36 training images in batches of 12, updates over two batches: 2 updates an epoch.
    assert_eq!(
        reference.iter().map(|r| r.global_step).collect::<Vec<_>>(),
        vec![2, 4, 6]
    );
    for (a, b) in resumed.iter().zip(&reference) {
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * y.abs().max(1.0);
        assert!(
            close(a.train_loss, b.train_loss),
            "epoch {}: {} vs {}",
            a.epoch,
            a.train_loss,
            b.train_loss
        );
        assert!(
            close(a.val_loss, b.val_loss),
            "epoch {}: {} vs {}",
            a.epoch,
            a.val_loss,
            b.val_loss
        );
        assert_eq!((a.lr, a.global_step), (b.lr, b.global_step));
        assert_eq!(a.best, b.best, "epoch {}: best", a.epoch);
    }
    let best = |run: &Path| {
        let text = std::fs::read_to_string(run.join("state/training.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (v["best_epoch"].clone(), v["epochs_since_best"].clone())
    };
    assert_eq!(best(&killed), best(&straight));
    // The checkpoint history went on as in the uninterrupted run.
    let (listed, folders) = checkpoint_history(&killed);
    assert_eq!(listed.len(), 2);
    assert_eq!(folders, epoch_folders(&listed));
    assert_eq!((listed, folders), checkpoint_history(&straight));
}

/// A kill after an epoch's state, before its `best/` and `last/`, leaves them an epoch
/// behind, or one of them between its two renames: the resume writes both from the state's
/// served weights (the average's, whatever `--ema` says now), and only then.
#[test]
fn checkpoints_behind_the_state_are_written_from_it_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let ema = ["--ema", "0.9"];
    run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(ema)
            .args(["--epochs", "1"]),
    );
    // The first epoch is the best so far: `best/` holds the state's weights.
    let stale = tmp.path().join("stale");
    run_ok(
        train_tiny(&data, &stale)
            .args(ONE_THREAD)
            .args(["--epochs", "1", "--seed", "9"]),
    );
    std::fs::remove_dir_all(run.join("best")).unwrap();
    std::fs::rename(stale.join("best"), run.join("best")).unwrap();
    std::fs::rename(run.join("last"), run.join(".last.old")).unwrap();

    let resume = |extra: &[&str]| {
        let out = run_ok(
            vt_train()
                .args(["train", "--resume", "--run-dir"])
                .arg(&run)
                .args(extra),
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = resume(&["--ema", "0"]);
    assert!(
        log.contains("best is not the saved state's epoch 1"),
        "{log}"
    );
    let averaged =
        candle_core::safetensors::load(run.join("state/ema.safetensors"), &Device::Cpu).unwrap();
    let raw = checkpoint_tensors(&run.join("state"));
    for dir in ["best", "last"] {
        let written = checkpoint_tensors(&run.join(dir));
        for (name, tensor) in &averaged {
            assert_eq!(max_abs_diff(&written[name], tensor), 0.0, "{dir}: {name}");
        }
        assert!(
            raw.iter()
                .any(|(name, tensor)| max_abs_diff(&written[name], tensor) > 0.0),
            "{dir} holds the raw weights"
        );
    }
    assert!(!run.join(".last.old").exists());
    // Written with the record of the epoch the state saved.
    let epoch = &records(&run)[0];
    for dir in ["best", "last"] {
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(dir).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["training"]["epoch"], 1, "{dir}");
        assert_eq!(config["training"]["val_accuracy"], epoch.val_acc, "{dir}");
        assert_eq!(config["training"]["options"]["ema"], 0.9, "{dir}");
    }
    let modified = |dir: &str| {
        std::fs::metadata(run.join(dir).join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = (modified("best"), modified("last"));
    let log = resume(&[]);
    assert!(!log.contains("writing it from the state"), "{log}");
    assert_eq!((modified("best"), modified("last")), before);
}

/// A `best/` removed from a finished run whose best epoch came before the state's cannot be
/// written again: the resume says so, and why, rather than promising it.
#[test]
fn a_best_checkpoint_of_an_earlier_epoch_than_the_state_is_not_promised() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", "2"]),
    );
    // As when the first of its two epochs validated best.
    let state = run.join("state/training.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    saved["best_epoch"] = serde_json::json!(1);
    saved["epochs_since_best"] = serde_json::json!(1);
    std::fs::write(&state, saved.to_string()).unwrap();
    std::fs::remove_dir_all(run.join("best")).unwrap();
    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!(
            "{} is missing, and its epoch 1 is not the saved state's (2), which cannot write \
             it; last/ holds epoch 2",
            run.join("best").display()
        )) && log.contains("has completed its 2 epochs"),
        "{log}"
    );
    assert!(!run.join("best").exists());
}

/// A new run never takes a folder a run wrote in, and a resume without the saved state
/// does not start over a run that had one.
#[test]
fn a_run_whose_state_is_gone_is_neither_replaced_nor_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--epochs",
        "2",
        "--checkpoint-hist",
        "2",
    ]));
    std::fs::remove_dir_all(run.join("state")).unwrap();
    let top = || -> Vec<_> {
        let mut names: Vec<_> = std::fs::read_dir(run.join("top"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = top();
    assert_eq!(before.len(), 2);
    let best = std::fs::read(run.join("best/model.safetensors")).unwrap();

    let err = run_err(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", "1"]),
    );
    assert!(err.contains("already holds a training run"), "{err}");
    let err = run_err(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&run),
    );
    assert!(err.contains("logged 2 epochs"), "{err}");
    assert_eq!(top(), before);
    assert_eq!(records(&run).len(), 2);
    assert_eq!(
        std::fs::read(run.join("best/model.safetensors")).unwrap(),
        best
    );
    // One epoch logged and its checkpoints written: a state was saved before them.
    let one = tmp.path().join("one");
    run_ok(
        train_tiny(&data, &one)
            .args(ONE_THREAD)
            .args(["--epochs", "1"]),
    );
    std::fs::remove_dir_all(one.join("state")).unwrap();
    let best = std::fs::read(one.join("best/model.safetensors")).unwrap();
    let err = run_err(
        vt_train()
            .args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&one),
    );
    assert!(
        err.contains("logged 1 epoch in metrics.jsonl and wrote best/ but holds no"),
        "{err}"
    );
    assert_eq!(records(&one).len(), 1);
    // Its metrics lost too: best/ still says a state was saved.
    std::fs::remove_file(one.join("metrics.jsonl")).unwrap();
    let err = run_err(
        vt_train()
            .args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&one),
    );
    assert!(err.contains("wrote best/ but holds no"), "{err}");
    assert_eq!(
        std::fs::read(one.join("best/model.safetensors")).unwrap(),
        best
    );

    // A run's output alone (a user's file, an `average --out RUN/best`) is named.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("metrics.csv"), "a,b\n").unwrap();
    let err = run_err(train_tiny(&data, &odd).args(ONE_THREAD));
    assert!(
        err.contains("holds metrics.csv, which a training run writes"),
        "{err}"
    );

    // A run stopped in its first epoch is a run too.
    let stopped = tmp.path().join("stopped");
    std::fs::create_dir_all(&stopped).unwrap();
    std::fs::copy(run.join("config.toml"), stopped.join("config.toml")).unwrap();
    let err = run_err(train_tiny(&data, &stopped).args(ONE_THREAD));
    assert!(err.contains("already holds a training run"), "{err}");

    // A model that cannot be built leaves no run folder behind.
    let fresh = tmp.path().join("fresh");
    let err = run_err(train_tiny(&data, &fresh).args(["--initial-checkpoint", "/nonexistent"]));
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(!fresh.exists());
}

/// A kill after the last epoch's metrics line, before its state, leaves that line behind the
/// state: a resume with nothing left to train drops it all the same, from both files, the
/// curves and TensorBoard, and removes the epoch's confusion matrix.
#[test]
fn a_resume_with_nothing_left_to_train_drops_the_lines_past_the_saved_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path(), "2");
    let jsonl = run.join("metrics.jsonl");
    let saved = std::fs::read_to_string(&jsonl).unwrap();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut killed: serde_json::Value =
        serde_json::from_str(saved.lines().last().unwrap()).unwrap();
    killed["epoch"] = 3.into();
    std::fs::write(&jsonl, format!("{saved}{killed}\n")).unwrap();
    // The killed epoch's plots and TensorBoard points, as far as this test is concerned.
    let curves = run.join("curves.png");
    std::fs::write(&curves, b"epoch 3").unwrap();
    let confusion = run.join("confusion.png");
    std::fs::write(&confusion, b"epoch 3").unwrap();
    let (points, _) = tensorboard_points(&run);
    let saved_step = killed["global_step"].as_u64().unwrap();
    let mut stale = vt_train::tensorboard::EventWriter::create(&run, saved_step + 1).unwrap();
    stale.scalars(saved_step + 1, &[("val/loss", 99.0)]);
    drop(stale);

    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("has completed its 2 epochs"), "{log}");
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap(), saved);
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.csv")).unwrap(),
        csv
    );
    assert!(log.contains("dropping 1 metric lines"), "{log}");
    assert!(std::fs::read(&curves).unwrap().starts_with(b"\x89PNG"));
    assert!(!confusion.exists());
    assert_eq!(tensorboard_points(&run).0, points);
}

/// The saved state's epochs each logged a line before the state: a metrics.jsonl with fewer
/// (cut, emptied, deleted) is refused, and both metrics files are left as they are, instead
/// of the earlier epochs vanishing from them.
#[test]
fn a_resume_refuses_a_metrics_file_that_lost_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path(), "2");
    let jsonl = run.join("metrics.jsonl");
    let saved = std::fs::read_to_string(&jsonl).unwrap();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let first = saved.lines().next().unwrap();
    for (damage, lines) in [
        (format!("{first}\n"), 1),
        (String::new(), 0),
        (format!("{first}\n{first}\n"), 2),
    ] {
        std::fs::write(&jsonl, &damage).unwrap();
        let err = run_err(
            vt_train()
                .args(["train", "--resume", "--epochs", "3", "--run-dir"])
                .arg(&run),
        );
        let expected = format!(
            "{} holds {lines} lines for the 2 epochs the run's saved state has trained",
            jsonl.display()
        );
        assert!(err.contains(&expected), "{err}");
        assert_eq!(std::fs::read_to_string(&jsonl).unwrap(), damage);
        assert_eq!(
            std::fs::read_to_string(run.join("metrics.csv")).unwrap(),
            csv
        );
    }
    std::fs::remove_file(&jsonl).unwrap();
    let err = run_err(
        vt_train()
            .args(["train", "--resume", "--epochs", "3", "--run-dir"])
            .arg(&run),
    );
    assert!(err.contains("holds 0 lines for the 2 epochs"), "{err}");
    assert!(!jsonl.exists());
}

/// A NaN in the saved optimiser moments or weight average, which training never saves, is
/// refused at once, naming the file and the tensor (the divergence the moments' caused an
/// epoch later advised a lower --lr, which the same file made diverge again); for the
/// moments, with a way on that works.
#[test]
fn a_state_holding_nan_is_refused_naming_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(&mut train(&data, &run, "1"));
    for (file, way_on) in [("optimizer.safetensors", true), ("ema.safetensors", false)] {
        let path = run.join("state").join(file);
        let kept = std::fs::read(&path).unwrap();
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let name = tensors.keys().min().unwrap().clone();
        let shape = tensors[&name].shape().clone();
        let nan = candle_core::Tensor::full(f32::NAN, shape, &Device::Cpu).unwrap();
        tensors.insert(name.clone(), nan);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = run_err(
            vt_train()
                .args(["train", "--resume", "--epochs", "2", "--run-dir"])
                .arg(&run),
        );
        let way = format!("--initial-checkpoint {}", run.join("last").display());
        for needed in [path.display().to_string(), format!("`{name}` holds NaN")] {
            assert!(err.contains(&needed), "{needed}: {err}");
        }
        assert_eq!(err.contains(&way), way_on, "{err}");
        assert_eq!(epochs_done(&run), 1);
        std::fs::write(&path, kept).unwrap();
    }
    run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&run),
    );
    assert_eq!(epochs_done(&run), 2);
}

/// A kill after a folder's new version was renamed into place, before its previous one at
/// `.NAME.old` was removed, leaves that copy (as large as the state): the next resume removes
/// it, so that a later one without `state/` cannot bring back its stale epoch.
#[test]
fn previous_versions_left_beside_the_runs_folders_are_removed_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path(), "1");
    let previous = ["state", "best", "last"].map(|name| {
        let old = run.join(format!(".{name}.old"));
        std::fs::create_dir(&old).unwrap();
        for entry in std::fs::read_dir(run.join(name)).unwrap() {
            let file = entry.unwrap().path();
            std::fs::copy(&file, old.join(file.file_name().unwrap())).unwrap();
        }
        old
    });
    let state = std::fs::read(run.join("state/training.json")).unwrap();

    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("has completed its 1 epoch ("), "{log}");
    for old in previous {
        assert!(!old.exists(), "{} is still there", old.display());
    }
    assert_eq!(
        std::fs::read(run.join("state/training.json")).unwrap(),
        state
    );
    for dir in ["state", "best", "last"] {
        Model::load(&run.join(dir), &Device::Cpu).unwrap();
    }

    // A new run in the folder, emptied of all but those, take them for its own.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::rename(run.join("state"), fresh.join(".state.old")).unwrap();
    let out = vt_train_tiny_refused(&tmp.path().join("data"), &fresh);
    assert!(
        out.contains("holds .state.old, which a training run writes"),
        "{out}"
    );
    assert!(!fresh.join("state").exists());
}

/// The error of a `train` into `run` that is refused.
fn vt_train_tiny_refused(data: &std::path::Path, run: &std::path::Path) -> String {
    let out = train_tiny(data, run).args(ONE_THREAD).output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ctrl_c_stops_cleanly_and_the_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 8);
    let run = tmp.path().join("run");
    let mut child = train(&data, &run, "50")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epoch(&mut child, &run, 1);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    // As a shell reports SIGINT, so that `vt-train train && next` stops.
    assert_eq!(out.status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    let done = epochs_done(&run);
    assert!((1..50).contains(&done));
    Model::load(&run.join("last"), &Device::Cpu).unwrap();

    let target = (done + 1).to_string();
    run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", &target, "--run-dir"])
            .arg(&run),
    );
    let epochs: Vec<usize> = records(&run).iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, (1..=done + 1).collect::<Vec<_>>());
}

/// Runs `cmd`, sends it SIGINT once it starts training (the Ctrl-C handler is in place) and
/// returns its log, checking that it exited as interrupted.
fn interrupt_when_training(cmd: &mut Command) -> String {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    // The line that starts training: the Ctrl-C handler is in place.
    while !log.contains("steps per epoch") {
        assert!(
            stderr.read_line(&mut log).unwrap() > 0,
            "vt-train ended before training:\n{log}"
        );
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    stderr.read_to_string(&mut log).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{log}");
    log
}

#[test]
fn ctrl_c_in_the_first_epoch_resumes_from_the_beginning() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 16);
    let run = tmp.path().join("run");
    // Batches of 2: an epoch of 36 steps, long enough for the interrupt to land in it.
    let log = interrupt_when_training(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "2",
        "--epochs",
        "1",
    ]));
    assert!(log.contains("restarts epoch 1"), "{log}");
    assert_eq!(
        epochs_done(&run),
        0,
        "epoch 1 ended before the interrupt:\n{log}"
    );

    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("starts from the beginning"), "{log}");
    assert_eq!(
        records(&run).iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(epochs_done(&run), 1);
}

/// What a resume cannot honour is refused, naming the option and both values, before any
/// file of the run changes; values JSON cannot hold (NaN, written as null) read back.
#[test]
fn a_resume_refuses_what_it_cannot_honour_and_reads_back_non_finite_values() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    // 18 training images in batches of 8: 2 steps per epoch.
    run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--checkpoint-hist",
        "2",
    ]));
    assert_eq!(checkpoint_history(&run).0.len(), 2);
    let files = || {
        ["config.toml", "metrics.jsonl", "state/training.json"]
            .map(|f| std::fs::read(run.join(f)).unwrap())
    };
    // A killed write's leftover, which a resume that goes on removes: a refused one does not.
    let leftover = run.join(".last.tmp-999");
    std::fs::create_dir(&leftover).unwrap();
    let before = files();
    // The same images split otherwise: as many training images, others.
    let resplit = tmp.path().join("resplit");
    import_synthetic(&resplit, 4, 43);
    let resplit_train = format!(
        "the training images of {} are not the run's",
        resplit.display()
    );
    let data_train = format!(
        "the training images of {} are not the run's",
        data.display()
    );
    let data_val = format!(
        "the validation images of {} are not the run's",
        data.display()
    );
    for (flags, message) in [
        (
            &["--batch-size", "4"][..],
            "--batch-size 4 (the run has 8) cannot be resumed: an epoch would take 4 steps \
             instead of the run's 2",
        ),
        (
            &["--grad-accum-steps", "2"],
            "--grad-accum-steps 2 (the run has 1) cannot be resumed: an epoch would take 1 \
             step instead of the run's 2",
        ),
        (
            &["--limit-train", "8"],
            &format!("{data_train} (18 images then, 8 now)"),
        ),
        (
            &["--limit-val", "4"],
            &format!("{data_val} (6 images then, 4 now)"),
        ),
        (
            &["--data", resplit.to_str().unwrap()],
            &format!("{resplit_train} (18 images then, 18 now, as many but others)"),
        ),
        (
            &["--image-size", "48"],
            "--image-size cannot change on resume: the run has 32, got 48",
        ),
        (
            &["--recipe", "seed"],
            "--recipe cannot change on resume: the run has modern, got seed",
        ),
        (
            &["--pretrained", "stem.safetensors"],
            "--pretrained only applies to a new run",
        ),
        (&["--epochs", "1"], "--epochs 1 is below the 2 epochs"),
    ] {
        let out = vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&run)
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted:\n{err}");
        assert!(
            err.contains(message),
            "{flags:?}: expected `{message}` in:\n{err}"
        );
        // A refused change is never logged as made.
        assert!(!err.contains("overriding"), "{flags:?}: {err}");
        assert!(files() == before, "{flags:?} changed the run's files");
        assert!(leftover.exists(), "{flags:?} cleaned the run's folder");
    }
    std::fs::remove_dir(&leftover).unwrap();

    // A diverged validation loss was written as null, in the metrics and as the best loss.
    let edit = |file: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let path = run.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
                change(&mut value);
                value.to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    };
    edit("metrics.jsonl", &|v| {
        v["val_loss"] = serde_json::Value::Null
    });
    let state = run.join("state/training.json");
    let mut progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    progress["best_val_loss"] = serde_json::Value::Null;
    // A state of a version that recorded no images: resumed with a warning, then recorded.
    progress.as_object_mut().unwrap().remove("data");
    std::fs::write(&state, progress.to_string()).unwrap();
    // A smaller --checkpoint-hist too: the worse kept epoch leaves top/ with the next epoch.
    let out = run_ok(
        vt_train()
            .args([
                "train",
                "--resume",
                "--epochs",
                "3",
                "--checkpoint-hist",
                "1",
            ])
            .arg("--run-dir")
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("--checkpoint-hist 1: the worst 1 of the 2 epochs"),
        "{log}"
    );
    assert!(
        log.contains("saved by an earlier vt-train, which did not record its images"),
        "{log}"
    );
    let progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(progress["data"]["train"]["count"], 18, "{progress}");
    let records = records(&run);
    assert_eq!(records.len(), 3);
    assert!(records[0].val_loss.is_nan() && records[1].val_loss.is_nan());
    assert!(records[2].val_loss.is_finite());
    let (listed, folders) = checkpoint_history(&run);
    assert_eq!(listed.len(), 1);
    assert_eq!(folders, epoch_folders(&listed));

    // No history any more: the kept epoch leaves, and its folder with it.
    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", "4"])
            .args(["--checkpoint-hist", "0", "--run-dir"])
            .arg(&run),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("epoch 4: top/ keeps epochs none"), "{log}");
    assert!(!run.join("top").exists());
}

/// The options a resume gives hold from then on: interrupted before its first epoch ended,
/// the resumed run continues with them on a plain `--resume`, as if never interrupted.
#[test]
fn a_resume_interrupted_in_its_first_epoch_keeps_its_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 16);
    // Batches of 2: an epoch of 36 steps, long enough for the interrupt to land in it.
    let first_epoch = |run: &Path| {
        run_ok(train_tiny(&data, run).args(ONE_THREAD).args([
            "--batch-size",
            "2",
            "--epochs",
            "1",
        ]));
    };
    let resume = |run: &Path| {
        let mut cmd = vt_train();
        cmd.args(["train", "--resume", "--run-dir"]).arg(run);
        cmd
    };
    let overrides = ["--epochs", "3", "--lr", "1e-3"];
    let interrupted = tmp.path().join("interrupted");
    first_epoch(&interrupted);
    let log = interrupt_when_training(resume(&interrupted).args(overrides));
    assert!(log.contains("restarts epoch 2"), "{log}");
    assert_eq!(
        epochs_done(&interrupted),
        1,
        "epoch 2 ended before the interrupt:\n{log}"
    );
    run_ok(&mut resume(&interrupted));

    let straight = tmp.path().join("straight");
    first_epoch(&straight);
    run_ok(resume(&straight).args(overrides));
    let (resumed, reference) = (records(&interrupted), records(&straight));
    assert_eq!(
        resumed.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(resumed.len(), reference.len());
    for (a, b) in resumed.iter().zip(&reference) {
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * y.abs().max(1.0);
        assert!(
            close(a.train_loss, b.train_loss) && close(a.val_loss, b.val_loss),
            "epoch {}: {a:?} vs {b:?}",
            a.epoch
        );
        assert_eq!((a.lr, a.global_step), (b.lr, b.global_step));
    }
}

/// A batch whose every file is unreadable is left out of its epoch, which still counts its
/// planned steps (the schedule and a resume count them), the last group's gradients making
/// an update of their own.
#[test]
fn an_epoch_short_of_a_batch_counts_its_planned_steps_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let mut images: Vec<_> = walk(&data.join("train"));
    images.sort();
    std::fs::write(&images[0], b"not an image").unwrap();
    let run = tmp.path().join("run");
    // 18 training images in batches of 1, updates over two batches: 9 steps planned, of
    // 17 batches an epoch.
    run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "1",
        "--grad-accum-steps",
        "2",
        "--epochs",
        "1",
    ]));
    run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&run),
    );
    assert_eq!(
        records(&run)
            .iter()
            .map(|r| r.global_step)
            .collect::<Vec<_>>(),
        vec![9, 18]
    );
    // Updates at 1..=8 and the short group's at 9, likewise in the second epoch.
    let (points, _) = tensorboard_points(&run);
    let steps: Vec<i64> = tag_points(&points, "train/loss_step")
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(steps, (1..=18).collect::<Vec<_>>());
}

/// The files under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// An epoch that leaves weights that are not finite saves nothing: the run stops naming
/// it, with its files as the epoch before left them, and a resume at a lower rate goes on.
#[test]
fn a_diverged_epoch_leaves_the_run_as_the_epoch_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "4",
        "--ema",
        "0.9",
        "--checkpoint-hist",
        "2",
        "--epochs",
        "1",
    ]));
    let files = || {
        [
            "state/training.json",
            "state/model.safetensors",
            "state/ema.safetensors",
            "best/model.safetensors",
            "last/model.safetensors",
            "top/epoch-001/model.safetensors",
            "metrics.jsonl",
        ]
        .map(|f| std::fs::read(run.join(f)).unwrap())
    };
    let before = files();
    let resume = |flags: &[&str]| {
        let mut cmd = vt_train();
        cmd.args(["train", "--resume", "--epochs", "2", "--run-dir"])
            .arg(&run)
            .args(ONE_THREAD)
            .args(flags);
        cmd
    };
    // The largest rate f32 holds, and a weight decay that takes it past: the first update
    // leaves the decayed weights infinite.
    let err = run_err(&mut resume(&["--lr", "3e38", "--weight-decay", "10"]));
    assert!(
        err.contains("diverged in epoch 2") && err.contains("the run's state keeps epoch 1"),
        "{err}"
    );
    assert!(
        files() == before,
        "the diverged epoch changed the run's files"
    );
    assert!(!run.join("top/epoch-002").exists());
    run_ok(&mut resume(&["--lr", "1e-3"]));
    assert_eq!(
        records(&run).iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Steps skipped for a loss or gradient that is not finite leave the BatchNorm statistics
    // too as they were: the notebook's recipe without clipping, at a rate it cannot take.
    let wild = tmp.path().join("wild");
    let out = train_tiny(&data, &wild)
        .args(ONE_THREAD)
        .args(["--batch-size", "4", "--recipe", "seed", "--lr", "50"])
        .args(["--clip-grad", "0", "--warmup-epochs", "0", "--epochs", "3"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("update skipped"), "{log}");
    // Whether it ends or stops for a diverged epoch, what it saved loads, and no epoch it
    // saved has a validation loss that is not finite.
    for dir in ["state", "last", "best"].map(|d| wild.join(d)) {
        if dir.exists() {
            Model::load(&dir, &Device::Cpu).unwrap();
        }
    }
    if wild.join("metrics.jsonl").exists() {
        assert!(records(&wild).iter().all(|r| r.val_loss.is_finite()));
    }
}

/// Weights finite but so large that the validation loss is not: the epoch is a diverged
/// one, saved nowhere, so that a resume at a lower rate starts from sound weights.
#[test]
fn an_epoch_whose_validation_loss_is_not_finite_saves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let train = |flags: &[&str]| {
        let mut cmd = train_tiny(&data, &run);
        cmd.args(ONE_THREAD)
            .args(["--batch-size", "4", "--epochs", "1"])
            .args(flags);
        cmd
    };
    let err = run_err(&mut train(&["--lr", "1e30"]));
    assert!(
        err.contains("diverged in epoch 1: the validation loss is")
            && err.contains("the run's state keeps no epoch (`--resume` with a lower --lr"),
        "{err}"
    );
    for output in ["state", "last", "best"] {
        assert!(!run.join(output).exists(), "{output} was written: {err}");
    }
    let logged = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    assert!(logged.is_empty(), "the epoch was logged: {logged}");
    run_ok(&mut train(&["--resume", "--lr", "1e-3"]));
    assert_eq!(epochs_done(&run), 1);
    assert!(records(&run)[0].val_loss.is_finite());
}
