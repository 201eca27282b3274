//! The `{"instances": [...]}` JSON of KServe's V1 protocol and TensorFlow Serving's REST
//! API, which Vertex AI's custom containers also speak: `POST /v1/models/NAME:predict`,
//! `GET /v1/models/NAME` (readiness), and KServe's `POST /v1/models/NAME:explain`. The
//! columnar form of both, `{"inputs": [...]}` or `{"inputs": {"image": [...]}}` (the one
//! input's list of images), is answered as TensorFlow Serving answers it: `"outputs"` in
//! place of `"predictions"`.
//!
//! An instance is one encoded image: a base64 string, `{"b64": ...}` (TensorFlow Serving's
//! binary convention), `{"content": ..., "mimeType": ...}` (Vertex AI's image schema) or
//! `{"image": ...}` holding either of the first two. `"parameters"` may hold
//! `maxPredictions` and `confidenceThreshold`, as Vertex AI's image classification takes
//! them; TensorFlow Serving's `"signature_name"` may only be `serving_default`. Each
//! prediction is in Vertex AI's classification shape, best first: `{"ids": ["3", ...],
//! "displayNames": ["mountain", ...], "confidences": [0.91, ...]}`, ids being class
//! indices. `:explain` answers `{"predictions": [...], "explanations": [...]}` as KServe
//! specifies: the same predictions, and for each image `{"tokenAttention": [...]}`, one
//! entry per VT module, `{"height", "width", "maps"}`, `maps` holding each visual token's
//! share of every position of the stem's feature map (row-major; each map sums to 1, up to
//! rounding in f16 or bf16), for at most [`MAX_EXPLAINED`] images. Errors are
//! `{"error": MESSAGE}`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batcher::Arriving;
use crate::classifier::{ranked, Prediction, TokenMaps};
use crate::error::{ApiError, ErrorMessage};
use crate::handlers;
use crate::input::{self, ImageInput};
use crate::open_inference::{self, INPUT};
use crate::state::AppState;

/// What a request body holds.
const EXPECTED: &str = "{\"instances\": [...], \"parameters\": {...}} or TensorFlow Serving's \
                        columnar {\"inputs\": [...]}";

/// TensorFlow Serving's signature name, which its clients send; the model has only this one.
const SIGNATURE: &str = "serving_default";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    instances: Option<Vec<Value>>,
    inputs: Option<Value>,
    parameters: Option<Parameters>,
    signature_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Parameters {
    /// At most this many classes per image (default: all).
    max_predictions: Option<usize>,
    /// Only classes at least this probable (default: all).
    confidence_threshold: Option<f32>,
}

impl Parameters {
    fn check(&self) -> Result<(), ApiError> {
        if self.max_predictions == Some(0) {
            return Err(ApiError::BadRequest(
                "maxPredictions must be at least 1".into(),
            ));
        }
        if let Some(t) = self
            .confidence_threshold
            .filter(|t| !(0.0..=1.0).contains(t))
        {
            return Err(ApiError::BadRequest(format!(
                "confidenceThreshold is a probability, from 0 to 1, not {t}"
            )));
        }
        Ok(())
    }
}

/// `predictions` (of `instances`) or `outputs` (of `inputs`), and `explanations` of
/// `:explain`.
#[derive(Serialize)]
struct PredictResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    predictions: Option<Vec<Classification>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<Vec<Classification>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    explanations: Option<Vec<Explanation>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Explanation {
    token_attention: Vec<TokenMaps>,
}

/// The routes of KServe's V1 protocol (and TensorFlow Serving's REST API) that vt-serve
/// serves, when `path` is under their `/v1/models/` prefix: what its 404 and 405 answers
/// there name (router.rs builds these routes).
pub fn routes_served(path: &str) -> Option<&'static str> {
    path.starts_with("/v1/models/").then_some(
        "the V1 routes served are GET /v1/models, GET /v1/models/NAME, \
         POST /v1/models/NAME:predict and POST /v1/models/NAME:explain; TensorFlow Serving's \
         version, label and metadata routes are not served",
    )
}

/// What a `POST /v1/models/NAME:VERB` asks for.
#[derive(Clone, Copy, PartialEq)]
pub enum Verb {
    Predict,
    Explain,
}

impl Verb {
    /// The verb of a `NAME:VERB` path segment, and the name.
    pub fn of(segment: &str) -> Option<(&str, Verb)> {
        match segment.rsplit_once(':')? {
            (name, "predict") => Some((name, Verb::Predict)),
            (name, "explain") => Some((name, Verb::Explain)),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verb::Predict => "predict",
            Verb::Explain => "explain",
        }
    }
}

/// The most images one `:explain` request may hold: each image's answer is large (about
/// 57 KB of JSON for vt-resnet34 at 150 px, against 200 bytes for its prediction).
pub const MAX_EXPLAINED: usize = 16;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Classification {
    ids: Vec<String>,
    display_names: Vec<String>,
    confidences: Vec<f32>,
}

/// The methods `path` (as sent, percent-encoded) takes when it is `/v1/models/{segment}`,
/// whose one route serves two resources: `NAME:VERB` takes POST, a model's readiness GET
/// (and HEAD). The segment is read as the router reads it: decoded (`%3A` is a `:`).
pub fn methods_allowed(path: &str) -> Option<&'static str> {
    let segment = path.strip_prefix("/v1/models/")?;
    if segment.is_empty() || segment.contains('/') {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
    Some(if decoded.contains(':') {
        "POST"
    } else {
        "GET,HEAD"
    })
}

/// `GET /v1/models/{model}`: `{"name", "ready"}`, 503 once shutdown began.
pub async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    // Model names have no `:`; `NAME:predict` and `NAME:explain` take POST.
    if name.contains(':') {
        let path = format!("/v1/models/{name}");
        let routes = routes_served(&path).unwrap_or_default();
        let error = ApiError::MethodNotAllowed {
            method: "GET".into(),
            path: format!("{path} ({routes})"),
        };
        let allow = [(header::ALLOW, HeaderValue::from_static("POST"))];
        return (allow, ErrorMessage::from(error)).into_response();
    }
    match state.model_named(&name) {
        Ok(model) => open_inference::http::model_readiness(&state, &model).into_response(),
        Err(e) => ErrorMessage::from(e).into_response(),
    }
}

/// `POST /v1/models/{model}:predict` and `:explain`: the route's one segment is
/// `NAME:VERB`.
pub async fn predict(
    State(state): State<Arc<AppState>>,
    Path(segment): Path<String>,
    request: Request,
) -> Result<Response, ErrorMessage> {
    let started = Instant::now();
    let arriving = state.arriving()?;
    let deadline = started + state.limits.timeout;
    let Some((name, verb)) = Verb::of(&segment) else {
        return Err(ApiError::NotFound(format!(
            "POST /v1/models/{segment}: the verb is `:predict` or `:explain` \
             (/v1/models/NAME:predict, /v1/models/NAME:explain)"
        ))
        .into());
    };
    // An unknown name is refused before the body is read; the model is taken after.
    state.model_named(name)?;
    let answer = answer(&state, name, verb, request, arriving, deadline);
    Ok(handlers::by_deadline(&state, deadline, answer).await?)
}

/// What a request asks for, its images' bytes out of their base64.
struct Parsed {
    images: Vec<ImageInput>,
    parameters: Parameters,
    /// `instances` or `inputs`, the key the answer mirrors.
    key: &'static str,
}

/// Parses a request's body (megabytes of JSON: on a blocking thread).
fn parse(body: Bytes, capacity: usize, verb: Verb) -> Result<Parsed, ApiError> {
    let body = input::without_byte_order_mark(body);
    input::refuse_too_many_json_values(&body, capacity, 0)?;
    let request: PredictRequest = input::from_json(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid {} request: {e}; expected {EXPECTED}{}",
            verb.name(),
            input::image_not_json(&body, input::TO_PREDICT).unwrap_or_default()
        ))
    })?;
    // The body is charged to the budget once: its parsed copy replaces it.
    drop(body);
    let PredictRequest {
        instances,
        inputs,
        parameters,
        signature_name,
    } = request;
    let (instances, key) = match (instances, inputs) {
        (Some(instances), None) => (instances, "instances"),
        (None, Some(inputs)) => (columns(inputs)?, "inputs"),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give \"instances\" (rows) or \"inputs\" (columns), not both".into(),
            ))
        }
        (None, None) => {
            return Err(ApiError::BadRequest(format!(
                "invalid {} request: no \"instances\"; expected {EXPECTED}",
                verb.name()
            )))
        }
    };
    if let Some(name) = signature_name.as_deref().filter(|&n| n != SIGNATURE) {
        return Err(ApiError::BadRequest(format!(
            "unknown signature_name `{name}`: the model's one signature is `{SIGNATURE}`"
        )));
    }
    let parameters = parameters.unwrap_or_default();
    parameters.check()?;
    if instances.is_empty() {
        return Err(ApiError::BadRequest(format!("\"{key}\" is empty")));
    }
    if instances.len() > capacity {
        return Err(ApiError::BadRequest(format!(
            "too many {key}: {}, at most {capacity} per request (--queue)",
            instances.len()
        )));
    }
    if verb == Verb::Explain && instances.len() > MAX_EXPLAINED {
        return Err(ApiError::BadRequest(format!(
            "too many {key} to explain: {}, at most {MAX_EXPLAINED} per request",
            instances.len()
        )));
    }
    let images = instances
        .iter()
        .enumerate()
        .map(|(i, instance)| {
            let filename = format!("{key}[{i}]");
            match image_of(instance) {
                Ok(bytes) => Ok(ImageInput {
                    filename: Some(filename),
                    bytes,
                }),
                Err(e) => Err(e.for_file(Some(&filename))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The images hold what they need of the request: its base64 text goes with `parse`.
    Ok(Parsed {
        images,
        parameters,
        key,
    })
}

async fn answer(
    state: &Arc<AppState>,
    name: &str,
    verb: Verb,
    request: Request,
    arriving: Arriving,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let body = input::read_body(request, &state.limits, deadline).await?;
    let model = state.model_named(name)?;
    let capacity = state.admission.capacity();
    let Parsed {
        images,
        parameters,
        key,
    } = input::off_the_runtime(state, move || parse(body, capacity, verb)).await?;
    let explain = verb == Verb::Explain;
    let (_admitted, predictions) =
        handlers::classify_all(state, &model, images, explain, arriving, deadline).await?;
    let classifications: Vec<Classification> = predictions
        .iter()
        .map(|(_, prediction)| classification_of(prediction, &model.info.classes, &parameters))
        .collect();
    let explanations = explain
        .then(|| {
            predictions
                .into_iter()
                .map(|(_, prediction)| {
                    let token_attention = prediction.attention.ok_or_else(|| {
                        ApiError::Internal("the model thread answered without the attention".into())
                    })?;
                    Ok(Explanation { token_attention })
                })
                .collect::<Result<_, ApiError>>()
        })
        .transpose()?;
    let (predictions, outputs) = match key {
        "inputs" => (None, Some(classifications)),
        _ => (Some(classifications), None),
    };
    let answer = PredictResponse {
        predictions,
        outputs,
        explanations,
    };
    Ok(Json(answer).into_response())
}

/// The instances of a columnar request: its `inputs` list, or the list of its one named
/// input, `{"image": [...]}`.
fn columns(inputs: Value) -> Result<Vec<Value>, ApiError> {
    let named = |mut inputs: serde_json::Map<String, Value>| match inputs.remove(INPUT) {
        Some(Value::Array(images)) if inputs.is_empty() => Some(images),
        _ => None,
    };
    match inputs {
        Value::Array(images) => Ok(images),
        Value::Object(named_inputs) => named(named_inputs).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "\"inputs\" names the model's inputs: its one input is `{INPUT}`, a list of \
                 images ({{\"inputs\": {{\"{INPUT}\": [...]}}}}, or {{\"inputs\": [...]}})"
            ))
        }),
        _ => Err(ApiError::BadRequest(format!(
            "\"inputs\" is a list of images, or {{\"{INPUT}\": [...]}}"
        ))),
    }
}

/// The encoded image of one instance.
fn image_of(instance: &Value) -> Result<Bytes, ApiError> {
    let text = base64_of(instance, false).ok_or_else(|| {
        ApiError::BadRequest(
            "an instance is a base64 string, {\"b64\": ...}, {\"content\": ..., \"mimeType\": ...}, \
             or {\"image\": ...} holding a base64 string or {\"b64\": ...}"
                .into(),
        )
    })?;
    input::decode_base64(text)
        .map_err(|e| ApiError::BadRequest(format!("the image is not valid base64: {e}")))
}

/// The base64 text of an instance in one of the accepted forms; `nested` inside `"image"`,
/// which holds only the first two.
fn base64_of(instance: &Value, nested: bool) -> Option<&str> {
    match instance {
        Value::String(text) => Some(text),
        Value::Object(fields) => {
            let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
            match keys.as_slice() {
                ["b64"] => fields["b64"].as_str(),
                ["content"] if !nested => fields["content"].as_str(),
                ["content", "mimeType"] | ["mimeType", "content"]
                    if !nested && fields["mimeType"].is_string() =>
                {
                    fields["content"].as_str()
                }
                ["image"] if !nested => base64_of(&fields["image"], true),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The classes `parameters` keep, best first.
fn classification_of(
    prediction: &Prediction,
    classes: &[String],
    parameters: &Parameters,
) -> Classification {
    let threshold = parameters.confidence_threshold.unwrap_or(0.0);
    let kept: Vec<usize> = ranked(&prediction.probs)
        .take(parameters.max_predictions.unwrap_or(usize::MAX))
        .take_while(|&i| prediction.probs[i] >= threshold)
        .collect();
    Classification {
        ids: kept.iter().map(usize::to_string).collect(),
        display_names: kept
            .iter()
            .map(|&i| classes.get(i).cloned().unwrap_or_else(|| i.to_string()))
            .collect(),
        confidences: kept.iter().map(|&i| prediction.probs[i]).collect(),
    }
}
