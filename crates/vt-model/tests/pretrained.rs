//! Pretrained stems from torchvision/timm-named ResNet files, local and from a hub server
//! started on 127.0.0.1 that speaks the Hugging Face resolve protocol.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{set_formula_weights, tiny_config};
use vt_model::pretrained::{load_stem, Source};
use vt_model::{Arch, Model};

/// A torchvision-style ResNet state dict holding `model`'s stem, plus layer4/fc and
/// `num_batches_tracked` entries that a loader must ignore.
fn resnet_file(model: &Model, path: &Path, prefix: &str) {
    let vars = model.varmap.data().lock().unwrap();
    let mut tensors: HashMap<String, Tensor> = vars
        .iter()
        .filter(|(n, _)| !n.starts_with("vt.") && !n.starts_with("head."))
        .map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().clone()))
        .collect();
    let cpu = Device::Cpu;
    tensors.insert(
        format!("{prefix}layer4.0.conv1.weight"),
        Tensor::zeros((512, 256, 3, 3), DType::F32, &cpu).unwrap(),
    );
    tensors.insert(
        format!("{prefix}fc.weight"),
        Tensor::zeros((1000, 512), DType::F32, &cpu).unwrap(),
    );
    tensors.insert(
        format!("{prefix}bn1.num_batches_tracked"),
        Tensor::new(&[3i64], &cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn stem_equal(a: &Model, b: &Model) -> bool {
    let (va, vb) = (
        a.varmap.data().lock().unwrap(),
        b.varmap.data().lock().unwrap(),
    );
    va.iter()
        .filter(|(n, _)| !n.starts_with("vt.") && !n.starts_with("head."))
        .all(|(n, v)| {
            let diff = (v.as_tensor() - vb[n].as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            diff.to_scalar::<f32>().unwrap() == 0.0
        })
}

#[test]
fn a_local_resnet_file_fills_the_stem_and_leaves_the_vt_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&source);
    let path = tmp.path().join("resnet18.safetensors");
    resnet_file(&source, &path, "module.");

    let target = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let head_before = target.varmap.data().lock().unwrap()["head.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    let loaded = load_stem(&target, &Source::parse(path.to_str().unwrap()).unwrap()).unwrap();
    let stem_tensors = target
        .varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .filter(|n| !n.starts_with("vt.") && !n.starts_with("head."))
        .count();
    assert_eq!(loaded, stem_tensors);
    assert!(stem_equal(&source, &target));
    let head_after = target.varmap.data().lock().unwrap()["head.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    assert_eq!(common::relative_error(&head_after, &head_before), 0.0);
}

#[test]
fn a_resnet34_file_is_refused_for_vt_resnet18_and_bottlenecks_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let r34 = Model::init(tiny_config(Arch::VtResNet34), &Device::Cpu).unwrap();
    let path = tmp.path().join("resnet34.safetensors");
    resnet_file(&r34, &path, "");
    let r18 = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let err = load_stem(&r18, &Source::File(path.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[3, 4, 6] (ResNet-34)") && err.contains("vt-resnet18 needs [2, 2, 2]"),
        "{err}"
    );

    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "layer1.0.conv3.weight".into(),
        Tensor::zeros((256, 64, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_stem(&r34, &Source::File(path))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Bottleneck"), "{err}");
}

/// Serves `files` (name -> bytes) for the model repo `owner/name` at revision `main` the way
/// the hub's resolve endpoint does (HEAD with ETag and X-Repo-Commit, then GET); anything
/// else is a 404. Handles `requests` connections, then stops.
fn serve_hub(listener: TcpListener, repo: &'static str, file: Vec<u8>, requests: usize) {
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let wanted = format!("/{repo}/resolve/main/model.safetensors");
            let response = if path == wanted {
                let mut head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"etag-1\"\r\nX-Repo-Commit: {}\r\nConnection: close\r\n\r\n",
                    file.len(),
                    "0123456789abcdef0123456789abcdef01234567"
                )
                .into_bytes();
                if method == "GET" {
                    head.extend_from_slice(&file);
                }
                head
            } else {
                b"HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            stream.write_all(&response).unwrap();
            let _ = reader.read(&mut [0u8; 0]);
        }
    });
}

#[test]
fn hub_ids_download_through_hf_endpoint_and_a_404_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&source);
    let path = tmp.path().join("model.safetensors");
    resnet_file(&source, &path, "");
    let bytes = std::fs::read(&path).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    serve_hub(listener, "test-org/resnet18-tiny", bytes, 8);
    // This test binary holds only this test, so the process environment is ours.
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", tmp.path().join("hf-home"));
    std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");

    let target = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    load_stem(&target, &Source::parse("test-org/resnet18-tiny").unwrap()).unwrap();
    assert!(stem_equal(&source, &target));

    let err = load_stem(&target, &Source::parse("test-org/does-not-exist").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("test-org/does-not-exist"), "{err}");
}
