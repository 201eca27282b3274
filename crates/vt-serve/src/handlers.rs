//! The route handlers. Response shapes:
//!
//! - `POST /predict` and `POST /invocations` (`?top_k=N`, default 3): one image gives
//!   `{"predictions": [{"label", "score"}...], "model", "elapsed_ms"}`, best first, scores
//!   being softmax probabilities; a multipart request adds `"filename"`, and with two or more
//!   files answers `{"results": [one such object per file, in order]}`. If any file fails
//!   the whole request fails, the error detail naming the file.
//! - `POST` or `PUT /predictions/{model}[/{version}]` (TorchServe's inference API): one
//!   image gives `{"<label>": score, ...}`, its 5 most probable classes best first, as
//!   TorchServe's image classifier answers; several (multipart) give an array of such
//!   objects, in order.
//! - `GET /ping`, `GET /health/ready`: `{"status": "ready"}`, or 503 once shutdown began.
//! - `GET /health/live`: `{"status": "alive"}`.
//! - `GET /v1/models`: `{"models": [ModelInfo]}`, the model new requests get.
//! - `GET /metrics`: Prometheus text.
//! - `GET /`: the demo page.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use fast_image_resize::Resizer;
use futures_util::future::try_join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;

use crate::admission::Admitted;
use crate::batcher::{Answer, Arriving, ServedModel, Unanswered};
use crate::classifier::{Label, Prediction};
use crate::error::{ApiError, ErrorMessage};
use crate::input::{self, ImageInput};
use crate::instances;
use crate::open_inference;
use crate::router::SendUncompressed;
use crate::state::AppState;

const DEFAULT_TOP_K: usize = 3;

#[derive(Deserialize)]
pub struct PredictQuery {
    top_k: Option<usize>,
}

#[derive(Serialize)]
struct PredictResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<String>,
    predictions: Vec<Label>,
    model: &'a str,
    elapsed_ms: f64,
}

#[derive(Serialize)]
struct MultiResponse<'a> {
    results: Vec<PredictResponse<'a>>,
}

pub async fn predict(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PredictQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let arriving = state.arriving()?;
    let deadline = started + state.limits.timeout;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let top_k = query.top_k.unwrap_or(DEFAULT_TOP_K);
    if top_k == 0 {
        return Err(ApiError::BadRequest("top_k must be at least 1".into()));
    }
    by_deadline(
        &state,
        deadline,
        answer(&state, request, arriving, deadline, started, top_k),
    )
    .await
}

/// `answer`, or 504 once `deadline` passes; its work stops with it.
pub async fn by_deadline<T>(
    state: &AppState,
    deadline: Instant,
    answer: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline.into(), answer)
        .await
        .map_err(|_| state.limits.timed_out())?
}

async fn answer(
    state: &Arc<AppState>,
    request: Request,
    arriving: Arriving,
    deadline: Instant,
    started: Instant,
    top_k: usize,
) -> Result<Response, ApiError> {
    let classified = classify_request(state, request, arriving, deadline).await?;
    let (model, predictions) = (&classified.model, classified.predictions);
    let mut results: Vec<_> = predictions
        .into_iter()
        .map(|(filename, prediction)| PredictResponse {
            filename,
            predictions: prediction.top(&model.info.classes, top_k),
            model: &model.info.name,
            // Whole microseconds: the clock's further digits are noise.
            elapsed_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        })
        .collect();
    Ok(match (classified.multipart, results.len()) {
        (true, n) if n > 1 => Json(MultiResponse { results }).into_response(),
        _ => Json(results.pop()).into_response(),
    })
}

/// TorchServe's image classifier answers with this many classes.
const TORCHSERVE_TOP_K: usize = 5;

/// An image's best classes as TorchServe's image classifier answers them: one JSON object
/// mapping each label to its score, best first.
struct LabelScores(Vec<Label>);

impl Serialize for LabelScores {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for label in &self.0 {
            map.serialize_entry(&label.label, &label.score)?;
        }
        map.end()
    }
}

/// `POST /predictions/{model}` and `/predictions/{model}/{version}`: TorchServe's inference
/// API over the one model served (any version names it), its body as `/predict` reads it.
pub async fn torchserve_predict(
    State(state): State<Arc<AppState>>,
    Path(path): Path<Vec<String>>,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let arriving = state.arriving()?;
    let deadline = started + state.limits.timeout;
    // An unknown name is refused before the body is read; the model is taken after.
    state.model_named(&path[0])?;
    by_deadline(&state, deadline, async {
        let classified = classify_request(&state, request, arriving, deadline).await?;
        let classes = &classified.model.info.classes;
        let mut answers: Vec<LabelScores> = classified
            .predictions
            .into_iter()
            .map(|(_, prediction)| LabelScores(prediction.top(classes, TORCHSERVE_TOP_K)))
            .collect();
        Ok(match answers.len() {
            1 => Json(answers.pop()).into_response(),
            _ => Json(answers).into_response(),
        })
    })
    .await
}

/// A request's images, classified.
struct Classified {
    /// The model that classified them all.
    model: Arc<ServedModel>,
    /// Their room in the queue, held until the answer is written.
    _admitted: Arc<Admitted>,
    /// Each image's prediction, with its file name in a multipart body.
    predictions: Vec<(Option<String>, Prediction)>,
    multipart: bool,
}

/// Reads a request's images (raw, multipart or JSON, as `/predict` takes them) and
/// classifies them.
async fn classify_request(
    state: &AppState,
    request: Request,
    arriving: Arriving,
    deadline: Instant,
) -> Result<Classified, ApiError> {
    let inputs = input::read(state, request, deadline).await?;
    // One model for all the request's images, from preprocessing (at its image size) to
    // labels, even if a reload swaps in another meanwhile.
    let model = state.batcher.current();
    let (admitted, predictions) =
        classify_all(state, &model, inputs.images, false, arriving, deadline).await?;
    Ok(Classified {
        model,
        _admitted: admitted,
        predictions,
        multipart: inputs.multipart,
    })
}

/// Admits a request's images (waiting for room in the queue, in arrival order, when it is
/// full) and classifies them on `model`, in order, with their token attention if
/// `with_attention`. The admission is returned, to be held until the answer is written
/// whatever happens to the request meanwhile. Each image holds the announcement until it is
/// queued. The images are futures of this request, not tasks of their own, so that a
/// request that times out or whose client goes away stops their work (and its
/// announcement) with it.
pub async fn classify_all(
    state: &AppState,
    model: &ServedModel,
    images: Vec<ImageInput>,
    with_attention: bool,
    arriving: Arriving,
    deadline: Instant,
) -> Result<(Arc<Admitted>, Vec<(Option<String>, Prediction)>), ApiError> {
    let admitted = Arc::new(state.admission.admit(images.len(), &arriving).await?);
    let arriving = Arc::new(arriving);
    let predictions = try_join_all(images.into_iter().map(|image| {
        let arriving = Arc::clone(&arriving);
        let queued = Queued {
            model,
            with_attention,
            deadline,
            admitted: &admitted,
        };
        classify(state, queued, image, arriving)
    }));
    drop(arriving);
    let predictions = predictions.await?;
    count_answered(state, model, predictions.iter().map(|(_, p)| p));
    Ok((admitted, predictions))
}

/// Admits images a client preprocessed for `model` and classifies them, in order: as
/// [`classify_all`], with nothing to decode.
pub async fn classify_preprocessed(
    state: &AppState,
    model: &ServedModel,
    inputs: Vec<Vec<f32>>,
    arriving: Arriving,
    deadline: Instant,
) -> Result<(Arc<Admitted>, Vec<Prediction>), ApiError> {
    let admitted = Arc::new(state.admission.admit(inputs.len(), &arriving).await?);
    let answers = inputs
        .into_iter()
        .map(|input| model.submit(input, false, deadline, &admitted))
        .collect::<Result<Vec<_>, _>>()?;
    drop(arriving);
    let predictions = try_join_all(answers.into_iter().map(|answer| prediction(state, answer)));
    let predictions = predictions.await?;
    count_answered(state, model, &predictions);
    Ok((admitted, predictions))
}

/// Counts the predictions of a request whose every image was classified: images of a
/// request that failed (one image too late, say) are not answered, and not counted.
fn count_answered<'a>(
    state: &AppState,
    model: &ServedModel,
    predictions: impl IntoIterator<Item = &'a Prediction>,
) {
    for prediction in predictions {
        state
            .metrics
            .predicted(&model.info.classes, &prediction.probs);
    }
}

/// Where and how an admitted request's images are queued.
#[derive(Clone, Copy)]
struct Queued<'a> {
    model: &'a ServedModel,
    with_attention: bool,
    deadline: Instant,
    admitted: &'a Arc<Admitted>,
}

/// Decodes on a blocking thread (bounded by the decode slots), then waits for the batcher.
async fn classify(
    state: &AppState,
    queued: Queued<'_>,
    image: ImageInput,
    arriving: Arc<Arriving>,
) -> Result<(Option<String>, Prediction), ApiError> {
    let Queued {
        model,
        with_attention,
        deadline,
        admitted,
    } = queued;
    let ImageInput { filename, bytes } = image;
    let preprocessor = model.preprocessor;
    let max_pixels = state.limits.max_pixels;
    // The decode slot is released when decoding ends, even if the request gave up meanwhile.
    let input = input::off_the_runtime(state, move || {
        preprocessor
            .run(&mut Resizer::new(), &bytes, max_pixels)
            .map_err(ApiError::from_classify)
    })
    .await
    .map_err(|e| e.for_file(filename.as_deref()))?;
    let answer = model.submit(input, with_attention, deadline, admitted)?;
    drop(arriving);
    let prediction = prediction(state, answer)
        .await
        .map_err(|e| e.for_file(filename.as_deref()))?;
    Ok((filename, prediction))
}

/// Waits for the batcher's answer to one image.
async fn prediction(
    state: &AppState,
    answer: oneshot::Receiver<Answer>,
) -> Result<Prediction, ApiError> {
    answer
        .await
        .map_err(|_| ApiError::Internal("the model thread dropped the request".into()))?
        .map_err(|unanswered| match unanswered {
            Unanswered::Expired => state.limits.timed_out(),
            Unanswered::Failed(why) => ApiError::Internal(why),
        })
}

pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

pub async fn ready(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.is_accepting() {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::NotReady("shutting down".into()))
    }
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let current = state.batcher.current();
    Json(json!({ "models": [&current.info] }))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

/// 404 for a route that does not exist: under `/v2` and `/v1/models/` in the shape of the
/// protocol served there, naming its routes that are served, as its clients read it.
pub async fn not_found(uri: Uri) -> Response {
    let path = uri.path();
    let response = match protocol_routes_served(path) {
        Some(routes) => {
            ErrorMessage::from(ApiError::NotFound(format!("{path} ({routes})"))).into_response()
        }
        None => ApiError::NotFound(path.to_owned()).into_response(),
    };
    uncompressed_under_v2(path, response)
}

/// `error` as the answer to a request for `path`, in the shape of the protocol served
/// there (see [`not_found`]), for answers given before any handler.
pub fn error_for_path(path: &str, error: ApiError) -> Response {
    let response = match protocol_routes_served(path) {
        Some(_) => ErrorMessage::from(error).into_response(),
        None => error.into_response(),
    };
    uncompressed_under_v2(path, response)
}

/// 405 for a method a route does not take (the router adds the `Allow` header, but for the
/// two resources of `/v1/models/{segment}`): in a protocol's shape where [`not_found`]
/// answers in it.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let method = method.to_string();
    let mut response = match protocol_routes_served(path) {
        Some(routes) => ErrorMessage::from(ApiError::MethodNotAllowed {
            method,
            path: format!("{path} ({routes})"),
        })
        .into_response(),
        None => ApiError::MethodNotAllowed {
            method,
            path: path.to_owned(),
        }
        .into_response(),
    };
    if let Some(allowed) = instances::methods_allowed(path) {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
    }
    uncompressed_under_v2(path, response)
}

/// The Open Inference Protocol's answers other than successful inferences go uncompressed,
/// the router's 404 and 405 under `/v2` too (see `open_inference_routes`).
fn uncompressed_under_v2(path: &str, mut response: Response) -> Response {
    if open_inference::http::routes_served(path).is_some() {
        response.extensions_mut().insert(SendUncompressed);
    }
    response
}

/// The routes of the protocol whose prefix `path` is under, if any.
fn protocol_routes_served(path: &str) -> Option<&'static str> {
    open_inference::http::routes_served(path).or_else(|| instances::routes_served(path))
}
