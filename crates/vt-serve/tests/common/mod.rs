//! Shared by the server tests: a tiny checkpoint, test images, and a server started
//! in-process on 127.0.0.1:0.
#![allow(dead_code)]

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::uri::PathAndQuery;
use candle_core::{DType, Device};
use clap::Parser;
use fast_image_resize::Resizer;
use image::{ImageFormat, RgbImage};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;
use vt_model::{Arch, Model, VtConfig};
use vt_serve::open_inference::grpc::SERVICE;
use vt_serve::open_inference::proto::{ModelInferRequest, ModelInferResponse};
use vt_serve::{AppState, Classifier, ServeArgs, Server, StartError, Stopped};

pub use vt_data::dataset::CLASSES;

/// A spawned process, killed when dropped: a test that fails leaves no server running (and
/// holding the test run's output open).
pub struct KilledOnDrop(pub std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        // Nothing is signalled once the child has been waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KilledOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KilledOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// A randomly initialised VT-ResNet18 small enough to run fast on a CPU.
pub fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VtConfig::new(Arch::VtResNet18, CLASSES.len(), 32);
    config.class_names = CLASSES.iter().map(|c| c.to_string()).collect();
    config.tokens = 4;
    config.token_channels = 32;
    config.heads = 2;
    let model = Model::init(config, &Device::Cpu).unwrap();
    model.save(&dir.path().join("tiny")).unwrap();
    dir
}

/// [`tiny_checkpoint`] with its head's weights scaled up to 60,000 at most: each fits f16,
/// but the logits they make overflow it, while in f32 they are finite.
pub fn overflowing_in_f16_checkpoint() -> tempfile::TempDir {
    let dir = tiny_checkpoint();
    let weights = checkpoint_path(&dir).join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let head = &tensors["head.weight"];
    let largest = head.abs().unwrap().max_all().unwrap();
    let scaled = (head * (60_000.0 / f64::from(largest.to_scalar::<f32>().unwrap()))).unwrap();
    tensors.insert("head.weight".into(), scaled);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    dir
}

pub fn checkpoint_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("tiny")
}

fn intel_sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/intel-sample")
}

pub fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// `count` test images: real photos from the Intel sample (a few of each class) when it is
/// present, generated ones of varied sizes and formats otherwise.
pub fn test_images(count: usize) -> Vec<(String, Vec<u8>)> {
    let train = intel_sample().join("seg_train");
    if train.is_dir() {
        let mut photos = Vec::new();
        for class in CLASSES {
            let mut files: Vec<_> = std::fs::read_dir(train.join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            photos.extend(files.into_iter().take(count.div_ceil(CLASSES.len())));
        }
        photos.truncate(count);
        return photos
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
    }
    eprintln!(
        "note: {} is absent; using generated images instead of real photos",
        train.display()
    );
    (0..count)
        .map(|i| {
            let (w, h) = (40 + 7 * i as u32 % 90, 36 + 11 * i as u32 % 70);
            let img = RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 5 + i as u32 * 17) as u8,
                    (y * 3 + i as u32 * 29) as u8,
                    ((x ^ y) * 7) as u8,
                ])
            });
            let (format, ext) = if i % 2 == 0 {
                (ImageFormat::Png, "png")
            } else {
                (ImageFormat::Jpeg, "jpg")
            };
            (format!("generated-{i}.{ext}"), encode(&img, format))
        })
        .collect()
}

/// The checkpoint in `dir` loaded for the CPU in f32.
pub fn cpu_classifier(dir: &tempfile::TempDir) -> Classifier {
    Classifier::load(&checkpoint_path(dir), &Device::Cpu, DType::F32).unwrap()
}

/// `photo` as the classifier's model input.
pub fn preprocessed(classifier: &Classifier, photo: &[u8]) -> Vec<f32> {
    classifier
        .preprocess(&mut Resizer::new(), photo, u64::MAX)
        .unwrap()
}

/// The logits `classifier` gives one image.
pub fn offline_logits(classifier: &Classifier, photo: &[u8]) -> Vec<f32> {
    let input = preprocessed(classifier, photo);
    classifier.predict(&[input]).unwrap().remove(0).logits
}

/// What `vt-serve predict` computes for one image: its softmax probabilities.
pub fn offline_probs(checkpoint: &Path, bytes: &[u8]) -> Vec<f32> {
    let classifier = Classifier::load(checkpoint, &Device::Cpu, DType::F32).unwrap();
    let input = preprocessed(&classifier, bytes);
    classifier.predict(&[input]).unwrap().remove(0).probs
}

pub fn parse_args(checkpoint: &Path, extra: &[&str]) -> ServeArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let checkpoint = checkpoint.to_str().unwrap();
    let mut argv = vec![
        "vt-serve",
        "--checkpoint",
        checkpoint,
        "--port",
        "0",
        "--device",
        "cpu",
    ];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().serve
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    /// The gRPC service's, when started with `--grpc-port`.
    pub grpc_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<Stopped, StartError>>>,
}

impl TestServer {
    pub async fn start(checkpoint: &Path, extra: &[&str]) -> TestServer {
        let server = Server::bind(&parse_args(checkpoint, extra)).await.unwrap();
        let addr = server.local_addr().unwrap();
        let grpc_addr = server.grpc_local_addr().unwrap();
        let state = Arc::clone(server.state());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(futures_util::stream::once(async move {
            let _ = stopped.await;
        })));
        TestServer {
            addr,
            base: format!("http://{addr}"),
            grpc_addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Begins graceful shutdown and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// `bytes` in an HTTP content coding: `gzip`, or `deflate` (the zlib format).
pub fn compress(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let level = flate2::Compression::default();
    match encoding {
        "gzip" => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        }
        "deflate" => {
            let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        }
        other => panic!("no test encoder for {other}"),
    }
}

/// The inverse of [`compress`].
pub fn decompress(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(bytes).read_to_end(&mut out),
        other => panic!("no test decoder for {other}"),
    }
    .unwrap();
    out
}

/// The value of a metric line `NAME{LABELS} VALUE` (or `NAME VALUE`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The Prometheus text of `/metrics`.
pub async fn metrics_text(client: &reqwest::Client, metrics_url: &str) -> String {
    client
        .get(metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits (bounded) until the gauge `series` in `/metrics` reads `value`.
pub async fn wait_for_gauge(client: &reqwest::Client, metrics_url: &str, series: &str, value: f64) {
    for _ in 0..600 {
        let text = metrics_text(client, metrics_url).await;
        if metric(&text, series) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{series} never read {value}");
}

/// Waits (bounded) until `images` are admitted and waiting, read from `/metrics`.
pub async fn wait_for_queue_depth(client: &reqwest::Client, metrics_url: &str, images: f64) {
    wait_for_gauge(client, metrics_url, "vt_serve_queue_depth", images).await;
}

/// The head of a `/predict` request whose body follows in chunks.
pub const CHUNKED_PREDICT_HEAD: &str = "POST /predict HTTP/1.1\r\nHost: test\r\n\
    Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";

/// `bytes` framed as one chunk of a chunked body.
pub fn chunk(bytes: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", bytes.len()).as_bytes(), bytes, b"\r\n"].concat()
}

/// Reads a raw connection's response to its end: the status code and the JSON body.
pub async fn read_response(stream: &mut tokio::net::TcpStream) -> (u16, serde_json::Value) {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Starts a `/predict` upload that never finishes, as a slow client would, and waits until
/// the server counts it as arriving: a batch forming meanwhile waits its whole window for
/// it (or until the upload's own deadline). Dropping the stream abandons the upload.
pub async fn start_endless_upload(client: &reqwest::Client, base: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let metrics_url = format!("{base}/metrics");
    let series = "vt_serve_requests_arriving";
    let before = metric(&metrics_text(client, &metrics_url).await, series).unwrap_or(0.0);
    let host = base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = [CHUNKED_PREDICT_HEAD.as_bytes(), &chunk(b"A")].concat();
    stream.write_all(&head).await.unwrap();
    wait_for_gauge(client, &metrics_url, series, before + 1.0).await;
    stream
}

/// The options of a server for [`post_past_deadline`]: a request times out after 2 s (time
/// for the few round trips that set it up on a loaded machine), while a forming batch waits
/// up to 20 s for the requests on their way.
pub const PAST_DEADLINE_ARGS: [&str; 6] = [
    "--timeout-ms",
    "2000",
    "--max-batch",
    "8",
    "--max-delay-ms",
    "20000",
];

/// Sends `body` (of `content_type`) to `path` so that it waits for a batch past its
/// deadline, on a server started with [`PAST_DEADLINE_ARGS`] (`--max-delay-ms` longer than
/// `--timeout-ms`): its
/// headers go first, so that it counts as arriving and its deadline comes first; then an
/// endless upload begins, which the batch waits for; then its body. Returns its answer's
/// status code and JSON body.
pub async fn post_past_deadline(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    use tokio::io::AsyncWriteExt;
    let metrics_url = format!("{base}/metrics");
    let series = "vt_serve_requests_arriving";
    let before = metric(&metrics_text(client, &metrics_url).await, series).unwrap_or(0.0);
    let host = base.strip_prefix("http://").unwrap();
    let mut request = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    request.write_all(head.as_bytes()).await.unwrap();
    wait_for_gauge(client, &metrics_url, series, before + 1.0).await;
    let upload = start_endless_upload(client, base).await;
    let body = [chunk(body), b"0\r\n\r\n".to_vec()].concat();
    request.write_all(&body).await.unwrap();
    let answer = read_response(&mut request).await;
    drop(upload);
    answer
}

/// Label -> score of a `/predict` answer.
pub fn scores(answer: &serde_json::Value) -> Vec<(String, f64)> {
    answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_owned(),
                p["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Asserts that an answer with every class equals the offline probabilities.
pub fn assert_matches_offline(answer: &serde_json::Value, offline: &[f32], what: &str) {
    let scores = scores(answer);
    assert_eq!(scores.len(), CLASSES.len(), "{what}: {answer}");
    for (label, score) in scores {
        let class = CLASSES.iter().position(|c| *c == label).unwrap();
        let expected = f64::from(offline[class]);
        assert!(
            (score - expected).abs() < 1e-5,
            "{what}: {label} scored {score} by the server, {expected} offline"
        );
    }
}

/// A PNG whose header declares `width` x `height` but that holds no pixel data.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = encode(&RgbImage::new(1, 1), ImageFormat::Png);
    // Signature (8), IHDR length (4) and type (4), then width and height; CRC over type+data.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// Asserts that `got` holds the rows of `expected`, one after the other, within 1e-5.
pub fn assert_close(got: &[f32], expected: &[Vec<f32>], what: &str) {
    let expected: Vec<f32> = expected.iter().flatten().copied().collect();
    assert_eq!(got.len(), expected.len(), "{what}");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() < 1e-5, "{what}[{i}]: {g} served, {e} offline");
    }
}

/// The classification extension's strings of one image as `vt-serve predict` ranks it:
/// `value:index:label`, best first.
pub fn ranked(values: &[f32], count: usize) -> Vec<String> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
        .into_iter()
        .take(count)
        .map(|i| format!("{}:{i}:{}", values[i], CLASSES[i]))
        .collect()
}

/// Asserts that classification strings name the classes of `expected` in its order, with
/// values within 1e-4 (the server's and the offline forward passes batch differently).
pub fn assert_classification_close(got: &[String], expected: &[String]) {
    assert_eq!(got.len(), expected.len(), "{got:?} against {expected:?}");
    for (got_one, want) in got.iter().zip(expected) {
        let (got_value, got_rest) = got_one.split_once(':').unwrap();
        let (want_value, want_rest) = want.split_once(':').unwrap();
        assert_eq!(got_rest, want_rest, "{got:?} against {expected:?}");
        let (g, w): (f32, f32) = (got_value.parse().unwrap(), want_value.parse().unwrap());
        assert!((g - w).abs() < 1e-4, "{got_one} against {want}");
    }
}

/// Encoded images in the binary layout of BYTES tensors (each after its 4-byte
/// little-endian length), as tritonclient sends them.
pub fn binary_elements(images: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for image in images {
        out.extend_from_slice(&(image.len() as u32).to_le_bytes());
        out.extend_from_slice(image);
    }
    out
}

/// The JSON answer to `GET url`.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// A client of the gRPC service, built from the server's own messages.
pub struct GrpcClient(tonic::client::Grpc<Channel>);

impl GrpcClient {
    pub async fn connect(addr: SocketAddr) -> GrpcClient {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        GrpcClient(tonic::client::Grpc::new(channel))
    }

    /// This client, sending its requests gzip-compressed.
    pub fn gzip(self) -> GrpcClient {
        GrpcClient(self.0.send_compressed(CompressionEncoding::Gzip))
    }

    /// Calls `method` of `inference.GRPCInferenceService`.
    pub async fn call<Req, Res>(
        &mut self,
        method: &str,
        request: impl tonic::IntoRequest<Req>,
    ) -> Result<Res, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Res: prost::Message + Default + Send + Sync + 'static,
    {
        self.call_service(SERVICE, method, request).await
    }

    /// [`GrpcClient::call`] of another service's method.
    pub async fn call_service<Req, Res>(
        &mut self,
        service: &str,
        method: &str,
        request: impl tonic::IntoRequest<Req>,
    ) -> Result<Res, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Res: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/{service}/{method}")).unwrap();
        self.0
            .unary(request.into_request(), path, ProstCodec::default())
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends `messages` to the unary `ModelInfer` as a client stream would: all in one
    /// request body, each as the stream yields it.
    pub async fn infer_messages(
        &mut self,
        messages: impl futures_util::Stream<Item = ModelInferRequest> + Send + 'static,
    ) -> Result<ModelInferResponse, tonic::Status> {
        self.0.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/{SERVICE}/ModelInfer")).unwrap();
        self.0
            .client_streaming(tonic::Request::new(messages), path, ProstCodec::default())
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn infer(
        &mut self,
        request: impl tonic::IntoRequest<ModelInferRequest>,
    ) -> Result<ModelInferResponse, tonic::Status> {
        self.call("ModelInfer", request).await
    }
}

/// An output of a gRPC inference answer, by name.
pub fn grpc_output<'a>(
    response: &'a ModelInferResponse,
    name: &str,
) -> (
    usize,
    &'a vt_serve::open_inference::proto::InferOutputTensor,
) {
    response
        .outputs
        .iter()
        .enumerate()
        .find(|(_, output)| output.name == name)
        .unwrap_or_else(|| panic!("no output {name} in {response:?}"))
}

/// An FP32 output's values, from `raw_output_contents` or its contents.
pub fn grpc_fp32(response: &ModelInferResponse, name: &str) -> Vec<f32> {
    let (index, output) = grpc_output(response, name);
    assert_eq!(output.datatype, "FP32", "{output:?}");
    match response.raw_output_contents.get(index) {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        None => output.contents.as_ref().unwrap().fp32_contents.clone(),
    }
}

/// A BYTES output's elements as text, from `raw_output_contents` or its contents.
pub fn grpc_strings(response: &ModelInferResponse, name: &str) -> Vec<String> {
    let (index, output) = grpc_output(response, name);
    assert_eq!(output.datatype, "BYTES", "{output:?}");
    let elements: Vec<Vec<u8>> = match response.raw_output_contents.get(index) {
        Some(raw) => {
            let mut raw = &raw[..];
            let mut elements = Vec::new();
            while !raw.is_empty() {
                let length = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
                elements.push(raw[4..4 + length].to_vec());
                raw = &raw[4 + length..];
            }
            elements
        }
        None => output
            .contents
            .as_ref()
            .unwrap()
            .bytes_contents
            .iter()
            .map(|b| b.to_vec())
            .collect(),
    };
    elements
        .into_iter()
        .map(|e| String::from_utf8(e).unwrap())
        .collect()
}
