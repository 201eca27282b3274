//! Network sources against servers on 127.0.0.1: Kaggle's download API and a Hugging Face
//! hub stand-in serving the routes hf-hub requests.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use common::*;
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
    assert!(err.contains("401") && err.contains("KAGGLE_KEY"), "{err}");
    assert!(!tmp.path().join("data").exists());

    let dropped = TestServer::start(|_| Reply::Drop);
    let err = fetch(&kaggle_opts(&dropped, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("download of") && err.contains("--synthetic"),
        "{err}"
    );
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

#[test]
fn a_truncated_download_resumes_with_a_range_request() {
    let body = kaggle_zip(&["forest"], 30, 0, 0);
    let half = body.len() / 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let (served, count) = (body.clone(), Arc::clone(&calls));
    let server = TestServer::start(move |r| {
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Truncated {
                declared: served.len(),
                body: served[..half].to_vec(),
            }
        } else {
            ranged(r, &served)
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(&kaggle_opts(&server, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("run again to resume"), "{err}");
    let part = tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"));
    assert_eq!(fs::metadata(&part).unwrap().len(), half as u64);
    assert!(!tmp.path().join("data").exists());

    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 30);
    let requests = server.requests();
    assert_eq!(
        requests[1].headers.get("range"),
        Some(&format!("bytes={half}-"))
    );
    assert_eq!(
        fs::read(tmp.path().join("downloads").join(ZIP_NAME)).unwrap(),
        body
    );
}

#[test]
fn a_server_without_range_support_restarts_the_download() {
    let body = kaggle_zip(&["sea"], 12, 0, 0);
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp
        .path()
        .join("downloads")
        .join(format!("{ZIP_NAME}.part"));
    // Leftover garbage from an earlier attempt; a 200 answer to the range request replaces it.
    write(&part, b"stale bytes that are not a prefix");
    let served = body.clone();
    let server = TestServer::start(move |_| Reply::ok(served.clone()));
    let m = fetch(&kaggle_opts(&server, tmp.path())).unwrap();
    assert_eq!(m.count(Split::Train) + m.count(Split::Val), 12);
    assert_eq!(
        fs::read(tmp.path().join("downloads").join(ZIP_NAME)).unwrap(),
        body
    );
    assert!(server.requests()[0].headers.contains_key("range"));
}

// ---------------------------------------------------------------------------------------
// Hugging Face

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub stand-in: the repository info, tree listing and resolve APIs. Every revision
/// resolves to `COMMIT`, and listings and downloads must ask for that commit.
fn hub(repo: &str, files: Vec<(String, Vec<u8>)>) -> TestServer {
    let info_path = format!("/api/datasets/{repo}");
    let tree_path = format!("/api/datasets/{repo}/tree/");
    let resolve = format!("/datasets/{repo}/resolve/");
    let info = format!(r#"{{"id":"{repo}","sha":"{COMMIT}"}}"#);
    TestServer::start(move |r| {
        let path = r.path.split('?').next().unwrap_or_default();
        if path == info_path || path.starts_with(&format!("{info_path}/revision/")) {
            return Reply::ok(info.clone().into_bytes())
                .with_header("Content-Type", "application/json");
        }
        if let Some(rest) = path.strip_prefix(&tree_path) {
            assert!(r.path.contains("recursive=true"), "{}", r.path);
            assert_eq!(rest, COMMIT, "the listing asks for the resolved commit");
            let entries: Vec<String> = files
                .iter()
                .map(|(name, bytes)| {
                    format!(
                        r#"{{"type":"file","oid":"oid-{name}","size":{},"path":"{name}"}}"#,
                        bytes.len()
                    )
                })
                .collect();
            return Reply::ok(format!("[{}]", entries.join(",")).into_bytes())
                .with_header("Content-Type", "application/json");
        }
        if let Some(rest) = path.strip_prefix(&resolve) {
            let (revision, file) = rest.split_once('/').unwrap_or_default();
            assert_eq!(revision, COMMIT, "downloads ask for the resolved commit");
            return match files.iter().position(|(name, _)| name == file) {
                Some(i) => Reply::ok(files[i].1.clone())
                    .with_header("ETag", &format!("\"etag{i}\""))
                    .with_header("X-Repo-Commit", COMMIT),
                None => Reply::status(404).with_header("X-Error-Code", "EntryNotFound"),
            };
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
        }),
    )
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
    write_parquet(&train, &rows);
    write_parquet(&test, &[(jpeg(90), "t.jpg".into(), Some(4))]);
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
}

#[test]
fn hugging_face_failures_are_quick_and_name_the_alternatives() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on a freed port: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = FetchOptions::new(
        tmp.path().join("data"),
        FetchSource::HuggingFace(HfOptions {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            cache_dir: Some(tmp.path().join("hf-cache")),
            ..HfOptions::default()
        }),
    );
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

    let empty = hub("someone/empty", vec![("README.md".into(), b"hi".to_vec())]);
    let err = fetch(&hf_opts(&empty, "someone/empty", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither parquet files nor a zip"), "{err}");
}

#[test]
fn a_truncated_hugging_face_file_is_not_imported_or_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = kaggle_zip(&["sea"], 5, 0, 0);
    let full = zip.len();
    let tree = format!(r#"[{{"type":"file","oid":"x","size":{full},"path":"archive.zip"}}]"#);
    let server = TestServer::start(move |r| {
        if r.path.starts_with("/api/datasets/a/b/tree/") {
            return Reply::ok(tree.clone().into_bytes());
        }
        if r.path.starts_with("/api/datasets/a/b") {
            return Reply::ok(format!(r#"{{"id":"a/b","sha":"{COMMIT}"}}"#).into_bytes());
        }
        if r.method == "HEAD" {
            return Reply::ok(Vec::new())
                .with_header("Content-Length", &full.to_string())
                .with_header("ETag", "\"e\"")
                .with_header("X-Repo-Commit", COMMIT);
        }
        Reply::Truncated {
            declared: full,
            body: zip[..full / 2].to_vec(),
        }
    });
    let err = fetch(&hf_opts(&server, "a/b", tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("archive.zip"), "{err}");
    assert!(!tmp.path().join("data").exists());
}
