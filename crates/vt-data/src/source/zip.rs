//! The Kaggle archive (`seg_train/seg_train/<class>/…`, `seg_test/seg_test/<class>/…`,
//! `seg_pred/seg_pred/…`) or any zip in that layout.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use zip::result::ZipError;
use zip::ZipArchive;

use crate::error::{DataError, Result};
use crate::import::{Importer, RawImage};
use crate::layout::{place, train_class_of_folder, Placement, Role};
use crate::source::{too_large, MAX_FILE_BYTES};

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
    note_discarded(
        e,
        "the download was deleted: run fetch-data again for a fresh copy",
    )
}

/// `e`, about a file deleted for it, with `note` (what was done, and what to do).
pub(crate) fn note_discarded(e: DataError, note: &str) -> DataError {
    match e {
        DataError::Zip { path, message } => DataError::Zip {
            path,
            message: format!("{message}; {note}"),
        },
        DataError::Parquet { path, message } => DataError::Parquet {
            path,
            message: format!("{message}; {note}"),
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
        if let Placement::Image { role, .. } = place(&slashed(name)) {
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

/// Entries that a later one of the same name hides, once for each: the zip crate keeps one
/// entry per name, so they would vanish without a word. Read from the central directory's
/// records, which list every entry.
fn replaced_entries(path: &Path, archive: &ZipArchive<File>) -> Result<Vec<String>> {
    const RECORD: u32 = 0x0201_4b50;
    let io = |e| DataError::io(path, e);
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    reader
        .seek(SeekFrom::Start(archive.central_directory_start()))
        .map_err(io)?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut records = 0;
    let mut header = [0u8; 46];
    // The archive opened, so its central directory reads; a record cut short ends the scan.
    while reader.read_exact(&mut header).is_ok()
        && u32::from_le_bytes([header[0], header[1], header[2], header[3]]) == RECORD
    {
        let field = |at: usize| u64::from(u16::from_le_bytes([header[at], header[at + 1]]));
        let mut name = vec![0; field(28) as usize];
        reader.read_exact(&mut name).map_err(io)?;
        reader
            .seek_relative((field(30) + field(32)) as i64)
            .map_err(io)?;
        *seen
            .entry(String::from_utf8_lossy(&name).into_owned())
            .or_default() += 1;
        records += 1;
    }
    if records <= archive.len() {
        return Ok(Vec::new());
    }
    let mut replaced: Vec<String> = seen
        .into_iter()
        .flat_map(|(name, n)| std::iter::repeat_n(name, n - 1))
        .collect();
    replaced.sort();
    Ok(replaced)
}

/// Imports every image entry of the user's own archive; unreadable entries (bad CRC,
/// truncated data) are skipped.
pub fn import_zip(path: &Path, importer: &mut Importer) -> Result<ZipSummary> {
    import_entries(path, importer, false)
}

/// Imports an archive that we downloaded: an unreadable entry means a corrupt download, and
/// fails as [`DataError::Zip`] (the caller deletes it) instead of importing the rest.
pub(crate) fn import_download(path: &Path, importer: &mut Importer) -> Result<ZipSummary> {
    import_entries(path, importer, true)
}

/// An entry's name: its bytes as UTF-8 where they are UTF-8, as Info-ZIP's `zip` on Linux
/// writes them without the flag that says so (which would make them CP437, `forêt` read as
/// `for├¬t`); as the archive says otherwise.
fn entry_name(entry: &zip::read::ZipFile<'_, impl std::io::Read>) -> String {
    match std::str::from_utf8(entry.name_raw()) {
        Ok(name) => slashed(name),
        Err(_) => slashed(entry.name()),
    }
}

/// An entry's name with '/' between its folders: zips written on Windows may use '\\'.
fn slashed(name: &str) -> String {
    name.replace('\\', "/")
}

fn import_entries(path: &Path, importer: &mut Importer, downloaded: bool) -> Result<ZipSummary> {
    let summary = verify_zip(path)?;
    let mut archive = open(path)?;
    for name in replaced_entries(path, &archive)? {
        importer.skip(
            name,
            "an entry of the same name follows it in the archive; only the last one is imported",
        )?;
    }
    // Records an unreadable entry: skipped in the user's archive, fatal in a download.
    let unreadable = |importer: &mut Importer, name: String, reason: String| {
        if downloaded {
            return Err(DataError::Zip {
                path: path.to_path_buf(),
                message: format!("entry {name}: {reason}"),
            });
        }
        importer.skip(name, reason)
    };
    // In the order of their paths, as a folder's files are imported: which of two photos of
    // one name (in two subfolders) keeps it is the same for a zip and its extracted folder.
    let mut order: Vec<usize> = (0..archive.len()).collect();
    order.sort_by_cached_key(|&i| {
        archive
            .name_for_index(i)
            .map(|name| PathBuf::from(slashed(name)))
    });
    for i in order {
        // Named before it is opened: an entry whose local header is broken has no name then.
        let listed = archive
            .name_for_index(i)
            .map_or_else(|| format!("{}#{i}", path.display()), slashed);
        let mut entry = match archive.by_index(i) {
            Ok(entry) => entry,
            Err(e) => {
                match place(&listed) {
                    // Left out had it opened: it fails nothing.
                    Placement::Ignore => {}
                    // A compression method this build does not read is no corruption.
                    Placement::Image { .. } if !matches!(e, ZipError::UnsupportedArchive(_)) => {
                        unreadable(importer, listed, e.to_string())?
                    }
                    _ => importer.skip(listed, e.to_string())?,
                }
                continue;
            }
        };
        let name = entry_name(&entry);
        if entry.is_dir() {
            if let Some(class) = train_class_of_folder(&name) {
                importer.note_class_folder(&class);
            }
            continue;
        }
        let (role, file_name) = match place(&name) {
            Placement::Ignore => continue,
            Placement::Unplaced(reason) => {
                importer.skip(name, reason)?;
                continue;
            }
            Placement::Image { role, name } => (role, name),
        };
        if entry.size() > MAX_FILE_BYTES {
            importer.skip(name, too_large("entry", entry.size()))?;
            continue;
        }
        let declared = entry.size();
        let mut bytes = Vec::with_capacity(declared as usize);
        // Reading to the end checks the entry's CRC. At most one byte past the declared size
        // is read: an entry inflating past it (a zip bomb's) is not held in memory.
        if let Err(e) = entry.by_ref().take(declared + 1).read_to_end(&mut bytes) {
            unreadable(importer, name, format!("unreadable zip entry: {e}"))?;
            continue;
        }
        if bytes.len() as u64 > declared {
            unreadable(
                importer,
                name,
                format!("zip entry holds more than the {declared} bytes it declares"),
            )?;
            continue;
        }
        importer.add(RawImage {
            source_path: name,
            role,
            name: file_name,
            named_by_source: true,
            bytes,
        })?;
    }
    Ok(summary)
}
