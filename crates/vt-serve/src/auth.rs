//! `--api-key`: the inference and model routes answer only requests that carry
//! `Authorization: Bearer KEY` (TorchServe's token authorization; tritonclient and KServe's
//! clients send it as a header or gRPC metadata). The health and readiness probes,
//! `/metrics` and the page stay open: orchestrators and scrapers call them without
//! credentials.

use std::convert::Infallible;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::handlers;
use crate::state::AppState;

/// A key as given on the command line or in the environment, not yet checked: clap's own
/// refusal of a value would print it. Printed redacted.
#[derive(Clone)]
pub struct GivenKey(pub String);

impl fmt::Debug for GivenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GivenKey(..)")
    }
}

impl FromStr for GivenKey {
    type Err = Infallible;

    fn from_str(key: &str) -> Result<GivenKey, Infallible> {
        Ok(GivenKey(key.to_owned()))
    }
}

/// The key requests must present. Printed redacted, so that it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// A key as given: printable ASCII without spaces, as a header value carries it intact,
    /// after the trailing line break that secrets (files, and variables made from them)
    /// often end with. The refusal never quotes the key.
    pub fn parse(key: &str) -> Result<ApiKey, String> {
        let key = key.trim_end_matches(['\n', '\r']);
        if key.is_empty() {
            return Err("the API key is empty (unset it to serve without one)".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "an API key is printable ASCII without spaces (it travels in a header)".into(),
            );
        }
        Ok(ApiKey(key.to_owned()))
    }

    /// The key in `path` ([`ApiKey::parse`]).
    pub fn read(path: &Path) -> Result<ApiKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        ApiKey::parse(&text)
    }

    /// Whether `headers` carry `Authorization: Bearer KEY` (the scheme in any case and the
    /// spaces after it as RFC 9110 has them), compared in time independent of where a
    /// wrong key differs.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let Some((scheme, token)) = value.as_bytes().split_at_checked(6) else {
            return false;
        };
        let spaces = token.iter().take_while(|b| **b == b' ').count();
        scheme.eq_ignore_ascii_case(b"bearer")
            && spaces > 0
            && same_bytes(&token[spaces..], self.0.as_bytes())
    }
}

/// Equality that reads every byte whatever the first difference, so that the answer's
/// timing does not tell an attacker how much of a guess was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The 401 of a request without the key (or with another).
pub fn refusal(headers: &HeaderMap) -> ApiError {
    ApiError::Unauthorized(if headers.contains_key(header::AUTHORIZATION) {
        "the request's Authorization header does not hold this server's API key".into()
    } else {
        "this server needs its API key: send Authorization: Bearer KEY".into()
    })
}

/// Lets through requests that carry the key (all of them when the server has none); answers
/// the others 401 in the shape of the protocol of their route.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match &state.api_key {
        Some(key) if !key.admits(request.headers()) => {
            handlers::error_for_path(request.uri().path(), refusal(request.headers()))
        }
        _ => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_the_bearer_key_is_admitted() {
        let key = ApiKey::parse("s3cret-Key_1").unwrap();
        for admitted in [
            "Bearer s3cret-Key_1",
            "bearer s3cret-Key_1",
            "BEARER s3cret-Key_1",
            "Bearer  s3cret-Key_1",
        ] {
            assert!(key.admits(&with_authorization(admitted)), "{admitted}");
        }
        for refused in [
            "Bearer s3cret-Key_2",
            "Bearer s3cret-Key_",
            "Bearer s3cret-Key_12",
            "Bearers3cret-Key_1",
            "Basic s3cret-Key_1",
            "s3cret-Key_1",
            "Bearer",
            "",
        ] {
            assert!(!key.admits(&with_authorization(refused)), "{refused:?}");
        }
        assert!(!key.admits(&HeaderMap::new()));
        assert_eq!(format!("{key:?}"), "ApiKey(..)");
    }

    #[test]
    fn keys_are_printable_without_spaces() {
        for bad in ["", "\n", "two words", "tab\there", "é", "trailing "] {
            let refusal = ApiKey::parse(bad).unwrap_err();
            assert!(bad.trim().is_empty() || !refusal.contains(bad), "{refusal}");
        }
        assert_eq!(
            ApiKey::parse("from-a-variable\r\n").unwrap(),
            ApiKey::parse("from-a-variable").unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-a-file\n").unwrap();
        assert_eq!(
            ApiKey::read(&file).unwrap(),
            ApiKey::parse("from-a-file").unwrap()
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(ApiKey::read(&file).unwrap_err().contains("empty"));
        let missing = ApiKey::read(&dir.path().join("missing")).unwrap_err();
        assert!(!missing.is_empty());
    }
}
