//! A dataset repository's folder in the Hugging Face cache, laid out as `huggingface_hub`
//! and hf-hub lay it out, so that the Python tools and vt share one download:
//! - `blobs/<name>`: each file's content once, named as `huggingface_hub` names it (an LFS
//!   file by the SHA-256 of its content, a file kept in git by its git object id), so that a
//!   file unchanged at a new commit is reused, whichever tool downloaded it;
//! - `snapshots/<commit>/<path>`: the repository at a commit, each file a link to its blob
//!   (a copy where symlinks are not available, as hf-hub does);
//! - `refs/<revision>`: the commit a branch or tag named when it was last downloaded;
//! - `trees/<commit>.json`: the commit's listing, as `huggingface_hub`'s `snapshot_download`
//!   writes it, or vt's own `vt-trees/<commit>.json`: what an offline import
//!   (`HF_HUB_OFFLINE`) checks the snapshot against. vt writes its own, since the listing
//!   hf-hub returns lacks the LFS fields `huggingface_hub` expects in its file.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

pub struct RepoCache {
    dir: PathBuf,
}

/// A file of a repository's listing at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    pub path: String,
    pub size: u64,
    /// Its git object id.
    pub oid: String,
}

/// The listing file's format, `huggingface_hub`'s (whose entries have more fields).
#[derive(Serialize, Deserialize)]
struct Listing {
    format_version: u32,
    files: BTreeMap<String, ListingEntry>,
}

#[derive(Serialize, Deserialize)]
struct ListingEntry {
    size: u64,
    blob_id: String,
}

const LISTING_FORMAT: u32 = 1;

/// The start of the name of vt's temporaries in a cached repository's folder.
const TEMPORARY: &str = ".vt.tmp-";

/// A temporary lives while one link or one small file is written: one this old is a killed
/// fetch's.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

impl RepoCache {
    /// The folder of dataset repository `owner/name` in the hub cache `cache_dir`.
    pub fn new(cache_dir: &Path, owner: &str, name: &str) -> Self {
        RepoCache {
            dir: cache_dir.join(format!("datasets--{owner}--{name}")),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the folders a cached repository has: the hub's tools take one without
    /// `snapshots/` (a first download that failed) for a corrupted cache.
    pub fn prepare(&self) -> Result<()> {
        for folder in ["blobs", "snapshots"] {
            let path = self.dir.join(folder);
            fs::create_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
        }
        Ok(())
    }

    fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// Where the repository's `path` at `commit` is; `None` for a path that is not a plain
    /// relative one (the names come from the hub: none may climb out of the cache).
    pub fn snapshot_path(&self, commit: &str, path: &str) -> Option<PathBuf> {
        plain_relative(path).then(|| self.snapshot_dir(commit).join(path))
    }

    /// The blob named `name`; `None` for a name that is no plain file name.
    pub fn blob_path(&self, name: &str) -> Option<PathBuf> {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        plain.then(|| self.dir.join("blobs").join(name))
    }

    /// A blob holding the file of git object id `oid` and `size` bytes, whoever downloaded
    /// it: the blob of that name, or one of that size whose content has that id (an LFS
    /// file's blob is named by its SHA-256, which the listing does not give). An `oid` that
    /// is no git object id can only be found by name.
    pub fn find_blob(&self, size: u64, oid: &str) -> Result<Option<PathBuf>> {
        let has_size =
            |path: &Path| fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size);
        if !is_git_object_id(oid) {
            return Ok(self.blob_path(oid).filter(|blob| has_size(blob)));
        }
        let blobs = self.dir.join("blobs");
        let Ok(entries) = fs::read_dir(&blobs) else {
            return Ok(None);
        };
        for entry in entries {
            let path = entry.map_err(|e| DataError::io(&blobs, e))?.path();
            if path.extension().is_some() || !has_size(&path) {
                continue;
            }
            // A blob that went meanwhile (another tool cleaning the cache) is no candidate.
            match content_name(&path, size, oid) {
                Ok(Some(_)) => return Ok(Some(path)),
                Ok(None) => {}
                Err(e) => tracing::warn!("{e}; left out of the search for {oid}"),
            }
        }
        Ok(None)
    }

    /// The partial download of the file of object id `oid`; `None` for an id that is no
    /// plain file name.
    pub fn part_path(&self, oid: &str) -> Option<PathBuf> {
        self.blob_path(oid)
            .map(|blob| blob.with_file_name(format!("{oid}.part")))
    }

    /// Removes what earlier fetches left once the files a fetch needs are cached: the
    /// partial downloads in `blobs/` (each is then another revision's, or its file was
    /// cached another way: found at another commit, or downloaded by another tool), except
    /// one a fetch is writing (locked), and the temporaries of killed fetches.
    pub fn remove_leftovers(&self) {
        if let Ok(entries) = fs::read_dir(self.dir.join("blobs")) {
            for path in entries.flatten().map(|entry| entry.path()) {
                if path.extension().is_none_or(|e| e != "part") {
                    continue;
                }
                // Removed while locked: another fetch may take it the moment it is unlocked.
                if let Ok(file) = fs::File::open(&path) {
                    if file.try_lock().is_ok() {
                        remove_leftover(&path);
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten().filter(is_stale_temporary) {
                remove_leftover(&entry.path());
            }
        }
    }

    /// Makes `snapshot` (from [`Self::snapshot_path`]) the blob `blob`'s, replacing whatever
    /// was there, in one rename: another fetch linking the same file meanwhile is no error.
    /// The link is made outside `snapshots/`, where a killed run's would read as a file of
    /// the repository.
    pub fn link(&self, snapshot: &Path, blob: &Path) -> Result<()> {
        let parent = snapshot.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let temporary = self.temporary();
        link_or_copy(blob, snapshot, &temporary).map_err(|e| DataError::io(&temporary, e))?;
        fs::rename(&temporary, snapshot).map_err(|e| DataError::io(snapshot, e))
    }

    /// A new temporary file's path, beside the repository's folders: not among the
    /// snapshots, refs or listings, where the hub's tools would take a stale one for theirs.
    /// Random, as processes of two machines (or containers) sharing the cache may have one
    /// pid.
    fn temporary(&self) -> PathBuf {
        self.dir.join(format!(
            "{TEMPORARY}{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ))
    }

    /// Records that `revision` named `commit`; a commit names itself and is not recorded.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if is_commit(revision) {
            return Ok(());
        }
        match self.ref_path(revision) {
            Some(path) => self.write_atomically(&path, commit.as_bytes()),
            None => Ok(()),
        }
    }

    /// The commit `revision` named at its last download, or `revision` itself when it is a
    /// commit id; `None` when it was never downloaded.
    pub fn resolve(&self, revision: &str) -> Result<Option<String>> {
        if is_commit(revision) {
            return Ok(Some(revision.to_ascii_lowercase()));
        }
        let Some(path) = self.ref_path(revision) else {
            return Ok(None);
        };
        match fs::read_to_string(&path) {
            Ok(text) if is_commit(text.trim()) => Ok(Some(text.trim().to_string())),
            Ok(text) => Err(DataError::Layout(format!(
                "{} holds {:?}, not a commit id: delete it and download again",
                path.display(),
                text.trim()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataError::io(&path, e)),
        }
    }

    fn ref_path(&self, revision: &str) -> Option<PathBuf> {
        plain_relative(revision).then(|| self.dir.join("refs").join(revision))
    }

    /// Records the repository's listing at `commit`, once its snapshot holds the files an
    /// import needs.
    pub fn write_listing(&self, commit: &str, files: &[ListedFile]) -> Result<()> {
        let listing = Listing {
            format_version: LISTING_FORMAT,
            files: files
                .iter()
                .map(|f| {
                    let entry = ListingEntry {
                        size: f.size,
                        blob_id: f.oid.clone(),
                    };
                    (f.path.clone(), entry)
                })
                .collect(),
        };
        let path = self.dir.join("vt-trees").join(format!("{commit}.json"));
        let text = serde_json::to_string_pretty(&listing)
            .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
        self.write_atomically(&path, text.as_bytes())
    }

    /// The listing at `commit` that vt or `huggingface_hub` recorded, as paths and sizes;
    /// `None` when neither did.
    pub fn read_listing(&self, commit: &str) -> Result<Option<Vec<(String, u64)>>> {
        for folder in ["vt-trees", "trees"] {
            let path = self.dir.join(folder).join(format!("{commit}.json"));
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DataError::io(&path, e)),
            };
            let listing: Listing = serde_json::from_str(&text).map_err(|e| {
                DataError::Layout(format!(
                    "{}: not a listing of the repository ({e}): delete it and download again",
                    path.display()
                ))
            })?;
            if listing.format_version != LISTING_FORMAT {
                continue;
            }
            return Ok(Some(
                listing
                    .files
                    .into_iter()
                    .map(|(path, entry)| (path, entry.size))
                    .collect(),
            ));
        }
        Ok(None)
    }

    /// Writes `path` through a new temporary file, renamed into place.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let temporary = self.temporary();
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.sync_all()
            })
            .map_err(|e| DataError::io(&temporary, e))?;
        fs::rename(&temporary, path).map_err(|e| DataError::io(path, e))
    }

    /// The newest `.zip` file of any snapshot, with its commit: should the cache hold
    /// several commits, the one most recently downloaded.
    pub fn newest_archive(&self) -> Option<(String, PathBuf)> {
        fs::read_dir(self.dir.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|commit| {
                let name = commit.file_name().to_string_lossy().into_owned();
                fs::read_dir(commit.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(move |entry| (name.clone(), entry.path()))
            })
            .filter(|(_, path)| path.extension().is_some_and(|e| e == "zip"))
            .filter_map(|(commit, path)| {
                Some((fs::metadata(&path).ok()?.modified().ok()?, commit, path))
            })
            .max()
            .map(|(_, commit, path)| (commit, path))
    }
}

/// A commit id: 40 hex digits.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A git object id (SHA-1): 40 hex digits.
pub fn is_git_object_id(oid: &str) -> bool {
    is_commit(oid)
}

/// The name the hub's tools give the blob of `path` (`size` bytes) when it is the file of
/// git object id `oid`: `oid` when git holds the file itself, the SHA-256 of its content
/// when git holds its LFS pointer; `None` when it is neither.
pub fn content_name(path: &Path, size: u64, oid: &str) -> Result<Option<String>> {
    let mut file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut sha256 = Sha256::new();
    let mut sha1 = Sha1::new();
    sha1.update(format!("blob {size}\0"));
    let mut buffer = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        sha256.update(&buffer[..n]);
        sha1.update(&buffer[..n]);
    }
    if hex(&sha1.finalize()).eq_ignore_ascii_case(oid) {
        return Ok(Some(oid.to_ascii_lowercase()));
    }
    let sha256 = hex(&sha256.finalize());
    let pointer =
        format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n");
    let pointer_id = Sha1::new()
        .chain_update(format!("blob {}\0", pointer.len()))
        .chain_update(pointer)
        .finalize();
    Ok(hex(&pointer_id).eq_ignore_ascii_case(oid).then_some(sha256))
}

/// A temporary of [`RepoCache::temporary`] left longer than one lives: a killed fetch's.
fn is_stale_temporary(entry: &fs::DirEntry) -> bool {
    entry.file_name().to_string_lossy().starts_with(TEMPORARY)
        && entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() > STALE_TEMPORARY)
}

fn remove_leftover(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => tracing::info!("removed {}, no longer needed", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A relative symlink at `at`, as the hub's tools make, so the cache may be moved whole: its
/// target relative to `link`, where it is renamed to.
#[cfg(unix)]
fn link_or_copy(blob: &Path, link: &Path, at: &Path) -> io::Result<()> {
    let (Some(blob_name), Some(link_dir)) = (blob.file_name(), link.parent()) else {
        return Err(io::Error::other("a blob and a snapshot file have names"));
    };
    // From snapshots/<commit>/<folders>: up to the repository's folder, then into blobs/.
    let repo_dir = blob.parent().and_then(Path::parent);
    let mut target = PathBuf::new();
    let mut dir = link_dir;
    while Some(dir) != repo_dir {
        target.push("..");
        dir = dir
            .parent()
            .ok_or_else(|| io::Error::other("a snapshot outside its repository"))?;
    }
    std::os::unix::fs::symlink(target.join("blobs").join(blob_name), at)
}

#[cfg(not(unix))]
fn link_or_copy(blob: &Path, _link: &Path, at: &Path) -> io::Result<()> {
    fs::copy(blob, at).map(drop)
}
