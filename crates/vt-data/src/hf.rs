//! The data set from a Hugging Face dataset repository, through `hf-hub` (which honours
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`; downloads are cached there, laid out as in
//! [`crate::hub_cache`], and reused; `HF_HUB_OFFLINE` imports them without the hub). A
//! download streams into `<blob>.part`; an interrupted one resumes from there with a byte
//! range, and only a file of the listed size and git object id is kept.
//!
//! Two repository shapes are understood:
//! - parquet files as the `datasets` library writes them (`image` struct `{bytes, path}`,
//!   integer `label` in the order buildings, forest, glacier, mountain, sea, street, or
//!   the class name); the split comes from the file name or folder (one of
//!   [`ParquetSplit::KNOWN`]; any other name is refused);
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

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFClientSync, HFError};
use reqwest::StatusCode;

use crate::dataset::CLASSES;
use crate::download::{error_chain, open_locked, Progress, CONNECT_TIMEOUT};
use crate::error::{DataError, Result};
use crate::fetch::check_kept_apart;
use crate::hub_cache::{content_name, is_commit, is_git_object_id, ListedFile, RepoCache};
use crate::import::{quoted, Importer};
use crate::source::parquet::{import_parquet, ParquetSplit};
use crate::source::zip::{import_download, note_discarded, note_discarded_download, zip_summary};

pub const DEFAULT_REPO: &str = "miladfa7/Intel-Image-Classification";

/// Longest silence from the hub: for its response headers, then between two reads of a body.
/// reqwest's read timeout restarts after every read, so it bounds a stalled hub, not the time a
/// large download takes.
pub const HUB_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// One quick retry for a dropped connection; with [`HUB_READ_TIMEOUT`] a hub that accepts
/// connections but never answers fails in about 30 s.
const HUB_RETRIES: usize = 1;

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
            // A commit id as the hub names it, and its snapshot folder: in lowercase.
            Some((repo, rev)) if is_commit(rev) => (repo, Some(rev.to_ascii_lowercase())),
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
    /// Overrides [`HUB_READ_TIMEOUT`] (tests use a short one).
    pub read_timeout: Option<Duration>,
    /// Overrides `HF_HUB_OFFLINE`: import what an earlier download cached, without the hub.
    pub offline: Option<bool>,
}

impl HfOptions {
    /// Whether to import from the cache without the hub: [`Self::offline`], else
    /// `HF_HUB_OFFLINE`.
    fn is_offline(&self) -> bool {
        self.offline.unwrap_or_else(offline_from_env)
    }
}

/// A client with this project's timeouts. The metadata requests go through hf-hub's blocking
/// wrapper of one; each download streams through an async one of its own (see [`download`]).
fn hub_client(opts: &HfOptions) -> Result<HFClient> {
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(opts.read_timeout.unwrap_or(HUB_READ_TIMEOUT))
        .user_agent(concat!("vt-data/", env!("CARGO_PKG_VERSION"), "; hf-hub/1"))
        .build()
        .map_err(|e| hub_error(opts, "cannot set up the HTTP client", &e))?;
    let mut builder = HFClient::builder()
        .client(http)
        .retry_max_attempts(HUB_RETRIES)
        .retry_base_delay(Duration::from_millis(200));
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(dir) = &opts.cache_dir {
        builder = builder.cache_dir(dir.clone());
    }
    builder
        .build()
        .map_err(|e| hub_error(opts, "cannot set up the Hugging Face client", &e))
}

fn endpoint_of(opts: &HfOptions) -> String {
    opts.endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// Whether the client sends a token, as `huggingface_hub` finds one: `HF_TOKEN`, else the
/// file `HF_TOKEN_PATH` names, else `token` in `HF_HOME` (`~/.cache/huggingface`).
fn token_set() -> bool {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(token) = var("HF_TOKEN") {
        return !token.to_string_lossy().trim().is_empty();
    }
    let file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| Path::new(&home).join(".cache/huggingface")))
            .map(|home| home.join("token"))
    });
    file.and_then(|f| fs::read_to_string(f).ok())
        .is_some_and(|token| !token.trim().is_empty())
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

fn hub_error(opts: &HfOptions, what: &str, e: &(dyn std::error::Error + 'static)) -> DataError {
    let message = match e.downcast_ref::<HFError>() {
        // hf-hub appends the URL that reqwest's own message already names.
        Some(HFError::Request { source, .. }) => {
            format!("HTTP request error: {}", error_chain(source))
        }
        _ => error_chain(e),
    };
    let mut hint = String::new();
    let lower = message.to_ascii_lowercase();
    let token_set = token_set();
    if let Some(HFError::RateLimited { retry_after, .. }) = e.downcast_ref::<HFError>() {
        let wait = retry_after.map_or_else(
            || "a few minutes".to_string(),
            |d| format!("{} s", d.as_secs()),
        );
        let token = if token_set {
            ""
        } else {
            "; an HF_TOKEN raises the hub's rate limit"
        };
        hint.push_str(&format!(
            "The hub limits how often it may be asked (HTTP 429): wait {wait} and run \
             fetch-data again{token}. "
        ));
    } else if ACCESS_PROBLEMS.iter().any(|s| lower.contains(s)) {
        let page = format!(
            "{}/datasets/{}/{}",
            endpoint_of(opts).trim_end_matches('/'),
            opts.repo.owner,
            opts.repo.name
        );
        hint.push_str(&if token_set {
            format!(
                "Check the repository name and revision (--hf-repo OWNER/NAME[@REV]), and that \
                 HF_TOKEN is valid and its account may read the repository (for a gated one, \
                 accept its conditions at {page}). "
            )
        } else {
            format!(
                "Check the repository name and revision (--hf-repo OWNER/NAME[@REV]); a private \
                 or gated repository needs HF_TOKEN (and a gated one, its conditions accepted \
                 at {page}). "
            )
        });
    }
    if lower.contains("503") {
        hint.push_str(
            "The hub is unavailable for now: wait a few minutes and run fetch-data again. ",
        );
    }
    hint.push_str(ALTERNATIVES);
    DataError::Network {
        what: format!("{what} ({} at {})", opts.repo, endpoint_of(opts)),
        message,
        hint,
    }
}

/// Downloads the repository's data files and feeds them to `importer`; offline, imports
/// what an earlier download left in the cache.
pub fn import_hf(opts: &HfOptions, importer: &mut Importer) -> Result<()> {
    let async_client = hub_client(opts)?;
    let cache_dir = async_client.cache_dir().to_path_buf();
    check_kept_apart(
        "the Hugging Face cache",
        "keep it elsewhere (HF_HOME)",
        &cache_dir,
        importer.data_dir(),
    )?;
    let cache = RepoCache::new(&cache_dir, &opts.repo.owner, &opts.repo.name);
    if opts.is_offline() {
        return import_cached(opts, &cache, importer);
    }
    import_online(opts, async_client, &cache, importer).map_err(|e| unwritable_cache(e, &cache_dir))
}

/// A hub cache this user may not write (a cluster's shared one), named with the way to use
/// it as it is.
fn unwritable_cache(e: DataError, cache_dir: &Path) -> DataError {
    match e {
        DataError::Io { path, cause }
            if path.starts_with(cache_dir)
                && matches!(
                    cause.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
        {
            DataError::Network {
                what: format!("writing the hub cache {}", cache_dir.display()),
                message: format!("{}: {cause}", path.display()),
                hint: "The cache is not writable: with HF_HUB_OFFLINE=1, fetch-data imports \
                       what it holds without writing to it; or set HF_HOME to a folder of \
                       your own."
                    .into(),
            }
        }
        other => other,
    }
}

/// Downloads what the cache lacks of the repository's data files at the revision asked for,
/// then imports them.
fn import_online(
    opts: &HfOptions,
    async_client: HFClient,
    cache: &RepoCache,
    importer: &mut Importer,
) -> Result<()> {
    let client = HFClientSync::from_inner(async_client)
        .map_err(|e| hub_error(opts, "cannot set up the Hugging Face client", &e))?;
    let repo = client.dataset(opts.repo.owner.clone(), opts.repo.name.clone());
    let info = repo
        .info()
        .maybe_revision(opts.repo.revision.clone())
        .send()
        .map_err(|e| {
            let error = hub_error(opts, "cannot read the dataset repository", &e);
            name_cached_download(error, opts, cache)
        })?;
    let commit = info.sha.ok_or_else(|| DataError::Network {
        what: format!("resolving {} at {}", opts.repo, endpoint_of(opts)),
        message: "the hub named no commit for this revision".into(),
        hint: ALTERNATIVES.into(),
    })?;
    check_commit(opts, &commit)?;
    importer.set_origin(origin(opts, &commit));
    let entries = repo
        .list_tree()
        .revision(commit.clone())
        .recursive(true)
        .send()
        .map_err(|e| {
            let error = hub_error(opts, "cannot list the dataset repository", &e);
            name_cached_download(error, opts, cache)
        })?;
    let mut listed: Vec<ListedFile> = entries
        .into_iter()
        .filter_map(|entry| match entry {
            RepoTreeEntry::File {
                path, size, oid, ..
            } => Some(ListedFile { path, size, oid }),
            RepoTreeEntry::Directory { .. } => None,
        })
        .collect();
    listed.sort_by(|a, b| a.path.cmp(&b.path));
    let files: Vec<(String, u64)> = listed.iter().map(|f| (f.path.clone(), f.size)).collect();
    let object_ids: HashMap<&str, &str> = listed
        .iter()
        .map(|f| (f.path.as_str(), f.oid.as_str()))
        .collect();
    let data = DataFiles::of(opts, &files)?;
    cache.prepare()?;
    let mut locals = Vec::new();
    for (path, size) in data.listed() {
        let local = snapshot_path(opts, cache, &commit, path)?;
        // Through a snapshot link, the size of the blob it points to.
        let oid = object_ids.get(path.as_str()).copied().unwrap_or_default();
        match fs::metadata(&local) {
            Ok(meta) if meta.len() == *size => {}
            cached => {
                if let Ok(meta) = cached {
                    tracing::warn!(
                        "{}: {} bytes, the hub lists {size}; downloading it again",
                        local.display(),
                        meta.len()
                    );
                    discard_cached(&local);
                }
                let blob = fetch_blob(opts, cache, &commit, path, *size, oid)
                    .map_err(|e| name_cached_download(e, opts, cache))?;
                cache.link(&local, &blob)?;
            }
        }
        locals.push(local);
    }
    // Recorded once the snapshot holds every file the import needs: an offline import checks
    // the snapshot against it. Before the import: a file it finds broken is removed, which
    // the listing then tells an offline import.
    cache.remove_leftovers();
    cache.write_listing(&commit, &listed)?;
    cache.write_ref(revision(opts), &commit)?;
    data.import(opts, &locals, importer)
}

/// The revision asked for: `main` unless another is named.
fn revision(opts: &HfOptions) -> &str {
    opts.repo.revision.as_deref().unwrap_or("main")
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it: `1`, `true`, `yes` or `on`, in any case.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        ["1", "true", "yes", "on"]
            .iter()
            .any(|on| v.trim().eq_ignore_ascii_case(on))
    })
}

fn origin(opts: &HfOptions, commit: &str) -> String {
    format!("hf:{}/{}@{commit}", opts.repo.owner, opts.repo.name)
}

/// Without the hub: the snapshot of the commit the revision named at its last download,
/// checked against the commit's listing.
fn import_cached(opts: &HfOptions, cache: &RepoCache, importer: &mut Importer) -> Result<()> {
    let revision = revision(opts);
    let not_cached = |message: String| DataError::Network {
        what: format!(
            "importing {} from the Hugging Face cache (HF_HUB_OFFLINE is set)",
            opts.repo
        ),
        message,
        hint: format!(
            "{}Unset HF_HUB_OFFLINE to download it. {ALTERNATIVES}",
            cached_download_hint(opts, cache)
        ),
    };
    let commit = cache.resolve(revision)?.ok_or_else(|| {
        not_cached(format!(
            "{} holds no download of {revision}",
            cache.dir().display()
        ))
    })?;
    let files = cache.read_listing(&commit)?.ok_or_else(|| {
        not_cached(format!(
            "{} holds no complete download of commit {commit} (no listing of the commit, which \
             fetch-data and huggingface_hub's snapshot_download record, says which files it has)",
            cache.dir().display()
        ))
    })?;
    importer.set_origin(origin(opts, &commit));
    let data = DataFiles::of(opts, &files)?.cached_zips_only(opts, cache, &commit);
    let locals = cached_data_files(opts, cache, &commit, &data)?.map_err(|problems| {
        not_cached(format!(
            "the download of commit {commit} in {} is incomplete: {}",
            cache.dir().display(),
            problems.join("; ")
        ))
    })?;
    tracing::info!(
        "HF_HUB_OFFLINE: importing {} at {commit} from {}",
        opts.repo,
        cache.dir().display()
    );
    data.import(opts, &locals, importer)
}

/// Where the snapshot of `commit` holds `data`'s files, or what is missing of them.
fn cached_data_files(
    opts: &HfOptions,
    cache: &RepoCache,
    commit: &str,
    data: &DataFiles,
) -> Result<std::result::Result<Vec<PathBuf>, Vec<String>>> {
    let mut locals = Vec::new();
    let mut problems = Vec::new();
    for (path, size) in data.listed() {
        let local = snapshot_path(opts, cache, commit, path)?;
        // Through a snapshot link, the size of the blob it points to.
        match fs::metadata(&local) {
            Ok(meta) if meta.len() == *size => locals.push(local),
            Ok(meta) => problems.push(format!(
                "{path} holds {} bytes, the listing gives {size}",
                meta.len()
            )),
            Err(_) => problems.push(format!("{path} is missing")),
        }
    }
    Ok(if problems.is_empty() {
        Ok(locals)
    } else {
        Err(problems)
    })
}

/// The files of a repository that hold the data set, told apart before any download.
enum DataFiles<'a> {
    /// Parquet files, with the split each holds.
    Parquet(Vec<(&'a (String, u64), ParquetSplit)>),
    /// Zips: the data set's archive, perhaps beside others.
    Zips(Vec<&'a (String, u64)>),
}

impl<'a> DataFiles<'a> {
    fn of(opts: &HfOptions, files: &'a [(String, u64)]) -> Result<Self> {
        let parquet: Vec<&(String, u64)> = files
            .iter()
            .filter(|(p, _)| p.ends_with(".parquet"))
            .collect();
        if !parquet.is_empty() {
            let mut splits = Vec::new();
            let mut unknown = Vec::new();
            for file in parquet {
                match ParquetSplit::of_file(&file.0) {
                    Some(split) => splits.push((file, split)),
                    None => unknown.push(file.0.as_str()),
                }
            }
            if !unknown.is_empty() {
                return Err(DataError::Layout(format!(
                    "{} holds parquet files of no known split ({}); the split names understood \
                     are {}. Choose another --hf-repo. {ALTERNATIVES}",
                    opts.repo,
                    quoted(&unknown),
                    ParquetSplit::KNOWN
                )));
            }
            return Ok(DataFiles::Parquet(splits));
        }
        let zips: Vec<&(String, u64)> = files.iter().filter(|(p, _)| p.ends_with(".zip")).collect();
        if !zips.is_empty() {
            return Ok(DataFiles::Zips(zips));
        }
        Err(DataError::Layout(format!(
            "{} holds neither parquet files nor a zip ({} files); choose another --hf-repo. \
             {ALTERNATIVES}",
            opts.repo,
            files.len()
        )))
    }

    /// Offline, the zips of the snapshot at `commit`, when it holds any: the import leaves
    /// out a repository's other zips anyway, so a snapshot of its archive alone is whole.
    fn cached_zips_only(self, opts: &HfOptions, cache: &RepoCache, commit: &str) -> Self {
        let DataFiles::Zips(zips) = self else {
            return self;
        };
        let cached: Vec<&(String, u64)> = zips
            .iter()
            .copied()
            .filter(|(path, size)| {
                snapshot_path(opts, cache, commit, path)
                    .is_ok_and(|local| fs::metadata(local).is_ok_and(|m| m.len() == *size))
            })
            .collect();
        DataFiles::Zips(if cached.is_empty() { zips } else { cached })
    }

    fn listed(&self) -> Vec<&'a (String, u64)> {
        match self {
            DataFiles::Parquet(splits) => splits.iter().map(|(file, _)| *file).collect(),
            DataFiles::Zips(zips) => zips.clone(),
        }
    }

    /// Imports the files, found at `locals` (in the order of [`Self::listed`]).
    fn import(&self, opts: &HfOptions, locals: &[PathBuf], importer: &mut Importer) -> Result<()> {
        match self {
            DataFiles::Parquet(splits) => {
                let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
                importer.set_classes(classes.clone());
                for (((path, _), split), local) in splits.iter().zip(locals) {
                    import_parquet(local, path, *split, &classes, importer)
                        .map_err(|e| discard_if_broken(opts, local, e))?;
                }
                Ok(())
            }
            DataFiles::Zips(zips) => import_archive(opts, zips, locals, importer),
        }
    }
}

/// A repository may keep other zips beside the data set's (a submission sample, say): the
/// data set's is the one whose entries hold training images.
fn import_archive(
    opts: &HfOptions,
    zips: &[&(String, u64)],
    locals: &[PathBuf],
    importer: &mut Importer,
) -> Result<()> {
    let mut archives = Vec::new();
    for ((path, _), local) in zips.iter().zip(locals) {
        let summary = zip_summary(local).map_err(|e| discard_if_broken(opts, local, e))?;
        if summary.train > 0 {
            archives.push((path, local));
        } else if summary.test + summary.pred > 0 {
            // Importing the training part alone would silently lose these.
            return Err(DataError::Layout(format!(
                "{path} in {} holds seg_test or seg_pred images but no seg_train ones: an \
                 archive split into parts is not supported; choose another --hf-repo. \
                 {ALTERNATIVES}",
                opts.repo
            )));
        } else {
            tracing::warn!(
                "{path} in {} has no seg_train/<class>/<image> entries among its {}: not the \
                 data set's archive, left out",
                opts.repo,
                summary.entries
            );
        }
    }
    let names = |paths: Vec<&String>| quoted(&paths.iter().map(|p| p.as_str()).collect::<Vec<_>>());
    match archives.as_slice() {
        [(_, local)] => import_download(local, importer)
            .map(drop)
            .map_err(|e| discard_if_broken(opts, local, e)),
        [] => Err(DataError::Layout(format!(
            "{}'s zips ({}) hold no seg_train/<class>/<image> entries: none is the Intel Image \
             Classification archive; choose another --hf-repo. {ALTERNATIVES}",
            opts.repo,
            names(zips.iter().map(|(path, _)| path).collect())
        ))),
        several => Err(DataError::Layout(format!(
            "{} holds {} archives of training images ({}): importing them all would count a \
             photo once per archive; choose another --hf-repo. {ALTERNATIVES}",
            opts.repo,
            several.len(),
            names(several.iter().map(|(path, _)| *path).collect())
        ))),
    }
}

/// Downloads `path` at `commit` (git object id `oid`) into its blob, unless a blob of that
/// content is already there (the same file at another commit, which vt or the hub's Python
/// tools downloaded), and returns the blob's path.
fn fetch_blob(
    opts: &HfOptions,
    cache: &RepoCache,
    commit: &str,
    path: &str,
    size: u64,
    oid: &str,
) -> Result<PathBuf> {
    if let Some(blob) = cache.find_blob(size, oid)? {
        tracing::info!("{path}: the same content is cached as {}", blob.display());
        return Ok(blob);
    }
    let part = cache.part_path(oid).ok_or_else(|| DataError::Network {
        what: format!("listing {} at {}", opts.repo, endpoint_of(opts)),
        message: format!("the hub gave {path} the object id {oid:?}, which is no plain name"),
        hint: format!("Check the endpoint (HF_ENDPOINT). {ALTERNATIVES}"),
    })?;
    download(opts, cache, commit, path, size, oid, &part)
}

/// The commit names a folder of the cache: a hub's answer such as `../x` or `/etc` must not
/// place downloads outside it.
fn check_commit(opts: &HfOptions, commit: &str) -> Result<()> {
    if is_commit(commit) {
        return Ok(());
    }
    Err(DataError::Network {
        what: format!("resolving {} at {}", opts.repo, endpoint_of(opts)),
        message: format!("the hub named the commit {commit:?}, which is not 40 hex digits"),
        hint: format!("Check the endpoint (HF_ENDPOINT). {ALTERNATIVES}"),
    })
}

/// Where the cache keeps `path` at `commit`. A regular file there is valid layout: hf-hub
/// writes one on Windows, in place of the blob symlink.
fn snapshot_path(opts: &HfOptions, cache: &RepoCache, commit: &str, path: &str) -> Result<PathBuf> {
    cache.snapshot_path(commit, path).ok_or_else(|| {
        DataError::Layout(format!(
            "{} lists a file named {path:?}, which is not a plain relative path; choose another \
             --hf-repo. {ALTERNATIVES}",
            opts.repo
        ))
    })
}

/// `error` (the hub could not be asked) with what an earlier run downloaded named.
fn name_cached_download(error: DataError, opts: &HfOptions, cache: &RepoCache) -> DataError {
    let DataError::Network {
        what,
        message,
        hint,
    } = error
    else {
        return error;
    };
    let hint = format!("{}{hint}", cached_download_hint(opts, cache));
    DataError::Network {
        what,
        message,
        hint,
    }
}

/// How to import without the hub what an earlier run downloaded, if anything: the revision's
/// snapshot offline, or an archive of a snapshot with `--from` (a snapshot holds only
/// complete files).
fn cached_download_hint(opts: &HfOptions, cache: &RepoCache) -> String {
    let revision = revision(opts);
    // Offered only when the offline import would take it.
    let listed = cache.resolve(revision).ok().flatten().filter(|commit| {
        let Ok(Some(files)) = cache.read_listing(commit) else {
            return false;
        };
        DataFiles::of(opts, &files).is_ok_and(|data| {
            let data = data.cached_zips_only(opts, cache, commit);
            matches!(cached_data_files(opts, cache, commit, &data), Ok(Ok(_)))
        })
    });
    let offline = opts.is_offline();
    match (listed, cache.newest_archive()) {
        (Some(commit), _) if !offline => format!(
            "An earlier download of {} (commit {commit}) is in the cache: run this \
             fetch-data again with HF_HUB_OFFLINE=1 set to import it without the hub. ",
            HfRepoSpec {
                revision: Some(revision.to_string()),
                ..opts.repo.clone()
            }
        ),
        // One that reads as a zip: a cut download's is none (and its import fails).
        (_, Some((commit, archive))) if zip_summary(&archive).is_ok() => format!(
            "The archive of commit {commit} is in the cache: cargo xtask fetch-data --from {} \
             imports it without the hub. ",
            archive.display()
        ),
        _ => String::new(),
    }
}

/// Downloads `path` at `commit` into `part` and from there into its blob, whose path it
/// returns, resuming from what `part` holds: hf-hub's own download recreates its partial
/// file on every attempt, which restarts a 363 MB archive from byte 0. The download must be
/// the file whose git object id is `oid`, when that is one.
fn download(
    opts: &HfOptions,
    cache: &RepoCache,
    commit: &str,
    path: &str,
    size: u64,
    oid: &str,
    part: &Path,
) -> Result<PathBuf> {
    // hf-hub locks its downloads too: two fetches sharing HF_HOME must not append to one file.
    let file = open_locked(part, &format!("download of {path} from {}", opts.repo))?;
    // Another fetch may have finished it between the search for it and the lock.
    if let Some(blob) = cache.find_blob(size, oid)? {
        // Removed under the lock: no other fetch may take the file meanwhile.
        let _ = fs::remove_file(part);
        drop(file);
        return Ok(blob);
    }
    let mut have = file.metadata().map_err(|e| DataError::io(part, e))?.len();
    if have > size {
        tracing::info!("{} is longer than {path}; starting over", part.display());
        file.set_len(0).map_err(|e| DataError::io(part, e))?;
        have = 0;
    }
    if have < size {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| hub_error(opts, "cannot start the download", &e))?;
        // hf-hub streams (and takes a byte range) only through its async client. On a thread of
        // its own, as hf-hub's blocking client does: block_on panics inside a tokio runtime.
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(receive(opts, commit, path, size, have, &file, part)))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
    }
    // On disk before it is renamed: a later run trusts a blob of the listed size.
    file.sync_all().map_err(|e| DataError::io(part, e))?;
    let name = if is_git_object_id(oid) {
        match content_name(part, size, oid)? {
            Some(name) => name,
            None => {
                // Removed under the lock: no other fetch may take the file meanwhile.
                if let Err(e) = fs::remove_file(part) {
                    tracing::warn!("cannot remove {}: {e}", part.display());
                }
                drop(file);
                return Err(DataError::Network {
                    what: format!(
                        "download of {path} from {} at {}",
                        opts.repo,
                        endpoint_of(opts)
                    ),
                    message: format!(
                        "the {size} bytes received are not the file the hub lists (git object \
                         id {oid}, of the file or of its LFS pointer)"
                    ),
                    hint: format!(
                        "The download {} was deleted. Either the bytes were damaged on the \
                         way (run fetch-data again to download {path} from the start), or the \
                         hub's listing gives other ids than git's (check HF_ENDPOINT, or use \
                         another source). {ALTERNATIVES}",
                        part.display()
                    ),
                });
            }
        }
    } else {
        tracing::warn!(
            "{path}: the hub lists the object id {oid:?}, not a git object id: the download \
             cannot be checked against it"
        );
        oid.to_string()
    };
    let blob = part.with_file_name(&name);
    fs::rename(part, &blob).map_err(|e| DataError::io(&blob, e))?;
    Ok(blob)
}

/// Longest wait for `download_file_stream().send()`: it asks the hub twice (the `HEAD`, then
/// the `GET` or, for a Xet-backed file, the Xet token), each tried `1 + HUB_RETRIES` times.
/// Bounded here too, as hf-hub's Xet client does not use the reqwest client's timeouts.
fn send_limit(silence: Duration) -> Duration {
    silence * (2 * (1 + HUB_RETRIES) as u32)
}

/// Appends the rest of `path` (after the `have` bytes already in `file`) until it holds `size`.
/// Every wait on the hub is bounded by the read timeout here, whichever transport hf-hub
/// picks: its Xet client retries a failing or silent storage server for minutes.
async fn receive(
    opts: &HfOptions,
    commit: &str,
    path: &str,
    size: u64,
    mut have: u64,
    file: &File,
    part: &Path,
) -> Result<()> {
    let silence = opts.read_timeout.unwrap_or(HUB_READ_TIMEOUT);
    let what = format!(
        "download of {path} from {} at {}",
        opts.repo,
        endpoint_of(opts)
    );
    // Its own client: reqwest's pooled connections belong to the runtime that opened them.
    let client = hub_client(opts)?;
    let repo = client.dataset(opts.repo.owner.clone(), opts.repo.name.clone());
    // The byte the hub would not resume from, in this run.
    let mut refused = None;
    let mut stream = loop {
        let request = repo
            .download_file_stream()
            .filename(path)
            .revision(commit)
            .maybe_range((have > 0).then_some(have..size))
            .send();
        let limit = send_limit(silence);
        let (length, stream) = match tokio::time::timeout(limit, request).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(HFError::Http { context }))
                if have > 0 && context.status == StatusCode::RANGE_NOT_SATISFIABLE =>
            {
                // The hub holds no byte past those kept, though its listing gives more: asking
                // for the rest again would fail the same way on every run.
                file.set_len(0).map_err(|e| DataError::io(part, e))?;
                return Err(DataError::Network {
                    what,
                    message: format!(
                        "the hub refused the range from byte {have} (HTTP 416 Range Not \
                         Satisfiable): its file ends there, though its listing gives {size} bytes"
                    ),
                    hint: format!(
                        "The partial file {} was emptied: run fetch-data again to download \
                         {path} from the start. If this happens again, the hub's file and its \
                         listing disagree: choose another --hf-repo. {ALTERNATIVES}",
                        part.display()
                    ),
                });
            }
            Ok(Err(e)) => return Err(hub_error(opts, &format!("cannot download {path}"), &e)),
            Err(_) => {
                return Err(DataError::Network {
                    what,
                    message: format!(
                        "the hub did not start sending within {} s",
                        limit.as_secs_f64()
                    ),
                    hint: format!("Run fetch-data again later. {ALTERNATIVES}"),
                })
            }
        };
        // hf-hub hands back neither the status nor Content-Range: a body of exactly the missing
        // length is the rest; anything else (the whole file from a server that ignores Range,
        // or no length) is dropped, and the file downloaded from its first byte.
        if have == 0 || length == Some(size - have) {
            break stream;
        }
        tracing::info!(
            "{} did not resume {path} at byte {have}; starting over",
            opts.repo
        );
        refused = Some(have);
        file.set_len(0).map_err(|e| DataError::io(part, e))?;
        have = 0;
    };
    let progress = Progress::start(&format!("{path} from {}", opts.repo), Some(size), have);
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut received = have;
    let mut lost = None;
    loop {
        let chunk = match tokio::time::timeout(silence, stream.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                lost = Some(format!("nothing arrived for {} s", silence.as_secs_f64()));
                break;
            }
        };
        match chunk {
            Ok(bytes) if received + bytes.len() as u64 <= size => {
                writer
                    .write_all(&bytes)
                    .map_err(|e| DataError::io(part, e))?;
                received += bytes.len() as u64;
                progress.add(bytes.len() as u64);
            }
            Ok(_) => {
                // Dropped first: the writer would flush its buffer after the truncation.
                drop(writer);
                file.set_len(0).map_err(|e| DataError::io(part, e))?;
                return Err(DataError::Network {
                    what,
                    message: format!("the hub sent more than the {size} bytes it lists"),
                    hint: format!("The partial file was emptied. {ALTERNATIVES}"),
                });
            }
            Err(e) => {
                lost = Some(error_chain(&e));
                break;
            }
        }
    }
    // Flushed even on failure, so the next run resumes from everything received.
    writer.flush().map_err(|e| DataError::io(part, e))?;
    let message = match lost {
        // Every listed byte arrived before the error: the import verifies the file anyway.
        Some(cause) if received == size => {
            tracing::info!("{path}: all {size} bytes arrived, then the transfer failed ({cause})");
            return Ok(());
        }
        Some(cause) => format!("connection lost after {received} of {size} bytes ({cause})"),
        None if received < size => format!("truncated: received {received} of {size} bytes"),
        None => return Ok(()),
    };
    let hint = match refused {
        Some(at) => format!(
            "The hub would not resume from byte {at}: its answer to the range request gave a \
             length other than the rest's (such as the whole file's, in X-Linked-Size), so this \
             run started over. The {received} bytes received are kept in {}, but the next run \
             starts over again if the hub answers the same way: a steadier connection is \
             needed. {ALTERNATIVES}",
            part.display()
        ),
        None => format!(
            "The bytes received are kept in {}: run fetch-data again to resume. {ALTERNATIVES}",
            part.display()
        ),
    };
    Err(DataError::Network {
        what,
        message,
        hint,
    })
}

/// `e`, the error of importing the cached download `local`; when the file itself is at fault
/// (not a readable zip or parquet file), the download is removed so that the next run
/// fetches a fresh copy. Other errors (writing the import, say) leave it for the next run.
fn discard_if_broken(opts: &HfOptions, local: &Path, e: DataError) -> DataError {
    match e {
        DataError::Zip { .. } | DataError::Parquet { .. } => {
            discard_cached(local);
            if opts.is_offline() {
                // Another run offline would find nothing to import.
                note_discarded(
                    e,
                    "the damaged copy was deleted from the cache: run fetch-data without \
                     HF_HUB_OFFLINE for a fresh one",
                )
            } else {
                note_discarded_download(e)
            }
        }
        other => other,
    }
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

    /// A cache the user may not write says how to use it as it is; other errors, and
    /// errors outside the cache, are left alone.
    #[test]
    fn an_unwritable_cache_points_to_offline_imports() {
        let cache = Path::new("/shared/hf/hub");
        let denied = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let error = unwritable_cache(DataError::io(cache.join("x/.vt.tmp-1"), denied()), cache);
        assert!(error.to_string().contains("HF_HUB_OFFLINE=1"), "{error}");
        assert!(error.to_string().contains(".vt.tmp-1"), "{error}");
        let elsewhere = unwritable_cache(DataError::io("/data/intel", denied()), cache);
        assert!(
            !elsewhere.to_string().contains("HF_HUB_OFFLINE"),
            "{elsewhere}"
        );
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let full = unwritable_cache(DataError::io(cache.join("x"), full), cache);
        assert!(!full.to_string().contains("HF_HUB_OFFLINE"), "{full}");
    }

    #[test]
    fn repo_specs_parse() {
        let spec: HfRepoSpec = "a/b@main".parse().unwrap();
        assert_eq!((spec.owner.as_str(), spec.name.as_str()), ("a", "b"));
        assert_eq!(spec.revision.as_deref(), Some("main"));
        assert_eq!("a/b".parse::<HfRepoSpec>().unwrap().revision, None);
        let commit = "0123456789ABCDEF0123456789abcdef01234567";
        let spec: HfRepoSpec = format!("a/b@{commit}").parse().unwrap();
        assert_eq!(spec.revision, Some(commit.to_ascii_lowercase()));
        for bad in ["a", "a/", "/b", "a/b/c", "a/b@"] {
            assert!(bad.parse::<HfRepoSpec>().is_err(), "{bad}");
        }
        assert_eq!(HfRepoSpec::default().to_string(), DEFAULT_REPO);
    }

    #[test]
    fn a_silent_hub_fails_within_about_half_a_minute() {
        let attempts = 1 + HUB_RETRIES as u32;
        assert!(HUB_READ_TIMEOUT * attempts <= Duration::from_secs(35));
    }
}
