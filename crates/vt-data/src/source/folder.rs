//! An extracted folder in the Kaggle layout.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::{DataError, Result};
use crate::image_files::escaped;
use crate::import::{Importer, RawImage};
use crate::layout::{
    outside_the_layout, place, role_of_folder, train_class_of_folder, Placement, Role,
};
use crate::source::{too_large, MAX_FILE_BYTES};

/// Imports every file under `root`, in sorted order so runs are reproducible.
pub fn import_folder(root: &Path, importer: &mut Importer) -> Result<()> {
    if !root.is_dir() {
        return Err(DataError::Invalid(format!(
            "{}: not a folder",
            root.display()
        )));
    }
    // Each folder is listed once, whatever leads to it: a link to a folder already listed
    // (one above it, say, which would list its images forever) or to one that holds the
    // source is not followed. The source's own folders are listed before any link is
    // followed, and links in the order of their paths, so that which of two ways to a
    // folder counts does not depend on the order they are found in. (A folder whose real
    // path cannot be told is listed.)
    let mut folders = vec![root.to_path_buf()];
    let mut links = BTreeSet::new();
    // Each folder listed, by its real path: how, and by which path.
    let mut listed: HashMap<PathBuf, Listed> = HashMap::new();
    let mut files = Vec::new();
    while let Some((dir, linked)) = folders
        .pop()
        .map(|dir| (dir, false))
        .or_else(|| links.pop_first().map(|dir| (dir, true)))
    {
        if let Ok(real) = dir.canonicalize() {
            // A loop (`photos/forest/up -> ..`), or above the source (the home folder):
            // what else the folder above holds is no photo of the folder the link is in.
            let parent_real = dir.parent().and_then(|parent| parent.canonicalize().ok());
            if linked && parent_real.is_some_and(|parent| parent.starts_with(&real)) {
                tracing::warn!(
                    "{}: a link to a folder that holds it, not followed",
                    dir.display()
                );
                continue;
            }
            let rel = relative(root, &dir);
            let here = Listed {
                role: role_of_folder(&rel),
                outside: outside_the_layout(&rel),
                dir: dir.clone(),
            };
            match listed.get(&real) {
                // Outside the layout (`photos/forest`, which a class links to): its files
                // were imported nowhere, so they are listed again, for this path's split.
                Some(first) if first.outside && here.role.is_some() => {
                    files.retain(|(path, _): &(PathBuf, _)| path.parent() != Some(&first.dir));
                }
                // Its photos are filed by the path that listed it: this one's class or split
                // does not get them, which the manifest says (and an error about a class left
                // without photos shows).
                Some(first) if here.role.is_some() && first.role != here.role => {
                    let filed = match &first.role {
                        Some(Role::Train(class)) => format!("as part of class {class:?}"),
                        Some(Role::Test(class)) => format!("as test images of class {class:?}"),
                        Some(Role::Pred) => "as unlabelled (seg_pred) images".into(),
                        None => "through another path".into(),
                    };
                    importer.skip(
                        reported(root, &dir),
                        format!(
                            "a link to {}, a folder imported already {filed}: its photos are \
                             filed there, once",
                            real.display()
                        ),
                    )?;
                    continue;
                }
                Some(_) => {
                    tracing::warn!(
                        "{}: a folder already listed (through a link), not listed again",
                        dir.display()
                    );
                    continue;
                }
                None => {}
            }
            listed.insert(real, here);
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
                    if let Some(class) = train_class_of_folder(&relative(root, &path)) {
                        importer.note_class_folder(&class);
                    }
                    if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                        links.insert(path);
                    } else {
                        folders.push(path);
                    }
                }
                // A FIFO would block the import forever and a device (`/dev/zero`) fill
                // memory: only regular files are read.
                Ok(meta) if !meta.is_file() => {
                    files.push((path, Err("not a regular file".to_string())))
                }
                Ok(meta) => files.push((path, Ok(meta.len()))),
                Err(e) => files.push((path, Err(unreadable(&e)))),
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, len) in files {
        // Placed by its name as text; reported by one that tells it from a name differing
        // only in bytes that are not UTF-8.
        let rel = reported(root, &path);
        match place(&relative(root, &path)) {
            Placement::Ignore => {}
            Placement::Unplaced(reason) => importer.skip(rel, reason)?,
            Placement::Image { role, name } => {
                let len = match len {
                    Ok(len) => len,
                    Err(reason) => {
                        importer.skip(rel, reason)?;
                        continue;
                    }
                };
                if len > MAX_FILE_BYTES {
                    importer.skip(rel, too_large("file", len))?;
                    continue;
                }
                let bytes = match read_capped(&path) {
                    Ok(bytes) if bytes.len() as u64 > MAX_FILE_BYTES => {
                        importer.skip(rel, "file grew past the size limit while read")?;
                        continue;
                    }
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
                    named_by_source: true,
                    bytes,
                })?;
            }
        }
    }
    Ok(())
}

/// How a folder was listed: where the path that listed it files its photos (a class of a
/// split, or none), whether that path lies outside the layout, and the path.
struct Listed {
    role: Option<Role>,
    outside: bool,
    dir: PathBuf,
}

/// `path` relative to `root`, '/'-separated, bytes that are not UTF-8 read as U+FFFD (a
/// class so named is refused). A `\\` in a name stays: on Unix it is one of its
/// characters, not a separator (a class so named is refused too).
fn relative(root: &Path, path: &Path) -> String {
    joined(root, path, |name| name.to_string_lossy().into_owned())
}

/// [`relative`] as the manifest reports a file's path: bytes that are not UTF-8 written
/// `\xNN`, and so a `\` as `\\` (the name `a\xfe` is no byte).
fn reported(root: &Path, path: &Path) -> String {
    joined(root, path, |name| escaped(name.as_encoded_bytes()))
}

/// The names of `path` below `root`, each as `name` writes it, joined by '/'.
fn joined(root: &Path, path: &Path, name: impl Fn(&OsStr) -> String) -> String {
    let parts: Vec<String> = path
        .strip_prefix(root)
        .unwrap_or(path)
        .components()
        .filter_map(|part| match part {
            Component::Normal(part) => Some(name(part)),
            _ => None,
        })
        .collect();
    parts.join("/")
}

/// At most one byte past [`MAX_FILE_BYTES`]: a file that grew since it was listed is not
/// read whole.
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn unreadable(e: &std::io::Error) -> String {
    format!("cannot read the file: {e}")
}
