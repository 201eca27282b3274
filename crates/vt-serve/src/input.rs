//! The images of a prediction request, read from any of the accepted body kinds:
//! `multipart/form-data` with one or more file parts, JSON `{"image": "<base64>"}` /
//! `{"url": "..."}`, or else a raw image under any content type (`image/*`,
//! `application/octet-stream`, SageMaker's `application/x-image`, curl's default
//! `application/x-www-form-urlencoded`...): its format is read from the bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::body_budget::BodyCharge;
use crate::content_coding::{refuse_undecoded, ReceivedBytes};
use crate::error::{client_went_away, ApiError};
use crate::state::{AppState, Limits};

pub struct ImageInput {
    /// The multipart file name, when the image came in one.
    pub filename: Option<String>,
    pub bytes: Bytes,
}

pub struct Inputs {
    pub images: Vec<ImageInput>,
    /// Whether the request was multipart, whose answer names each file.
    pub multipart: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonInput {
    image: Option<String>,
    url: Option<String>,
}

pub async fn read(
    state: &AppState,
    request: Request,
    deadline: Instant,
) -> Result<Inputs, ApiError> {
    let mime = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|m| !m.is_empty());
    let single = |bytes: Bytes| Inputs {
        images: vec![ImageInput {
            filename: None,
            bytes,
        }],
        multipart: false,
    };
    match mime.as_deref() {
        Some("multipart/form-data") => {
            received_by(&state.limits, deadline, read_multipart(state, request)).await
        }
        Some(json) if is_json(json) => {
            let charge = BodyCharge::of(&request);
            let body = without_byte_order_mark(read_body(request, &state.limits, deadline).await?);
            Ok(single(read_json(state, body, &charge, deadline).await?))
        }
        other => {
            let body = read_body(request, &state.limits, deadline).await?;
            refuse_json_as_image(&body, other)?;
            Ok(single(body))
        }
    }
}

/// Whether a media type is JSON: `application/json`, the older `text/json`, or a JSON-based
/// type (`application/vnd.foo+json`, RFC 6839's structured syntax suffix).
fn is_json(mime: &str) -> bool {
    mime == "application/json"
        || mime == "text/json"
        || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Refuses a body sent as an image that is JSON (`curl -d @request.json` sends it as
/// `application/x-www-form-urlencoded`), naming the content type it needs: no image format
/// begins with `{` or `[`, so the decoder's "not an image" would not say what went wrong.
fn refuse_json_as_image(body: &[u8], mime: Option<&str>) -> Result<(), ApiError> {
    let text = body.strip_prefix(BYTE_ORDER_MARK).unwrap_or(body);
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'[')) {
        return Ok(());
    }
    Err(ApiError::InvalidImage(format!(
        "the body is not an image but looks like JSON, sent as {}; JSON must be sent with \
         `Content-Type: application/json` (curl: -H 'Content-Type: application/json')",
        mime.map_or_else(|| "no Content-Type".to_owned(), |m| format!("`{m}`"))
    )))
}

/// What to say of a JSON route's body that does not parse because it is an image sent as
/// it is (`curl --data-binary @photo.jpg`): serde's "expected value at line 1 column 1"
/// does not say so. `advice` says where to send it.
pub fn image_not_json(body: &[u8], advice: &str) -> Option<String> {
    let format = vt_data::decode::sniff_format(body).ok()?;
    Some(format!(
        "; the body is a {} image, not JSON: {advice}",
        format!("{format:?}").to_ascii_uppercase()
    ))
}

/// [`image_not_json`]'s advice on the protocols' routes, which take JSON only.
pub const TO_PREDICT: &str =
    "POST an image as it is to /predict, or put it in the JSON base64-encoded";

/// UTF-8's byte order mark, which Windows editors and PowerShell 5's `Out-File` put before
/// JSON they write.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// A JSON body without its leading byte order mark, if any: RFC 8259 lets parsers ignore
/// it, and serde_json would refuse it as "expected value at line 1 column 1".
pub fn without_byte_order_mark(body: Bytes) -> Bytes {
    if body.starts_with(BYTE_ORDER_MARK) {
        body.slice(BYTE_ORDER_MARK.len()..)
    } else {
        body
    }
}

/// Refuses a body whose declared length is over `limit` before reading any of it.
fn refuse_declared_oversize(headers: &HeaderMap, limit: u64) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    Ok(())
}

/// How many JSON values `body` holds (objects, arrays and scalars, nested ones included),
/// numbers apart (with the arrays that hold only numbers, nested or not: a tensor's),
/// counted without building them, or `None` when it is not JSON. A request of millions of
/// tiny values (`[{},{},...]`, a few kilobytes gzipped) is refused on this count before it
/// is parsed into values that take many times its size.
pub fn json_value_count(body: &[u8]) -> Option<ValueCount> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let count = ValueCount::deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(count)
}

/// The most values (JSON values, protobuf fields) a request of at most `images` images
/// needs: a handful per image, plus the request's own fields.
pub fn value_limit(images: usize) -> usize {
    256usize.saturating_add(images.saturating_mul(16))
}

/// Refuses a JSON body with more values than a request of at most `images` images needs,
/// before it is parsed. `numbers` more numbers (and numeric arrays) are allowed, for
/// requests whose images are tensors of numbers, which are parsed straight into `f32`s.
pub fn refuse_too_many_json_values(
    body: &[u8],
    images: usize,
    numbers: usize,
) -> Result<(), ApiError> {
    let limit = value_limit(images);
    match json_value_count(body) {
        Some(count)
            if count.others > limit
                || count.numbers - count.numbers.min(numbers) > limit - count.others =>
        {
            Err(ApiError::BadRequest(format!(
                "the JSON body holds {} numbers and {} other values, more than a request of at \
                 most {images} images (--queue) needs",
                count.numbers, count.others
            )))
        }
        _ => Ok(()),
    }
}

/// The number of values in a JSON value, itself included.
#[derive(Debug, Default, PartialEq)]
pub struct ValueCount {
    pub numbers: usize,
    /// Objects, arrays, strings, booleans and nulls.
    pub others: usize,
}

impl ValueCount {
    const NUMBER: ValueCount = ValueCount {
        numbers: 1,
        others: 0,
    };
    const OTHER: ValueCount = ValueCount {
        numbers: 0,
        others: 1,
    };

    fn add(&mut self, other: ValueCount) {
        self.numbers += other.numbers;
        self.others += other.others;
    }
}

impl<'de> Deserialize<'de> for ValueCount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueCounter)
    }
}

struct ValueCounter;

impl<'de> Visitor<'de> for ValueCounter {
    type Value = ValueCount;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<ValueCount, E> {
        Ok(ValueCount::OTHER)
    }

    fn visit_i64<E>(self, _: i64) -> Result<ValueCount, E> {
        Ok(ValueCount::NUMBER)
    }

    fn visit_u64<E>(self, _: u64) -> Result<ValueCount, E> {
        Ok(ValueCount::NUMBER)
    }

    fn visit_f64<E>(self, _: f64) -> Result<ValueCount, E> {
        Ok(ValueCount::NUMBER)
    }

    fn visit_str<E>(self, _: &str) -> Result<ValueCount, E> {
        Ok(ValueCount::OTHER)
    }

    fn visit_unit<E>(self) -> Result<ValueCount, E> {
        Ok(ValueCount::OTHER)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ValueCount, A::Error> {
        let mut count = ValueCount::default();
        while let Some(n) = seq.next_element()? {
            count.add(n);
        }
        // An array of numbers only (or of such arrays) counts as one more number.
        count.add(if count.others == 0 {
            ValueCount::NUMBER
        } else {
            ValueCount::OTHER
        });
        Ok(count)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueCount, A::Error> {
        let mut count = ValueCount::OTHER;
        while let Some((IgnoredAny, n)) = map.next_entry()? {
            count.add(n);
        }
        Ok(count)
    }
}

/// What the layers around a request's body record of it, which tells why reading it
/// failed: the read's error alone does not say.
struct BodyRecord {
    received: ReceivedBytes,
    charge: BodyCharge,
    limit: u64,
}

impl BodyRecord {
    fn of(request: &Request, limit: u64) -> BodyRecord {
        BodyRecord {
            received: ReceivedBytes::of(request),
            charge: BodyCharge::of(request),
            limit,
        }
    }

    /// The answer to a read that failed with `status` because of `cause`: 413 past the body
    /// limit, else 503 when the server-wide body budget could not cover it, else 499 when
    /// the client went away, else `other`.
    fn error(
        &self,
        status: StatusCode,
        cause: &(dyn std::error::Error + 'static),
        other: impl FnOnce() -> ApiError,
    ) -> ApiError {
        if status == StatusCode::PAYLOAD_TOO_LARGE
            || self.received.over_limit()
            || self.charge.too_large()
        {
            ApiError::body_too_large(self.limit)
        } else if let Some(refusal) = self.charge.refusal() {
            refusal
        } else if client_went_away(cause) {
            ApiError::ClientClosedRequest
        } else {
            other()
        }
    }
}

/// `read`, a request body's, if it ends by `deadline`; else 408: the client was still
/// sending its body (RFC 9110's Request Timeout), which is not the 504 of a model that did
/// not answer in time. The handlers' own deadline is the same instant; this one is polled
/// first (it is inside theirs), so it answers.
async fn received_by<T>(
    limits: &Limits,
    deadline: Instant,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline.into(), read)
        .await
        .map_err(|_| limits.body_timed_out())?
}

/// Runs `work` (decoding an image, or parsing a request body of up to `--max-body-bytes`:
/// tens of milliseconds of JSON) on a blocking thread, under one of the decode slots that
/// bound such work: on the runtime's threads it would hold up every other request, and the
/// probes, meanwhile.
pub async fn off_the_runtime<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = Arc::clone(&state.decode_slots)
        .acquire_owned()
        .await
        .map_err(|_| ApiError::NotReady("shutting down".into()))?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))?
}

/// The whole body, refused at once if it is in an encoding the server does not decode or
/// declares more than `--max-body-bytes`; 408 if it has not all come by `deadline`.
pub async fn read_body(
    request: Request,
    limits: &Limits,
    deadline: Instant,
) -> Result<Bytes, ApiError> {
    let limit = limits.max_body_bytes;
    refuse_undecoded(request.headers())?;
    refuse_declared_oversize(request.headers(), limit)?;
    let record = BodyRecord::of(&request, limit);
    // The router's DefaultBodyLimit bounds what this buffers.
    let read = Bytes::from_request(request, &());
    received_by(limits, deadline, async {
        read.await.map_err(|rejection| {
            record.error(rejection.status(), &rejection, || {
                ApiError::BadRequest(format!(
                    "cannot read the request body: {}",
                    rejection.body_text()
                ))
            })
        })
    })
    .await
}

async fn read_multipart(state: &AppState, request: Request) -> Result<Inputs, ApiError> {
    let limit = state.limits.max_body_bytes;
    refuse_undecoded(request.headers())?;
    refuse_declared_oversize(request.headers(), limit)?;
    let record = BodyRecord::of(&request, limit);
    let max_files = state.admission.capacity();
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|r| {
        ApiError::BadRequest(format!("invalid multipart request: {}", r.body_text()))
    })?;
    let field_error = |e: MultipartError| {
        record.error(e.status(), &e, || {
            ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
        })
    };
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(field_error)? {
        // Only file parts are images; plain form fields are ignored.
        let Some(filename) = file_name(field.headers()) else {
            continue;
        };
        if images.len() == max_files {
            return Err(ApiError::BadRequest(format!(
                "too many files: at most {max_files} per request (--queue)"
            )));
        }
        let bytes = field.bytes().await.map_err(field_error)?;
        // What a browser sends for a form's file input left empty.
        if filename.is_empty() && bytes.is_empty() {
            continue;
        }
        images.push(ImageInput {
            filename: Some(filename),
            bytes,
        });
    }
    if images.is_empty() {
        return Err(ApiError::BadRequest(
            "the multipart body has no file part (a part with a filename)".into(),
        ));
    }
    Ok(Inputs {
        images,
        multipart: true,
    })
}

/// The file name of a multipart part, from its `Content-Disposition`: RFC 5987's extended
/// `filename*=UTF-8''%C3%A9t%C3%A9.jpg` (which RFC 7578 allows senders; UTF-8 or ISO-8859-1,
/// a value not in that form taken as it is) before a plain `filename`; None for a form field.
/// Read here rather than by multer, which finds `filename` inside a quoted field name.
fn file_name(headers: &HeaderMap) -> Option<String> {
    let disposition = headers.get(header::CONTENT_DISPOSITION)?.to_str().ok()?;
    let parameters = parameters(disposition);
    let named = |wanted: &str| {
        parameters
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value.as_str())
    };
    let extended = named("filename*").map(|value| {
        let Some((charset, encoded)) = value
            .split_once('\'')
            .and_then(|(charset, rest)| Some((charset, rest.split_once('\'')?.1)))
        else {
            return value.to_owned();
        };
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
        if charset.eq_ignore_ascii_case("iso-8859-1") {
            bytes.into_iter().map(char::from).collect()
        } else {
            String::from_utf8_lossy(&bytes).into_owned()
        }
    });
    // An empty extended name says nothing: the plain one, where given, names the file.
    match (extended, named("filename")) {
        (Some(extended), plain) if !extended.is_empty() || plain.is_none() => Some(extended),
        (_, plain) => plain.map(str::to_owned),
    }
}

/// The `name=value` parameters after a header value's first `;`, values unquoted (a `;`
/// within quotes is part of the value, as an escaped `\"` is).
fn parameters(value: &str) -> Vec<(String, String)> {
    let mut parameters = Vec::new();
    let mut chars = value.chars().skip_while(|c| *c != ';').peekable();
    while chars.next().is_some() {
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ';') {
            name.push(c);
        }
        // A parameter without a value.
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    // `\"` and `\\` escaped; another `\` (a Windows path's) is itself.
                    '\\' => value.push(chars.next_if(|c| matches!(c, '"' | '\\')).unwrap_or(c)),
                    '"' => break,
                    c => value.push(c),
                }
            }
        }
        while let Some(c) = chars.next_if(|c| *c != ';') {
            value.push(c);
        }
        parameters.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    parameters
}

async fn read_json(
    state: &AppState,
    body: Bytes,
    charge: &BodyCharge,
    deadline: Instant,
) -> Result<Bytes, ApiError> {
    match off_the_runtime(state, move || parse_json(&body)).await? {
        JsonImage::Bytes(bytes) => Ok(bytes),
        // Only the URL is needed now (the body went with `parse_json`): the fetched image
        // takes the body's place in the budget (the charge grows to its size), so that an
        // image within --max-body-bytes always fits it.
        JsonImage::Url(url) => {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // The fetch may only take the request's remaining time: past it, the request
            // timed out.
            let fetched = state.fetcher.fetch(&url, remaining, charge).await;
            match fetched {
                Err(_) if Instant::now() >= deadline => Err(state.limits.timed_out()),
                other => other,
            }
        }
    }
}

/// The image a JSON body gives, or the URL to fetch it from.
enum JsonImage {
    Bytes(Bytes),
    Url(String),
}

/// `body` as the JSON of a `T`, or why not, naming where in it a value is wrong
/// (`parameters.classification: invalid value: integer \`-1\`, expected u64 at line 1
/// column 40`), as axum's `Json` names it.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| e.to_string())?;
    // Nothing but white space after it, as serde_json::from_slice requires.
    json.end().map_err(|e| e.to_string())?;
    Ok(value)
}

fn parse_json(body: &[u8]) -> Result<JsonImage, ApiError> {
    let input: JsonInput = from_json(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid JSON body: {e}; expected {{\"image\": \"<base64>\"}} or {{\"url\": \"...\"}}{}",
            image_not_json(
                body,
                "send it without `Content-Type: application/json`, or base64-encoded as \"image\""
            )
            .unwrap_or_default()
        ))
    })?;
    match (input.image, input.url) {
        (Some(image), None) => decode_base64(&image)
            .map(JsonImage::Bytes)
            .map_err(|e| ApiError::BadRequest(format!("\"image\" is not valid base64: {e}"))),
        (None, Some(url)) => Ok(JsonImage::Url(url)),
        _ => Err(ApiError::BadRequest(
            "the JSON body needs exactly one of \"image\" (base64) or \"url\"".into(),
        )),
    }
}

/// Base64 in the standard or the URL-safe alphabet, padded or not, wrapped in lines or not
/// (as `base64` and Python's `encodebytes` write it), optionally as a data URL
/// (`data:image/png;base64,...`).
pub fn decode_base64(text: &str) -> Result<Bytes, base64::DecodeError> {
    let payload = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    let compact: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url_safe = compact.iter().any(|&b| b == b'-' || b == b'_');
    let alphabet = if url_safe {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    GeneralPurpose::new(alphabet, lenient)
        .decode(&compact)
        .map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part is a file by a `filename` parameter of its own, never by text inside a quoted
    /// field name.
    #[test]
    fn a_parts_file_name_is_read_from_its_own_parameters() {
        let name = |disposition: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_DISPOSITION, disposition.parse().unwrap());
            file_name(&headers)
        };
        for (disposition, expected) in [
            (r#"form-data; name="a"; filename="x.jpg""#, Some("x.jpg")),
            ("form-data; name=a; filename=x.jpg", Some("x.jpg")),
            (r#"form-data; name="a"; filename="""#, Some("")),
            (
                r#"form-data; name="a"; filename="C:\Users\me\x.jpg""#,
                Some(r"C:\Users\me\x.jpg"),
            ),
            (
                r#"form-data; name="a"; filename="say \"hi\".jpg""#,
                Some(r#"say "hi".jpg"#),
            ),
            (
                "form-data; name=\"a\"; filename*=UTF-8''%C3%A9t%C3%A9.jpg",
                Some("été.jpg"),
            ),
            (
                "form-data; name=\"a\"; filename*=iso-8859-1''%E9t%E9.jpg",
                Some("été.jpg"),
            ),
            (
                "form-data; name=\"a\"; filename=\"ete.jpg\"; filename*=UTF-8''%C3%A9t%C3%A9.jpg",
                Some("été.jpg"),
            ),
            (
                "form-data; name=\"a\"; filename*=plain.jpg",
                Some("plain.jpg"),
            ),
            (
                "form-data; name=\"a\"; filename=\"x.jpg\"; filename*=UTF-8''",
                Some("x.jpg"),
            ),
            ("form-data; name=\"a\"; filename*=UTF-8''", Some("")),
            (r#"form-data; name="note; filename=x.jpg""#, None),
            (r#"form-data; name="my filename=x.jpg""#, None),
            (
                r#"form-data; name="a\"; filename*=UTF-8''evil.jpg; b=\"""#,
                None,
            ),
            ("form-data; flag; name=\"a\"", None),
        ] {
            assert_eq!(name(disposition).as_deref(), expected, "{disposition}");
        }
    }

    #[test]
    fn json_media_types_are_json() {
        for json in ["application/json", "text/json", "application/vnd.foo+json"] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "application/x-www-form-urlencoded",
            "image/jpeg",
            "text/plain+json",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }

    #[test]
    fn json_sent_as_an_image_names_the_content_type_it_needs() {
        let form = Some("application/x-www-form-urlencoded");
        for body in [&b"{\"image\": \"\"}"[..], b" \n [1]", b"\xEF\xBB\xBF{}"] {
            let error = refuse_json_as_image(body, form).unwrap_err().to_string();
            assert!(error.contains("looks like JSON"), "{error}");
            assert!(
                error.contains("`Content-Type: application/json`"),
                "{error}"
            );
        }
        assert!(refuse_json_as_image(b"\xff\xd8\xff", form).is_ok());
        assert!(refuse_json_as_image(b"", None).is_ok());
    }

    #[test]
    fn base64_plain_and_data_url() {
        assert_eq!(decode_base64("aGk=").unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(
            decode_base64("data:image/png;base64,aGk=").unwrap(),
            Bytes::from_static(b"hi")
        );
        assert!(decode_base64("not base64!").is_err());
    }

    #[test]
    fn json_values_are_counted_nested_ones_included() {
        let count = |numbers, others| Some(ValueCount { numbers, others });
        assert_eq!(json_value_count(b"7"), count(1, 0));
        assert_eq!(
            json_value_count(br#"{"a": [1, "x", null], "b": {"c": true}}"#),
            count(1, 6)
        );
        assert_eq!(json_value_count(b"[0,0,0,0]"), count(5, 0));
        assert_eq!(json_value_count(b"[[0,1],[2],[]]"), count(7, 0));
        assert_eq!(json_value_count(b"[[0,1],[\"x\"]]"), count(3, 3));
        assert_eq!(json_value_count(b"[0,"), None);
        assert_eq!(json_value_count(b"[] x"), None);
    }

    #[test]
    fn only_numbers_may_exceed_the_value_limit() {
        // value_limit(1) is 272 values; the array is one more number.
        let numbers = format!("[{}]", vec!["0.5"; 1000].join(","));
        assert!(refuse_too_many_json_values(numbers.as_bytes(), 1, 0).is_err());
        assert!(refuse_too_many_json_values(numbers.as_bytes(), 1, 1001).is_ok());
        assert!(refuse_too_many_json_values(numbers.as_bytes(), 1, 729).is_ok());
        assert!(refuse_too_many_json_values(numbers.as_bytes(), 1, 728).is_err());
        let objects = format!("[{}]", vec!["{}"; 1000].join(","));
        assert!(refuse_too_many_json_values(objects.as_bytes(), 1, 1000).is_err());
    }

    /// What `base64` (lines of 76), Python's `encodebytes`, `urlsafe_b64encode` and unpadded
    /// encoders write.
    #[test]
    fn base64_in_lines_url_safe_or_unpadded() {
        let bytes: Vec<u8> = (0..=255).collect();
        let standard = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let lines: Vec<&str> = standard
            .as_bytes()
            .chunks(76)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode(&bytes);
        assert!(url_safe.contains(['-', '_']));
        for text in [
            lines.join("\n") + "\n",
            lines.join("\r\n"),
            url_safe,
            standard.trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(decode_base64(&text).unwrap(), bytes, "{text}");
        }
    }
}
