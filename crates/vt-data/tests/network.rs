//! Network sources against servers on 127.0.0.1: Kaggle's download API and a Hugging Face
//! hub stand-in serving the routes hf-hub requests.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use vt_data::dataset::{Manifest, Split};
use vt_data::fetch::{fetch, FetchOptions, FetchSource};
use vt_data::hf::{HfOptions, HfRepoSpec};
use vt_data::kaggle::{KaggleCredentials, ZIP_NAME};

const KAGGLE_PATH: &str = "/api/v1/datasets/download/puneet6060/intel-image-classification";

fn credentials() -> KaggleCredentials {
    KaggleCredentials {
        username: "alice".into(),
        key: "s3cret".into(),
    }
}

fn authorised(request: &Request) -> bool {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    request.headers.get("authorization") == Some(&expected)
}

fn kaggle_opts(server: &TestServer, dir: &Path) -> FetchOptions {
    let mut opts = FetchOptions::new(
        dir.join("data"),
        FetchSource::Kaggle {
            endpoint: Some(server.url.clone()),
            credentials: Some(credentials()),
        },
    );
    opts.download_dir = Some(dir.join("downloads"));
    opts
}

#[test]
fn kaggle_download_imports_and_is_reused() {
    let body = kaggle_zip(&["forest", "sea"], 10, 2, 3);
    let served = body.clone();
    let storage = TestServer::start(move |r| {
        assert_eq!(r.path, "/storage/archive.zip");
        // Credentials must not leak to the storage host.
        assert!(!r.headers.contains_key("authorization"));
        Reply::ok(served.clone())
    });
    // Kaggle answers with a redirect to storage on another host.
    let storage_url = storage.url.clone();
    let front = TestServer::start(move |r| {
        if r.path != KAGGLE_PATH {
            return Reply::status(404);
        }
        if !authorised(r) {
            return Reply::status(401);
        }
        Reply::status(302).with_header("Location", &format!("{storage_url}/storage/archive.zip"))
    });
    let tmp = tempfile::tempdir().unwrap();
    let m = fetch(&kaggle_opts(&front, tmp.path())).unwrap();
    assert_eq!(m.source, "kaggle");
    assert_eq!(m.classes, ["forest", "sea"]);
    assert_eq!(m.splits.test["sea"], 2);
    assert_eq!(m.splits.pred, 3);
    let zip = tmp.path().join("downloads").join(ZIP_NAME);
    assert_eq!(fs::read(&zip).unwrap(), body);
    assert!(!tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"))
        .exists());
    // A second run reuses the verified download.
    let before = front.requests().len();
    let again = fetch(&kaggle_opts(&front, tmp.path())).unwrap();
    assert_eq!(again, m);
    assert_eq!(front.requests().len(), before);
    // Without credentials too: reusing it asks the server nothing.
    let mut without = kaggle_opts(&front, tmp.path());
    without.source = FetchSource::Kaggle {
        endpoint: Some(front.url.clone()),
        credentials: None,
    };
    assert_eq!(fetch(&without).unwrap(), m);
}

#[test]
fn kaggle_errors_say_what_failed_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let not_found = TestServer::start(|_| Reply::status(404));
    let err = fetch(&kaggle_opts(&not_found, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("404") && err.contains("--from PATH"), "{err}");

    let denied = TestServer::start(|r| {
        if authorised(r) {
            Reply::ok(Vec::new())
        } else {
            Reply::status(401)
        }
    });
    let mut opts = kaggle_opts(&denied, tmp.path());
    opts.source = FetchSource::Kaggle {
        endpoint: Some(denied.url.clone()),
        credentials: Some(KaggleCredentials {
            username: "alice".into(),
            key: "wrong".into(),
        }),
    };
    let err = fetch(&opts).unwrap_err().to_string();
    assert!(
        err.contains("401") && err.contains("KAGGLE_KEY") && err.contains("Check the credentials"),
        "{err}"
    );
    assert!(!tmp.path().join("data").exists());

    let dropped = TestServer::start(|_| Reply::Drop);
    let err = fetch(&kaggle_opts(&dropped, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("download of") && err.contains("--synthetic"),
        "{err}"
    );
    // A cut connection is no matter of credentials.
    assert!(!err.contains("Check the credentials"), "{err}");
    assert!(!tmp.path().join("data").exists());

    let not_zip = TestServer::start(|_| Reply::ok(b"<html>maintenance</html>".to_vec()));
    let err = fetch(&kaggle_opts(&not_zip, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a usable zip") && err.contains("run fetch-data again"),
        "{err}"
    );
    assert!(!tmp.path().join("downloads").join(ZIP_NAME).exists());
}

/// Serves the first half of a Kaggle zip as `cut` answers it (with an `ETag`), then honours
/// `Range`: the first fetch fails saying `says` and keeps the half, the second resumes from
/// it, sending the `ETag` back in `If-Range`.
fn a_cut_download_resumes(cut: fn(&[u8], usize) -> Reply, says: &str) {
    let body = kaggle_zip(&["forest", "sea"], 15, 0, 0);
    let half = body.len() / 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let (served, count) = (body.clone(), Arc::clone(&calls));
    let server = TestServer::start(move |r| {
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            cut(&served, half).with_header("ETag", "\"v1\"")
        } else {
            ranged(r, &served).with_header("ETag", "\"v1\"")
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains(says), "{err}");
    assert!(err.contains("run again to resume"), "{err}");
    let downloads = tmp.path().join("downloads");
    let part = downloads.join(format!("{ZIP_NAME}.part"));
    assert_eq!(fs::metadata(&part).unwrap().len(), half as u64);
    assert!(!tmp.path().join("data").exists());

    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 15);
    assert_eq!(
        server.requests()[1].headers.get("range"),
        Some(&format!("bytes={half}-"))
    );
    assert_eq!(
        server.requests()[1]
            .headers
            .get("if-range")
            .map(String::as_str),
        Some("\"v1\"")
    );
    assert_eq!(fs::read(downloads.join(ZIP_NAME)).unwrap(), body);
}

/// `If-Range` carries only a strong validator (RFC 9110, 13.1.5): a weak entity tag, or a
/// `Last-Modified` not a second before the answer's `Date`, resumes nothing (a server would
/// answer with the whole file anyway); a strong `Last-Modified` does.
#[test]
fn only_a_strong_validator_is_sent_to_resume() {
    const MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";
    const NOW: &str = "Sun, 06 Dec 2026 10:00:00 GMT";
    let body = kaggle_zip(&["forest", "sea"], 6, 0, 0);
    let half = body.len() / 2;
    for (validators, sent) in [
        (
            &[
                ("ETag", "W/\"w1\""),
                ("Last-Modified", MODIFIED),
                ("Date", NOW),
            ][..],
            None,
        ),
        (
            &[("Last-Modified", MODIFIED), ("Date", NOW)][..],
            Some(MODIFIED),
        ),
        (&[("Last-Modified", NOW), ("Date", NOW)][..], None),
        (&[("Last-Modified", MODIFIED)][..], None),
    ] {
        let served = body.clone();
        let server = TestServer::start(move |r| {
            validators
                .iter()
                .fold(ranged(r, &served), |reply, (name, value)| {
                    reply.with_header(name, value)
                })
        });
        let tmp = tempfile::tempdir().unwrap();
        let downloads = tmp.path().join("downloads");
        fs::create_dir_all(&downloads).unwrap();
        // What a first attempt cut at half left, with the validator it recorded.
        let cut = Arc::new(AtomicUsize::new(0));
        let first = {
            let cut = Arc::clone(&cut);
            let served = body.clone();
            TestServer::start(move |_| {
                cut.fetch_add(1, Ordering::SeqCst);
                validators.iter().fold(
                    Reply::truncated(served.len(), served[..half].to_vec()),
                    |reply, (name, value)| reply.with_header(name, value),
                )
            })
        };
        let mut opts = kaggle_opts(&first, tmp.path());
        fetch(&opts).unwrap_err();
        assert_eq!(cut.load(Ordering::SeqCst), 1);
        opts = kaggle_opts(&server, tmp.path());
        let m = fetch(&opts).unwrap();
        assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 6);
        let request = &server.requests()[0];
        let if_range = request.headers.get("if-range").map(String::as_str);
        assert_eq!(if_range, sent, "{validators:?}");
        assert_eq!(request.headers.contains_key("range"), sent.is_some());
        assert_eq!(fs::read(downloads.join(ZIP_NAME)).unwrap(), body);
    }
}

/// A server that answers a range with less than the rest (capping its ranges) leaves a
/// longer partial file to resume, never a deleted one.
#[test]
fn a_range_answered_in_part_is_resumed_again() {
    let body = kaggle_zip(&["forest", "sea"], 15, 0, 0);
    let (third, served) = (body.len() / 3, body.clone());
    let server = TestServer::start(move |r| {
        let reply = match r.headers.get("range") {
            None => Reply::truncated(served.len(), served[..third].to_vec()),
            Some(_) => {
                // At most a third of the file per answer.
                let start: usize = ranged_start(r);
                let end = (start + third).min(served.len()) - 1;
                Reply::Full {
                    status: 206,
                    headers: vec![(
                        "Content-Range".into(),
                        format!("bytes {start}-{end}/{}", served.len()),
                    )],
                    body: served[start..=end].to_vec(),
                }
            }
        };
        reply.with_header("ETag", "\"v1\"")
    });
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"));
    let err = fetch(&kaggle_opts(&server, tmp.path())).unwrap_err();
    assert!(err.to_string().contains("run again to resume"), "{err}");
    let err = fetch(&kaggle_opts(&server, tmp.path())).unwrap_err();
    assert!(err.to_string().contains("run again to resume"), "{err}");
    assert_eq!(fs::metadata(&part).unwrap().len(), 2 * third as u64);
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 15);
}

/// A server that names no validator (`ETag`, `Last-Modified`) cannot be resumed from: a cut
/// download says the next run starts over, which it does (no `Range` asked).
#[test]
fn a_cut_download_without_a_validator_says_it_starts_over() {
    let body = kaggle_zip(&["forest", "sea"], 6, 0, 0);
    let half = body.len() / 2;
    let ranges = Arc::new(AtomicUsize::new(0));
    let (served, asked) = (body.clone(), Arc::clone(&ranges));
    let calls = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&calls);
    let server = TestServer::start(move |r| {
        if r.headers.contains_key("range") {
            asked.fetch_add(1, Ordering::SeqCst);
        }
        match count.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::truncated(served.len(), served[..half].to_vec()),
            _ => Reply::ok(served.clone()),
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("run again to download it again (the server names no ETag"),
        "{err}"
    );
    assert!(!err.contains("run again to resume"), "{err}");
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 6);
    assert_eq!(ranges.load(Ordering::SeqCst), 0);
}

/// The first byte a `Range: bytes=START-` request asks for.
fn ranged_start(request: &Request) -> usize {
    let range = &request.headers["range"];
    let start = range.trim_start_matches("bytes=").trim_end_matches('-');
    start.parse().unwrap()
}

#[test]
fn a_truncated_download_resumes_with_a_range_request() {
    a_cut_download_resumes(
        |body, half| Reply::truncated(body.len(), body[..half].to_vec()),
        "run again to resume",
    );
}

/// A reply without a length that stops early looks complete to HTTP: the zip check finds it
/// is not, and the bytes are kept for the next run to resume.
#[test]
fn a_download_cut_short_without_a_length_is_kept_and_resumed() {
    a_cut_download_resumes(
        |body, half| Reply::without_length(body[..half].to_vec()),
        "without declaring a length",
    );
}

/// A complete zip that is not the data set (its central directory reads) is not a download
/// cut short: it is deleted, not kept to resume.
#[test]
fn a_complete_zip_of_other_files_without_a_length_is_deleted() {
    let other = zip_bytes(&[("sample_submission.csv".into(), b"id,label\n".to_vec())]);
    let server = TestServer::start(move |_| Reply::without_length(other.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no seg_train/<class>/<image> entries"),
        "{err}"
    );
    assert!(err.contains("the download was deleted"), "{err}");
    // Downloading again would give the same zip.
    assert!(
        err.contains("not the Intel Image Classification archive's layout"),
        "{err}"
    );
    assert!(!err.contains("run fetch-data again"), "{err}");
    let downloads = tmp.path().join("downloads");
    assert!(!downloads.join(ZIP_NAME).exists());
    assert!(!downloads.join(format!("{ZIP_NAME}.part")).exists());
}

/// Each import replaces the data directory: downloads kept inside it would be lost.
#[test]
fn downloads_may_not_be_kept_inside_the_data_dir() {
    let server = TestServer::start(|_| Reply::status(500));
    let tmp = tempfile::tempdir().unwrap();
    for inside in [
        "data/downloads",
        "data/new/../downloads",
        "elsewhere/../data/dl",
    ] {
        let mut opts = kaggle_opts(&server, tmp.path());
        opts.download_dir = Some(tmp.path().join(inside));
        let err = fetch(&opts).unwrap_err().to_string();
        assert!(err.contains("inside the data directory"), "{inside}: {err}");
    }
    assert!(!tmp.path().join("data").exists());
    // A data directory reached through a link, a download directory that goes back into
    // the link after a folder still to be made: both are where the link leads.
    #[cfg(unix)]
    {
        fs::create_dir_all(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        let mut opts = kaggle_opts(&server, tmp.path());
        opts.data_dir = tmp.path().join("link/intel");
        opts.download_dir = Some(tmp.path().join("new/../link/intel/dl"));
        let err = fetch(&opts).unwrap_err().to_string();
        assert!(err.contains("inside the data directory"), "{err}");
    }

    let hub = hub("mirror/intel", vec![]);
    let mut opts = hf_opts(&hub, "mirror/intel", tmp.path());
    if let FetchSource::HuggingFace(hf) = &mut opts.source {
        hf.cache_dir = Some(tmp.path().join("data/hf-cache"));
    }
    let err = fetch(&opts).unwrap_err().to_string();
    assert!(err.contains("the Hugging Face cache"), "{err}");
    assert!(server.requests().is_empty());
    assert!(gets(&hub).is_empty());
}

/// Bytes left by an earlier attempt whose answer named no validator (`ETag`,
/// `Last-Modified`) cannot be known to belong to the file there now: not resumed.
#[test]
fn a_partial_download_without_a_validator_starts_over() {
    let body = kaggle_zip(&["sea", "forest"], 6, 0, 0);
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"));
    write(&part, b"stale bytes that are not a prefix");
    let served = body.clone();
    let server = TestServer::start(move |_| Reply::ok(served.clone()));
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 12);
    assert_eq!(
        fs::read(tmp.path().join("downloads").join(ZIP_NAME)).unwrap(),
        body
    );
    assert!(!server.requests()[0].headers.contains_key("range"));
}

/// The file changed on the server between two runs: `If-Range` gets the whole new file,
/// never the new file's rest after the old one's first half.
#[test]
fn a_download_resumed_after_the_file_changed_starts_over() {
    let old = kaggle_zip(&["sea", "forest"], 6, 0, 0);
    let new = kaggle_zip(&["glacier", "street", "sea"], 4, 1, 0);
    let half = old.len() / 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let (served, count) = (new.clone(), Arc::clone(&calls));
    let server = TestServer::start(move |r| {
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::truncated(old.len(), old[..half].to_vec())
                .with_header("ETag", "\"old\"");
        }
        let reply = match r.headers.get("if-range").map(String::as_str) {
            Some("\"new\"") | None => ranged(r, &served),
            Some(_) => Reply::ok(served.clone()),
        };
        reply.with_header("ETag", "\"new\"")
    });
    let tmp = tempfile::tempdir().unwrap();
    assert!(fetch(&kaggle_opts(&server, tmp.path())).is_err());
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.classes, ["glacier", "sea", "street"]);
    assert_eq!(
        fs::read(tmp.path().join("downloads").join(ZIP_NAME)).unwrap(),
        new
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[1].headers.get("if-range").map(String::as_str),
        Some("\"old\"")
    );
}

/// All bytes arrived, but the run stopped before the check (here: the server declared one
/// byte more): the next run's range is past the end, and the 416 naming the size the part
/// holds means it is complete.
#[test]
fn a_complete_partial_download_is_checked_not_fetched_again() {
    let body = kaggle_zip(&["sea", "forest"], 4, 0, 0);
    let calls = Arc::new(AtomicUsize::new(0));
    let (served, count) = (body.clone(), Arc::clone(&calls));
    let server = TestServer::start(move |r| {
        let reply = if count.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::truncated(served.len() + 1, served.clone())
        } else {
            ranged(r, &served)
        };
        reply.with_header("ETag", "\"v1\"")
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("run again to resume"), "{err}");
    fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(
        fs::read(tmp.path().join("downloads").join(ZIP_NAME)).unwrap(),
        body
    );
    assert_eq!(server.requests().len(), 2, "{:?}", server.requests());
}

#[test]
fn a_kaggle_download_in_progress_is_not_joined() {
    let server = TestServer::start(|_| Reply::status(500));
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"));
    write(&part, b"");
    let other = fs::File::open(&part).unwrap();
    other.try_lock().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another fetch-data is downloading"), "{err}");
    assert!(server.requests().is_empty());
}

/// An entry that fails its CRC in an archive we downloaded is a corrupt download: deleted,
/// and the import fails, rather than importing the rest as if complete.
#[test]
fn a_kaggle_download_with_a_corrupt_entry_is_deleted() {
    let mut body = kaggle_zip(&["sea", "forest"], 3, 0, 0);
    corrupt_entry(&mut body, "seg_train/seg_train/sea/1.jpg");
    let server = TestServer::start(move |_| Reply::ok(body.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seg_train/seg_train/sea/1.jpg") && err.contains("run fetch-data again"),
        "{err}"
    );
    assert!(!tmp.path().join("downloads").join(ZIP_NAME).exists());
    assert!(!tmp.path().join("data").exists());
}

/// A downloaded archive's entry in a compression method this build does not read, or a
/// broken entry that would be left out anyway, is no corruption: the rest is imported.
#[test]
fn a_kaggle_download_with_an_unsupported_or_ignored_entry_is_imported() {
    let unsupported = "seg_train/seg_train/sea/bzip2.jpg";
    let ignored = "__MACOSX/seg_train/._notes";
    let mut entries = vec![
        (unsupported.to_string(), jpeg(90)),
        (ignored.to_string(), b"resource fork".to_vec()),
    ];
    for class in ["sea", "forest"] {
        for i in 0..3 {
            let name = format!("seg_train/seg_train/{class}/{i}.jpg");
            entries.push((name, jpeg(i + if class == "sea" { 0 } else { 10 })));
        }
    }
    let mut body = zip_bytes(&entries);
    set_compression_method(&mut body, unsupported, 12);
    break_local_header(&mut body, ignored);
    let server = TestServer::start(move |_| Reply::ok(body.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 6);
    let skipped: Vec<(&str, &str)> = m
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, unsupported);
    assert!(skipped[0].1.contains("not supported"), "{skipped:?}");
}

// ---------------------------------------------------------------------------------------
// Hugging Face

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub stand-in: the repository info, tree listing and resolve APIs. Every revision
/// resolves to `COMMIT`, and listings and downloads must ask for that commit. Downloads
/// honour `Range`.
fn hub(repo: &str, files: Vec<(String, Vec<u8>)>) -> TestServer {
    hub_with(repo, files, ranged)
}

/// [`hub`] with `get` answering downloads (given the request and the file's bytes); `HEAD`
/// requests for a file still get its headers.
fn hub_with(
    repo: &str,
    files: Vec<(String, Vec<u8>)>,
    get: impl Fn(&Request, &[u8]) -> Reply + Send + Sync + 'static,
) -> TestServer {
    hub_quirky(repo, files, Quirks::default(), get)
}

/// Ways a hub stand-in departs from the plain one.
#[derive(Default, Clone)]
struct Quirks {
    /// Bytes the listing gives beyond each file's real size.
    listed_extra: u64,
    /// Files are Xet-backed (`X-Xet-Hash` on `resolve`), stored at this CAS server URL.
    xet_cas: Option<String>,
    /// The commit every revision resolves to, in place of `COMMIT`.
    commit: Option<&'static str>,
}

/// [`hub_with`], departing from it as `quirks` says.
fn hub_quirky(
    repo: &str,
    files: Vec<(String, Vec<u8>)>,
    quirks: Quirks,
    get: impl Fn(&Request, &[u8]) -> Reply + Send + Sync + 'static,
) -> TestServer {
    let info_path = format!("/api/datasets/{repo}");
    let tree_path = format!("/api/datasets/{repo}/tree/");
    let token_path = format!("/api/datasets/{repo}/xet-read-token/");
    let resolve = format!("/datasets/{repo}/resolve/");
    let commit = quirks.commit.unwrap_or(COMMIT);
    let info = format!(r#"{{"id":"{repo}","sha":"{commit}"}}"#);
    TestServer::start(move |r| {
        let path = r.path.split('?').next().unwrap_or_default();
        if path == info_path || path.starts_with(&format!("{info_path}/revision/")) {
            return Reply::ok(info.clone().into_bytes())
                .with_header("Content-Type", "application/json");
        }
        if let (Some(cas), true) = (&quirks.xet_cas, path.starts_with(&token_path)) {
            let token = format!(r#"{{"accessToken":"t","exp":4102444800,"casUrl":"{cas}"}}"#);
            return Reply::ok(token.into_bytes()).with_header("Content-Type", "application/json");
        }
        if let Some(rest) = path.strip_prefix(&tree_path) {
            assert!(r.path.contains("recursive=true"), "{}", r.path);
            assert_eq!(rest, commit, "the listing asks for the resolved commit");
            let entries: Vec<String> = files
                .iter()
                .map(|(name, bytes)| {
                    let size = bytes.len() as u64 + quirks.listed_extra;
                    if is_lfs(name) {
                        format!(
                            r#"{{"type":"file","oid":"{}","size":{size},"path":"{name}","lfs":{{"oid":"{}","size":{size},"pointerSize":{}}}}}"#,
                            object_id(bytes),
                            sha256_hex(bytes),
                            lfs_pointer(bytes).len()
                        )
                    } else {
                        format!(
                            r#"{{"type":"file","oid":"{}","size":{size},"path":"{name}"}}"#,
                            git_blob_id(bytes.as_slice())
                        )
                    }
                })
                .collect();
            return Reply::ok(format!("[{}]", entries.join(",")).into_bytes())
                .with_header("Content-Type", "application/json");
        }
        if let Some(rest) = path.strip_prefix(&resolve) {
            let (revision, file) = rest.split_once('/').unwrap_or_default();
            assert_eq!(revision, commit, "downloads ask for the resolved commit");
            let Some(i) = files.iter().position(|(name, _)| name == file) else {
                return Reply::status(404).with_header("X-Error-Code", "EntryNotFound");
            };
            let mut reply = if r.method == "HEAD" {
                Reply::ok(files[i].1.clone())
            } else {
                get(r, &files[i].1)
            };
            if quirks.xet_cas.is_some() {
                reply = reply.with_header("X-Xet-Hash", &"ab".repeat(32));
            }
            return reply
                .with_header("ETag", &format!("\"etag{i}\""))
                .with_header("X-Repo-Commit", commit);
        }
        Reply::status(404).with_header("X-Error-Code", "RepoNotFound")
    })
}

fn hf_opts(server: &TestServer, repo: &str, dir: &Path) -> FetchOptions {
    FetchOptions::new(
        dir.join("data"),
        FetchSource::HuggingFace(HfOptions {
            repo: repo.parse::<HfRepoSpec>().unwrap(),
            endpoint: Some(server.url.clone()),
            cache_dir: Some(dir.join("hf-cache")),
            offline: Some(false),
            ..HfOptions::default()
        }),
    )
}

/// `opts` importing `repo` offline, from the cache.
fn offline(mut opts: FetchOptions, repo: &str) -> FetchOptions {
    if let FetchSource::HuggingFace(hf) = &mut opts.source {
        hf.repo = repo.parse().unwrap();
        hf.offline = Some(true);
    }
    opts
}

/// Where the hub stand-ins' files end up in the cache of [`hf_opts`].
fn snapshot(dir: &Path, repo: &str) -> std::path::PathBuf {
    dir.join("hf-cache")
        .join(format!("datasets--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hub stand-ins keep data files in LFS, as the hub does, and others in git.
fn is_lfs(name: &str) -> bool {
    name.ends_with(".zip") || name.ends_with(".parquet")
}

/// Git's id of a file of content `bytes`.
fn git_blob_id(bytes: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(format!("blob {}\0", bytes.len()));
    sha1.update(bytes);
    hex(&sha1.finalize())
}

/// What git holds of an LFS file of content `bytes`.
fn lfs_pointer(bytes: &[u8]) -> String {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        sha256_hex(bytes),
        bytes.len()
    )
}

/// The object id the hub stand-ins list for a data file of content `bytes`: its LFS
/// pointer's.
fn object_id(bytes: &[u8]) -> String {
    git_blob_id(lfs_pointer(bytes).as_bytes())
}

/// Where [`hf_opts`] caches the hub stand-ins' data file of content `bytes`, whatever its
/// commit: named by its SHA-256, as the hub's tools name an LFS file's blob.
fn blob(dir: &Path, repo: &str, bytes: &[u8]) -> std::path::PathBuf {
    repo_cache(dir, repo).join("blobs").join(sha256_hex(bytes))
}

fn repo_cache(dir: &Path, repo: &str) -> std::path::PathBuf {
    dir.join("hf-cache")
        .join(format!("datasets--{}", repo.replace('/', "--")))
}

/// The partial download of [`blob`], named by the object id the listing gives.
fn blob_part(dir: &Path, repo: &str, bytes: &[u8]) -> std::path::PathBuf {
    repo_cache(dir, repo)
        .join("blobs")
        .join(format!("{}.part", object_id(bytes)))
}

/// The download requests a hub stand-in received.
fn gets(server: &TestServer) -> Vec<Request> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/resolve/"))
        .collect()
}

#[test]
fn hugging_face_parquet_mirror_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.parquet");
    let test = tmp.path().join("test.parquet");
    let mut rows = Vec::new();
    for i in 0..24 {
        rows.push((jpeg(i as u32), format!("{i}.jpg"), Some(i % 6)));
    }
    rows.push((b"not an image".to_vec(), "bad.jpg".into(), Some(0)));
    rows.push((jpeg(77), "label-out-of-range.jpg".into(), Some(9)));
    rows.push((jpeg(78), "unlabelled.jpg".into(), None));
    write_parquet(&train, &rows, None);
    write_parquet(&test, &[(jpeg(90), "t.jpg".into(), Some(4))], None);
    let server = hub(
        "someone/intel-mirror",
        vec![
            ("README.md".into(), b"# card".to_vec()),
            (
                "data/test-00000-of-00001.parquet".into(),
                fs::read(&test).unwrap(),
            ),
            (
                "data/train-00000-of-00001.parquet".into(),
                fs::read(&train).unwrap(),
            ),
        ],
    );
    let m = fetch(&hf_opts(&server, "someone/intel-mirror@main", tmp.path())).unwrap();
    assert_eq!(m.source, "hf");
    assert_eq!(m.origin, format!("hf:someone/intel-mirror@{COMMIT}"));
    assert_eq!(
        m.classes,
        [
            "buildings",
            "forest",
            "glacier",
            "mountain",
            "sea",
            "street"
        ]
    );
    for class in &m.classes {
        assert_eq!(m.splits.train[class] + m.splits.val[class], 4, "{class}");
    }
    assert_eq!(m.splits.test["sea"], 1);
    assert_eq!(m.splits.pred, 1);
    let reasons: Vec<&str> = m.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "data/train-00000-of-00001.parquet#row24",
            "data/train-00000-of-00001.parquet#row25"
        ]
    );
    assert!(tmp.path().join("data/train/sea").is_dir());
    assert_eq!(Manifest::read(&tmp.path().join("data")).unwrap(), m);
    assert!(server.requests().iter().any(|r| r.method == "HEAD"));
}

/// The `datasets` library stores a `ClassLabel` column's names in the file: integer labels
/// index those, whatever their order, not the data set's usual one.
#[test]
fn parquet_labels_index_the_class_names_the_file_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.parquet");
    let names = ["Street", "sea", "Forest"];
    let rows: Vec<_> = (0..9)
        .map(|i| (jpeg(i as u32), format!("{i}.jpg"), Some(i % 3)))
        .collect();
    write_parquet(&train, &rows, Some(&names));
    let server = hub(
        "someone/reordered",
        vec![("data/train-0.parquet".into(), fs::read(&train).unwrap())],
    );
    let mut opts = hf_opts(&server, "someone/reordered", tmp.path());
    opts.val_fraction = 0.0;
    let m = fetch(&opts).unwrap();
    assert_eq!(m.classes, ["forest", "sea", "street"]);
    let data = tmp.path().join("data");
    // Labels 0 are street: images 0, 3 and 6.
    assert_eq!(
        sorted_names(&data.join("train/street")),
        ["0.jpg", "3.jpg", "6.jpg"]
    );
    assert_eq!(
        sorted_names(&data.join("train/forest")),
        ["2.jpg", "5.jpg", "8.jpg"]
    );
}

/// A hub stand-in holding one train and one test parquet file with string labels.
fn named_label_mirror(
    dir: &Path,
    repo: &str,
    train: &[(Vec<u8>, &str)],
    test: &[(Vec<u8>, &str)],
) -> TestServer {
    let (train_file, test_file) = (dir.join("train.parquet"), dir.join("test.parquet"));
    write_parquet_named(&train_file, train);
    write_parquet_named(&test_file, test);
    hub(
        repo,
        vec![
            (
                "data/test-00000-of-00001.parquet".into(),
                fs::read(&test_file).unwrap(),
            ),
            (
                "data/train-00000-of-00001.parquet".into(),
                fs::read(&train_file).unwrap(),
            ),
        ],
    )
}

/// Every class of the import has training images on disk, as training requires.
fn assert_every_class_trains(data: &Path, m: &Manifest) {
    for class in &m.classes {
        assert!(m.splits.train[class] > 0, "{class}: {m:?}");
        let folder = data.join("train").join(class);
        assert!(
            fs::read_dir(&folder).unwrap().next().is_some(),
            "{folder:?}"
        );
    }
}

#[test]
fn class_name_labels_in_any_case_map_to_the_known_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = ["Buildings", "FOREST", "sea", "Street"];
    let train: Vec<(Vec<u8>, &str)> = (0..12)
        .map(|i| (jpeg(i), labels[i as usize % labels.len()]))
        .collect();
    let server = named_label_mirror(
        tmp.path(),
        "someone/named-labels",
        &train,
        &[(jpeg(50), "Sea"), (jpeg(51), "buildings")],
    );
    let m = fetch(&hf_opts(&server, "someone/named-labels", tmp.path())).unwrap();
    // The data set's order; glacier and mountain have no images, so they are no classes.
    assert_eq!(m.classes, ["buildings", "forest", "sea", "street"]);
    assert_eq!(m.splits.test["sea"], 1);
    assert_eq!(m.splits.test["buildings"], 1);
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    assert_every_class_trains(&tmp.path().join("data"), &m);
}

#[test]
fn unknown_class_name_labels_become_the_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let train: Vec<(Vec<u8>, &str)> = (0..6)
        .map(|i| (jpeg(i), ["dog", "cat"][i as usize % 2]))
        .collect();
    let server = named_label_mirror(tmp.path(), "someone/pets", &train, &[(jpeg(50), "cat")]);
    let m = fetch(&hf_opts(&server, "someone/pets", tmp.path())).unwrap();
    assert_eq!(m.classes, ["cat", "dog"]);
    assert_eq!(m.splits.test["cat"], 1);
    assert_every_class_trains(&tmp.path().join("data"), &m);
}

#[test]
fn hugging_face_zip_mirror_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let server = hub(
        "mirror/intel",
        vec![(
            "archive.zip".into(),
            kaggle_zip(&["glacier", "street"], 5, 1, 2),
        )],
    );
    let m = fetch(&hf_opts(&server, "mirror/intel", tmp.path())).unwrap();
    assert_eq!(m.classes, ["glacier", "street"]);
    assert_eq!(m.splits.pred, 2);
    assert!(m.origin.contains("mirror/intel"));

    // Without the hub, an offline import is suggested, and imports the same commit (from an
    // endpoint where nothing listens).
    let unreachable = || {
        let mut opts = unreachable_hub(tmp.path()).1;
        if let FetchSource::HuggingFace(hf) = &mut opts.source {
            hf.repo = "mirror/intel".parse().unwrap();
        }
        opts
    };
    let err = fetch(&unreachable()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "An earlier download of mirror/intel@main (commit {COMMIT}) is in the cache: run \
             this fetch-data again with HF_HUB_OFFLINE=1 set"
        )),
        "{err}"
    );
    let again = fetch(&offline(unreachable(), "mirror/intel")).unwrap();
    assert_eq!((again.classes, again.origin), (m.classes, m.origin));

    // Offline, a revision never downloaded is not there; the archive is named for --from.
    let err = fetch(&offline(unreachable(), "mirror/intel@v2"))
        .unwrap_err()
        .to_string();
    let cached = snapshot(tmp.path(), "mirror/intel").join("archive.zip");
    for needed in [
        "HF_HUB_OFFLINE is set".to_string(),
        "holds no download of v2".into(),
        format!("fetch-data --from {} imports it", cached.display()),
        "Unset HF_HUB_OFFLINE".into(),
    ] {
        assert!(err.contains(&needed), "{err}");
    }
    let m = fetch(&FetchOptions::new(
        tmp.path().join("data"),
        FetchSource::Path(cached),
    ))
    .unwrap();
    assert_eq!(m.classes, ["glacier", "street"]);
}

/// The cache is laid out as the hub's tools lay it out: a blob per content (named by its git
/// object id), linked from each commit's snapshot, and a ref per revision. A file unchanged at
/// a new commit is not downloaded again.
#[test]
fn a_file_unchanged_at_a_new_commit_is_not_downloaded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 1, 0);
    let first = hub("a/b", vec![("archive.zip".into(), zip.clone())]);
    fetch(&hf_opts(&first, "a/b@v1", tmp.path())).unwrap();
    let repo_dir = tmp.path().join("hf-cache/datasets--a--b");
    assert_eq!(
        fs::read_to_string(repo_dir.join("refs/v1")).unwrap(),
        COMMIT
    );
    let link = snapshot(tmp.path(), "a/b").join("archive.zip");
    assert_eq!(
        fs::read_link(&link).unwrap(),
        Path::new("../../blobs").join(sha256_hex(&zip))
    );
    assert_eq!(fs::read(blob(tmp.path(), "a/b", &zip)).unwrap(), zip);

    let next = "fedcba9876543210fedcba9876543210fedcba98";
    let quirks = Quirks {
        commit: Some(next),
        ..Quirks::default()
    };
    let second = hub_quirky(
        "a/b",
        vec![("archive.zip".into(), zip.clone())],
        quirks,
        ranged,
    );
    let m = fetch(&hf_opts(&second, "a/b@v1", tmp.path())).unwrap();
    assert_eq!(m.origin, format!("hf:a/b@{next}"));
    assert!(gets(&second).is_empty(), "{:?}", gets(&second));
    assert_eq!(fs::read_to_string(repo_dir.join("refs/v1")).unwrap(), next);
    let moved = repo_dir.join("snapshots").join(next).join("archive.zip");
    assert_eq!(fs::read(&moved).unwrap(), zip);
}

/// A snapshot file an earlier version of vt wrote in place (no blob) is still reused.
#[test]
fn a_snapshot_file_without_a_blob_is_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 0, 0);
    write(&snapshot(tmp.path(), "a/b").join("archive.zip"), &zip);
    let server = hub("a/b", vec![("archive.zip".into(), zip)]);
    fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    assert!(!server
        .requests()
        .iter()
        .any(|r| r.path.contains("/resolve/")));
}

/// What `huggingface_hub` downloaded (its blob named by the SHA-256, the commit's listing in
/// `trees/`) is imported offline, and reused online at another commit.
#[cfg(unix)]
#[test]
fn the_python_tools_download_is_imported_offline_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 1, 0);
    let repo = repo_cache(tmp.path(), "a/b");
    write(&blob(tmp.path(), "a/b", &zip), &zip);
    let link = snapshot(tmp.path(), "a/b").join("archive.zip");
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(Path::new("../../blobs").join(sha256_hex(&zip)), &link).unwrap();
    write(&repo.join("refs/main"), COMMIT.as_bytes());
    let listing = format!(
        r#"{{"format_version": 1, "files": {{"archive.zip": {{"size": {}, "blob_id": "{}", "lfs_sha256": "{}", "lfs_size": {0}}}}}}}"#,
        zip.len(),
        object_id(&zip),
        sha256_hex(&zip)
    );
    write(
        &repo.join(format!("trees/{COMMIT}.json")),
        listing.as_bytes(),
    );
    let offline_import = fetch(&offline(unreachable_hub(tmp.path()).1, "a/b")).unwrap();
    assert_eq!(offline_import.origin, format!("hf:a/b@{COMMIT}"));

    let next = "fedcba9876543210fedcba9876543210fedcba98";
    let quirks = Quirks {
        commit: Some(next),
        ..Quirks::default()
    };
    let server = hub_quirky(
        "a/b",
        vec![("archive.zip".into(), zip.clone())],
        quirks,
        ranged,
    );
    // What vt had of it before, and of a file no longer listed: no longer needed.
    let part = blob_part(tmp.path(), "a/b", &zip);
    write(&part, &zip[..10]);
    let unlisted = repo.join(format!("blobs/{}.part", "ab".repeat(20)));
    write(&unlisted, b"old");
    // A killed fetch's temporary, and one a fetch beside this one is writing.
    let killed = repo.join(".vt.tmp-7-0123456789abcdef");
    write(&killed, b"old");
    fs::File::options()
        .write(true)
        .open(&killed)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    let writing = repo.join(".vt.tmp-8-0123456789abcdef");
    write(&writing, b"new");
    fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    assert!(gets(&server).is_empty(), "{:?}", gets(&server));
    assert!(!part.exists() && !unlisted.exists());
    assert!(!killed.exists() && writing.exists());
    assert_eq!(
        fs::read_link(repo.join("snapshots").join(next).join("archive.zip")).unwrap(),
        Path::new("../../blobs").join(sha256_hex(&zip))
    );
}

/// Offline, a snapshot is imported only when the commit's listing says it is whole: a file
/// fetched alone (as `hf_hub_download` does), or whose blob is gone, is no data set.
#[test]
fn an_incomplete_snapshot_is_not_imported_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 1, 0);
    let server = hub("a/b", vec![("archive.zip".into(), zip.clone())]);
    fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    fs::remove_file(blob(tmp.path(), "a/b", &zip)).unwrap();
    let err = fetch(&offline(hf_opts(&server, "a/b", tmp.path()), "a/b"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("the download of commit {COMMIT} in "))
            && err.contains("is incomplete: archive.zip is missing"),
        "{err}"
    );

    fs::remove_dir_all(repo_cache(tmp.path(), "a/b").join("vt-trees")).unwrap();
    write(&blob(tmp.path(), "a/b", &zip), &zip);
    let err = fetch(&offline(hf_opts(&server, "a/b", tmp.path()), "a/b"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("holds no complete download of commit {COMMIT}")),
        "{err}"
    );
    // An intact archive is offered to import as it is, a cut one is not.
    assert!(err.contains("imports it without the hub"), "{err}");
    write(&blob(tmp.path(), "a/b", &zip), &zip[..zip.len() / 2]);
    let err = fetch(&offline(hf_opts(&server, "a/b", tmp.path()), "a/b"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("imports it without the hub"), "{err}");
}

/// Offline, a cached archive of the listed size that does not read as a zip is deleted, and
/// the error says a fresh copy needs the hub (another offline run would find none).
#[test]
fn a_damaged_archive_found_offline_says_to_go_online() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 1, 0);
    let server = hub("a/b", vec![("archive.zip".into(), zip.clone())]);
    fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    let blob = blob(tmp.path(), "a/b", &zip);
    write(&blob, &vec![0; zip.len()]);
    let err = fetch(&offline(hf_opts(&server, "a/b", tmp.path()), "a/b"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("run fetch-data without HF_HUB_OFFLINE for a fresh one"),
        "{err}"
    );
    assert!(
        !err.contains("run fetch-data again for a fresh copy"),
        "{err}"
    );
    assert!(!blob.exists());
}

/// Bytes damaged on the way (the right length, but not the object the listing names) are
/// neither kept nor imported.
#[test]
fn a_download_that_is_not_the_listed_object_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 0, 0);
    let server = hub_with(
        "a/b",
        vec![("archive.zip".into(), zip.clone())],
        |_, body| {
            let mut damaged = body.to_vec();
            let last = damaged.len() - 1;
            damaged[last] ^= 1;
            Reply::ok(damaged)
        },
    );
    let err = fetch(&hf_opts(&server, "a/b", tmp.path()))
        .unwrap_err()
        .to_string();
    for needed in [
        format!("git object id {}", object_id(&zip)),
        "damaged on the way".into(),
        "was deleted".into(),
    ] {
        assert!(err.contains(&needed), "{err}");
    }
    assert!(!blob_part(tmp.path(), "a/b", &zip).exists());
    assert!(!blob(tmp.path(), "a/b", &zip).exists());
    assert!(!snapshot(tmp.path(), "a/b").exists());
    assert!(!tmp.path().join("data").exists());
}

/// Offline, a parquet mirror is imported from the snapshot its revision's ref names, with
/// nothing asked of the hub; without a download of that revision, nothing is imported.
#[test]
fn hf_hub_offline_imports_the_cached_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<_> = (0..12)
        .map(|i| (jpeg(i as u32), format!("{i}.jpg"), Some(i % 6)))
        .collect();
    let train = tmp.path().join("train.parquet");
    write_parquet(&train, &rows, None);
    let server = hub(
        "m/p",
        vec![(
            "data/train-00000-of-00001.parquet".into(),
            fs::read(&train).unwrap(),
        )],
    );
    let online = fetch(&hf_opts(&server, "m/p", tmp.path())).unwrap();
    let asked = server.requests().len();

    let cached = offline(hf_opts(&server, "m/p", tmp.path()), "m/p");
    assert_eq!(fetch(&cached).unwrap(), online);
    assert_eq!(server.requests().len(), asked);

    let never = offline(hf_opts(&server, "m/p", tmp.path()), "m/never");
    let err = fetch(&never).unwrap_err().to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE is set") && err.contains("holds no download of main"),
        "{err}"
    );
    assert_eq!(server.requests().len(), asked);
    assert_eq!(Manifest::read(&tmp.path().join("data")).unwrap(), online);
}

/// The data set's archive is the one zip with training images; other zips are left out,
/// and two archives of images are refused rather than imported twice.
#[test]
fn a_hugging_face_repository_with_other_zips_imports_its_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = zip_bytes(&[("sample_submission.csv".into(), b"id,label\n".to_vec())]);
    let archive = kaggle_zip(&["glacier", "street"], 5, 1, 2);
    let server = hub(
        "mirror/intel",
        vec![
            ("archive.zip".into(), archive.clone()),
            ("sample_submission.zip".into(), sample.clone()),
        ],
    );
    let m = fetch(&hf_opts(&server, "mirror/intel", tmp.path())).unwrap();
    assert_eq!(m.classes, ["glacier", "street"]);
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 10);
    // Both stay cached: neither is a broken download.
    assert!(snapshot(tmp.path(), "mirror/intel")
        .join("sample_submission.zip")
        .is_file());
    // Offline, the archive alone is enough (as a snapshot_download of it alone leaves it).
    fs::remove_file(blob(tmp.path(), "mirror/intel", &sample)).unwrap();
    let again = fetch(&offline(
        hf_opts(&server, "mirror/intel", tmp.path()),
        "mirror/intel",
    ))
    .unwrap();
    assert_eq!(again.count(Split::Train) + again.count(Split::Val), 10);

    let server = hub(
        "mirror/twice",
        vec![
            ("archive.zip".into(), archive.clone()),
            ("copy.zip".into(), archive),
        ],
    );
    let err = fetch(&hf_opts(&server, "mirror/twice", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds 2 archives of training images"), "{err}");
    assert!(err.contains("\"archive.zip\", \"copy.zip\""), "{err}");

    // An archive split into parts: importing its training part alone would lose the rest.
    let server = hub(
        "mirror/parts",
        vec![
            ("seg_train.zip".into(), kaggle_zip(&["sea"], 4, 0, 0)),
            ("seg_test.zip".into(), kaggle_zip(&["sea"], 0, 2, 0)),
        ],
    );
    let err = fetch(&hf_opts(&server, "mirror/parts", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seg_test.zip in mirror/parts holds seg_test"),
        "{err}"
    );

    let server = hub("mirror/none", vec![("sample.zip".into(), sample)]);
    let err = fetch(&hf_opts(&server, "mirror/none", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none is the Intel Image Classification archive"),
        "{err}"
    );
}

/// A hub endpoint where nothing listens (a freed port: connection refused), and fetch
/// options that import from it into `dir`.
fn unreachable_hub(dir: &Path) -> (String, FetchOptions) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let opts = FetchOptions::new(
        dir.join("data"),
        FetchSource::HuggingFace(HfOptions {
            endpoint: Some(endpoint.clone()),
            cache_dir: Some(dir.join("hf-cache")),
            offline: Some(false),
            ..HfOptions::default()
        }),
    );
    (endpoint, opts)
}

#[test]
fn hugging_face_failures_are_quick_and_name_the_alternatives() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = unreachable_hub(tmp.path()).1;
    let start = Instant::now();
    let err = fetch(&opts).unwrap_err().to_string();
    assert!(start.elapsed().as_secs() < 15, "took {:?}", start.elapsed());
    for alternative in ["--from PATH", "--source kaggle", "--synthetic"] {
        assert!(err.contains(alternative), "{err}");
    }
    assert!(!tmp.path().join("data").exists());

    let server = hub("someone/other", Vec::new());
    let err = fetch(&hf_opts(&server, "someone/missing", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("someone/missing") && err.contains("--hf-repo"),
        "{err}"
    );
    // A gated repository's conditions are accepted on its page, which is named.
    let page = format!(
        "conditions accepted at {}/datasets/someone/missing",
        server.url
    );
    let with_token = format!("its conditions at {}/datasets/someone/missing", server.url);
    assert!(err.contains(&page) || err.contains(&with_token), "{err}");

    let down = TestServer::start(|_| Reply::status(503).with_header("Retry-After", "30"));
    let err = fetch(&hf_opts(&down, "someone/down", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("The hub is unavailable for now: wait"),
        "{err}"
    );

    let empty = hub("someone/empty", vec![("README.md".into(), b"hi".to_vec())]);
    let err = fetch(&hf_opts(&empty, "someone/empty", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither parquet files nor a zip"), "{err}");
}

/// Serves the first download cut off after `half` bytes (with the full `Content-Length`),
/// and later ones with `then`.
fn cut_once(
    half: usize,
    then: impl Fn(&Request, &[u8]) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Request, &[u8]) -> Reply + Send + Sync + 'static {
    let calls = AtomicUsize::new(0);
    move |r, body| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::truncated(body.len(), body[..half].to_vec())
        } else {
            then(r, body)
        }
    }
}

#[test]
fn an_interrupted_hugging_face_download_resumes_with_a_range_request() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 8, 2, 3);
    let half = zip.len() / 2;
    let server = hub_with(
        "a/b",
        vec![("archive.zip".into(), zip.clone())],
        cut_once(half, ranged),
    );
    let err = fetch(&hf_opts(&server, "a/b", tmp.path()))
        .unwrap_err()
        .to_string();
    for needed in ["archive.zip", "a/b", "run fetch-data again to resume"] {
        assert!(err.contains(needed), "{err}");
    }
    assert!(!tmp.path().join("data").exists());
    let cached = snapshot(tmp.path(), "a/b").join("archive.zip");
    let part = blob_part(tmp.path(), "a/b", &zip);
    assert_eq!(fs::metadata(&part).unwrap().len(), half as u64);

    let m = fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 8);
    assert_eq!(m.splits.train["sea"] + m.splits.val["sea"], 8);
    assert_eq!((m.splits.test["forest"], m.splits.test["sea"]), (2, 2));
    assert_eq!(m.splits.pred, 3);
    let requests = gets(&server);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].headers.get("range"), None);
    assert_eq!(
        requests[1].headers.get("range"),
        Some(&format!("bytes={half}-{}", zip.len() - 1))
    );
    assert_eq!(fs::read(&cached).unwrap(), zip);
    assert!(!part.exists());

    // A later run reuses the cached archive.
    assert_eq!(fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap(), m);
    assert_eq!(gets(&server).len(), 2);
}

#[test]
fn a_hub_that_ignores_range_sends_the_whole_file_again() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["glacier", "sea"], 5, 1, 0);
    let half = zip.len() / 2;
    let server = hub_with(
        "a/b",
        vec![("archive.zip".into(), zip.clone())],
        cut_once(half, |_, body| Reply::ok(body.to_vec())),
    );
    assert!(fetch(&hf_opts(&server, "a/b", tmp.path())).is_err());
    let m = fetch(&hf_opts(&server, "a/b", tmp.path())).unwrap();
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 10);
    assert_eq!(m.splits.test["glacier"], 1);
    assert_eq!(
        fs::read(snapshot(tmp.path(), "a/b").join("archive.zip")).unwrap(),
        zip
    );
    // The answer to the range request was the whole file: dropped, and fetched from byte 0.
    let ranges: Vec<Option<String>> = gets(&server)
        .into_iter()
        .map(|r| r.headers.get("range").cloned())
        .collect();
    assert_eq!(
        ranges,
        [None, Some(format!("bytes={half}-{}", zip.len() - 1)), None]
    );
}

#[test]
fn a_hugging_face_download_in_progress_is_not_joined() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["sea"], 3, 0, 0);
    let server = hub("a/b", vec![("archive.zip".into(), zip.clone())]);
    let part = blob_part(tmp.path(), "a/b", &zip);
    write(&part, b"");
    let other = fs::File::open(&part).unwrap();
    other.try_lock().unwrap();
    let err = fetch(&hf_opts(&server, "a/b", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another fetch-data") && err.contains("archive.zip"),
        "{err}"
    );
    assert!(gets(&server).is_empty());
}

/// The commit the hub names becomes a folder of the cache: one that is no commit id (here
/// one climbing out of the cache) is refused before anything is written.
#[test]
fn a_hub_commit_that_is_not_a_commit_id_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["sea", "forest"], 2, 0, 0);
    let escape = "../../../../escaped";
    let server = TestServer::start(move |r| {
        let body = if r.path.starts_with("/api/datasets/a/b/tree/") {
            format!(
                r#"[{{"type":"file","oid":"x","size":{},"path":"archive.zip"}}]"#,
                zip.len()
            )
            .into_bytes()
        } else if r.path.contains("/resolve/") {
            zip.clone()
        } else {
            format!(r#"{{"id":"a/b","sha":"{escape}"}}"#).into_bytes()
        };
        Reply::ok(body).with_header("Content-Type", "application/json")
    });
    let err = fetch(&hf_opts(&server, "a/b", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("a/b") && err.contains(escape), "{err}");
    assert!(gets(&server).is_empty());
    assert!(!tmp.path().join("escaped").exists());
}

/// A mirror's `seg_test-*` files are the test split and `seg_pred-*` unlabelled; a split
/// name not known is refused rather than merged into training.
#[test]
fn parquet_split_names_are_recognised_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, rows: &[(Vec<u8>, String, Option<i64>)]| {
        let path = tmp.path().join(name);
        write_parquet(&path, rows, None);
        fs::read(path).unwrap()
    };
    let train: Vec<_> = (0..6)
        .map(|i| (jpeg(i as u32), format!("{i}.jpg"), Some(i % 2)))
        .collect();
    let train = file("train", &train);
    let test = file("test", &[(jpeg(50), "t.jpg".into(), Some(1))]);
    let pred = file("pred", &[(jpeg(60), "p.jpg".into(), None)]);
    let server = hub(
        "m/seg",
        vec![
            ("data/seg_pred-00000-of-00001.parquet".into(), pred),
            ("data/seg_test-00000-of-00001.parquet".into(), test.clone()),
            (
                "data/seg_train-00000-of-00001.parquet".into(),
                train.clone(),
            ),
        ],
    );
    let m = fetch(&hf_opts(&server, "m/seg", tmp.path())).unwrap();
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 6);
    assert_eq!(m.splits.test["forest"], 1);
    assert_eq!(m.splits.pred, 1);

    let server = hub(
        "m/odd",
        vec![
            ("data/extra-0.parquet".into(), test),
            ("data/train-0.parquet".into(), train),
        ],
    );
    let err = fetch(&hf_opts(&server, "m/odd", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data/extra-0.parquet") && err.contains("seg_test"),
        "{err}"
    );
    assert!(gets(&server).is_empty());
}

#[test]
fn a_hub_that_never_answers_fails_within_the_read_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        // Held open, never answered.
        let mut held = Vec::new();
        for stream in listener.incoming() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(1);
    let opts = FetchOptions::new(
        tmp.path().join("data"),
        FetchSource::HuggingFace(HfOptions {
            repo: "someone/silent".parse().unwrap(),
            endpoint: Some(url),
            cache_dir: Some(tmp.path().join("hf-cache")),
            read_timeout: Some(timeout),
            offline: Some(false),
        }),
    );
    let start = Instant::now();
    let err = fetch(&opts).unwrap_err().to_string();
    let took = start.elapsed();
    // One attempt and one retry, each cut off by the read timeout (and not waiting longer:
    // the bound leaves a loaded machine room).
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert!(took >= timeout * 2 && took < timeout * 8, "took {took:?}");
    for needed in ["someone/silent", "timed out", "--synthetic"] {
        assert!(err.contains(needed), "{err}");
    }
    assert!(!tmp.path().join("data").exists());
}

// ---------------------------------------------------------------------------------------
// What downloads tell the user

/// Everything this test binary logs at `info` and above, for the tests of what a download
/// says; a global subscriber, as downloads log from threads of their own.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .try_init();
        logs
    })
    .clone()
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(logs: &std::sync::Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

/// Both sources say where a download starts, and from which byte it resumes (the progress
/// bar beside these lines draws only on a terminal).
#[test]
fn downloads_say_where_they_resume() {
    let logs = captured_logs();
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 7, 1, 0);
    let (half, len) = (zip.len() / 2, zip.len());
    let server = hub_with(
        "progress/hf",
        vec![("archive.zip".into(), zip)],
        cut_once(half, ranged),
    );
    fetch(&hf_opts(&server, "progress/hf", tmp.path())).unwrap_err();
    fetch(&hf_opts(&server, "progress/hf", tmp.path())).unwrap();
    let text = logged(&logs);
    for line in [
        format!("downloading archive.zip from progress/hf ({len} bytes)"),
        format!("resuming archive.zip from progress/hf at byte {half} of {len}"),
    ] {
        assert!(text.contains(&line), "{line}: {text}");
    }

    let body = kaggle_zip(&["forest", "glacier"], 9, 0, 0);
    let (half, len) = (body.len() / 2, body.len());
    let served = body.clone();
    let calls = AtomicUsize::new(0);
    let server = TestServer::start(move |r| {
        let reply = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::truncated(served.len(), served[..half].to_vec())
        } else {
            ranged(r, &served)
        };
        reply.with_header("ETag", "\"v1\"")
    });
    fetch(&kaggle_opts(&server, tmp.path())).unwrap_err();
    fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    let text = logged(&logs);
    for line in [
        format!("downloading {ZIP_NAME} ({len} bytes)"),
        format!("resuming {ZIP_NAME} at byte {half} of {len}"),
    ] {
        assert!(text.contains(&line), "{line}: {text}");
    }
}

fn with_read_timeout(mut opts: FetchOptions, timeout: Duration) -> FetchOptions {
    if let FetchSource::HuggingFace(hf) = &mut opts.source {
        hf.read_timeout = Some(timeout);
    }
    opts
}

/// hf-hub fetches a Xet-backed file (`X-Xet-Hash` on `resolve`) through its Xet client, which
/// retries a failing storage server for minutes and waits on a silent one as long: the read
/// timeout bounds it all the same, and the run says to resume.
#[test]
fn a_stalled_xet_download_fails_within_the_read_timeout() {
    let zip = kaggle_zip(&["sea", "forest"], 2, 0, 0);
    let failing = TestServer::start(|_| Reply::status(500));
    let silent = TestServer::start(|_| Reply::Hang);
    for cas in [&failing, &silent] {
        let tmp = tempfile::tempdir().unwrap();
        let quirks = Quirks {
            xet_cas: Some(cas.url.clone()),
            ..Quirks::default()
        };
        let server = hub_quirky(
            "x/y",
            vec![("archive.zip".into(), zip.clone())],
            quirks,
            ranged,
        );
        let timeout = Duration::from_secs(1);
        let opts = with_read_timeout(hf_opts(&server, "x/y", tmp.path()), timeout);
        let start = Instant::now();
        let err = fetch(&opts).unwrap_err().to_string();
        let took = start.elapsed();
        assert!(took < timeout * 8, "took {took:?}: {err}");
        for needed in ["nothing arrived for 1 s", "run fetch-data again to resume"] {
            assert!(err.contains(needed), "{err}");
        }
        // Through Xet indeed: the storage server was asked, the hub's resolve never.
        assert!(!cas.requests().is_empty());
        assert!(gets(&server).is_empty());
        assert!(blob_part(tmp.path(), "x/y", &zip).exists());
    }
}

/// A hub that answers a range with the whole file's length (`X-Linked-Size` on a 206) is not
/// resumed from: the run starts over, and its error says so rather than "run again to resume".
#[test]
fn a_hub_that_will_not_resume_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 6, 0, 0);
    let (half, len) = (zip.len() / 2, zip.len());
    let server = hub_with(
        "a/linked",
        vec![("archive.zip".into(), zip)],
        move |r, body| match r.headers.get("range") {
            Some(_) => ranged(r, body).with_header("X-Linked-Size", &len.to_string()),
            None => Reply::truncated(len, body[..half].to_vec()),
        },
    );
    let err = fetch(&hf_opts(&server, "a/linked", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("run fetch-data again to resume"), "{err}");
    let err = fetch(&hf_opts(&server, "a/linked", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("would not resume from byte {half}")) && err.contains("started over"),
        "{err}"
    );
    assert!(!err.contains("run fetch-data again to resume"), "{err}");
}

/// A partial file already holding all the hub has, while its listing gives more: the range
/// request gets 416 on every run. The part is emptied, and the error says so.
#[test]
fn a_range_the_hub_refuses_empties_the_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 3, 0, 0);
    let part = blob_part(tmp.path(), "a/short", &zip);
    write(&part, &zip);
    let quirks = Quirks {
        listed_extra: 10,
        ..Quirks::default()
    };
    let server = hub_quirky("a/short", vec![("archive.zip".into(), zip)], quirks, ranged);
    let err = fetch(&hf_opts(&server, "a/short", tmp.path()))
        .unwrap_err()
        .to_string();
    for needed in ["416", "was emptied", "from the start"] {
        assert!(err.contains(needed), "{err}");
    }
    assert_eq!(fs::metadata(&part).unwrap().len(), 0);
}

/// A body that fails after every listed byte arrived (here: one byte more declared) is a
/// complete download, imported (the import verifies the zip).
#[test]
fn a_download_that_fails_after_its_last_byte_is_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["forest", "sea"], 4, 1, 0);
    let server = hub_with(
        "a/over",
        vec![("archive.zip".into(), zip.clone())],
        |_, body| Reply::truncated(body.len() + 1, body.to_vec()),
    );
    let m = fetch(&hf_opts(&server, "a/over", tmp.path())).unwrap();
    assert_eq!(m.splits.test["sea"], 1);
    assert_eq!(
        fs::read(snapshot(tmp.path(), "a/over").join("archive.zip")).unwrap(),
        zip
    );
}

/// 429: wait and retry, and on the hub, a token raises the limit.
#[test]
fn rate_limits_say_to_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let server = hub_with(
        "a/busy",
        vec![("archive.zip".into(), kaggle_zip(&["sea"], 2, 0, 0))],
        |_, _| Reply::status(429).with_header("Retry-After", "1"),
    );
    let err = fetch(&hf_opts(&server, "a/busy", tmp.path()))
        .unwrap_err()
        .to_string();
    for needed in ["wait 1 s", "HF_TOKEN raises the hub's rate limit"] {
        assert!(err.contains(needed), "{err}");
    }

    let server = TestServer::start(|_| Reply::status(429).with_header("Retry-After", "30"));
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("429") && err.contains("wait 30 s"), "{err}");
    // And a server down for maintenance, likewise.
    let server = TestServer::start(|_| Reply::status(503).with_header("Retry-After", "120"));
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("503") && err.contains("unavailable for now: wait 120 s"),
        "{err}"
    );
}

/// Network errors name the URL once, not once in the message and again in its cause.
#[test]
fn network_errors_name_the_url_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (endpoint, hf) = unreachable_hub(tmp.path());
    let err = fetch(&hf).unwrap_err().to_string();
    assert_eq!(err.matches(&format!("{endpoint}/api/")).count(), 1, "{err}");

    let dropped = TestServer::start(|_| Reply::Drop);
    let err = fetch(&kaggle_opts(&dropped, tmp.path()))
        .unwrap_err()
        .to_string();
    assert_eq!(err.matches(KAGGLE_PATH).count(), 1, "{err}");
}

/// `--data-dir .` puts the default download folder inside it: the error names that default,
/// not a `--download-dir` the user never passed.
#[test]
fn a_default_download_folder_inside_the_data_dir_is_named_as_such() {
    let server = TestServer::start(|_| Reply::status(500));
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = kaggle_opts(&server, tmp.path());
    opts.data_dir = ".".into();
    opts.download_dir = None;
    let err = fetch(&opts).unwrap_err().to_string();
    assert!(
        err.starts_with("the default download folder") && err.contains("--download-dir DIR"),
        "{err}"
    );
    assert!(server.requests().is_empty());
}
