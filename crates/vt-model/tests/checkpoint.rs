//! Checkpoint folders: round trips, strict loading of every bad case, atomic writes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{relative_error, set_formula_weights, tiny_config};
use vt_model::checkpoint::{
    recover_interrupted_write, refuse_non_checkpoint, write_dir_atomically, CONFIG_FILE,
    WEIGHTS_FILE,
};
use vt_model::{Arch, Model, ModelError, StartedFrom, VtConfig};

fn saved_model(dir: &Path) -> Model {
    let model = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&model);
    model.save(dir).unwrap();
    model
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap()
}

fn write_weights(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE)).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_keeps_every_tensor_and_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = saved_model(&dir);
    let names: Vec<String> = weights(&dir).into_keys().collect();
    assert!(names.contains(&"layer1.0.bn1.running_var".to_string()));
    assert!(names.contains(&"vt.1.tokenizer.recur.weight".to_string()));
    assert!(
        !names.iter().any(|n| n.starts_with("vt.1.projector")),
        "last module has no projector"
    );
    assert!(!names.iter().any(|n| n.contains("num_batches_tracked")));

    let loaded = Model::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, model.config);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let a = model.forward_t(&x, false).unwrap();
    let b = loaded.forward_t(&x, false).unwrap();
    assert_eq!(relative_error(&b, &a), 0.0);
}

/// A path with nothing at it, or a training run's folder given for one of its checkpoints,
/// is named for what it is rather than by the missing config.json.
#[test]
fn a_missing_folder_or_a_run_folder_is_named_for_what_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    assert_eq!(
        load_err(&missing),
        format!("no checkpoint folder at {}", missing.display())
    );
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("config.toml"), "epochs = 2\n").unwrap();
    // An options file alone may be a user's own: the missing config.json is what is named.
    assert!(load_err(&run).contains("config.json"), "{}", load_err(&run));
    // A run holds its lock from its start.
    std::fs::write(run.join(".lock"), "").unwrap();
    let err = load_err(&run);
    assert_eq!(
        err,
        format!(
            "{} is a training run's folder, not a checkpoint: give one of its checkpoints, \
             {} or {}, once its first epoch has ended",
            run.display(),
            run.join("best").display(),
            run.join("last").display()
        )
    );
    saved_model(&run.join("best"));
    saved_model(&run.join("last"));
    let err = load_err(&run);
    assert!(
        err.ends_with(&format!(
            "give one of its checkpoints, {} or {}",
            run.join("best").display(),
            run.join("last").display()
        )),
        "{err}"
    );
    // A config.json put in the run does not make it a checkpoint.
    std::fs::write(run.join("config.json"), "{}").unwrap();
    assert!(
        load_err(&run).contains("is a training run's folder, not a checkpoint"),
        "{}",
        load_err(&run)
    );
    std::fs::remove_file(run.join("config.json")).unwrap();
    // Its checkpoints load.
    Model::load(&run.join("best"), &Device::Cpu).unwrap();
    // One a save stopped short of, beside the run's state, is written by a resume.
    saved_model(&run.join("state"));
    std::fs::remove_dir_all(run.join("last")).unwrap();
    assert_eq!(
        load_err(&run.join("last")),
        format!(
            "no checkpoint folder at {}: the run's last save stopped before writing it, or it \
             was removed; `vt-train train --resume --run-dir {}` writes it from the run's \
             state where that holds its epoch",
            run.join("last").display(),
            run.display()
        )
    );
    saved_model(&run.join("last"));
    // A checkpoint's file, and a folder of checkpoints that is not a run.
    let weights = run.join("best/model.safetensors");
    assert!(
        load_err(&weights).ends_with(
            "is a file: a checkpoint is the folder that holds \
             config.json and model.safetensors"
        ),
        "{}",
        load_err(&weights)
    );
    // A user's folder of checkpoints, one of them named best, is not a run: all are named.
    let many = tmp.path().join("many");
    saved_model(&many.join("best"));
    saved_model(&many.join("b"));
    // A writer's hidden temporary is not a checkpoint to offer.
    saved_model(&many.join(".c.tmp-99"));
    assert_eq!(
        load_err(&many),
        format!(
            "{} holds checkpoints, not one: give one of them ({}, {})",
            many.display(),
            many.join("b").display(),
            many.join("best").display()
        )
    );
}

/// A frozen model (as vt-serve loads one) computes what the trainable one does, call after
/// call, and a training-mode pass, which moves the batch norms' running statistics, is not
/// hidden by what the frozen layers keep between calls.
#[test]
fn a_frozen_model_agrees_and_notices_moved_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = saved_model(&dir);
    let frozen = Model::load(&dir, &Device::Cpu)
        .unwrap()
        .into_frozen()
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let expected = model.forward_t(&x, false).unwrap();
    for call in ["first", "second"] {
        let logits = frozen.forward_t(&x, false).unwrap();
        assert!(relative_error(&logits, &expected) < 1e-6, "{call} call");
    }
    frozen.forward_t(&x, true).unwrap();
    let moved = frozen.forward_t(&x, false).unwrap();
    let err = relative_error(&moved, &expected);
    assert!(
        err > 1e-3,
        "the running statistics moved, the logits did not ({err:e})"
    );
}

#[test]
fn loading_at_half_precision_converts_the_weights_and_refuses_to_save() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = saved_model(&dir);
    // f16 runs everywhere (bf16 needs CUDA) and takes the same non-f32 path: candle's own
    // operations instead of the f32 CPU kernels.
    let half = Model::load_as(&dir, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(half.dtype, DType::F16);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let full = model.forward_t(&x, false).unwrap();
    let halved = half
        .forward_t(&x.to_dtype(DType::F16).unwrap(), false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let err = relative_error(&halved, &full);
    assert!(err < 2e-2, "f16 logits differ by {err}");
    let refused = half.save(&tmp.path().join("half")).unwrap_err().to_string();
    assert!(refused.contains("checkpoints are f32"), "{refused}");
    assert!(!tmp.path().join("half").exists());
}

#[test]
fn num_batches_tracked_is_ignored_whatever_its_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let mut tensors = weights(&dir);
    tensors.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[7i64], &Device::Cpu).unwrap(),
    );
    write_weights(&dir, &tensors);
    Model::load(&dir, &Device::Cpu).unwrap();
}

#[test]
fn missing_unexpected_misshaped_and_wrong_dtype_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let good = weights(&dir);

    let mut missing = good.clone();
    missing.remove("vt.0.transformer.key.weight");
    write_weights(&dir, &missing);
    let err = load_err(&dir);
    assert!(
        err.contains("`vt.0.transformer.key.weight` is missing"),
        "{err}"
    );

    let mut unexpected = good.clone();
    unexpected.insert(
        "layer4.0.conv1.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(&dir, &unexpected);
    let err = load_err(&dir);
    assert!(
        err.contains("unexpected tensor `layer4.0.conv1.weight`"),
        "{err}"
    );

    let mut misshaped = good.clone();
    misshaped.insert(
        "head.bias".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(&dir, &misshaped);
    let err = load_err(&dir);
    assert!(
        err.contains("`head.bias` has shape [4], expected [3]"),
        "{err}"
    );

    let mut wrong_dtype = good.clone();
    let f16 = good["head.weight"].to_dtype(DType::F16).unwrap();
    wrong_dtype.insert("head.weight".into(), f16);
    write_weights(&dir, &wrong_dtype);
    let err = load_err(&dir);
    assert!(err.contains("`head.weight` has dtype F16"), "{err}");
}

/// A saved model in `root/ckpt`, its config's path and the config as JSON.
fn saved_with_config(root: &Path) -> (PathBuf, PathBuf, serde_json::Value) {
    let dir = root.join("ckpt");
    saved_model(&dir);
    let config_path = dir.join(CONFIG_FILE);
    let config = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    (dir, config_path, config)
}

#[test]
fn inconsistent_or_broken_configs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, config_path, good) = saved_with_config(tmp.path());

    let cases = [
        ("vt_modules", serde_json::json!(3), "vt_modules is 3"),
        ("heads", serde_json::json!(5), "divisible"),
        (
            "num_classes",
            serde_json::json!(4),
            "class_names has 3 entries",
        ),
        ("arch", serde_json::json!("vt-resnet50"), "unknown variant"),
        (
            "class_names",
            serde_json::json!(["cat", "dog", "cat"]),
            "`cat` twice",
        ),
        (
            "class_names",
            serde_json::json!(["cat", "", "dog"]),
            "class_names[1] is empty",
        ),
    ];
    for (key, value, needle) in cases {
        let mut config = good.clone();
        config[key] = value;
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = load_err(&dir);
        assert!(err.contains(needle), "{key}: {err}");
    }
    // Every key the contract lists is required: none falls back to a default.
    for key in ["variant", "mean", "class_names"] {
        let mut config = good.clone();
        config.as_object_mut().unwrap().remove(key);
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = load_err(&dir);
        assert!(err.contains(&format!("missing field `{key}`")), "{err}");
    }
    // A config that is valid but disagrees with the weights names the first tensor at fault.
    let mut config = good.clone();
    config["token_channels"] = serde_json::json!(64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("has shape"), "{err}");

    std::fs::write(&config_path, "{ not json").unwrap();
    assert!(load_err(&dir).contains("invalid JSON"));
    std::fs::remove_file(&config_path).unwrap();
    assert!(load_err(&dir).contains(CONFIG_FILE));
    std::fs::write(&config_path, good.to_string()).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), b"garbage").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors file"));
}

/// A weights file whose header's numbers disagree with each other or with the file is
/// refused naming what is wrong: the tensor whose offsets do not span its shape, the cut
/// one, the bytes after the last tensor (the safetensors crate names none of them).
#[test]
fn damaged_weights_files_name_their_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let path = dir.join(WEIGHTS_FILE);
    let good = std::fs::read(&path).unwrap();
    let length = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&good[8..8 + length]).unwrap();
    // The tensor whose data comes last, which a cut falls in.
    let last = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .max_by_key(|(_, entry)| entry["data_offsets"][1].as_u64())
        .map(|(name, _)| name.clone())
        .unwrap();
    let offsets = &mut header["head.bias"]["data_offsets"];
    let begin = offsets[0].as_u64().unwrap();
    offsets[1] = serde_json::json!(begin + 4);
    let header = header.to_string().into_bytes();
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend(&header);
    lying.extend(&good[8 + length..]);
    let data = good.len() - 8 - length;
    let mut longer = good.clone();
    longer.extend([0; 16]);
    for (bytes, needle) in [
        (
            lying,
            format!(
                "tensor `head.bias`: its shape [3] of F32 takes 12 bytes, its data_offsets \
                 [{begin}, {}] give 4 bytes",
                begin + 4
            ),
        ),
        (
            good[..good.len() - 10].to_vec(),
            format!("tensor `{last}` ends at byte {data} of the data"),
        ),
        (longer, "16 bytes follow the last tensor's data".to_string()),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = load_err(&dir);
        assert!(
            err.contains(&path.display().to_string()) && err.contains(&needle),
            "{needle}: {err}"
        );
    }
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    assert!(
        load_err(&dir).contains(&format!(
            "which holds {} bytes: the file is cut short",
            data - 10
        )),
        "{}",
        load_err(&dir)
    );
}

/// A config claiming sizes no memory holds is refused by the weights file's shapes, before
/// anything of the config's sizes is allocated (which aborted the process), and quickly.
#[test]
fn absurd_sizes_in_the_config_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, config_path, good) = saved_with_config(tmp.path());
    let cases = [
        (
            serde_json::json!({"tokens": 8_589_934_592u64}),
            "`vt.0.tokenizer.attn.weight` has shape [4, 256], expected [8589934592, 256]",
        ),
        (
            serde_json::json!({"token_channels": 16_777_216, "heads": 2}),
            "`head.weight` has shape [3, 32], expected [3, 16777216]",
        ),
    ];
    for (changes, needle) in cases {
        let mut config = good.clone();
        for (key, value) in changes.as_object().unwrap() {
            config[key] = value.clone();
        }
        std::fs::write(&config_path, config.to_string()).unwrap();
        let start = std::time::Instant::now();
        let err = load_err(&dir);
        assert!(err.contains(needle), "{changes}: {err}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{changes}: took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn a_failed_write_leaves_the_previous_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let before = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let result = vt_model::checkpoint::write_dir_atomically(&dir, |tmp| {
        std::fs::write(tmp.join(WEIGHTS_FILE), b"half").unwrap();
        Err(ModelError::Config("simulated crash".into()))
    });
    assert!(result.is_err());
    assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt")]);
}

/// A save killed midway leaves its temporary folder beside the checkpoint, as large as it:
/// the next save removes it, but never that of a save under way (whose writer holds a lock
/// on it), whatever pid it names.
#[cfg(unix)]
#[test]
fn the_next_save_removes_a_killed_saves_temporary_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = saved_model(&dir);
    let killed = tmp.path().join(".ckpt.tmp-999991");
    let live = tmp.path().join(".ckpt.tmp-999992");
    for folder in [&killed, &live] {
        std::fs::create_dir(folder).unwrap();
        std::fs::copy(dir.join(WEIGHTS_FILE), folder.join(WEIGHTS_FILE)).unwrap();
    }
    let writer = std::fs::File::open(&live).unwrap();
    writer.lock().unwrap();
    model.save(&dir).unwrap();
    assert!(!killed.exists());
    assert!(live.join(WEIGHTS_FILE).is_file());
    drop(writer);
    model.save(&dir).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
}

/// The state a SIGKILL between a writer's "rename old away" and "rename new in" leaves (or a
/// writer in between them right now): readers say so and rename nothing, which would break
/// the writer's next rename; the writer's next save puts the old version back first.
#[test]
fn readers_leave_an_interrupted_save_to_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let old = tmp.path().join(".ckpt.old");
    saved_model(&dir);
    let before = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::rename(&dir, &old).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("interrupted") && err.contains(".ckpt.old"),
        "{err}"
    );
    assert!(old.is_dir() && !dir.exists(), "a reader renamed folders");

    let result = write_dir_atomically(&dir, |_| Err(ModelError::Config("crash".into())));
    assert!(result.is_err());
    assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);
    assert!(!old.exists());
}

/// A previous version beside a complete newer one (a writer killed before removing it) goes;
/// beside a folder lacking its files (a copy of it interrupted), it stays, the only copy.
#[test]
fn a_previous_version_goes_only_when_the_folder_in_place_has_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let old = tmp.path().join(".ckpt.old");
    saved_model(&dir);
    std::fs::rename(&dir, &old).unwrap();
    // Commands that only read it say where it is.
    let err = refuse_non_checkpoint(&dir).unwrap_err().to_string();
    assert!(
        err.contains("interrupted") && err.contains(".ckpt.old"),
        "{err}"
    );
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(old.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
    recover_interrupted_write(&dir).unwrap();
    assert!(old.join(WEIGHTS_FILE).is_file());

    std::fs::copy(old.join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    recover_interrupted_write(&dir).unwrap();
    assert!(!old.exists());
    assert!(dir.join(WEIGHTS_FILE).is_file());
}

#[test]
fn weights_and_values_that_are_not_finite_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let good = weights(&dir);
    for (value, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut bad = good.clone();
        let mut values = good["layer2.1.bn2.running_var"].to_vec1::<f32>().unwrap();
        values[5] = value;
        bad.insert(
            "layer2.1.bn2.running_var".into(),
            Tensor::new(values, &Device::Cpu).unwrap(),
        );
        write_weights(&dir, &bad);
        let err = load_err(&dir);
        assert!(
            err.contains(WEIGHTS_FILE)
                && err.contains("`layer2.1.bn2.running_var` holds")
                && err.contains(&format!("{shown} at element 5")),
            "{err}"
        );
    }
}

/// sqrt(running_var + eps) is NaN below -eps: vt's fused ReLUs would turn that NaN into
/// zeros where the contract's maths and the ONNX export give NaN, so such a checkpoint is
/// refused.
#[test]
fn negative_running_variances_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let mut bad = weights(&dir);
    let mut values = bad["layer1.0.bn2.running_var"].to_vec1::<f32>().unwrap();
    values[7] = -0.5;
    bad.insert(
        "layer1.0.bn2.running_var".into(),
        Tensor::new(values, &Device::Cpu).unwrap(),
    );
    write_weights(&dir, &bad);
    let err = load_err(&dir);
    assert!(
        err.contains("`layer1.0.bn2.running_var` holds -0.5 at element 7")
            && err.contains("negative"),
        "{err}"
    );
}

#[test]
fn folders_that_are_not_checkpoints_are_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("notes.txt"), "x").unwrap();
    let err = model.save(&victim).unwrap_err();
    assert!(matches!(err, ModelError::NotACheckpoint { .. }), "{err}");
    assert!(victim.join("notes.txt").is_file() && victim.join("sub").is_dir());

    // A checkpoint folder with a file of the user's in it is not replaced either.
    let dir = tmp.path().join("ckpt");
    model.save(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    let err = model.save(&dir).unwrap_err().to_string();
    assert!(err.contains("`notes.txt`"), "{err}");
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    model.save(&dir).unwrap();

    let file = tmp.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let err = model.save(&file).unwrap_err().to_string();
    assert!(err.contains("not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    model.save(&empty).unwrap();
    Model::load(&empty, &Device::Cpu).unwrap();
}

/// safetensors writes its file through a temporary one created 0600: another user (a server)
/// could not read the weights beside a config.json it can read.
#[cfg(unix)]
#[test]
fn the_weights_are_as_readable_as_the_config() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(WEIGHTS_FILE), mode(CONFIG_FILE));
}

/// Paths ending in `..` name a folder too (`.` and `./`: tests/current_dir.rs).
#[test]
fn a_checkpoint_path_may_end_in_dot_dot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    saved_model(&dir);
    let inner = dir.join("inner");
    std::fs::create_dir(&inner).unwrap();
    Model::load(&inner.join(".."), &Device::Cpu).unwrap();
    Model::load(&inner.join("..").join("."), &Device::Cpu).unwrap();
}

/// Every tensor of `model` by name, as f32 values.
fn values(model: &Model) -> HashMap<String, Vec<f32>> {
    let vars = model.varmap.data().lock().unwrap();
    vars.iter()
        .map(|(name, var)| {
            let flat = var.as_tensor().flatten_all().unwrap();
            (name.clone(), flat.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// Fine-tuning starts from a checkpoint: every tensor when the classes are the same, every
/// one but the head's when they differ, at any image size; a model that differs otherwise
/// is refused, naming how, and keeps its weights.
#[test]
fn a_model_starts_from_a_checkpoint_with_or_without_its_head() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("source");
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&source);
    source.save(&dir).unwrap();
    let trained = values(&source);

    let same_classes = VtConfig {
        image_size: 48,
        ..tiny_config(Arch::VtResNet18)
    };
    let model = Model::init(same_classes, &Device::Cpu).unwrap();
    assert_eq!(model.start_from(&dir).unwrap(), StartedFrom::AllWeights);
    assert_eq!(values(&model), trained);

    let other_classes = VtConfig {
        class_names: vec!["cat".into(), "dog".into()],
        ..tiny_config(Arch::VtResNet18)
    }
    .with_num_classes();
    let model = Model::init(other_classes, &Device::Cpu).unwrap();
    let fresh = values(&model);
    assert_eq!(model.start_from(&dir).unwrap(), StartedFrom::AllButTheHead);
    for (name, loaded) in values(&model) {
        let expected = if name.starts_with("head.") {
            &fresh[&name]
        } else {
            &trained[&name]
        };
        assert_eq!(&loaded, expected, "{name}");
    }

    let other_tokens = VtConfig {
        tokens: tiny_config(Arch::VtResNet18).tokens + 1,
        ..tiny_config(Arch::VtResNet18)
    };
    let model = Model::init(other_tokens, &Device::Cpu).unwrap();
    let fresh = values(&model);
    let err = model.start_from(&dir).unwrap_err().to_string();
    assert!(err.contains("it has tokens"), "{err}");
    assert_eq!(values(&model), fresh);
    let r34 = Model::init(tiny_config(Arch::VtResNet34), &Device::Cpu).unwrap();
    let err = r34.start_from(&dir).unwrap_err().to_string();
    assert!(
        err.contains("arch vt-resnet18 (wanted vt-resnet34)"),
        "{err}"
    );
}

/// A run's `state/` that keeps a weight average holds the raw weights beside it: given as a
/// checkpoint (to serve, evaluate, export, fine-tune from) it is refused, naming what to give
/// instead; resuming reads it. A state without an average, or a checkpoint merely named
/// `state`, loads.
#[test]
fn a_run_state_with_a_weight_average_is_not_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let model = saved_model(&state);
    Model::load(&state, &Device::Cpu).unwrap();
    std::fs::copy(state.join(WEIGHTS_FILE), state.join("ema.safetensors")).unwrap();
    let err = load_err(&state);
    for needed in [
        "is a run's training state",
        "weight average",
        "best or last",
    ] {
        assert!(err.contains(needed), "{err}");
    }
    // Named otherwise: a link to it, or `.` inside it.
    #[cfg(unix)]
    {
        let link = tmp.path().join("served");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        assert!(load_err(&link).contains("is a run's training state"));
        assert!(load_err(&state.join(".")).contains("is a run's training state"));
    }
    let target = model.start_from(&state).unwrap_err().to_string();
    assert!(target.contains("is a run's training state"), "{target}");
    let resumed = Model::load_run_state(&state, &Device::Cpu).unwrap();
    assert_eq!(resumed.config, model.config);
}
