//! Resumable HTTP download: streams into `<dest>.part`, continues with a `Range` request
//! when the server honours it and its file is unchanged (`If-Range` with the validator kept
//! in `<dest>.part.validator`; otherwise starts over), and renames to `dest` only once the
//! whole body arrived and passed the caller's check.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, CONTENT_RANGE, DATE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
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

/// A download's progress: one log line as it starts (whether it resumes, from which byte),
/// then a bar on stderr with bytes, rate and ETA. indicatif draws nothing when stderr is not a
/// terminal, so logs and tests see the line alone.
pub struct Progress(ProgressBar);

impl Progress {
    /// `total` is the file's size when known; `from` the bytes already held.
    pub fn start(what: &str, total: Option<u64>, from: u64) -> Progress {
        let size = total.map_or_else(|| "size unknown".to_string(), |t| format!("{t} bytes"));
        if from > 0 {
            let of = total.map_or_else(String::new, |t| format!(" of {t}"));
            tracing::info!("resuming {what} at byte {from}{of}");
        } else {
            tracing::info!("downloading {what} ({size})");
        }
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total),
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ),
            None => (ProgressBar::new_spinner(), "{msg} {bytes} {bytes_per_sec}"),
        };
        // The template is a constant: should it not parse, the default style still shows bytes.
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let bar = bar.with_message(what.to_string()).with_position(from);
        // The bytes held were not received now: they must not count in the rate.
        bar.reset_eta();
        Progress(bar)
    }

    pub fn add(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    /// `read`, counting what is read from it.
    pub fn reader<R: io::Read>(&self, read: R) -> impl io::Read {
        self.0.wrap_read(read)
    }
}

/// What to fetch and how to explain failures.
pub struct Download<'a> {
    pub url: &'a str,
    /// HTTP basic auth (user, password).
    pub auth: Option<(&'a str, &'a str)>,
    /// Appended to every error: what the user can do instead.
    pub hint: &'a str,
    /// Put before `hint` when the server refuses access (401, 403).
    pub access_hint: &'a str,
}

/// Opens the partial download `part` for appending, locked for as long as the file lives,
/// so that two runs sharing a download folder never write one file; `what` names the
/// download in the error when another run holds it.
pub fn open_locked(part: &Path, what: &str) -> Result<File> {
    let busy = || DataError::Network {
        what: what.to_string(),
        message: format!("another fetch-data is downloading {}", part.display()),
        hint: "Wait for it to finish, then run fetch-data again.".into(),
    };
    let io = |e| DataError::io(part, e);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(busy()),
        Err(TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {}: {e}; not guarding against a concurrent download",
                part.display()
            );
            return Ok(file);
        }
    }
    // The run that held the lock may have finished, renaming the file to its final name,
    // between the open and the lock: writing on would overwrite the finished download.
    let locked = same_file::Handle::from_file(file.try_clone().map_err(io)?).map_err(io)?;
    if same_file::Handle::from_path(part).ok().as_ref() != Some(&locked) {
        return Err(busy());
    }
    Ok(file)
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

    /// `from` > 0 resumes, only while the file still matches `validator`: a server whose file
    /// changed answers `If-Range` with the whole new file instead of the rest of the old one.
    fn request(&self, client: &Client, from: u64, validator: Option<&str>) -> Result<Response> {
        let mut req = client.get(self.url);
        if let Some((user, password)) = self.auth {
            req = req.basic_auth(user, Some(password));
        }
        if let (true, Some(validator)) = (from > 0, validator) {
            req = req
                .header(RANGE, format!("bytes={from}-"))
                .header(IF_RANGE, validator);
        }
        // `what` names the URL already.
        req.send()
            .map_err(|e| self.fail(error_chain(&e.without_url())))
    }

    /// Downloads to `dest`, returning its size in bytes. `check` is run on the complete
    /// download before it takes its name. A download that fails it is deleted, unless the
    /// server declared no length: then the connection may have been cut, and it is kept to
    /// be resumed. `<dest>.part` is locked throughout: two runs sharing the download folder
    /// would otherwise write into one file.
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
        let sidecar = validator_path(&part);
        let file = open_locked(&part, &format!("download of {}", self.url))?;
        let restart = || -> Result<()> {
            file.set_len(0).map_err(|e| DataError::io(&part, e))?;
            remove_if_exists(&sidecar)
        };
        let mut have = file.metadata().map_err(|e| DataError::io(&part, e))?.len();
        let saved = if have > 0 {
            Resume::read(&sidecar)
        } else {
            None
        };
        if have > 0 && saved.is_none() {
            // Nothing tells whether the server's file is still the one these bytes began.
            tracing::info!("no validator for {}; restarting", part.display());
            restart()?;
            have = 0;
        }
        let validator = saved.as_ref().map(|s| s.validator.as_str());
        let mut response = self.request(client, have, validator)?;
        let mut status = response.status();
        if have > 0 && status == StatusCode::RANGE_NOT_SATISFIABLE {
            if content_total(&response) == Some(have) {
                // Everything arrived before; only the check and the rename are left.
                return self.complete(&part, &sidecar, dest, have, true, check);
            }
            // The partial file is not a prefix of what is there now: start over.
            tracing::info!("server refused to resume {}; restarting", self.url);
            restart()?;
            have = 0;
            response = self.request(client, 0, None)?;
            status = response.status();
        }
        self.accept(&response)?;
        let resumed = have > 0
            && status == StatusCode::PARTIAL_CONTENT
            && resume_offset(&response) == Some(have)
            && saved.as_ref().is_none_or(|s| s.continued_by(&response));
        if have > 0 && !resumed {
            tracing::info!("server did not resume {}; restarting", self.url);
            restart()?;
            have = 0;
            // A 200 is the whole file; a 206 of another range or total is no use.
            if status != StatusCode::OK {
                response = self.request(client, 0, None)?;
                status = response.status();
                self.accept(&response)?;
            }
        }
        if !resumed {
            write_resume(Resume::of(&response).as_ref(), &sidecar)?;
        }
        let start = have;
        // A 206 may hold less than the rest (a server capping ranges): what is missing is
        // resumed by the next run, as after a cut connection.
        let expected = match status {
            StatusCode::PARTIAL_CONTENT => content_total(&response),
            _ => response.content_length().map(|n| n + start),
        };
        let name = dest.file_name().map(|n| n.to_string_lossy());
        let progress = Progress::start(name.as_deref().unwrap_or(self.url), expected, start);
        let mut writer = Watched {
            inner: BufWriter::with_capacity(1 << 20, &file),
            failed: false,
        };
        let copied = io::copy(&mut progress.reader(&mut response), &mut writer);
        // Flushed even on failure, so the next run resumes from everything received.
        let flushed = writer.flush();
        let disk_failed = writer.failed;
        drop(writer);
        let received = start + copied.as_ref().map_or(0, |n| *n);
        let total = file.metadata().map(|m| m.len()).unwrap_or(received);
        if let Err(e) = copied {
            if disk_failed {
                return Err(DataError::io(&part, e));
            }
            return Err(self.fail(format!(
                "connection lost after {total} bytes ({}); {}",
                error_chain(&e),
                run_again(&sidecar)
            )));
        }
        flushed.map_err(|e| DataError::io(&part, e))?;
        if let Some(expected) = expected {
            if total != expected {
                return Err(self.fail(format!(
                    "truncated: received {total} of {expected} bytes; {}",
                    run_again(&sidecar)
                )));
            }
        }
        self.complete(&part, &sidecar, dest, total, expected.is_some(), check)
    }

    fn accept(&self, response: &Response) -> Result<()> {
        let status = response.status();
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(DataError::Network {
                what: format!("download of {} failed", self.url),
                message: format!("access denied (HTTP {status})"),
                hint: format!("{} {}", self.access_hint, self.hint),
            }),
            StatusCode::NOT_FOUND => Err(self.fail("not found (HTTP 404)")),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                let wait = match response.headers().get(RETRY_AFTER).map(|v| v.to_str()) {
                    Some(Ok(secs)) if secs.parse::<u64>().is_ok() => format!("{secs} s"),
                    Some(Ok(date)) => format!("until {date}"),
                    _ => "a while".to_string(),
                };
                let (message, why) = if status == StatusCode::TOO_MANY_REQUESTS {
                    ("too many requests", "limits how often it may be asked")
                } else {
                    ("service unavailable", "is unavailable for now")
                };
                Err(DataError::Network {
                    what: format!("download of {} failed", self.url),
                    message: format!("{message} (HTTP {status})"),
                    hint: format!(
                        "The server {why}: wait {wait}, then run fetch-data again. {}",
                        self.hint
                    ),
                })
            }
            other => Err(self.fail(format!("server answered HTTP {other}"))),
        }
    }

    /// Checks the `total` bytes of `part` and renames it to `dest`; `sized` says whether the
    /// server declared their length (else a failed check may be a cut connection).
    fn complete(
        &self,
        part: &Path,
        sidecar: &Path,
        dest: &Path,
        total: u64,
        sized: bool,
        check: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<u64> {
        if let Err(e) = check(part) {
            if sized {
                let _ = fs::remove_file(part);
                let _ = fs::remove_file(sidecar);
                return Err(e);
            }
            return Err(self.fail(format!(
                "the server sent {total} bytes without declaring a length, and they fail the \
                 check ({e}): the connection may have been cut. They are kept in {}; {}",
                part.display(),
                run_again(sidecar)
            )));
        }
        // On disk before it takes its name, which says it is complete.
        fs::File::open(part)
            .and_then(|file| file.sync_all())
            .map_err(|e| DataError::io(part, e))?;
        fs::rename(part, dest).map_err(|e| DataError::io(dest, e))?;
        remove_if_exists(sidecar)?;
        Ok(total)
    }
}

/// What a partial download was begun from: the validator (`ETag`, else `Last-Modified`)
/// that `If-Range` sends back, and the total size, when the first answer gave them.
struct Resume {
    validator: String,
    total: Option<u64>,
}

impl Resume {
    /// `None` when the answer has no validator that `If-Range` may carry: such a download is
    /// not resumed.
    fn of(response: &Response) -> Option<Resume> {
        let validator = strong_validator(response.headers())?;
        let total = match response.status() {
            StatusCode::PARTIAL_CONTENT => content_total(response),
            _ => response.content_length(),
        };
        Some(Resume { validator, total })
    }

    /// Whether `response` (a 206) continues the file this download began: of the same
    /// total size and, when it names its entity tag, the same tag.
    fn continued_by(&self, response: &Response) -> bool {
        let tag = response.headers().get(ETAG).and_then(|t| t.to_str().ok());
        let same_tag =
            tag.is_none_or(|tag| !self.validator.starts_with('"') || tag == self.validator);
        let same_total = self.total.is_none() || self.total == content_total(response);
        same_tag && same_total
    }

    /// Line one the total (empty when unknown), line two the validator.
    fn read(path: &Path) -> Option<Resume> {
        let text = fs::read_to_string(path).ok()?;
        let (total, validator) = text.split_once('\n')?;
        let validator = validator.trim_end_matches('\n');
        if validator.is_empty() {
            return None;
        }
        Some(Resume {
            validator: validator.to_string(),
            total: total.parse().ok(),
        })
    }
}

/// The validator `If-Range` may send back (RFC 9110, 13.1.5): a strong entity tag, else,
/// without any tag, a `Last-Modified` at least a second before the answer's `Date`. A weak
/// tag (`W/"..."`) is none: a server compares it by the strong function and would send the
/// whole file each time.
fn strong_validator(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tag) = headers.get(ETAG) {
        let tag = tag.to_str().ok()?;
        return (!tag.starts_with("W/")).then(|| tag.to_string());
    }
    let modified = text(LAST_MODIFIED)?;
    let date = httpdate::parse_http_date(text(DATE)?).ok()?;
    let strong = httpdate::parse_http_date(modified)
        .ok()?
        .checked_add(Duration::from_secs(1))
        .is_some_and(|later| later <= date);
    strong.then(|| modified.to_string())
}

/// A writer that remembers whether a write failed: a failed copy is then the disk's fault
/// (full, say), not the connection's.
struct Watched<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf);
        self.failed |= written.is_err();
        written
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let written = self.inner.write_all(buf);
        self.failed |= written.is_err();
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Records `resume` at `path`, through a temporary file renamed into place, so a crash
/// leaves the old record or the new one, never half of one; `None` removes any old record.
fn write_resume(resume: Option<&Resume>, path: &Path) -> Result<()> {
    let Some(resume) = resume else {
        return remove_if_exists(path);
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let total = resume.total.map(|t| t.to_string()).unwrap_or_default();
    fs::write(&tmp, format!("{total}\n{}\n", resume.validator))
        .map_err(|e| DataError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// What the next run does with a partial download whose validator is kept at `sidecar` (if
/// the server gave one): resume it, or start over.
fn run_again(sidecar: &Path) -> &'static str {
    if sidecar.is_file() {
        "run again to resume"
    } else {
        "run again to download it again (the server names no ETag or Last-Modified by which \
         a download may resume)"
    }
}

/// `<dest>.part.validator`, beside the partial file it describes.
fn validator_path(part: &Path) -> PathBuf {
    let mut name = part.as_os_str().to_owned();
    name.push(".validator");
    PathBuf::from(name)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataError::io(path, e)),
        _ => Ok(()),
    }
}

/// The total size from `Content-Range: bytes START-END/TOTAL` or `bytes */TOTAL`.
fn content_total(response: &Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    value.rsplit('/').next()?.trim().parse().ok()
}

/// The first byte offset of a `206` response, from `Content-Range: bytes START-END/TOTAL`.
fn resume_offset(response: &Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy that fails on writing (a full disk) is told from one that fails on reading (a
    /// lost connection).
    #[test]
    fn a_failed_write_is_told_from_a_failed_read() {
        let mut disk = [0u8; 4];
        let mut full = Watched {
            inner: &mut disk[..],
            failed: false,
        };
        assert!(io::copy(&mut &b"0123456789"[..], &mut full).is_err());
        assert!(full.failed);

        struct Cut;
        impl io::Read for Cut {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        let mut fine = Watched {
            inner: Vec::new(),
            failed: false,
        };
        assert!(io::copy(&mut Cut, &mut fine).is_err());
        assert!(!fine.failed);
        let full_disk = DataError::io("a.part", io::ErrorKind::StorageFull.into());
        assert!(
            full_disk.to_string().contains("free space there"),
            "{full_disk}"
        );
    }
}
