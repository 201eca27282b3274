//! The Kaggle archive (`seg_train/seg_train/<class>/…`, `seg_test/seg_test/<class>/…`,
//! `seg_pred/seg_pred/…`) or any zip in that layout.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use zip::ZipArchive;

use crate::error::{DataError, Result};
use crate::import::{Importer, RawImage};
use crate::layout::{place, Placement, Role};
use crate::source::MAX_FILE_BYTES;

/// What a zip holds, from its central directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZipSummary {
    pub entries: usize,
    pub train: usize,
    pub test: usize,
    pub pred: usize,
}

fn open(path: &Path) -> Result<ZipArchive<File>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    ZipArchive::new(file).map_err(|e| DataError::Zip {
        path: path.to_path_buf(),
        message: format!("{e} (truncated or not a zip)"),
    })
}

/// For an archive that we downloaded and deleted because it failed: says that fetching again
/// downloads a fresh copy, which the user's own `--from` file would not get.
pub(crate) fn note_discarded_download(e: DataError) -> DataError {
    const NOTE: &str = "the download was deleted: run fetch-data again for a fresh copy";
    match e {
        DataError::Zip { path, message } => DataError::Zip {
            path,
            message: format!("{message}; {NOTE}"),
        },
        DataError::Parquet { path, message } => DataError::Parquet {
            path,
            message: format!("{message}; {NOTE}"),
        },
        other => other,
    }
}

/// What a readable zip holds, by the layout's roles, from its central directory (which sits
/// at the end, so a truncated download fails here).
pub fn zip_summary(path: &Path) -> Result<ZipSummary> {
    let archive = open(path)?;
    let mut summary = ZipSummary {
        entries: archive.len(),
        ..ZipSummary::default()
    };
    for name in archive.file_names() {
        if let Placement::Image { role, .. } = place(name) {
            match role {
                Role::Train(_) => summary.train += 1,
                Role::Test(_) => summary.test += 1,
                Role::Pred => summary.pred += 1,
            }
        }
    }
    Ok(summary)
}

/// Checks that `path` is a readable zip (its central directory, which sits at the end, so
/// a truncated download fails here) holding training images in the expected layout.
pub fn verify_zip(path: &Path) -> Result<ZipSummary> {
    let summary = zip_summary(path)?;
    if summary.train == 0 {
        return Err(DataError::Zip {
            path: path.to_path_buf(),
            message: format!(
                "no seg_train/<class>/<image> entries among its {} entries; is it the Intel \
                 Image Classification archive?",
                summary.entries
            ),
        });
    }
    Ok(summary)
}

/// Imports every image entry; unreadable entries (bad CRC, truncated data) are skipped.
pub fn import_zip(path: &Path, importer: &mut Importer) -> Result<ZipSummary> {
    let summary = verify_zip(path)?;
    let mut archive = open(path)?;
    for i in 0..archive.len() {
        let mut entry = match archive.by_index(i) {
            Ok(entry) => entry,
            Err(e) => {
                importer.skip(format!("{}#{i}", path.display()), e.to_string())?;
                continue;
            }
        };
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().to_string();
        let (role, file_name) = match place(&name) {
            Placement::Ignore => continue,
            Placement::Unplaced(reason) => {
                importer.skip(name, reason)?;
                continue;
            }
            Placement::Image { role, name } => (role, name),
        };
        if entry.size() > MAX_FILE_BYTES {
            importer.skip(
                name,
                format!("entry of {} bytes is too large", entry.size()),
            )?;
            continue;
        }
        let declared = entry.size();
        let mut bytes = Vec::with_capacity(declared as usize);
        // Reading to the end checks the entry's CRC. At most one byte past the declared size
        // is read: an entry inflating past it (a zip bomb's) is not held in memory.
        if let Err(e) = entry.by_ref().take(declared + 1).read_to_end(&mut bytes) {
            importer.skip(name, format!("unreadable zip entry: {e}"))?;
            continue;
        }
        if bytes.len() as u64 > declared {
            importer.skip(
                name,
                format!("zip entry holds more than the {declared} bytes it declares"),
            )?;
            continue;
        }
        importer.add(RawImage {
            source_path: name,
            role,
            name: file_name,
            bytes,
        })?;
    }
    Ok(summary)
}
