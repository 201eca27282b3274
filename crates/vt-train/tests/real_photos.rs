//! Short trainings on a few dozen real photos of the intel sample (skipped when absent).

mod common;

use std::fs;

use candle_core::Device;
use common::*;
use vt_model::Model;

#[test]
fn both_recipes_train_on_real_photos_and_eval_reads_them() {
    let Some(sample) = intel_sample() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = real_data(&sample, tmp.path(), 6, 2);

    let modern = tmp.path().join("modern");
    run_ok(train_tiny(&data, &modern).args(ONE_THREAD).args([
        "--batch-size",
        "12",
        "--epochs",
        "5",
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "1",
    ]));
    let records = records(&modern);
    assert_eq!(records.len(), 5);
    let losses: Vec<f64> = records.iter().map(|r| r.train_loss).collect();
    assert!(
        losses[4] < losses[0],
        "training loss should fall: {losses:?}"
    );
    assert!(records.iter().all(|r| r.val_loss.is_finite()));

    let seed = tmp.path().join("seed");
    run_ok(
        vt_train()
            .args([
                "train",
                "--recipe",
                "seed",
                "--arch",
                "vt-resnet18",
                "--data",
            ])
            .arg(&data)
            .arg("--run-dir")
            .arg(&seed)
            .args(TINY_MODEL)
            .args(ONE_THREAD)
            .args(["--epochs", "2", "--warmup-epochs", "0"]),
    );
    assert_eq!(crate::records(&seed).len(), 2);
    for run in [&modern, &seed] {
        for dir in ["best", "last"] {
            let model = Model::load(&run.join(dir), &Device::Cpu).unwrap();
            let mut classes = model.config.class_names.clone();
            classes.sort();
            assert_eq!(
                classes,
                [
                    "buildings",
                    "forest",
                    "glacier",
                    "mountain",
                    "sea",
                    "street"
                ]
            );
        }
    }

    let report = tmp.path().join("eval.json");
    run_ok(
        vt_train()
            .args(["eval", "--threads", "1", "--split", "test", "--checkpoint"])
            .arg(modern.join("best"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&report),
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["images"], 12);
    assert_eq!(json["split"], "test");
}
