//! Real short trainings of a tiny model through the `vt-train` binary.

mod common;

use std::fs;

use candle_core::Device;
use common::*;
use vt_model::Model;

#[test]
fn training_learns_writes_the_run_folder_and_eval_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 16);
    let run = tmp.path().join("run");
    let out = run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "16",
        "--epochs",
        "4",
        "--lr",
        "3e-3",
        "--warmup-epochs",
        "0.5",
        "--ema",
        "0.5",
        "--checkpoint-hist",
        "2",
    ]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("epoch 4/4"), "{log}");

    let records = records(&run);
    assert_eq!(
        records.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(
        records[3].train_loss < records[0].train_loss,
        "training loss should fall: {:?}",
        records.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    for r in &records {
        assert!(r.val_loss.is_finite() && r.img_per_s > 0.0 && r.grad_norm_max >= r.grad_norm_mean);
        assert_eq!(r.val_class_acc.len(), 6);
    }
    // Cosine decay after warmup: the rate of the last step is below the peak.
    assert!(records[3].lr < 3e-3 && records[0].lr <= 3e-3);
    let csv = fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("epoch,train_loss,train_acc,val_loss,val_acc,lr,img_per_s"));
    assert!(is_png(&run.join("curves.png")) && is_png(&run.join("confusion.png")));
    // TensorBoard: every step's loss, rate and gradient norm, and each epoch's metrics at its
    // last step, as metrics.jsonl has them.
    let (points, files) = tensorboard_points(&run);
    assert_eq!(files, 1);
    let steps = records[3].global_step as i64;
    for tag in ["train/loss_step", "train/lr", "train/grad_norm"] {
        let logged: Vec<i64> = tag_points(&points, tag).iter().map(|p| p.0).collect();
        assert_eq!(logged, (1..=steps).collect::<Vec<_>>(), "{tag}");
    }
    let at_epochs = |value: fn(&vt_train::metrics::EpochRecord) -> f64| -> Vec<(i64, f32)> {
        records
            .iter()
            .map(|r| (r.global_step as i64, value(r) as f32))
            .collect()
    };
    assert_eq!(
        tag_points(&points, "val/accuracy"),
        at_epochs(|r| r.val_acc)
    );
    assert_eq!(
        tag_points(&points, "train/loss"),
        at_epochs(|r| r.train_loss)
    );
    assert_eq!(tag_points(&points, "epoch"), at_epochs(|r| r.epoch as f64));
    assert_eq!(
        tag_points(&points, "val/accuracy/forest"),
        at_epochs(|r| r.val_class_acc["forest"])
    );
    let ece = tag_points(&points, "val/ece");
    assert_eq!(ece.len(), 4);
    assert!(
        ece.iter().all(|&(_, e)| (0.0..=1.0).contains(&e)),
        "{ece:?}"
    );
    // The rate of each epoch's last step is the epoch's.
    let lr = tag_points(&points, "train/lr");
    assert_eq!(lr[steps as usize - 1].1, records[3].lr as f32);

    let best_epoch = records.iter().rfind(|r| r.best).unwrap().epoch;
    for (dir, epoch) in [("best", best_epoch), ("last", 4)] {
        let model = Model::load(&run.join(dir), &Device::Cpu).unwrap();
        assert_eq!(model.config.image_size, 32);
        assert_eq!(model.config.class_names.len(), 6);
        check_training_record(&run, &run.join(dir), &records[epoch - 1]);
    }
    check_history_and_average(&run, &data, &records, &log);
    // config.toml is a valid --config file.
    let config: toml::Table = fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(config["epochs"].as_integer(), Some(4));
    assert_eq!(config["ema"].as_float(), Some(0.5));

    // The manifest lists a test photo with a copy in train (as fetch-data finds them), and
    // two test photos that are copies of each other only.
    let file_in = |dir: &str| -> String {
        let mut names: Vec<String> = fs::read_dir(data.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        format!("{dir}/{}", names[0])
    };
    let (copied, copy) = (file_in("test/forest"), file_in("train/forest"));
    let manifest_path = data.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["duplicates"] = serde_json::json!([
        {"files": [copied, copy], "conflicting_labels": false},
        {"files": [file_in("test/sea"), file_in("test/street")], "conflicting_labels": true},
    ]);
    fs::write(&manifest_path, manifest.to_string()).unwrap();

    let report = tmp.path().join("report.json");
    let eval_test = || {
        run_ok(
            vt_train()
                .args(["eval", "--checkpoint"])
                .arg(run.join("best"))
                .arg("--data")
                .arg(&data)
                .args(["--split", "test", "--threads", "1", "--out"])
                .arg(&report),
        )
    };
    let out = eval_test();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("precision") && text.contains("confusion matrix"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["images"], 24);
    let rows: Vec<Vec<u64>> =
        serde_json::from_value(json["confusion_matrix"]["counts"].clone()).unwrap();
    assert_eq!(rows.iter().flatten().sum::<u64>(), 24);
    assert_eq!(json["classes"].as_array().unwrap().len(), 6);
    // The share of the matrix's diagonal.
    let right: u64 = (0..rows.len()).map(|i| rows[i][i]).sum();
    assert_eq!(json["accuracy"].as_f64().unwrap(), right as f64 / 24.0);
    assert!(is_png(&report.with_extension("png")));
    assert_eq!(
        json["copies_in_other_splits"],
        serde_json::json!([data.join(&copied)])
    );
    assert!(
        text.contains("note: 1 of these images have a byte-identical copy in a training"),
        "{text}"
    );
    check_predictions(&report, &data, &text);
    // An evaluation compared with itself: the same images, no difference. A moved report
    // still finds its CSV beside it, whatever path it names.
    let moved = tmp.path().join("moved");
    fs::create_dir(&moved).unwrap();
    let mut renamed: serde_json::Value = json.clone();
    renamed["predictions"] = serde_json::json!("no/such/place.csv");
    fs::write(moved.join("r.json"), renamed.to_string()).unwrap();
    fs::copy(report.with_extension("csv"), moved.join("r.csv")).unwrap();
    let compared = run_ok(
        vt_train()
            .arg("compare")
            .arg(moved.join("r.json"))
            .arg(report.with_extension("csv")),
    );
    let compared = String::from_utf8_lossy(&compared.stdout);
    assert!(
        compared.contains("0 right only by A, 0 right only by B"),
        "{compared}"
    );
    assert!(
        compared.contains("p = 1.0000: no significant difference"),
        "{compared}"
    );
    // Reports of two splits are not compared.
    renamed["split"] = serde_json::json!("val");
    fs::write(moved.join("r.json"), renamed.to_string()).unwrap();
    let splits = run_err(
        vt_train()
            .arg("compare")
            .arg(&report)
            .arg(moved.join("r.json")),
    );
    assert!(splits.contains("the test split and"), "{splits}");
    let wrong = run_err(
        vt_train()
            .arg("compare")
            .arg(&report)
            .arg(run.join("metrics.csv")),
    );
    assert!(
        wrong.contains("metrics.csv: its first line is not a header with path, label and correct"),
        "{wrong}"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!(
            "wrote {}, {} and {}",
            report.display(),
            report.with_extension("csv").display(),
            report.with_extension("png").display()
        )),
        "{log}"
    );

    // An import by a version that did not look for duplicates lists none: not known, which
    // is not "none" (the report's null, not []).
    manifest.as_object_mut().unwrap().remove("duplicates");
    fs::write(&manifest_path, manifest.to_string()).unwrap();
    let out = eval_test();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("note: not known whether these images have copies"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["copies_in_other_splits"], serde_json::Value::Null);

    // The validation split is the run's until the data is imported again with another
    // split seed: then some of its photos are ones the run trained on, which eval says.
    let eval_val = |checkpoint: &std::path::Path| {
        let out = run_ok(
            vt_train()
                .args(["eval", "--checkpoint"])
                .arg(checkpoint)
                .arg("--data")
                .arg(&data)
                .args(["--split", "val", "--threads", "1", "--out"])
                .arg(&report),
        );
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), json)
    };
    let (text, json) = eval_val(&run.join("best"));
    assert_eq!(json["the_runs_validation_images"], true);
    assert!(!text.contains("not the validation images"), "{text}");
    assert!(
        text.contains(&format!(
            "trained {best_epoch} of 4 epochs in {} (validation accuracy {:.2}%)",
            run.display(),
            100.0 * records[best_epoch - 1].val_acc
        )),
        "{text}"
    );
    assert_eq!(json["training"]["epoch"], best_epoch);
    // A copy out of the run (deployed, say) still knows its validation images by its record.
    let copy = tmp.path().join("deployed");
    fs::create_dir(&copy).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(run.join("best").join(file), copy.join(file)).unwrap();
    }
    let (_, json) = eval_val(&copy);
    assert_eq!(json["the_runs_validation_images"], true);
    import_synthetic(&data, 16, 43);
    for checkpoint in [run.join("best"), copy] {
        let (text, json) = eval_val(&checkpoint);
        assert_eq!(json["the_runs_validation_images"], false);
        assert!(
            text.contains("note: these are not the validation images the checkpoint's run"),
            "{text}"
        );
    }
}

/// The checkpoint `dir` records the run's options, images and `epoch`'s step and scores.
fn check_training_record(
    run: &std::path::Path,
    dir: &std::path::Path,
    epoch: &vt_train::metrics::EpochRecord,
) {
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let record = &config["training"];
    let at = dir.display();
    assert_eq!(record["epoch"], epoch.epoch, "{at}");
    assert_eq!(record["step"], epoch.global_step, "{at}");
    assert_eq!(record["val_accuracy"], epoch.val_acc, "{at}");
    assert_eq!(record["val_loss"], epoch.val_loss, "{at}");
    assert_eq!(record["vt_version"], env!("CARGO_PKG_VERSION"), "{at}");
    let options: toml::Table = fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let options = serde_json::to_value(options).unwrap();
    assert_eq!(record["options"], options, "{at}");
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("state/training.json")).unwrap())
            .unwrap();
    assert_eq!(record["images"], state["data"], "{at}");
}

/// `top/` keeps the 2 best epochs of metrics.jsonl, ranked as best/ is (accuracy, then loss,
/// then the earlier), with the (EMA) weights best/ holds; `vt-train average --run-dir`
/// writes their element-wise mean as a checkpoint that `eval` loads.
fn check_history_and_average(
    run: &std::path::Path,
    data: &std::path::Path,
    records: &[vt_train::metrics::EpochRecord],
    log: &str,
) {
    let mut ranked: Vec<_> = records.iter().collect();
    ranked.sort_by(|a, b| {
        (b.val_acc.total_cmp(&a.val_acc))
            .then(a.val_loss.total_cmp(&b.val_loss))
            .then(a.epoch.cmp(&b.epoch))
    });
    let best: Vec<usize> = ranked[..2].iter().map(|r| r.epoch).collect();
    let (listed, folders) = checkpoint_history(run);
    assert_eq!(listed, best);
    assert_eq!(folders, epoch_folders(&best));
    assert_eq!(
        Some(best[0]),
        records.iter().rfind(|r| r.best).map(|r| r.epoch)
    );
    let kept = |epoch: usize| checkpoint_tensors(&run.join(format!("top/epoch-{epoch:03}")));
    let (first, second) = (kept(best[0]), kept(best[1]));
    for (name, tensor) in checkpoint_tensors(&run.join("best")) {
        assert_eq!(max_abs_diff(&tensor, &first[&name]), 0.0, "{name}");
    }
    assert!(log.contains("average --run-dir"), "{log}");

    let avg = run.with_file_name("avg");
    let average = || {
        let mut cmd = vt_train();
        cmd.args(["average", "--run-dir"])
            .arg(run)
            .arg("--out")
            .arg(&avg);
        cmd
    };
    let out = run_ok(&mut average());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("averaged 2 checkpoints"), "{text}");
    for epoch in &best {
        assert!(
            text.contains(&format!("epoch-{epoch:03}  epoch {epoch}, val acc")),
            "{text}"
        );
    }
    for epoch in &best {
        let dir = run.join(format!("top/epoch-{epoch:03}"));
        check_training_record(run, &dir, &records[epoch - 1]);
    }
    // The mean is no epoch's: its config records none.
    let config = fs::read_to_string(avg.join("config.json")).unwrap();
    assert!(!config.contains("training"), "{config}");
    let mean = checkpoint_tensors(&avg);
    assert_eq!(mean.len(), first.len());
    for (name, tensor) in &mean {
        let expected = ((&first[name] + &second[name]).unwrap() / 2.0).unwrap();
        assert!(max_abs_diff(tensor, &expected) <= 1e-6, "{name}");
    }
    let refused = run_err(&mut average());
    assert!(refused.contains("already holds a checkpoint"), "{refused}");
    let averaged_weights = fs::read(avg.join("model.safetensors")).unwrap();
    // An `average --force` killed between its two renames left the checkpoint at
    // `.avg.old`, which the next write would put back and replace: still no --force, no
    // write.
    let previous = run.with_file_name(".avg.old");
    fs::rename(&avg, &previous).unwrap();
    let refused = run_err(&mut average());
    assert!(
        refused.contains("already holds a checkpoint (at")
            && refused.contains("where an interrupted write left it"),
        "{refused}"
    );
    assert!(!avg.exists());
    let kept = fs::read(previous.join("model.safetensors")).unwrap();
    assert_eq!(kept, averaged_weights);
    fs::rename(&previous, &avg).unwrap();
    let refused = run_err(
        vt_train()
            .args(["average", "--run-dir"])
            .arg(run)
            .arg("--out")
            .arg(avg.join("inner")),
    );
    assert!(
        refused.contains("inside the checkpoint folder"),
        "{refused}"
    );
    // A checkpoint given as the run: the two ways it may have been meant.
    let refused = run_err(
        vt_train()
            .args(["average", "--run-dir"])
            .arg(run.join("best"))
            .arg("--out")
            .arg(run.with_file_name("avg-of-best")),
    );
    assert!(
        refused.contains("a checkpoint folder, not a run: give the run folder (--run-dir")
            && refused.contains("or give checkpoints as arguments"),
        "{refused}"
    );
    // Checkpoints of two configurations: refused, in the order given, before anything is
    // announced.
    let other = run.with_file_name("other-config");
    run_ok(
        vt_train()
            .args([
                "init",
                "--num-classes",
                "2",
                "--image-size",
                "32",
                "--tokens",
                "8",
            ])
            .args(["--token-channels", "32", "--heads", "2", "--out"])
            .arg(&other),
    );
    let mut mixed = vt_train();
    mixed
        .args(["average", "--out"])
        .arg(run.with_file_name("mixed"))
        .arg(run.join("best"))
        .arg(&other);
    let output = mixed.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{} and {} differ in",
            run.join("best/config.json").display(),
            other.join("config.json").display()
        )) && stderr.contains("tokens: 4 vs 8"),
        "{stderr}"
    );
    let refused = run_err(average().args(["--force", "--top", "3"]));
    assert!(
        refused.contains("--top 3") && refused.contains("keeps 2 epochs"),
        "{refused}"
    );
    // Files that do not read are named in the report, in file order, and counted in its text.
    let class_folder = fs::read_dir(data.join("val"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let unreadable: [(&str, &[u8]); 2] =
        [("zz-truncated.jpg", b"\xff\xd8\xff"), ("zz-empty.png", b"")];
    for (name, bytes) in unreadable {
        fs::write(class_folder.join(name), bytes).unwrap();
    }
    // Names that are not UTF-8 (Latin-1), a photo's and an unreadable file's: the report
    // and the CSV write their bytes `\xNN` (serde refuses such a path).
    #[cfg(unix)]
    let latin1 = {
        use std::os::unix::ffi::OsStrExt;
        let photo = fs::read_dir(&class_folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with("zz-"))
            .unwrap();
        let named = |name: &[u8]| class_folder.join(std::ffi::OsStr::from_bytes(name));
        let latin1 = [named(b"caf\xe9.jpg"), named(b"zz-\xe9t\xe9.jpg")];
        fs::copy(photo, &latin1[0]).unwrap();
        fs::write(&latin1[1], b"\xff\xd8\xff").unwrap();
        latin1
    };
    let out = run_ok(
        vt_train()
            .args(["eval", "--split", "val", "--threads", "1", "--checkpoint"])
            .arg(&avg)
            .arg("--data")
            .arg(data),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let unread = if cfg!(unix) { 3 } else { 2 };
    assert!(
        text.contains(&format!("note: {unread} more file(s) could not be read")),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(avg.with_file_name("eval-avg-val.json")).unwrap())
            .unwrap();
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert!(
        skipped.len() == unread && skipped[0].ends_with("zz-empty.png"),
        "{skipped:?}"
    );
    for (name, _) in unreadable {
        fs::remove_file(class_folder.join(name)).unwrap();
    }
    #[cfg(unix)]
    {
        assert!(skipped[2].ends_with("/zz-\\xe9t\\xe9.jpg"), "{skipped:?}");
        let rows = fs::read_to_string(avg.with_file_name("eval-avg-val.csv")).unwrap();
        assert!(rows.contains("/caf\\xe9.jpg,"), "{rows}");
        for file in latin1 {
            fs::remove_file(file).unwrap();
        }
    }
    // A kept epoch's report goes beside its run: top/ holds only the epochs it keeps.
    // Without --data, a run's checkpoint is evaluated on the data its run trained on.
    let kept_epoch = run.join(format!("top/epoch-{:03}", best[1]));
    let options = run.canonicalize().unwrap().join("config.toml");
    for checkpoint in [kept_epoch, run.join("best")] {
        let out = run_ok(
            vt_train()
                .args(["eval", "--split", "val", "--threads", "1", "--checkpoint"])
                .arg(&checkpoint),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains(&format!(
                "--data {}: from {}",
                data.display(),
                options.display()
            )),
            "{log}"
        );
    }
    let report = format!("eval-top-epoch-{:03}-val.json", best[1]);
    assert!(run.join(report).is_file());
    assert_eq!(checkpoint_history(run).1, epoch_folders(&best));
    // A run's data folder that is not there from here (a relative one, taken from where
    // training ran) is refused, naming --data.
    let moved = run.with_file_name("moved-run");
    fs::create_dir_all(moved.join("best")).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(run.join("best").join(file), moved.join("best").join(file)).unwrap();
    }
    fs::write(moved.join("config.toml"), "data = \"data-elsewhere\"\n").unwrap();
    let err = run_err(
        vt_train()
            .args(["eval", "--split", "val", "--threads", "1", "--checkpoint"])
            .arg(moved.join("best")),
    );
    assert!(
        err.contains("trained on the data folder data-elsewhere, which is not there")
            && err.contains("give --data"),
        "{err}"
    );
    // A checkpoint's file is named as such, before a report path is made from it.
    let err = run_err(
        vt_train()
            .args(["eval", "--checkpoint"])
            .arg(run.join("best/model.safetensors")),
    );
    assert!(
        err.contains("is a file: a checkpoint is the folder"),
        "{err}"
    );
}

/// One row of the predictions CSV.
struct Row {
    path: String,
    label: String,
    prediction: String,
    confidence: f64,
    label_probability: f64,
    correct: bool,
    /// By class, in the header's order.
    p: Vec<f64>,
}

/// Checks the predictions CSV beside `report` (a `vt-train eval` JSON report of the test
/// split of `data`) against the images, the report and the printed `text`; returns the
/// number of wrong predictions.
fn check_predictions(report: &std::path::Path, data: &std::path::Path, text: &str) -> usize {
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(report).unwrap()).unwrap();
    let csv_path = report.with_extension("csv");
    // The default report's folder is named after the canonical checkpoint path.
    let named = std::path::Path::new(json["predictions"].as_str().unwrap());
    assert_eq!(
        named.canonicalize().unwrap(),
        csv_path.canonicalize().unwrap()
    );
    let classes: Vec<String> = json["confusion_matrix"]["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let csv = fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    let mut header = vec![
        "path",
        "label",
        "prediction",
        "confidence",
        "label_probability",
        "correct",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    assert_eq!(lines.next().unwrap(), header.join(","));
    // Neither the temporary folder nor the class names need quoting.
    let rows: Vec<Row> = lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{line}");
            let number = |i: usize| cells[i].parse::<f64>().unwrap();
            Row {
                path: cells[0].to_string(),
                label: cells[1].to_string(),
                prediction: cells[2].to_string(),
                confidence: number(3),
                label_probability: number(4),
                correct: cells[5].parse().unwrap(),
                p: (6..cells.len()).map(number).collect(),
            }
        })
        .collect();

    // One row per image, in the split's order (by class, then file name), each with its
    // folder's class.
    let mut expected = Vec::new();
    for class in &classes {
        let mut files: Vec<_> = fs::read_dir(data.join("test").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        expected.extend(files.into_iter().map(|f| (f.display().to_string(), class)));
    }
    assert_eq!(json["images"].as_u64().unwrap() as usize, rows.len());
    assert_eq!(
        rows.iter()
            .map(|r| (r.path.clone(), &r.label))
            .collect::<Vec<_>>(),
        expected
    );

    for r in &rows {
        assert!((r.p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{}", r.path);
        let max = r.p.iter().cloned().fold(f64::MIN, f64::max);
        let class = |name: &str| classes.iter().position(|c| c == name).unwrap();
        assert_eq!(r.confidence, max, "{}", r.path);
        assert_eq!(r.p[class(&r.prediction)], max, "{}", r.path);
        assert_eq!(r.label_probability, r.p[class(&r.label)], "{}", r.path);
        assert_eq!(r.correct, r.label == r.prediction, "{}", r.path);
    }
    let right = rows.iter().filter(|r| r.correct).count();
    let accuracy = json["accuracy"].as_f64().unwrap();
    assert!((accuracy - right as f64 / rows.len() as f64).abs() < 1e-12);
    // The report's interval is the one of its own counts, and the text says it.
    let interval = json["accuracy_ci95"].as_array().unwrap();
    let (low, high) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
    assert_eq!(
        (low, high),
        vt_train::metrics::wilson_interval(right as u64, rows.len() as u64)
    );
    assert!(low <= accuracy && accuracy <= high);
    assert!(
        text.contains(&format!(
            "(95% interval {:.2}-{:.2}%)",
            100.0 * low,
            100.0 * high
        )),
        "{text}"
    );

    // Calibration: 15 bins holding every row once by its confidence, their accuracies
    // counting the right rows, the expected error their weighted gaps.
    let calibration = &json["calibration"];
    let bins = calibration["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 15);
    let (mut counted, mut right_in_bins, mut ece) = (0, 0.0, 0.0);
    for (m, bin) in bins.iter().enumerate() {
        let field = |name: &str| bin[name].as_f64().unwrap();
        let images = bin["images"].as_u64().unwrap() as usize;
        let (low, high) = (field("low"), field("high"));
        assert!(
            (low - m as f64 / 15.0).abs() < 1e-12 && (high - (m + 1) as f64 / 15.0).abs() < 1e-12
        );
        let in_bin: Vec<&Row> = rows
            .iter()
            .filter(|r| r.confidence > low + 1e-5 && r.confidence <= high - 1e-5)
            .collect();
        // Read as f64, a confidence at an edge may fall either side of it.
        assert!(in_bin.len() <= images, "bin {m}: {bin}");
        if images > 0 {
            assert!(low - 1e-6 <= field("confidence") && field("confidence") <= high + 1e-6);
        }
        counted += images;
        right_in_bins += field("accuracy") * images as f64;
        ece += (field("accuracy") - field("confidence")).abs() * images as f64 / rows.len() as f64;
    }
    assert_eq!(counted, rows.len());
    assert!((right_in_bins - right as f64).abs() < 1e-6);
    let reported = calibration["ece"].as_f64().unwrap();
    assert!((reported - ece).abs() < 1e-9, "{reported} {ece}");
    assert!(
        text.contains(&format!(
            "calibration: expected error {:.2}%",
            100.0 * reported
        )),
        "{text}"
    );

    // The mistakes: the wrong rows of highest confidence, at most 10, most confident first.
    let mistakes = json["mistakes"].as_array().unwrap();
    let wrong = rows.len() - right;
    assert_eq!(mistakes.len(), wrong.min(10));
    // The printed list ends the text: the same mistakes in the same order.
    let printed: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("most confident mistakes"))
        .collect();
    if wrong == 0 {
        assert_eq!(
            printed,
            ["most confident mistakes: none, every image is classified correctly"]
        );
    } else {
        let heading = format!(
            "most confident mistakes ({} of {wrong} wrong)",
            mistakes.len()
        );
        assert_eq!(printed[0], heading, "{text}");
    }
    assert_eq!(printed.len(), mistakes.len() + 1, "{text}");
    let mut confidences = Vec::new();
    for (m, line) in mistakes.iter().zip(&printed[1..]) {
        let path = m["path"].as_str().unwrap();
        let row = rows.iter().find(|r| r.path == path).unwrap();
        assert!(!row.correct, "{path}");
        assert_eq!(m["label"], row.label.as_str());
        assert_eq!(m["prediction"], row.prediction.as_str());
        let confidence = m["confidence"].as_f64().unwrap();
        assert!((confidence - row.confidence).abs() < 1e-6, "{path}");
        let label_probability = m["label_probability"].as_f64().unwrap();
        assert!((label_probability - row.label_probability).abs() < 1e-6);
        confidences.push(confidence);
        let percent: f64 = line
            .strip_prefix(&format!("  {path}: {} -> {} (", row.label, row.prediction))
            .and_then(|rest| rest.strip_suffix("%)"))
            .unwrap_or_else(|| panic!("{line}"))
            .parse()
            .unwrap();
        assert!((percent - 100.0 * confidence).abs() < 0.051, "{line}");
    }
    assert!(
        confidences.windows(2).all(|w| w[0] >= w[1]),
        "{confidences:?}"
    );
    // No wrong row left out is surer than the least sure listed.
    if let Some(&least) = confidences.last() {
        let listed = |r: &&Row| mistakes.iter().any(|m| m["path"] == r.path.as_str());
        for r in rows.iter().filter(|r| !r.correct).filter(|r| !listed(r)) {
            assert!(r.confidence <= least + 1e-6, "{} left out", r.path);
        }
    }
    wrong
}

#[test]
fn a_config_file_sets_options_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let config = tmp.path().join("train.toml");
    let text = format!(
        "recipe = \"seed\"\narch = \"vt-resnet18\"\ndata = {:?}\nepochs = 5\nimage-size = 32\ntokens = 4\n\
         token-channels = 32\nheads = 2\nbatch-size = 8\nthreads = 1\nlimit-train = 12\n",
        data.display().to_string()
    );
    fs::write(&config, text).unwrap();
    run_ok(
        vt_train()
            .arg("--config")
            .arg(&config)
            .arg("--run-dir")
            .arg(&run)
            .args(["--epochs", "1"]),
    );
    let saved: toml::Table = fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(saved["recipe"].as_str(), Some("seed"));
    assert_eq!(saved["epochs"].as_integer(), Some(1));
    assert_eq!(saved["lr"].as_float(), Some(0.01));
    assert_eq!(saved["limit-train"].as_integer(), Some(12));
    assert_eq!(records(&run).len(), 1);
    // 12 images in batches of 8, the partial batch dropped: one step.
    assert_eq!(records(&run)[0].global_step, 1);

    // Starting over an existing run is refused; a resume of a finished run does nothing.
    let out = vt_train()
        .arg("--config")
        .arg(&config)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    run_ok(
        vt_train()
            .args(["train", "--resume", "--epochs", "1", "--run-dir"])
            .arg(&run),
    );
    assert_eq!(records(&run).len(), 1);

    let bad = tmp.path().join("bad.toml");
    fs::write(&bad, "learning-rate = 0.1\n").unwrap();
    let out = vt_train().arg("--config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("learning-rate"),
        "{err}"
    );
}

#[test]
fn the_optimiser_and_schedule_follow_opt_and_sched() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args([
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--warmup-epochs",
        "0",
        "--opt",
        "momentum",
        "--momentum",
        "0.8",
        "--sched",
        "step",
        "--decay-epochs",
        "1",
        "--decay-rate",
        "0.5",
    ]));
    let lrs: Vec<f64> = records(&run).iter().map(|r| r.lr).collect();
    assert_eq!(lrs.len(), 3);
    for (lr, expected) in lrs.iter().zip([0.01, 0.005, 0.0025]) {
        assert!((lr - expected).abs() < 1e-9, "{lrs:?}");
    }
    let moments =
        candle_core::safetensors::load(run.join("state/optimizer.safetensors"), &Device::Cpu)
            .unwrap();
    let names: Vec<&String> = moments.keys().collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.ends_with(".momentum_buffer")),
        "{names:?}"
    );
    let saved = fs::read_to_string(run.join("config.toml")).unwrap();
    for line in [
        "opt = \"momentum\"",
        "momentum = 0.8",
        "sched = \"step\"",
        "decay-rate = 0.5",
    ] {
        assert!(saved.contains(line), "{line}: {saved}");
    }
    let resume = |flags: [&str; 2]| {
        let mut cmd = vt_train();
        cmd.args(["train", "--resume", "--epochs", "4", "--run-dir"])
            .arg(&run)
            .args(flags);
        cmd
    };
    let err = run_err(&mut resume(["--opt", "adamw"]));
    assert!(
        err.contains("--opt cannot change on resume: the run has momentum, got adamw"),
        "{err}"
    );
    // Another schedule for the epochs left: the step schedule's settings are the run's no
    // more.
    run_ok(&mut resume(["--sched", "cosine"]));
    assert_eq!(records(&run).len(), 4);
    let saved = fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("sched = \"cosine\"") && !saved.contains("decay-"),
        "{saved}"
    );
}

#[test]
fn bf16_products_train_where_the_cpu_has_them_and_are_refused_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let out = train_tiny(&data, &run)
        .args(ONE_THREAD)
        .args(["--device", "cpu", "--epochs", "1", "--batch-size", "8"])
        .arg("--bf16-products")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    if !vt_model::kernels::bf16_products_available() {
        assert!(
            !out.status.success(),
            "bf16 products without AVX512-BF16:\n{log}"
        );
        assert!(log.contains("AVX512-BF16"), "{log}");
        return;
    }
    assert!(out.status.success(), "{log}");
    let saved: toml::Table = fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(saved["bf16-products"].as_bool(), Some(true));
    let records = records(&run);
    assert_eq!(records.len(), 1);
    assert!(records[0].train_loss.is_finite() && records[0].val_loss.is_finite());
}

#[test]
fn missing_data_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = vt_train()
        .args(["train", "--data"])
        .arg(tmp.path().join("nowhere"))
        .arg("--run-dir")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nowhere") && err.contains("fetch-data"),
        "{err}"
    );
    // An import without validation images says how to get some.
    let data = tmp.path().join("no-val");
    let synthetic = |train_per_class| {
        vt_data::fetch::FetchOptions::new(
            &data,
            vt_data::fetch::FetchSource::Synthetic(vt_data::source::synthetic::SyntheticConfig {
                train_per_class,
                test_per_class: 0,
                pred: 0,
                image_size: 16,
                seed: 1,
            }),
        )
    };
    let mut options = synthetic(2);
    options.val_fraction = 0.0;
    vt_data::fetch::fetch(&options).unwrap();
    let err = run_err(train_tiny(&data, &tmp.path().join("run")).args(ONE_THREAD));
    assert!(
        err.contains("val has no images") && err.contains("--val-fraction 0.1"),
        "{err}"
    );
    // A fraction that set none aside from classes this small (one image, which training
    // keeps) is not said to be 0.
    vt_data::fetch::fetch(&synthetic(1)).unwrap();
    let err = run_err(train_tiny(&data, &tmp.path().join("run")).args(ONE_THREAD));
    assert!(
        err.contains("val has no images")
            && err.contains("too few training images")
            && !err.contains("--val-fraction 0.1"),
        "{err}"
    );
    // A folder no import made has no fraction to blame.
    std::fs::remove_file(data.join("manifest.json")).unwrap();
    let err = run_err(train_tiny(&data, &tmp.path().join("run")).args(ONE_THREAD));
    assert!(
        err.contains("val has no images: put validation images in its CLASS/ folders"),
        "{err}"
    );

    // --data a level too high or too low, a Kaggle folder or an archive says where to look.
    let kaggle = tmp.path().join("kaggle");
    std::fs::create_dir_all(kaggle.join("seg_train/sea")).unwrap();
    let zip = tmp.path().join("archive.zip");
    std::fs::write(&zip, b"PK").unwrap();
    // An interrupted import's folder beside the data is no data set to point to.
    std::fs::create_dir_all(tmp.path().join(".data.incoming/train/sea")).unwrap();
    let fetch_from = "import it with `cargo xtask fetch-data --from";
    for (given, needle) in [
        (
            tmp.path().to_path_buf(),
            format!("give --data {}, which holds train/", data.display()),
        ),
        (
            data.join("train"),
            format!(
                "give --data {}, the folder that holds train/",
                data.display()
            ),
        ),
        (
            kaggle.clone(),
            format!(
                "{} is in the Kaggle layout (seg_train/); {fetch_from} {}`",
                kaggle.display(),
                kaggle.display()
            ),
        ),
        (
            kaggle.join("seg_train"),
            format!("{} is in the Kaggle layout", kaggle.display()),
        ),
        (
            zip.clone(),
            format!("{} is a file; {fetch_from}", zip.display()),
        ),
    ] {
        let err = run_err(train_tiny(&given, &tmp.path().join("run")).args(ONE_THREAD));
        assert!(
            err.contains(&needle),
            "{given:?}: expected `{needle}` in:\n{err}"
        );
    }
}

#[test]
fn init_still_writes_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("init");
    run_ok(
        vt_train()
            .args([
                "init",
                "--arch",
                "vt-resnet18",
                "--num-classes",
                "6",
                "--image-size",
                "64",
                "--tokens",
                "4",
            ])
            .args([
                "--token-channels",
                "32",
                "--heads",
                "2",
                "--class-names",
                "a,b,c,d,e,f",
                "--out",
            ])
            .arg(&out),
    );
    let model = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(model.config.class_names, vec!["a", "b", "c", "d", "e", "f"]);

    // A checkpoint is replaced only with --force; class names must be distinct.
    let init = |names: &str, force: bool| {
        let mut cmd = vt_train();
        cmd.args(["init", "--class-names", names, "--out"])
            .arg(&out)
            .args(TINY_MODEL);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let refused = init("x,y", false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("already holds a checkpoint") && err.contains("--force"),
        "{err}"
    );
    let model = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        model.config.class_names.len(),
        6,
        "the checkpoint was overwritten"
    );
    let twice = init("a,b,a", true);
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(
        !twice.status.success() && err.contains("`a` twice"),
        "{err}"
    );
    assert!(init("x,y", true).status.success());
    let model = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(model.config.class_names, vec!["x", "y"]);
    // An `init --force` killed between its two renames left the checkpoint at `.init.old`:
    // it is replaced only with --force, as it would be in place.
    let previous = tmp.path().join(".init.old");
    fs::rename(&out, &previous).unwrap();
    let refused = init("p,q", false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("where an interrupted write left it"),
        "{err}"
    );
    assert!(!out.exists());
    let model = Model::load(&previous, &Device::Cpu).unwrap();
    assert_eq!(model.config.class_names, vec!["x", "y"]);
    assert!(init("p,q", true).status.success());
    let model = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(model.config.class_names, vec!["p", "q"]);
    assert!(!previous.exists());

    // A folder of other files is never replaced, even with --force.
    let victim = tmp.path().join("victim");
    fs::create_dir_all(victim.join("sub")).unwrap();
    fs::write(victim.join("notes.txt"), "x").unwrap();
    for force in [false, true] {
        let mut cmd = vt_train();
        cmd.args(["init", "--num-classes", "3", "--out"])
            .arg(&victim)
            .args(TINY_MODEL);
        if force {
            cmd.arg("--force");
        }
        let refused = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && err.contains("not a checkpoint folder"),
            "{err}"
        );
        assert!(victim.join("notes.txt").is_file() && victim.join("sub").is_dir());
    }
}

/// `calibrate` writes the checkpoint's weights with the temperature fitted on the
/// validation split, which lowers that split's loss in `eval` and goes into `export`'s
/// metadata; `average` of calibrated checkpoints keeps none.
#[test]
fn calibrate_fits_a_temperature_that_eval_and_export_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", "1", "--batch-size", "8"]),
    );
    let best = run.join("best");
    let calibrated = tmp.path().join("calibrated");
    let out = run_ok(
        vt_train()
            .args(["calibrate", "--threads", "1", "--checkpoint"])
            .arg(&best)
            .arg("--out")
            .arg(&calibrated),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fitted on the val split"), "{text}");
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(calibrated.join("config.json")).unwrap()).unwrap();
    let temperature = config["temperature"].as_f64().unwrap();
    assert!(temperature > 0.0, "{config}");
    let (weights, same) = (checkpoint_tensors(&best), checkpoint_tensors(&calibrated));
    assert_eq!(weights.len(), same.len());
    for (name, tensor) in &weights {
        assert_eq!(max_abs_diff(tensor, &same[name]), 0.0, "{name}");
    }
    // The likelihood of the split it was fitted on is at least T = 1's.
    let val_loss = |checkpoint: &std::path::Path| -> f64 {
        let report = tmp.path().join("report.json");
        run_ok(
            vt_train()
                .args(["eval", "--threads", "1", "--split", "val", "--checkpoint"])
                .arg(checkpoint)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&report),
        );
        let report: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
        report["loss"].as_f64().unwrap()
    };
    let fitted: f64 = text
        .split("negative log-likelihood ")
        .nth(1)
        .and_then(|rest| rest.split(" -> ").nth(1))
        .and_then(|after| after.split(',').next())
        .and_then(|after| after.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    let (before, after) = (val_loss(&best), val_loss(&calibrated));
    assert!(
        (after - fitted).abs() < 1e-3,
        "eval {after}, calibrate {fitted}"
    );
    assert!(after <= before + 1e-6, "{after} > {before}");
    let onnx = tmp.path().join("calibrated.onnx");
    run_ok(
        vt_train()
            .args(["export", "--checkpoint"])
            .arg(&calibrated)
            .arg("--out")
            .arg(&onnx),
    );
    let model = <vt_model::onnx::proto::ModelProto as prost::Message>::decode(
        fs::read(&onnx).unwrap().as_slice(),
    )
    .unwrap();
    let exported = model
        .metadata_props
        .iter()
        .find(|e| e.key == "temperature")
        .map(|e| e.value.parse::<f64>().unwrap());
    assert_eq!(exported.map(|t| t as f32), Some(temperature as f32));
    // A calibration is written beside its checkpoint, never over it.
    let err = run_err(
        vt_train()
            .args(["calibrate", "--force", "--checkpoint"])
            .arg(&calibrated)
            .arg("--out")
            .arg(&calibrated),
    );
    assert!(err.contains("is the checkpoint calibrated"), "{err}");
    // A calibration belongs to one set of weights: an average has none.
    let average = tmp.path().join("avg");
    let out = run_ok(
        vt_train()
            .args(["average", "--out"])
            .arg(&average)
            .arg(&calibrated),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the average has no temperature"));
    let config = fs::read_to_string(average.join("config.json")).unwrap();
    assert!(!config.contains("temperature"), "{config}");
}

/// Scores eval cannot report are refused with their cause: logits that are not finite
/// (here f16's, whose range the head's bias leaves) name their image and the remedy; finite
/// logits so large that a true class's probability underflows (an infinite loss) say so.
#[test]
fn eval_names_what_makes_its_scores_unusable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let checkpoint = intel_init_checkpoint(tmp.path());
    let weights = checkpoint.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let bias: Vec<f32> = (0..6).map(|c| if c == 0 { 3e38 } else { -3e38 }).collect();
    tensors.insert(
        "head.bias".into(),
        candle_core::Tensor::new(bias, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let eval = |precision: &[&str]| {
        run_err(
            vt_train()
                .args(["eval", "--threads", "1", "--device", "cpu", "--checkpoint"])
                .arg(&checkpoint)
                .arg("--data")
                .arg(&data)
                .args(precision),
        )
    };
    let err = eval(&[]);
    assert!(
        err.contains("the loss on the test split is not finite although every logit is")
            && err.contains("3e38"),
        "{err}"
    );
    let err = eval(&["--dtype", "f16"]);
    assert!(
        err.contains(&format!(
            "the model's logits for {}",
            data.join("test").display()
        )) && err.contains("are not finite")
            && err.contains("evaluate with --dtype f32"),
        "{err}"
    );
}

/// `eval --dtype` and `--bf16-products` evaluate in vt-serve's precisions, each report
/// named for its own beside the f32 one.
#[test]
fn eval_runs_in_the_precisions_vt_serve_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let checkpoint = intel_init_checkpoint(tmp.path());
    let eval = |precision: &[&str]| {
        let mut cmd = vt_train();
        cmd.args(["eval", "--threads", "1", "--device", "cpu", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--data")
            .arg(&data)
            .args(precision);
        cmd
    };
    let report = |name: &str| -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(tmp.path().join(name)).unwrap()).unwrap()
    };
    run_ok(&mut eval(&[]));
    let full = report("eval-init-test.json");
    assert_eq!(
        (full["dtype"].as_str(), full["bf16_products"].as_bool()),
        (Some("f32"), Some(false))
    );
    let mut precisions = vec![(vec!["--dtype", "f16"], "eval-init-test-f16.json")];
    if vt_model::kernels::bf16_products_available() {
        precisions.push((vec!["--bf16-products"], "eval-init-test-bf16-products.json"));
    } else {
        let err = run_err(&mut eval(&["--bf16-products"]));
        assert!(err.contains("AVX512-BF16"), "{err}");
    }
    for (flags, name) in precisions {
        let out = run_ok(&mut eval(&flags));
        let reduced = report(name);
        let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
        // Rounded weights and products move the loss, a little.
        assert!(loss(&reduced) != loss(&full), "{flags:?}");
        assert!((loss(&reduced) - loss(&full)).abs() < 1e-2, "{flags:?}");
        assert!(tmp.path().join(name).with_extension("csv").is_file());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("on test in "), "{text}");
    }
    assert_eq!(
        report("eval-init-test-f16.json")["dtype"].as_str(),
        Some("f16")
    );
    let err = run_err(&mut eval(&["--dtype", "bf16"]));
    assert!(
        err.contains("bf16 tensors run on CUDA devices only"),
        "{err}"
    );
    let err = run_err(&mut eval(&["--dtype", "f16", "--bf16-products"]));
    assert!(err.contains("--dtype f16 has none"), "{err}");
}

#[test]
fn eval_checks_its_output_paths_before_evaluating() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let checkpoint = intel_init_checkpoint(tmp.path());
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(checkpoint.join(file), other.join(file)).unwrap();
    }
    let run = tmp.path().join("run");
    fs::create_dir_all(run.join("top")).unwrap();
    fs::write(run.join("config.toml"), "").unwrap();
    fs::write(run.join("metrics.jsonl"), "").unwrap();
    fs::write(run.join("metrics.csv"), "epoch,train_loss\n").unwrap();
    fs::create_dir_all(tmp.path().join("folder")).unwrap();
    fs::create_dir_all(tmp.path().join("plots.png")).unwrap();
    let eval = |out: &std::path::Path| {
        vt_train()
            .args(["eval", "--threads", "1", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    for (out, message) in [
        (tmp.path().join("missing/report.json"), "the folder"),
        // The confusion matrix would replace the report.
        (tmp.path().join("report.png"), ".png"),
        // So would the predictions, whatever the case of the extension.
        (
            tmp.path().join("report.csv"),
            "the per-image predictions are written beside it with a .csv",
        ),
        (tmp.path().join("report.CSV"), ".csv extension"),
        // The checkpoint folder holds the checkpoint only (its next save refuses others),
        // and so does any other: its config.json is no report.
        (checkpoint.join("report.json"), "checkpoint folder"),
        (other.join("config.json"), "checkpoint folder"),
        // A run's top/ holds its kept epochs only (a resume refuses others).
        (
            run.join("top/report.json"),
            "which its training run manages",
        ),
        // A folder, or a folder where the plots would go, is no report.
        (tmp.path().join("folder"), "is not a file"),
        (tmp.path().join("plots.json"), "is not a file"),
        // Files that no evaluation wrote stay: the run's table beside the report, or its
        // options as the report.
        (
            run.join("metrics.json"),
            "metrics.csv is there and this command did not write it",
        ),
        (
            run.join("config.toml"),
            "config.toml is there and this command did not write it",
        ),
        // The data, whose next read would take the plot for a photo.
        (data.join("val/sea/report.json"), "inside the data folder"),
    ] {
        let result = eval(&out);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{}: {err}", out.display());
        assert!(err.contains(message), "{err}");
        // Refused before the evaluation printed its report.
        assert!(result.stdout.is_empty(), "{err}");
    }
    let missing = tmp.path().join("missing");
    assert!(
        String::from_utf8_lossy(&eval(&missing.join("r.json")).stderr)
            .contains(&missing.display().to_string())
    );
    assert!(!tmp.path().join("report.png").exists());
    assert!(!tmp.path().join("report.csv").exists() && !tmp.path().join("report.CSV").exists());
    assert!(!tmp.path().join("folder.csv").exists() && !tmp.path().join("plots.csv").exists());
    assert_eq!(fs::read_dir(run.join("top")).unwrap().count(), 0);
    assert_eq!(fs::read_to_string(run.join("config.toml")).unwrap(), "");
    assert!(!data.join("val/sea/report.png").exists());
    assert_eq!(
        fs::read(other.join("config.json")).unwrap(),
        fs::read(checkpoint.join("config.json")).unwrap()
    );
    // `--checkpoint .` from inside the checkpoint: the default report goes beside it, and
    // a second evaluation replaces the first's files.
    let eval_here = || {
        run_ok(
            vt_train()
                .current_dir(&checkpoint)
                .args(["eval", "--threads", "1", "--checkpoint", ".", "--data"])
                .arg(&data),
        )
    };
    eval_here();
    // What a killed evaluation left: its temporary plot, and no report (it goes first).
    let killed_plot = tmp.path().join(".eval-init-test.png.tmp-999999.png");
    fs::write(&killed_plot, "half a plot").unwrap();
    fs::remove_file(tmp.path().join("eval-init-test.json")).unwrap();
    let out = eval_here();
    assert!(!killed_plot.exists());
    assert!(tmp.path().join("eval-init-test.json").is_file());
    assert!(tmp.path().join("eval-init-test.png").is_file());
    // The untrained model is wrong about most of the 24 images: the list stops at 10.
    let wrong = check_predictions(
        &tmp.path().join("eval-init-test.json"),
        &data,
        &String::from_utf8_lossy(&out.stdout),
    );
    assert!(wrong > 10, "{wrong} wrong");
}

/// A run folder whose checkpoint folders hold other files is refused before any epoch is
/// computed: saving would refuse them only after the epoch's work.
#[test]
fn stray_files_in_the_checkpoint_folders_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let epochs = |n: &str| {
        let mut cmd = train_tiny(&data, &run);
        cmd.args(["--batch-size", "8", "--threads", "1", "--epochs", n]);
        cmd
    };
    run_ok(&mut epochs("1"));
    std::fs::write(run.join("best/notes.txt"), "mine").unwrap();
    let result = epochs("2").arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(err.contains("notes.txt") && err.contains("best"), "{err}");
    assert_eq!(records(&run).len(), 1, "{err}");
    assert!(run.join("best/notes.txt").is_file());
}

/// Training does not start while fetch-data imports into its data folder (and holds the
/// folder's lock against imports while it trains).
#[test]
fn training_does_not_start_during_an_import() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let importing = vt_data::import::Importer::new(&data, "synthetic", "test", 0.1, 0).unwrap();
    let err = run_err(train_tiny(&data, &tmp.path().join("run")).args(ONE_THREAD));
    assert!(err.contains("fetch-data is importing into"), "{err}");
    assert!(!tmp.path().join("run").exists());
    drop(importing);
}

/// A run's checkpoint is not a run: resuming it is refused without leaving a lock file in
/// it, and no new run goes inside it or another run's folders.
#[test]
fn runs_are_not_made_in_checkpoints_or_a_runs_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let train = |run_dir: &std::path::Path| {
        let mut cmd = train_tiny(&data, run_dir);
        cmd.args(["--batch-size", "8", "--threads", "1"]);
        cmd
    };
    run_ok(train(&run).args(["--epochs", "1"]));
    let best = run.join("best");
    let err = run_err(train(&best).arg("--resume"));
    assert!(
        err.contains("is a checkpoint folder, not a training run")
            && err.contains(&format!(
                "its run is {}",
                run.canonicalize().unwrap().display()
            )),
        "{err}"
    );
    assert!(!best.join(vt_train::train::LOCK_FILE).exists());
    // A file put beside the checkpoint (notes) leaves it a checkpoint.
    fs::write(best.join("README.md"), "mine").unwrap();
    let err = run_err(train(&best).arg("--resume"));
    assert!(
        err.contains("is a checkpoint folder, not a training run"),
        "{err}"
    );
    fs::remove_file(best.join("README.md")).unwrap();
    // A run is one even with a config.json put in it (here, complete: nothing to train).
    fs::write(run.join("config.json"), "{}").unwrap();
    let out = run_ok(train(&run).args(["--resume", "--epochs", "1"]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("has completed its 1 epoch ("), "{log}");
    fs::remove_file(run.join("config.json")).unwrap();
    let file = tmp.path().join("notes.toml");
    fs::write(&file, "").unwrap();
    for run_dir in [file.clone(), file.join("run")] {
        let err = run_err(&mut train(&run_dir));
        let named = format!("{} is a file, not a folder", file.display());
        assert!(err.contains(&named), "{err}");
    }
    // Nor in the data, which the next fetch-data replaces whole.
    for run_dir in [data.join("runs/a"), data.join("train/run")] {
        let err = run_err(&mut train(&run_dir));
        assert!(err.contains("inside the data folder"), "{err}");
        assert!(!run_dir.exists());
    }
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = run_err(train(&empty).arg("--resume"));
    assert!(err.contains("nothing to resume"), "{err}");
    assert!(!empty.join(vt_train::train::LOCK_FILE).exists());
    // Nor is a user's options file a run to resume.
    let options = "# mine\nepochs = 1\n";
    fs::write(empty.join("config.toml"), options).unwrap();
    let err = run_err(train(&empty).arg("--resume"));
    assert!(
        err.contains("an options file is given with --config"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(empty.join("config.toml")).unwrap(),
        options
    );
    for inside in [
        best.clone(),
        best.join("nested"),
        best.join("nested/deeper"),
        run.join("state/nested"),
        run.join("state/nested/deeper"),
        run.join("top/nested"),
    ] {
        let err = run_err(&mut train(&inside));
        assert!(
            err.contains("is a checkpoint or a training run's folder"),
            "{}: {err}",
            inside.display()
        );
    }
    for made in ["best/nested", "state/nested", "top"] {
        assert!(!run.join(made).exists(), "{made}");
    }
    // The run itself still resumes, with its config.toml as edited by hand, which it says.
    let toml = fs::read_to_string(run.join("config.toml")).unwrap();
    let edited: String = toml
        .lines()
        .filter(|line| !line.starts_with("lr ="))
        .map(|line| format!("{line}\n"))
        .chain(["lr = 0.000123\n".to_string()])
        .collect();
    fs::write(run.join("config.toml"), edited).unwrap();
    let out = run_ok(train(&run).args(["--resume", "--epochs", "2"]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("differs from the state of epoch 1: lr"),
        "{log}"
    );
    assert_eq!(records(&run).len(), 2);
    // A model folder further up, or a user's own options file beside a folder named like
    // a run's, is no reason to refuse.
    let model = tmp.path().join("model");
    fs::create_dir(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(best.join(file), model.join(file)).unwrap();
    }
    fs::write(model.join("config.toml"), "epochs = 1\n").unwrap();
    for allowed in [model.join("runs/a"), model.join("best")] {
        run_ok(train(&allowed).args(["--epochs", "1"]));
    }
}

/// Without a manifest each split's folder names are its classes: the validation split must
/// have the training split's, and every training class needs images.
#[test]
fn splits_with_other_classes_or_an_empty_class_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // An import's manifest names the classes: a validation folder removed leaves its class
    // unmeasured, which training says.
    let imported = synthetic_data(&tmp.path().join("imported"), 4);
    fs::remove_dir_all(imported.join("val/buildings")).unwrap();
    let out = run_ok(
        train_tiny(&imported, &tmp.path().join("imported-run"))
            .args(ONE_THREAD)
            .args(["--epochs", "1"]),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("the validation images hold none of class(es) buildings:"),
        "{log}"
    );

    let data = synthetic_data(tmp.path(), 4);
    fs::remove_file(data.join("manifest.json")).unwrap();
    let run = tmp.path().join("run");
    let train = || {
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", "1"])
            .output()
            .unwrap()
    };
    fs::remove_dir_all(data.join("val/buildings")).unwrap();
    let out = train();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(r#"["forest", "glacier", "mountain", "sea", "street"]"#)
            && err.contains(r#"["buildings", "forest", "#),
        "{err}"
    );
    fs::create_dir(data.join("val/buildings")).unwrap();
    let forest = data.join("train/forest");
    fs::remove_dir_all(&forest).unwrap();
    fs::create_dir(&forest).unwrap();
    let out = train();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{} has no images", forest.display())),
        "{err}"
    );
    assert!(!run.exists(), "a refused run left its folder");
}

#[test]
fn a_run_folder_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    fs::create_dir(&run).unwrap();
    let lock = fs::File::create(run.join(vt_train::train::LOCK_FILE)).unwrap();
    lock.try_lock().unwrap();
    fs::write(run.join("config.toml"), "epochs = 1\n").unwrap();
    for resume in [false, true] {
        let mut cmd = train_tiny(&data, &run);
        cmd.args(ONE_THREAD).args(["--epochs", "1"]);
        if resume {
            cmd.arg("--resume");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "resume {resume}: {err}");
        assert!(err.contains("in use by another vt-train process"), "{err}");
    }
    assert!(!run.join("metrics.jsonl").exists());
}

#[test]
fn a_frozen_stem_keeps_its_initial_weights_while_the_rest_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let seed = ["--seed", "9"];
    run_ok(train_tiny(&data, &run).args(seed).args([
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--epochs",
        "1",
        "--freeze-stem-epochs",
        "1",
    ]));
    assert!(records(&run)[0].stem_frozen);
    // `init` with the same seed writes the weights the run started from.
    let init = tmp.path().join("init");
    let classes = "buildings,forest,glacier,mountain,sea,street";
    run_ok(
        vt_train()
            .args(["init", "--class-names", classes, "--out"])
            .arg(&init)
            .args(TINY_MODEL)
            .args(seed),
    );
    let (start, trained) = (
        checkpoint_tensors(&init),
        checkpoint_tensors(&run.join("last")),
    );
    let same = |name: &str| max_abs_diff(&start[name], &trained[name]) == 0.0;
    for name in [
        "conv1.weight",
        "bn1.weight",
        "layer3.1.conv2.weight",
        "layer2.0.downsample.1.bias",
    ] {
        assert!(same(name), "{name} changed while frozen");
    }
    for name in [
        "head.weight",
        "vt.0.tokenizer.attn.weight",
        "vt.1.transformer.ffn2.bias",
    ] {
        assert!(!same(name), "{name} did not train");
    }
    // The frozen stem runs in evaluation mode, as timm freezes a backbone: its BatchNorm
    // layers normalise with their running statistics and keep them.
    for name in [
        "bn1.running_mean",
        "bn1.running_var",
        "layer3.1.bn2.running_var",
    ] {
        assert!(same(name), "{name} changed while frozen");
    }
}

/// The same seed and thread count repeat a run exactly: every metric and every weight. With
/// two compute threads the kernels split their sums between threads, and no split may
/// depend on timing (the convolution's own test catches the split that did; a model this
/// small rarely showed it).
#[test]
fn a_run_repeats_exactly_with_the_same_seed_and_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 8);
    let train = |name: &str| {
        let run = tmp.path().join(name);
        run_ok(
            train_tiny(&data, &run)
                .args(["--threads", "2", "--loader-threads", "2"])
                .args(["--batch-size", "16", "--epochs", "2", "--seed", "3"]),
        );
        run
    };
    let (first, second) = (train("first"), train("second"));
    let losses = |run: &std::path::Path| -> Vec<(f64, f64)> {
        records(run)
            .iter()
            .map(|r| (r.train_loss, r.val_loss))
            .collect()
    };
    assert_eq!(losses(&first), losses(&second));
    let (a, b) = (
        checkpoint_tensors(&first.join("last")),
        checkpoint_tensors(&second.join("last")),
    );
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values(tensor) == values(&b[name]), "{name} differs");
    }
}

/// `--initial-checkpoint` starts a new run from a checkpoint's weights, head included when
/// the classes are the data's; it excludes `--pretrained` and cannot change on resume.
#[test]
fn a_run_starts_from_an_initial_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let init = tmp.path().join("init");
    run_ok(
        vt_train()
            .args(["init", "--seed", "7", "--out"])
            .arg(&init)
            .args([
                "--class-names",
                "buildings,forest,glacier,mountain,sea,street",
            ])
            .args(TINY_MODEL),
    );
    let run = tmp.path().join("run");
    // A rate so small that the weights stay where they started.
    let out = run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--epochs", "1", "--batch-size", "8", "--lr", "1e-12"])
            .args(["--warmup-epochs", "0", "--initial-checkpoint"])
            .arg(&init),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("starting from the weights of"), "{log}");
    let (start, trained) = (
        checkpoint_tensors(&init),
        checkpoint_tensors(&run.join("last")),
    );
    for name in ["conv1.weight", "vt.1.transformer.ffn2.bias", "head.weight"] {
        let diff = max_abs_diff(&start[name], &trained[name]);
        assert!(
            diff < 1e-6,
            "{name} moved by {diff} from the initial checkpoint"
        );
    }

    let err = run_err(
        train_tiny(&data, &tmp.path().join("both"))
            .args(["--pretrained", "stem.safetensors", "--initial-checkpoint"])
            .arg(&init),
    );
    assert!(err.contains("choose one"), "{err}");
    let err = run_err(
        train_tiny(&data, &run)
            .args(["--resume", "--epochs", "2", "--initial-checkpoint"])
            .arg(tmp.path()),
    );
    assert!(
        err.contains("--initial-checkpoint only applies to a new run"),
        "{err}"
    );
    // The run's own initial checkpoint, by another path, is no change.
    let same = init.join("..").join(init.file_name().unwrap());
    let options = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let out = run_ok(
        train_tiny(&data, &run)
            .args(ONE_THREAD)
            .args(["--resume", "--epochs", "2", "--initial-checkpoint"])
            .arg(&same),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("initial_checkpoint"), "{log}");
    let resumed = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert_eq!(resumed.replace("epochs = 2", "epochs = 1"), options);
}

/// `--mixup-alpha` and `--cutmix-alpha` change what a run trains on, are saved with the run,
/// and refuse negative values.
#[test]
fn mixup_and_cutmix_train_on_mixed_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let train = |name: &str, mixing: &[&str]| {
        let run = tmp.path().join(name);
        run_ok(
            train_tiny(&data, &run)
                .args(ONE_THREAD)
                .args(["--epochs", "1", "--batch-size", "8"])
                .args(mixing),
        );
        run
    };
    let plain = train("plain", &[]);
    let mixed = train("mixed", &["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]);
    let config = fs::read_to_string(mixed.join("config.toml")).unwrap();
    assert!(
        config.contains("mixup-alpha = 0.2") && config.contains("cutmix-alpha = 1.0"),
        "{config}"
    );
    let (plain, mixed) = (&records(&plain)[0], &records(&mixed)[0]);
    assert!(mixed.train_loss.is_finite() && mixed.val_loss.is_finite());
    assert_ne!(plain.train_loss, mixed.train_loss);

    let err = run_err(train_tiny(&data, &tmp.path().join("negative")).arg("--mixup-alpha=-1"));
    assert!(err.contains("--mixup-alpha must be >= 0"), "{err}");
}

#[test]
fn augmentation_options_change_the_training_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let train = |name: &str, augmentation: &[&str]| {
        let run = tmp.path().join(name);
        run_ok(
            train_tiny(&data, &run)
                .args(ONE_THREAD)
                .args(["--epochs", "1", "--batch-size", "8"])
                .args(augmentation),
        );
        run
    };
    let plain = train("plain", &[]);
    let augmented = train("augmented", &["--trivial-augment", "--random-erase", "0.5"]);
    let config = fs::read_to_string(augmented.join("config.toml")).unwrap();
    assert!(
        config.contains("trivial-augment = true") && config.contains("random-erase = 0.5"),
        "{config}"
    );
    // timm's names for the crop, flip and colour jitter.
    let timm = train(
        "timm",
        &[
            "--scale",
            "0.5",
            "1",
            "--ratio",
            "0.5",
            "2",
            "--rotation",
            "10",
            "--hflip",
            "0",
            "--color-jitter",
            "0.4",
        ],
    );
    let config = fs::read_to_string(timm.join("config.toml")).unwrap();
    for line in [
        "scale = [0.5, 1.0]",
        "ratio = [0.5, 2.0]",
        "rotation = 10.0",
        "hflip = 0.0",
        "color-jitter = 0.4",
    ] {
        assert!(config.contains(line), "{line} in {config}");
    }
    // Stochastic depth: drawn from the seed, so that a second run repeats the first.
    let drop_path = train("drop-path", &["--drop-path", "0.3"]);
    let again = train("drop-path-again", &["--drop-path", "0.3"]);
    let config = fs::read_to_string(drop_path.join("config.toml")).unwrap();
    assert!(config.contains("drop-path = 0.3"), "{config}");
    let (drop_path, again) = (&records(&drop_path)[0], &records(&again)[0]);
    assert_eq!(drop_path.train_loss, again.train_loss);
    assert_eq!(drop_path.val_loss, again.val_loss);
    let (plain, augmented, timm) = (
        &records(&plain)[0],
        &records(&augmented)[0],
        &records(&timm)[0],
    );
    assert!(augmented.train_loss.is_finite() && augmented.val_loss.is_finite());
    assert_ne!(plain.train_loss, augmented.train_loss);
    assert!(timm.train_loss.is_finite());
    assert_ne!(plain.train_loss, timm.train_loss);
    assert!(drop_path.train_loss.is_finite());
    assert_ne!(plain.train_loss, drop_path.train_loss);

    let err = run_err(train_tiny(&data, &tmp.path().join("p")).args(["--random-erase", "2"]));
    assert!(
        err.contains("--random-erase must be a probability"),
        "{err}"
    );
    let err = run_err(train_tiny(&data, &tmp.path().join("s")).args(["--scale", "0.9", "0.1"]));
    assert!(err.contains("--scale takes two numbers MIN MAX"), "{err}");
    let err = run_err(train_tiny(&data, &tmp.path().join("d")).args(["--drop-path", "1"]));
    assert!(err.contains("--drop-path must be in [0, 1)"), "{err}");
}

/// `vt-train lr-find` on the tiny model: refuses a report not named .json and the options it
/// does not use before any work, then sweeps the rate through more than one epoch of
/// batches and writes its report and plot in the current folder, and no run folder.
#[test]
fn lr_find_sweeps_the_rate_and_writes_its_report_but_no_run() {
    let tmp = tempfile::tempdir().unwrap();
    // 36 training images: 4 batches of 8 per epoch, fewer than the steps.
    let data = synthetic_data(tmp.path(), 8);
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    let lr_find = || {
        let mut cmd = vt_train();
        cmd.current_dir(&work)
            .args(["lr-find", "--batch-size", "8", "--data"])
            .arg(&data)
            .args(TINY_MODEL)
            .args(ONE_THREAD);
        cmd
    };
    let err = run_err(lr_find().args(["--out", "sweep.png"]));
    assert!(
        err.contains("--out sweep.png") && err.contains("FILE.json"),
        "{err}"
    );
    let err = run_err(lr_find().args(["--lr", "0.1", "--run-dir", "runs/x"]));
    assert!(
        err.contains("lr-find does not use --lr, --run-dir"),
        "{err}"
    );
    let err = run_err(lr_find().args(["--sched", "step"]));
    assert!(err.contains("lr-find does not use --sched"), "{err}");
    assert!(err.contains("leave it out"), "{err}");
    assert_eq!(fs::read_dir(&work).unwrap().count(), 0);
    // A file's schedule settings are not used, so not checked against each other either.
    let options = tmp.path().join("options.toml");
    fs::write(&options, "sched = \"cosine\"\ndecay-epochs = 7\n").unwrap();
    let report = tmp.path().join("options-sweep.json");
    run_ok(
        lr_find()
            .args(["--steps", "2", "--config"])
            .arg(&options)
            .arg("--out")
            .arg(&report),
    );
    assert!(report.is_file());

    let (start, end, steps) = (1e-7, 10.0, 12);
    let out = run_ok(lr_find().args(["--steps", "12"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(work.join("lr-find.json")).unwrap()).unwrap();
    let points = report["points"].as_array().unwrap();
    let run = report["steps_run"].as_u64().unwrap() as usize;
    assert_eq!(points.len(), run);
    assert!(run > 4 && run <= steps, "{run} steps: {text}");
    match report["ended"].as_str().unwrap() {
        "completed" => assert_eq!(run, steps),
        "diverged" => {
            let step = points[run - 1]["step"].as_u64().unwrap();
            assert!(
                text.contains(&format!("diverged at step {step} (")),
                "{text}"
            );
        }
        ended => panic!("ended {ended}"),
    }
    let lrs: Vec<f64> = points.iter().map(|p| p["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs[0], start);
    assert!(lrs.windows(2).all(|w| w[1] > w[0]), "{lrs:?}");
    // Every smoothed loss is finite but a diverged last step's, which may not be.
    let before_last = &points[..run - 1];
    assert!(
        before_last.iter().all(|p| p["smoothed_loss"].is_number()),
        "{points:?}"
    );
    let suggested = report["suggested_lr"].as_f64().unwrap();
    assert!((start..=end).contains(&suggested), "{suggested}");
    assert_eq!(report["suggestion"]["steepest"].as_f64(), Some(suggested));
    assert!(
        text.contains(&format!("train with --lr {suggested:.1e}")),
        "{text}"
    );
    assert_eq!(report["config"]["batch-size"], 8);
    assert!(report["config"].get("lr").is_none());
    assert!(is_png(&work.join("lr-find.png")));
    // The report and its plot, nothing else: no run folder, no temporaries.
    let mut written: Vec<String> = fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["lr-find.json", "lr-find.png"]);
    // A user's picture where the plot would go stays; so does the data.
    fs::write(work.join("mine.png"), "a picture").unwrap();
    let err = run_err(lr_find().args(["--out", "mine.json"]));
    assert!(
        err.contains("mine.png is there and this command did not write it"),
        "{err}"
    );
    let err = run_err(lr_find().arg("--out").arg(data.join("sweep.json")));
    assert!(err.contains("inside the data folder"), "{err}");
    assert!(!data.join("sweep.json").exists());
}

#[test]
fn explain_draws_each_modules_token_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = tmp.path().join("init");
    run_ok(
        vt_train()
            .args(["init", "--class-names", "forest,sea,street", "--out"])
            .arg(&checkpoint)
            .args(TINY_MODEL),
    );
    // Two images of one name in two folders, and a file that is no image.
    let photo = image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 90]));
    for folder in ["a", "b"] {
        fs::create_dir(tmp.path().join(folder)).unwrap();
    }
    let (png, jpeg) = (
        tmp.path().join("a/photo.png"),
        tmp.path().join("b/photo.jpg"),
    );
    photo.save(&png).unwrap();
    photo.save(&jpeg).unwrap();
    let broken = tmp.path().join("notes.jpg");
    fs::write(&broken, b"not an image").unwrap();
    let out = tmp.path().join("explain");
    // Not into the checkpoint folder, which holds only its checkpoint.
    let refused = run_err(
        vt_train()
            .args(["explain", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(checkpoint.join("pictures"))
            .arg(&png),
    );
    assert!(
        refused.contains("inside the checkpoint folder"),
        "{refused}"
    );
    assert!(!checkpoint.join("pictures").exists());

    let mut cmd = vt_train();
    cmd.args(["explain", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&out)
        .args([&png, &broken, &jpeg]);
    let output = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        !output.status.success(),
        "a broken image fails the run: {stdout}"
    );
    assert!(stderr.contains("notes.jpg"), "{stderr}");
    assert!(stderr.contains("1 of 3 images"), "{stderr}");
    // Each picture: the model's view, then one row of 4 tokens for each of the 2 modules
    // (the grids at least 640 px wide, for their labels).
    for name in ["photo.explain.png", "photo-2.explain.png"] {
        let path = out.join(name);
        assert!(stdout.contains(&path.display().to_string()), "{stdout}");
        assert!(is_png(&path), "{}", path.display());
        assert_eq!(image::image_dimensions(&path).unwrap(), (886, 294));
    }
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    for line in stdout.lines() {
        assert_eq!(line.matches('%').count(), 3, "the 3 best classes: {line}");
    }

    // Folders: their image files in path order, other files left out; one without any is
    // refused by name.
    fs::write(tmp.path().join("a/readme.txt"), "not an image").unwrap();
    let from_folders = tmp.path().join("from-folders");
    let out = run_ok(
        vt_train()
            .args(["explain", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(&from_folders)
            .arg(tmp.path().join("b"))
            .arg(tmp.path().join("a")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let explained: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(
        explained,
        [jpeg.display().to_string(), png.display().to_string()],
        "{stdout}"
    );
    assert!(is_png(&from_folders.join("photo-2.explain.png")));
    // Pictures written inside a folder given are not photos to explain the next time; an
    // --out above the folders given leaves their images in.
    let above = run_ok(
        vt_train()
            .args(["explain", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(tmp.path())
            .arg(tmp.path().join("a")),
    );
    assert_eq!(String::from_utf8_lossy(&above.stdout).lines().count(), 1);
    let inside = tmp.path().join("a/explain");
    for _ in 0..2 {
        let out = run_ok(
            vt_train()
                .args(["explain", "--checkpoint"])
                .arg(&checkpoint)
                .arg("--out")
                .arg(&inside)
                .arg(tmp.path().join("a")),
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    }
    assert_eq!(fs::read_dir(&inside).unwrap().count(), 1);
    // A folder without images is refused before any output folder is made.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = run_err(
        vt_train()
            .args(["explain", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(tmp.path().join("never"))
            .arg(&empty),
    );
    assert!(
        err.contains(&format!("{} holds no image file", empty.display())),
        "{err}"
    );
    assert!(!tmp.path().join("never").exists());
}

/// `--early-stop N` stops N epochs after validation accuracy last rose: an epoch of the same
/// accuracy and a lower loss is a new `best/`, but no improvement of the accuracy.
#[test]
fn early_stop_counts_the_epochs_since_validation_accuracy_rose() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 4);
    let run = tmp.path().join("run");
    let (epochs, patience) = (8, 2);
    let out = run_ok(train_tiny(&data, &run).args(ONE_THREAD).args([
        "--batch-size",
        "4",
        "--epochs",
        &epochs.to_string(),
        "--early-stop",
        &patience.to_string(),
    ]));
    let records = records(&run);
    let (mut best_acc, mut since, mut tied_best, mut stop) = (f64::NEG_INFINITY, 0, false, None);
    for r in &records {
        if r.val_acc > best_acc {
            best_acc = r.val_acc;
            since = 0;
        } else {
            since += 1;
            tied_best |= r.best;
        }
        if since >= patience {
            stop = Some(r.epoch);
            break;
        }
    }
    assert!(
        tied_best,
        "no epoch tied the best accuracy with a lower loss, which this test is about: {records:#?}"
    );
    assert_eq!(records.len(), stop.unwrap_or(epochs), "{records:#?}");
    let text = std::fs::read_to_string(run.join("state/training.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(state["stopped_early"], stop.is_some());
    // The epoch of the best accuracy is named, not the later best/ that tied it.
    if let Some(stop) = stop {
        let log = String::from_utf8_lossy(&out.stderr);
        let since = format!(
            "not improved for {patience} epochs, since epoch {}",
            stop - patience
        );
        assert!(log.contains(&since), "{log}");
        // A resume says how to go on.
        let out = run_ok(
            vt_train()
                .args(["train", "--resume", "--epochs", "12", "--run-dir"])
                .arg(&run),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains("nothing to do (a larger --early-stop, or --early-stop 0, continues it)"),
            "{log}"
        );
    }
}
