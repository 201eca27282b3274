//! Resumable HTTP download: streams into `<dest>.part`, continues with a `Range` request
//! when the server honours it (otherwise starts over), and renames to `dest` only once the
//! whole body arrived and passed the caller's check.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::error::{DataError, Result};

/// Unreachable hosts should fail in seconds, not minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for response headers or for any single read of the body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub fn http_client() -> Result<Client> {
    Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(READ_TIMEOUT)
        .user_agent(concat!("vt-data/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DataError::Network {
            what: "cannot set up the HTTP client".into(),
            message: e.to_string(),
            hint: String::new(),
        })
}

/// What to fetch and how to explain failures.
pub struct Download<'a> {
    pub url: &'a str,
    /// HTTP basic auth (user, password).
    pub auth: Option<(&'a str, &'a str)>,
    /// Appended to every error: what the user can do instead.
    pub hint: &'a str,
}

pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// The full chain of causes, which reqwest hides behind "error sending request".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Download<'_> {
    fn fail(&self, message: impl Into<String>) -> DataError {
        DataError::Network {
            what: format!("download of {} failed", self.url),
            message: message.into(),
            hint: self.hint.to_string(),
        }
    }

    fn request(&self, client: &Client, from: u64) -> Result<Response> {
        let mut req = client.get(self.url);
        if let Some((user, password)) = self.auth {
            req = req.basic_auth(user, Some(password));
        }
        if from > 0 {
            req = req.header(RANGE, format!("bytes={from}-"));
        }
        req.send().map_err(|e| self.fail(error_chain(&e)))
    }

    /// Downloads to `dest`, returning its size in bytes. `check` is run on the complete
    /// download before it takes its name. A download that fails it is deleted, unless the
    /// server declared no length: then the connection may have been cut, and it is kept to
    /// be resumed.
    pub fn run(
        &self,
        client: &Client,
        dest: &Path,
        check: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<u64> {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        let part = part_path(dest);
        let mut have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let mut response = self.request(client, have)?;
        let mut status = response.status();
        if have > 0 && status == StatusCode::RANGE_NOT_SATISFIABLE {
            // The partial file is not a prefix of what is there now: start over.
            tracing::info!("server refused to resume {}; restarting", self.url);
            have = 0;
            response = self.request(client, 0)?;
            status = response.status();
        }
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.fail(format!("access denied (HTTP {status})")))
            }
            StatusCode::NOT_FOUND => return Err(self.fail("not found (HTTP 404)")),
            other => return Err(self.fail(format!("server answered HTTP {other}"))),
        }
        let resumed =
            status == StatusCode::PARTIAL_CONTENT && resume_offset(&response) == Some(have);
        let start = if resumed { have } else { 0 };
        if have > 0 && !resumed {
            tracing::info!("server does not support resuming {}; restarting", self.url);
        }
        let expected = response.content_length().map(|n| n + start);
        let file = if resumed {
            OpenOptions::new().append(true).open(&part)
        } else {
            File::create(&part)
        }
        .map_err(|e| DataError::io(&part, e))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let copied = io::copy(&mut response, &mut writer);
        // Flushed even on failure, so the next run resumes from everything received.
        let flushed = writer.flush();
        let received = start + copied.as_ref().map_or(0, |n| *n);
        let total = fs::metadata(&part).map(|m| m.len()).unwrap_or(received);
        if let Err(e) = copied {
            return Err(self.fail(format!(
                "connection lost after {total} bytes ({}); run again to resume",
                error_chain(&e)
            )));
        }
        flushed.map_err(|e| DataError::io(&part, e))?;
        if let Some(expected) = expected {
            if total != expected {
                return Err(self.fail(format!(
                    "truncated: received {total} of {expected} bytes; run again to resume"
                )));
            }
        }
        if let Err(e) = check(&part) {
            if expected.is_some() {
                let _ = fs::remove_file(&part);
                return Err(e);
            }
            return Err(self.fail(format!(
                "the server sent {total} bytes without declaring a length, and they fail the \
                 check ({e}): the connection may have been cut. They are kept in {}: run again \
                 to resume",
                part.display()
            )));
        }
        fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))?;
        Ok(total)
    }
}

/// The first byte offset of a `206` response, from `Content-Range: bytes START-END/TOTAL`.
fn resume_offset(response: &Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}
