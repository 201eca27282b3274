//! The temporaries that atomic writes build beside their target, `.NAME.tmp-PID{suffix}`,
//! and their removal once their writer is gone.
//!
//! A writer killed midway leaves its temporary behind, as large as what it was writing, and
//! the pid in its name is not the next writer's. So each temporary is locked (an advisory
//! `flock`) by its writer for as long as it writes, and the next writer of the same target
//! removes those whose lock it can take: their writers have exited, since the system drops
//! a dead process's locks. A temporary that cannot be locked at all (a file system without
//! locks, any temporary off Unix, where locks are mandatory) is left alone, unless it names
//! this process's pid: removing another could destroy a live writer's work. Locks must be
//! shared by all writers: two machines writing one target on a network mount whose locks
//! are local to each could remove each other's temporaries.

use std::fs::{self, File, Metadata, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// What a temporary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Folder,
}

/// A temporary being written, locked while this value lives: keep it until the temporary
/// has been renamed into place or removed.
#[derive(Debug)]
pub struct Temporary {
    path: PathBuf,
    /// Held, never read: dropping it releases the lock.
    _lock: Option<File>,
}

impl Temporary {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An error making `temporary`, named with the `target` it is for: the temporary's own name
/// would say nothing to a reader.
fn temporary_error(temporary: &Path, target: &Path, cause: std::io::Error) -> ModelError {
    ModelError::Temporary {
        temporary: temporary.to_path_buf(),
        target: target.to_path_buf(),
        cause,
    }
}

/// How often [`create`] makes its temporary afresh when another writer's sweep removed it
/// between its creation and its lock.
const ATTEMPTS: usize = 5;

/// Creates `.NAME.tmp-PID{suffix}` beside `target`, empty, and locks it, after removing the
/// temporaries that killed writers of `target` left (this process's earlier pid included).
/// The folder it goes in must exist. Fails when this process's temporary of `target` is in
/// use (by another thread).
pub fn create(target: &Path, suffix: &str, kind: Kind) -> Result<Temporary> {
    let name = target
        .file_name()
        .ok_or_else(|| ModelError::Invalid {
            path: target.to_path_buf(),
            message: "the path to write must name a file or folder".into(),
        })?
        .to_string_lossy();
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    remove_stale(parent, &name, suffix);
    let path = parent.join(format!(".{name}.tmp-{}{suffix}", std::process::id()));
    for _ in 0..ATTEMPTS {
        match kind {
            Kind::Folder => fs::create_dir(&path),
            Kind::File => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map(drop),
        }
        .map_err(|e| temporary_error(&path, target, e))?;
        let lock = match lock_own(&path, kind) {
            Ok(lock) => lock,
            // Swept away before it was opened: made again.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            // Unlocked, it would look like a killed writer's to the next writer's sweep.
            Err(e) => {
                let _ = remove(&path, kind);
                return Err(temporary_error(&path, target, e));
            }
        };
        // Between the creation and the lock, a sweep may have found it unlocked and removed
        // it: then it is gone, or the path names another file.
        let ours = match (&lock, fs::symlink_metadata(&path)) {
            (_, Err(_)) => false,
            (Some(file), Ok(now)) => file
                .metadata()
                .is_ok_and(|locked| identity(&locked) == identity(&now)),
            (None, Ok(_)) => true,
        };
        if ours {
            return Ok(Temporary { path, _lock: lock });
        }
    }
    Err(ModelError::Invalid {
        path,
        message: format!("removed by another writer as it was created, {ATTEMPTS} times"),
    })
}

/// Removes the temporaries of `NAME` in `parent` whose writers have exited. Best effort: a
/// temporary that cannot be removed does not stop a write.
fn remove_stale(parent: &Path, name: &str, suffix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(suffix))
        else {
            continue;
        };
        // `.best.tmp-1.tmp-42` is a temporary of `best.tmp-1`, not of `best`.
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        let kind = if file_type.is_dir() {
            Kind::Folder
        } else if file_type.is_file() {
            Kind::File
        } else {
            continue;
        };
        let path = entry.path();
        // Where locks cannot be had, only this process's own temporary is known to be a
        // leftover (of an earlier process with its pid): one thread writes a target at a time.
        let own = pid == std::process::id().to_string();
        // Held until the temporary is removed.
        let opened = open(&path, kind);
        let gone = match &opened {
            Ok(file) => match file.try_lock() {
                // Its writer has exited; the lock is on what was opened, so the path must
                // still name that.
                Ok(()) => own || names(&path, file),
                Err(TryLockError::WouldBlock) => false,
                Err(TryLockError::Error(_)) => own,
            },
            Err(_) => own,
        };
        if gone {
            let _ = remove(&path, kind);
        }
    }
}

fn remove(path: &Path, kind: Kind) -> std::io::Result<()> {
    match kind {
        Kind::Folder => fs::remove_dir_all(path),
        Kind::File => fs::remove_file(path),
    }
}

/// Locks this writer's temporary at `path`: `None` where locks cannot be had (a file system
/// without them), an error where taking one failed otherwise.
#[cfg(unix)]
fn lock_own(path: &Path, kind: Kind) -> std::io::Result<Option<File>> {
    let file = open(path, kind)?;
    match file.lock() {
        Ok(()) => Ok(Some(file)),
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(None),
        Err(e) => Err(e),
    }
}

/// Never locked off Unix: Windows' locks are mandatory, and would keep the writer's own
/// writes (through handles of their own) out of its temporary.
#[cfg(not(unix))]
fn lock_own(_: &Path, _: Kind) -> std::io::Result<Option<File>> {
    Ok(None)
}

/// Whether `path` names `file`, where the platform tells.
fn names(path: &Path, file: &File) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(opened), Ok(now)) => identity(&opened).is_some() && identity(&opened) == identity(&now),
        _ => false,
    }
}

/// Opens a temporary to lock it: a file for writing (which some network file systems need
/// for an exclusive lock), a folder for reading.
fn open(path: &Path, kind: Kind) -> std::io::Result<File> {
    match kind {
        Kind::File => OpenOptions::new().write(true).open(path),
        Kind::Folder => File::open(path),
    }
}

/// What tells a file from others, where the platform says.
#[cfg(unix)]
fn identity(metadata: &Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((metadata.dev(), metadata.ino()))
}

/// What tells a file from others: nothing that std gives here.
#[cfg(not(unix))]
fn identity(_: &Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A killed writer's temporaries (no lock held) go; a live writer's (locked), other
    /// targets' and other suffixes' stay.
    #[cfg(unix)]
    #[test]
    fn only_unlocked_temporaries_of_the_target_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir(dir.join(".ckpt.tmp-999991")).unwrap();
        fs::write(dir.join(".ckpt.tmp-999991/model.safetensors"), b"big").unwrap();
        fs::write(dir.join(".ckpt.tmp-999992"), b"half").unwrap();
        fs::create_dir(dir.join(".ckpt.tmp-999993")).unwrap();
        let live_folder = File::open(dir.join(".ckpt.tmp-999993")).unwrap();
        live_folder.lock().unwrap();
        fs::write(dir.join(".ckpt.tmp-999994"), b"live").unwrap();
        let live_file = open(&dir.join(".ckpt.tmp-999994"), Kind::File).unwrap();
        live_file.lock().unwrap();
        for other in [
            ".ckpt.tmp-1.tmp-999995",
            ".ckpt.tmp-999996.png",
            ".other.tmp-9",
        ] {
            fs::write(dir.join(other), b"not ours").unwrap();
        }

        let temporary = create(&dir.join("ckpt"), "", Kind::Folder).unwrap();
        let mine = format!(".ckpt.tmp-{}", std::process::id());
        assert_eq!(temporary.path(), dir.join(&mine));
        let mut expected = vec![
            ".ckpt.tmp-1.tmp-999995".to_string(),
            ".ckpt.tmp-999993".into(),
            ".ckpt.tmp-999994".into(),
            ".ckpt.tmp-999996.png".into(),
            ".other.tmp-9".into(),
            mine,
        ];
        expected.sort();
        assert_eq!(names(dir), expected);

        // Ours is locked while it lives: another writer's sweep leaves it.
        remove_stale(dir, "ckpt", "");
        assert!(temporary.path().is_dir());
        drop(temporary);
        drop(live_file);
        remove_stale(dir, "ckpt", "");
        assert!(!dir.join(".ckpt.tmp-999994").exists());
        assert!(dir.join(".ckpt.tmp-999993").exists());
    }

    /// A temporary that cannot be made is named with the file it was to write.
    #[test]
    fn a_temporary_that_cannot_be_made_names_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("gone/report.json");
        let err = create(&target, "", Kind::File).unwrap_err().to_string();
        let temporary = tmp
            .path()
            .join(format!("gone/.report.json.tmp-{}", std::process::id()));
        assert!(
            err.starts_with(&format!(
                "writing {}: creating its temporary {}: ",
                target.display(),
                temporary.display()
            )),
            "{err}"
        );
    }

    /// A file temporary is created empty, and the suffix is part of its name; a leftover
    /// with this process's pid (an earlier process's) is replaced.
    #[test]
    fn file_temporaries_carry_their_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        let expected = format!(".plot.png.tmp-{}.png", std::process::id());
        for stale in [".plot.png.tmp-999991.png", &expected] {
            fs::write(tmp.path().join(stale), b"stale").unwrap();
        }
        let temporary = create(&tmp.path().join("plot.png"), ".png", Kind::File).unwrap();
        assert_eq!(temporary.path(), tmp.path().join(&expected));
        assert_eq!(fs::read(temporary.path()).unwrap(), b"");
        assert_eq!(names(tmp.path()), [expected]);
    }
}
