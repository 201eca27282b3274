//! The official archive through Kaggle's API.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::download::{http_client, Download};
use crate::error::{DataError, Result};
use crate::source::zip::{note_discarded_download, verify_zip, zip_summary};

pub const KAGGLE_DATASET: &str = "puneet6060/intel-image-classification";
pub const DEFAULT_ENDPOINT: &str = "https://www.kaggle.com";
pub const ZIP_NAME: &str = "intel-image-classification.zip";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KaggleCredentials {
    pub username: String,
    pub key: String,
}

const CREDENTIALS_HELP: &str = "Kaggle needs an API token: set KAGGLE_USERNAME and KAGGLE_KEY, \
or save kaggle.json from https://www.kaggle.com/settings (API, Create New Token) as \
~/.kaggle/kaggle.json";

impl KaggleCredentials {
    /// `KAGGLE_USERNAME` and `KAGGLE_KEY`, else `$KAGGLE_CONFIG_DIR/kaggle.json`, else
    /// `~/.kaggle/kaggle.json`, as the official client does.
    pub fn discover() -> Result<KaggleCredentials> {
        if let (Ok(username), Ok(key)) = (
            std::env::var("KAGGLE_USERNAME"),
            std::env::var("KAGGLE_KEY"),
        ) {
            return Ok(KaggleCredentials { username, key });
        }
        let dir = std::env::var_os("KAGGLE_CONFIG_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kaggle")));
        let Some(path) = dir.map(|d| d.join("kaggle.json")) else {
            return Err(DataError::Invalid(CREDENTIALS_HELP.into()));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            DataError::Invalid(format!(
                "cannot read {}: {e}. {CREDENTIALS_HELP}",
                path.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| DataError::Invalid(format!("{}: {e}. {CREDENTIALS_HELP}", path.display())))
    }
}

/// `{endpoint}/api/v1/datasets/download/puneet6060/intel-image-classification`.
pub fn download_url(endpoint: &str) -> String {
    format!(
        "{}/api/v1/datasets/download/{KAGGLE_DATASET}",
        endpoint.trim_end_matches('/')
    )
}

/// Downloads (or reuses an earlier, intact download of) the archive into `download_dir`,
/// verified as a zip in the expected layout. Reusing it needs no `credentials`; without
/// them, a download discovers them as the Kaggle CLI does.
pub fn fetch_zip(
    endpoint: &str,
    credentials: Option<&KaggleCredentials>,
    download_dir: &Path,
) -> Result<PathBuf> {
    let dest = download_dir.join(ZIP_NAME);
    if dest.is_file() {
        match verify_zip(&dest) {
            Ok(_) => {
                tracing::info!("reusing {}", dest.display());
                return Ok(dest);
            }
            Err(e) => {
                tracing::warn!("{e}; downloading again");
                std::fs::remove_file(&dest).map_err(|e| DataError::io(&dest, e))?;
            }
        }
    }
    let credentials = match credentials {
        Some(given) => given.clone(),
        None => KaggleCredentials::discover()?,
    };
    let url = download_url(endpoint);
    let access_hint = format!(
        "Check the credentials (401/403 also happen before accepting the data set's terms on \
         its Kaggle page). {CREDENTIALS_HELP}."
    );
    let download = Download {
        url: &url,
        auth: Some((&credentials.username, &credentials.key)),
        hint: "Other sources: --from PATH (a downloaded zip or extracted folder), --source hf, \
               --synthetic.",
        access_hint: &access_hint,
    };
    // Complete once its central directory, at the end, reads.
    download
        .run(&http_client()?, &dest, |part| zip_summary(part).map(drop))
        .map_err(note_discarded_download)?;
    let summary = zip_summary(&dest).inspect_err(|_| {
        let _ = std::fs::remove_file(&dest);
    });
    let summary = summary.map_err(note_discarded_download)?;
    if summary.train == 0 {
        // A complete zip, not a cut one: downloading it again gives the same zip.
        let _ = std::fs::remove_file(&dest);
        return Err(DataError::Layout(format!(
            "{url} sent a complete zip of {} entries, but no seg_train/<class>/<image> entries \
             among them: not the Intel Image Classification archive's layout; the download was \
             deleted. Downloading it again gives the same zip: use --from PATH with the \
             archive, or --source hf.",
            summary.entries
        )));
    }
    Ok(dest)
}
