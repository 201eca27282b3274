//! The image files that paths given on a command line stand for (`vt-serve predict`,
//! `vt-train explain`): a file as it is, a folder its image files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// The extensions of the image files a folder contributes: what the decoder reads. Other
/// files (a README, a manifest) are left out; a file named as an image is still read by its
/// content.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// Whether a file name has one of [`IMAGE_EXTENSIONS`] (in any case).
pub fn is_image_name(name: &Path) -> bool {
    name.extension()
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// A path as reports write it (JSON lines, CSV rows), as the import's manifest writes its
/// paths: the bytes that are not UTF-8 written `\xNN`, and so, on Unix where it is a name's
/// character, each `\` as `\\`, which keeps every file traceable and apart from the others
/// where U+FFFD would stand for any byte. On Windows, where `\` separates, as it is.
pub fn path_text(path: &Path) -> String {
    if cfg!(unix) {
        escaped(path.as_os_str().as_encoded_bytes())
    } else {
        path.to_string_lossy().into_owned()
    }
}

/// `bytes` as text, those that are not UTF-8 written `\xNN`, and so a `\` as `\\` (the name
/// `a\xfe` is no byte).
pub fn escaped(bytes: &[u8]) -> String {
    bytes
        .utf8_chunks()
        .map(|chunk| {
            let invalid: String = chunk
                .invalid()
                .iter()
                .map(|byte| format!("\\x{byte:02x}"))
                .collect();
            format!("{}{invalid}", chunk.valid().replace('\\', "\\\\"))
        })
        .collect()
}

/// Serialises a path as [`path_text`] writes it: serde's own refuses one that is not UTF-8.
pub fn serialize_path<S: serde::Serializer>(
    path: &Path,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(&path_text(path))
}

/// Each given file as it is, and each folder's image files in the order of their paths,
/// subfolders included (hidden ones left out). A folder without image files is refused.
pub fn image_files(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in given {
        if path.is_dir() {
            let before = files.len();
            add_folder(path, &mut Listing::default(), &mut files)?;
            if files.len() == before {
                return Err(DataError::NoImageFiles(path.clone()));
            }
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// `folder`'s image files, subfolders included, in the order of their paths (none for an
/// empty folder).
pub fn folder_image_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    add_folder(folder, &mut Listing::default(), &mut files)?;
    Ok(files)
}

/// The real paths of the folders of one listing.
#[derive(Default)]
struct Listing {
    /// Where it started.
    top: Option<PathBuf>,
    listed: HashSet<PathBuf>,
}

/// Adds `folder`'s image files, subfolders included, in the order of their paths. Links to
/// folders are followed, as torchvision's ImageFolder and the import follow them, except to
/// a folder listed already, or at or above this one or the top (which would list its images
/// again, or forever, or another folder's).
fn add_folder(folder: &Path, listing: &mut Listing, files: &mut Vec<PathBuf>) -> Result<()> {
    // (A folder whose real path cannot be told is listed.)
    let real = folder.canonicalize().ok();
    if let Some(real) = &real {
        listing.top.get_or_insert_with(|| real.clone());
        listing.listed.insert(real.clone());
    }
    let listing_error = |cause| DataError::io(folder, cause);
    let mut entries = std::fs::read_dir(folder)
        .map_err(listing_error)?
        .map(|entry| entry.and_then(|e| Ok((e.path(), e.file_type()?))))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(listing_error)?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            let target = path.canonicalize().ok();
            let above = |folder: &Option<PathBuf>, target: &Path| {
                folder.as_ref().is_some_and(|f| f.starts_with(target))
            };
            let again = target.as_ref().is_some_and(|target| {
                listing.listed.contains(target)
                    || above(&real, target)
                    || above(&listing.top, target)
            });
            if again {
                // (A folder itself is listed again only after a link led to it.)
                if kind.is_symlink() {
                    tracing::warn!(
                        "{}: a link to a folder listed already or being listed, not followed",
                        path.display()
                    );
                }
                continue;
            }
            add_folder(&path, listing, files)?;
        } else if is_image_name(&path) {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A name holding the text `\xfe` and one holding the byte 0xfe are written apart.
    #[test]
    fn paths_that_are_not_utf8_are_written_apart_from_any_other() {
        use std::os::unix::ffi::OsStrExt;
        let byte = Path::new(std::ffi::OsStr::from_bytes(b"p/caf\xe9.jpg"));
        let text = Path::new(r"p/caf\xe9.jpg");
        assert_eq!(path_text(byte), r"p/caf\xe9.jpg");
        assert_eq!(path_text(text), r"p/caf\\xe9.jpg");
        assert_eq!(path_text(Path::new("p/été.jpg")), "p/été.jpg");
    }
}
