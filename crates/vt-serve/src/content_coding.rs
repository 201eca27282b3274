//! Content codings of request bodies: the `Content-Encoding` header read as RFC 9110 writes
//! it, the bytes received bounded before decoding, gzip and deflate decoded as they are
//! read, and other codings refused.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_compression::tokio::bufread::{GzipDecoder, ZlibDecoder};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::error::ApiError;

/// Writes `Content-Encoding` as [`decode_body`], which compares exactly, reads it: content
/// codings are case-insensitive, `x-gzip` is gzip, `identity` no coding, and a list's empty
/// elements nothing (RFC 9110). Two or more codings become one value that it leaves alone,
/// to be refused, rather than decoding the first and dropping the others.
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
    // An empty body stays one, as `decode_body` reads it.
    if !request.headers().contains_key(header::CONTENT_ENCODING) || is_empty(request.body()) {
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
            axum::Error::new(ApiError::body_too_large(limit))
        })?;
        Ok::<_, axum::Error>(chunk)
    });
    parts.extensions.insert(ReceivedBytes(Some(over)));
    next.run(Request::from_parts(parts, Body::from_stream(bounded)))
        .await
}

/// Decodes a gzip or deflate (zlib) request body as it is read, removing its
/// `Content-Encoding` and `Content-Length`, so that the body limit bounds the decoded size;
/// a body of another coding passes, to be refused ([`refuse_undecoded`]). A gzip body may
/// hold several members, which decode as one (RFC 1952: `cat a.gz b.gz`), and a deflate
/// body likewise several zlib streams; other bytes after the last make the body unreadable,
/// however the connection splits them (tower-http's decoding layer refused a second
/// member, and took bytes after the last one when they came in the read that ended it). An
/// empty body is empty, whatever its coding says.
pub async fn decode_body(request: Request, next: Next) -> Response {
    let gzip = match request
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(HeaderValue::as_bytes)
    {
        Some(b"gzip") => true,
        Some(b"deflate") => false,
        _ => return next.run(request).await,
    };
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(header::CONTENT_ENCODING);
    if is_empty(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let encoded = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    // Past a stream's end, more input must begin another stream: other bytes are an error,
    // however they arrive.
    let decoded: Pin<Box<dyn AsyncRead + Send>> = if gzip {
        let mut decoder = GzipDecoder::new(encoded);
        decoder.multiple_members(true);
        Box::pin(decoder)
    } else {
        let mut decoder = ZlibDecoder::new(encoded);
        decoder.multiple_members(true);
        Box::pin(decoder)
    };
    let body = Body::from_stream(ReaderStream::new(decoded));
    next.run(Request::from_parts(parts, body)).await
}

/// Whether `body` is known to be empty (`Content-Length: 0`, or none on a request that has
/// no body).
fn is_empty(body: &Body) -> bool {
    http_body::Body::size_hint(body).exact() == Some(0)
}

/// Refuses a body still encoded once [`decode_body`] has decoded the encodings it knows
/// (gzip and deflate, removing their `Content-Encoding`).
pub fn refuse_undecoded(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_ENCODING) {
        Some(encoding) if encoding != "identity" => Err(ApiError::UnsupportedMediaType(format!(
            "the request body's Content-Encoding {encoding:?} is not supported (supported: one of gzip, deflate)"
        ))),
        _ => Ok(()),
    }
}
