//! The user journey of `cargo xtask e2e`, run by the test suite: data, a short training run,
//! evaluation, a served prediction checked against `vt-serve predict`.

use std::path::PathBuf;

use xtask::e2e::{run, Args, Source};

/// A quick run (one epoch, 12 requests) in `work` from `from`, else synthetic data.
fn quick(work: &tempfile::TempDir, from: Option<PathBuf>) -> Args {
    Args {
        source: if from.is_some() {
            Source::Hf
        } else {
            Source::Synthetic
        },
        from,
        quick: true,
        work_dir: Some(work.path().to_path_buf()),
        epochs: Some(1),
        requests: 12,
    }
}

fn intel_sample() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/intel-sample");
    dir.is_dir().then_some(dir)
}

#[test]
fn synthetic_data_to_a_served_prediction() {
    let work = tempfile::tempdir().unwrap();
    run(quick(&work, None)).unwrap();
    let run_dir = work.path().join("run");
    for file in [
        "best/config.json",
        "best/model.safetensors",
        "last/model.safetensors",
        "metrics.jsonl",
        "eval-test.json",
    ] {
        assert!(run_dir.join(file).is_file(), "{file} missing after e2e");
    }
}

#[test]
fn real_photos_to_a_served_prediction() {
    let Some(sample) = intel_sample() else {
        eprintln!("skipped: ../shared/data/intel-sample is absent (CI has it)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    run(quick(&work, Some(sample))).unwrap();
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join("run/eval-val.json")).unwrap(),
    )
    .unwrap();
    // The sample has no seg_test: evaluation falls back to the validation split, and its
    // report says so by name.
    assert_eq!(report["split"], "val");
    assert!(report["images"].as_u64().unwrap() > 0);
}

#[test]
fn a_run_folder_e2e_did_not_write_is_refused_before_any_work() {
    let work = tempfile::tempdir().unwrap();
    let kept = work.path().join("run/important");
    std::fs::create_dir_all(&kept).unwrap();
    let err = run(quick(&work, None)).unwrap_err();
    assert!(err.to_string().contains("refusing to replace"), "{err:#}");
    assert!(kept.is_dir(), "e2e deleted {}", kept.display());
    assert!(!work.path().join("data").exists(), "e2e fetched data first");
}
