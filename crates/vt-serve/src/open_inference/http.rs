//! The Open Inference Protocol's HTTP routes (KServe's V2 protocol, NVIDIA Triton's HTTP
//! API), so that clients such as `tritonclient.http` call vt-serve as they call those
//! servers.
//!
//! In JSON each element of the input `image` is a base64 string (BYTES) or a number (FP32);
//! with the binary tensor data extension BYTES elements are the raw bytes, each after its
//! 4-byte little-endian length, and FP32 ones little-endian floats. Outputs
//! go as JSON `data`, or after the JSON as binary data when the request asks. Errors are
//! `{"error": MESSAGE}`, with the status the rest of the API gives them.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vt_data::transform::Normalize;

use super::{
    Declared, Encoding, Images, InputHeader, OutputRequest, OutputTensor, TensorData, WantedOutput,
    INPUT,
};
use crate::batcher::{Arriving, ServedModel};
use crate::classifier::Preprocessor;
use crate::error::{ApiError, ErrorMessage};
use crate::handlers;
use crate::input;
use crate::router::SendUncompressed;
use crate::state::{AppState, ModelInfo};

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

/// The protocol's routes that vt-serve serves, when `path` is under its `/v2` prefix: what
/// its 404 and 405 answers there name (router.rs builds these routes).
pub fn routes_served(path: &str) -> Option<&'static str> {
    (path == "/v2" || path.starts_with("/v2/")).then_some(
        "the Open Inference Protocol routes served are GET /v2, GET /v2/health/live, \
         GET /v2/health/ready, GET /v2/models/NAME[/versions/V], \
         GET /v2/models/NAME[/versions/V]/config, GET /v2/models/NAME[/versions/V]/ready and \
         POST /v2/models/NAME[/versions/V]/infer; Triton's other extensions (statistics, \
         model repository, shared memory, sequences...) are not served",
    )
}

/// `/v2/models/{model}[/versions/{version}]`.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    version: Option<String>,
}

fn resolve(state: &AppState, path: &ModelPath) -> Result<Arc<ServedModel>, ApiError> {
    super::resolve(state, &path.model, path.version.as_deref())
}

pub async fn server_metadata() -> Json<super::proto::ServerMetadataResponse> {
    Json(super::server_metadata())
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
) -> Result<Json<super::proto::ModelMetadataResponse>, ErrorMessage> {
    let model = resolve(&state, &path)?;
    Ok(Json(super::model_metadata(&model.info)))
}

pub async fn model_config(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<Json<super::proto::ModelConfig>, ErrorMessage> {
    let model = resolve(&state, &path)?;
    Ok(Json(super::model_config(
        &model.info,
        &state.batch_config(),
    )))
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
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: InputParameters,
    data: Option<JsonData>,
}

/// The most dimensions a shape may have: the protocol's tensors here have one, two or four.
const MAX_DIMENSIONS: usize = 8;

/// A `shape`, refused past [`MAX_DIMENSIONS`] before it is built: numbers are exempt from the
/// body's value count (tensors are made of them), so a shape of millions would be kept.
fn bounded_shape<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<i64>, D::Error> {
    struct Shape;

    impl<'de> Visitor<'de> for Shape {
        type Value = Vec<i64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {MAX_DIMENSIONS} integers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
            let mut shape = Vec::new();
            while let Some(dimension) = seq.next_element()? {
                if shape.len() == MAX_DIMENSIONS {
                    return Err(serde::de::Error::invalid_length(MAX_DIMENSIONS + 1, &self));
                }
                shape.push(dimension);
            }
            Ok(shape)
        }
    }

    deserializer.deserialize_seq(Shape)
}

/// An input's JSON `data`, flat or nested (row-major), parsed straight into what it holds:
/// a preprocessed image's tens of thousands of numbers as `f32`s, not JSON values.
#[derive(Debug, Default, PartialEq)]
struct JsonData {
    strings: Vec<String>,
    numbers: Vec<f32>,
}

impl<'de> Deserialize<'de> for JsonData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut data = JsonData::default();
        Flatten(&mut data).deserialize(deserializer)?;
        Ok(data)
    }
}

/// Appends a JSON value's elements, nested arrays flattened, to a [`JsonData`].
struct Flatten<'a>(&'a mut JsonData);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("strings (base64-encoded images) or numbers, in a flat or nested array")
    }

    fn visit_str<E>(self, text: &str) -> Result<(), E> {
        self.0.strings.push(text.to_owned());
        Ok(())
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
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

/// `POST /v2/models/{model}[/versions/{version}]/infer`.
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
    request: Request,
) -> Result<Response, ErrorMessage> {
    let started = Instant::now();
    let arriving = state.arriving()?;
    let deadline = started + state.limits.timeout;
    // An unknown model or version is refused before the body is read; the model is taken
    // after.
    resolve(&state, &path)?;
    let answer = answer(&state, &path, request, arriving, deadline);
    Ok(handlers::by_deadline(&state, deadline, answer).await?)
}

async fn answer(
    state: &Arc<AppState>,
    path: &ModelPath,
    request: Request,
    arriving: Arriving,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let header_length = header_length(request.headers())?;
    let body = input::read_body(request, &state.limits, deadline).await?;
    let model = resolve(state, path)?;
    let (header, binary) = match (header_length, body) {
        (Some(n), body) if n > body.len() => {
            return Err(ApiError::BadRequest(format!(
                "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            )))
        }
        // Views, and the body moved in: dropping them is dropping it.
        (Some(n), body) => (body.slice(..n), body.slice(n..)),
        (None, body) => (body, Bytes::new()),
    };
    let capacity = state.admission.capacity();
    let preprocessor = model.preprocessor;
    let length_given = header_length.is_some();
    let Parsed {
        images,
        outputs,
        id,
    } = input::off_the_runtime(state, move || {
        parse(header, binary, length_given, capacity, preprocessor)
    })
    .await?;
    let (_admitted, predictions) =
        super::classify(state, &model, images, arriving, deadline).await?;
    let outputs = super::output_tensors(&model.info, &outputs, &predictions);
    respond(&model.info, id, outputs)
}

/// What a request asks for: its images, the outputs and its id.
struct Parsed {
    images: Images,
    outputs: Vec<OutputRequest>,
    id: Option<String>,
}

/// Parses a request's JSON (megabytes of numbers: on a blocking thread) and takes its
/// images from it, or from the `binary` data after it.
fn parse(
    header: Bytes,
    binary: Bytes,
    length_given: bool,
    capacity: usize,
    preprocessor: Preprocessor,
) -> Result<Parsed, ApiError> {
    let header = input::without_byte_order_mark(header);
    let image_size = preprocessor.image_size as usize;
    input::refuse_too_many_json_values(
        &header,
        capacity,
        capacity.saturating_mul(super::json_numbers_per_image(image_size)),
    )?;
    let request: InferenceRequest =
        input::from_json(&header).map_err(|e| invalid_request_json(&e, &header, length_given))?;
    let images = images_of(&request.inputs, &binary, capacity, &preprocessor)?;
    let outputs = requested_outputs(&request)?;
    // The images hold what they need of the request: the rest goes with `parse`.
    Ok(Parsed {
        images,
        outputs,
        id: request.id,
    })
}

/// The answer to a request whose JSON does not parse. Binary tensor data sent without the
/// JSON's length (`Inference-Header-Content-Length`) reads as JSON followed by other bytes,
/// which serde calls "trailing characters": the answer names the missing header.
fn invalid_request_json(error: &str, body: &[u8], length_given: bool) -> ApiError {
    let mut detail = format!("invalid inference request JSON: {error}");
    if let Some(image) = input::image_not_json(body, input::TO_PREDICT) {
        detail.push_str(&image);
    } else if !length_given {
        let mut values = serde_json::Deserializer::from_slice(body).into_iter::<IgnoredAny>();
        let parsed = matches!(values.next(), Some(Ok(_)));
        let trailing = body.len() - values.byte_offset();
        // Whitespace after the JSON is JSON's; another error (a field of the wrong type)
        // is not this one.
        if parsed
            && body[values.byte_offset()..]
                .iter()
                .any(|b| !b.is_ascii_whitespace())
        {
            detail.push_str(&format!(
                "; {trailing} bytes follow the JSON: binary tensor data needs the JSON's length \
                 in the Inference-Header-Content-Length header"
            ));
        }
    }
    ApiError::BadRequest(detail)
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

/// The images of the request's one input, in order.
fn images_of<'a>(
    inputs: &'a [RequestInput],
    binary: &Bytes,
    capacity: usize,
    preprocessor: &Preprocessor,
) -> Result<Images, ApiError> {
    let bad = |detail: String| Err(ApiError::BadRequest(detail));
    let header = |input: &'a RequestInput| InputHeader {
        name: &input.name,
        datatype: &input.datatype,
        shape: &input.shape,
    };
    let image_size = preprocessor.image_size as usize;
    let declared = super::declared_images(inputs, header, capacity, image_size)?;
    let input = declared.input;
    match (input.parameters.binary_data_size, &input.data) {
        (Some(size), None) if size != binary.len() as u64 => bad(format!(
            "input `{INPUT}` has binary_data_size {size}, but {} bytes follow the JSON header",
            binary.len()
        )),
        (Some(_), None) => match declared.encoding {
            Encoding::Encoded => {
                let images = super::binary_elements(binary, &input.shape, declared.images)?;
                super::check_element_count(&input.shape, declared.images, &images)?;
                Ok(Images::Encoded(images))
            }
            Encoding::Preprocessed => {
                let values = super::binary_values(binary, &input.shape)?;
                super::preprocessed_images(
                    &values,
                    &input.shape,
                    declared.images,
                    &preprocessor.norm,
                )
                .map(Images::Preprocessed)
            }
        },
        (None, Some(_)) if !binary.is_empty() => bad(format!(
            "{} bytes follow the JSON header, but no input has a binary_data_size",
            binary.len()
        )),
        (None, Some(data)) => json_images(data, &input.shape, declared, &preprocessor.norm),
        (Some(_), Some(_)) => bad(format!(
            "input `{INPUT}` has both data and a binary_data_size"
        )),
        (None, None) => bad(format!("input `{INPUT}` has no data")),
    }
}

/// The images of an input's JSON `data`: base64 strings when it is BYTES, numbers when it
/// is FP32.
fn json_images<T>(
    data: &JsonData,
    shape: &[i64],
    declared: Declared<'_, T>,
    norm: &Normalize,
) -> Result<Images, ApiError> {
    match (declared.encoding, data.strings.is_empty(), data.numbers.is_empty()) {
        (Encoding::Encoded, _, true) => {
            let images = data
                .strings
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    input::decode_base64(text).map_err(|e| {
                        ApiError::BadRequest(format!(
                            "element {i} of input `{INPUT}` is not base64 ({e}); in JSON an image is sent base64-encoded"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            super::check_element_count(shape, declared.images, &images)?;
            Ok(Images::Encoded(images))
        }
        (Encoding::Encoded, _, false) => Err(ApiError::BadRequest(format!(
            "the data of input `{INPUT}` holds numbers; as BYTES its elements are strings (base64-encoded images)"
        ))),
        (Encoding::Preprocessed, true, _) => {
            super::preprocessed_images(&data.numbers, shape, declared.images, norm)
                .map(Images::Preprocessed)
        }
        (Encoding::Preprocessed, false, _) => Err(ApiError::BadRequest(format!(
            "the data of input `{INPUT}` holds strings; as FP32 its elements are numbers"
        ))),
    }
}

/// The outputs to return: those the request names, else all, in JSON unless it asks for
/// binary data.
fn requested_outputs(request: &InferenceRequest) -> Result<Vec<OutputRequest>, ApiError> {
    let wanted: Vec<WantedOutput> = request
        .outputs
        .iter()
        .flatten()
        .map(|output| WantedOutput {
            name: &output.name,
            classification: output.parameters.classification,
            binary: output.parameters.binary_data,
        })
        .collect();
    let binary_by_default = request.parameters.binary_data_output.unwrap_or(false);
    super::requested_outputs(&wanted, binary_by_default)
}

fn respond(
    info: &ModelInfo,
    id: Option<String>,
    outputs: Vec<OutputTensor>,
) -> Result<Response, ApiError> {
    let mut binary = Vec::new();
    let mut any_binary = false;
    let outputs = outputs
        .into_iter()
        .map(|output| {
            let (parameters, data) = if output.binary {
                any_binary = true;
                let start = binary.len();
                output.data.write_binary(&mut binary);
                let size = binary.len() - start;
                (
                    Some(BinaryDataSize {
                        binary_data_size: size,
                    }),
                    None,
                )
            } else {
                (None, Some(output.data))
            };
            ResponseOutput {
                name: output.name,
                datatype: output.datatype,
                shape: output.shape,
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

    fn parse(data: &str, datatype: &str, shape: &[i64]) -> Result<Images, ApiError> {
        let data: JsonData = serde_json::from_str(data).unwrap();
        let inputs = [InputHeader {
            name: INPUT,
            datatype,
            shape,
        }];
        let declared = super::super::declared_images(&inputs, |input| *input, 4, 2)?;
        let norm = Normalize {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        json_images(&data, shape, declared, &norm)
    }

    #[test]
    fn json_data_is_flattened_into_strings_or_numbers() {
        let data: JsonData = serde_json::from_str(r#"[["a", ["b"]], "c"]"#).unwrap();
        assert_eq!(data.strings, ["a", "b", "c"]);
        let data: JsonData = serde_json::from_str("[[1, -2], [0.5, 1e3]]").unwrap();
        assert_eq!(data.numbers, [1.0, -2.0, 0.5, 1000.0]);
        for invalid in ["[null]", "[{}]", "[true]"] {
            assert!(
                serde_json::from_str::<JsonData>(invalid).is_err(),
                "{invalid}"
            );
        }
    }

    #[test]
    fn json_bytes_are_base64_images() {
        let Ok(Images::Encoded(images)) = parse(r#"[["aGk="], ["aGVsbG8"]]"#, "BYTES", &[2]) else {
            panic!("two encoded images expected");
        };
        assert_eq!(images, [&b"hi"[..], b"hello"]);
        for (data, needle) in [
            ("[1, 2]", "holds numbers"),
            (r#"["not base64!", "aGk="]"#, "not base64"),
            (r#"["aGk="]"#, "shape [2] but 1 elements"),
        ] {
            let error = parse(data, "BYTES", &[2]).err().unwrap().to_string();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn json_fp32_are_preprocessed_images() {
        let values: Vec<String> = (0..24).map(|v| (v as f32 / 16.0).to_string()).collect();
        let data = format!("[{}]", values.join(","));
        let Ok(Images::Preprocessed(images)) = parse(&data, "FP32", &[2, 3, 2, 2]) else {
            panic!("two preprocessed images expected");
        };
        assert_eq!(images.len(), 2);
        assert_eq!(images[1][0], 0.75);
        let short = format!("[{}]", values[..23].join(","));
        for (data, needle) in [
            (short.as_str(), "but 23 values"),
            (r#"["aGk="]"#, "holds strings"),
        ] {
            let error = parse(data, "FP32", &[2, 3, 2, 2])
                .err()
                .unwrap()
                .to_string();
            assert!(error.contains(needle), "{error}");
        }
    }
}
