//! `vt-train export`: the ONNX file's structure, and its outputs in ONNX Runtime against
//! vt's own forward pass.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use candle_nn::ops::softmax;
use common::*;
use prost::Message;
use vt_model::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use vt_model::onnx::proto::{type_proto, ModelProto, ValueInfoProto, FLOAT};
use vt_model::Model;

/// A seeded tiny checkpoint of `arch` at 32 px with classes a, b, c.
fn tiny_checkpoint(root: &Path, arch: &str) -> PathBuf {
    let dir = root.join(arch);
    run_ok(
        vt_train()
            .args(["init", "--arch", arch])
            .args(TINY_MODEL)
            .args(["--class-names", "a,b,c", "--seed", "7", "--out"])
            .arg(&dir),
    );
    dir
}

fn export(checkpoint: &Path, out: &Path) -> String {
    let output = run_ok(
        vt_train()
            .args(["export", "--checkpoint"])
            .arg(checkpoint)
            .arg("--out")
            .arg(out),
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What `export` says when it refuses to write `out`.
fn export_refused(checkpoint: &Path, out: &Path) -> String {
    run_err(
        vt_train()
            .args(["export", "--checkpoint"])
            .arg(checkpoint)
            .arg("--out")
            .arg(out),
    )
}

fn decode(path: &Path) -> ModelProto {
    ModelProto::decode(fs::read(path).unwrap().as_slice()).unwrap()
}

/// A graph input or output as (name, element type, dimensions).
fn signature(value: &ValueInfoProto) -> (String, i32, Vec<String>) {
    let Some(type_proto::Value::TensorType(tensor)) =
        value.r#type.as_ref().and_then(|t| t.value.clone())
    else {
        panic!("{} is not a tensor", value.name);
    };
    let dims = tensor
        .shape
        .unwrap()
        .dim
        .iter()
        .map(|d| match d.value.as_ref().unwrap() {
            Dim::DimValue(v) => v.to_string(),
            Dim::DimParam(p) => p.clone(),
        })
        .collect();
    (value.name.clone(), tensor.elem_type, dims)
}

#[test]
fn the_export_holds_the_contracts_graph_signature_metadata_and_every_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(tmp.path(), "vt-resnet18");
    let out = tmp.path().join("model.onnx");
    let log = export(&checkpoint, &out);
    assert!(
        log.contains("input  image: float32 [batch, 3, 32, 32]"),
        "{log}"
    );
    assert!(
        log.contains("output probabilities: float32 [batch, 3]"),
        "{log}"
    );

    let model = decode(&out);
    assert_eq!(model.ir_version, 8);
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!(
        (
            model.opset_import[0].domain.as_str(),
            model.opset_import[0].version
        ),
        ("", 17)
    );
    let graph = model.graph.as_ref().unwrap();
    let inputs: Vec<_> = graph.input.iter().map(signature).collect();
    let dims = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        inputs,
        [("image".into(), FLOAT, dims(&["batch", "3", "32", "32"]))]
    );
    let outputs: Vec<_> = graph.output.iter().map(signature).collect();
    assert_eq!(
        outputs,
        [
            ("logits".into(), FLOAT, dims(&["batch", "3"])),
            ("probabilities".into(), FLOAT, dims(&["batch", "3"]))
        ]
    );

    let metadata: BTreeMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    let weights = fs::read(checkpoint.join("model.safetensors")).unwrap();
    let sha256: String = <sha2::Sha256 as sha2::Digest>::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = BTreeMap::from([
        ("arch", "vt-resnet18"),
        ("variant", "paper"),
        ("class_names", r#"["a","b","c"]"#),
        ("image_size", "32"),
        ("mean", "[0.485,0.456,0.406]"),
        ("std", "[0.229,0.224,0.225]"),
        ("tokens", "4"),
        ("token_channels", "32"),
        ("heads", "2"),
        ("sha256", sha256.as_str()),
    ]);
    assert_eq!(metadata, expected);
    // A trained checkpoint's record of its training goes along, as JSON.
    let config_path = checkpoint.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let record = serde_json::json!({"epoch": 7, "options": {"lr": 0.01}});
    config["training"] = record.clone();
    fs::write(&config_path, config.to_string()).unwrap();
    let recorded = tmp.path().join("recorded.onnx");
    export(&checkpoint, &recorded);
    let exported = decode(&recorded).metadata_props;
    let training = exported.iter().find(|e| e.key == "training").unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&training.value).unwrap(),
        record
    );

    // Every checkpoint tensor, by name, with its shape and exact values.
    let tensors = checkpoint_tensors(&checkpoint);
    for (name, tensor) in &tensors {
        let init = graph
            .initializer
            .iter()
            .find(|t| &t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"));
        assert_eq!(init.data_type, FLOAT, "{name}");
        let shape: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
        assert_eq!(init.dims, shape, "{name}");
        let values: Vec<u8> = tensor
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(init.raw_data == values, "{name}: values differ");
    }

    // A valid graph: each value computed once, after what it is computed from.
    let mut known: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    known.insert("image");
    for node in &graph.node {
        for input in &node.input {
            assert!(
                known.contains(input.as_str()),
                "{} reads {input} before it is computed",
                node.name
            );
        }
        for output in &node.output {
            assert!(known.insert(output), "{output} is computed twice");
        }
    }
    assert!(known.contains("logits") && known.contains("probabilities"));
}

#[test]
fn export_refuses_to_overwrite_or_to_write_into_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(tmp.path(), "vt-resnet18");
    let inside = checkpoint.join("model.onnx");
    let err = export_refused(&checkpoint, &inside);
    assert!(err.contains("inside a checkpoint folder"), "{err}");
    assert!(!inside.exists());
    // Deeper in it, or in another checkpoint, alike.
    let other = tiny_checkpoint(tmp.path(), "vt-resnet34");
    fs::create_dir(checkpoint.join("sub")).unwrap();
    for out in [checkpoint.join("sub/model.onnx"), other.join("model.onnx")] {
        let err = export_refused(&checkpoint, &out);
        assert!(err.contains("inside a checkpoint folder"), "{err}");
        assert!(!out.exists());
    }

    // Another extension is a slip, an existing file kept without --force.
    let json = tmp.path().join("config.json");
    let err = export_refused(&checkpoint, &json);
    assert!(err.contains("name it FILE.onnx"), "{err}");
    assert!(!json.exists());
    let out = tmp.path().join("model.onnx");
    fs::write(&out, b"keep").unwrap();
    let err = export_refused(&checkpoint, &out);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(fs::read(&out).unwrap(), b"keep");
    // A link is there, even to nothing.
    #[cfg(unix)]
    {
        let link = tmp.path().join("link.onnx");
        std::os::unix::fs::symlink(tmp.path().join("nothing.onnx"), &link).unwrap();
        let err = export_refused(&checkpoint, &link);
        assert!(err.contains("--force"), "{err}");
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    }

    // Nor into the folders a run manages (its resume refuses strangers in top/).
    let run = tmp.path().join("run");
    fs::create_dir_all(run.join("top")).unwrap();
    fs::write(run.join("config.toml"), "").unwrap();
    fs::write(run.join("metrics.jsonl"), "").unwrap();
    let kept = run.join("top/model.onnx");
    let err = export_refused(&checkpoint, &kept);
    assert!(err.contains("which its training run manages"), "{err}");
    assert!(!kept.exists());

    let missing = tmp.path().join("missing");
    let err = export_refused(&missing, &tmp.path().join("other.onnx"));
    assert!(
        err.contains(&format!("no checkpoint folder at {}", missing.display())),
        "{err}"
    );
    // A folder that is not there is named, not the hidden temporary the write would use.
    let nowhere = tmp.path().join("nowhere/sub/x.onnx");
    let err = export_refused(&checkpoint, &nowhere);
    assert!(
        err.contains(&format!(
            "the folder {} does not exist",
            tmp.path().join("nowhere/sub").display()
        )),
        "{err}"
    );
}

/// Runs `model.onnx` on `input.f32` (raw little-endian, `[n, 3, s, s]`) in ONNX Runtime and
/// writes `logits.f32` and `probabilities.f32`.
const RUN_ONNX: &str = r#"
import sys
import numpy as np
import onnxruntime as ort
folder, n, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.fromfile(f"{folder}/input.f32", dtype="<f4").reshape(n, 3, s, s)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(f"{folder}/model.onnx", options, providers=["CPUExecutionProvider"])
logits, probs = session.run(["logits", "probabilities"], {"image": x})
logits.astype("<f4").tofile(f"{folder}/logits.f32")
probs.astype("<f4").tofile(f"{folder}/probabilities.f32")
"#;

fn read_f32(path: &Path) -> Vec<f32> {
    fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn onnx_runtime_computes_vts_logits_and_probabilities() {
    let Some(python) = python_with("VT_ONNX_PYTHON", "onnxruntime, numpy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A calibrated checkpoint's probabilities divide the logits by its temperature.
    let vt_resnet18 = tiny_checkpoint(tmp.path(), "vt-resnet18");
    let calibrated = tmp.path().join("calibrated");
    fs::create_dir(&calibrated).unwrap();
    fs::copy(
        vt_resnet18.join("model.safetensors"),
        calibrated.join("model.safetensors"),
    )
    .unwrap();
    let config = fs::read_to_string(vt_resnet18.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["temperature"] = 0.3.into();
    fs::write(calibrated.join("config.json"), config.to_string()).unwrap();
    let checkpoints = [
        ("vt-resnet18", vt_resnet18),
        ("vt-resnet34", tiny_checkpoint(tmp.path(), "vt-resnet34")),
        ("calibrated vt-resnet18", calibrated),
    ];
    for (arch, checkpoint) in checkpoints {
        let model = Model::load(&checkpoint, &Device::Cpu)
            .and_then(Model::into_frozen)
            .unwrap();
        let s = model.config.image_size;
        for n in [1, 3] {
            let folder = tmp.path().join(format!("{arch}-{n}"));
            fs::create_dir(&folder).unwrap();
            export(&checkpoint, &folder.join("model.onnx"));
            let values: Vec<f32> = (0..n * 3 * s * s)
                .map(|i| ((i as f64 * 0.37).sin() * 1.5) as f32)
                .collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            fs::write(folder.join("input.f32"), bytes).unwrap();
            let status = Command::new(&python)
                .args(["-c", RUN_ONNX])
                .arg(&folder)
                .args([n.to_string(), s.to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "{arch} batch {n}: onnxruntime failed");

            let images = Tensor::from_vec(values, (n, 3, s, s), &Device::Cpu).unwrap();
            let logits = model.forward_t(&images, false).unwrap();
            let probs = softmax(&model.config.calibrated(&logits).unwrap(), 1).unwrap();
            let k = model.config.num_classes;
            let theirs = |file: &str| {
                Tensor::from_vec(read_f32(&folder.join(file)), (n, k), &Device::Cpu).unwrap()
            };
            let scale = logits.abs().unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
            let logit_err = max_abs_diff(&theirs("logits.f32"), &logits);
            // The same sums in another order: float32 rounding, which the tiny
            // vt-resnet34 (1 x 1 feature maps) amplifies to about 1e-5 of its largest logit.
            assert!(
                logit_err <= 1e-4 * scale,
                "{arch} batch {n}: logits differ by {logit_err} (largest {scale})"
            );
            let prob_err = max_abs_diff(&theirs("probabilities.f32"), &probs);
            assert!(
                prob_err <= 1e-5,
                "{arch} batch {n}: probabilities differ by {prob_err}"
            );
            eprintln!(
                "{arch} batch {n}: logits within {logit_err} (largest {scale}), probabilities \
                 within {prob_err}"
            );
        }
    }
}
