//! The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) on a server
//! started in-process with `--grpc-port 0`, called by a tonic client built from the
//! server's own messages: health, metadata and configuration (the same as the HTTP
//! routes'), inference with raw and typed contents (encoded or preprocessed images) against
//! the offline predictions, the classification extension, the status codes of errors, and
//! a request written by NVIDIA's tritonclient.grpc (`fixtures/tritonclient/grpc_infer.bin`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use common::*;
use futures_util::StreamExt;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use vt_serve::open_inference::grpc::{HEALTH_SERVICE, SERVICE};
use vt_serve::open_inference::proto::*;
use vt_serve::{Server, Stopped};

fn image_input(shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
    InferInputTensor {
        name: "image".into(),
        datatype: "BYTES".into(),
        shape,
        parameters: HashMap::new(),
        contents,
    }
}

/// A request for all outputs of `images`, sent in `raw_input_contents`.
fn raw_request(model: &str, images: &[&[u8]]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![image_input(vec![images.len() as i64], None)],
        raw_input_contents: vec![Bytes::from(binary_elements(images))],
        ..ModelInferRequest::default()
    }
}

fn classification(count: i64) -> HashMap<String, InferParameter> {
    let parameter = InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(count)),
    };
    HashMap::from([("classification".to_owned(), parameter)])
}

fn assert_status(result: Result<ModelInferResponse, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err(needle);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "no `{needle}` in {status:?}"
    );
}

fn health_of(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

async fn health(
    grpc: &mut GrpcClient,
    service: &str,
) -> Result<HealthCheckResponse, tonic::Status> {
    grpc.call_service(HEALTH_SERVICE, "Check", health_of(service))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata_answer_as_the_http_routes_do() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--grpc-port", "0"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let http = client();

    let live: ServerLiveResponse = grpc.call("ServerLive", ServerLiveRequest {}).await.unwrap();
    assert!(live.live);
    let ready: ServerReadyResponse = grpc
        .call("ServerReady", ServerReadyRequest {})
        .await
        .unwrap();
    assert!(ready.ready);
    for version in ["", "1"] {
        let asked = ModelReadyRequest {
            name: "tiny".into(),
            version: version.into(),
        };
        let ready: ModelReadyResponse = grpc.call("ModelReady", asked).await.unwrap();
        assert!(ready.ready, "{version:?}");
    }

    // The metadata is the HTTP routes' JSON, field for field.
    let metadata: ServerMetadataResponse = grpc
        .call("ServerMetadata", ServerMetadataRequest {})
        .await
        .unwrap();
    let json = get_json(&http, &server.url("/v2")).await;
    assert_eq!(serde_json::to_value(&metadata).unwrap(), json);
    assert_eq!(metadata.name, "vt-serve");
    let asked = ModelMetadataRequest {
        name: "tiny".into(),
        version: String::new(),
    };
    let metadata: ModelMetadataResponse = grpc.call("ModelMetadata", asked).await.unwrap();
    let json = get_json(&http, &server.url("/v2/models/tiny")).await;
    assert_eq!(serde_json::to_value(&metadata).unwrap(), json);
    assert_eq!(metadata.outputs[0].shape, [-1, CLASSES.len() as i64]);
    let asked = ModelConfigRequest {
        name: "tiny".into(),
        version: "1".into(),
    };
    let config: ModelConfigResponse = grpc.call("ModelConfig", asked).await.unwrap();
    let config = config.config.unwrap();
    let json = get_json(&http, &server.url("/v2/models/tiny/config")).await;
    assert_eq!(serde_json::to_value(&config).unwrap(), json);
    assert_eq!(config.input[0].data_type, DataType::String as i32);
    assert_eq!(config.output[1].dims, [CLASSES.len() as i64]);

    // Another model or version is not ready (as Triton answers), and has no metadata;
    // another method is not implemented.
    for (name, version) in [("other", ""), ("tiny", "2")] {
        let asked = ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        let ready: ModelReadyResponse = grpc.call("ModelReady", asked).await.unwrap();
        assert!(!ready.ready, "{name} {version}");
        let asked = ModelMetadataRequest {
            name: name.into(),
            version: version.into(),
        };
        let status = grpc
            .call::<_, ModelMetadataResponse>("ModelMetadata", asked)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let asked = ModelConfigRequest {
            name: name.into(),
            version: version.into(),
        };
        let status = grpc
            .call::<_, ModelConfigResponse>("ModelConfig", asked)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let status = grpc
        .call::<_, ServerLiveResponse>("RepositoryIndex", ServerLiveRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("ModelInfer"), "{status:?}");

    // gRPC's health checking protocol, as Kubernetes' gRPC probes call it: the server ("")
    // and the inference service serve until shutdown begins; another service is unknown.
    for service in ["", SERVICE] {
        let answer = health(&mut grpc, service).await.unwrap();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let status = health(&mut grpc, "other.Service").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = grpc
        .call_service::<_, HealthCheckResponse>(HEALTH_SERVICE, "Watch", health_of(""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let metrics = metrics_text(&http, &server.url("/metrics")).await;
    for (series, count) in [
        (r#"code="OK",method="Check""#, 2.0),
        (r#"code="NOT_FOUND",method="Check""#, 1.0),
        (r#"code="OK",method="ServerLive""#, 1.0),
        (r#"code="OK",method="ModelReady""#, 4.0),
        (r#"code="NOT_FOUND",method="ModelMetadata""#, 2.0),
        (r#"code="OK",method="ModelConfig""#, 1.0),
        (r#"code="NOT_FOUND",method="ModelConfig""#, 2.0),
        (r#"code="UNIMPLEMENTED",method="unknown""#, 2.0),
    ] {
        let series = format!("vt_serve_grpc_requests_total{{{series}}}");
        assert_eq!(
            metric(&metrics, &series),
            Some(count),
            "{series}\n{metrics}"
        );
    }
    // Once shutdown begins (as its first step does), the server no longer serves.
    server.state.stop_accepting();
    let answer = health(&mut grpc, "").await.unwrap();
    assert_eq!(answer.status, ServingStatus::NotServing as i32);
    server.shutdown().await;
}

/// Raw contents in, raw contents out (as Triton answers tritonclient); typed contents in,
/// typed contents out; the same probabilities as `vt-serve predict` either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_gets_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &["--grpc-port", "0"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let photos = test_images(3);
    let images: Vec<&[u8]> = photos.iter().map(|(_, b)| b.as_slice()).collect();
    let offline: Vec<Vec<f32>> = images
        .iter()
        .map(|b| offline_probs(&checkpoint, b))
        .collect();
    let classifier = cpu_classifier(&dir);
    let logits: Vec<Vec<f32>> = images
        .iter()
        .map(|b| offline_logits(&classifier, b))
        .collect();

    let answer = grpc.infer(raw_request("tiny", &images)).await.unwrap();
    assert_eq!(answer.model_name, "tiny");
    assert_eq!(answer.model_version, "1");
    assert_eq!(answer.raw_output_contents.len(), 2, "{answer:?}");
    let (_, probabilities) = grpc_output(&answer, "probabilities");
    assert_eq!(probabilities.shape, [3, CLASSES.len() as i64]);
    assert!(probabilities.contents.is_none());
    assert_close(&grpc_fp32(&answer, "probabilities"), &offline, "raw");
    assert_close(&grpc_fp32(&answer, "logits"), &logits, "raw logits");

    // Typed contents, sent gzip-compressed; the classification extension on one output.
    let mut request = ModelInferRequest {
        model_name: "tiny".into(),
        model_version: "1".into(),
        id: "grpc-7".into(),
        inputs: vec![image_input(
            vec![3, 1],
            Some(InferTensorContents {
                bytes_contents: images.iter().map(|b| Bytes::copy_from_slice(b)).collect(),
                ..InferTensorContents::default()
            }),
        )],
        ..ModelInferRequest::default()
    };
    request.outputs = vec![
        InferRequestedOutputTensor {
            name: "logits".into(),
            parameters: classification(2),
        },
        InferRequestedOutputTensor {
            name: "probabilities".into(),
            parameters: HashMap::new(),
        },
    ];
    let mut gzip = GrpcClient::connect(server.grpc_addr.unwrap()).await.gzip();
    let answer = gzip.infer(request).await.unwrap();
    assert_eq!(answer.id, "grpc-7");
    assert!(answer.raw_output_contents.is_empty(), "{answer:?}");
    assert_eq!(answer.outputs.len(), 2);
    assert_eq!(answer.outputs[0].shape, [3, 2]);
    let expected: Vec<String> = logits.iter().flat_map(|l| ranked(l, 2)).collect();
    assert_classification_close(&grpc_strings(&answer, "logits"), &expected);
    assert_close(&grpc_fp32(&answer, "probabilities"), &offline, "typed");
    server.shutdown().await;
}

/// Images preprocessed by the client, as the ONNX export takes them: FP32 `[N, 3, S, S]`,
/// in `raw_input_contents` (as tritonclient sends them) or in `contents.fp32_contents`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessed_images_get_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &["--grpc-port", "0"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let classifier = cpu_classifier(&dir);
    let size = classifier.config().image_size as i64;
    let photos = test_images(2);
    let offline: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, b)| offline_probs(&checkpoint, b))
        .collect();
    let values: Vec<f32> = photos
        .iter()
        .flat_map(|(_, b)| preprocessed(&classifier, b))
        .collect();
    let fp32_input = |shape: Vec<i64>, contents: Option<InferTensorContents>| InferInputTensor {
        datatype: "FP32".into(),
        ..image_input(shape, contents)
    };
    let raw = |values: &[f32]| -> Vec<Bytes> {
        vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()]
    };
    let request = |input, raw_input_contents| ModelInferRequest {
        model_name: "tiny".into(),
        inputs: vec![input],
        raw_input_contents,
        ..ModelInferRequest::default()
    };
    let shape = vec![2, 3, size, size];

    let answer = grpc
        .infer(request(fp32_input(shape.clone(), None), raw(&values)))
        .await
        .unwrap();
    assert_eq!(answer.raw_output_contents.len(), 2, "{answer:?}");
    assert_close(&grpc_fp32(&answer, "probabilities"), &offline, "raw FP32");

    let contents = InferTensorContents {
        fp32_contents: values.clone(),
        ..InferTensorContents::default()
    };
    let answer = grpc
        .infer(request(
            fp32_input(shape.clone(), Some(contents.clone())),
            vec![],
        ))
        .await
        .unwrap();
    assert!(answer.raw_output_contents.is_empty(), "{answer:?}");
    assert_close(&grpc_fp32(&answer, "probabilities"), &offline, "typed FP32");

    let mut infinite = values.clone();
    infinite[5] = f32::INFINITY;
    for (request, needle) in [
        (
            request(fp32_input(vec![2, 3, size + 1, size], None), raw(&values)),
            "as FP32 it takes [N, 3,",
        ),
        (
            request(fp32_input(shape.clone(), None), raw(&values[1..])),
            "bytes of FP32, but its binary data has",
        ),
        (
            request(fp32_input(shape.clone(), Some(contents)), raw(&values)),
            "both contents and raw_input_contents",
        ),
        (
            request(fp32_input(shape.clone(), None), raw(&infinite)),
            "value 5 of input `image` (channel 0) is inf",
        ),
        (
            request(fp32_input(shape.clone(), None), vec![]),
            "contents.fp32_contents",
        ),
    ] {
        assert_status(grpc.infer(request).await, Code::InvalidArgument, needle);
    }
    server.shutdown().await;
}

/// With `--api-key`, calls other than the health and readiness checks need the key in
/// their `authorization` metadata (as tritonclient's `headers=` sends it): UNAUTHENTICATED
/// otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_every_call_but_the_health_checks() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let server = TestServer::start(&checkpoint, &["--grpc-port", "0", "--api-key", "k3y"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let with_key = |key: &str, request| {
        let mut request = tonic::Request::new(request);
        request
            .metadata_mut()
            .insert("authorization", key.parse().unwrap());
        request
    };
    let ready: ServerReadyResponse = grpc
        .call("ServerReady", ServerReadyRequest {})
        .await
        .unwrap();
    assert!(ready.ready);
    let live: ServerLiveResponse = grpc.call("ServerLive", ServerLiveRequest {}).await.unwrap();
    assert!(live.live);
    let model = ModelReadyRequest {
        name: "tiny".into(),
        version: String::new(),
    };
    let model: ModelReadyResponse = grpc.call("ModelReady", model).await.unwrap();
    assert!(model.ready);
    assert_eq!(health(&mut grpc, "").await.unwrap().status, 1);

    let refused: Result<ServerMetadataResponse, _> =
        grpc.call("ServerMetadata", ServerMetadataRequest {}).await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("Authorization: Bearer KEY"),
        "{status:?}"
    );
    let (_, photo) = test_images(1).remove(0);
    let request = || raw_request("tiny", &[&photo]);
    assert_status(
        grpc.infer(request()).await,
        Code::Unauthenticated,
        "Bearer KEY",
    );
    assert_status(
        grpc.infer(with_key("Bearer k3", request())).await,
        Code::Unauthenticated,
        "does not hold this server's API key",
    );
    let answer = grpc.infer(with_key("Bearer k3y", request())).await.unwrap();
    assert_close(
        &grpc_fp32(&answer, "probabilities"),
        &[offline_probs(&checkpoint, &photo)],
        "with the key",
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_their_grpc_status_codes() {
    let dir = tiny_checkpoint();
    let args = [
        "--grpc-port",
        "0",
        "--queue",
        "4",
        "--max-body-bytes",
        "100000",
        "--timeout-ms",
        "1000",
        "--max-delay-ms",
        "3000",
    ];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let (_, photo) = test_images(1).remove(0);

    let unknown = raw_request("other", &[&photo]);
    assert_status(
        grpc.infer(unknown).await,
        Code::NotFound,
        "unknown model `other`: this server serves `tiny`",
    );
    let not_an_image = raw_request("tiny", &[&photo, b"hello"]);
    assert_status(
        grpc.infer(not_an_image).await,
        Code::InvalidArgument,
        "image[1]: the data is not an image",
    );
    let mut misnamed = raw_request("tiny", &[&photo]);
    misnamed.inputs[0].name = "INPUT__0".into();
    assert_status(
        grpc.infer(misnamed).await,
        Code::InvalidArgument,
        "unknown input `INPUT__0`",
    );
    let mut miscounted = raw_request("tiny", &[&photo]);
    miscounted.inputs[0].shape = vec![2];
    assert_status(
        grpc.infer(miscounted).await,
        Code::InvalidArgument,
        "has shape [2] but 1 elements",
    );
    let too_many = raw_request("tiny", &[photo.as_slice(); 5]);
    assert_status(
        grpc.infer(too_many).await,
        Code::InvalidArgument,
        "at most 4 per request",
    );
    let mut unknown_output = raw_request("tiny", &[&photo]);
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT__0".into(),
        parameters: HashMap::new(),
    }];
    assert_status(
        grpc.infer(unknown_output).await,
        Code::InvalidArgument,
        "unknown output `OUTPUT__0`",
    );
    let large = raw_request("tiny", &[&vec![0; 120_000]]);
    assert_status(
        grpc.infer(large).await,
        Code::ResourceExhausted,
        "larger than the limit of 100000 bytes",
    );

    // The deadline passes while the batch waits for an upload that never ends. The call
    // starts (counts as arriving, its deadline running) before the upload and sends its
    // message after: its deadline comes before the upload's, at which the upload would stop
    // arriving and the batch run.
    let metrics_url = server.url("/metrics");
    let (send, held) = tokio::sync::oneshot::channel::<()>();
    let message = raw_request("tiny", &[&photo]);
    let call = tokio::spawn(async move {
        let message = futures_util::stream::once(async move {
            let _ = held.await;
            message
        });
        grpc.infer_messages(message).await
    });
    wait_for_gauge(&client(), &metrics_url, "vt_serve_requests_arriving", 1.0).await;
    let upload = start_endless_upload(&client(), &server.base).await;
    let _ = send.send(());
    assert_status(
        call.await.unwrap(),
        Code::DeadlineExceeded,
        "not answered within 1000 ms",
    );
    drop(upload);
    server.shutdown().await;
}

/// What a message holds is checked before it is decoded: its fields (prost builds each
/// repeated entry, an empty one 100 times its 2 bytes), its decompressed length against the
/// body budget, and that a unary call has one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_checked_before_they_are_decoded() {
    let dir = tiny_checkpoint();
    let args = [
        "--grpc-port",
        "0",
        "--queue",
        "4",
        "--max-body-bytes",
        "600000",
        "--max-inflight-body-bytes",
        "600000",
    ];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let (_, photo) = test_images(1).remove(0);

    // --queue 4: 256 + 16 * 4 fields at most.
    let fields = "holds more than 320 fields";
    let mut inputs = raw_request("tiny", &[&photo]);
    inputs.inputs = vec![InferInputTensor::default(); 1000];
    assert_status(grpc.infer(inputs).await, Code::InvalidArgument, fields);
    let contents = InferTensorContents {
        bytes_contents: vec![Bytes::new(); 1000],
        ..InferTensorContents::default()
    };
    let request = ModelInferRequest {
        model_name: "tiny".into(),
        inputs: vec![image_input(vec![1000], Some(contents))],
        ..ModelInferRequest::default()
    };
    assert_status(grpc.infer(request).await, Code::InvalidArgument, fields);
    let mut raw = raw_request("tiny", &[&photo]);
    raw.raw_input_contents = vec![Bytes::new(); 1000];
    assert_status(grpc.infer(raw).await, Code::InvalidArgument, fields);

    // While an upload holds 300 kB of the budget, 500 kB of zeros, a few hundred bytes
    // gzipped, are past what is left once decompressed. What was charged is given back.
    let client = client();
    let metrics_url = server.url("/metrics");
    let held = "vt_serve_inflight_body_bytes";
    let mut upload = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = [CHUNKED_PREDICT_HEAD.as_bytes(), &chunk(&[0; 300_000])].concat();
    upload.write_all(&head).await.unwrap();
    wait_for_gauge(&client, &metrics_url, held, 300_000.0).await;
    let mut gzip = GrpcClient::connect(server.grpc_addr.unwrap()).await.gzip();
    let zeros = raw_request("tiny", &[&vec![0; 500_000]]);
    assert_status(
        gzip.infer(zeros).await,
        Code::Unavailable,
        "--max-inflight-body-bytes (600000 bytes)",
    );
    drop(upload);
    wait_for_gauge(&client, &metrics_url, held, 0.0).await;

    // A second message in a unary call.
    let two = vec![raw_request("tiny", &[&photo]); 2];
    assert_status(
        grpc.infer_messages(futures_util::stream::iter(two)).await,
        Code::InvalidArgument,
        "holds one message",
    );

    // The methods but ModelInfer take small messages.
    let asked = ModelReadyRequest {
        name: "x".repeat(70_000),
        version: String::new(),
    };
    let status = grpc
        .call::<_, ModelReadyResponse>("ModelReady", asked)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 65536 bytes"),
        "{status:?}"
    );
    server.shutdown().await;
}

/// A connection with no call in flight is closed after --header-timeout-ms, even one that
/// never sent HTTP/2's preface, and at once when shutdown begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed() {
    let dir = tiny_checkpoint();
    let args = ["--grpc-port", "0", "--header-timeout-ms", "300"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let addr = server.grpc_addr.unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut read = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut read));
    assert!(closed.await.is_ok(), "still open after 5 s");
    // Shutdown does not wait for one either (it did for the request timeout, 30 s).
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// An HTTP/2 client's preface and empty SETTINGS frame: a connection open, with no call.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// The types of the HTTP/2 frames the server sends on `stream` until it closes it (within
/// 5 s), each GOAWAY with its error code. Acknowledges SETTINGS and PINGs as a client does.
async fn frames_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<(u8, Option<u32>)> {
    let mut frames = Vec::new();
    let read = async {
        loop {
            let mut header = [0u8; 9];
            if stream.read_exact(&mut header).await.is_err() {
                return;
            }
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let (kind, flags) = (header[3], header[4]);
            let mut payload = vec![0u8; length];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            let code = (kind == GOAWAY)
                .then(|| u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
            frames.push((kind, code));
            let ack = match kind {
                SETTINGS if flags & ACK == 0 => {
                    Some([&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0][..], &[]].concat())
                }
                PING if flags & ACK == 0 => {
                    Some([&[0, 0, 8, PING, ACK, 0, 0, 0, 0][..], &payload].concat())
                }
                _ => None,
            };
            if let Some(ack) = ack {
                // The server may close first.
                let _ = stream.write_all(&ack).await;
            }
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(5), read).await;
    assert!(closed.is_ok(), "still open after 5 s: {frames:?}");
    frames
}

/// A connection closed for having no call for --header-timeout-ms, or because shutdown
/// began, is sent a GOAWAY first: a call its client sends meanwhile is then retried on a
/// new connection, instead of failing with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_sent_a_goaway() {
    let dir = tiny_checkpoint();
    let args = ["--grpc-port", "0", "--header-timeout-ms", "300"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let addr = server.grpc_addr.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(HTTP2_PREFACE).await.unwrap();
    let frames = frames_until_closed(&mut idle).await;
    assert!(frames.contains(&(GOAWAY, Some(0))), "{frames:?}");
    server.shutdown().await;

    let args = ["--grpc-port", "0"];
    let server = TestServer::start(&checkpoint_path(&dir), &args).await;
    let mut open = tokio::net::TcpStream::connect(server.grpc_addr.unwrap())
        .await
        .unwrap();
    open.write_all(HTTP2_PREFACE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (frames, ()) = tokio::join!(frames_until_closed(&mut open), server.shutdown());
    assert!(frames.contains(&(GOAWAY, Some(0))), "{frames:?}");
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tritonclient")
}

/// The `ModelInferRequest` tritonclient.grpc 2.73 built (`triton_grpc_client.py fixture`):
/// two images in `raw_input_contents`, `probabilities`, and `logits` with `class_count=3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tritonclient_request_gets_the_offline_predictions() {
    let dir = tiny_checkpoint();
    let checkpoint = checkpoint_path(&dir);
    let fixtures = fixtures();
    let images: Vec<Vec<u8>> = ["0.png", "1.jpg"]
        .iter()
        .map(|name| std::fs::read(fixtures.join(name)).unwrap())
        .collect();
    let bytes = std::fs::read(fixtures.join("grpc_infer.bin")).unwrap();
    let request = ModelInferRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(request.model_name, "tiny");
    assert_eq!(request.inputs.len(), 1);
    assert_eq!(request.inputs[0].shape, [2]);
    assert_eq!(
        request.raw_input_contents,
        [binary_elements(&[&images[0], &images[1]])]
    );
    assert_eq!(request.outputs[1].parameters, classification(3));

    let server = TestServer::start(&checkpoint, &["--grpc-port", "0"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let answer = grpc.infer(request).await.unwrap();
    assert_eq!(answer.id, "fixture-grpc-1");
    assert_eq!(answer.model_version, "1");
    let offline: Vec<Vec<f32>> = images
        .iter()
        .map(|b| offline_probs(&checkpoint, b))
        .collect();
    assert_close(
        &grpc_fp32(&answer, "probabilities"),
        &offline,
        "probabilities",
    );
    let classifier = cpu_classifier(&dir);
    let expected: Vec<String> = images
        .iter()
        .flat_map(|b| ranked(&offline_logits(&classifier, b), 3))
        .collect();
    assert_eq!(grpc_output(&answer, "logits").1.shape, [2, 3]);
    assert_classification_close(&grpc_strings(&answer, "logits"), &expected);
    server.shutdown().await;
}

/// A message that is not a `ModelInferRequest`: its field 5 (`inputs`, a message) sent as
/// an integer.
#[derive(Clone, PartialEq, prost::Message)]
struct MalformedInfer {
    #[prost(uint64, tag = "5")]
    inputs: u64,
}

/// A message that protobuf cannot decode is the client's fault: INVALID_ARGUMENT, as any
/// other bad input, and counted so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_an_invalid_argument() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(&checkpoint_path(&dir), &["--grpc-port", "0"]).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let answer = grpc
        .call::<_, ModelInferResponse>("ModelInfer", MalformedInfer { inputs: 7 })
        .await;
    assert_status(answer, Code::InvalidArgument, "invalid request message");
    let metrics = metrics_text(&client(), &server.url("/metrics")).await;
    let series = r#"vt_serve_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}"#;
    assert_eq!(metric(&metrics, series), Some(1.0), "{metrics}");
    server.shutdown().await;
}

/// Starts a ModelInfer call over plain HTTP/2 whose message declares 1000 bytes and sends 10
/// of them: the server waits for the rest.
async fn start_partial_infer(
    addr: std::net::SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let call = axum::http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (answer, mut stream) = h2.send_request(call, false).unwrap();
    let mut partial = vec![0u8, 0, 0, 0x03, 0xe8];
    partial.extend([0u8; 10]);
    stream.send_data(partial.into(), false).unwrap();
    (answer, stream)
}

/// A call whose client goes away is counted and logged as CANCELLED: one that resets its
/// stream before its request ends (the server reading its message), and one that gives up
/// while its images wait for a batch (which hyper drops unfinished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_client_went_away_are_cancelled() {
    let dir = tiny_checkpoint();
    let server = TestServer::start(
        &checkpoint_path(&dir),
        &["--grpc-port", "0", "--max-delay-ms", "60000"],
    )
    .await;
    let client = client();
    let metrics_url = server.url("/metrics");
    let cancelled = r#"vt_serve_grpc_requests_total{code="CANCELLED",method="ModelInfer"}"#;
    let (_, photo) = test_images(1).remove(0);
    let request = raw_request("tiny", &[&photo]);

    // The request's body never ends: the server waits for it until the client resets.
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let messages =
        futures_util::stream::iter([request.clone()]).chain(futures_util::stream::pending());
    let call = tokio::spawn(async move { grpc.infer_messages(messages).await });
    wait_for_gauge(&client, &metrics_url, "vt_serve_requests_arriving", 1.0).await;
    call.abort();
    wait_for_gauge(&client, &metrics_url, cancelled, 1.0).await;

    // Held in the queue by a batch that waits for an endless upload.
    let _upload = start_endless_upload(&client, &server.base).await;
    let mut grpc = GrpcClient::connect(server.grpc_addr.unwrap()).await;
    let call = tokio::spawn(async move { grpc.infer(request).await });
    wait_for_queue_depth(&client, &metrics_url, 1.0).await;
    call.abort();
    wait_for_gauge(&client, &metrics_url, cancelled, 2.0).await;

    // Reset in the middle of its message (tonic reads that as the end of the stream and
    // answers INTERNAL for the message cut short): the client went away all the same.
    let arriving = "vt_serve_requests_arriving";
    let before = metric(&metrics_text(&client, &metrics_url).await, arriving).unwrap_or(0.0);
    let (_answer, mut stream) = start_partial_infer(server.grpc_addr.unwrap()).await;
    wait_for_gauge(&client, &metrics_url, arriving, before + 1.0).await;
    stream.send_reset(h2::Reason::CANCEL);
    wait_for_gauge(&client, &metrics_url, cancelled, 3.0).await;

    let text = metrics_text(&client, &metrics_url).await;
    for code in ["UNKNOWN", "INTERNAL"] {
        let counted =
            format!(r#"vt_serve_grpc_requests_total{{code="{code}",method="ModelInfer"}}"#);
        assert_eq!(metric(&text, &counted), None, "{text}");
    }
}

/// A call that a second shutdown signal drops is counted (and logged) as UNAVAILABLE, gRPC's
/// code for a server going away, not as CANCELLED: also one whose message was still arriving, whose read
/// fails as a client's going away does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_second_shutdown_signal_drops_are_unavailable() {
    let dir = tiny_checkpoint();
    let server = Server::bind(&parse_args(&checkpoint_path(&dir), &["--grpc-port", "0"]))
        .await
        .unwrap();
    let grpc_addr = server.grpc_local_addr().unwrap().unwrap();
    let state = Arc::clone(server.state());
    let (signal, mut signals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let run = tokio::spawn(server.run(futures_util::stream::poll_fn(move |cx| {
        signals.poll_recv(cx)
    })));

    let (answer, _stream) = start_partial_infer(grpc_addr).await;
    let arriving = || state.metrics.requests_arriving.get();
    for _ in 0..600 {
        if arriving() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(arriving(), 1);
    signal.send(()).unwrap();
    signal.send(()).unwrap();
    assert_eq!(run.await.unwrap().unwrap(), Stopped::CutShort);
    // No answer, not even an error's trailers.
    assert!(answer.await.is_err());

    let counted = |code: &str| {
        let series =
            format!(r#"vt_serve_grpc_requests_total{{code="{code}",method="ModelInfer"}}"#);
        metric(&state.metrics.render().unwrap(), &series)
    };
    for _ in 0..600 {
        if counted("UNAVAILABLE").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counted("UNAVAILABLE"), Some(1.0));
    assert_eq!(counted("CANCELLED"), None);
}
