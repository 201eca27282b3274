//! A killed or interrupted run resumes where its last completed epoch left off.
#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
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

fn train(data: &Path, run: &Path, epochs: &str) -> Command {
    let mut cmd = train_tiny(data, run);
    cmd.args(ONE_THREAD).args([
        "--batch-size",
        "16",
        "--epochs",
        epochs,
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "1",
        "--ema",
        "0.9",
        "--seed",
        "5",
    ]);
    cmd
}

#[test]
fn a_run_killed_after_an_epoch_resumes_each_epoch_exactly_once_and_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 8);
    let killed = tmp.path().join("killed");
    let mut child = train(&data, &killed, "3")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_epoch(&mut child, &killed, 1);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        epochs_done(&killed) < 3,
        "the run finished before it was killed"
    );
    for dir in ["best", "last", "state"] {
        Model::load(&killed.join(dir), &Device::Cpu).unwrap();
    }

    let out = run_ok(
        vt_train()
            .args(["train", "--resume", "--run-dir"])
            .arg(&killed),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    let resumed = records(&killed);
    assert_eq!(
        resumed.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(epochs_done(&killed), 3);

    // The same run without interruption: identical numbers, so the optimiser moments, the
    // EMA, BatchNorm statistics and the schedule position were all restored.
    let straight = tmp.path().join("straight");
    run_ok(&mut train(&data, &straight, "3"));
    let reference = records(&straight);
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
    }
}

#[test]
fn ctrl_c_stops_cleanly_and_the_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 8);
    let run = tmp.path().join("run");
    let mut child = train(&data, &run, "50")
        .stderr(std::process::Stdio::piped())
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
    assert!(out.status.success(), "{log}");
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
