//! Content codings of request bodies, around tower-http's decompression layer: the
//! `Content-Encoding` header written as that layer reads it, the bytes received bounded
//! before decoding, and what it leaves encoded refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;

use crate::error::ApiError;

/// Writes `Content-Encoding` as the router's decompression layer, which compares exactly,
/// must read it: content codings are case-insensitive, `x-gzip` is gzip, `identity` no
/// coding, and a list's empty elements nothing (RFC 9110). Two or more codings become one
/// value that layer leaves alone, to be refused, rather than having it decode the first and
/// drop the others.
pub async fn normalize_content_encoding(mut request: Request, next: Next) -> Response {
    let headers = request.headers_mut();
    if !headers.contains_key(header::CONTENT_ENCODING) {
        return next.run(request).await;
    }
    let codings: Vec<String> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| {
            let value = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
            value
                .split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty() && c != "identity")
        .map(|c| if c == "x-gzip" { "gzip".into() } else { c })
        .collect();
    // A value that is no header value (bytes that are not UTF-8) stays as sent: refused.
    if codings.is_empty() {
        headers.remove(header::CONTENT_ENCODING);
    } else if let Ok(value) = HeaderValue::from_str(&codings.join(", ")) {
        headers.insert(header::CONTENT_ENCODING, value);
    }
    next.run(request).await
}

/// Whether an encoded body's received bytes went past the body limit: set by
/// [`bound_encoded_body`], read where the body is read, whose error does not say why.
#[derive(Clone, Default)]
pub struct ReceivedBytes(Option<Arc<AtomicBool>>);

impl ReceivedBytes {
    pub fn of(request: &Request) -> ReceivedBytes {
        request
            .extensions()
            .get::<ReceivedBytes>()
            .cloned()
            .unwrap_or_default()
    }

    pub fn over_limit(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|over| over.load(Ordering::Relaxed))
    }
}

/// Bounds an encoded body's bytes as received, before decoding, by the body limit, which
/// otherwise counts the decoded bytes only: a compressed stream can take megabytes to
/// decode to nothing.
pub async fn bound_encoded_body(
    State(limit): State<u64>,
    request: Request,
    next: Next,
) -> Response {
    if !request.headers().contains_key(header::CONTENT_ENCODING) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let over = Arc::new(AtomicBool::new(false));
    let mut left = limit;
    let flag = Arc::clone(&over);
    let bounded = body.into_data_stream().map(move |chunk| {
        let chunk = chunk?;
        left = left.checked_sub(chunk.len() as u64).ok_or_else(|| {
            flag.store(true, Ordering::Relaxed);
            axum::Error::new(ApiError::PayloadTooLarge { limit })
        })?;
        Ok::<_, axum::Error>(chunk)
    });
    parts.extensions.insert(ReceivedBytes(Some(over)));
    next.run(Request::from_parts(parts, Body::from_stream(bounded)))
        .await
}

/// Refuses a body still encoded once the router's decompression layer has decoded the
/// encodings it knows (gzip and deflate, removing their `Content-Encoding`).
pub fn refuse_undecoded(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_ENCODING) {
        Some(encoding) if encoding != "identity" => Err(ApiError::UnsupportedMediaType(format!(
            "the request body's Content-Encoding {encoding:?} is not supported (supported: one of gzip, deflate)"
        ))),
        _ => Ok(()),
    }
}
