//! Pretrained stems from torchvision/timm-named ResNet files, local and from a hub server
//! started on 127.0.0.1 that speaks the Hugging Face resolve protocol.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::{set_formula_weights, tiny_config};
use vt_model::pretrained::{load_stem, HubOptions, Source};
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

/// Rewrites the tensors of the safetensors file `path` through `change`.
fn rewrite(path: &Path, change: impl Fn(String, Tensor) -> (String, Tensor)) {
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| change(name, t))
        .collect();
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

/// A file refused for a tensor the stem does not have leaves the model as it was.
#[test]
fn a_refused_file_leaves_the_stem_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let path = tmp.path().join("resnet18.safetensors");
    resnet_file(&source, &path, "");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "layer3.1.se.weight".into(),
        Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let [target, untouched] = [(); 2].map(|()| {
        let model = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
        set_formula_weights(&model);
        model
    });
    let err = load_err(&target, &path);
    assert!(err.contains("layer3.1.se.weight"), "{err}");
    assert!(
        stem_equal(&target, &untouched),
        "the refused file was partly loaded"
    );
}

/// One stem tensor under two wrapper prefixes is ambiguous, not "the last one wins".
#[test]
fn a_tensor_under_two_prefixes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let path = tmp.path().join("resnet18.safetensors");
    resnet_file(&source, &path, "module.");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let extra = tensors["module.bn1.bias"].clone();
    tensors.insert("backbone.bn1.bias".into(), extra);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let target = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let err = load_err(&target, &path);
    assert!(
        err.contains("`backbone.bn1.bias` and `module.bn1.bias` would both load as `bn1.bias`"),
        "{err}"
    );
}

fn load_err(model: &Model, path: &Path) -> String {
    match load_stem(model, &Source::File(path.to_path_buf())) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Half-precision files load, converted; so does an f16 `fc` beside an f32 stem, since
/// layer4 and fc are dropped before their dtype matters. Wrapper prefixes of torch.compile,
/// detection backbones and nested wrappers are removed.
#[test]
fn other_precisions_and_wrapper_prefixes_load() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&source);
    let path = tmp.path().join("resnet18.safetensors");
    // (dtype, wrapper prefix, whether only fc changes dtype)
    let cases = [
        (DType::F16, "_orig_mod.", false),
        (DType::BF16, "module.model.", false),
        (DType::F64, "backbone.", false),
        (DType::F16, "", true),
    ];
    let name = "layer2.0.downsample.0.weight";
    for (dtype, prefix, only_fc) in cases {
        resnet_file(&source, &path, "");
        rewrite(&path, |n, t| {
            let convert = t.dtype() == DType::F32 && (!only_fc || n.starts_with("fc."));
            let t = if convert {
                t.to_dtype(dtype).unwrap()
            } else {
                t
            };
            (format!("{prefix}{n}"), t)
        });
        let target = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
        load_stem(&target, &Source::File(path.clone()))
            .unwrap_or_else(|e| panic!("{dtype:?} {prefix}: {e}"));
        let mut expected = source.varmap.data().lock().unwrap()[name]
            .as_tensor()
            .clone();
        if !only_fc {
            expected = expected
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
        let loaded = target.varmap.data().lock().unwrap()[name]
            .as_tensor()
            .clone();
        assert_eq!(
            common::relative_error(&loaded, &expected),
            0.0,
            "{dtype:?} {prefix}"
        );
    }
}

#[test]
fn files_without_a_stem_or_with_values_that_are_not_finite_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&source);
    let target = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    let path = tmp.path().join("resnet18.safetensors");

    resnet_file(&source, &path, "");
    rewrite(&path, |name, t| (format!("encoder.{name}"), t));
    let err = load_err(&target, &path);
    assert!(
        err.contains("resnet18.safetensors")
            && err.contains("no ResNet stem tensors")
            && err.contains("start with `encoder.`"),
        "{err}"
    );

    resnet_file(&source, &path, "module.");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "module.layer1.1.conv2.weight";
    let mut values = tensors[name]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[3] = f32::INFINITY;
    let bad = Tensor::from_vec(values, tensors[name].dims(), &Device::Cpu).unwrap();
    tensors.insert(name.into(), bad.to_dtype(DType::F16).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(&target, &path);
    assert!(
        err.contains("resnet18.safetensors") && err.contains(&format!("`{name}` holds inf")),
        "{err}"
    );
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
    // The variables are what this test checks. The other tests of this binary load files or
    // give their hub explicitly (`HubOptions`), so none reads them.
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

/// A hub that accepts connections and never answers fails the download within the read
/// timeout (twice: one retry), not never; a refused connection says so.
#[test]
fn a_silent_or_refusing_hub_is_a_prompt_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let hub = HubOptions {
        endpoint: Some(endpoint),
        cache_dir: Some(tmp.path().join("hub")),
        read_timeout: Duration::from_millis(500),
    };
    let source = Source::parse("test-org/silent").unwrap();
    let started = Instant::now();
    let err = source.fetch_with(&hub).unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("test-org/silent") && err.contains("did not answer within 1 s"),
        "{err}"
    );

    let refusing = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", refusing.local_addr().unwrap());
    drop(refusing);
    let hub = HubOptions {
        endpoint: Some(endpoint),
        ..hub
    };
    let err = source.fetch_with(&hub).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
}
