//! `vt-train import`: weights trained elsewhere become a checkpoint. A state dict in
//! safetensors with a DataParallel prefix, in f16, and one that PyTorch's reference
//! implementation (tools/reference/vt_resnet.py) saved with `torch.save` (when
//! `VT_TORCH_PYTHON`, or `python3`, has torch and safetensors), each import as the same
//! tensors; a file that does not fit the model is refused naming the tensor at fault.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;

const CLASSES: &str = "buildings,forest,glacier";

fn import(weights: &Path, out: &Path, classes: &str) -> Command {
    let mut cmd = vt_train();
    cmd.args(["import", "--weights"])
        .arg(weights)
        .arg("--out")
        .arg(out)
        .args(["--class-names", classes])
        .args(TINY_MODEL);
    cmd
}

/// The tensors of `source` renamed by `rename` (dropped where it gives `None`), converted
/// to `dtype`, with `extra` added, saved as a safetensors file at `path`.
fn write_state_dict(
    source: &HashMap<String, Tensor>,
    path: &Path,
    dtype: DType,
    rename: impl Fn(&str) -> Option<String>,
    extra: &[(&str, Tensor)],
) {
    let mut tensors: HashMap<String, Tensor> = source
        .iter()
        .filter_map(|(name, t)| Some((rename(name)?, t.to_dtype(dtype).unwrap())))
        .collect();
    for (name, tensor) in extra {
        tensors.insert(name.to_string(), tensor.clone());
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn a_prefixed_f16_state_dict_imports_and_a_mismatch_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    run_ok(
        vt_train()
            .args(["init", "--class-names", CLASSES, "--seed", "3", "--out"])
            .arg(&original)
            .args(TINY_MODEL),
    );
    let tensors = checkpoint_tensors(&original);
    let counter = Tensor::new(7i64, &Device::Cpu).unwrap();
    let weights = tmp.path().join("weights.safetensors");
    write_state_dict(
        &tensors,
        &weights,
        DType::F16,
        |name| Some(format!("module.{name}")),
        &[("module.bn1.num_batches_tracked", counter)],
    );
    let imported = tmp.path().join("imported");
    run_ok(&mut import(&weights, &imported, CLASSES));
    let got = checkpoint_tensors(&imported);
    assert_eq!(got.len(), tensors.len());
    for (name, tensor) in &tensors {
        let rounded = tensor
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(got[name].dtype(), DType::F32, "{name}");
        assert_eq!(max_abs_diff(&got[name], &rounded), 0.0, "{name}");
    }
    let config = std::fs::read_to_string(imported.join("config.json")).unwrap();
    assert!(config.contains("\"glacier\""), "{config}");
    // The checkpoint serves as any other.
    run_ok(
        vt_train()
            .args(["export", "--checkpoint"])
            .arg(&imported)
            .arg("--out")
            .arg(tmp.path().join("m.onnx")),
    );

    let err = run_err(&mut import(&weights, &imported, CLASSES));
    assert!(err.contains("--force"), "{err}");
    let refused = |name: &str, rename: &dyn Fn(&str) -> Option<String>, classes: &str| {
        let path = tmp.path().join(format!("{name}.safetensors"));
        let extra = [(
            "fc.weight",
            Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(),
        )];
        let extra = if name == "extra" { &extra[..] } else { &[] };
        write_state_dict(&tensors, &path, DType::F32, rename, extra);
        let err = run_err(&mut import(&path, &tmp.path().join(name), classes));
        assert!(
            err.contains(&path.display().to_string()),
            "{name}: the file is named: {err}"
        );
        err
    };
    let err = refused(
        "missing",
        &|n| (n != "vt.1.transformer.ffn2.bias").then(|| n.to_string()),
        CLASSES,
    );
    assert!(err.contains("vt.1.transformer.ffn2.bias"), "{err}");
    let err = refused("extra", &|n| Some(n.to_string()), CLASSES);
    assert!(err.contains("fc.weight"), "{err}");
    let err = refused("classes", &|n| Some(n.to_string()), "buildings,forest");
    assert!(
        err.contains("tensor `head.") && err.contains("expected [2") && err.contains("2 classes"),
        "{err}"
    );
    let err = refused("renamed", &|n| Some(n.replace("tokenizer", "tok")), CLASSES);
    assert!(
        err.contains("missing `vt.0.tokenizer.")
            && err.contains("not the model's `vt.0.tok.")
            && err.contains("more"),
        "{err}"
    );
    assert!(!tmp.path().join("missing").exists());
    let err = run_err(&mut import(
        &weights,
        &tmp.path().join("spaced"),
        "buildings, forest,c",
    ));
    assert!(
        err.contains("\" forest\" starts or ends with white space"),
        "{err}"
    );
}

/// PyTorch's reference model, randomly initialised, saved both with `torch.save` as a
/// training script does (wrapped by DataParallel, beside its epoch) and as a checkpoint by
/// the reference's own writer.
const SAVE_BOTH: &str = r#"
import sys, torch
sys.path.insert(0, sys.argv[1])
import vt_resnet as vt
out = sys.argv[2]
torch.manual_seed(0)
cfg = vt.default_config("vt-resnet34", 3, 32, ["buildings", "forest", "glacier"], 4, 32, 2)
model = torch.nn.DataParallel(vt.VTResNet(cfg))
model.train()
model(torch.randn(4, 3, 32, 32))  # BatchNorm statistics away from their initial values
torch.save({"epoch": 5, "state_dict": model.state_dict()}, f"{out}/model.pth")
vt.save_checkpoint(model.module, f"{out}/reference")
"#;

#[test]
fn a_model_saved_by_pytorch_imports_as_its_reference_checkpoint() {
    let Some(python) = python_with("VT_TORCH_PYTHON", "torch, safetensors") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/reference");
    let out = Command::new(&python)
        .args(["-c", SAVE_BOTH])
        .arg(&tools)
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = tmp.path().join("imported");
    run_ok(
        import(&tmp.path().join("model.pth"), &imported, CLASSES).args(["--arch", "vt-resnet34"]),
    );
    let reference = checkpoint_tensors(&tmp.path().join("reference"));
    let got = checkpoint_tensors(&imported);
    assert_eq!(got.len(), reference.len());
    for (name, tensor) in &reference {
        assert_eq!(max_abs_diff(&got[name], tensor), 0.0, "{name}");
    }
    // The same file gives a new model its stem (`--pretrained`, as torchvision's .pth).
    let stemmed = tmp.path().join("stemmed");
    run_ok(
        vt_train()
            .args(["init", "--arch", "vt-resnet34", "--class-names", CLASSES])
            .arg("--pretrained")
            .arg(tmp.path().join("model.pth"))
            .arg("--out")
            .arg(&stemmed)
            .args(TINY_MODEL),
    );
    let stem = checkpoint_tensors(&stemmed);
    for (name, tensor) in &reference {
        let from_file = max_abs_diff(&stem[name], tensor) == 0.0;
        assert_eq!(
            from_file,
            !name.starts_with("vt.") && !name.starts_with("head."),
            "{name}"
        );
    }
}
