//! The data set from a Hugging Face dataset repository, through `hf-hub` (which honours
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`; downloads are cached there and reused).
//!
//! Two repository shapes are understood:
//! - parquet files as the `datasets` library writes them (`image` struct `{bytes, path}`,
//!   integer `label` in the order buildings, forest, glacier, mountain, sea, street, or
//!   the class name); the split comes from the file name (`train-*`, `test-*`, `pred-*`;
//!   anything else joins the training pool);
//! - a zip of the Kaggle archive, imported like `--from archive.zip`.
//!
//! The default repository holds the Kaggle archive unchanged (`archive.zip`, 363 MB, the
//! official seg_train/seg_test/seg_pred folders). The parquet mirrors on the hub that we
//! know of merge all three folders into one `train` split, which would lose the official
//! test split.
//!
//! The revision (a branch, tag or commit; `main` unless given) is resolved to its commit
//! first, every file is downloaded at that commit, and the manifest's `origin` names it:
//! an import never mixes two states of the repository, and `--hf-repo OWNER/NAME@COMMIT`
//! repeats it exactly.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFClientSync};

use crate::download::{error_chain, CONNECT_TIMEOUT, READ_TIMEOUT};
use crate::error::{DataError, Result};
use crate::import::Importer;
use crate::source::parquet::{import_parquet, ParquetSplit};
use crate::source::synthetic::CLASSES;
use crate::source::zip::{import_zip, note_discarded_download};

pub const DEFAULT_REPO: &str = "miladfa7/Intel-Image-Classification";

const ALTERNATIVES: &str = "Other sources: --from PATH (the Kaggle zip or an extracted folder), \
--source kaggle (needs a Kaggle API token), --synthetic (generated offline demo data).";

/// `OWNER/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfRepoSpec {
    pub owner: String,
    pub name: String,
    pub revision: Option<String>,
}

impl Default for HfRepoSpec {
    fn default() -> Self {
        HfRepoSpec {
            owner: DEFAULT_REPO.split('/').next().unwrap_or_default().into(),
            name: DEFAULT_REPO.split('/').nth(1).unwrap_or_default().into(),
            revision: None,
        }
    }
}

impl FromStr for HfRepoSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
            Some(_) => {
                return Err(DataError::Invalid(format!(
                    "{s:?}: empty revision after '@'"
                )))
            }
            None => (s, None),
        };
        match repo.split_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(HfRepoSpec {
                    owner: owner.into(),
                    name: name.into(),
                    revision,
                })
            }
            _ => Err(DataError::Invalid(format!(
                "{s:?}: expected a dataset repository as OWNER/NAME or OWNER/NAME@REVISION"
            ))),
        }
    }
}

impl std::fmt::Display for HfRepoSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)?;
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct HfOptions {
    pub repo: HfRepoSpec,
    /// Overrides `HF_ENDPOINT` (tests point it at a local server).
    pub endpoint: Option<String>,
    /// Overrides the hub cache (`HF_HOME/hub`).
    pub cache_dir: Option<PathBuf>,
}

fn client(opts: &HfOptions) -> Result<HFClientSync> {
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("vt-data/", env!("CARGO_PKG_VERSION"), "; hf-hub/1"))
        .build()
        .map_err(|e| hub_error(opts, "cannot set up the HTTP client", &e))?;
    let mut builder = HFClient::builder()
        .client(http)
        // One quick retry: an unreachable hub must fail fast, not back off for minutes.
        .retry_max_attempts(1)
        .retry_base_delay(Duration::from_millis(200));
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(dir) = &opts.cache_dir {
        builder = builder.cache_dir(dir.clone());
    }
    builder
        .build_sync()
        .map_err(|e| hub_error(opts, "cannot set up the Hugging Face client", &e))
}

fn endpoint_of(opts: &HfOptions) -> String {
    opts.endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// Error texts that mean a wrong repository or missing access rather than no network.
const ACCESS_PROBLEMS: [&str; 6] = [
    "401",
    "403",
    "404",
    "authentication",
    "forbidden",
    "not found",
];

fn hub_error(opts: &HfOptions, what: &str, e: &dyn std::error::Error) -> DataError {
    let message = error_chain(e);
    let mut hint = String::new();
    let lower = message.to_ascii_lowercase();
    if ACCESS_PROBLEMS.iter().any(|s| lower.contains(s)) {
        hint.push_str(
            "Check the repository name and revision (--hf-repo OWNER/NAME[@REV]); a private or \
             gated repository needs HF_TOKEN. ",
        );
    }
    hint.push_str(ALTERNATIVES);
    DataError::Network {
        what: format!("{what} ({} at {})", opts.repo, endpoint_of(opts)),
        message,
        hint,
    }
}

/// Downloads the repository's data files and feeds them to `importer`.
pub fn import_hf(opts: &HfOptions, importer: &mut Importer) -> Result<()> {
    let client = client(opts)?;
    let repo = client.dataset(opts.repo.owner.clone(), opts.repo.name.clone());
    let info = repo
        .info()
        .maybe_revision(opts.repo.revision.clone())
        .send()
        .map_err(|e| hub_error(opts, "cannot read the dataset repository", &e))?;
    let commit = info.sha.ok_or_else(|| DataError::Network {
        what: format!("resolving {} at {}", opts.repo, endpoint_of(opts)),
        message: "the hub named no commit for this revision".into(),
        hint: ALTERNATIVES.into(),
    })?;
    importer.set_origin(format!(
        "hf:{}/{}@{commit}",
        opts.repo.owner, opts.repo.name
    ));
    let revision = Some(commit);
    let entries = repo
        .list_tree()
        .maybe_revision(revision.clone())
        .recursive(true)
        .send()
        .map_err(|e| hub_error(opts, "cannot list the dataset repository", &e))?;
    let mut files: Vec<(String, u64)> = entries
        .into_iter()
        .filter_map(|entry| match entry {
            RepoTreeEntry::File { path, size, .. } => Some((path, size)),
            RepoTreeEntry::Directory { .. } => None,
        })
        .collect();
    files.sort();
    let parquet: Vec<&(String, u64)> = files
        .iter()
        .filter(|(p, _)| p.ends_with(".parquet"))
        .collect();
    let zips: Vec<&(String, u64)> = files.iter().filter(|(p, _)| p.ends_with(".zip")).collect();
    let fetch = |path: &str, size: u64| -> Result<PathBuf> {
        tracing::info!("downloading {path} ({size} bytes) from {}", opts.repo);
        let local = repo
            .download_file()
            .filename(path.to_string())
            .maybe_revision(revision.clone())
            .send()
            .map_err(|e| hub_error(opts, &format!("cannot download {path}"), &e))?;
        check_size(&local, size, path)?;
        Ok(local)
    };
    if !parquet.is_empty() {
        importer.set_classes(CLASSES.iter().map(|c| c.to_string()).collect());
        let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
        for (path, size) in parquet {
            let local = fetch(path, *size)?;
            let split = ParquetSplit::of_file(path);
            if let Err(e) = import_parquet(&local, path, split, &classes, importer) {
                discard_cached(&local);
                return Err(e);
            }
        }
        Ok(())
    } else if !zips.is_empty() {
        for (path, size) in zips {
            let local = fetch(path, *size)?;
            if let Err(e) = import_zip(&local, importer) {
                discard_cached(&local);
                return Err(note_discarded_download(e));
            }
        }
        Ok(())
    } else {
        Err(DataError::Layout(format!(
            "{} holds neither parquet files nor a zip ({} files); choose another --hf-repo. {ALTERNATIVES}",
            opts.repo,
            files.len()
        )))
    }
}

/// A short file in the cache would be reused forever: drop it and say so.
fn check_size(local: &Path, expected: u64, path: &str) -> Result<()> {
    let got = std::fs::metadata(local)
        .map_err(|e| DataError::io(local, e))?
        .len();
    if got == expected {
        return Ok(());
    }
    discard_cached(local);
    Err(DataError::Network {
        what: format!("download of {path} is incomplete"),
        message: format!("got {got} of {expected} bytes"),
        hint: "The partial file was removed from the cache; run again.".into(),
    })
}

/// Removes a cached file and, when it is a snapshot symlink, the blob it points to.
fn discard_cached(local: &Path) {
    if let Ok(target) = std::fs::canonicalize(local) {
        let _ = std::fs::remove_file(target);
    }
    let _ = std::fs::remove_file(local);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_specs_parse() {
        let spec: HfRepoSpec = "a/b@main".parse().unwrap();
        assert_eq!((spec.owner.as_str(), spec.name.as_str()), ("a", "b"));
        assert_eq!(spec.revision.as_deref(), Some("main"));
        assert_eq!("a/b".parse::<HfRepoSpec>().unwrap().revision, None);
        for bad in ["a", "a/", "/b", "a/b/c", "a/b@"] {
            assert!(bad.parse::<HfRepoSpec>().is_err(), "{bad}");
        }
        assert_eq!(HfRepoSpec::default().to_string(), DEFAULT_REPO);
    }
}
