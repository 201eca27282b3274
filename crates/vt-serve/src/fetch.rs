//! `{"url": ...}` inputs: fetched only from the hosts of `--allow-url-fetch`, redirects
//! included, with the request body's size limit and the request's deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use reqwest::{redirect, Client, Url};
use vt_data::download::error_chain;

use crate::body_budget::BodyCharge;
use crate::error::ApiError;

const MAX_REDIRECTS: usize = 5;

/// The redirect policy's refusal of a URL that the client could not have asked for (a host
/// outside `--allow-url-fetch`, a scheme other than http and https): refused (400) as that
/// URL is, not a failed fetch (502).
#[derive(Debug, thiserror::Error)]
#[error("redirect to {0} {1}")]
struct RedirectRefused(Url, &'static str);

pub struct UrlFetcher {
    client: Client,
    allowed: Arc<Vec<String>>,
    max_bytes: u64,
}

impl UrlFetcher {
    /// `allowed` holds `host` or `host:port` entries, compared case-insensitively.
    pub fn new(allowed: &[String], max_bytes: u64) -> reqwest::Result<UrlFetcher> {
        let allowed: Arc<Vec<String>> = Arc::new(
            allowed
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        );
        let policy_allowed = Arc::clone(&allowed);
        let policy = redirect::Policy::custom(move |attempt| {
            // `previous` holds the URL first asked for too.
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if !is_fetchable(attempt.url().scheme()) {
                let refused = RedirectRefused(attempt.url().clone(), "is not http or https");
                attempt.error(refused)
            } else if is_allowed(&policy_allowed, attempt.url()) {
                attempt.follow()
            } else {
                let refused = RedirectRefused(attempt.url().clone(), "leaves the allowed hosts");
                attempt.error(refused)
            }
        });
        let client = Client::builder().redirect(policy).build()?;
        Ok(UrlFetcher {
            client,
            allowed,
            max_bytes,
        })
    }

    pub fn is_enabled(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// The body at `url`, charged to the request's `charge` as it arrives (the charge grows
    /// to its size): a fetched image takes from `--max-inflight-body-bytes` as an uploaded
    /// one does.
    pub async fn fetch(
        &self,
        url: &str,
        timeout: Duration,
        charge: &BodyCharge,
    ) -> Result<Bytes, ApiError> {
        if !self.is_enabled() {
            return Err(ApiError::UrlFetchRefused(
                "URL inputs are disabled; start the server with --allow-url-fetch HOST,... to enable them".into(),
            ));
        }
        let shown = shortened(url);
        let parsed = Url::parse(url)
            .map_err(|e| ApiError::BadRequest(format!("invalid url `{shown}`: {e}")))?;
        if !is_fetchable(parsed.scheme()) {
            return Err(ApiError::UrlFetchRefused(format!(
                "only http and https URLs can be fetched, not `{}`",
                shortened(parsed.scheme())
            )));
        }
        if !is_allowed(&self.allowed, &parsed) {
            return Err(ApiError::UrlFetchRefused(format!(
                "`{}` is not in --allow-url-fetch",
                shortened(&host_and_port(&parsed))
            )));
        }
        let failed = |e: reqwest::Error| {
            let mut refused = false;
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(error) = cause {
                refused |= error.is::<RedirectRefused>();
                cause = error.source();
            }
            // Nothing was sent: a URL that parses but that no request can carry (longer than
            // HTTP's 64 KiB).
            let unsendable = e.is_builder();
            // Its causes too: reqwest's own message says only "error sending request" (and
            // the whole URL, named here by its start).
            let cause = shortened(&error_chain(&e.without_url()));
            if unsendable {
                ApiError::BadRequest(format!("invalid url `{shown}`: {cause}"))
            } else if refused {
                ApiError::UrlFetchRefused(format!("fetching {shown}: {cause}"))
            } else {
                ApiError::UrlFetchFailed(format!("fetching {shown}: {cause}"))
            }
        };
        let mut response = self
            .client
            .get(parsed.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(failed)?;
        // A redirect the client did not follow: reqwest follows none to another scheme.
        let elsewhere = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|location| parsed.join(location.to_str().ok()?).ok())
            .filter(|location| {
                response.status().is_redirection() && !is_fetchable(location.scheme())
            });
        if let Some(location) = elsewhere {
            return Err(ApiError::UrlFetchRefused(format!(
                "fetching {shown}: redirect to `{}`, which is not http or https",
                shortened(location.as_str())
            )));
        }
        if !response.status().is_success() {
            return Err(ApiError::UrlFetchFailed(format!(
                "fetching {shown}: the server answered {}",
                response.status()
            )));
        }
        let too_large = || ApiError::PayloadTooLarge {
            what: "the image the URL gives",
            limit: self.max_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(too_large());
        }
        // The buffer is charged for what it allocates, not only the bytes received: grown by
        // doubling, it holds up to twice those. It grows no further than the length the
        // server declares, so that an honest one is held once.
        let declared = response.content_length().unwrap_or(self.max_bytes);
        let most = usize::try_from(declared.min(self.max_bytes)).unwrap_or(usize::MAX);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            let length = body.len() + chunk.len();
            if length as u64 > self.max_bytes {
                return Err(too_large());
            }
            if length > body.capacity() {
                let grown = length.max(most.min(body.capacity().saturating_mul(2)));
                charge.cover(grown)?;
                body.reserve_exact(grown - body.len());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }
}

/// `text`'s first 200 characters, and `...` when there are more: what the client sent
/// (a URL, or a part of one, or where a redirect sends it) is named by its start, so that
/// an answer and a log line need not be as large as the request.
fn shortened(text: &str) -> String {
    const SHOWN: usize = 200;
    let mut start: String = text.chars().take(SHOWN).collect();
    if text.chars().nth(SHOWN).is_some() {
        start.push_str("...");
    }
    start
}

fn is_fetchable(scheme: &str) -> bool {
    matches!(scheme, "http" | "https")
}

/// The URL's `host:port`, as `--allow-url-fetch` entries are written: the host alone would
/// read as refused although it is allowed on another port.
fn host_and_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

fn is_allowed(allowed: &[String], url: &Url) -> bool {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    let with_port = url
        .port_or_known_default()
        .map(|port| format!("{host}:{port}"));
    allowed
        .iter()
        .any(|entry| *entry == host || with_port.as_deref() == Some(entry.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_with_or_without_port() {
        let allowed = vec!["images.example".to_owned(), "127.0.0.1:9000".to_owned()];
        let ok = |u: &str| is_allowed(&allowed, &Url::parse(u).unwrap());
        assert!(ok("https://IMAGES.example/cat.jpg"));
        assert!(ok("http://images.example:8080/cat.jpg"));
        assert!(ok("http://127.0.0.1:9000/a.png"));
        assert!(!ok("http://127.0.0.1:9001/a.png"));
        assert!(!ok("http://images.example.evil/cat.jpg"));
        assert!(!ok("http://evil/images.example"));
    }

    #[test]
    fn refusals_name_the_host_and_port() {
        let named = |u: &str| host_and_port(&Url::parse(u).unwrap());
        assert_eq!(named("http://127.0.0.1:9001/a.png"), "127.0.0.1:9001");
        assert_eq!(
            named("https://Images.example/cat.jpg"),
            "images.example:443"
        );
        assert_eq!(named("http://[::1]:8080/"), "[::1]:8080");
    }

    /// An invalid URL is named by its start: the answer is not as large as the request.
    #[tokio::test]
    async fn an_invalid_url_is_named_by_its_start() {
        let fetcher = UrlFetcher::new(&["images.example".to_owned()], 1 << 20).unwrap();
        let url = format!("not a url {}", "x".repeat(1 << 16));
        let err = fetcher
            .fetch(&url, Duration::from_secs(1), &BodyCharge::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid url `not a url xxx"), "{err}");
        assert!(err.len() < 400, "{} bytes", err.len());
        // A long scheme or host alike.
        let long = "h".repeat(1 << 16);
        for url in [format!("{long}:x"), format!("http://{long}/")] {
            let err = fetcher
                .fetch(&url, Duration::from_secs(1), &BodyCharge::default())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.len() < 400, "{} bytes", err.len());
        }
    }
}
