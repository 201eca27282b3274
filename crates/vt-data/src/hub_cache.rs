//! A dataset repository's folder in the Hugging Face cache, laid out as `huggingface_hub`
//! and hf-hub lay it out, so that the Python tools and vt share one download:
//! - `blobs/<id>`: each file's content once, named by its git object id from the hub's
//!   listing, so a file unchanged at a new commit is reused (`huggingface_hub` names an LFS
//!   file's blob by its SHA-256 instead; either tool reuses the other's snapshot links);
//! - `snapshots/<commit>/<path>`: the repository at a commit, each file a link to its blob
//!   (a copy where symlinks are not available, as hf-hub does);
//! - `refs/<revision>`: the commit a branch or tag named when it was last downloaded, which
//!   an offline import (`HF_HUB_OFFLINE`) goes by.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

pub struct RepoCache {
    dir: PathBuf,
}

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

    fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// Where the repository's `path` at `commit` is; `None` for a path that is not a plain
    /// relative one (the names come from the hub: none may climb out of the cache).
    pub fn snapshot_path(&self, commit: &str, path: &str) -> Option<PathBuf> {
        plain_relative(path).then(|| self.snapshot_dir(commit).join(path))
    }

    /// The blob named `id`; `None` for an id that is no plain file name.
    pub fn blob_path(&self, id: &str) -> Option<PathBuf> {
        let plain = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        plain.then(|| self.dir.join("blobs").join(id))
    }

    /// Makes `snapshot` (from [`Self::snapshot_path`]) the blob `blob`'s, replacing whatever
    /// was there.
    pub fn link(&self, snapshot: &Path, blob: &Path) -> Result<()> {
        let parent = snapshot.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        match fs::remove_file(snapshot) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(DataError::io(snapshot, e))
            }
            _ => {}
        }
        link_or_copy(blob, snapshot).map_err(|e| DataError::io(snapshot, e))
    }

    /// Records that `revision` named `commit`; a commit names itself and is not recorded.
    /// Through a temporary renamed into place, so a reader never meets half a commit id.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let Some(path) = self.ref_path(revision) else {
            return Ok(());
        };
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        fs::write(&tmp, commit).map_err(|e| DataError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
    }

    /// The commit `revision` named at its last download, or `revision` itself when it is a
    /// commit id; `None` when it was never downloaded.
    pub fn resolve(&self, revision: &str) -> Result<Option<String>> {
        if is_commit(revision) {
            return Ok(Some(revision.to_string()));
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

    /// The files of the snapshot at `commit` with their sizes, by repository path, sorted;
    /// `None` when there is no such snapshot. A link whose blob is gone is left out.
    pub fn snapshot_files(&self, commit: &str) -> Result<Option<Vec<(String, u64)>>> {
        let root = self.snapshot_dir(commit);
        if !root.is_dir() {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut folders = vec![root.clone()];
        while let Some(folder) = folders.pop() {
            for entry in fs::read_dir(&folder).map_err(|e| DataError::io(&folder, e))? {
                let path = entry.map_err(|e| DataError::io(&folder, e))?.path();
                // Through a link, what it points to.
                let Ok(meta) = fs::metadata(&path) else {
                    tracing::warn!("{}: its blob is gone; left out", path.display());
                    continue;
                };
                if meta.is_dir() {
                    folders.push(path);
                } else if let Ok(relative) = path.strip_prefix(&root) {
                    let parts: Vec<_> = relative
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect();
                    files.push((parts.join("/"), meta.len()));
                }
            }
        }
        files.sort();
        Ok(Some(files))
    }

    /// The newest `.zip` file of any snapshot, should the cache hold several commits.
    pub fn newest_archive(&self) -> Option<PathBuf> {
        fs::read_dir(self.dir.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|commit| fs::read_dir(commit.path()).into_iter().flatten().flatten())
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "zip"))
            .filter_map(|path| Some((fs::metadata(&path).ok()?.modified().ok()?, path)))
            .max()
            .map(|(_, path)| path)
    }
}

/// A commit id: 40 hex digits.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the `size` bytes of `path` are the file whose git object id is `oid`: either the
/// file itself is in git, or git holds its LFS pointer (which names the content's SHA-256).
pub fn has_git_object_id(path: &Path, size: u64, oid: &str) -> Result<bool> {
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
        return Ok(true);
    }
    let pointer = format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {size}\n",
        hex(&sha256.finalize())
    );
    let pointer_id = Sha1::new()
        .chain_update(format!("blob {}\0", pointer.len()))
        .chain_update(pointer)
        .finalize();
    Ok(hex(&pointer_id).eq_ignore_ascii_case(oid))
}

/// A git object id (SHA-1): 40 hex digits.
pub fn is_git_object_id(oid: &str) -> bool {
    is_commit(oid)
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

/// A relative symlink, as the hub's tools make, so the cache may be moved whole.
#[cfg(unix)]
fn link_or_copy(blob: &Path, snapshot: &Path) -> io::Result<()> {
    let (Some(blob_name), Some(snapshot_dir)) = (blob.file_name(), snapshot.parent()) else {
        return Err(io::Error::other("a blob and a snapshot file have names"));
    };
    // From snapshots/<commit>/<folders>: up to the repository's folder, then into blobs/.
    let repo_dir = blob.parent().and_then(Path::parent);
    let mut target = PathBuf::new();
    let mut dir = snapshot_dir;
    while Some(dir) != repo_dir {
        target.push("..");
        dir = dir
            .parent()
            .ok_or_else(|| io::Error::other("a snapshot outside its repository"))?;
    }
    std::os::unix::fs::symlink(target.join("blobs").join(blob_name), snapshot)
}

#[cfg(not(unix))]
fn link_or_copy(blob: &Path, snapshot: &Path) -> io::Result<()> {
    fs::copy(blob, snapshot).map(drop)
}
