//! The access log and request ids: one log line per answered request (status and latency,
//! in a span naming the method, path and request id), and the `x-request-id` header. A
//! client's own id is kept, other requests get a fresh UUID; either comes back in the answer.

use std::time::Duration;

use axum::http::{Request, Response};
use tracing::Span;

/// The log target of the per-request lines, for RUST_LOG filters.
pub const TARGET: &str = "vt_serve::access";

pub fn span<B>(request: &Request<B>) -> Span {
    span_with_path(request, request.uri())
}

/// The span of a gRPC call: its path alone, without the scheme and host that HTTP/2
/// requests carry.
pub fn grpc_span<B>(request: &Request<B>) -> Span {
    span_with_path(request, request.uri().path())
}

fn span_with_path<B>(request: &Request<B>, path: impl std::fmt::Display) -> Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %path,
        id = %id
    )
}

pub fn answered<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        target: TARGET,
        status = response.status().as_u16(),
        latency_ms = (latency.as_secs_f64() * 1e6).round() / 1e3,
        "answered"
    );
}
