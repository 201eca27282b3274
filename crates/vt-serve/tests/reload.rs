//! Reloading the checkpoint without downtime: SIGHUP to the real binary after the folder was
//! replaced the way vt-train writes it or a link to it moved, a broken checkpoint that leaves
//! the previous model serving, requests in flight across reloads, and a request already
//! queued for the old model while a model of another image size is swapped in.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use vt_model::{Arch, Model, VtConfig};

const BIN: &str = env!("CARGO_BIN_EXE_vt-serve");

/// Writes a tiny random checkpoint to `dir` as vt-train does: built in a sibling folder and
/// renamed over any previous one.
fn write_checkpoint(dir: &Path, classes: &[&str], image_size: usize) {
    let mut config = VtConfig::new(Arch::VtResNet18, classes.len(), image_size);
    config.class_names = classes.iter().map(|c| c.to_string()).collect();
    config.tokens = 4;
    config.token_channels = 32;
    config.heads = 2;
    Model::init(config, &Device::Cpu)
        .unwrap()
        .save(dir)
        .unwrap();
}

const OLD_CLASSES: [&str; 2] = ["x", "y"];
const NEW_CLASSES: [&str; 3] = ["p", "q", "r"];

/// The binary, serving `checkpoint` on a free port, with its stderr collected.
struct Served {
    child: KilledOnDrop,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Served {
    fn start(checkpoint: &Path) -> Served {
        Served::start_with(checkpoint, &[])
    }

    fn start_with(checkpoint: &Path, extra: &[&str]) -> Served {
        let mut child = Command::new(BIN)
            .arg("--checkpoint")
            .arg(checkpoint)
            .args(["--port", "0", "--device", "cpu", "--timeout-ms", "20000"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(KilledOnDrop)
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let lines = BufReader::new(child.stderr.take().unwrap());
        let collected = Arc::clone(&stderr);
        // Read to the end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                eprintln!("vt-serve: {line}");
                collected.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Served {
            child,
            base,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) {
        self.signal("TERM");
        let status = tokio::task::spawn_blocking(move || {
            for _ in 0..1200 {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.child.kill().unwrap();
            panic!("the server did not exit after SIGTERM");
        })
        .await
        .unwrap();
        assert!(status.success(), "exit status {status}");
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    response.json().await.unwrap()
}

/// The model `/v1/models` reports.
async fn current_model(client: &reqwest::Client, base: &str) -> Value {
    get_json(client, &format!("{base}/v1/models")).await["models"][0].clone()
}

/// Polls `/v1/models` (bounded) until its generation reaches `generation`.
async fn wait_for_generation(client: &reqwest::Client, base: &str, generation: u64) -> Value {
    for _ in 0..600 {
        let model = current_model(client, base).await;
        if model["generation"].as_u64() >= Some(generation) {
            return model;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the model never reached generation {generation}");
}

/// Polls `/metrics` (bounded) until the reloads with `result` reach `count`.
async fn wait_for_reloads(client: &reqwest::Client, base: &str, result: &str, count: f64) {
    let series = format!("vt_serve_model_reloads_total{{result=\"{result}\"}}");
    for _ in 0..600 {
        let text = metrics_text(client, &format!("{base}/metrics")).await;
        if metric(&text, &series) >= Some(count) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} never reached {count}");
}

/// `/predict` with every class listed: status and answer.
async fn predict(client: &reqwest::Client, base: &str, image: &[u8]) -> (StatusCode, Value) {
    let response = client
        .post(format!("{base}/predict?top_k=10"))
        .body(image.to_vec())
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

/// The labels of an answer, sorted.
fn labels(answer: &Value) -> Vec<String> {
    let mut labels: Vec<String> = scores(answer).into_iter().map(|(l, _)| l).collect();
    labels.sort();
    labels
}

/// Asserts that the server's scores are those of `checkpoint` run offline.
fn assert_scores_of(answer: &Value, checkpoint: &Path, classes: &[&str], image: &[u8]) {
    let offline = offline_probs(checkpoint, image);
    let scores = scores(answer);
    assert_eq!(scores.len(), classes.len(), "{answer}");
    for (label, score) in scores {
        let class = classes.iter().position(|c| *c == label).unwrap();
        assert!(
            (score - f64::from(offline[class])).abs() < 1e-5,
            "{label}: {score} served, {} offline",
            offline[class]
        );
    }
}

fn reloads(text: &str, result: &str) -> Option<f64> {
    metric(
        text,
        &format!("vt_serve_model_reloads_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_in_a_replaced_checkpoint_and_keeps_serving_when_the_new_one_is_broken() {
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let image = test_images(1).remove(0).1;
    let server = Served::start(&checkpoint);
    let client = client();

    let first = current_model(&client, &server.base).await;
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["classes"], json!(OLD_CLASSES));
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(labels(&answer), OLD_CLASSES);
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "ok"), Some(0.0), "{text}");
    assert_eq!(reloads(&text, "error"), Some(0.0), "{text}");

    // Retrained: other classes, another image size.
    write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
    server.signal("HUP");
    let second = wait_for_generation(&client, &server.base, 2).await;
    assert_eq!(second["generation"], 2, "{second}");
    assert_eq!(second["classes"], json!(NEW_CLASSES));
    assert_eq!(second["image_size"], 64);
    assert_eq!(second["name"], "best");
    assert_ne!(second["sha256"], first["sha256"]);
    assert!(second["loaded_at"].as_u64() >= first["loaded_at"].as_u64());
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_scores_of(&answer, &checkpoint, &NEW_CLASSES, &image);
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "ok"), Some(1.0), "{text}");
    // The model served, in the metrics: the new model's series only.
    let info = |model: &Value| {
        format!(
            "vt_serve_model_info{{device=\"cpu\",dtype=\"f32\",generation=\"{}\",name=\"best\",sha256={}}}",
            model["generation"], model["sha256"]
        )
    };
    assert_eq!(metric(&text, &info(&second)), Some(1.0), "{text}");
    assert_eq!(metric(&text, &info(&first)), None, "{text}");
    assert_eq!(
        metric(&text, "vt_serve_model_loaded_timestamp_seconds"),
        second["loaded_at"].as_f64(),
        "{text}"
    );

    // A broken checkpoint: the previous model keeps serving, and the log says why.
    let weights = checkpoint.join("model.safetensors");
    let kept = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    server.signal("HUP");
    wait_for_reloads(&client, &server.base, "error", 1.0).await;
    let still = current_model(&client, &server.base).await;
    assert_eq!(still["generation"], 2, "{still}");
    assert_eq!(still["sha256"], second["sha256"]);
    let ready = client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(labels(&answer), NEW_CLASSES);
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "ok"), Some(1.0), "{text}");
    let log = server.stderr.lock().unwrap().clone();
    let failure = log
        .lines()
        .find(|line| line.contains("reload failed"))
        .unwrap_or_else(|| panic!("no reload failure in the log:\n{log}"));
    assert!(
        failure.contains(&checkpoint.display().to_string()) && failure.contains("No such file"),
        "{failure}"
    );

    // A config claiming tensors no memory holds: refused by the weights' shapes, before any
    // allocation could abort the server.
    std::fs::write(&weights, kept).unwrap();
    let config_path = checkpoint.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["tokens"] = json!(8_589_934_592u64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    server.signal("HUP");
    wait_for_reloads(&client, &server.base, "error", 2.0).await;
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(current_model(&client, &server.base).await["generation"], 2);
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.lines()
            .any(|line| line.contains("reload failed") && line.contains("8589934592")),
        "{log}"
    );

    server.stop().await;
}

/// Replaces the file at `path` whole, as an editor saves: a check sees it changed once.
fn replace_file(path: &Path, contents: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::rename(new, path).unwrap();
}

/// With --reload-poll-ms, a checkpoint replaced as vt-train replaces `best/` is served
/// without a signal; a broken one is tried once and the previous model keeps serving until
/// the files change again; a checkpoint left alone is not reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_checkpoint_is_reloaded_by_polling() {
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let image = test_images(1).remove(0).1;
    let server = Served::start_with(&checkpoint, &["--reload-poll-ms", "50"]);
    let client = client();
    let first = current_model(&client, &server.base).await;

    // Unchanged, though other files come and go beside its own, which are read and linked
    // to: twenty checks, no reload.
    std::fs::write(checkpoint.join("notes.txt"), "hi").unwrap();
    std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    std::fs::hard_link(
        checkpoint.join("config.json"),
        root.path().join("linked.json"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::remove_file(checkpoint.join("notes.txt")).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "ok"), Some(0.0), "{text}");
    assert_eq!(reloads(&text, "error"), Some(0.0), "{text}");

    write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
    let second = wait_for_generation(&client, &server.base, 2).await;
    assert_eq!(second["classes"], json!(NEW_CLASSES), "{second}");
    assert_ne!(second["sha256"], first["sha256"]);
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_scores_of(&answer, &checkpoint, &NEW_CLASSES, &image);

    // Broken in place: one failed reload, not repeated at each check.
    let config_path = checkpoint.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    replace_file(&config_path, "{");
    wait_for_reloads(&client, &server.base, "error", 1.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "error"), Some(1.0), "{text}");
    assert_eq!(current_model(&client, &server.base).await["generation"], 2);
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(labels(&answer), NEW_CLASSES);

    // Mended as it was: reloaded, and found the model served, which stays.
    replace_file(&config_path, &config);
    wait_for_reloads(&client, &server.base, "unchanged", 1.0).await;
    assert_eq!(current_model(&client, &server.base).await["generation"], 2);

    // New permissions alone (a reload refused for them is tried again once they change,
    // which this root-run test cannot be refused for).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let weights = checkpoint.join("model.safetensors");
        std::fs::set_permissions(&weights, std::fs::Permissions::from_mode(0o600)).unwrap();
        wait_for_reloads(&client, &server.base, "unchanged", 2.0).await;
        assert_eq!(current_model(&client, &server.base).await["generation"], 2);
    }

    // Gone: warned about, still serving.
    std::fs::rename(&checkpoint, root.path().join("moved")).unwrap();
    for _ in 0..100 {
        if server
            .stderr
            .lock()
            .unwrap()
            .contains("cannot read the checkpoint")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.stderr.lock().unwrap().clone();
    assert_eq!(
        log.matches("cannot read the checkpoint").count(),
        1,
        "{log}"
    );
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = metrics_text(&client, &server.url("/metrics")).await;
    let unchanged = if cfg!(unix) { 2.0 } else { 1.0 };
    assert_eq!(reloads(&text, "ok"), Some(1.0), "{text}");
    assert_eq!(reloads(&text, "unchanged"), Some(unchanged), "{text}");
    assert_eq!(reloads(&text, "error"), Some(1.0), "{text}");
    server.stop().await;
}

/// A request takes the model serving once its body is read, on every route: one whose body
/// was still arriving when a reload swapped in a model of other classes is answered by the
/// new model, as `/v1/models` then reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_takes_the_model_serving_once_its_body_is_read() {
    use base64::Engine;
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let server = TestServer::start(&checkpoint, &["--max-delay-ms", "0"]).await;
    let client = client();
    let image = test_images(1).remove(0).1;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let v2 =
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let v1 = json!({"instances": [{"b64": b64}]});
    let mut generation = 1;
    for (route, body) in [
        ("/v2/models/best/infer", v2),
        ("/v1/models/best:predict", v1),
    ] {
        let body = serde_json::to_vec(&body).unwrap();
        let (head, tail) = body.split_at(body.len() / 2);
        let (send, chunks) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        send.send(Ok(head.to_vec())).await.unwrap();
        let request = client
            .post(server.url(route))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::unfold(
                chunks,
                |mut chunks| async move { chunks.recv().await.map(|chunk| (chunk, chunks)) },
            )))
            .send();
        let answer = tokio::spawn(request);
        wait_for_gauge(
            &client,
            &server.url("/metrics"),
            "vt_serve_requests_arriving",
            1.0,
        )
        .await;

        let classes = if generation % 2 == 1 {
            &NEW_CLASSES[..]
        } else {
            &OLD_CLASSES[..]
        };
        write_checkpoint(&checkpoint, classes, 32);
        generation += 1;
        assert_eq!(
            server.state.reload().await.unwrap().info.generation,
            generation
        );
        send.send(Ok(tail.to_vec())).await.unwrap();
        drop(send);
        let answer = answer.await.unwrap().unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{route}");
        let answer: Value = answer.json().await.unwrap();
        if route.starts_with("/v2") {
            assert_eq!(answer["model_version"], generation.to_string(), "{answer}");
            assert_eq!(
                answer["outputs"][0]["shape"],
                json!([1, classes.len()]),
                "{answer}"
            );
        } else {
            let mut names: Vec<String> =
                serde_json::from_value(answer["predictions"][0]["displayNames"].clone()).unwrap();
            names.sort();
            assert_eq!(names, classes, "{answer}");
        }
    }
    server.shutdown().await;
}

/// A checkpoint replaced and reloaded by SIGHUP is not reloaded a second time by the next
/// check of `--reload-poll-ms`: the check compares the files with those of the last reload,
/// whichever started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_by_sighup_is_not_repeated_by_polling() {
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let server = Served::start_with(&checkpoint, &["--reload-poll-ms", "500"]);
    let client = client();

    write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
    server.signal("HUP");
    wait_for_generation(&client, &server.base, 2).await;
    // Several checks later. A check may have seen the change before the signal did, and
    // reloaded first; no check reloads after the first reload.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let log = server.stderr.lock().unwrap().clone();
    let (_, after_first_reload) = log.split_once("reloaded the model").unwrap();
    assert!(
        !after_first_reload.contains("the checkpoint changed"),
        "{log}"
    );
    let polled = log.matches("the checkpoint changed").count();
    assert_eq!(
        log.matches("reloaded the model").count(),
        1 + polled,
        "{log}"
    );
    server.stop().await;
}

/// A deployment that points a link at the checkpoint to serve: the model is named after the
/// link, as given, before and after the link moves, so that clients keep their URLs.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_checkpoint_keeps_the_links_name_when_the_link_moves() {
    let root = tempfile::tempdir().unwrap();
    write_checkpoint(&root.path().join("epoch-1"), &OLD_CLASSES, 32);
    write_checkpoint(&root.path().join("epoch-2"), &NEW_CLASSES, 32);
    let link = root.path().join("best");
    std::os::unix::fs::symlink("epoch-1", &link).unwrap();
    let server = Served::start(&link);
    let client = client();
    let first = current_model(&client, &server.base).await;
    assert_eq!(first["name"], "best", "{first}");
    assert_eq!(first["classes"], json!(OLD_CLASSES));

    let moving = root.path().join("best.new");
    std::os::unix::fs::symlink("epoch-2", &moving).unwrap();
    std::fs::rename(&moving, &link).unwrap();
    server.signal("HUP");
    let second = wait_for_generation(&client, &server.base, 2).await;
    assert_eq!(second["name"], "best", "{second}");
    assert_eq!(second["classes"], json!(NEW_CLASSES));
    let metadata = get_json(&client, &server.url("/v2/models/best")).await;
    assert_eq!(metadata["versions"], json!(["2"]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_across_reloads_all_succeed() {
    const CLIENTS: usize = 4;
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let images = Arc::new(test_images(4));
    let server = Served::start(&checkpoint);
    let client = client();

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, base, images, stop) = (
            client.clone(),
            server.base.clone(),
            Arc::clone(&images),
            Arc::clone(&stop),
        );
        clients.spawn(async move {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                let image = &images[(c + answered) % images.len()].1;
                let (status, answer) = predict(&client, &base, image).await;
                assert_eq!(status, StatusCode::OK, "{answer}");
                // Each answer comes from one model, whole.
                let labels = labels(&answer);
                assert!(labels == OLD_CLASSES || labels == NEW_CLASSES, "{answer}");
                answered += 1;
            }
            answered
        });
    }

    let mut generation = 1;
    for round in 0..4 {
        if round % 2 == 0 {
            write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
        } else {
            write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
        }
        server.signal("HUP");
        generation += 1;
        wait_for_generation(&client, &server.base, generation).await;
    }
    // SIGHUPs in a burst: each reload after the one under way is queued, several as one;
    // the first loads the new files, any after it finds them unchanged.
    write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
    for _ in 0..3 {
        server.signal("HUP");
    }
    let last = wait_for_generation(&client, &server.base, generation + 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        current_model(&client, &server.base).await["generation"],
        last["generation"]
    );
    assert_eq!(last["generation"].as_u64(), Some(generation + 1), "{last}");
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    while let Some(count) = clients.join_next().await {
        answered += count.unwrap();
    }
    assert!(answered >= CLIENTS, "only {answered} requests answered");
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(reloads(&text, "error"), Some(0.0), "{text}");
    server.stop().await;
}

/// A request already queued for the old model is answered by it, with its labels, although a
/// model of another image size was swapped in meanwhile; a later request gets the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_before_a_reload_finishes_on_the_old_model() {
    let root = tempfile::tempdir().unwrap();
    let checkpoint = root.path().join("best");
    write_checkpoint(&checkpoint, &OLD_CLASSES, 32);
    let image = test_images(1).remove(0).1;
    let old_probs = offline_probs(&checkpoint, &image);
    let server = TestServer::start(
        &checkpoint,
        &["--max-delay-ms", "20000", "--timeout-ms", "30000"],
    )
    .await;
    let client = client();

    // A slow upload holds the batch window open, so the request waits queued on the old
    // model's thread.
    let upload = start_endless_upload(&client, &server.base).await;
    let base = server.base.clone();
    let queued = {
        let (client, image) = (client.clone(), image.clone());
        tokio::spawn(async move { predict(&client, &base, &image).await })
    };
    wait_for_queue_depth(&client, &server.url("/metrics"), 1.0).await;

    write_checkpoint(&checkpoint, &NEW_CLASSES, 64);
    let model = server.state.reload().await.unwrap();
    assert_eq!(model.info.generation, 2);
    assert_eq!(model.info.image_size, 64);
    drop(upload);

    let (status, answer) = queued.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(labels(&answer), OLD_CLASSES);
    for (label, score) in scores(&answer) {
        let class = OLD_CLASSES.iter().position(|c| *c == label).unwrap();
        assert!(
            (score - f64::from(old_probs[class])).abs() < 1e-5,
            "{answer}"
        );
    }
    let (status, answer) = predict(&client, &server.base, &image).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_scores_of(&answer, &checkpoint, &NEW_CLASSES, &image);
    server.shutdown().await;
}
