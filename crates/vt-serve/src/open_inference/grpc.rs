//! The Open Inference Protocol's gRPC form: the service `inference.GRPCInferenceService` of
//! KServe and Triton, on `--grpc-port`, so that `tritonclient.grpc` and KServe's gRPC
//! client call vt-serve as they call those servers. It answers `ServerLive`,
//! `ServerReady`, `ModelReady`, `ServerMetadata`, `ModelMetadata` and `ModelInfer`; other
//! methods (streaming, model repository, statistics, shared memory...) answer
//! UNIMPLEMENTED, as a server without them does.
//!
//! The service is written by hand over tonic's core (its codec and unary call handling)
//! with the messages of [`proto`](super::proto), served over HTTP/2 by the same server
//! loop, shutdown and body budget as the HTTP routes, through the same queue, batching and
//! limits. `ModelInfer` reads the images from `raw_input_contents` (each after its 4-byte
//! little-endian length, as tritonclient sends them) or from `contents.bytes_contents`; the
//! outputs go in `raw_output_contents` when the input came raw, as Triton answers
//! tritonclient, else in their `contents`. Errors are [`ApiError`]s as gRPC statuses:
//! [`ApiError::grpc_status`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{middleware, Router};
use http_body_util::combinators::MapErr;
use http_body_util::BodyExt;
use tonic::codec::CompressionEncoding;
use tonic::server::{Grpc, UnaryService};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use super::proto::{
    InferOutputTensor, InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelReadyRequest, ModelReadyResponse, ParameterChoice,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerReadyRequest,
    ServerReadyResponse,
};
use super::{InputHeader, OutputTensor, TensorData, WantedOutput, INPUT};
use crate::access;
use crate::batcher::Arriving;
use crate::body_budget;
use crate::error::ApiError;
use crate::metrics;
use crate::state::{AppState, ModelInfo};

/// The service's full name: its methods' paths are `/inference.GRPCInferenceService/NAME`.
pub const SERVICE: &str = "inference.GRPCInferenceService";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    ServerLive,
    ServerReady,
    ModelReady,
    ServerMetadata,
    ModelMetadata,
    ModelInfer,
}

impl Method {
    const ALL: [Method; 6] = [
        Method::ServerLive,
        Method::ServerReady,
        Method::ModelReady,
        Method::ServerMetadata,
        Method::ModelMetadata,
        Method::ModelInfer,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::ServerLive => "ServerLive",
            Method::ServerReady => "ServerReady",
            Method::ModelReady => "ModelReady",
            Method::ServerMetadata => "ServerMetadata",
            Method::ModelMetadata => "ModelMetadata",
            Method::ModelInfer => "ModelInfer",
        }
    }

    /// The method a request's path names, if this server answers it.
    fn of(path: &str) -> Option<Method> {
        let name = path
            .strip_prefix('/')?
            .strip_prefix(SERVICE)?
            .strip_prefix('/')?;
        Method::ALL.into_iter().find(|method| method.name() == name)
    }
}

/// The gRPC port's service: every path goes to [`call`], which answers the service's
/// methods. Bodies are charged to the body budget as the HTTP routes' are; a request id
/// (the client's `x-request-id` metadata, or a fresh one) comes back in the answer's
/// metadata.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .fallback(call)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("the request handler panicked".into())
                .grpc_status()
                .into_http::<Body>()
        }))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.body_budget),
            body_budget::charge_body,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Answers one call, then counts it and logs it (`vt_serve::access`) with its status code.
async fn call(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let method = Method::of(request.uri().path());
    let span = access::grpc_span(&request);
    async move {
        let response = match method {
            Some(method) => answer(&state, method, request, started).await,
            None => ApiError::NotFound(format!(
                "{}: the methods of {SERVICE} this server answers are {}",
                request.uri().path(),
                Method::ALL.map(Method::name).join(", ")
            ))
            .grpc_status()
            .into_http(),
        };
        // A call that failed carries its status in its headers; a successful one in its
        // trailers, as OK.
        let code = response
            .extensions()
            .get::<Status>()
            .map_or(Code::Ok, Status::code);
        let latency = started.elapsed();
        state.metrics.observe_grpc(
            method.map_or("unknown", Method::name),
            code,
            latency.as_secs_f64(),
        );
        tracing::info!(
            target: access::TARGET,
            code = metrics::code_name(code),
            latency_ms = (latency.as_secs_f64() * 1e6).round() / 1e3,
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}

async fn answer(
    state: &Arc<AppState>,
    method: Method,
    request: Request,
    started: Instant,
) -> Response {
    let timeout = timeout(state.limits.timeout, request.headers());
    let deadline = started + timeout;
    // Body errors (the body budget's refusals) become their statuses, which tonic keeps.
    let request = request.map(|body| body.map_err(body_error as fn(axum::Error) -> Status));
    let limit = usize::try_from(state.limits.max_body_bytes).unwrap_or(usize::MAX);
    let call = async {
        match method {
            Method::ServerLive => {
                unary(limit, request, |_: ServerLiveRequest| async {
                    Ok(ServerLiveResponse { live: true })
                })
                .await
            }
            Method::ServerReady => {
                let ready = state.is_accepting();
                unary(limit, request, move |_: ServerReadyRequest| async move {
                    Ok(ServerReadyResponse { ready })
                })
                .await
            }
            Method::ModelReady => {
                let state = Arc::clone(state);
                // Another model or version is not ready rather than an error, as Triton
                // answers: clients poll this until it says true.
                unary(limit, request, |asked: ModelReadyRequest| async move {
                    let served = super::resolve(&state, &asked.name, version(&asked.version));
                    Ok(ModelReadyResponse {
                        ready: served.is_ok() && state.is_accepting(),
                    })
                })
                .await
            }
            Method::ServerMetadata => {
                unary(limit, request, |_: ServerMetadataRequest| async {
                    Ok(super::server_metadata())
                })
                .await
            }
            Method::ModelMetadata => {
                let state = Arc::clone(state);
                unary(limit, request, |asked: ModelMetadataRequest| async move {
                    let model = super::resolve(&state, &asked.name, version(&asked.version))?;
                    Ok(super::model_metadata(&model.info))
                })
                .await
            }
            Method::ModelInfer => {
                // Announced before the message is read, as the HTTP routes announce theirs.
                let arriving = state.batcher.arriving();
                let state = Arc::clone(state);
                unary(limit, request, move |asked| {
                    model_infer(state, asked, arriving, deadline)
                })
                .await
            }
        }
    };
    let response = match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(response) => response,
        Err(_) => {
            let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            return ApiError::Timeout { timeout_ms }.grpc_status().into_http();
        }
    };
    // tonic refuses a message past its size limit as OUT_OF_RANGE, which nothing else here
    // answers; gRPC's own servers say RESOURCE_EXHAUSTED, as this API does of large bodies.
    if response
        .extensions()
        .get::<Status>()
        .is_some_and(|status| status.code() == Code::OutOfRange)
    {
        let limit = state.limits.max_body_bytes;
        return ApiError::PayloadTooLarge { limit }
            .grpc_status()
            .into_http();
    }
    response.map(Body::new)
}

/// How long a call may take: `--timeout-ms`, or less when the client's `grpc-timeout`
/// says so.
fn timeout(server: Duration, headers: &HeaderMap) -> Duration {
    grpc_timeout(headers).map_or(server, |client| client.min(server))
}

/// The `grpc-timeout` header: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
/// `None` when there is none, or it is malformed: the server's own limit applies.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call's request body, whose errors are statuses.
type CallBody = MapErr<Body, fn(axum::Error) -> Status>;

/// The status of a request body that failed to read: the [`ApiError`] the body budget
/// failed it with, else what tonic makes of the error.
fn body_error(error: axum::Error) -> Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<ApiError>() {
            return refusal.grpc_status();
        }
        source = cause.source();
    }
    Status::from_error(Box::new(error))
}

/// An empty version: whichever the server serves.
fn version(version: &str) -> Option<&str> {
    Some(version).filter(|v| !v.is_empty())
}

/// Decodes a unary call's message (at most `limit` bytes, decompressed; gzip and deflate
/// accepted, answers uncompressed as Triton's), has `handler` answer it and encodes the
/// answer or the error's status.
async fn unary<Req, Res, F, Fut>(
    limit: usize,
    request: axum::http::Request<CallBody>,
    handler: F,
) -> axum::http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Res: prost::Message + Send + 'static,
    F: FnOnce(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Res, ApiError>> + Send + 'static,
{
    Grpc::new(ProstCodec::<Res, Req>::default())
        .max_decoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .unary(Handler(Some(handler)), request)
        .await
}

/// A call's handler, for tonic's [`Grpc::unary`], which calls it once, with the decoded
/// message.
struct Handler<F>(Option<F>);

type Answer<Res> = Pin<Box<dyn Future<Output = Result<tonic::Response<Res>, Status>> + Send>>;

impl<Req, Res, F, Fut> UnaryService<Req> for Handler<F>
where
    Req: Send + 'static,
    Res: Send + 'static,
    F: FnOnce(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Res, ApiError>> + Send + 'static,
{
    type Response = Res;
    type Future = Answer<Res>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let handler = self.0.take();
        Box::pin(async move {
            let handler =
                handler.ok_or_else(|| ApiError::Internal("a call's handler ran twice".into()))?;
            let answer = handler(request.into_inner()).await?;
            Ok(tonic::Response::new(answer))
        })
    }
}

async fn model_infer(
    state: Arc<AppState>,
    mut request: ModelInferRequest,
    arriving: Arriving,
    deadline: Instant,
) -> Result<ModelInferResponse, ApiError> {
    // One model for all the request's images, even if a reload swaps in another meanwhile.
    let model = super::resolve(&state, &request.model_name, version(&request.model_version))?;
    let raw = !request.raw_input_contents.is_empty();
    let images = images_of(&mut request, state.admission.capacity())?;
    let wanted = request
        .outputs
        .iter()
        .map(|output| {
            Ok(WantedOutput {
                name: &output.name,
                classification: classification(&output.name, &output.parameters)?,
                binary: None,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    // Raw in, raw out: the "binary" outputs are those in `raw_output_contents`.
    let outputs = super::requested_outputs(&wanted, raw)?;
    let (_admitted, predictions) =
        super::classify(&state, &model, images, arriving, deadline).await?;
    let outputs = super::output_tensors(&model.info, &outputs, &predictions);
    Ok(respond(&model.info, request.id, outputs))
}

/// The encoded images of the request's one input, in order, from `raw_input_contents` or
/// the input's `contents.bytes_contents`.
fn images_of(request: &mut ModelInferRequest, capacity: usize) -> Result<Vec<Bytes>, ApiError> {
    let bad = |detail: String| Err(ApiError::BadRequest(detail));
    let headers = request.inputs.iter().map(|input| InputHeader {
        name: &input.name,
        datatype: &input.datatype,
        shape: &input.shape,
    });
    let count = super::declared_images(headers, capacity)?;
    let Some(input) = request.inputs.first_mut() else {
        return bad(format!("the model takes one input, `{INPUT}`"));
    };
    let contents = input
        .contents
        .take()
        .map(|contents| contents.bytes_contents)
        .unwrap_or_default();
    let images = match (request.raw_input_contents.as_slice(), contents.is_empty()) {
        ([], false) => contents,
        ([raw], true) => super::binary_elements(raw)?,
        ([_], false) => {
            return bad(format!(
                "input `{INPUT}` has both contents and raw_input_contents"
            ))
        }
        ([], true) => {
            return bad(format!(
                "input `{INPUT}` has no data: its elements go in raw_input_contents or in contents.bytes_contents"
            ))
        }
        (raw, _) => {
            return bad(format!(
                "the request has {} raw_input_contents for its one input",
                raw.len()
            ))
        }
    };
    super::check_element_count(&input.shape, count, &images)?;
    Ok(images)
}

/// The classification extension's count among an output's parameters: an integer
/// (tritonclient sends `int64_param`).
fn classification(
    output: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<u64>, ApiError> {
    let Some(parameter) = parameters.get("classification") else {
        return Ok(None);
    };
    match parameter.parameter_choice {
        // Below 1: refused as 0 is.
        Some(ParameterChoice::Int64Param(count)) => Ok(Some(u64::try_from(count).unwrap_or(0))),
        Some(ParameterChoice::Uint64Param(count)) => Ok(Some(count)),
        _ => Err(ApiError::BadRequest(format!(
            "the classification parameter of output `{output}` is an integer (int64_param or uint64_param): how many classes to return"
        ))),
    }
}

fn respond(info: &ModelInfo, id: String, outputs: Vec<OutputTensor>) -> ModelInferResponse {
    let mut raw = Vec::new();
    let outputs = outputs
        .into_iter()
        .map(|output| {
            let contents = if output.binary {
                let mut bytes = Vec::new();
                output.data.write_binary(&mut bytes);
                raw.push(Bytes::from(bytes));
                None
            } else {
                Some(match output.data {
                    TensorData::Fp32(values) => InferTensorContents {
                        fp32_contents: values,
                        ..InferTensorContents::default()
                    },
                    TensorData::Bytes(strings) => InferTensorContents {
                        bytes_contents: strings.into_iter().map(Bytes::from).collect(),
                        ..InferTensorContents::default()
                    },
                })
            };
            InferOutputTensor {
                name: output.name.into(),
                datatype: output.datatype.into(),
                // Images and classes: far below i64::MAX.
                shape: output.shape.map(|d| d as i64).into(),
                parameters: HashMap::new(),
                contents,
            }
        })
        .collect();
    ModelInferResponse {
        model_name: info.name.clone(),
        model_version: info.generation.to_string(),
        id,
        parameters: HashMap::new(),
        outputs,
        raw_output_contents: raw,
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn methods_are_found_by_their_paths() {
        assert_eq!(
            Method::of("/inference.GRPCInferenceService/ModelInfer"),
            Some(Method::ModelInfer)
        );
        for path in [
            "/inference.GRPCInferenceService/ModelStreamInfer",
            "/other.Service/ModelInfer",
            "/inference.GRPCInferenceService",
            "ModelInfer",
        ] {
            assert_eq!(Method::of(path), None, "{path}");
        }
    }

    /// The body budget's refusals reach the client as their own statuses, however deep
    /// in the body's errors.
    #[test]
    fn body_errors_keep_the_refusals_status() {
        let spent = axum::Error::new(axum::Error::new(ApiError::BodyBudgetSpent { budget: 5 }));
        assert_eq!(body_error(spent).code(), Code::Unavailable);
        let large = axum::Error::new(ApiError::PayloadTooLarge { limit: 5 });
        let status = body_error(large);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("limit of 5 bytes"), "{status:?}");
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert_eq!(body_error(other).code(), Code::Unknown);
    }

    #[test]
    fn grpc_timeouts_shorten_the_servers() {
        let server = Duration::from_secs(30);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(value).unwrap());
            timeout(server, &headers)
        };
        assert_eq!(with("250m"), Duration::from_millis(250));
        assert_eq!(with("2S"), Duration::from_secs(2));
        assert_eq!(with("1500000u"), Duration::from_millis(1500));
        assert_eq!(with("1H"), server);
        for malformed in ["", "m", "10", "10x", "123456789m", "-5m"] {
            assert_eq!(with(malformed), server, "{malformed:?}");
        }
        assert_eq!(timeout(server, &HeaderMap::new()), server);
    }
}
