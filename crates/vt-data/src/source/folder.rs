//! An extracted folder in the Kaggle layout.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::import::{Importer, RawImage};
use crate::layout::{place, Placement};
use crate::source::MAX_FILE_BYTES;

/// Imports every file under `root`, in sorted order so runs are reproducible.
pub fn import_folder(root: &Path, importer: &mut Importer) -> Result<()> {
    if !root.is_dir() {
        return Err(DataError::Invalid(format!(
            "{}: not a folder",
            root.display()
        )));
    }
    // Each folder with whether a link led to it. A link to a folder already listed (one
    // above it, say, which would list its images forever) is not followed; folders
    // themselves are always listed. (A folder whose real path cannot be told is listed.)
    let mut stack = vec![(root.to_path_buf(), false)];
    let mut listed = HashSet::new();
    let mut files = Vec::new();
    while let Some((dir, linked)) = stack.pop() {
        if let Ok(real) = dir.canonicalize() {
            if !listed.insert(real) && linked {
                tracing::warn!(
                    "{}: a link to a folder already listed, not followed",
                    dir.display()
                );
                continue;
            }
        }
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| DataError::io(&dir, e))?
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| DataError::io(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            // Follows symlinks, so a linked-in folder of images works. A dangling link or
            // unreadable file is one unusable file, reported below if it is in the layout.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    let linked = entry.file_type().is_ok_and(|t| t.is_symlink());
                    stack.push((path, linked));
                }
                Ok(meta) => files.push((path, Ok(meta.len()))),
                Err(e) => files.push((path, Err(e))),
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, len) in files {
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        match place(&rel) {
            Placement::Ignore => {}
            Placement::Unplaced(reason) => importer.skip(rel, reason)?,
            Placement::Image { role, name } => {
                let len = match len {
                    Ok(len) => len,
                    Err(e) => {
                        importer.skip(rel, unreadable(&e))?;
                        continue;
                    }
                };
                if len > MAX_FILE_BYTES {
                    importer.skip(rel, format!("file of {len} bytes is too large"))?;
                    continue;
                }
                let bytes = match fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        importer.skip(rel, unreadable(&e))?;
                        continue;
                    }
                };
                importer.add(RawImage {
                    source_path: rel,
                    role,
                    name,
                    bytes,
                })?;
            }
        }
    }
    Ok(())
}

fn unreadable(e: &std::io::Error) -> String {
    format!("cannot read the file: {e}")
}
