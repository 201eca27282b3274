//! The access log and request ids: one log line per request (status and latency, in a span
//! naming the method, path and request id), answered or abandoned by its client, and the
//! `x-request-id` header. A client's own id is kept, other requests (an empty id among
//! them) get a fresh UUID; either comes back in the answer.

use std::time::Duration;

use axum::extract::Request as AxumRequest;
use axum::http::{Request, Response};
use tracing::Span;

/// The log target of the per-request lines, for RUST_LOG filters.
pub const TARGET: &str = "vt_serve::access";

const REQUEST_ID: &str = "x-request-id";

pub fn span<B>(request: &Request<B>) -> Span {
    span_with_path(request, request.uri())
}

/// The span of a gRPC call: its path alone, without the scheme and host that HTTP/2
/// requests carry.
pub fn grpc_span<B>(request: &Request<B>) -> Span {
    span_with_path(request, request.uri().path())
}

fn span_with_path<B>(request: &Request<B>, path: impl std::fmt::Display) -> Span {
    // Lossy, so that an id that is not UTF-8 can still be matched with its answer's.
    let id = request
        .headers()
        .get(REQUEST_ID)
        .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()));
    // The id as a plain string: the text format quotes and escapes it, so that a client's
    // id cannot forge the rest of a log line; JSON escapes it anyway.
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %path,
        id = id.as_ref()
    )
}

/// Drops an empty `x-request-id`, which would identify nothing, so that the request gets
/// a fresh one.
pub async fn without_empty_id(mut request: AxumRequest) -> AxumRequest {
    if request
        .headers()
        .get(REQUEST_ID)
        .is_some_and(|id| id.is_empty())
    {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

pub fn answered<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        target: TARGET,
        status = response.status().as_u16(),
        latency_ms = latency_ms(latency),
        "answered"
    );
}

/// The line of an HTTP request that ended unanswered, in `span`, the request's: its client
/// went away (status 499, as nginx logs it), or the server stopped, cut short by a second
/// shutdown signal (status 0, none sent, as Envoy logs it).
pub fn unanswered(span: &Span, latency: Duration, server_stopped: bool) {
    let (status, what) = if server_stopped {
        (0, "server stopped")
    } else {
        (499, "client went away")
    };
    let _entered = span.enter();
    tracing::info!(
        target: TARGET,
        status,
        latency_ms = latency_ms(latency),
        "{what}: not answered"
    );
}

/// Milliseconds, to the microsecond.
pub fn latency_ms(latency: Duration) -> f64 {
    (latency.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs its `record` when dropped before [`OnAbandon::answered`]: hyper drops a request's
/// future unfinished when its client goes away (closes the connection, resets the stream),
/// and the request must still be counted and logged.
pub struct OnAbandon<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnAbandon<F> {
    pub fn new(record: F) -> Self {
        OnAbandon(Some(record))
    }

    /// The request was answered: nothing to record.
    pub fn answered(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnAbandon<F> {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record();
        }
    }
}
