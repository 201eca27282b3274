//! The serving platforms' protocols on a server started in-process.
//!
//! The Open Inference Protocol (KServe V2, Triton's HTTP API): metadata and health,
//! inference in JSON and with binary tensor data (bodies written by NVIDIA's tritonclient, in
//! `fixtures/tritonclient/`), of encoded or preprocessed images, compressed or not, the classification extension, versions
//! across a reload, and errors in the protocol's shape. KServe V1 / TensorFlow Serving /
//! Vertex AI `{"instances"}` requests: every instance form, the parameters, and errors.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use candle_core::{DType, Device, Tensor};
use common::*;
use reqwest::header::{ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vt_model::Model;
use vt_serve::Classifier;

const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tritonclient")
}

/// An answer split as the binary tensor data extension says: the JSON header, and the
/// binary data of each output that has a `binary_data_size`, by name.
struct Answer {
    status: StatusCode,
    header: Value,
    binary: Vec<(String, Vec<u8>)>,
}

impl Answer {
    fn output(&self, name: &str) -> &Value {
        self.header["outputs"]
            .as_array()
            .and_then(|outputs| outputs.iter().find(|o| o["name"] == name))
            .unwrap_or_else(|| panic!("no output {name} in {}", self.header))
    }

    /// An FP32 output's values, from JSON or binary data.
    fn fp32(&self, name: &str) -> Vec<f32> {
        let output = self.output(name);
        assert_eq!(output["datatype"], "FP32", "{output}");
        if let Some(data) = output["data"].as_array() {
            return data.iter().map(|v| v.as_f64().unwrap() as f32).collect();
        }
        let (_, bytes) = self.binary.iter().find(|(n, _)| n == name).unwrap();
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// A BYTES output's elements as text, from JSON or binary data.
    fn strings(&self, name: &str) -> Vec<String> {
        let output = self.output(name);
        assert_eq!(output["datatype"], "BYTES", "{output}");
        if let Some(data) = output["data"].as_array() {
            return data
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
        }
        let (_, mut bytes) = self.binary.iter().find(|(n, _)| n == name).unwrap().clone();
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let length = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
            out.push(String::from_utf8(bytes[4..4 + length].to_vec()).unwrap());
            bytes.drain(..4 + length);
        }
        out
    }
}

async fn infer(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    header_length: Option<usize>,
) -> Answer {
    infer_encoded(client, url, body, header_length, None).await
}

/// As tritonclient's `request_compression_algorithm` and `response_compression_algorithm`
/// do when `encoding` is given: the body is sent compressed (the header length counting the
/// uncompressed JSON), and the answer must come back compressed the same way.
async fn infer_encoded(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    header_length: Option<usize>,
    encoding: Option<&str>,
) -> Answer {
    let mut request = client.post(url);
    if let Some(n) = header_length {
        request = request
            .header(HEADER_LENGTH, n)
            .header(CONTENT_TYPE, "application/octet-stream");
    }
    // `encoding` as written in the request; the coding it names, as the answer names it.
    let coding = encoding.map(|e| e.to_ascii_lowercase().replace("x-gzip", "gzip"));
    let coding = coding.as_deref();
    request = match (encoding, coding) {
        (Some(encoding), Some(coding)) => request
            .header(CONTENT_ENCODING, encoding)
            .header(ACCEPT_ENCODING, coding)
            .body(compress(coding, &body)),
        _ => request.body(body),
    };
    let response = request.send().await.unwrap();
    let status = response.status();
    let header_length = response
        .headers()
        .get(HEADER_LENGTH)
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    let answer_encoding = response
        .headers()
        .get(CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(answer_encoding.as_deref(), coding);
    let body = response.bytes().await.unwrap().to_vec();
    let body = match coding {
        Some(coding) => decompress(coding, &body),
        None => body,
    };
    let split = header_length.unwrap_or(body.len());
    let header: Value = serde_json::from_slice(&body[..split])
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    let mut binary = Vec::new();
    let mut at = split;
    for output in header["outputs"].as_array().into_iter().flatten() {
        if let Some(size) = output["parameters"]["binary_data_size"].as_u64() {
            let end = at + size as usize;
            binary.push((
                output["name"].as_str().unwrap().to_owned(),
                body[at..end].to_vec(),
            ));
            at = end;
        }
    }
    assert_eq!(at, body.len(), "binary data left over: {header}");
    Answer {
        status,
        header,
        binary,
    }
}

/// A gzip body of under 1 MB that decodes to 11 MB, past the default body limit.
fn gzip_bomb() -> Vec<u8> {
    let bomb = compress("gzip", &vec![b' '; 11 << 20]);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    bomb
}

/// An `{"instances"}` request to `url`: the answer's status, `Retry-After` and JSON body.
async fn predict_instances(
    client: &reqwest::Client,
    url: &str,
    request: &Value,
) -> (StatusCode, Option<String>, Value) {
    let response = client.post(url).json(request).send().await.unwrap();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    (
        response.status(),
        retry_after,
        response.json().await.unwrap(),
    )
}

/// An answer of `expected` status in the protocols' error shape, `{"error": MESSAGE}`, its
/// message saying `needle`.
fn assert_error_message(status: StatusCode, body: &Value, expected: StatusCode, needle: &str) {
    assert_eq!(status, expected, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "no `{needle}` in {body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
}

fn json_body(images: &[&[u8]]) -> Vec<u8> {
    let data: Vec<String> = images
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .collect();
    serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [images.len()], "datatype": "BYTES", "data": data}],
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_and_versions_follow_the_protocol() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(
        &checkpoint,
        &[
            "--model-name",
            "intel-vt",
            "--queue",
            "12",
            "--max-batch",
            "4",
            "--max-delay-ms",
            "7",
        ],
    )
    .await;
    let client = client();
    let get = |path: &str| {
        let request = client.get(server.url(path));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (status, body) = get("/v2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "vt-serve");
    assert_eq!(
        body["extensions"],
        json!([
            "binary_tensor_data",
            "classification",
            "model_configuration"
        ])
    );
    assert_eq!(
        get("/v2/health/live").await,
        (StatusCode::OK, json!({"live": true}))
    );
    assert_eq!(
        get("/v2/health/ready").await,
        (StatusCode::OK, json!({"ready": true}))
    );

    let metadata = json!({
        "name": "intel-vt",
        "versions": ["1"],
        "platform": "candle_safetensors",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 6]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, 6]},
        ],
    });
    assert_eq!(
        get("/v2/models/intel-vt").await,
        (StatusCode::OK, metadata.clone())
    );
    assert_eq!(get("/v2/models/intel-vt/versions/1").await.1, metadata);
    let ready = json!({"name": "intel-vt", "ready": true});
    assert_eq!(
        get("/v2/models/intel-vt/ready").await,
        (StatusCode::OK, ready.clone())
    );
    assert_eq!(get("/v2/models/intel-vt/versions/1/ready").await.1, ready);
    // Triton's model configuration, in its JSON: requests of up to --queue images, a
    // batcher of --max-batch images that waits --max-delay-ms.
    let config = json!({
        "name": "intel-vt",
        "platform": "candle_safetensors",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 12,
        "input": [{
            "name": "image",
            "data_type": "TYPE_STRING",
            "format": "FORMAT_NONE",
            "dims": [1],
            "reshape": {"shape": []},
        }],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [6]},
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [6]},
        ],
        "instance_group": [{"name": "intel-vt", "count": 1, "gpus": [], "kind": "KIND_CPU"}],
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 7000},
    });
    assert_eq!(
        get("/v2/models/intel-vt/config").await,
        (StatusCode::OK, config.clone())
    );
    assert_eq!(get("/v2/models/intel-vt/versions/1/config").await.1, config);
    // --model-name names the model in the rest of the API too.
    assert_eq!(get("/v1/models").await.1["models"][0]["name"], "intel-vt");

    // Unknown models and versions: 404 with {"error": MESSAGE} alone.
    for path in [
        "/v2/models/tiny",
        "/v2/models/intel-vt/versions/2",
        "/v2/models/tiny/ready",
        "/v2/models/tiny/config",
        "/v2/models/intel-vt/versions/2/config",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("intel-vt"), "{path}: {body}");
        assert_eq!(body.as_object().unwrap().len(), 1, "{path}: {body}");
    }

    // A reload of the same files keeps the version, as Triton keeps an unchanged model; one
    // of changed files (a calibration's temperature here) makes the next version the only
    // one.
    let (_, photo) = test_images(1).remove(0);
    server.state.reload().await.unwrap();
    assert_eq!(get("/v2/models/intel-vt").await.1["versions"], json!(["1"]));
    let reloads = |result: &str| format!("vt_serve_model_reloads_total{{result=\"{result}\"}} 1");
    let metrics = metrics_text(&client, &server.url("/metrics")).await;
    assert!(metrics.contains(&reloads("unchanged")), "{metrics}");
    let config_path = checkpoint.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["temperature"] = json!(2.0);
    std::fs::write(&config_path, config.to_string()).unwrap();
    server.state.reload().await.unwrap();
    assert_eq!(get("/v2/models/intel-vt").await.1["versions"], json!(["2"]));
    let metrics = metrics_text(&client, &server.url("/metrics")).await;
    assert!(metrics.contains(&reloads("ok")), "{metrics}");
    let answer = infer(
        &client,
        &server.url("/v2/models/intel-vt/versions/2/infer"),
        json_body(&[&photo]),
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_eq!(answer.header["model_version"], "2");
    let stale = infer(
        &client,
        &server.url("/v2/models/intel-vt/versions/1/infer"),
        json_body(&[&photo]),
        None,
    )
    .await;
    assert_eq!(stale.status, StatusCode::NOT_FOUND, "{}", stale.header);
    assert!(stale.header["error"]
        .as_str()
        .unwrap()
        .contains("version 2 is loaded"));

    // Shutting down: not ready, on the server's and the model's probe alike.
    server.state.stop_accepting();
    assert_eq!(
        get("/v2/health/ready").await,
        (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false}))
    );
    assert_eq!(
        get("/v2/models/intel-vt/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    server.shutdown().await;
}

/// The bodies tritonclient 2.73 wrote (`tools/reference/triton_client.py fixture`): binary
/// tensor data in, binary and classification out; and base64 JSON in, all outputs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_requests_get_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let url = server.url("/v2/models/tiny/infer");
    let fixtures = fixtures();
    let requests: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("requests.json")).unwrap()).unwrap();
    let offline: Vec<Vec<f32>> = ["0.png", "1.jpg"]
        .iter()
        .map(|name| offline_probs(&checkpoint, &std::fs::read(fixtures.join(name)).unwrap()))
        .collect();
    let classifier = cpu_classifier(&dir);
    let offline_logits: Vec<Vec<f32>> = ["0.png", "1.jpg"]
        .iter()
        .map(|name| offline_logits(&classifier, &std::fs::read(fixtures.join(name)).unwrap()))
        .collect();

    let header_length = requests["binary.bin"]["header_length"].as_u64().unwrap() as usize;
    let body = std::fs::read(fixtures.join("binary.bin")).unwrap();
    let answer = infer(&client, &url, body, Some(header_length)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_eq!(answer.header["id"], "fixture-1");
    assert_eq!(answer.header["model_name"], "tiny");
    assert_eq!(answer.header["model_version"], "1");
    assert_eq!(answer.output("probabilities")["shape"], json!([2, 6]));
    assert!(answer.output("probabilities")["data"].is_null());
    assert_close(
        &answer.fp32("probabilities"),
        &offline,
        "binary probabilities",
    );
    // Classification of the logits, in JSON: the 3 best, as `value:index:label`.
    let logits = answer.output("logits");
    assert_eq!(logits["shape"], json!([2, 3]), "{logits}");
    let expected: Vec<String> = offline_logits.iter().flat_map(|l| ranked(l, 3)).collect();
    assert_classification_close(&answer.strings("logits"), &expected);

    // tritonclient's asyncio client asks for gzip on every request but decompresses only
    // inference answers: metadata and errors go uncompressed.
    for (method, path) in [
        (reqwest::Method::GET, "/v2/models/tiny"),
        (reqwest::Method::POST, "/v2/models/other/infer"),
        // The router's own 404 and 405 under /v2 too.
        (reqwest::Method::GET, "/v2/foo/bar"),
        (reqwest::Method::DELETE, "/v2/models/tiny/infer"),
    ] {
        let answer = client
            .request(method, server.url(path))
            .header(ACCEPT_ENCODING, "gzip, deflate")
            .body(json_body(&[b"x"]))
            .send()
            .await
            .unwrap();
        assert!(answer.headers().get(CONTENT_ENCODING).is_none(), "{path}");
        let body: Value = answer.json().await.unwrap();
        assert!(body.is_object(), "{path}: {body}");
    }

    // The same request compressed both ways, as tritonclient compresses them; the coding's
    // case and the `x-gzip` alias do not matter.
    for encoding in ["gzip", "deflate", "GZip", "x-gzip"] {
        let body = std::fs::read(fixtures.join("binary.bin")).unwrap();
        let compressed =
            infer_encoded(&client, &url, body, Some(header_length), Some(encoding)).await;
        assert_eq!(compressed.status, StatusCode::OK, "{}", compressed.header);
        assert_eq!(compressed.header, answer.header, "{encoding}");
        assert_eq!(compressed.binary, answer.binary, "{encoding}");
    }

    // A list's empty elements count for nothing (RFC 9110), and `identity` is no coding.
    let body = std::fs::read(fixtures.join("binary.bin")).unwrap();
    let send = |encoding: Option<&'static str>, sent: Vec<u8>| {
        let mut request = client
            .post(&url)
            .header(HEADER_LENGTH, header_length)
            .header(CONTENT_TYPE, "application/octet-stream");
        if let Some(encoding) = encoding {
            request = request.header(CONTENT_ENCODING, encoding);
        }
        async move {
            let answer = request.body(sent).send().await.unwrap();
            (answer.status(), answer.bytes().await.unwrap())
        }
    };
    let plain = send(None, body.clone()).await;
    assert_eq!(plain.0, StatusCode::OK);
    for (encoding, sent) in [
        (", gzip", compress("gzip", &body)),
        ("gzip,,Identity", compress("gzip", &body)),
        ("", body.clone()),
        (" , ", body.clone()),
    ] {
        assert_eq!(send(Some(encoding), sent).await, plain, "{encoding:?}");
    }

    // JSON in; no outputs named, so tritonclient asked for all of them in binary.
    assert!(requests["json.bin"]["header_length"].is_null());
    let body = std::fs::read(fixtures.join("json.bin")).unwrap();
    let answer = infer(&client, &url, body, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert!(answer.header.get("id").is_none(), "{}", answer.header);
    assert_eq!(answer.binary.len(), 2, "{}", answer.header);
    assert_close(&answer.fp32("probabilities"), &offline, "probabilities");
    assert_close(&answer.fp32("logits"), &offline_logits, "logits");
    server.shutdown().await;
}

/// Images preprocessed by the client, as the ONNX export takes them: FP32 `[N, 3, S, S]`,
/// in JSON (flat or nested, as the protocol allows) or as binary tensor data (as
/// tritonclient sends a numpy array).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessed_images_get_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let url = server.url("/v2/models/tiny/infer");
    let classifier = cpu_classifier(&dir);
    let size = classifier.config().image_size;
    let photos = test_images(2);
    let offline: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, b)| offline_probs(&checkpoint, b))
        .collect();
    let images: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, b)| preprocessed(&classifier, b))
        .collect();
    let shape = json!([2, 3, size, size]);
    let fp32_input = |data: Value| json!({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": data}]});

    let flat: Vec<f32> = images.concat();
    // [N][3][S][S], as numpy's tolist() writes a tensor.
    let side = size;
    let nested: Vec<Vec<Vec<&[f32]>>> = images
        .iter()
        .map(|image| {
            image
                .chunks(side * side)
                .map(|channel| channel.chunks(side).collect())
                .collect()
        })
        .collect();
    for (what, data) in [("flat", json!(flat)), ("nested", json!(nested))] {
        let body = serde_json::to_vec(&fp32_input(data)).unwrap();
        let answer = infer(&client, &url, body, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.header);
        assert_close(&answer.fp32("probabilities"), &offline, what);
    }

    let binary: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = |size: usize| {
        serde_json::to_vec(&json!({
            "inputs": [{
                "name": "image", "shape": shape, "datatype": "FP32",
                "parameters": {"binary_data_size": size},
            }],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
        }))
        .unwrap()
    };
    let send = |header: Vec<u8>, data: &[u8]| {
        let length = header.len();
        infer(
            &client,
            &url,
            [header, data.to_vec()].concat(),
            Some(length),
        )
    };
    let answer = send(header(binary.len()), &binary).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_eq!(answer.binary.len(), 1, "{}", answer.header);
    assert_close(&answer.fp32("probabilities"), &offline, "binary");
    let cut = &binary[..binary.len() - 2];
    let answer = send(header(cut.len()), cut).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.header);
    let message = answer.header["error"].as_str().unwrap();
    assert!(
        message.contains("bytes of FP32, but its binary data has"),
        "{message}"
    );

    // Values no normalised pixel gives: unnormalised pixels, numbers past f32's range
    // (infinite as f32s; JSON has no NaN), huge ones that would overflow the scores.
    for (value, shown) in [
        (json!(255), "255"),
        (json!(1e39), "inf"),
        (json!(-1e6), "-1000000"),
    ] {
        let mut bad = json!(flat);
        bad[7] = value;
        let body = serde_json::to_vec(&fp32_input(bad)).unwrap();
        let answer = infer(&client, &url, body, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.header);
        let message = answer.header["error"].as_str().unwrap();
        let expected = format!("value 7 of input `image` (channel 0) is {shown}, outside");
        assert!(message.contains(&expected), "{message}");
    }

    // Numbers are exempt from the body's value count only under a tensor's data: a shape
    // of millions of numbers is refused before it is built.
    let mut huge_shape = vec![1; 100_000];
    huge_shape[0] = 2;
    let body = serde_json::to_vec(&json!({"inputs": [{
        "name": "image", "shape": huge_shape, "datatype": "BYTES", "data": ["aGk=", "aGk="],
    }]}))
    .unwrap();
    let answer = infer(&client, &url, body, None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.header);
    let message = answer.header["error"].as_str().unwrap();
    assert!(message.contains("at most 8 integers"), "{message}");
    server.shutdown().await;

    // Nested row by row, a full queue of images fits the value count, arrays and all.
    let server = TestServer::start(&checkpoint, &["--queue", "2"]).await;
    let body = serde_json::to_vec(&fp32_input(json!(nested))).unwrap();
    let answer = infer(&client, &server.url("/v2/models/tiny/infer"), body, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_close(&answer.fp32("probabilities"), &offline, "nested, --queue 2");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_requests_choose_outputs_and_classification() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let url = server.url("/v2/models/tiny/infer");
    let photos = test_images(3);
    let offline: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, b)| offline_probs(&checkpoint, b))
        .collect();

    // Nested [N, 1] data, probabilities alone in JSON, classification beyond the class count.
    let data: Vec<Value> = photos
        .iter()
        .map(|(_, b)| json!([base64::engine::general_purpose::STANDARD.encode(b)]))
        .collect();
    let request = json!({
        "id": "42",
        "inputs": [{"name": "image", "shape": [3, 1], "datatype": "BYTES", "data": data}],
        "outputs": [
            {"name": "probabilities"},
            {"name": "logits", "parameters": {"classification": 10, "binary_data": true}},
        ],
    });
    let answer = infer(&client, &url, serde_json::to_vec(&request).unwrap(), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_eq!(answer.header["id"], "42");
    assert_eq!(answer.output("probabilities")["shape"], json!([3, 6]));
    assert_close(&answer.fp32("probabilities"), &offline, "probabilities");
    assert_eq!(answer.output("logits")["shape"], json!([3, 6]));
    let labels: Vec<String> = answer
        .strings("logits")
        .iter()
        .map(|s| s.split(':').nth(2).unwrap().to_owned())
        .collect();
    // Logits rank the classes as the probabilities do.
    let expected: Vec<String> = offline
        .iter()
        .flat_map(|p| ranked(p, 6))
        .map(|s| s.split(':').nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(labels, expected);

    // The whole answer as binary data, asked for request-wide.
    let mut request: Value = serde_json::from_slice(&json_body(&[&photos[0].1])).unwrap();
    request["parameters"] = json!({"binary_data_output": true});
    let answer = infer(&client, &url, serde_json::to_vec(&request).unwrap(), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    assert_eq!(answer.binary.len(), 2);
    assert_close(
        &answer.fp32("probabilities"),
        &offline[..1],
        "binary_data_output",
    );

    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(
        metric(
            &text,
            r#"vt_serve_requests_total{route="/v2/models/{model}/infer",status="200"}"#
        ),
        Some(2.0),
        "{text}"
    );
    server.shutdown().await;
}

/// A gzip body of several members (RFC 1952: `cat a.gz b.gz`) is one body; bytes after the
/// last member, or after a deflate stream, are refused however they arrive: in the read that
/// ends the stream or in a later one (tower-http's layer took them in the first case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_is_its_streams_and_nothing_after_them() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    let client = client();
    let url = server.url("/v2/models/tiny/infer");
    let (_, photo) = test_images(1).remove(0);
    let body = json_body(&[&photo]);
    // Each chunk a moment after the last: a read of its own.
    let post = |chunks: Vec<Vec<u8>>, encoding: &'static str| {
        let stream =
            futures_util::StreamExt::then(futures_util::stream::iter(chunks), |chunk| async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Ok::<_, std::io::Error>(chunk)
            });
        let request = client
            .post(&url)
            .header(CONTENT_ENCODING, encoding)
            .header(CONTENT_TYPE, "application/json")
            .body(reqwest::Body::wrap_stream(stream));
        async move {
            let answer = request.send().await.unwrap();
            (answer.status(), answer.json::<Value>().await.unwrap())
        }
    };
    // An empty body is empty, whatever its coding: answered as one.
    for (route, answer) in [
        ("/predict", "the image is empty"),
        (
            "/v2/models/tiny/infer",
            "invalid inference request JSON: EOF",
        ),
    ] {
        let empty = client
            .post(server.url(route))
            .header(CONTENT_ENCODING, "gzip")
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        assert_eq!(empty.status(), StatusCode::BAD_REQUEST, "{route}");
        let text = empty.text().await.unwrap();
        assert!(text.contains(answer), "{route}: {text}");
    }
    let (head, tail) = body.split_at(body.len() / 2);
    let members = [compress("gzip", head), compress("gzip", tail)].concat();
    let (status, answer) = post(vec![members], "gzip").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for encoding in ["gzip", "deflate"] {
        let encoded = compress(encoding, &body);
        let (status, answer) = post(vec![encoded.clone()], encoding).await;
        assert_eq!(status, StatusCode::OK, "{encoding}: {answer}");
        let together = [encoded.clone(), b"garbage".to_vec()].concat();
        for chunks in [vec![together], vec![encoded, b"garbage".to_vec()]] {
            let (status, answer) = post(chunks, encoding).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{encoding}: {answer}");
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(message.contains("cannot read the request body"), "{answer}");
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocols_errors() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--queue", "4"]).await;
    let client = client();
    let url = server.url("/v2/models/tiny/infer");
    let (_, photo) = test_images(1).remove(0);
    let photo64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let input = |name: &str, shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]});
    let one = json!([photo64]);
    // What, body, Inference-Header-Content-Length, status, what the error says.
    type Case<'a> = (&'a str, Vec<u8>, Option<usize>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            "not JSON",
            b"{".to_vec(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid inference request JSON",
        ),
        (
            // The value at fault is named by its place in the request.
            "a parameter of the wrong type",
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1],
                "datatype": "BYTES", "data": one}], "outputs": [{"name": "probabilities",
                "parameters": {"classification": -1}}]}))
            .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid inference request JSON: outputs[0].parameters.classification: invalid value: \
             integer `-1`",
        ),
        (
            "an image sent as it is",
            photo.clone(),
            None,
            StatusCode::BAD_REQUEST,
            "the body is a JPEG image, not JSON: POST an image as it is to /predict",
        ),
        (
            // tritonclient's binary data, its JSON's length left out.
            "binary data without the JSON's length",
            [
                serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1],
                    "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}))
                .unwrap(),
                binary_elements(&[b"abcd"]),
            ]
            .concat(),
            None,
            StatusCode::BAD_REQUEST,
            "8 bytes follow the JSON: binary tensor data needs the JSON's length in the \
             Inference-Header-Content-Length header",
        ),
        (
            "two inputs",
            serde_json::to_vec(&json!({"inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "data": one},
                {"name": "image", "shape": [1], "datatype": "BYTES", "data": one},
            ]}))
            .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "the request has 2",
        ),
        (
            "input name",
            serde_json::to_vec(&input("INPUT__0", json!([1]), "BYTES", one.clone())).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "unknown input `INPUT__0`",
        ),
        (
            "datatype",
            serde_json::to_vec(&input("image", json!([1]), "FP16", json!([0.5]))).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "not FP16",
        ),
        (
            "FP32 shape",
            serde_json::to_vec(&input("image", json!([1]), "FP32", json!([0.5]))).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "as FP32 it takes [N, 3, 32, 32]",
        ),
        (
            "FP32 count",
            serde_json::to_vec(&input("image", json!([1, 3, 32, 32]), "FP32", json!([0.5])))
                .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "but 1 values",
        ),
        (
            "FP32 base64",
            serde_json::to_vec(&input("image", json!([1, 3, 32, 32]), "FP32", one.clone()))
                .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "holds strings; as FP32 its elements are numbers",
        ),
        (
            "shape",
            serde_json::to_vec(&input("image", json!([1, 3]), "BYTES", one.clone())).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "[N] or [N, 1]",
        ),
        (
            "count",
            serde_json::to_vec(&input("image", json!([2]), "BYTES", one.clone())).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "but 1 elements",
        ),
        (
            "too many",
            serde_json::to_vec(&input("image", json!([5]), "BYTES", one.clone())).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "at most 4 per request",
        ),
        (
            "not base64",
            serde_json::to_vec(&input("image", json!([1]), "BYTES", json!(["%%%"]))).unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "element 0 of input `image` is not base64",
        ),
        (
            "not an image",
            serde_json::to_vec(&input(
                "image",
                json!([2]),
                "BYTES",
                json!([photo64, "aGVsbG8="]),
            ))
            .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "image[1]: the data is not an image",
        ),
        (
            "unknown output",
            serde_json::to_vec(&json!({
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": one}],
                "outputs": [{"name": "OUTPUT__0"}],
            }))
            .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "unknown output `OUTPUT__0`",
        ),
        (
            "classification 0",
            serde_json::to_vec(&json!({
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": one}],
                "outputs": [{"name": "logits", "parameters": {"classification": 0}}],
            }))
            .unwrap(),
            None,
            StatusCode::BAD_REQUEST,
            "at least 1",
        ),
        (
            "header length past the body",
            b"{}".to_vec(),
            Some(3),
            StatusCode::BAD_REQUEST,
            "only 2 bytes",
        ),
    ];
    let binary_input = |size: usize| {
        json!({"inputs": [{
            "name": "image", "shape": [1], "datatype": "BYTES",
            "parameters": {"binary_data_size": size},
        }]})
    };
    let element = [4, 0, 0, 0, 1, 2, 3, 4];
    let mut cut_short = element;
    cut_short[0] = 9;
    let with_binary = [
        (
            "binary size",
            binary_input(9),
            &element,
            "binary_data_size 9, but 8 bytes follow",
        ),
        (
            "binary element length",
            binary_input(8),
            &cut_short,
            "declares 9 bytes, but 4 follow",
        ),
        (
            "unclaimed binary data",
            input("image", json!([1]), "BYTES", one.clone()),
            &element,
            "8 bytes follow the JSON header",
        ),
    ];
    let cases = cases
        .into_iter()
        .chain(with_binary.map(|(what, header, data, needle)| {
            let header = serde_json::to_vec(&header).unwrap();
            let length = header.len();
            (
                what,
                [header, data.to_vec()].concat(),
                Some(length),
                StatusCode::BAD_REQUEST,
                needle,
            )
        }));
    for (what, body, header_length, status, needle) in cases {
        let answer = infer(&client, &url, body, header_length).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.header);
        let message = answer.header["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{what}: no `{needle}` in {}",
            answer.header
        );
        assert_eq!(
            answer.header.as_object().unwrap().len(),
            1,
            "{what}: {}",
            answer.header
        );
    }

    // Request bodies in an encoding the server does not decode, or not decodable, or
    // decoding past the body limit (which bounds the decoded size).
    let bomb = gzip_bomb();
    let many_values = json!({"inputs": [{
        "name": "image", "shape": [1], "datatype": "BYTES", "data": vec![json!({}); 10_000],
    }]});
    let encoded = [
        (
            "br",
            vec![0x0b, 0x02, 0x80],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding \"br\" is not supported",
        ),
        (
            "gzip, gzip",
            compress("gzip", &compress("gzip", &json_body(&[&photo]))),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "\"gzip, gzip\" is not supported",
        ),
        (
            "gzip",
            compress("gzip", &serde_json::to_vec(&many_values).unwrap()),
            StatusCode::BAD_REQUEST,
            "values, more than a request",
        ),
        (
            "gzip",
            vec![0x1f, 0x8b, 0, 1, 2],
            StatusCode::BAD_REQUEST,
            "cannot read the request body",
        ),
        (
            "gzip",
            bomb,
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than the limit",
        ),
    ];
    for (encoding, body, status, needle) in encoded {
        let answer = client
            .post(&url)
            .header(CONTENT_ENCODING, encoding)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{encoding}");
        let body: Value = answer.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{encoding}: {body}");
    }

    // A gzip stream of 11 MB that decodes to nothing (empty stored blocks): refused for the
    // bytes received, on this route, the `{"instances"}` one and /predict (whose errors have
    // the API's own shape). The rest is not read, so the answer says the connection closes:
    // a client would otherwise send its next request on it.
    let mut empty = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    empty.extend([0, 0, 0, 0xff, 0xff].repeat(2_200_000));
    empty.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(decompress("gzip", &empty).is_empty());
    let instances = server.url("/v1/models/tiny:predict");
    for route in [url.clone(), instances, server.url("/predict")] {
        let answer = client
            .post(&route)
            .header(CONTENT_ENCODING, "gzip")
            .body(empty.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE, "{route}");
        assert_eq!(answer.headers()[CONNECTION], "close", "{route}");
        let body: Value = answer.json().await.unwrap();
        assert!(
            body.to_string().contains("larger than the limit"),
            "{route}: {body}"
        );
    }

    // The server carries on, and keeps the connections whose requests it read.
    let answer = infer(&client, &url, json_body(&[&photo]), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.header);
    let read = client
        .post(&url)
        .body(json_body(&[&photo]))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert!(
        read.headers().get(CONNECTION).is_none(),
        "{:?}",
        read.headers()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchserve_requests_get_the_top_five_classes_by_label() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let images = test_images(2);
    let offline: Vec<Vec<f32>> = images
        .iter()
        .map(|(_, bytes)| offline_probs(&checkpoint, bytes))
        .collect();
    // As offline: the five most probable classes, each with its probability.
    let best_five = |probs: &[f32]| -> Vec<usize> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        order.truncate(5);
        order
    };
    let check = |answer: &Value, probs: &[f32]| {
        let answer = answer.as_object().unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(answer.len(), 5, "{answer:?}");
        for i in best_five(probs) {
            let score = answer[CLASSES[i]].as_f64().unwrap() as f32;
            assert!(
                (score - probs[i]).abs() < 1e-5,
                "{}: {score} vs {}",
                CLASSES[i],
                probs[i]
            );
        }
    };
    // TorchServe's documentation sends with `curl -T`, a PUT.
    for (method, path) in [
        (reqwest::Method::POST, "/predictions/tiny"),
        (reqwest::Method::PUT, "/predictions/tiny"),
        (reqwest::Method::POST, "/predictions/tiny/1.0"),
    ] {
        let response = client
            .request(method, server.url(path))
            .body(images[0].1.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let text = response.text().await.unwrap();
        check(&serde_json::from_str(&text).unwrap(), &offline[0]);
        // Best first, as written.
        let at: Vec<usize> = best_five(&offline[0])
            .iter()
            .map(|&i| text.find(&format!("\"{}\":", CLASSES[i])).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
    // Several files: an answer each, in order.
    let form = images
        .iter()
        .fold(reqwest::multipart::Form::new(), |form, (name, bytes)| {
            form.part(
                "data",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
            )
        });
    let response = client
        .post(server.url("/predictions/tiny"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answers = response.json::<Value>().await.unwrap();
    let answers = answers.as_array().unwrap_or_else(|| panic!("{answers}"));
    assert_eq!(answers.len(), 2);
    for (answer, probs) in answers.iter().zip(&offline) {
        check(answer, probs);
    }
    let response = client
        .post(server.url("/predictions/other"))
        .body(images[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = response.text().await.unwrap();
    assert!(body.contains("unknown model `other`"), "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_requests_get_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let images = test_images(2);
    let offline: Vec<Vec<f32>> = images
        .iter()
        .map(|(_, bytes)| offline_probs(&checkpoint, bytes))
        .collect();
    let b64: Vec<String> = images
        .iter()
        .map(|(_, bytes)| base64::engine::general_purpose::STANDARD.encode(bytes))
        .collect();
    let predict = |body: Value| {
        let request = client
            .post(server.url("/v1/models/tiny:predict"))
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let ready = client
        .get(server.url("/v1/models/tiny"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"name": "tiny", "ready": true})
    );

    // Every instance form, each classified as offline: all classes, best first.
    let forms = [
        json!(b64[0]),
        json!({"b64": b64[1]}),
        json!({"content": b64[0], "mimeType": "image/png"}),
        json!({"image": {"b64": b64[1]}}),
        json!({"image": b64[0]}),
    ];
    let (status, body) = predict(json!({ "instances": forms })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), forms.len());
    for (i, prediction) in predictions.iter().enumerate() {
        let probs = &offline[i % 2];
        let order: Vec<usize> = ranked(probs, CLASSES.len())
            .iter()
            .map(|s| s.split(':').nth(1).unwrap().parse().unwrap())
            .collect();
        let ids: Vec<String> = order.iter().map(usize::to_string).collect();
        let names: Vec<&str> = order.iter().map(|&c| CLASSES[c]).collect();
        assert_eq!(prediction["ids"], json!(ids), "{i}: {prediction}");
        assert_eq!(
            prediction["displayNames"],
            json!(names),
            "{i}: {prediction}"
        );
        let confidences: Vec<f32> = prediction["confidences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let expected: Vec<f32> = order.iter().map(|&c| probs[c]).collect();
        assert_close(&confidences, &[expected], &format!("instance {i}"));
    }

    // Vertex AI's parameters, each alone: at most 2 classes; only classes above a threshold
    // between the second and the third best of the first image. `null` parameters and
    // TensorFlow Serving's signature name are taken as they come.
    let mut sorted = offline[0].clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    for parameters in [
        json!({"maxPredictions": 2}),
        json!({"confidenceThreshold": (sorted[1] + sorted[2]) / 2.0}),
    ] {
        let (status, body) =
            predict(json!({"instances": [b64[0]], "parameters": parameters})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ids = body["predictions"][0]["ids"].as_array().unwrap();
        assert_eq!(ids.len(), 2, "{parameters}: {body}");
    }
    let (status, body) = predict(json!({
        "signature_name": "serving_default",
        "instances": [b64[0]],
        "parameters": null,
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["ids"].as_array().unwrap().len(), 6);
    // TensorFlow Serving's columnar form: the same classifications, as "outputs" (their
    // confidences to f32's rounding: the server may batch the images otherwise).
    for inputs in [json!(forms), json!({ "image": forms })] {
        let (status, columns) = predict(json!({ "inputs": inputs })).await;
        assert_eq!(status, StatusCode::OK, "{columns}");
        let outputs = columns["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), predictions.len(), "{columns}");
        for (i, (got, expected)) in outputs.iter().zip(predictions.iter()).enumerate() {
            for key in ["ids", "displayNames"] {
                assert_eq!(got[key], expected[key], "outputs[{i}]");
            }
            let confidences = |v: &Value| -> Vec<f32> {
                serde_json::from_value(v["confidences"].clone()).unwrap()
            };
            assert_close(
                &confidences(got),
                &[confidences(expected)],
                &format!("outputs[{i}]"),
            );
        }
    }

    let unknown_model = client
        .post(server.url("/v1/models/other:predict"))
        .json(&json!({"instances": [b64[0]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_model.status(), StatusCode::NOT_FOUND);
    let body: Value = unknown_model.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown model `other`"),
        "{body}"
    );
    let tiny_values = vec![0; 10_000];
    let cases = [
        (
            json!({"instances": []}),
            StatusCode::BAD_REQUEST,
            "is empty",
        ),
        (
            json!({"instances": tiny_values}),
            StatusCode::BAD_REQUEST,
            "holds 10001 numbers and 1 other values",
        ),
        (
            json!({"instances": [b64[0]], "parameters": {"maxPredictions": 0}}),
            StatusCode::BAD_REQUEST,
            "maxPredictions must be at least 1",
        ),
        (
            json!({"instances": [b64[0]], "parameters": {"confidenceThreshold": 2}}),
            StatusCode::BAD_REQUEST,
            "from 0 to 1",
        ),
        (
            json!({"instances": [b64[0]], "signature_name": "predict_images"}),
            StatusCode::BAD_REQUEST,
            "unknown signature_name `predict_images`",
        ),
        (
            json!({"instances": [{"content": b64[0], "mimeType": 3}]}),
            StatusCode::BAD_REQUEST,
            "instances[0]: an instance is",
        ),
        (
            json!({"instances": [b64[0]], "examples": [b64[0]]}),
            StatusCode::BAD_REQUEST,
            "unknown field `examples`",
        ),
        (
            json!({"instances": [b64[0]], "parameters": {"topK": 2}}),
            StatusCode::BAD_REQUEST,
            "unknown field `topK`",
        ),
        (
            json!({"instances": [b64[0], 7]}),
            StatusCode::BAD_REQUEST,
            "instances[1]: an instance is",
        ),
        (
            json!({"instances": [{"b64": b64[0], "key": 1}]}),
            StatusCode::BAD_REQUEST,
            "instances[0]: an instance is",
        ),
        (
            json!({"instances": [{"image": {"content": b64[0]}}]}),
            StatusCode::BAD_REQUEST,
            "instances[0]: an instance is",
        ),
        (
            json!({"instances": ["@@@"]}),
            StatusCode::BAD_REQUEST,
            "instances[0]: the image is not valid base64",
        ),
        (
            json!({"instances": [b64[0], "aGVsbG8="]}),
            StatusCode::BAD_REQUEST,
            "instances[1]: the data is not an image",
        ),
        (
            json!({"inputs": [b64[0], "aGVsbG8="]}),
            StatusCode::BAD_REQUEST,
            "inputs[1]: the data is not an image",
        ),
        (
            json!({"inputs": {"images": [b64[0]]}}),
            StatusCode::BAD_REQUEST,
            "its one input is `image`",
        ),
        (
            json!({"inputs": [b64[0]], "instances": [b64[0]]}),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            json!({"parameters": {}}),
            StatusCode::BAD_REQUEST,
            "no \"instances\"",
        ),
    ];
    for (request, status, needle) in cases {
        let (got, body) = predict(request.clone()).await;
        assert_eq!(got, status, "{request}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{request}: no `{needle}` in {body}"
        );
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    }
    let unknown_ready = client
        .get(server.url("/v1/models/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_ready.status(), StatusCode::NOT_FOUND);
    let get_predict = client
        .get(server.url("/v1/models/tiny:predict"))
        .send()
        .await
        .unwrap();
    assert_eq!(get_predict.status(), StatusCode::METHOD_NOT_ALLOWED);
    // An image posted as it is, where JSON is expected.
    let raw = client
        .post(server.url("/v1/models/tiny:predict"))
        .body(images[0].1.clone())
        .send()
        .await
        .unwrap();
    let status = raw.status();
    let body: Value = raw.json().await.unwrap();
    assert_error_message(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "the body is a JPEG image, not JSON: POST an image as it is to /predict",
    );
    // A small gzip body that decodes past the body limit.
    let bomb = client
        .post(server.url("/v1/models/tiny:predict"))
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_ENCODING, "gzip")
        .body(gzip_bomb())
        .send()
        .await
        .unwrap();
    let status = bomb.status();
    let body: Value = bomb.json().await.unwrap();
    assert_error_message(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "larger than the limit of 10485760 bytes (vt-serve --max-body-bytes)",
    );

    // Readiness probes and predictions share a route pattern but are counted apart.
    let text = metrics_text(&client, &server.url("/metrics")).await;
    let count = |series: &str| metric(&text, series).unwrap_or(0.0);
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/v1/models/{model}",status="200"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/v1/models/{model}:predict",status="200"}"#),
        6.0,
        "{text}"
    );
    server.shutdown().await;
}

/// `:explain` answers KServe's `{"predictions", "explanations"}`: the predictions of
/// `:predict`, and each image's token attention, module by module, as the model computes it
/// offline for that image alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_requests_get_each_images_token_attention() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let images = test_images(2);
    let b64: Vec<String> = images
        .iter()
        .map(|(_, bytes)| base64::engine::general_purpose::STANDARD.encode(bytes))
        .collect();
    let post = |verb: &str| {
        let request = client
            .post(server.url(&format!("/v1/models/tiny:{verb}")))
            .json(&json!({ "instances": b64 }));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, predicted) = post("predict").await;
    assert_eq!(status, StatusCode::OK, "{predicted}");
    assert!(predicted.get("explanations").is_none(), "{predicted}");
    let (status, explained) = post("explain").await;
    assert_eq!(status, StatusCode::OK, "{explained}");
    for i in 0..images.len() {
        let (ours, theirs) = (&explained["predictions"][i], &predicted["predictions"][i]);
        assert_eq!(ours["ids"], theirs["ids"], "{i}");
        let confidences =
            |v: &Value| -> Vec<f32> { serde_json::from_value(v["confidences"].clone()).unwrap() };
        assert_close(&confidences(ours), &[confidences(theirs)], "confidences");
    }

    let model = Model::load(&checkpoint, &Device::Cpu)
        .and_then(Model::into_frozen)
        .unwrap();
    let classifier = Classifier::load(&checkpoint, &Device::Cpu, DType::F32).unwrap();
    let s = model.config.image_size;
    let explanations = explained["explanations"].as_array().unwrap();
    assert_eq!(explanations.len(), images.len(), "{explained}");
    for ((name, bytes), explanation) in images.iter().zip(explanations) {
        let input = Tensor::from_vec(preprocessed(&classifier, bytes), (1, 3, s, s), &Device::Cpu);
        let offline = model.token_attention(&input.unwrap()).unwrap();
        let modules = explanation["tokenAttention"].as_array().unwrap();
        assert_eq!(modules.len(), offline.maps.len(), "{name}");
        for (m, (module, maps)) in modules.iter().zip(&offline.maps).enumerate() {
            let (_, tokens, height, width) = maps.dims4().unwrap();
            assert_eq!(module["height"], height, "{name} module {m}");
            assert_eq!(module["width"], width, "{name} module {m}");
            let served: Vec<Vec<f32>> = serde_json::from_value(module["maps"].clone()).unwrap();
            let expected = maps.reshape((tokens, height * width)).unwrap();
            let expected = expected.to_vec2::<f32>().unwrap();
            assert_eq!(served.len(), tokens, "{name} module {m}");
            for (t, (map, expected)) in served.iter().zip(expected).enumerate() {
                let what = format!("{name} module {m} token {t}");
                assert!(
                    (map.iter().sum::<f32>() - 1.0).abs() < 1e-4,
                    "{what}: {map:?}"
                );
                assert_close(map, &[expected], &what);
            }
        }
    }

    let wrong_verb = client
        .post(server.url("/v1/models/tiny:classify"))
        .json(&json!({ "instances": [b64[0]] }))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_verb.status(), StatusCode::NOT_FOUND);
    let body: Value = wrong_verb.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("`:explain`"),
        "{body}"
    );
    // Each image's attention is large: a request explains a few images at most.
    let too_many = client
        .post(server.url("/v1/models/tiny:explain"))
        .json(&json!({ "instances": vec![&b64[0]; 17] }))
        .send()
        .await
        .unwrap();
    assert_eq!(too_many.status(), StatusCode::BAD_REQUEST);
    let body: Value = too_many.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("at most 16"),
        "{body}"
    );
    // The verb percent-encoded, as routing decodes it: explained, and counted so.
    let encoded = client
        .post(server.url("/v1/models/tiny%3Aexplain"))
        .json(&json!({ "instances": [b64[0]] }))
        .send()
        .await
        .unwrap();
    assert_eq!(encoded.status(), StatusCode::OK);
    let metrics = metrics_text(&client, &server.url("/metrics")).await;
    let count = |series: &str| metric(&metrics, series).unwrap_or(0.0);
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/v1/models/{model}:explain",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/v1/models/{model}:predict",status="200"}"#),
        1.0
    );
    server.shutdown().await;
}

/// `{"instances"}` requests pass the same admission control as /predict's: more instances
/// than `--queue` are refused, and past a full queue and its waiting room a request gets 503
/// with Retry-After, in the route's error shape; the one waiting is answered.
/// JSON saved by Windows editors and PowerShell 5 starts with UTF-8's byte order mark: every
/// JSON route reads it as the same request without one (RFC 8259 lets parsers ignore it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_with_a_byte_order_mark_are_read_as_without() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    let client = client();
    let (_, photo) = &test_images(1)[0];
    let b64 = base64::engine::general_purpose::STANDARD.encode(photo);
    for (route, body) in [
        (
            "/predict",
            serde_json::to_vec(&json!({"image": b64})).unwrap(),
        ),
        (
            "/v1/models/tiny:predict",
            serde_json::to_vec(&json!({"instances": [b64]})).unwrap(),
        ),
        ("/v2/models/tiny/infer", json_body(&[photo])),
    ] {
        let mut answers = Vec::new();
        for body in [body.clone(), [b"\xEF\xBB\xBF".as_slice(), &body].concat()] {
            let response = client
                .post(server.url(route))
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let answer: Value = response.json().await.unwrap();
            assert_eq!(status, StatusCode::OK, "{route}: {answer}");
            // What was classified, without timings.
            let classified = ["predictions", "outputs"].map(|key| answer[key].clone());
            assert_ne!(classified, [Value::Null, Value::Null], "{route}: {answer}");
            answers.push(classified);
        }
        assert_eq!(answers[0], answers[1], "{route}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_requests_past_the_queue_are_refused() {
    let dir = tiny_checkpoint();
    // One slot, and a batch that waits long for a slow upload: a first request holds the
    // slot meanwhile.
    let args = ["--queue", "1", "--max-batch", "8", "--max-delay-ms", "3000"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let client = client();
    let url = server.url("/v1/models/tiny:predict");
    let (_, photo) = test_images(1).remove(0);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let one = json!({ "instances": [b64] });

    let (status, _, body) =
        predict_instances(&client, &url, &json!({ "instances": [b64, b64] })).await;
    assert_error_message(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "too many instances: 2, at most 1 per request (--queue)",
    );

    let upload = start_endless_upload(&client, &server.base).await;
    let first = tokio::spawn({
        let (client, url, one) = (client.clone(), url.clone(), one.clone());
        async move { predict_instances(&client, &url, &one).await }
    });
    wait_for_queue_depth(&client, &server.url("/metrics"), 1.0).await;
    let waiting = tokio::spawn({
        let (client, url, one) = (client.clone(), url.clone(), one.clone());
        async move { predict_instances(&client, &url, &one).await }
    });
    wait_for_gauge(
        &client,
        &server.url("/metrics"),
        "vt_serve_queue_waiting",
        1.0,
    )
    .await;
    let (status, retry_after, body) = predict_instances(&client, &url, &one).await;
    assert_error_message(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "the request queue is full",
    );
    assert_eq!(retry_after.as_deref(), Some("1"), "{body}");

    drop(upload);
    for answer in [first, waiting] {
        let (status, _, body) = answer.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_request_past_its_deadline_gets_504() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &PAST_DEADLINE_ARGS).await;
    let client = client();
    let (_, photo) = test_images(1).remove(0);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let body = serde_json::to_vec(&json!({ "instances": [b64] })).unwrap();
    let path = "/v1/models/tiny:predict";
    let (status, answer) =
        post_past_deadline(&client, &server.base, path, "application/json", &body).await;
    assert_error_message(
        StatusCode::from_u16(status).unwrap(),
        &answer,
        StatusCode::GATEWAY_TIMEOUT,
        "not answered within 2000 ms",
    );
    // The abandoned request gives its slot back.
    wait_for_queue_depth(&client, &server.url("/metrics"), 0.0).await;
    server.shutdown().await;
}

/// Every answer under `/v2` (and KServe V1's `/v1/models/`) is in the protocol's shape,
/// `{"error": MESSAGE}`: routes it does not serve (404) name those it does, and methods a
/// route does not take (405) keep the `Allow` header. Elsewhere the API's own shape stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_routes_and_methods_answer_in_the_protocols_shape() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    let client = client();
    for path in [
        "/v2/models/tiny/stats",
        "/v2/repository/index",
        "/v2/",
        "/v2/models/tiny/versions/1/stats",
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_error_message(status, &body, StatusCode::NOT_FOUND, path);
        assert_error_message(
            status,
            &body,
            StatusCode::NOT_FOUND,
            "POST /v2/models/NAME[/versions/V]/infer",
        );
    }
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/v2/models/tiny/infer", "POST"),
        (reqwest::Method::POST, "/v2/models/tiny", "GET,HEAD"),
        (reqwest::Method::DELETE, "/v2/health/ready", "GET,HEAD"),
    ] {
        let response = client
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        let body: Value = response.json().await.unwrap();
        assert_error_message(
            status,
            &body,
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {method} is not allowed on {path}"),
        );
        assert_eq!(allow, allowed, "{method} {path}");
    }
    // KServe V1's and TensorFlow Serving's clients read the same shape under /v1/models/,
    // where a name takes GET and `NAME:VERB` POST.
    use reqwest::Method as M;
    for (method, path, status, allowed) in [
        (
            M::POST,
            "/v1/models/tiny/versions/1:predict",
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            M::GET,
            "/v1/models/tiny/metadata",
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            M::DELETE,
            "/v1/models/tiny",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("GET,HEAD"),
        ),
        (
            M::GET,
            "/v1/models/tiny:predict",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("POST"),
        ),
        (
            M::DELETE,
            "/v1/models/tiny:predict",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("POST"),
        ),
        // Percent-encoded, as the router reads it: one segment, decoded.
        (
            M::PUT,
            "/v1/models/tiny%3Apredict",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("POST"),
        ),
        (
            M::PUT,
            "/v1/models/a%2Fb:predict",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("POST"),
        ),
        (
            M::PUT,
            "/v1/models/a%2Fb",
            StatusCode::METHOD_NOT_ALLOWED,
            Some("GET,HEAD"),
        ),
    ] {
        let response = client
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap());
        assert_eq!(allow, allowed, "{method} {path}");
        let answered = response.status();
        let body: Value = response.json().await.unwrap();
        assert_error_message(answered, &body, status, path);
        assert_error_message(answered, &body, status, "POST /v1/models/NAME:predict");
    }
    // Outside /v2 and /v1/models/, the API's own shape.
    for path in ["/v2x", "/v1/other"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "not_found", "{path}: {body}");
    }
    server.shutdown().await;
}
