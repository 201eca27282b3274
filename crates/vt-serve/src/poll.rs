//! `--reload-poll-ms`: reloads the checkpoint when its files change, as Triton's
//! `--model-control-mode=poll` does for its model repository, so that a server pointed at a
//! training run's `best/` serves each better model once it is written.

use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::MissedTickBehavior;
use vt_model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};

use crate::args::ServeArgs;
use crate::state::{AppState, Checked};

/// What a reload would read, as the file system describes it: the folder the checkpoint's
/// path resolves to, the identity and permissions of that folder, and the identity, size,
/// modification time and permissions of its files. vt-train replacing the folder, a copy
/// rewriting the files, a link moving and new permissions (which a failed reload may have
/// met) each change it; other files coming and going in the folder, and reads, do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    folder: PathBuf,
    folder_stamp: Stamp,
    files: Vec<Stamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    /// Device and inode, where the platform has them.
    id: Option<(u64, u64)>,
    /// Mode, owner and group, where the platform has them; else whether it is read-only.
    access: (u32, u32, u32),
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let metadata = std::fs::metadata(path)?;
        let (id, access) = identity(&metadata);
        Ok(Stamp {
            id,
            access,
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }

    /// A folder's: its size and times change as files come and go in it.
    fn of_folder(path: &Path) -> std::io::Result<Stamp> {
        Stamp::of(path).map(|stamp| Stamp {
            len: 0,
            modified: None,
            ..stamp
        })
    }
}

impl Fingerprint {
    /// The checkpoint at `dir` now; an error while a file cannot be read (the folder being
    /// replaced, or gone).
    pub fn of(dir: &Path) -> std::io::Result<Fingerprint> {
        let folder = std::fs::canonicalize(dir)?;
        let files = [CONFIG_FILE, WEIGHTS_FILE]
            .iter()
            .map(|name| Stamp::of(&folder.join(name)))
            .collect::<std::io::Result<_>>()?;
        Ok(Fingerprint {
            folder_stamp: Stamp::of_folder(&folder)?,
            folder,
            files,
        })
    }
}

/// The file's device and inode, and its mode, owner and group.
#[cfg(unix)]
fn identity(metadata: &Metadata) -> (Option<(u64, u64)>, (u32, u32, u32)) {
    use std::os::unix::fs::MetadataExt;
    (
        Some((metadata.dev(), metadata.ino())),
        (metadata.mode(), metadata.uid(), metadata.gid()),
    )
}

#[cfg(not(unix))]
fn identity(metadata: &Metadata) -> (Option<(u64, u64)>, (u32, u32, u32)) {
    (None, (u32::from(metadata.permissions().readonly()), 0, 0))
}

/// `--reload-poll-ms`'s checks of the checkpoint.
pub struct Poll {
    checkpoint: PathBuf,
    every: Duration,
}

impl Poll {
    /// The checks `args` ask for, if any.
    pub fn new(args: &ServeArgs) -> Option<Poll> {
        Some(Poll {
            checkpoint: args.checkpoint.clone(),
            every: Duration::from_millis(args.reload_poll_ms?),
        })
    }

    /// Checks the checkpoint every `--reload-poll-ms` and reloads it when its files changed
    /// ([`AppState::reload_if_changed`]). A checkpoint that cannot be read at two checks in
    /// a row is warned about once (one check may fall within vt-train's swap of folders).
    pub async fn run(self, state: Arc<AppState>) {
        let checkpoint = self.checkpoint.display().to_string();
        let mut checks = tokio::time::interval(self.every);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once.
        checks.tick().await;
        let mut unreadable = 0;
        loop {
            checks.tick().await;
            if let Checked::Unreadable(e) = state.reload_if_changed().await {
                unreadable += 1;
                if unreadable == 2 {
                    tracing::warn!(
                        %checkpoint,
                        "cannot read the checkpoint to check it for changes ({e}): still \
                         serving the model loaded, until it can be read again"
                    );
                }
            } else {
                unreadable = 0;
            }
        }
    }
}
