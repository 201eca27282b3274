//! The HTTP server, started in-process on 127.0.0.1:0 with a tiny checkpoint.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use image::{ImageFormat, RgbImage};
use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vt_serve::admission::{Admission, Admitted};
use vt_serve::batcher::{Arriving, BatchConfig, ServedModel, Unanswered};
use vt_serve::state::ModelSource;
use vt_serve::Prediction;

/// A GPU server runs these batch sizes before it listens; each must run and leave the model
/// answering as before.
#[test]
fn warm_up_runs_the_batch_sizes_a_server_meets_first() {
    let dir = tiny_checkpoint();
    let classifier = cpu_classifier(&dir);
    let (_, photo) = test_images(1).remove(0);
    let before = offline_probs(&checkpoint_path(&dir), &photo);
    for (max_batch, sizes) in [(1, vec![1]), (5, vec![1, 2, 4, 5]), (8, vec![1, 2, 4, 8])] {
        assert_eq!(classifier.warm_up(max_batch).unwrap(), sizes);
    }
    let input = preprocessed(&classifier, &photo);
    assert_eq!(classifier.predict(&[input]).unwrap()[0].probs, before);
}

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.text().await.unwrap();
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, value)
}

async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    json_of(
        client
            .post(url)
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str, what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_eq!(body["error"], code, "{what}: {body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}: no detail in {body}"
    );
}

fn assert_detail_says(body: &Value, needle: &str) {
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains(needle)),
        "no `{needle}` in {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_with_its_documented_shape() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    // What `vt-train train` records of a checkpoint's training, reported as it is.
    let config_path = checkpoint.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let training = json!({"epoch": 12, "val_accuracy": 0.9, "options": {"epochs": 30}});
    config["training"] = training.clone();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let server = TestServer::start(&checkpoint, &[]).await;
    let client = client();
    let images = test_images(2);
    let (name, photo) = &images[0];

    let page = client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("fetch(`predict?top_k="));

    for path in ["/ping", "/health/ready"] {
        let (status, body) = json_of(client.get(server.url(path)).send().await.unwrap()).await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!({"status": "ready"})),
            "{path}"
        );
    }
    let (status, body) =
        json_of(client.get(server.url("/health/live")).send().await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "alive"})));

    let (status, models) =
        json_of(client.get(server.url("/v1/models")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let model = &models["models"][0];
    let weights = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let sha: String = Sha256::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let loaded = vt_model::Model::load(&checkpoint, &candle_core::Device::Cpu).unwrap();
    assert_eq!(model["sha256"], sha);
    assert_eq!(model["arch"], "vt-resnet18");
    assert_eq!(model["name"], "tiny");
    assert_eq!(model["classes"], json!(CLASSES));
    assert_eq!(model["image_size"], 32);
    assert_eq!(model["parameters"], loaded.num_parameters());
    assert_eq!(model["device"], "cpu");
    assert_eq!(model["dtype"], "f32");
    assert_eq!(model["bf16_products"], false);
    assert_eq!(model["training"], training);
    assert_eq!(model["generation"], 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let loaded_at = model["loaded_at"].as_u64().unwrap();
    assert!(loaded_at <= now && loaded_at + 600 > now, "{model}");

    // Raw body, default top_k = 3, sorted by score.
    let (status, answer) = post_raw(
        &client,
        &server.url("/predict"),
        "image/jpeg",
        photo.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let top = scores(&answer);
    assert_eq!(top.len(), 3);
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{answer}");
    assert_eq!(answer["model"], "tiny");
    // A time, not a placeholder: the answer came after the model ran.
    assert!(answer["elapsed_ms"].as_f64().unwrap() > 0.0, "{answer}");
    assert!(answer.get("filename").is_none());

    // Every class: softmax probabilities equal to the offline command's.
    let offline = offline_probs(&checkpoint, photo);
    let all_url = server.url("/predict?top_k=6");
    let (_, all) = post_raw(&client, &all_url, "application/octet-stream", photo.clone()).await;
    assert_matches_offline(&all, &offline, "raw body");
    let total: f64 = scores(&all).iter().map(|(_, s)| s).sum();
    assert!((total - 1.0).abs() < 1e-4, "{all}");

    // SageMaker's route, a content type left out, and base64 JSON (plain and data URL).
    let (_, sagemaker) = post_raw(
        &client,
        &server.url("/invocations?top_k=6"),
        "image/png",
        photo.clone(),
    )
    .await;
    assert_matches_offline(&sagemaker, &offline, "/invocations");
    let untyped = client
        .post(&all_url)
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_matches_offline(&json_of(untyped).await.1, &offline, "no content type");
    let b64 = base64::engine::general_purpose::STANDARD.encode(photo);
    for image in [b64.clone(), format!("data:image/jpeg;base64,{b64}")] {
        let response = client
            .post(&all_url)
            .json(&json!({ "image": image }))
            .send()
            .await
            .unwrap();
        let (status, answer) = json_of(response).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_matches_offline(&answer, &offline, "base64 JSON");
    }
    // Gzip both ways, as `requests` or `curl --compressed` with a gzipped body ask.
    let body = serde_json::to_vec(&json!({ "image": b64 })).unwrap();
    let response = client
        .post(&all_url)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_ENCODING, "gzip")
        .header(ACCEPT_ENCODING, "gzip")
        .body(compress("gzip", &body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_ENCODING], "gzip");
    let answer: Value =
        serde_json::from_slice(&decompress("gzip", &response.bytes().await.unwrap())).unwrap();
    assert_matches_offline(&answer, &offline, "gzipped base64 JSON");

    // Multipart: one file gives the single shape plus its name; several give "results".
    let part =
        |(name, bytes): &(String, Vec<u8>)| Part::bytes(bytes.clone()).file_name(name.clone());
    let one = Form::new()
        .part("image", part(&images[0]))
        .text("note", "ignored");
    let (status, answer) =
        json_of(client.post(&all_url).multipart(one).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["filename"], name.as_str());
    assert_matches_offline(&answer, &offline, "multipart, one file");
    let two = Form::new()
        .part("a", part(&images[0]))
        .part("b", part(&images[1]));
    let (status, answer) =
        json_of(client.post(&all_url).multipart(two).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, (name, bytes)) in results.iter().zip(&images) {
        assert_eq!(result["filename"], name.as_str());
        assert_eq!(result["model"], "tiny");
        assert_matches_offline(result, &offline_probs(&checkpoint, bytes), name);
    }

    // Unknown routes and methods are JSON errors too.
    let (status, body) = json_of(client.get(server.url("/nope")).send().await.unwrap()).await;
    assert_error(
        status,
        &body,
        StatusCode::NOT_FOUND,
        "not_found",
        "unknown route",
    );
    let (status, body) = json_of(client.get(server.url("/predict")).send().await.unwrap()).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "GET /predict",
    );

    // Prometheus asks for gzip.
    let metrics = client
        .get(server.url("/metrics"))
        .header(ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap();
    assert!(metrics.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(metrics.headers()[CONTENT_ENCODING], "gzip");
    let text = String::from_utf8(decompress("gzip", &metrics.bytes().await.unwrap())).unwrap();
    let count =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/predict",status="200"}"#),
        8.0
    );
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/invocations",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"vt_serve_requests_total{route="/predict",status="405"}"#),
        1.0
    );
    assert_eq!(
        count(r#"vt_serve_requests_total{route="unmatched",status="404"}"#),
        1.0
    );
    assert_eq!(
        count(r#"vt_serve_request_duration_seconds_count{route="/predict"}"#),
        9.0
    );
    // Ten images went through the model, in however many batches, each counted by the
    // class it was given.
    assert_eq!(count("vt_serve_batch_size_sum"), 10.0);
    let by_class: f64 = text
        .lines()
        .filter(|line| line.starts_with("vt_serve_predictions_total{class="))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(by_class, 10.0, "{text}");
    assert_eq!(count("vt_serve_prediction_confidence_count"), 10.0);
    assert_eq!(
        count(r#"vt_serve_prediction_confidence_bucket{le="1"}"#),
        10.0
    );
    assert!(count("vt_serve_inference_seconds_count") >= 1.0);
    assert_eq!(count("vt_serve_queue_depth"), 0.0);
    // Every body read meanwhile was given back once answered.
    assert_eq!(count("vt_serve_inflight_body_bytes"), 0.0);

    server.shutdown().await;
}

/// Sends a chunked body (no Content-Length) over a raw connection: the size limit must hold
/// while reading. Returns the status code and the JSON body.
async fn post_chunked(addr: std::net::SocketAddr, chunks: usize, bytes: &[u8]) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(CHUNKED_PREDICT_HEAD.as_bytes())
        .await
        .unwrap();
    for _ in 0..chunks {
        if stream.write_all(&chunk(bytes)).await.is_err() {
            break; // The server answered and closed early: read what it said.
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    read_response(&mut stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_json_errors_and_the_server_carries_on() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let limit = 64 * 1024;
    let server = TestServer::start(&checkpoint, &["--max-body-bytes", &limit.to_string()]).await;
    let client = client();
    let url = server.url("/predict");
    let photo = test_images(1).remove(0).1;
    let png = encode(
        &RgbImage::from_pixel(64, 64, image::Rgb([9, 99, 199])),
        ImageFormat::Png,
    );

    let cases: Vec<(&str, &str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "over the body limit",
            "image/png",
            vec![0; limit + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "30000x30000 PNG",
            "image/png",
            png_declaring(30_000, 30_000),
            StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
        ),
        (
            "garbage",
            "image/jpeg",
            b"this is not an image at all".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "empty",
            "image/jpeg",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "truncated PNG",
            "image/png",
            png[..png.len() / 2].to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "TIFF",
            "application/octet-stream",
            b"II*\0\x08\0\0\0\0\0\0\0".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "HEIC (an iPhone's photo)",
            "image/heic",
            b"\0\0\0\x18ftypheic\0\0\0\0mif1heic".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "text under a text content type",
            "text/plain",
            b"hello".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "bad base64",
            "application/json",
            br#"{"image": "@@@ not base64 @@@"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "base64 of garbage",
            "application/json",
            br#"{"image": "aGVsbG8="}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "broken JSON",
            "application/json",
            b"{\"image\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "JSON with neither field",
            "application/json",
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "unknown JSON field",
            "application/json",
            br#"{"img": "aGk="}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "multipart without boundary",
            "multipart/form-data",
            photo.clone(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (what, content_type, body, status, code) in cases {
        let (got, answer) = post_raw(&client, &url, content_type, body).await;
        assert_error(got, &answer, status, code, what);
    }
    // A raw image under any other content type is read from its bytes: SageMaker's, curl's
    // default for --data-binary, none at all.
    for content_type in [
        "application/x-image",
        "application/x-www-form-urlencoded",
        "text/plain",
    ] {
        let (status, answer) = post_raw(&client, &url, content_type, photo.clone()).await;
        assert_eq!(status, StatusCode::OK, "{content_type}: {answer}");
    }
    // JSON under another content type (`curl -d @request.json` sends it form-urlencoded)
    // is not an image: the answer says which content type it needs. The older `text/json`
    // and `+json` types are JSON.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let request = serde_json::to_vec(&json!({ "image": b64 })).unwrap();
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let (status, answer) = post_raw(&client, &url, content_type, request.clone()).await;
        assert_error(
            status,
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid_image",
            content_type,
        );
        assert_detail_says(&answer, "looks like JSON");
        assert_detail_says(&answer, "Content-Type: application/json");
    }
    for content_type in ["text/json", "application/vnd.example+json; charset=utf-8"] {
        let (status, answer) = post_raw(&client, &url, content_type, request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{content_type}: {answer}");
    }
    // The other way round: an image sent as JSON.
    let (status, answer) = post_raw(&client, &url, "application/json", photo.clone()).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "bad_request",
        "an image sent as JSON",
    );
    assert_detail_says(
        &answer,
        "the body is a JPEG image, not JSON: send it without `Content-Type: application/json`",
    );

    for query in ["top_k=0", "top_k=many"] {
        let url = server.url(&format!("/predict?{query}"));
        let (status, answer) = post_raw(&client, &url, "image/jpeg", photo.clone()).await;
        assert_error(
            status,
            &answer,
            StatusCode::BAD_REQUEST,
            "bad_request",
            query,
        );
    }

    let response = client
        .post(&url)
        .json(&json!({"url": "http://127.0.0.1:9/photo.jpg"}))
        .send()
        .await
        .unwrap();
    let (status, answer) = json_of(response).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "url without allow-list",
    );
    assert_detail_says(&answer, "--allow-url-fetch");

    // A file named only by RFC 5987's parameter is a file too, and a browser form's file
    // input left empty (no name, no bytes) is none.
    let mut body = Vec::new();
    for (disposition, bytes) in [
        (
            r#"name="a"; filename*=UTF-8''%C3%A9t%C3%A9.jpg"#,
            photo.as_slice(),
        ),
        (r#"name="b"; filename="""#, &[][..]),
        // A form field whose quoted name holds what reads as a file name parameter.
        (r#"name="note; filename*=UTF-8''n.txt""#, b"hello"),
        (r#"name="c"; filename="c.jpg""#, photo.as_slice()),
    ] {
        body.extend_from_slice(
            format!("--x\r\nContent-Disposition: form-data; {disposition}\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--x--\r\n");
    let (status, answer) = post_raw(&client, &url, "multipart/form-data; boundary=x", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let names: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["été.jpg", "c.jpg"], "{answer}");
    let no_files = Form::new().text("note", "no file here");
    let (status, answer) =
        json_of(client.post(&url).multipart(no_files).send().await.unwrap()).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "bad_request",
        "multipart without files",
    );
    let with_bad_file = Form::new()
        .part("a", Part::bytes(photo.clone()).file_name("good.jpg"))
        .part("b", Part::bytes(b"junk".to_vec()).file_name("bad.jpg"));
    let (status, answer) = json_of(
        client
            .post(&url)
            .multipart(with_bad_file)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_image",
        "multipart with a bad file",
    );
    assert!(
        answer["detail"].as_str().unwrap().starts_with("bad.jpg: "),
        "{answer}"
    );
    let too_big = Form::new().part("a", Part::bytes(vec![1; limit + 1]).file_name("big.jpg"));
    let (status, answer) =
        json_of(client.post(&url).multipart(too_big).send().await.unwrap()).await;
    assert_error(
        status,
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "multipart over the limit",
    );

    let (status, answer) = post_chunked(server.addr, 8, &[7; 16 * 1024]).await;
    assert_eq!(status, 413, "chunked body over the limit: {answer}");
    assert_eq!(answer["error"], "payload_too_large");

    // Still healthy, and still right.
    let (status, answer) = post_raw(
        &client,
        &server.url("/predict?top_k=6"),
        "image/jpeg",
        photo.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_matches_offline(
        &answer,
        &offline_probs(&checkpoint, &photo),
        "after bad inputs",
    );
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(metric(&text, "vt_serve_queue_depth"), Some(0.0), "{text}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_pixel_limit_refuses_a_huge_png_before_decoding() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    let client = client();
    // 30000 x 30000 x 3 bytes would be 2.7 GB if decoded.
    let (status, answer) = post_raw(
        &client,
        &server.url("/predict"),
        "image/png",
        png_declaring(30_000, 30_000),
    )
    .await;
    assert_error(
        status,
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "image_too_large",
        "30000x30000 PNG",
    );
    assert_detail_says(&answer, "40000000");
    server.shutdown().await;
}

/// Serves `/photo.jpg`, a body over the limit at `/big`, a redirect to another host and two
/// to other schemes, and chains of N redirects to the photo at `/chain/N`.
async fn image_host(photo: Vec<u8>, big: usize) -> std::net::SocketAddr {
    use axum::extract::Path;
    use axum::response::Redirect;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/photo.jpg", get(move || async move { photo.clone() }))
        .route("/big", get(move || async move { vec![0u8; big] }))
        .route(
            "/elsewhere",
            get(move || async move {
                Redirect::temporary(&format!("http://localhost:{}/photo.jpg", addr.port()))
            }),
        )
        .route(
            "/ftp",
            get(move || async move {
                Redirect::temporary(&format!("ftp://127.0.0.1:{}/photo.jpg", addr.port()))
            }),
        )
        .route(
            "/file",
            get(|| async { Redirect::temporary("file:///etc/passwd") }),
        )
        .route(
            "/chain/{n}",
            get(|Path(n): Path<u32>| async move {
                Redirect::temporary(&match n {
                    1 => "/photo.jpg".to_string(),
                    n => format!("/chain/{}", n - 1),
                })
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_inputs_are_fetched_only_from_allowed_hosts() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let photo = test_images(1).remove(0).1;
    // The photo is as large as a body may be, and the whole body budget: a fetched image
    // takes the place of its request's body in the budget, so it still fits.
    let limit = photo.len();
    let host = image_host(photo.clone(), limit + 1).await;
    let server = TestServer::start(
        &checkpoint,
        &[
            "--allow-url-fetch",
            "127.0.0.1,images.example",
            "--max-body-bytes",
            &limit.to_string(),
            "--max-inflight-body-bytes",
            &limit.to_string(),
        ],
    )
    .await;
    let client = client();
    let url = server.url("/predict?top_k=6");
    let ask = |target: String| {
        let request = client.post(&url).json(&json!({ "url": target }));
        async move { json_of(request.send().await.unwrap()).await }
    };

    let (status, answer) = ask(format!("http://127.0.0.1:{}/photo.jpg", host.port())).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_matches_offline(
        &answer,
        &offline_probs(&checkpoint, &photo),
        "fetched photo",
    );

    let (status, answer) = ask(format!("http://localhost:{}/photo.jpg", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "host not allowed",
    );
    // The refusal names the host and port, as the allow-list's entries are written.
    assert_detail_says(
        &answer,
        &format!("`localhost:{}` is not in --allow-url-fetch", host.port()),
    );
    let (status, answer) = ask("file:///etc/passwd".into()).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "file URL",
    );
    let (status, answer) = ask(format!("http://127.0.0.1:{}/big", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "fetched body too big",
    );
    assert_detail_says(&answer, "the image the URL gives is larger than the limit");
    let (status, answer) = ask(format!("http://127.0.0.1:{}/missing", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_GATEWAY,
        "url_fetch_failed",
        "404 upstream",
    );
    // Refused by the policy, as a URL of that host is: not a failure to retry.
    let (status, answer) = ask(format!("http://127.0.0.1:{}/elsewhere", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "redirect off the list",
    );
    assert_detail_says(&answer, "leaves the allowed hosts");
    let (status, answer) = ask(format!("http://127.0.0.1:{}/ftp", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "redirect to another scheme",
    );
    assert_detail_says(&answer, "is not http or https");
    // reqwest follows no redirect to a file URL, and returns the redirect itself.
    let (status, answer) = ask(format!("http://127.0.0.1:{}/file", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "url_fetch_refused",
        "redirect to a file",
    );
    assert_detail_says(
        &answer,
        "redirect to `file:///etc/passwd`, which is not http or https",
    );
    let (status, answer) = ask(format!("http://127.0.0.1:{}/chain/5", host.port())).await;
    assert_eq!(status, StatusCode::OK, "five redirects: {answer}");
    let (status, answer) = ask(format!("http://127.0.0.1:{}/chain/6", host.port())).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_GATEWAY,
        "url_fetch_failed",
        "six redirects",
    );
    assert_detail_says(&answer, "more than 5 redirects");
    // Nothing listens on the port of a listener just closed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (status, answer) = ask(format!("http://127.0.0.1:{port}/photo.jpg")).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_GATEWAY,
        "url_fetch_failed",
        "nothing listening",
    );
    assert_detail_says(&answer, "Connection refused");
    server.shutdown().await;
}

/// A URL that parses but that no request line can carry (past 64 KiB) is the request's
/// fault: nothing was fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_too_long_to_send_is_a_bad_request() {
    let dir = tiny_checkpoint();
    let server =
        TestServer::start(&checkpoint_path(&dir), &["--allow-url-fetch", "127.0.0.1"]).await;
    let long = format!("http://127.0.0.1:1/{}", "a".repeat(70_000));
    let request = client()
        .post(server.url("/predict"))
        .json(&json!({ "url": long }));
    let (status, answer) = json_of(request.send().await.unwrap()).await;
    assert_error(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "bad_request",
        "URL too long to send",
    );
    assert_detail_says(&answer, "invalid url `http://127.0.0.1:1/aaa");
    server.shutdown().await;
}

/// A request that finds the queue full waits for room, in arrival order, rather than being
/// refused: a request of as many images as `--queue` (what a Triton client sends as the
/// configuration's `max_batch_size`) while a small one runs is answered once that one is.
/// Past the waiting room (`--queue` images more), requests get 503 at once with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_requests_wait_and_refuses_past_its_waiting_room() {
    let dir = tiny_checkpoint();
    // Two slots, and a batch that waits long for a slow upload: the first request holds a
    // slot meanwhile.
    let args = ["--queue", "2", "--max-batch", "8", "--max-delay-ms", "5000"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let client = client();
    let metrics_url = server.url("/metrics");
    let images = test_images(2);
    let photo = images[0].1.clone();
    let upload = start_endless_upload(&client, &server.base).await;
    let first = tokio::spawn(post_raw_owned(
        client.clone(),
        server.url("/predict"),
        photo.clone(),
    ));
    wait_for_queue_depth(&client, &metrics_url, 1.0).await;

    // Two images, one slot free: it waits, and does not hold the forming batch open.
    let mut form = Form::new();
    for (name, bytes) in &images {
        form = form.part(
            name.clone(),
            Part::bytes(bytes.clone()).file_name(name.clone()),
        );
    }
    let large = tokio::spawn(client.post(server.url("/predict")).multipart(form).send());
    wait_for_gauge(&client, &metrics_url, "vt_serve_queue_waiting", 2.0).await;
    wait_for_gauge(&client, &metrics_url, "vt_serve_requests_arriving", 1.0).await;

    // The waiting room is full.
    let refused = client
        .post(server.url("/predict"))
        .header(CONTENT_TYPE, "image/jpeg")
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()[RETRY_AFTER], "1");
    let (status, answer) = json_of(refused).await;
    assert_error(
        status,
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "past the waiting room",
    );
    assert_detail_says(&answer, "waiting room");

    drop(upload);
    let (status, answer) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = json_of(large.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["results"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let text = metrics_text(&client, &metrics_url).await;
    assert_eq!(metric(&text, "vt_serve_queue_waiting"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "vt_serve_queue_depth"), Some(0.0), "{text}");
    server.shutdown().await;
}

/// A request that fails (one of its images does not decode) while others of its images
/// wait for the busy model keeps their room in the queue until the model is done with
/// them: the next request waits for it and is answered, not refused because those images
/// still fill the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_requests_queued_images_keep_their_room_until_skipped() {
    // A model slow enough (a large input) that queued images wait behind the one it runs.
    let dir = tempfile::tempdir().unwrap();
    let mut config = vt_model::VtConfig::new(vt_model::Arch::VtResNet18, CLASSES.len(), 1024);
    config.class_names = CLASSES.iter().map(|c| c.to_string()).collect();
    (config.tokens, config.token_channels, config.heads) = (4, 32, 2);
    let checkpoint = dir.path().join("slow");
    vt_model::Model::init(config, &candle_core::Device::Cpu)
        .unwrap()
        .save(&checkpoint)
        .unwrap();
    // Seconds per image on a loaded machine: no deadline may cut the wait short.
    let args = [
        "--queue",
        "4",
        "--max-batch",
        "1",
        "--max-delay-ms",
        "0",
        "--timeout-ms",
        "600000",
    ];
    let server = TestServer::start(&checkpoint, &args).await;
    let client = client();
    let images = test_images(4);
    let form = |corrupt: bool| {
        let mut form = Form::new();
        for (i, (name, bytes)) in images.iter().enumerate() {
            // A truncated large PNG fails only once the small photos are decoded and queued.
            let bytes = if corrupt && i == 3 {
                let png = noise_png(1200);
                png[..png.len() / 2].to_vec()
            } else {
                bytes.clone()
            };
            form = form.part(format!("f{i}"), Part::bytes(bytes).file_name(name.clone()));
        }
        form
    };
    let failed = client
        .post(server.url("/predict"))
        .multipart(form(true))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::BAD_REQUEST);
    let (status, answer) = json_of(
        client
            .post(server.url("/predict"))
            .multipart(form(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"].as_array().map(Vec::len), Some(4));
    server.shutdown().await;
}

/// A PNG of `side` x `side` pixels of noise, which PNG cannot compress: about 3 bytes a
/// pixel.
fn noise_png(side: u32) -> Vec<u8> {
    let mut state = 0x9e37_79b9_u32;
    let img = RgbImage::from_fn(side, side, |_, _| {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [r, g, b, _] = state.to_le_bytes();
        image::Rgb([r, g, b])
    });
    encode(&img, ImageFormat::Png)
}

/// Request bodies, and images fetched from URLs, are charged to --max-inflight-body-bytes
/// as they are read: while one upload holds 700 KB of a 1 MB budget, a body of 500 KB is
/// refused with 503, on every route that reads bodies and in its error shape, and so is a
/// URL to it, until that upload is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_inflight_budget_get_503_until_others_are_answered() {
    let dir = tiny_checkpoint();
    let args = [
        "--max-body-bytes",
        "800000",
        "--max-inflight-body-bytes",
        "1000000",
        "--allow-url-fetch",
        "127.0.0.1",
    ];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let client = client();
    let metrics_url = server.url("/metrics");
    let held = "vt_serve_inflight_body_bytes";
    let first = noise_png(500);
    let second = noise_png(400);
    let host = image_host(second.clone(), 1).await;
    let second_url = json!({ "url": format!("http://127.0.0.1:{}/photo.jpg", host.port()) });
    assert!(
        (700_001..=800_000).contains(&first.len()),
        "{}",
        first.len()
    );
    assert!(
        (300_001..=800_000).contains(&second.len()),
        "{}",
        second.len()
    );

    // The first upload sends 700 KB of its image and pauses.
    let mut upload = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = [CHUNKED_PREDICT_HEAD.as_bytes(), &chunk(&first[..700_000])].concat();
    upload.write_all(&head).await.unwrap();
    wait_for_gauge(&client, &metrics_url, held, 700_000.0).await;

    // The second declares more than the 300 KB left: refused before it is read, in each
    // route's error shape.
    let multipart =
        || Form::new().part("file", Part::bytes(second.clone()).file_name("second.png"));
    let api_shape = |body: &Value| {
        assert_eq!(body["error"], "overloaded", "{body}");
        assert_detail_says(body, "--max-inflight-body-bytes (1000000 bytes)");
    };
    let protocol_shape = |body: &Value| {
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains("--max-inflight-body-bytes"), "{body}");
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    };
    let raw = |path: &str| client.post(server.url(path)).body(second.clone());
    // What, the request, and whether it is a protocol's route (`{"error": MESSAGE}`).
    let requests = [
        (
            "raw",
            raw("/predict").header(CONTENT_TYPE, "image/png"),
            false,
        ),
        (
            "multipart",
            client.post(server.url("/predict")).multipart(multipart()),
            false,
        ),
        ("open inference", raw("/v2/models/tiny/infer"), true),
        ("instances", raw("/v1/models/tiny:predict"), true),
        (
            "url",
            client.post(server.url("/predict")).json(&second_url),
            false,
        ),
    ];
    for (what, request, protocol) in requests {
        let refused = request.send().await.unwrap();
        assert_eq!(refused.headers()[RETRY_AFTER], "1", "{what}");
        let (status, answer) = json_of(refused).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {answer}");
        if protocol {
            protocol_shape(&answer);
        } else {
            api_shape(&answer);
        }
    }
    // A client that waits for `100 Continue` before sending its body gets the 503 instead.
    let mut waiting = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        second.len()
    );
    waiting.write_all(head.as_bytes()).await.unwrap();
    let (status, answer) = read_response(&mut waiting).await;
    assert_eq!(status, 503, "{answer}");
    api_shape(&answer);
    // Sent in chunks (no declared length): refused once it reaches what is left, answered
    // once it is sent, and what it took is given back.
    let (status, answer) = post_chunked(server.addr, 1, &second).await;
    assert_eq!(status, 503, "{answer}");
    api_shape(&answer);
    // One past --max-body-bytes is too large whatever the budget: 413, not a 503 that
    // retrying would not change.
    let oversize = [first.as_slice(), &second].concat();
    let (status, answer) = post_chunked(server.addr, 1, &oversize).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"], "payload_too_large", "{answer}");
    wait_for_gauge(&client, &metrics_url, held, 700_000.0).await;

    // The first upload ends and is answered as any other; then the second fits.
    let rest = [chunk(&first[700_000..]), b"0\r\n\r\n".to_vec()].concat();
    upload.write_all(&rest).await.unwrap();
    let (status, answer) = read_response(&mut upload).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(scores(&answer).len(), 3, "{answer}");
    let (status, answer) = post_raw(&client, &server.url("/predict"), "image/png", second).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let fetched = client.post(server.url("/predict")).json(&second_url);
    let (status, answer) = json_of(fetched.send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    wait_for_gauge(&client, &metrics_url, held, 0.0).await;
    server.shutdown().await;
}

async fn post_raw_owned(
    client: reqwest::Client,
    url: String,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    post_raw(&client, &url, "image/jpeg", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_only_for_requests_on_their_way() {
    let dir = tiny_checkpoint();
    let args = ["--max-batch", "8", "--max-delay-ms", "20000"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let client = client();
    let images = test_images(3);
    // A lone request has nobody to wait for.
    let (status, answer) = post_raw(
        &client,
        &server.url("/predict"),
        "image/jpeg",
        images[0].1.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer["elapsed_ms"].as_f64().unwrap() < 10_000.0,
        "{answer}"
    );
    // Three files of one request are on their way until all are queued: one batch.
    let mut form = Form::new();
    for (name, bytes) in &images {
        form = form.part(
            name.clone(),
            Part::bytes(bytes.clone()).file_name(name.clone()),
        );
    }
    let (status, answer) = json_of(
        client
            .post(server.url("/predict"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for result in results {
        assert!(
            result["elapsed_ms"].as_f64().unwrap() < 10_000.0,
            "{answer}"
        );
    }
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(
        metric(&text, "vt_serve_batch_size_count"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vt_serve_batch_size_sum"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vt_serve_requests_arriving"),
        Some(0.0),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_504() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &PAST_DEADLINE_ARGS).await;
    let client = client();
    let photo = test_images(1).remove(0).1;
    // The photo's request starts first, so its 2 s run out first; a slow upload started
    // after it keeps the batch waiting (up to 20 s) past them.
    let (status, answer) =
        post_past_deadline(&client, &server.base, "/predict", "image/jpeg", &photo).await;
    assert_error(
        StatusCode::from_u16(status).unwrap(),
        &answer,
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        "slow batch",
    );
    assert_detail_says(&answer, "2000 ms");
    // The abandoned request gives its slot back.
    wait_for_queue_depth(&client, &server.url("/metrics"), 0.0).await;
    server.shutdown().await;
}

/// A client that stalls while sending its body gets 408 Request Timeout once --timeout-ms
/// passes (its own doing, a 4xx), not the 504 of a model that did not answer in time, on
/// every route that reads a body and in its error shape; the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_not_sent_in_time_gets_408() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--timeout-ms", "300"]).await;
    let client = client();
    for (path, content_type) in [
        ("/predict", "image/jpeg"),
        ("/predict", "application/json"),
        ("/predict", "multipart/form-data; boundary=x"),
        ("/v1/models/tiny:predict", "application/json"),
        ("/v2/models/tiny/infer", "application/json"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        // 100 bytes announced, 10 sent.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n\
             Content-Length: 100\r\n\r\n0123456789"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (status, answer) = read_response(&mut stream).await;
        assert_eq!(status, 408, "{path} {content_type}: {answer}");
        let message = match path {
            "/predict" => {
                assert_eq!(answer["error"], "request_timeout", "{answer}");
                &answer["detail"]
            }
            _ => &answer["error"],
        };
        assert!(
            message
                .as_str()
                .is_some_and(|m| m.contains("body was not received within 300 ms")),
            "{path}: {answer}"
        );
    }
    let text = metrics_text(&client, &server.url("/metrics")).await;
    let series = r#"vt_serve_requests_total{route="/predict",status="408"}"#;
    assert_eq!(metric(&text, series), Some(3.0), "{text}");
    server.shutdown().await;
}

/// A request that times out stops the work of its images still waiting to be decoded: it
/// no longer counts as arriving (which would hold every forming batch open) once its 504
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_stops_its_waiting_images() {
    let dir = tiny_checkpoint();
    let args = ["--timeout-ms", "200", "--threads", "1"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let client = client();
    // Ten images of 9 megapixels, decoded one at a time (one thread): seconds of work.
    let big = encode(
        &RgbImage::from_fn(3000, 3000, |x, y| image::Rgb([x as u8, y as u8, 0])),
        ImageFormat::Png,
    );
    // And first a small one, classified at once.
    let small = test_images(1).remove(0).1;
    let mut form = Form::new().part("file", Part::bytes(small).file_name("small.jpg"));
    for i in 0..10 {
        form = form.part(
            "file",
            Part::bytes(big.clone()).file_name(format!("{i}.png")),
        );
    }
    let response = client
        .post(server.url("/predict"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, answer) = json_of(response).await;
    assert_error(
        status,
        &answer,
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        "ten big files",
    );
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(
        metric(&text, "vt_serve_requests_arriving"),
        Some(0.0),
        "{text}"
    );
    // Its images that were queued keep their room until the model thread answers them as
    // expired, at once.
    wait_for_queue_depth(&client, &server.url("/metrics"), 0.0).await;
    // None was answered: the small image's prediction is not counted as one.
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert!(!text.contains("vt_serve_predictions_total{"), "{text}");
    assert_eq!(
        metric(&text, "vt_serve_prediction_confidence_count"),
        Some(0.0),
        "{text}"
    );
    server.shutdown().await;
}

/// An admission of four images, as the server's.
fn admission(metrics: &vt_serve::metrics::Metrics) -> Admission {
    Admission::new(
        4,
        metrics.queue_depth.clone(),
        metrics.queue_waiting.clone(),
    )
}

/// The admission of a request of `images` images.
async fn admitted(metrics: &vt_serve::metrics::Metrics, images: usize) -> Arc<Admitted> {
    let arriving = Arriving::new(&metrics.requests_arriving);
    Arc::new(admission(metrics).admit(images, &arriving).await.unwrap())
}

/// An image whose deadline passed while it waited for the model is answered as expired
/// (504), not dropped (which its request would report as the model thread's failure, 500).
#[tokio::test]
async fn the_model_thread_answers_an_expired_image_as_expired() {
    let dir = tiny_checkpoint();
    let source = ModelSource::new(&parse_args(&checkpoint_path(&dir), &[]));
    let (classifier, info) = source.load(1).unwrap();
    let (_, photo) = test_images(1).remove(0);
    let input = preprocessed(&classifier, &photo);
    let config = BatchConfig {
        max_batch: 4,
        max_delay: Duration::ZERO,
        queue: 4,
    };
    let metrics = Arc::new(vt_serve::metrics::Metrics::new().unwrap());
    let admitted = admitted(&metrics, 1).await;
    let model = ServedModel::spawn(classifier, info, config, metrics).unwrap();
    let answer = model
        .submit(input.clone(), false, Instant::now(), &admitted)
        .unwrap();
    assert!(matches!(answer.await.unwrap(), Err(Unanswered::Expired)));
    let answer = model.submit(
        input,
        false,
        Instant::now() + Duration::from_secs(60),
        &admitted,
    );
    assert!(answer.unwrap().await.unwrap().is_ok());
}

/// A batch that mixes images asking for their token attention (`:explain`) with others:
/// each gets what it asked for, the attention of its own image and the scores it gets alone,
/// the two kinds in forward passes of their own.
#[tokio::test]
async fn a_mixed_batch_gives_the_attention_only_to_images_that_ask_for_it() {
    let dir = tiny_checkpoint();
    let source = ModelSource::new(&parse_args(&checkpoint_path(&dir), &[]));
    let (classifier, info) = source.load(1).unwrap();
    let inputs: Vec<Vec<f32>> = test_images(3)
        .iter()
        .map(|(_, photo)| preprocessed(&classifier, photo))
        .collect();
    let alone: Vec<Prediction> = inputs
        .iter()
        .map(|input| {
            classifier
                .explain(std::slice::from_ref(input))
                .unwrap()
                .remove(0)
        })
        .collect();
    let config = BatchConfig {
        max_batch: 4,
        max_delay: Duration::from_secs(30),
        queue: 4,
    };
    let metrics = Arc::new(vt_serve::metrics::Metrics::new().unwrap());
    let model = ServedModel::spawn(classifier, info, config, Arc::clone(&metrics)).unwrap();
    // A request still on its way holds the batch open until all three are queued.
    let arriving = Arriving::new(&metrics.requests_arriving);
    let admitted = Arc::new(admission(&metrics).admit(3, &arriving).await.unwrap());
    let asks = [true, false, true];
    let deadline = Instant::now() + Duration::from_secs(60);
    let answers: Vec<_> = inputs
        .iter()
        .zip(asks)
        .map(|(input, with_attention)| {
            model
                .submit(input.clone(), with_attention, deadline, &admitted)
                .unwrap()
        })
        .collect();
    drop(arriving);
    for (i, ((answer, asked), alone)) in answers.into_iter().zip(asks).zip(&alone).enumerate() {
        let prediction = answer.await.unwrap().unwrap();
        assert_close(
            &prediction.probs,
            std::slice::from_ref(&alone.probs),
            &format!("{i}"),
        );
        match (&prediction.attention, &alone.attention) {
            (Some(got), Some(expected)) if asked => {
                assert_eq!(got.len(), expected.len(), "{i}");
                for (module, (got, expected)) in got.iter().zip(expected).enumerate() {
                    let what = format!("image {i} module {module}");
                    assert_eq!((got.height, got.width), (expected.height, expected.width));
                    assert_close(&got.maps.concat(), &[expected.maps.concat()], &what);
                }
            }
            (None, _) if !asked => {}
            (got, _) => panic!("image {i} asked for attention: {asked}, got {got:?}"),
        }
    }
    // One batch, in two forward passes: the attention is computed for the images that ask
    // for it only, and what befalls that pass befalls them only.
    assert_eq!(metrics.batch_size.get_sample_count(), 2, "two passes");
    assert_eq!(metrics.batch_size.get_sample_sum(), 3.0, "of three images");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_concurrent_requests_each_match_the_offline_prediction() {
    const REQUESTS: usize = 300;
    const CONCURRENCY: usize = 32;
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let images = Arc::new(test_images(24));
    let offline: Arc<Vec<Vec<f32>>> = Arc::new(
        images
            .iter()
            .map(|(_, b)| offline_probs(&checkpoint, b))
            .collect(),
    );
    let server =
        TestServer::start(&checkpoint, &["--max-batch", "16", "--max-delay-ms", "10"]).await;
    let client = client();
    let url = server.url("/predict?top_k=6");
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let (client, url, images, offline, gate) = (
            client.clone(),
            url.clone(),
            Arc::clone(&images),
            Arc::clone(&offline),
            Arc::clone(&gate),
        );
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let k = i % images.len();
            let (name, bytes) = &images[k];
            let (status, answer) =
                post_raw(&client, &url, "application/octet-stream", bytes.clone()).await;
            assert_eq!(status, StatusCode::OK, "request {i} ({name}): {answer}");
            assert_matches_offline(&answer, &offline[k], name);
        });
    }
    let mut answered = 0;
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
        answered += 1;
    }
    assert_eq!(answered, REQUESTS);
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(
        metric(&text, "vt_serve_batch_size_sum"),
        Some(REQUESTS as f64),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_the_requests_in_flight() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(
        &checkpoint_path(&dir),
        &[
            "--max-batch",
            "8",
            "--max-delay-ms",
            "4000",
            "--timeout-ms",
            "10000",
        ],
    )
    .await;
    let client = client();
    let photo = test_images(1).remove(0).1;
    // A slow upload keeps the batch waiting its whole window; shutdown waits for the upload
    // too, until its own deadline.
    let _upload = start_endless_upload(&client, &server.base).await;
    let in_flight = tokio::spawn(post_raw_owned(
        client.clone(),
        server.url("/predict"),
        photo,
    ));
    wait_for_queue_depth(&client, &server.url("/metrics"), 1.0).await;
    let state = Arc::clone(&server.state);
    server.shutdown().await;
    assert!(!state.is_accepting());
    let (status, answer) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(scores(&answer).len(), 3);
}

/// A request that begins once shutdown began (on a connection whose headers were still
/// arriving then) is refused (503), not accepted and then cut off when the drain, which
/// waits for the requests in flight at its start, ends. Shutdown's first step alone, so
/// that the request surely reaches the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_begins_during_shutdown_is_refused() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    server.state.stop_accepting();
    let photo = test_images(1).remove(0).1;
    let (status, answer) = post_raw_owned(client(), server.url("/predict"), photo).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(
        answer["detail"], "the server is not ready: shutting down",
        "{answer}"
    );
    server.shutdown().await;
}

/// A client that never finishes its request headers does not hold shutdown: past the
/// request timeout its connection carries no request, and it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_client_that_never_sends_its_headers() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--timeout-ms", "300"]).await;
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown still waiting after 20 s");
}

/// A client that is slow to send its headers, or a keep-alive connection left idle, is
/// closed after `--header-timeout-ms` while the server keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_complete_headers_are_closed_after_the_header_timeout() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--header-timeout-ms", "1000"]).await;
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let stalled = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert_eq!(
        stalled.as_deref(),
        Some(""),
        "the stalled client is not closed"
    );
    let idle = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    let idle = idle.expect("the idle keep-alive connection is not closed");
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");
    assert_still_serving(server).await;
}

/// A client that stops reading its answers (its receive buffer full) is let go once the
/// server's writes have made no progress for `--header-timeout-ms`, as one that stops
/// sending is: it held the connection (and the answers' memory) for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_the_header_timeout() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--header-timeout-ms", "1000"]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    // Pipelined requests for the demo page, whose answers (11 MB) outgrow the sockets'
    // buffers (at most 4 MB on Linux).
    let count = 2000;
    let request = b"GET / HTTP/1.1\r\nHost: test\r\nAccept-Encoding: identity\r\n\r\n";
    stream.write_all(&request.repeat(count)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Still open, the connection would answer every request as it is read.
    let mut received = Vec::new();
    let mut buffer = vec![0; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let answered = String::from_utf8_lossy(&received)
        .matches("HTTP/1.1 200 OK")
        .count();
    assert!(
        closed.is_ok() && answered < count,
        "{answered} of {count} requests answered"
    );
    assert_still_serving(server).await;
}

/// The server answers a probe after a connection was closed, then shuts down.
async fn assert_still_serving(server: TestServer) {
    let live = client()
        .get(server.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    server.shutdown().await;
}

/// Everything the server sends until it closes the connection, or `None` if it is still
/// open after `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut received))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// Where Debian's chromium is, if installed.
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
}

/// `(label, score)` of every `<li class="bar" data-label=".." data-score="..">` in the DOM.
fn bars_in(dom: &str) -> Vec<(String, f64)> {
    let attribute = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[start..].split('"').next()?.to_owned())
    };
    dom.split("<li ")
        .skip(1)
        .filter_map(|rest| {
            let tag = rest.split('>').next()?;
            if !tag.contains("class=\"bar\"") {
                return None;
            }
            Some((
                attribute(tag, "data-label")?,
                attribute(tag, "data-score")?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_in_headless_chromium_calls_predict_and_draws_the_bars() {
    let Some(chromium) = chromium() else {
        eprintln!("skipping: no `chromium` binary on PATH (apt-get install chromium)");
        return;
    };
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &[]).await;
    let client = client();
    let photo = test_images(1).remove(0).1;
    let (_, expected) = post_raw(
        &client,
        &server.url("/predict?top_k=6"),
        "image/jpeg",
        photo.clone(),
    )
    .await;
    let metrics_url = server.url("/metrics");
    let predict_calls = |text: &str| {
        metric(
            text,
            r#"vt_serve_requests_total{route="/predict",status="200"}"#,
        )
    };
    let before = predict_calls(
        &client
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );

    let data_url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&photo)
    );
    let mut page = reqwest::Url::parse(&server.url("/")).unwrap();
    page.query_pairs_mut()
        .append_pair("top_k", "6")
        .append_pair("demo", &data_url);
    let dom = page_dom(&chromium, page.as_str()).await;
    assert!(
        dom.contains(r#"data-state="done""#),
        "the page did not finish its prediction; DOM:\n{dom}"
    );

    let bars = bars_in(&dom);
    let expected = scores(&expected);
    assert_eq!(bars.len(), expected.len(), "{dom}");
    for ((label, score), (want_label, want_score)) in bars.iter().zip(&expected) {
        assert_eq!(label, want_label, "{dom}");
        assert!(
            (score - want_score).abs() < 1e-6,
            "{label}: page {score}, API {want_score}"
        );
    }
    assert!(
        dom.contains(r#"<img id="preview" alt="the image being classified" src="blob:"#),
        "{dom}"
    );
    let after = predict_calls(
        &client
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(
        after.unwrap_or(0.0),
        before.unwrap_or(0.0) + 1.0,
        "the page must call POST /predict once"
    );

    // A link cannot make the page post what it chooses: a data: URL of JSON is refused
    // before any request.
    let mut page = reqwest::Url::parse(&server.url("/")).unwrap();
    page.query_pairs_mut().append_pair(
        "demo",
        r#"data:application/json,{"url":"http://127.0.0.1:1/x.jpg"}"#,
    );
    let dom = page_dom(&chromium, page.as_str()).await;
    assert!(dom.contains(r#"data-state="error""#), "{dom}");
    assert!(dom.contains("?demo= takes a data:image URL"), "{dom}");
    let text = client
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(r#"vt_serve_requests_total{route="/predict",status="400"}"#),
        "{text}"
    );
    assert_eq!(predict_calls(&text), after, "no other call to /predict");
    server.shutdown().await;

    // A server with --api-key: the page asks for the key instead of failing.
    let server = TestServer::start(&checkpoint_path(&dir), &["--api-key", "k3y"]).await;
    let mut page = reqwest::Url::parse(&server.url("/")).unwrap();
    page.query_pairs_mut().append_pair("demo", &data_url);
    let dom = page_dom(&chromium, page.as_str()).await;
    assert!(dom.contains(r#"data-state="needs-key""#), "{dom}");
    assert!(
        dom.contains(r#"<form id="key">"#),
        "the key field shows: {dom}"
    );
    assert!(
        dom.contains("This server needs its API key: enter it above"),
        "{dom}"
    );
    server.shutdown().await;
}

/// The DOM headless `chromium` dumps for `url`, once the page's fetches are done.
async fn page_dom(chromium: &std::path::Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(chromium);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        // Virtual time waits for the page's fetches before the DOM is dumped.
        "--virtual-time-budget=60000",
        "--dump-dom",
    ]);
    command.arg(format!("--user-data-dir={}", profile.path().display()));
    command.arg(url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    format!(
        "{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `--cors-allow-origin`: pages of the allowed origins get their preflight answered and may
/// read the answer and its request id; other origins get no CORS headers; without the flag
/// nothing changes (an OPTIONS request is a 405 as before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_lets_only_the_allowed_origins_call_from_a_browser() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let (_, photo) = test_images(1).remove(0);
    let client = client();
    let allowed = "https://app.example.com";
    let preflight = |url: String, origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,inference-header-content-length",
            )
            .send()
    };
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let server = TestServer::start(
        &checkpoint,
        &[
            "--cors-allow-origin",
            "https://other.example,https://app.example.com",
        ],
    )
    .await;
    let answer = preflight(server.url("/predict"), "https://app.example.com")
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    let methods = header(&answer, "access-control-allow-methods").unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = header(&answer, "access-control-allow-headers").unwrap();
    assert!(
        headers.contains("inference-header-content-length"),
        "{headers}"
    );

    let answer = client
        .post(server.url("/predict"))
        .header("origin", allowed)
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    let exposed = header(&answer, "access-control-expose-headers").unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    let stranger = client
        .post(server.url("/predict"))
        .header("origin", "https://evil.example")
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(header(&stranger, "access-control-allow-origin"), None);
    server.shutdown().await;

    let server = TestServer::start(&checkpoint, &[]).await;
    let answer = preflight(server.url("/predict"), "https://app.example.com")
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    // Without CORS it is no preflight: counted as its route's 405.
    let text = metrics_text(&client, &server.url("/metrics")).await;
    assert_eq!(
        metric(
            &text,
            r#"vt_serve_requests_total{route="/predict",status="405"}"#
        ),
        Some(1.0),
        "{text}"
    );
    server.shutdown().await;

    let server = TestServer::start(&checkpoint, &["--cors-allow-origin", "*"]).await;
    let answer = client
        .get(server.url("/v2/health/ready"))
        .header("origin", "https://anyone.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    server.shutdown().await;
}

/// Requests whose client went away are counted as 499 (nginx's "client closed request"):
/// one whose client closed its connection while its images waited for a batch (hyper drops
/// it unanswered), and one whose client hung up partway through its body. CORS preflights
/// are counted apart from their routes, and a `/v1/models/NAME:VERB` of an unknown verb
/// apart from predictions.
/// With `--api-key`, every inference and model route answers 401 (with `WWW-Authenticate:
/// Bearer`, in its protocol's error shape) unless the request carries `Authorization: Bearer
/// KEY`; the probes, `/metrics` and the page answer anyone. The key comes from a file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_every_route_but_the_probes() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let (_, photo) = test_images(1).remove(0);
    let client = client();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "k3y-from-a-secret\n").unwrap();
    let server =
        TestServer::start(&checkpoint, &["--api-key-file", key_file.to_str().unwrap()]).await;
    let request = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut request = client
            .request(method, server.url(path))
            .header(CONTENT_TYPE, "image/png")
            .body(photo.clone());
        if let Some(key) = key {
            request = request.header("authorization", key);
        }
        request.send()
    };
    use reqwest::Method as M;
    for path in [
        "/",
        "/ping",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/tiny/ready",
        "/v2/models/tiny/versions/1/ready",
        "/v1/models/tiny",
    ] {
        let answer = request(M::GET, path, None).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
    }
    let guarded = [
        (M::POST, "/predict"),
        (M::POST, "/invocations"),
        (M::PUT, "/predictions/tiny"),
        (M::GET, "/v1/models"),
        (M::POST, "/v1/models/tiny:predict"),
        (M::GET, "/v2"),
        (M::GET, "/v2/models/tiny"),
        (M::GET, "/v2/models/tiny/config"),
        (M::POST, "/v2/models/tiny/infer"),
    ];
    for (method, path) in &guarded {
        for (key, says) in [
            (None, "send Authorization: Bearer KEY"),
            (
                Some("Bearer k3y-from-a-secre"),
                "does not hold this server's API key",
            ),
            (
                Some("Basic k3y-from-a-secret"),
                "does not hold this server's API key",
            ),
        ] {
            let answer = request(method.clone(), path, key).await.unwrap();
            assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(
                answer.headers()["www-authenticate"],
                "Bearer",
                "{method} {path}"
            );
            let (_, body) = json_of(answer).await;
            let protocol = path.starts_with("/v2") || path.starts_with("/v1/models/");
            let message = if protocol {
                &body["error"]
            } else {
                assert_eq!(body["error"], "unauthorized", "{path}: {body}");
                &body["detail"]
            };
            assert!(
                message.as_str().is_some_and(|m| m.contains(says)),
                "{method} {path}: {body}"
            );
        }
    }
    // With the key, in any case of the scheme, the answers are the server's usual ones.
    let (status, body) = json_of(
        request(
            M::POST,
            "/predict?top_k=6",
            Some("bearer k3y-from-a-secret"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_matches_offline(&body, &offline_probs(&checkpoint, &photo), "with the key");
    for (method, path) in &guarded[2..] {
        let answer = request(method.clone(), path, Some("Bearer k3y-from-a-secret"))
            .await
            .unwrap();
        // The image body is no JSON request on the protocol routes: 400, past the key.
        let json_route = path.ends_with(":predict") || path.ends_with("/infer");
        let expected = if json_route {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        assert_eq!(answer.status(), expected, "{method} {path}");
    }
    let metrics = metrics_text(&client, &server.url("/metrics")).await;
    assert!(
        metrics.contains(r#"status="401""#),
        "the refusals are counted: {metrics}"
    );
    server.shutdown().await;

    // A key that cannot be used stops the server before it starts, and is not quoted.
    std::fs::write(&key_file, "\n").unwrap();
    for (args, says) in [
        (
            vec!["--api-key-file", key_file.to_str().unwrap()],
            "--api-key-file",
        ),
        (
            vec!["--api-key", "not a key"],
            "printable ASCII without spaces",
        ),
    ] {
        let args = parse_args(&checkpoint, &args);
        let err = vt_serve::Server::bind(&args)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(says) && !err.contains("not a key"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_client_went_away_are_counted_as_499() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(
        &checkpoint_path(&dir),
        &[
            "--max-delay-ms",
            "60000",
            "--cors-allow-origin",
            "https://app.example.com",
        ],
    )
    .await;
    let client = client();
    let metrics_url = server.url("/metrics");
    let (_, photo) = test_images(1).remove(0);

    // Held in the queue by a batch that waits for an endless upload.
    let upload = start_endless_upload(&client, &server.base).await;
    let body = json!({ "instances": [{ "b64": base64::engine::general_purpose::STANDARD.encode(&photo) }] })
        .to_string();
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/models/tiny:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all([head.as_bytes(), body.as_bytes()].concat().as_slice())
        .await
        .unwrap();
    wait_for_queue_depth(&client, &metrics_url, 1.0).await;
    drop(stream);
    let predict = r#"vt_serve_requests_total{route="/v1/models/{model}:predict",status="499"}"#;
    wait_for_gauge(&client, &metrics_url, predict, 1.0).await;
    // The endless upload's client hangs up partway through its chunked body.
    drop(upload);
    let predict = r#"vt_serve_requests_total{route="/predict",status="499"}"#;
    wait_for_gauge(&client, &metrics_url, predict, 1.0).await;

    // Half a body of a declared length, then the client hangs up.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        photo.len()
    );
    stream
        .write_all(
            [head.as_bytes(), &photo[..photo.len() / 2]]
                .concat()
                .as_slice(),
        )
        .await
        .unwrap();
    wait_for_gauge(&client, &metrics_url, "vt_serve_requests_arriving", 1.0).await;
    drop(stream);
    wait_for_gauge(&client, &metrics_url, predict, 2.0).await;
    let text = metrics_text(&client, &metrics_url).await;
    let bad = r#"vt_serve_requests_total{route="/predict",status="400"}"#;
    assert_eq!(metric(&text, bad), None, "{text}");

    let preflight = client
        .request(reqwest::Method::OPTIONS, server.url("/predict"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    let bogus = client
        .post(server.url("/v1/models/tiny:bogus"))
        .json(&json!({ "instances": [] }))
        .send()
        .await
        .unwrap();
    assert!(bogus.status().is_client_error(), "{}", bogus.status());
    let text = metrics_text(&client, &metrics_url).await;
    let preflights = r#"vt_serve_requests_total{route="preflight",status="200"}"#;
    assert_eq!(metric(&text, preflights), Some(1.0), "{text}");
    let unknown = format!(
        r#"vt_serve_requests_total{{route="/v1/models/{{model}}:unknown",status="{}"}}"#,
        bogus.status().as_u16()
    );
    assert_eq!(metric(&text, &unknown), Some(1.0), "{text}");
    let predictions = r#"vt_serve_requests_total{route="/v1/models/{model}:predict","#;
    assert!(
        text.lines()
            .filter(|line| line.starts_with(predictions))
            .all(|line| line.contains(r#"status="499""#)),
        "{text}"
    );
    server.shutdown().await;
}

/// Scores that overflow an f16 model are an error, not NaN scores sorted anyhow: 500 with the
/// cause and the remedy, on `/predict` and on the Open Inference Protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_that_are_not_finite_are_an_error() {
    let dir = overflowing_in_f16_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--dtype", "f16"]).await;
    let client = client();
    let (_, photo) = test_images(1).remove(0);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let v2 =
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let multipart = Form::new().part("f", Part::bytes(photo.clone()).file_name("x.jpg"));
    // The file at fault is named where the request named its files.
    for (request, named) in [
        (
            client.post(server.url("/predict")).body(photo.clone()),
            false,
        ),
        (
            client.post(server.url("/v2/models/tiny/infer")).json(&v2),
            false,
        ),
        (
            client.post(server.url("/predict")).multipart(multipart),
            true,
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = response.text().await.unwrap();
        assert!(text.contains("not finite"), "{text}");
        assert!(text.contains("use --dtype f32"), "{text}");
        assert_eq!(text.contains("x.jpg: "), named, "{text}");
    }
    server.shutdown().await;
}
