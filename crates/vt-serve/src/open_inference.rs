//! The Open Inference Protocol's HTTP routes (KServe's V2 protocol, NVIDIA Triton's HTTP
//! API), so that Triton and KServe clients such as `tritonclient.http` call vt-serve as
//! they call those servers.
//!
//! The model takes one input, `image`: BYTES of shape `[N]` (or `[N, 1]`), one encoded image
//! per element; in JSON each element is a base64 string, with the binary tensor data
//! extension the raw bytes, each after its 4-byte little-endian length. It gives two outputs,
//! `probabilities` (softmax) and `logits`, FP32 `[N, classes]`; with the classification
//! extension's `"classification": K` an output is instead BYTES `[N, K]` of
//! `"value:index:label"`, best first. The model's version is its generation: 1 at startup,
//! one more at each reload. Errors are `{"error": MESSAGE}`, with the status the rest of the
//! API gives them.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::batcher::{Arriving, ServedModel};
use crate::classifier::{ranked, Prediction};
use crate::error::{ApiError, ErrorMessage};
use crate::handlers;
use crate::input::{self, ImageInput};
use crate::router::SendUncompressed;
use crate::state::{AppState, ModelInfo};

/// The model's input: encoded images.
pub const INPUT: &str = "image";
/// The framework and weight format, in the protocol's `<framework>_<format>` style.
const PLATFORM: &str = "candle_safetensors";
/// The binary tensor data extension's header: how long the JSON at the start of a body is.
static HEADER_LENGTH: HeaderName = HeaderName::from_static("inference-header-content-length");

/// Marks every answer but a successful inference answer to be sent uncompressed.
pub async fn compress_only_inference_answers(request: Request, next: Next) -> Response {
    let inference = request.uri().path().ends_with("/infer");
    let mut response = next.run(request).await;
    if !(inference && response.status().is_success()) {
        response.extensions_mut().insert(SendUncompressed);
    }
    response
}

/// `/v2/models/{model}[/versions/{version}]`.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    version: Option<String>,
}

/// The model that new requests get, if the path names it (and its version, if it names one).
fn resolve(state: &AppState, path: &ModelPath) -> Result<Arc<ServedModel>, ApiError> {
    let model = state.model_named(&path.model)?;
    let info = &model.info;
    match &path.version {
        Some(version) if *version != info.generation.to_string() => {
            Err(ApiError::UnknownModel(format!(
                "model `{}` has no version `{version}`: version {} is loaded (each reload counts one up)",
                info.name, info.generation
            )))
        }
        _ => Ok(model),
    }
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "vt-serve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "classification"],
    }))
}

pub async fn server_live() -> Json<Value> {
    Json(json!({ "live": true }))
}

pub async fn server_ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (status, ready) = state.readiness();
    (status, Json(json!({ "ready": ready })))
}

pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<(StatusCode, Json<Value>), ErrorMessage> {
    let model = resolve(&state, &path)?;
    Ok(model_readiness(&state, &model))
}

/// `{"name", "ready"}` of `model`, with the readiness probes' status: the answer of both
/// this protocol's and KServe V1's model readiness.
pub fn model_readiness(state: &AppState, model: &ServedModel) -> (StatusCode, Json<Value>) {
    let (status, ready) = state.readiness();
    (
        status,
        Json(json!({ "name": model.info.name, "ready": ready })),
    )
}

pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, ErrorMessage> {
    let model = resolve(&state, &path)?;
    let info = &model.info;
    let scores = json!([-1, info.classes.len()]);
    Ok(Json(json!({
        "name": info.name,
        "versions": [info.generation.to_string()],
        "platform": PLATFORM,
        "inputs": [{ "name": INPUT, "datatype": "BYTES", "shape": [-1] }],
        "outputs": Output::ALL.map(|output| json!({
            "name": output.name(),
            "datatype": "FP32",
            "shape": scores,
        })),
    })))
}

#[derive(Deserialize)]
struct InferenceRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: RequestParameters,
    inputs: Vec<RequestInput>,
    outputs: Option<Vec<RequestOutput>>,
}

/// Parameters this server reads; others (Triton's `priority`, `timeout`...) are ignored.
#[derive(Deserialize, Default)]
struct RequestParameters {
    binary_data_output: Option<bool>,
}

#[derive(Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    #[serde(default)]
    parameters: InputParameters,
    data: Option<Value>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<u64>,
}

#[derive(Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: OutputParameters,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
    classification: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Output {
    Probabilities,
    Logits,
}

impl Output {
    const ALL: [Output; 2] = [Output::Probabilities, Output::Logits];

    fn name(self) -> &'static str {
        match self {
            Output::Probabilities => "probabilities",
            Output::Logits => "logits",
        }
    }

    fn values(self, prediction: &Prediction) -> &[f32] {
        match self {
            Output::Probabilities => &prediction.probs,
            Output::Logits => &prediction.logits,
        }
    }
}

/// One output to return, and how.
struct OutputRequest {
    output: Output,
    binary: bool,
    /// The classification extension's count: the best this many classes as strings.
    classification: Option<usize>,
}

#[derive(Serialize)]
struct InferenceResponse<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<ResponseOutput>,
}

#[derive(Serialize)]
struct ResponseOutput {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryDataSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<TensorData>,
}

#[derive(Serialize)]
struct BinaryDataSize {
    binary_data_size: usize,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TensorData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

impl TensorData {
    /// The binary tensor data extension's layout: little-endian values; each BYTES element
    /// after its 4-byte little-endian length.
    fn write_binary(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::Fp32(values) => {
                for value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            TensorData::Bytes(strings) => {
                for text in strings {
                    // Class labels and numbers: far below 4 GiB.
                    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }
}

/// `POST /v2/models/{model}[/versions/{version}]/infer`.
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
    request: Request,
) -> Result<Response, ErrorMessage> {
    let started = Instant::now();
    let arriving = state.batcher.arriving();
    let deadline = started + state.limits.timeout;
    let model = resolve(&state, &path)?;
    let answer = answer(&state, model, request, arriving, deadline);
    Ok(handlers::by_deadline(&state, deadline, answer).await?)
}

async fn answer(
    state: &Arc<AppState>,
    model: Arc<ServedModel>,
    request: Request,
    arriving: Arriving,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let limit = state.limits.max_body_bytes;
    let header_length = header_length(request.headers())?;
    let body = input::read_body(request, limit).await?;
    let (header, binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(ApiError::BadRequest(format!(
                "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    input::refuse_too_many_json_values(&header, state.admission.capacity())?;
    let request: InferenceRequest = serde_json::from_slice(&header)
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request JSON: {e}")))?;
    let images = images_of(&request.inputs, &binary, state.admission.capacity())?;
    let outputs = requested_outputs(&request)?;
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| ImageInput {
            filename: Some(format!("{INPUT}[{i}]")),
            bytes,
        })
        .collect();
    let (_admitted, predictions) =
        handlers::classify_all(state, &model, images, arriving, deadline).await?;
    let predictions: Vec<Prediction> = predictions.into_iter().map(|(_, p)| p).collect();
    respond(&model.info, request.id, &outputs, &predictions)
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    headers
        .get(&HEADER_LENGTH)
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "Inference-Header-Content-Length is not a byte count: {value:?}"
                    ))
                })
        })
        .transpose()
}

/// The encoded images of the request's one input, in order.
fn images_of(
    inputs: &[RequestInput],
    binary: &Bytes,
    capacity: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let bad = |detail: String| Err(ApiError::BadRequest(detail));
    let [input] = inputs else {
        return bad(format!(
            "the model takes one input, `{INPUT}`; the request has {}",
            inputs.len()
        ));
    };
    if input.name != INPUT {
        return bad(format!(
            "unknown input `{}`: the model's input is `{INPUT}` (BYTES, one encoded image per element)",
            input.name
        ));
    }
    if input.datatype != "BYTES" {
        return bad(format!(
            "input `{INPUT}` is BYTES (encoded images), not {}",
            input.datatype
        ));
    }
    let count = match input.shape.split_first() {
        Some((&n, rest)) if rest.iter().all(|&d| d == 1) => n,
        _ => {
            return bad(format!(
            "input `{INPUT}` has shape {:?}; it takes [N] or [N, 1], one encoded image per element",
            input.shape
        ))
        }
    };
    if count == 0 {
        return bad(format!("input `{INPUT}` has no elements"));
    }
    if count > capacity as u64 {
        return bad(format!(
            "too many images: {count}, at most {capacity} per request (--queue)"
        ));
    }
    let images = match (input.parameters.binary_data_size, &input.data) {
        (Some(size), None) if size == binary.len() as u64 => binary_elements(binary)?,
        (Some(size), None) => {
            return bad(format!(
                "input `{INPUT}` has binary_data_size {size}, but {} bytes follow the JSON header",
                binary.len()
            ))
        }
        (None, Some(_)) if !binary.is_empty() => {
            return bad(format!(
                "{} bytes follow the JSON header, but no input has a binary_data_size",
                binary.len()
            ))
        }
        (None, Some(data)) => json_elements(data)?,
        (Some(_), Some(_)) => {
            return bad(format!(
                "input `{INPUT}` has both data and a binary_data_size"
            ))
        }
        (None, None) => return bad(format!("input `{INPUT}` has no data")),
    };
    if images.len() as u64 != count {
        return bad(format!(
            "input `{INPUT}` has shape {:?} but {} elements",
            input.shape,
            images.len()
        ));
    }
    Ok(images)
}

/// BYTES elements in the binary extension's layout, each a view into `data`.
fn binary_elements(data: &Bytes) -> Result<Vec<Bytes>, ApiError> {
    let mut elements = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let length = data
            .get(at..at + 4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map(|bytes| u32::from_le_bytes(bytes) as usize)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "the binary data of input `{INPUT}` ends inside the 4-byte length of element {}",
                    elements.len()
                ))
            })?;
        let start = at + 4;
        let end = start
            .checked_add(length)
            .filter(|&end| end <= data.len())
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "element {} of input `{INPUT}` declares {length} bytes, but {} follow",
                    elements.len(),
                    data.len() - start
                ))
            })?;
        elements.push(data.slice(start..end));
        at = end;
    }
    Ok(elements)
}

/// BYTES elements in JSON: base64 strings, in a flat or nested (row-major) array.
fn json_elements(data: &Value) -> Result<Vec<Bytes>, ApiError> {
    fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) -> Result<(), ApiError> {
        match value {
            Value::String(text) => out.push(text),
            Value::Array(items) => {
                for item in items {
                    strings(item, out)?;
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "the data of input `{INPUT}` holds {other}; its elements are strings (base64-encoded images)"
                )))
            }
        }
        Ok(())
    }
    let mut texts = Vec::new();
    strings(data, &mut texts)?;
    texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            input::decode_base64(text).map_err(|e| {
                ApiError::BadRequest(format!(
                    "element {i} of input `{INPUT}` is not base64 ({e}); in JSON an image is sent base64-encoded"
                ))
            })
        })
        .collect()
}

/// The outputs to return: those the request names, else all, in JSON unless it asks for
/// binary data.
fn requested_outputs(request: &InferenceRequest) -> Result<Vec<OutputRequest>, ApiError> {
    let binary_by_default = request.parameters.binary_data_output.unwrap_or(false);
    let requested = match &request.outputs {
        Some(outputs) if !outputs.is_empty() => outputs,
        _ => {
            return Ok(Output::ALL
                .map(|output| OutputRequest {
                    output,
                    binary: binary_by_default,
                    classification: None,
                })
                .into())
        }
    };
    let mut chosen: Vec<OutputRequest> = Vec::new();
    for wanted in requested {
        let output = Output::ALL
            .into_iter()
            .find(|o| o.name() == wanted.name)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown output `{}`: the model's outputs are `probabilities` and `logits`",
                    wanted.name
                ))
            })?;
        if chosen.iter().any(|c| c.output == output) {
            return Err(ApiError::BadRequest(format!(
                "output `{}` is requested twice",
                wanted.name
            )));
        }
        let classification = match wanted.parameters.classification {
            Some(0) => {
                return Err(ApiError::BadRequest(
                    "classification must be at least 1".into(),
                ))
            }
            other => other.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
        };
        chosen.push(OutputRequest {
            output,
            binary: wanted.parameters.binary_data.unwrap_or(binary_by_default),
            classification,
        });
    }
    Ok(chosen)
}

/// The classification extension's strings for one image: `value:index:label`, best first.
fn classification(values: &[f32], classes: &[String], count: usize) -> Vec<String> {
    ranked(values)
        .take(count)
        .map(|i| match classes.get(i) {
            Some(label) => format!("{}:{i}:{label}", values[i]),
            None => format!("{}:{i}", values[i]),
        })
        .collect()
}

fn respond(
    info: &ModelInfo,
    id: Option<String>,
    outputs: &[OutputRequest],
    predictions: &[Prediction],
) -> Result<Response, ApiError> {
    let classes = info.classes.len();
    let mut binary = Vec::new();
    let mut any_binary = false;
    let outputs = outputs
        .iter()
        .map(|wanted| {
            let values = predictions.iter().map(|p| wanted.output.values(p));
            let (datatype, width, data) = match wanted.classification {
                None => (
                    "FP32",
                    classes,
                    TensorData::Fp32(values.flatten().copied().collect()),
                ),
                Some(count) => {
                    let count = count.min(classes);
                    let strings = values
                        .flat_map(|v| classification(v, &info.classes, count))
                        .collect();
                    ("BYTES", count, TensorData::Bytes(strings))
                }
            };
            let (parameters, data) = if wanted.binary {
                any_binary = true;
                let start = binary.len();
                data.write_binary(&mut binary);
                let size = binary.len() - start;
                (
                    Some(BinaryDataSize {
                        binary_data_size: size,
                    }),
                    None,
                )
            } else {
                (None, Some(data))
            };
            ResponseOutput {
                name: wanted.output.name(),
                datatype,
                shape: [predictions.len(), width],
                parameters,
                data,
            }
        })
        .collect();
    let header = InferenceResponse {
        model_name: &info.name,
        model_version: info.generation.to_string(),
        id,
        outputs,
    };
    let mut body = serde_json::to_vec(&header)
        .map_err(|e| ApiError::Internal(format!("writing the inference response: {e}")))?;
    if !any_binary {
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let header_length = HeaderValue::from(body.len());
    body.extend_from_slice(&binary);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (HEADER_LENGTH.clone(), header_length),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(parts: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        Bytes::from(out)
    }

    #[test]
    fn binary_elements_are_split_at_their_lengths() {
        let data = elements(&[b"first", b"", b"third one"]);
        let split = binary_elements(&data).unwrap();
        assert_eq!(split, [&b"first"[..], b"", b"third one"]);
        // A length that runs past the end, and a length cut short.
        let mut long = data.to_vec();
        long[0] = 200;
        assert!(binary_elements(&Bytes::from(long)).is_err());
        assert!(binary_elements(&data.slice(..data.len() - 11)).is_err());
    }

    #[test]
    fn json_elements_flatten_nested_arrays_of_base64() {
        let data = json!([["aGk="], ["aGVsbG8"]]);
        assert_eq!(json_elements(&data).unwrap(), [&b"hi"[..], b"hello"]);
        assert!(json_elements(&json!([1, 2])).is_err());
        assert!(json_elements(&json!(["not base64!"])).is_err());
    }

    #[test]
    fn classification_strings_rank_and_name_the_classes() {
        let classes = ["a".to_string(), "b".into(), "c".into()];
        assert_eq!(
            classification(&[0.25, 0.5, 0.125], &classes, 2),
            ["0.5:1:b", "0.25:0:a"]
        );
        assert_eq!(classification(&[1.5, -2.0], &[], 5), ["1.5:0", "-2:1"]);
    }
}
