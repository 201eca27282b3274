//! The real `vt-serve` binary: startup lines, offline `predict` against the server, a
//! SIGTERM that drains the requests in flight (HTTP and gRPC) and exits 0, configuration by
//! environment variables, and JSON logs.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use vt_serve::open_inference::proto::{
    InferInputTensor, ModelInferRequest, ModelMetadataRequest, ModelMetadataResponse,
};

const BIN: &str = env!("CARGO_BIN_EXE_vt-serve");

/// Starts the binary on port 0 and returns it with the addresses it printed: the HTTP base
/// URL, and the gRPC service's address when `args` ask for one.
fn spawn_server(args: &[&str]) -> (KilledOnDrop, String, Option<SocketAddr>) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    let grpc = args.contains(&"--grpc-port");
    let mut lines = listening_on(&mut child, 1 + usize::from(grpc)).into_iter();
    let base = lines.next().unwrap();
    let grpc = lines.next().map(|url| {
        let addr = url
            .strip_prefix("grpc://")
            .unwrap_or_else(|| panic!("{url}"));
        addr.parse().unwrap()
    });
    (child, base, grpc)
}

/// The addresses of the first `count` lines of stdout, `listening on URL`; the first is the
/// HTTP base URL.
fn listening_on(child: &mut Child, count: usize) -> Vec<String> {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let urls: Vec<String> = (0..count)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            let json = serde_json::from_str::<Value>(&line).ok();
            match json.as_ref().and_then(|line| line["listening"].as_str()) {
                Some(url) => url.to_owned(),
                None => line
                    .trim()
                    .strip_prefix("listening on ")
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                    .to_owned(),
            }
        })
        .collect();
    assert!(urls[0].starts_with("http://127.0.0.1:"), "{urls:?}");
    urls
}

/// Waits (bounded) for the process to exit.
fn wait_for_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("the server did not exit after SIGTERM");
}

#[test]
fn help_explains_every_flag() {
    for args in [&["--help"][..], &["serve", "--help"]] {
        let output = Command::new(BIN).args(args).output().unwrap();
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        for flag in [
            "--checkpoint",
            "--host",
            "--port",
            "--grpc-port",
            "--device",
            "--dtype",
            "--bf16-products",
            "--max-batch",
            "--max-delay-ms",
            "--queue",
            "--timeout-ms",
            "--max-body-bytes",
            "--max-inflight-body-bytes",
            "--max-pixels",
            "--allow-url-fetch",
            "--threads",
            "--model-name",
            "--log-format",
            "--cors-allow-origin",
        ] {
            assert!(help.contains(flag), "{args:?} help lacks {flag}:\n{help}");
        }
        assert!(
            help.contains("[env: VT_SERVE_CHECKPOINT=]"),
            "{args:?} help names no environment variables:\n{help}"
        );
    }
}

/// Options that do not go together are refused before anything loads, as a usage error
/// (exit 2) like clap's own, whether they come from flags or the environment.
#[test]
fn options_that_do_not_go_together_are_a_usage_error() {
    for (args, env, said) in [
        (
            &["--port", "9000", "--grpc-port", "9000"][..],
            None,
            "give the gRPC service a port of its own",
        ),
        (
            &["serve", "--port", "9000"][..],
            Some(("VT_SERVE_GRPC_PORT", "9000")),
            "give the gRPC service a port of its own",
        ),
        (
            &[
                "--max-body-bytes",
                "1000",
                "--max-inflight-body-bytes",
                "10",
            ][..],
            None,
            "could never be read",
        ),
    ] {
        let mut command = Command::new(BIN);
        command.args(args).args(["--checkpoint", "no-such-folder"]);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
}

/// A value refused from the environment names its variable beside the flag: a container's
/// settings show the one, never the other.
#[test]
fn a_refused_setting_from_the_environment_names_its_variable() {
    for (args, name, value, flag) in [
        (&[][..], "VT_SERVE_PORT", "eighty", "--port"),
        (&["serve"][..], "VT_SERVE_PORT", "eighty", "--port"),
        (&[][..], "VT_SERVE_DTYPE", "f8", "--dtype"),
        (&[][..], "VT_SERVE_MAX_BATCH", "5000", "--max-batch"),
    ] {
        let output = Command::new(BIN)
            .env(name, value)
            .args(args)
            .args(["--checkpoint", "no-such-folder"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(&format!("environment variable {name}")),
            "{name}={value}: {stderr}"
        );
    }
    // A refused flag is the flag's fault, whatever its variable says.
    let output = Command::new(BIN)
        .env("VT_SERVE_PORT", "8080")
        .args(["--port", "eighty", "--checkpoint", "no-such-folder"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("VT_SERVE_PORT"), "{stderr}");
}

/// An API key variable set but empty stops the server rather than letting it serve without
/// a key; a refused key is never printed.
#[test]
fn an_api_key_from_the_environment_is_checked_and_never_printed() {
    let dir = tiny_checkpoint();
    for (name, value, says) in [
        (
            "VT_SERVE_API_KEY",
            "",
            "VT_SERVE_API_KEY): the API key is empty",
        ),
        (
            "VT_SERVE_API_KEY_FILE",
            "",
            "value is required for '--api-key-file",
        ),
        (
            "VT_SERVE_API_KEY",
            "my secret",
            "printable ASCII without spaces",
        ),
    ] {
        let output = Command::new(BIN)
            .env(name, value)
            .env("RUST_BACKTRACE", "0")
            .arg("--checkpoint")
            .arg(checkpoint_path(&dir))
            .args(["--port", "0", "--device", "cpu"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}={value:?}: {stderr}");
        assert!(stderr.contains(says), "{name}={value:?}: {stderr}");
        assert!(!stderr.contains("my secret"), "{stderr}");
    }
    // A key left out after the flag: the next flag taken for it, and that flag's value for a
    // subcommand, is a usage error that names the cause.
    let output = Command::new(BIN)
        .arg("--checkpoint")
        .arg(checkpoint_path(&dir))
        .args(["--api-key", "--port", "41350"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--api-key: its value is the flag --port: give the key after --api-key"),
        "{stderr}"
    );
}

/// Settings from the environment, as containers give them, leave a subcommand its flags:
/// clap's derive took one for the top-level server's flags, which then had no checkpoint,
/// and checked them there, refusing a value the subcommand's flag replaces or never reads.
#[test]
fn settings_from_the_environment_leave_subcommands_their_flags() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let mut child = Command::new(BIN)
        .env("VT_SERVE_HOST", "127.0.0.1")
        .env("VT_SERVE_DEVICE", "cpu")
        .env("VT_SERVE_MAX_BATCH", "5000")
        .args(["serve", "--port", "0", "--max-batch", "8", "--checkpoint"])
        .arg(&checkpoint)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    listening_on(&mut child, 1);
    send_signal(&child, "TERM");
    assert!(wait_for_exit(&mut child).success());

    let files = tempfile::tempdir().unwrap();
    let paths = write_images(files.path(), &test_images(1));
    let output = predict_at(&checkpoint, &[], &paths);
    let from_environment = Command::new(BIN)
        .env("VT_SERVE_PORT", "not a port")
        .args(["predict", "--device", "cpu", "--checkpoint"])
        .arg(&checkpoint)
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        from_environment.status.success(),
        "{}",
        String::from_utf8_lossy(&from_environment.stderr)
    );
    assert_eq!(from_environment.stdout, output.stdout);
}

/// Writes `images` into `dir` under their names, as a user's files to predict.
fn write_images(dir: &Path, images: &[(String, Vec<u8>)]) -> Vec<PathBuf> {
    images
        .iter()
        .map(|(name, bytes)| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect()
}

/// `vt-serve predict` at a precision, as JSON lines.
fn predict_at(checkpoint: &Path, precision: &[&str], paths: &[PathBuf]) -> Output {
    Command::new(BIN)
        .args(["predict", "--device", "cpu"])
        .args(precision)
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(paths)
        .output()
        .unwrap()
}

/// The lines of a `vt-serve predict` that succeeded.
fn predicted_lines(output: Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An f16 model whose logits overflow scores nothing rather than NaN: each image gets an
/// error line naming the cause and the remedy, and the exit status reports them; in f32 the
/// same checkpoint scores them.
#[test]
fn predict_refuses_scores_that_are_not_finite() {
    let dir = overflowing_in_f16_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let files = tempfile::tempdir().unwrap();
    let paths = write_images(files.path(), &test_images(2));
    let f32 = predict_at(&checkpoint, &[], &paths);
    assert!(
        f32.status.success(),
        "{}",
        String::from_utf8_lossy(&f32.stderr)
    );
    let f16 = predict_at(&checkpoint, &["--dtype", "f16"], &paths);
    assert!(!f16.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&f16.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), paths.len());
    for line in &lines {
        let error = line["error"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert!(error.contains("not finite"), "{error}");
        assert!(error.contains("use --dtype f32"), "{error}");
        assert!(line.get("probs").is_none(), "{line}");
    }
}

/// Files that cannot be scored get an error line each, in their place, and the others are
/// still scored; the exit status reports the failures.
#[test]
fn predict_scores_what_it_can_and_names_what_it_cannot() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let files = tempfile::tempdir().unwrap();
    let photo = test_images(1).remove(0).1;
    let images = [
        ("photo.jpg".to_owned(), photo.clone()),
        ("notes.txt".to_owned(), b"not an image".to_vec()),
        ("huge.png".to_owned(), png_declaring(100_000, 100_000)),
    ];
    let mut paths = write_images(files.path(), &images);
    paths.insert(1, files.path().join("missing.jpg"));
    let output = predict_at(&checkpoint, &["--top-k", "2"], &paths);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("3 of 4 images"), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (line, path) in lines.iter().zip(&paths) {
        assert_eq!(line["image"], path.to_string_lossy().as_ref(), "{line}");
    }
    let probs: Vec<f32> = serde_json::from_value(lines[0]["probs"].clone()).unwrap();
    assert_eq!(probs, offline_probs(&checkpoint, &photo));
    assert_eq!(lines[0]["top"].as_array().map(Vec::len), Some(2));
    for (line, reason) in lines[1..].iter().zip(["reading", "not an image", "pixels"]) {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{line}");
    }
    let refused = predict_at(&checkpoint, &["--top-k", "0"], &paths[..1]);
    assert!(!refused.status.success());
}

/// A port another process holds is refused with the way out: another `--port`, or 0.
#[test]
fn a_port_in_use_names_the_flag_that_changes_it() {
    let dir = tiny_checkpoint();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = Command::new(BIN)
        .arg("--checkpoint")
        .arg(checkpoint_path(&dir))
        .args(["--host", "127.0.0.1", "--port", &port])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && stderr.contains("choose another --port; --port 0 takes a free one"),
        "{stderr}"
    );
}

/// A folder stands for its image files, subfolders included, in the order of their paths;
/// other files and hidden ones are left out.
#[test]
fn predict_scores_the_images_of_a_folder() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let files = tempfile::tempdir().unwrap();
    let photos: Vec<Vec<u8>> = test_images(3).into_iter().map(|(_, b)| b).collect();
    let root = files.path().join("photos");
    std::fs::create_dir_all(root.join("sea")).unwrap();
    std::fs::create_dir_all(root.join(".cache")).unwrap();
    let mut expected = write_images(
        &root,
        &[
            ("b.JPG".to_owned(), photos[0].clone()),
            ("a.png.jpg".to_owned(), photos[1].clone()),
        ],
    );
    expected.extend(write_images(
        &root.join("sea"),
        &[("c.jpg".to_owned(), photos[2].clone())],
    ));
    // A name that is not UTF-8 (Latin-1) is written with its byte as `\xNN`, not U+FFFD,
    // which any byte would read as.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let latin1 = root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"));
        std::fs::write(&latin1, &photos[1]).unwrap();
        expected.push(latin1);
    }
    write_images(&root, &[("README.txt".to_owned(), b"notes".to_vec())]);
    write_images(
        &root.join(".cache"),
        &[("d.jpg".to_owned(), photos[0].clone())],
    );
    // Links to folders are not followed: this one back up would loop.
    #[cfg(unix)]
    std::os::unix::fs::symlink(&root, root.join("sea/up")).unwrap();
    expected.sort();
    let output = predict_at(&checkpoint, &[], &[root]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let scored: Vec<&str> = lines.iter().map(|l| l["image"].as_str().unwrap()).collect();
    let expected: Vec<String> = expected
        .iter()
        .map(|p| p.to_string_lossy().replace('\u{FFFD}', "\\xe9"))
        .collect();
    assert_eq!(scored, expected);
    assert!(lines.iter().all(|l| l["probs"].is_array()));
    // A folder without images is an error, before the checkpoint is read.
    let empty = files.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let output = predict_at(Path::new("no-such-checkpoint"), &[], &[empty]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("holds no image file"),
        "{stderr}"
    );
}

/// A reader that stops early (`| head -1`) ends the predictions without an error of its
/// own, as it would end any command's output; the failures reported are among the images
/// whose lines were written.
#[test]
fn predict_stops_quietly_when_its_reader_does() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let files = tempfile::tempdir().unwrap();
    let photo = test_images(1).remove(0).1;
    // Named at length and given many times: more lines than a pipe buffers (64 KiB), so
    // that some are written after the reader is gone.
    let name = format!("{}.jpg", "photo-".repeat(40));
    let mut paths = vec![write_images(files.path(), &[(name, photo)]).remove(0); 400];
    // A file that cannot be scored counts among the images whose lines were written.
    paths.insert(0, files.path().join("missing.jpg"));
    let mut child = Command::new(BIN)
        .args([
            "predict",
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--checkpoint",
        ])
        .arg(&checkpoint)
        .args(&paths)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"error\""), "{first}");
    // The reader is dropped: the rest of the lines have nowhere to go.
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    let total: usize = stderr
        .split("1 of ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(total < paths.len(), "{stderr}");
}

/// A calibrated checkpoint (`vt-train calibrate`'s temperature in its config.json) keeps
/// its logits and scores softmax(logits / T); a temperature that is not positive is refused.
#[test]
fn a_calibrated_checkpoint_scores_its_logits_divided_by_its_temperature() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let calibrated = dir.path().join("calibrated");
    std::fs::create_dir(&calibrated).unwrap();
    std::fs::copy(
        checkpoint.join("model.safetensors"),
        calibrated.join("model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    config["temperature"] = 0.25.into();
    std::fs::write(calibrated.join("config.json"), config.to_string()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let paths = write_images(files.path(), &test_images(3));
    let scores = |checkpoint: &Path| -> Vec<(Vec<f64>, Vec<f64>)> {
        predicted_lines(predict_at(checkpoint, &[], &paths))
            .into_iter()
            .map(|line| {
                let floats = |key: &str| serde_json::from_value(line[key].clone()).unwrap();
                (floats("logits"), floats("probs"))
            })
            .collect()
    };
    let plain = scores(&checkpoint);
    let scaled = scores(&calibrated);
    assert_eq!(plain.len(), paths.len());
    for ((logits, plain_probs), (same_logits, probs)) in plain.iter().zip(&scaled) {
        assert_eq!(logits, same_logits);
        let exps: Vec<f64> = logits.iter().map(|z| (z / 0.25).exp()).collect();
        let sum: f64 = exps.iter().sum();
        for (p, e) in probs.iter().zip(&exps) {
            assert!((p - e / sum).abs() < 1e-5, "{probs:?} vs {exps:?}");
        }
        assert_ne!(probs, plain_probs);
    }
    config["temperature"] = (-1.0).into();
    std::fs::write(calibrated.join("config.json"), config.to_string()).unwrap();
    let refused = predict_at(&calibrated, &[], &paths);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("temperature must be between 0.01 and 100, got -1"),
        "{stderr}"
    );
}

#[test]
fn reduced_precision_predictions_follow_f32() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let files = tempfile::tempdir().unwrap();
    let paths = write_images(files.path(), &test_images(3));
    let probs = |output: Output| -> Vec<Vec<f64>> {
        predicted_lines(output)
            .into_iter()
            .map(|line| serde_json::from_value(line["probs"].clone()).unwrap())
            .collect()
    };
    let full = probs(predict_at(&checkpoint, &["--dtype", "f32"], &paths));
    let half = probs(predict_at(&checkpoint, &["--dtype", "f16"], &paths));
    assert_eq!(full.len(), paths.len());
    for (f, h) in full.iter().zip(&half) {
        for (a, b) in f.iter().zip(h) {
            assert!((a - b).abs() < 1e-2, "f32 {f:?} vs f16 {h:?}");
        }
    }
    let refused = predict_at(&checkpoint, &["--dtype", "bf16"], &paths);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("bf16 tensors run on CUDA devices only")
            && stderr.contains("--bf16-products"),
        "{stderr}"
    );
    let bf16_products = predict_at(&checkpoint, &["--bf16-products"], &paths);
    if vt_model::kernels::bf16_products_available() {
        let bf16_products = probs(bf16_products);
        assert_eq!(bf16_products.len(), paths.len());
        for (f, b) in full.iter().zip(&bf16_products) {
            for (a, b) in f.iter().zip(b) {
                assert!((a - b).abs() < 1e-2, "f32 {f:?} vs bf16 products {b:?}");
            }
        }
    } else {
        assert!(
            !bf16_products.status.success(),
            "bf16 products without AVX512-BF16"
        );
        let stderr = String::from_utf8_lossy(&bf16_products.stderr);
        assert!(stderr.contains("AVX512-BF16"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_matches_offline_predict_and_drains_on_sigterm() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let images = test_images(3);
    let files = tempfile::tempdir().unwrap();
    let paths = write_images(files.path(), &images);

    // The offline command, as a user would run it.
    let output = Command::new(BIN)
        .arg("predict")
        .arg("--checkpoint")
        .arg(&checkpoint)
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let offline: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(offline.len(), images.len());

    let checkpoint_arg = checkpoint.to_str().unwrap();
    let (mut child, base, grpc_addr) = spawn_server(&[
        "--checkpoint",
        checkpoint_arg,
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--device",
        "cpu",
        // Time on a loaded machine to queue both requests and see them queued.
        "--max-delay-ms",
        "4000",
        "--timeout-ms",
        "10000",
    ]);
    let client = client();
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let mut form = Form::new();
    for (name, bytes) in &images {
        form = form.part(
            name.clone(),
            Part::bytes(bytes.clone()).file_name(name.clone()),
        );
    }
    let answer: Value = client
        .post(format!("{base}/predict?top_k=6"))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = answer["results"].as_array().unwrap();
    for (result, line) in results.iter().zip(&offline) {
        let probs: Vec<f32> = serde_json::from_value(line["probs"].clone()).unwrap();
        assert!(line["image"]
            .as_str()
            .unwrap()
            .ends_with(result["filename"].as_str().unwrap()));
        assert_matches_offline(result, &probs, line["image"].as_str().unwrap());
    }

    // Requests waiting for their batch (held open by a slow upload, which the server waits
    // for too, until its deadline) when SIGTERM arrives are still answered, on both ports.
    let _upload = start_endless_upload(&client, &base).await;
    let request = client
        .post(format!("{base}/predict"))
        .body(images[0].1.clone())
        .send();
    let in_flight = tokio::spawn(request);
    let mut grpc = GrpcClient::connect(grpc_addr.unwrap()).await;
    let grpc_request = ModelInferRequest {
        model_name: "tiny".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..InferInputTensor::default()
        }],
        raw_input_contents: vec![binary_elements(&[&images[1].1]).into()],
        ..ModelInferRequest::default()
    };
    let grpc_in_flight = tokio::spawn(async move { grpc.infer(grpc_request).await });
    wait_for_queue_depth(&client, &format!("{base}/metrics"), 2.0).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(scores(&answer).len(), 3, "{answer}");
    let answer = grpc_in_flight.await.unwrap().unwrap();
    let probs: Vec<f32> = serde_json::from_value(offline[1]["probs"].clone()).unwrap();
    assert_close(&grpc_fp32(&answer, "probabilities"), &[probs], "gRPC");
    let status = tokio::task::spawn_blocking(move || wait_for_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Configured by environment variables only and started as `IMAGE serve`, as SageMaker
/// starts a container. `--log-format json`: every stdout and stderr line is one JSON object
/// (the addresses listened on, the error that ends the server too), and each answered
/// request has one under its request id: the client's own, or a fresh one that its answer
/// carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_configured_by_environment_logs_each_request_as_json() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("VT_SERVE_CHECKPOINT", &checkpoint)
        .env("VT_SERVE_MODEL_NAME", "from-env")
        .env("VT_SERVE_PORT", "0")
        .env("VT_SERVE_GRPC_PORT", "0")
        .env("VT_SERVE_DEVICE", "cpu")
        .env("VT_SERVE_LOG_FORMAT", "JSON")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let [base, grpc_url] = ["http", "grpc"].map(|scheme| {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let line: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let url = line["listening"].as_str().unwrap().to_owned();
        assert!(url.starts_with(&format!("{scheme}://")), "{url}");
        url
    });
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());

    let client = client();
    let model = client
        .get(format!("{base}/v1/models/from-env"))
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), StatusCode::OK);
    let (_, photo) = test_images(1).remove(0);
    let predicted = client
        .post(format!("{base}/predict"))
        .header("x-request-id", "client-id-1")
        .body(photo)
        .send()
        .await
        .unwrap();
    assert_eq!(predicted.status(), StatusCode::OK);
    assert_eq!(predicted.headers()["x-request-id"], "client-id-1");
    let missing = client.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let generated = missing.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let hyphens: Vec<usize> = generated.match_indices('-').map(|(i, _)| i).collect();
    assert_eq!(
        (generated.len(), hyphens),
        (36, vec![8, 13, 18, 23]),
        "{generated}"
    );
    let grpc_addr = grpc_url.strip_prefix("grpc://").unwrap().parse().unwrap();
    let mut grpc = GrpcClient::connect(grpc_addr).await;
    let mut asked = tonic::Request::new(ModelMetadataRequest {
        name: "from-env".into(),
        version: String::new(),
    });
    asked
        .metadata_mut()
        .insert("x-request-id", "grpc-id-1".parse().unwrap());
    let metadata: ModelMetadataResponse = grpc
        .call::<ModelMetadataRequest, _>("ModelMetadata", asked)
        .await
        .unwrap();
    assert_eq!(metadata.name, "from-env");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(wait_for_exit(&mut child).success());
    let logs = logs.join().unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string()));
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "vt_serve::access")
        .collect();
    assert_eq!(answered.len(), 4, "{logs}");
    for (line, (id, method, path, status)) in answered.iter().skip(1).zip([
        ("client-id-1", "POST", "/predict", 200),
        (generated.as_str(), "GET", "/nope", 404),
    ]) {
        assert_eq!(line["message"], "answered", "{line}");
        assert_eq!(line["span"]["id"], id, "{line}");
        assert_eq!(line["span"]["method"], method, "{line}");
        assert_eq!(line["span"]["path"], path, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert!(
            line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );
    }
    // A gRPC call's line: its method's path, and its status code.
    let line = answered[3];
    assert_eq!(line["message"], "answered", "{line}");
    assert_eq!(line["span"]["id"], "grpc-id-1", "{line}");
    assert_eq!(
        line["span"]["path"], "/inference.GRPCInferenceService/ModelMetadata",
        "{line}"
    );
    assert_eq!(line["code"], "OK", "{line}");

    // The error that ends the server, a JSON line too, which no RUST_LOG leaves out.
    let out = Command::new(BIN)
        .args([
            "--checkpoint",
            "nowhere",
            "--port",
            "0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let error = lines.last().unwrap();
    assert_eq!(error["level"], "ERROR", "{stderr}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("nowhere"), "{stderr}");
}

/// A server whose stderr reader went away (`vt-serve ... 2>&1 | head`, a log shipper that
/// restarts) keeps answering, though every log line now fails to write, and SIGTERM still
/// ends it with 0: in both log formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_stderr_is_closed_keeps_answering() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let (_, photo) = test_images(1).remove(0);
    let client = client();
    for format in ["text", "json"] {
        let mut child = Command::new(BIN)
            .arg("--checkpoint")
            .arg(&checkpoint)
            .args(["--port", "0", "--device", "cpu", "--log-format", format])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(KilledOnDrop)
            .unwrap();
        let base = listening_on(&mut child, 1).remove(0);
        // The reading end closed: every write to stderr from now on is EPIPE.
        drop(child.stderr.take());
        for _ in 0..3 {
            let live = client
                .get(format!("{base}/health/live"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{format} logs: {e}"));
            assert_eq!(live.status(), StatusCode::OK, "{format} logs");
            let predicted = client
                .post(format!("{base}/predict"))
                .body(photo.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{format} logs: {e}"));
            assert_eq!(predicted.status(), StatusCode::OK, "{format} logs");
        }
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = wait_for_exit(&mut child);
        assert!(status.success(), "{format} logs: exit status {status}");
    }
}

/// Sends `signal` (`HUP`, `TERM`...) to the process.
fn send_signal(child: &Child, signal: &str) {
    let kill = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// The process's stderr lines, as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("{line}");
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    received
}

/// Waits (bounded) for a line that contains `needle`, and returns it.
fn line_with(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
    panic!("no line with {needle:?}");
}

/// A SIGHUP that arrives while the checkpoint loads does not end the process: it reloads
/// the checkpoint once serving (the same files: counted unchanged, the model kept). The
/// weights file is a FIFO, so that the load is held until the signal was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_during_startup_is_a_reload_once_serving() {
    let dir = tiny_checkpoint();
    let (mut child, mut writer, weights, saved) =
        start_loading_through_a_fifo(&checkpoint_path(&dir));
    send_signal(&child, "HUP");
    // The reload after startup reads a plain file; the load under way, the FIFO.
    let bytes = std::fs::read(&saved).unwrap();
    std::fs::rename(&saved, &weights).unwrap();
    let written = std::io::Write::write_all(&mut writer, &bytes);
    drop(writer);
    if let Err(e) = written {
        let status = wait_for_exit(&mut child);
        panic!("the server stopped reading its weights ({e}): it exited with {status}");
    }
    let base = listening_on(&mut child, 1).remove(0);
    let client = client();
    let reloaded = r#"vt_serve_model_reloads_total{result="unchanged"}"#;
    wait_for_gauge(&client, &format!("{base}/metrics"), reloaded, 1.0).await;
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["models"][0]["generation"], 1, "{models}");
    send_signal(&child, "TERM");
    assert!(wait_for_exit(&mut child).success());
}

/// A SIGTERM sent as soon as the address is printed shuts the server down (exit 0): the
/// handlers are in place before the line that says the server listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_right_after_the_address_is_a_clean_stop() {
    let dir = tiny_checkpoint();
    for _ in 0..5 {
        let mut child = Command::new(BIN)
            .arg("--checkpoint")
            .arg(checkpoint_path(&dir))
            .args(["--port", "0", "--device", "cpu", "--grpc-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KilledOnDrop)
            .unwrap();
        // Both lines read: a pipe closed under the second would fail the server.
        listening_on(&mut child, 2);
        send_signal(&child, "TERM");
        let status = tokio::task::spawn_blocking(move || wait_for_exit(&mut child))
            .await
            .unwrap();
        assert!(status.success(), "exit status {status}");
    }
}

/// A SIGTERM while the checkpoint loads ends the process, by its handler: as a container's
/// PID 1 the kernel ignores a signal without one, and the server would go on to serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_startup_stops_before_serving() {
    let dir = tiny_checkpoint();
    let (mut child, writer, _, _) = start_loading_through_a_fifo(&checkpoint_path(&dir));
    send_signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || wait_for_exit(&mut child))
        .await
        .unwrap();
    drop(writer);
    assert!(status.success(), "exit status {status}");
}

/// Starts the binary on `checkpoint` whose `model.safetensors` is made a FIFO, so that its
/// load waits for the test to write the weights: returns it once it reads the FIFO, the
/// FIFO opened for writing, its path and the weights' file.
fn start_loading_through_a_fifo(
    checkpoint: &Path,
) -> (KilledOnDrop, std::fs::File, PathBuf, PathBuf) {
    let weights = checkpoint.join("model.safetensors");
    let saved = checkpoint.join("saved.safetensors");
    std::fs::rename(&weights, &saved).unwrap();
    let fifo = Command::new("mkfifo").arg(&weights).status().unwrap();
    assert!(fifo.success());
    let child = Command::new(BIN)
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(["--port", "0", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    // Opening the FIFO for writing waits until the server opens it to read the weights.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap();
    (child, writer, weights, saved)
}

/// A second SIGTERM ends the drain at once (a request in flight would hold it for up to
/// --timeout-ms), and the process exits 1, having logged the requests it dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let mut child = Command::new(BIN)
        .arg("--checkpoint")
        .arg(&checkpoint)
        .args(["--port", "0", "--device", "cpu", "--timeout-ms", "600000"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    let base = listening_on(&mut child, 1).remove(0);
    let lines = stderr_lines(&mut child);
    let client = client();
    let _upload = start_endless_upload(&client, &base).await;
    send_signal(&child, "TERM");
    line_with(&lines, "shutting down");
    send_signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || wait_for_exit(&mut child))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1), "exit status {status}");
    line_with(&lines, "second shutdown signal");
    // The upload it dropped is logged as the server's doing, not its client's.
    let rest: Vec<String> = lines.iter().collect();
    let dropped = rest
        .iter()
        .find(|line| line.contains("server stopped: not answered"));
    assert!(
        dropped.is_some_and(|line| line.contains("status=0")),
        "{rest:#?}"
    );
    assert!(
        !rest.iter().any(|line| line.contains("client went away")),
        "{rest:#?}"
    );
}

/// Text logs quote request ids, so that an id cannot forge a log line; an empty id is
/// replaced by a fresh one, and one that is not UTF-8 is logged lossily. A request whose
/// client went away is logged. Settings set but empty or blank in the environment (as Helm
/// leaves them; RUST_LOG too, which logs at `info` then) are unset, and lists of origins may
/// have spaces after their commas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_quote_request_ids_and_empty_settings_are_unset() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let mut child = Command::new(BIN)
        .env("VT_SERVE_CHECKPOINT", &checkpoint)
        .env("VT_SERVE_PORT", "0")
        .env("VT_SERVE_GRPC_PORT", "")
        .env("VT_SERVE_MAX_BATCH", " ")
        .env("VT_SERVE_DEVICE", "cpu")
        .env("VT_SERVE_MAX_DELAY_MS", "60000")
        .env(
            "VT_SERVE_CORS_ALLOW_ORIGIN",
            "https://a.example, https://b.example",
        )
        .env("RUST_LOG", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(KilledOnDrop)
        .unwrap();
    let base = listening_on(&mut child, 1).remove(0);
    let lines = stderr_lines(&mut child);
    let client = client();

    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("{base}/predict"))
        .header("origin", "https://b.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://b.example"
    );

    let forged = "abc def}: vt_serve::access: answered status=200";
    let answer = client
        .get(format!("{base}/health/live"))
        .header("x-request-id", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-request-id"], forged);
    let line = line_with(&lines, "abc def");
    assert!(
        line.contains(r#"id="abc def}: vt_serve::access: answered status=200""#),
        "{line}"
    );

    let answer = client
        .get(format!("{base}/health/live"))
        .header("x-request-id", "")
        .send()
        .await
        .unwrap();
    let fresh = answer.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(fresh.len(), 36, "{fresh:?}");
    line_with(&lines, &format!(r#"id="{fresh}""#));

    let not_utf8 = reqwest::header::HeaderValue::from_bytes(b"id-\xff-1").unwrap();
    let answer = client
        .get(format!("{base}/health/live"))
        .header("x-request-id", not_utf8.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-request-id"], not_utf8);
    line_with(&lines, "id=\"id-\u{fffd}-1\"");

    // Held in the queue by a batch that waits for an endless upload; then the client goes.
    let upload = start_endless_upload(&client, &base).await;
    let (_, photo) = test_images(1).remove(0);
    let mut stream = tokio::net::TcpStream::connect(base.strip_prefix("http://").unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: test\r\nx-request-id: gone-1\r\n\
         Content-Length: {}\r\n\r\n",
        photo.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, &[head.as_bytes(), &photo].concat())
        .await
        .unwrap();
    wait_for_queue_depth(&client, &format!("{base}/metrics"), 1.0).await;
    drop(stream);
    let line = line_with(&lines, "client went away");
    assert!(
        line.contains(r#"id="gone-1""#) && line.contains("status=499"),
        "{line}"
    );
    drop(upload);
    send_signal(&child, "TERM");
    assert!(wait_for_exit(&mut child).success());
}
