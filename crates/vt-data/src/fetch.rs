//! `cargo xtask fetch-data`: one entry point for every source, all ending in the same
//! data directory layout (see [`crate::dataset`]).

use std::path::{Component, Path, PathBuf};

use crate::dataset::Manifest;
use crate::error::{DataError, Result};
use crate::hf::{import_hf, HfOptions};
use crate::import::Importer;
use crate::kaggle::{self, KaggleCredentials};
use crate::source::folder::import_folder;
use crate::source::synthetic::{import_synthetic, SyntheticConfig};
use crate::source::zip::{import_download, import_zip, note_discarded_download};

pub const DEFAULT_DATA_DIR: &str = "data/intel";
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
pub const DEFAULT_SEED: u64 = 42;

#[derive(Debug, Clone)]
pub enum FetchSource {
    HuggingFace(HfOptions),
    /// `endpoint` overrides `KAGGLE_API_ENDPOINT` and the default; without `credentials`
    /// they are discovered as the official client does.
    Kaggle {
        endpoint: Option<String>,
        credentials: Option<KaggleCredentials>,
    },
    /// A zip or an extracted folder in the Kaggle layout.
    Path(PathBuf),
    Synthetic(SyntheticConfig),
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub data_dir: PathBuf,
    pub source: FetchSource,
    pub val_fraction: f64,
    pub seed: u64,
    /// Where downloaded archives are kept for re-runs; default `<data dir>/../.downloads`.
    pub download_dir: Option<PathBuf>,
}

impl FetchOptions {
    pub fn new(data_dir: impl Into<PathBuf>, source: FetchSource) -> FetchOptions {
        FetchOptions {
            data_dir: data_dir.into(),
            source,
            val_fraction: DEFAULT_VAL_FRACTION,
            seed: DEFAULT_SEED,
            download_dir: None,
        }
    }
}

pub fn default_download_dir(data_dir: &Path) -> PathBuf {
    match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(".downloads"),
        _ => PathBuf::from(".downloads"),
    }
}

/// Imports the data set into `opts.data_dir`, replacing an earlier import only once the new
/// one is complete.
pub fn fetch(opts: &FetchOptions) -> Result<Manifest> {
    // `x/.` is `x`, whose parent is the import's (renaming `x/.` itself fails).
    let opts = &FetchOptions {
        data_dir: opts.data_dir.components().collect(),
        ..opts.clone()
    };
    let (kind, origin) = describe(&opts.source);
    // First, so that overlap is what the error names, not the data directory's contents.
    match &opts.source {
        FetchSource::Path(path) => check_apart(path, &opts.data_dir)?,
        FetchSource::Kaggle { .. } => {
            // Without --download-dir, the error must not blame an option never given.
            let what = match opts.download_dir {
                Some(_) => "--download-dir",
                None => {
                    "the default download folder (beside the data directory, as no \
                     --download-dir was given)"
                }
            };
            let remedy = "keep them elsewhere with --download-dir DIR";
            check_kept_apart(what, remedy, &download_dir(opts), &opts.data_dir)?
        }
        // The hub's cache is checked once the client has found it.
        FetchSource::HuggingFace(_) | FetchSource::Synthetic(_) => {}
    }
    let mut importer = Importer::new(&opts.data_dir, kind, &origin, opts.val_fraction, opts.seed)?;
    match &opts.source {
        FetchSource::HuggingFace(hf) => import_hf(hf, &mut importer)?,
        FetchSource::Kaggle {
            endpoint,
            credentials,
        } => {
            let endpoint = endpoint
                .clone()
                .or_else(|| std::env::var("KAGGLE_API_ENDPOINT").ok())
                .unwrap_or_else(|| kaggle::DEFAULT_ENDPOINT.into());
            let zip = kaggle::fetch_zip(&endpoint, credentials.as_ref(), &download_dir(opts))?;
            import_download(&zip, &mut importer).map_err(|e| {
                // A corrupt entry: the next run must download a fresh copy, not reuse it.
                if let DataError::Zip { .. } = e {
                    let _ = std::fs::remove_file(&zip);
                }
                note_discarded_download(e)
            })?;
        }
        FetchSource::Path(path) => {
            if path.is_dir() {
                import_folder(path, &mut importer)?;
            } else if path.is_file() {
                import_zip(path, &mut importer)?;
            } else {
                return Err(DataError::Invalid(format!(
                    "{}: no such file or folder (expected the Kaggle zip or an extracted folder)",
                    path.display()
                )));
            }
        }
        FetchSource::Synthetic(cfg) => import_synthetic(cfg, &mut importer)?,
    }
    importer.finish()
}

fn describe(source: &FetchSource) -> (&'static str, String) {
    match source {
        FetchSource::HuggingFace(hf) => ("hf", format!("hf:{}", hf.repo)),
        FetchSource::Kaggle { .. } => ("kaggle", format!("kaggle:{}", kaggle::KAGGLE_DATASET)),
        FetchSource::Path(p) if p.is_dir() => ("folder", p.display().to_string()),
        FetchSource::Path(p) => ("zip", p.display().to_string()),
        FetchSource::Synthetic(cfg) => ("synthetic", format!("synthetic:seed={}", cfg.seed)),
    }
}

fn download_dir(opts: &FetchOptions) -> PathBuf {
    opts.download_dir
        .clone()
        .unwrap_or_else(|| default_download_dir(&opts.data_dir))
}

/// `path` absolute with its links resolved: where it is, or will be once created. Each
/// existing prefix is resolved before the next component, so a `..` leaves a link's target.
fn resolved(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let mut real = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                real.pop();
            }
            Component::CurDir => {}
            other => {
                real.push(other);
                if let Ok(target) = real.canonicalize() {
                    real = target;
                }
            }
        }
    }
    Some(real)
}

/// Downloads are kept for the next run, and the data directory is replaced wholesale: they
/// must not be kept inside it.
/// `remedy` says how to keep them elsewhere.
pub(crate) fn check_kept_apart(
    what: &str,
    remedy: &str,
    dir: &Path,
    data_dir: &Path,
) -> Result<()> {
    let (Some(dir_at), Some(data_at)) = (resolved(dir), resolved(data_dir)) else {
        return Ok(());
    };
    if dir_at.starts_with(&data_at) {
        return Err(DataError::Invalid(format!(
            "{what} {} is inside the data directory {}, which each import replaces: the \
             downloads would be deleted; {remedy}",
            dir.display(),
            data_dir.display()
        )));
    }
    Ok(())
}

/// The data directory is replaced wholesale, so it must not hold the source, nor the reverse.
fn check_apart(source: &Path, data_dir: &Path) -> Result<()> {
    let (Some(src), Some(dst)) = (resolved(source), resolved(data_dir)) else {
        return Ok(());
    };
    if src.starts_with(&dst) || dst.starts_with(&src) {
        return Err(DataError::Invalid(format!(
            "{} and the data directory {} overlap; import into another --data-dir",
            source.display(),
            data_dir.display()
        )));
    }
    Ok(())
}
