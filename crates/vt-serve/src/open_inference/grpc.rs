//! The Open Inference Protocol's gRPC form: the service `inference.GRPCInferenceService` of
//! KServe and Triton, on `--grpc-port`, so that `tritonclient.grpc` and KServe's gRPC
//! client call vt-serve as they call those servers. It answers `ServerLive`,
//! `ServerReady`, `ModelReady`, `ServerMetadata`, `ModelMetadata`, `ModelConfig` (Triton's)
//! and `ModelInfer`; other methods (streaming, model repository, statistics, shared
//! memory...) answer UNIMPLEMENTED, as a server without them does. Beside it, gRPC's health
//! checking protocol answers `grpc.health.v1.Health/Check` (what Kubernetes' gRPC probes
//! and `grpc-health-probe` call) as `ServerReady` does; its streaming `Watch` is
//! UNIMPLEMENTED, which the protocol allows.
//!
//! The service is written by hand over tonic's core (its codec and unary call handling)
//! with the messages of [`proto`](super::proto), served over HTTP/2 by the same server
//! loop, shutdown and body budget as the HTTP routes, through the same queue, batching and
//! limits. `ModelInfer` reads the images from `raw_input_contents` (BYTES: each after its
//! 4-byte little-endian length, as tritonclient sends them; FP32: little-endian floats) or
//! from `contents.bytes_contents` or `contents.fp32_contents`; the
//! outputs go in `raw_output_contents` when the input came raw (what tritonclient reads, and
//! what Triton always answers), else in their `contents`: typed in, typed out, is vt-serve's
//! own choice. A message is checked before prost decodes it ([`MessageLimits`]). Errors are
//! [`ApiError`]s as gRPC statuses: [`ApiError::grpc_status`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use http_body_util::combinators::MapErr;
use http_body_util::BodyExt;
use prost::bytes::Buf;
use prost::encoding::{self, DecodeContext, WireType};
use tonic::codec::{BufferSettings, Codec, CompressionEncoding, DecodeBuf, Decoder};
use tonic::server::{Grpc, UnaryService};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use super::proto::{
    HealthCheckRequest, HealthCheckResponse, InferInputTensor, InferOutputTensor, InferParameter,
    InferTensorContents, ModelConfigRequest, ModelConfigResponse, ModelInferRequest,
    ModelInferResponse, ModelMetadataRequest, ModelReadyRequest, ModelReadyResponse,
    ParameterChoice, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerReadyRequest, ServerReadyResponse, ServingStatus,
};
use super::{Encoding, Images, InputHeader, OutputTensor, TensorData, WantedOutput, INPUT};
use crate::access::{self, OnAbandon};
use crate::auth;
use crate::batcher::Arriving;
use crate::body_budget::{self, BodyCharge};
use crate::classifier::Preprocessor;
use crate::error::{client_went_away, ApiError};
use crate::input;
use crate::metrics;
use crate::state::{AppState, ModelInfo};

/// The service's full name: its methods' paths are `/inference.GRPCInferenceService/NAME`.
pub const SERVICE: &str = "inference.GRPCInferenceService";
/// gRPC's standard health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    ServerLive,
    ServerReady,
    ModelReady,
    ServerMetadata,
    ModelMetadata,
    ModelConfig,
    ModelInfer,
    HealthCheck,
}

impl Method {
    const ALL: [Method; 8] = [
        Method::ServerLive,
        Method::ServerReady,
        Method::ModelReady,
        Method::ServerMetadata,
        Method::ModelMetadata,
        Method::ModelConfig,
        Method::ModelInfer,
        Method::HealthCheck,
    ];

    fn service(self) -> &'static str {
        match self {
            Method::HealthCheck => HEALTH_SERVICE,
            _ => SERVICE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Method::ServerLive => "ServerLive",
            Method::ServerReady => "ServerReady",
            Method::ModelReady => "ModelReady",
            Method::ServerMetadata => "ServerMetadata",
            Method::ModelMetadata => "ModelMetadata",
            Method::ModelConfig => "ModelConfig",
            Method::ModelInfer => "ModelInfer",
            Method::HealthCheck => "Check",
        }
    }

    /// `SERVICE/NAME`: the method's path without its leading `/`.
    fn full_name(self) -> String {
        format!("{}/{}", self.service(), self.name())
    }

    /// Whether `--api-key` guards it: all but the health and readiness checks.
    fn needs_key(self) -> bool {
        !matches!(
            self,
            Method::ServerLive | Method::ServerReady | Method::ModelReady | Method::HealthCheck
        )
    }

    /// The method a request's path names, if this server answers it.
    fn of(path: &str) -> Option<Method> {
        let (service, name) = path.strip_prefix('/')?.split_once('/')?;
        Method::ALL
            .into_iter()
            .find(|method| method.service() == service && method.name() == name)
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
        .layer(middleware::from_fn_with_state(Arc::clone(&state), observe))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.body_budget),
            body_budget::charge_body,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(middleware::map_request(access::without_empty_id))
        .with_state(state)
}

/// Counts each call and logs it (`vt_serve::access`) with its status code: outside the
/// panic catcher, so that a call that panicked is counted and logged too, as INTERNAL; and
/// a call whose client went away before its answer (hyper then drops it) as CANCELLED, and
/// one that a second shutdown signal dropped as UNAVAILABLE, gRPC's code for a server going
/// away.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = Method::of(request.uri().path()).map_or("unknown", Method::name);
    let span = access::grpc_span(&request);
    let record = |code: Code| {
        let latency = started.elapsed();
        state
            .metrics
            .observe_grpc(method, code, latency.as_secs_f64());
        let _entered = span.enter();
        tracing::info!(
            target: access::TARGET,
            code = metrics::code_name(code),
            latency_ms = access::latency_ms(latency),
            "{}",
            match code {
                Code::Cancelled => "client went away: not answered",
                Code::Unavailable if state.is_cut_short() => "server stopped: not answered",
                _ => "answered",
            }
        );
    };
    // Whoever ended a call unanswered: its client, or the server cut short.
    let unanswered = || {
        if state.is_cut_short() {
            Code::Unavailable
        } else {
            Code::Cancelled
        }
    };
    let abandoned = OnAbandon::new(|| record(unanswered()));
    let went_away = WentAway::default();
    let mut request = request;
    request.extensions_mut().insert(went_away.clone());
    let response = next.run(request).instrument(span.clone()).await;
    abandoned.answered();
    // A call that failed carries its status in its headers; a successful one in its
    // trailers, as OK. tonic reads a client's reset in the middle of a message as the end of
    // the stream and answers INTERNAL (a message cut short): it went away all the same.
    let code = if went_away.0.load(Ordering::Relaxed) {
        unanswered()
    } else {
        response
            .extensions()
            .get::<Status>()
            .map_or(Code::Ok, Status::code)
    };
    record(code);
    response
}

/// Set when a call's request body failed because its client went away: what [`observe`]
/// counts it as, whatever status tonic then answers.
#[derive(Clone, Default)]
struct WentAway(Arc<AtomicBool>);

/// Answers one call.
async fn call(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    if let Some(refusal) = not_grpc(request.headers()) {
        return refusal;
    }
    match Method::of(request.uri().path()) {
        Some(method)
            if method.needs_key()
                && state
                    .api_key
                    .as_ref()
                    .is_some_and(|key| !key.admits(request.headers())) =>
        {
            auth::refusal(request.headers()).grpc_status().into_http()
        }
        Some(method) => answer(&state, method, request, started).await,
        None => ApiError::NotFound(format!(
            "{}: the methods this server answers are {}",
            request.uri().path(),
            Method::ALL.map(Method::full_name).join(", ")
        ))
        .grpc_status()
        .into_http(),
    }
}

/// The answer to a request that is not a gRPC call (its content-type is not
/// `application/grpc`, alone or with a `+format` or `;parameters`): HTTP 415, as the gRPC
/// spec says, with the status INVALID_ARGUMENT for clients that read only that.
fn not_grpc(headers: &HeaderMap) -> Option<Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()));
    let grpc = content_type.as_deref().is_some_and(|value| {
        value
            .strip_prefix("application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
    });
    if grpc {
        return None;
    }
    let mut response = ApiError::UnsupportedMediaType(format!(
        "content-type {}: gRPC calls are application/grpc",
        content_type.as_deref().unwrap_or("(none)")
    ))
    .grpc_status()
    .into_http::<Body>();
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    Some(response)
}

async fn answer(
    state: &Arc<AppState>,
    method: Method,
    request: Request,
    started: Instant,
) -> Response {
    let timeout = timeout(state.limits.timeout, request.headers());
    let deadline = started + timeout;
    let limits = MessageLimits::new(state, method, BodyCharge::of(&request));
    let limit = limits.bytes as u64;
    // Body errors (the body budget's refusals) become their statuses, which tonic keeps.
    let went_away = request
        .extensions()
        .get::<WentAway>()
        .cloned()
        .unwrap_or_default();
    let request = request.map(|body| {
        body.map_err(Box::new(move |error| {
            let status = body_error(error);
            if status.code() == Code::Cancelled {
                went_away.0.store(true, Ordering::Relaxed);
            }
            status
        }) as BodyErrors)
    });
    let call = async {
        match method {
            Method::ServerLive => {
                unary(limits, request, |_: ServerLiveRequest| async {
                    Ok(ServerLiveResponse { live: true })
                })
                .await
            }
            Method::ServerReady => {
                let ready = state.is_accepting();
                unary(limits, request, move |_: ServerReadyRequest| async move {
                    Ok(ServerReadyResponse { ready })
                })
                .await
            }
            Method::ModelReady => {
                let state = Arc::clone(state);
                // Another model or version is not ready rather than an error, as Triton
                // answers: clients poll this until it says true.
                unary(limits, request, |asked: ModelReadyRequest| async move {
                    let served = super::resolve(&state, &asked.name, version(&asked.version));
                    Ok(ModelReadyResponse {
                        ready: served.is_ok() && state.is_accepting(),
                    })
                })
                .await
            }
            Method::ServerMetadata => {
                unary(limits, request, |_: ServerMetadataRequest| async {
                    Ok(super::server_metadata())
                })
                .await
            }
            Method::ModelMetadata => {
                let state = Arc::clone(state);
                unary(limits, request, |asked: ModelMetadataRequest| async move {
                    let model = super::resolve(&state, &asked.name, version(&asked.version))?;
                    Ok(super::model_metadata(&model.info))
                })
                .await
            }
            Method::ModelConfig => {
                let state = Arc::clone(state);
                unary(limits, request, |asked: ModelConfigRequest| async move {
                    let model = super::resolve(&state, &asked.name, version(&asked.version))?;
                    Ok(ModelConfigResponse {
                        config: Some(super::model_config(&model.info, &state.batch_config())),
                    })
                })
                .await
            }
            Method::HealthCheck => {
                let status = if state.is_accepting() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                unary(
                    limits,
                    request,
                    move |asked: HealthCheckRequest| async move {
                        // "" is the server as a whole; an unknown service is NOT_FOUND.
                        if !asked.service.is_empty() && asked.service != SERVICE {
                            return Err(ApiError::UnknownModel(format!(
                                "unknown service `{}`: this server's health is that of \"\" \
                                 (the server) and {SERVICE}",
                                asked.service
                            )));
                        }
                        Ok(HealthCheckResponse {
                            status: status as i32,
                        })
                    },
                )
                .await
            }
            Method::ModelInfer => {
                // Announced before the message is read, as the HTTP routes announce theirs.
                let arriving = state.arriving();
                let state = Arc::clone(state);
                unary(limits, request, move |asked| async move {
                    model_infer(state, asked, arriving?, deadline).await
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
        return ApiError::body_too_large(limit).grpc_status().into_http();
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
type CallBody = MapErr<Body, BodyErrors>;

/// What a call's request body's errors become: [`body_error`], noting a client gone.
type BodyErrors = Box<dyn FnMut(axum::Error) -> Status + Send + Sync>;

/// The status of a request body that failed to read: the [`ApiError`] the body budget
/// failed it with, else CANCELLED when the client went away (reset its stream, or lost its
/// connection), else what tonic makes of the error.
fn body_error(error: axum::Error) -> Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<ApiError>() {
            return refusal.grpc_status();
        }
        source = cause.source();
    }
    if client_went_away(&error) {
        return ApiError::ClientClosedRequest.grpc_status();
    }
    Status::from_error(Box::new(error))
}

/// An empty version: whichever the server serves.
fn version(version: &str) -> Option<&str> {
    Some(version).filter(|v| !v.is_empty())
}

/// Decodes a unary call's message (held to `limits`; gzip and deflate accepted, answers
/// uncompressed as Triton's), has `handler` answer it and encodes the answer or the error's
/// status.
async fn unary<Req, Res, F, Fut>(
    limits: MessageLimits,
    request: axum::http::Request<CallBody>,
    handler: F,
) -> axum::http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Res: prost::Message + Send + 'static,
    F: FnOnce(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Res, ApiError>> + Send + 'static,
{
    let bytes = limits.bytes;
    Grpc::new(CheckedCodec::<Res, Req>(limits, PhantomData))
        .max_decoding_message_size(bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .unary(Handler(Some(handler)), request)
        .await
}

/// The largest message of the methods other than `ModelInfer`: a model's name and version.
const SMALL_MESSAGE: usize = 64 * 1024;

/// What a call's message is held to, checked before prost decodes it.
#[derive(Clone)]
struct MessageLimits {
    /// Its size, decompressed: `--max-body-bytes` for `ModelInfer`, [`SMALL_MESSAGE`] else.
    bytes: usize,
    /// The request's charge of the body budget, which counts decoded bytes.
    charge: BodyCharge,
    /// For `ModelInfer`: the most images of a request (`--queue`), which bounds its fields.
    images: Option<usize>,
}

impl MessageLimits {
    fn new(state: &AppState, method: Method, charge: BodyCharge) -> MessageLimits {
        let max_body_bytes = usize::try_from(state.limits.max_body_bytes).unwrap_or(usize::MAX);
        let (bytes, images) = match method {
            Method::ModelInfer => (max_body_bytes, Some(state.admission.capacity())),
            _ => (max_body_bytes.min(SMALL_MESSAGE), None),
        };
        MessageLimits {
            bytes,
            charge,
            images,
        }
    }

    fn check(&self, message: &[u8]) -> Result<(), ApiError> {
        // tonic decompresses the message after the body budget charged its wire bytes.
        self.charge.cover(message.len())?;
        if let Some(images) = self.images {
            let limit = input::value_limit(images);
            if more_fields_than(limit, message, MODEL_INFER_NESTED) {
                return Err(ApiError::BadRequest(format!(
                    "the ModelInfer message holds more than {limit} fields (inputs, outputs, their contents and parameters), more than a request of at most {images} images (--queue) needs"
                )));
            }
        }
        Ok(())
    }
}

/// A message field whose own fields are counted too, and those of its `nested` ones.
struct Nested {
    tag: u32,
    nested: &'static [Nested],
    /// Its packed fields of varints, whose values count one each: prost decodes a 1-byte
    /// value into 4 or 8.
    varints: &'static [u32],
}

/// `ModelInferRequest`'s `inputs` (their `shape`'s values and `contents` within, the integer
/// contents' values too) and `outputs`; its other fields (`raw_input_contents`,
/// `parameters`' entries...) count one each.
const MODEL_INFER_NESTED: &[Nested] = &[
    Nested {
        tag: 5,
        nested: &[Nested {
            tag: 5,
            nested: &[],
            varints: &[2, 3, 4, 5],
        }],
        varints: &[3],
    },
    Nested {
        tag: 6,
        nested: &[],
        varints: &[],
    },
];

/// Whether `message` holds more than `limit` fields, counting those of its `nested`
/// messages, read off the wire without building anything. prost builds every repeated
/// entry it decodes (an empty `inputs` entry: 2 bytes of message, some 200 decoded), so a
/// message of millions of them is refused before. A malformed message is left to prost to
/// report.
fn more_fields_than(limit: usize, message: &[u8], nested: &[Nested]) -> bool {
    /// `None` once past the limit or at a malformed field.
    fn count(
        mut buf: &[u8],
        nested: &[Nested],
        varints: &[u32],
        seen: &mut usize,
        limit: usize,
    ) -> Option<()> {
        while !buf.is_empty() {
            *seen += 1;
            if *seen > limit {
                return None;
            }
            let (tag, wire_type) = encoding::decode_key(&mut buf).ok()?;
            let packed = wire_type == WireType::LengthDelimited;
            let field = nested.iter().find(|field| field.tag == tag);
            if packed && (field.is_some() || varints.contains(&tag)) {
                let length = encoding::decode_varint(&mut buf).ok()?;
                let length = usize::try_from(length).ok().filter(|&n| n <= buf.len())?;
                let (inner, rest) = buf.split_at(length);
                match field {
                    Some(field) => count(inner, field.nested, field.varints, seen, limit)?,
                    // A varint ends at each byte whose high bit is clear.
                    None => *seen += inner.iter().filter(|&&byte| byte < 0x80).count(),
                }
                buf = rest;
            } else {
                encoding::skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?
            }
        }
        Some(())
    }
    let mut seen = 0;
    let _ = count(message, nested, &[], &mut seen, limit);
    seen > limit
}

/// tonic's prost codec, whose decoder checks each message against its [`MessageLimits`]
/// first.
struct CheckedCodec<Res, Req>(MessageLimits, PhantomData<(Res, Req)>);

impl<Res, Req> Codec for CheckedCodec<Res, Req>
where
    Res: prost::Message + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    type Encode = Res;
    type Decode = Req;
    type Encoder = ProstEncoder<Res>;
    type Decoder = CheckedDecoder<Req>;

    fn encoder(&mut self) -> ProstEncoder<Res> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> CheckedDecoder<Req> {
        CheckedDecoder {
            limits: self.0.clone(),
            decoded: false,
            prost: ProstDecoder::default(),
        }
    }
}

struct CheckedDecoder<Req> {
    limits: MessageLimits,
    /// Whether the call's message was decoded: a unary call has one.
    decoded: bool,
    prost: ProstDecoder<Req>,
}

impl<Req: prost::Message + Default> Decoder for CheckedDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, message: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        // tonic reads on to the trailers after the message: one more is refused, rather than
        // decompressed and dropped by the dozen.
        if std::mem::replace(&mut self.decoded, true) {
            return Err(ApiError::BadRequest(
                "a unary call's request holds one message; this one holds more".into(),
            )
            .grpc_status());
        }
        // The message is one contiguous buffer, so its one chunk is all of it.
        self.limits
            .check(message.chunk())
            .map_err(|e| e.grpc_status())?;
        // prost's failures are the client's message, not the server: tonic's codec calls
        // them INTERNAL, gRPC's bad input is INVALID_ARGUMENT.
        self.prost.decode(message).map_err(|status| {
            ApiError::BadRequest(format!("invalid request message: {}", status.message()))
                .grpc_status()
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
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
    let images = images_of(&request, state.admission.capacity(), &model.preprocessor)?;
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
    // The images hold what they need of the request: the rest is not kept while they wait.
    let id = std::mem::take(&mut request.id);
    drop(request);
    let (_admitted, predictions) =
        super::classify(&state, &model, images, arriving, deadline).await?;
    let outputs = super::output_tensors(&model.info, &outputs, &predictions);
    Ok(respond(&model.info, id, outputs))
}

/// The images of the request's one input, in order, from `raw_input_contents` or the
/// input's `contents` (`bytes_contents` for BYTES, `fp32_contents` for FP32).
fn images_of<'a>(
    request: &'a ModelInferRequest,
    capacity: usize,
    preprocessor: &Preprocessor,
) -> Result<Images, ApiError> {
    let bad = |detail: String| Err(ApiError::BadRequest(detail));
    let header = |input: &'a InferInputTensor| InputHeader {
        name: &input.name,
        datatype: &input.datatype,
        shape: &input.shape,
    };
    let image_size = preprocessor.image_size as usize;
    let declared = super::declared_images(&request.inputs, header, capacity, image_size)?;
    let input = declared.input;
    let contents = input.contents.as_ref();
    let raw = match request.raw_input_contents.as_slice() {
        [] => None,
        [raw] => Some(raw),
        raw => {
            return bad(format!(
                "the request has {} raw_input_contents for its one input",
                raw.len()
            ))
        }
    };
    match declared.encoding {
        Encoding::Encoded => {
            // Views of the message's bytes: cloning them copies no image.
            let contents = contents
                .map(|contents| contents.bytes_contents.clone())
                .unwrap_or_default();
            let images = match (raw, contents.is_empty()) {
                (None, false) => contents,
                (Some(raw), true) => super::binary_elements(raw, &input.shape, declared.images)?,
                (Some(_), false) => return bad(both_contents()),
                (None, true) => {
                    return bad(format!(
                        "input `{INPUT}` has no data: its elements go in raw_input_contents or in contents.bytes_contents"
                    ))
                }
            };
            super::check_element_count(&input.shape, declared.images, &images)?;
            Ok(Images::Encoded(images))
        }
        Encoding::Preprocessed => {
            let contents = contents.map_or(&[][..], |contents| &contents.fp32_contents);
            let values = match (raw, contents.is_empty()) {
                (None, false) => Cow::Borrowed(contents),
                (Some(raw), true) => Cow::Owned(super::binary_values(raw, &input.shape)?),
                (Some(_), false) => return bad(both_contents()),
                (None, true) => {
                    return bad(format!(
                        "input `{INPUT}` has no data: its values go in raw_input_contents or in contents.fp32_contents"
                    ))
                }
            };
            super::preprocessed_images(&values, &input.shape, declared.images, &preprocessor.norm)
                .map(Images::Preprocessed)
        }
    }
}

fn both_contents() -> String {
    format!("input `{INPUT}` has both contents and raw_input_contents")
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
        assert_eq!(
            Method::of("/grpc.health.v1.Health/Check"),
            Some(Method::HealthCheck)
        );
        for path in [
            "/inference.GRPCInferenceService/ModelStreamInfer",
            "/inference.GRPCInferenceService/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/ModelInfer",
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
        let large = axum::Error::new(ApiError::body_too_large(5));
        let status = body_error(large);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("limit of 5 bytes"), "{status:?}");
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert_eq!(body_error(other).code(), Code::Unknown);
    }

    /// gRPC's content-types pass; others get HTTP 415, as the gRPC spec says.
    #[test]
    fn only_grpc_content_types_are_answered() {
        let with = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            }
            not_grpc(&headers)
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            assert!(with(Some(grpc)).is_none(), "{grpc}");
        }
        for other in [None, Some("application/json"), Some("application/grpcweb")] {
            let response = with(other).expect("refused");
            assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            let status = response.extensions().get::<Status>().unwrap();
            assert_eq!(status.code(), Code::InvalidArgument, "{other:?}");
        }
    }

    /// Fields are counted off the wire, nested ones too, without decoding them.
    #[test]
    fn fields_are_counted_before_decoding() {
        let request = |inputs: usize, elements: usize| {
            let contents = InferTensorContents {
                bytes_contents: vec![Bytes::new(); elements],
                ..InferTensorContents::default()
            };
            let input = InferInputTensor {
                contents: Some(contents),
                ..InferInputTensor::default()
            };
            let request = ModelInferRequest {
                inputs: vec![input; inputs],
                ..ModelInferRequest::default()
            };
            prost::Message::encode_to_vec(&request)
        };
        // One input: the input, its contents, and the elements.
        assert!(!more_fields_than(12, &request(1, 10), MODEL_INFER_NESTED));
        assert!(more_fields_than(11, &request(1, 10), MODEL_INFER_NESTED));
        assert!(more_fields_than(100, &request(60, 0), MODEL_INFER_NESTED));
        // Malformed: left to prost.
        assert!(!more_fields_than(100, &[0x2a, 0x7f], MODEL_INFER_NESTED));
        // Packed varints count one each: a shape of 1-byte values decodes to 8 bytes each.
        let shaped = |dimensions: usize| {
            let input = InferInputTensor {
                shape: vec![1; dimensions],
                ..InferInputTensor::default()
            };
            let request = ModelInferRequest {
                inputs: vec![input],
                ..ModelInferRequest::default()
            };
            prost::Message::encode_to_vec(&request)
        };
        assert!(!more_fields_than(6, &shaped(4), MODEL_INFER_NESTED));
        assert!(more_fields_than(100, &shaped(1000), MODEL_INFER_NESTED));
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
