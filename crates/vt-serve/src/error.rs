//! The one error type of the API: every failure becomes a status code and a JSON body
//! `{"error": CODE, "detail": MESSAGE}`, where CODE is a stable machine-readable word (on
//! the Open Inference Protocol's and KServe V1's routes, `{"error": MESSAGE}` as those
//! protocols say); on the gRPC port, a gRPC status with the same message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tonic::Code;
use vt_data::DataError;

use crate::classifier::ClassifyError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request lacks the server's `--api-key`.
    #[error("{0}")]
    Unauthorized(String),
    /// `what` (the request body, or the image a URL gives) is over `--max-body-bytes`.
    #[error("{what} is larger than the limit of {limit} bytes (vt-serve --max-body-bytes)")]
    PayloadTooLarge { what: &'static str, limit: u64 },
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    UrlFetchRefused(String),
    #[error("{0}")]
    UrlFetchFailed(String),
    #[error("the request queue is full, and so is its waiting room; retry shortly")]
    Overloaded,
    #[error(
        "the server holds its --max-inflight-body-bytes ({budget} bytes) of request bodies; \
         retry shortly"
    )]
    BodyBudgetSpent { budget: u64 },
    #[error("the server is not ready: {0}")]
    NotReady(String),
    #[error("the request was not answered within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The client was still sending the request's body when the time was up.
    #[error("the request body was not received within {timeout_ms} ms")]
    RequestTimeout { timeout_ms: u64 },
    #[error("no route for {0}")]
    NotFound(String),
    #[error("{0}")]
    UnknownModel(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    Internal(String),
    /// The client closed its connection (or reset its stream) before its request was read:
    /// no answer reaches it, but the request is counted and logged.
    #[error("the client went away before its request was read")]
    ClientClosedRequest,
}

/// nginx's "client closed request": no HTTP status says that the client went away.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Whether reading a request body failed because the client went away: hyper's error, from
/// a connection that ended mid-body (HTTP/1.1) or a stream or connection that failed
/// (HTTP/2, whose bodies end cleanly otherwise). A malformed body (bad chunked framing, bad
/// compression) is the client's error, not its absence.
pub fn client_went_away(error: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
        return match std::error::Error::source(hyper)
            .and_then(|cause| cause.downcast_ref::<std::io::Error>())
        {
            Some(io) => matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            // HTTP/2's own errors (h2's, a reset stream or a failed connection), or a
            // connection that closed before hyper read the whole message.
            None => !hyper.is_parse() && !hyper.is_user(),
        };
    }
    // `io::Error::source` skips the error it wraps: look at that one too.
    let wrapped = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    wrapped
        .or_else(|| error.source())
        .is_some_and(client_went_away)
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    detail: String,
}

impl ApiError {
    /// A request body over `--max-body-bytes` (`limit`).
    pub fn body_too_large(limit: u64) -> ApiError {
        ApiError::PayloadTooLarge {
            what: "request body",
            limit,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidImage(_) | ApiError::UrlFetchRefused(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UrlFetchFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::Overloaded | ApiError::BodyBudgetSpent { .. } | ApiError::NotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound(_) | ApiError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ClientClosedRequest => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    /// The stable word in the `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::UrlFetchRefused(_) => "url_fetch_refused",
            ApiError::UrlFetchFailed(_) => "url_fetch_failed",
            // Both are a busy server that the client should retry.
            ApiError::Overloaded | ApiError::BodyBudgetSpent { .. } => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::Timeout { .. } => "timeout",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::NotFound(_) => "not_found",
            ApiError::UnknownModel(_) => "unknown_model",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Internal(_) => "internal",
            ApiError::ClientClosedRequest => "client_closed_request",
        }
    }

    /// Prefixes the detail with the multipart file it concerns.
    pub fn for_file(self, filename: Option<&str>) -> ApiError {
        let Some(name) = filename.filter(|name| !name.is_empty()) else {
            return self;
        };
        let detail = format!("{name}: {self}");
        match self {
            ApiError::BadRequest(_) => ApiError::BadRequest(detail),
            ApiError::InvalidImage(_) => ApiError::InvalidImage(detail),
            ApiError::UnsupportedMediaType(_) => ApiError::UnsupportedMediaType(detail),
            ApiError::ImageTooLarge(_) => ApiError::ImageTooLarge(detail),
            ApiError::Internal(_) => ApiError::Internal(detail),
            other => other,
        }
    }

    /// Maps a failure to decode or run one image.
    pub fn from_classify(error: ClassifyError) -> ApiError {
        match error {
            ClassifyError::Image(DataError::EmptyImage) => {
                ApiError::InvalidImage("the image is empty (0 bytes)".into())
            }
            ClassifyError::Image(e @ DataError::UnsupportedFormat(_)) => {
                ApiError::UnsupportedMediaType(e.to_string())
            }
            ClassifyError::Image(e @ DataError::TooManyPixels { .. }) => {
                ApiError::ImageTooLarge(e.to_string())
            }
            ClassifyError::Image(DataError::Decode(image::ImageError::Unsupported(e))) => {
                ApiError::UnsupportedMediaType(format!("unsupported image: {e}"))
            }
            ClassifyError::Image(DataError::Decode(image::ImageError::Limits(e))) => {
                ApiError::ImageTooLarge(format!("image exceeds decoding limits: {e}"))
            }
            ClassifyError::Image(e) => ApiError::InvalidImage(e.to_string()),
            ClassifyError::Inference(e) => ApiError::Internal(format!("inference failed: {e}")),
        }
    }

    /// The gRPC status of this error, its message the HTTP answer's detail. Server errors
    /// are logged, as for HTTP.
    pub fn grpc_status(&self) -> tonic::Status {
        let code = match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidImage(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::UrlFetchRefused(_) => Code::InvalidArgument,
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => {
                Code::ResourceExhausted
            }
            // All are worth a retry: UNAVAILABLE is the code gRPC clients retry.
            ApiError::UrlFetchFailed(_)
            | ApiError::Overloaded
            | ApiError::BodyBudgetSpent { .. }
            | ApiError::NotReady(_) => Code::Unavailable,
            ApiError::Timeout { .. } | ApiError::RequestTimeout { .. } => Code::DeadlineExceeded,
            ApiError::UnknownModel(_) => Code::NotFound,
            ApiError::Unauthorized(_) => Code::Unauthenticated,
            // No such method.
            ApiError::NotFound(_) | ApiError::MethodNotAllowed { .. } => Code::Unimplemented,
            ApiError::Internal(_) => Code::Internal,
            ApiError::ClientClosedRequest => Code::Cancelled,
        };
        if self.status().is_server_error() {
            tracing::warn!(code = ?code, error = %self, "gRPC request failed");
        }
        tonic::Status::new(code, self.to_string())
    }

    /// The error's status and headers around `body`: the one place both error shapes (this
    /// API's and [`ErrorMessage`]'s) are turned into responses.
    pub fn into_response_with(self, body: impl Serialize) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut response = (status, Json(body)).into_response();
        if matches!(
            self,
            ApiError::Overloaded | ApiError::BodyBudgetSpent { .. } | ApiError::NotReady(_)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// An [`ApiError`] in the shape `{"error": MESSAGE}`, which the Open Inference Protocol,
/// KServe's V1 protocol and TensorFlow Serving's REST API answer.
pub struct ErrorMessage(ApiError);

impl From<ApiError> for ErrorMessage {
    fn from(error: ApiError) -> Self {
        ErrorMessage(error)
    }
}

impl IntoResponse for ErrorMessage {
    fn into_response(self) -> Response {
        let message = self.0.to_string();
        self.0
            .into_response_with(serde_json::json!({ "error": message }))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code(),
            detail: self.to_string(),
        };
        self.into_response_with(body)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        error.grpc_status()
    }
}
