//! The checkpoint history of `--checkpoint-hist N` (timm's): the checkpoints of the N best
//! epochs, ranked as `best/` is ([`crate::state::ranks_above`]), in `RUN/top/epoch-NNN/`,
//! for `vt-train average`.
//!
//! The list of kept epochs with their metrics is part of the training state, so it is
//! exactly what `--resume` continues. After an epoch: the new epoch's folder is written,
//! then the state that lists it, then the folders that fell out of the list are removed.
//! A process killed in between leaves folders that the state does not list; the next
//! process removes them before training ([`remove_leftovers`]).

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vt_model::checkpoint::{dir_contents, recover_interrupted_write, DirContents};

use crate::error::{Result, TrainError};
use crate::state::ranks_above;

pub const TOP_DIR: &str = "top";
const PREFIX: &str = "epoch-";

/// A kept epoch and the metrics that rank it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    /// 1-based, as in metrics.jsonl.
    pub epoch: usize,
    pub val_acc: f64,
    pub val_loss: f64,
}

impl Kept {
    /// Better epochs first; of two equal ones the earlier, which `best/` keeps too.
    fn rank(&self, other: &Kept) -> Ordering {
        if ranks_above(
            self.val_acc,
            self.val_loss,
            other.val_acc,
            Some(other.val_loss),
        ) {
            Ordering::Less
        } else if ranks_above(
            other.val_acc,
            other.val_loss,
            self.val_acc,
            Some(self.val_loss),
        ) {
            Ordering::Greater
        } else {
            self.epoch.cmp(&other.epoch)
        }
    }
}

/// `RUN/top/epoch-NNN`.
pub fn epoch_dir(run_dir: &Path, epoch: usize) -> PathBuf {
    run_dir.join(TOP_DIR).join(format!("{PREFIX}{epoch:03}"))
}

/// The history after an epoch was offered to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Offered {
    /// At most N epochs, best first.
    pub kept: Vec<Kept>,
    /// Whether the offered epoch is among them: its checkpoint is to be written.
    pub admitted: bool,
    /// Epochs that were kept before and no longer are: their folders are to be removed
    /// once the state that leaves them out is saved.
    pub dropped: Vec<Kept>,
}

/// Offers `epoch` to the history `kept` of at most `n` epochs. It enters when it ranks
/// above the worst one kept, or there is room; an epoch whose loss is not finite never
/// does, as it never becomes `best/`. A history longer than `n` (a resume with a smaller
/// `--checkpoint-hist`) loses its worst epochs here.
pub fn offer(kept: &[Kept], epoch: Kept, n: usize) -> Offered {
    let mut next = kept.to_vec();
    if epoch.val_loss.is_finite() {
        next.push(epoch);
    }
    next.sort_by(Kept::rank);
    next.truncate(n);
    let admitted = next.iter().any(|k| k.epoch == epoch.epoch);
    let dropped = kept
        .iter()
        .filter(|k| !next.iter().any(|n| n.epoch == k.epoch))
        .copied()
        .collect();
    Offered {
        kept: next,
        admitted,
        dropped,
    }
}

/// An entry of `top/` that this module writes: a checkpoint folder `epoch-NNN`, or one of
/// the siblings the checkpoint code writes it through (`.epoch-NNN.tmp-PID`,
/// `.epoch-NNN.old`). Nothing else matches, so nothing else is ever removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Checkpoint,
    Temporary,
}

fn entry_kind(name: &str) -> Option<Entry> {
    let (folder, kind) = match name.strip_prefix('.') {
        Some(hidden) => {
            let (folder, suffix) = hidden.split_once('.')?;
            let temporary = suffix == "old"
                || suffix
                    .strip_prefix("tmp-")
                    .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            (folder, temporary.then_some(Entry::Temporary)?)
        }
        None => (name, Entry::Checkpoint),
    };
    let epoch: usize = folder.strip_prefix(PREFIX)?.parse().ok()?;
    (format!("{PREFIX}{epoch:03}") == folder).then_some(kind)
}

/// The entries of `top/` (none when it does not exist): name, path and kind.
fn entries(run_dir: &Path) -> Result<Vec<(String, PathBuf, Option<Entry>)>> {
    let top = run_dir.join(TOP_DIR);
    let read = match fs::read_dir(&top) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(&top, e)),
    };
    read.map(|entry| {
        let entry = entry.map_err(|e| TrainError::io(&top, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry_kind(&name);
        Ok((name, entry.path(), kind))
    })
    .collect()
}

/// Refuses a `top/` folder that holds anything this module did not write: removing stale
/// epochs must never delete other files, and a checkpoint save would refuse them anyway.
pub fn check_folder(run_dir: &Path) -> Result<()> {
    for (name, path, kind) in entries(run_dir)? {
        let reason = match kind {
            None => format!("it holds `{name}`, which is not a kept epoch's checkpoint"),
            Some(Entry::Temporary) => continue,
            Some(Entry::Checkpoint) if !path.is_dir() => {
                format!("`{name}` is a file, not a checkpoint folder")
            }
            Some(Entry::Checkpoint) => match dir_contents(&path)? {
                DirContents::Foreign(reason) => format!("{name}: {reason}"),
                DirContents::Empty | DirContents::Checkpoint => continue,
            },
        };
        return Err(TrainError::ForeignFiles {
            path: run_dir.join(TOP_DIR),
            reason,
        });
    }
    Ok(())
}

/// Before training: removes what a killed process left in `top/` (folders of epochs that
/// `kept`, the saved state's list, does not name, and temporaries), saying so, and puts
/// back a listed folder whose rewrite was interrupted. Returns `kept` without the epochs
/// whose folders are gone (deleted by hand), with a warning for each.
pub fn remove_leftovers(run_dir: &Path, kept: &[Kept]) -> Result<Vec<Kept>> {
    for k in kept {
        recover_interrupted_write(&epoch_dir(run_dir, k.epoch))?;
    }
    let listed: Vec<PathBuf> = kept.iter().map(|k| epoch_dir(run_dir, k.epoch)).collect();
    for (_, path, kind) in entries(run_dir)? {
        if kind.is_none() || listed.contains(&path) {
            continue;
        }
        tracing::info!(
            "removing {}: the training state does not list it (left by a process that was \
             killed)",
            path.display()
        );
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| TrainError::file_op("removing", &path, e))?;
    }
    let (present, missing): (Vec<Kept>, Vec<Kept>) = kept
        .iter()
        .partition(|k| epoch_dir(run_dir, k.epoch).is_dir());
    for k in missing {
        tracing::warn!(
            "{} is missing: epoch {} leaves the checkpoint history",
            epoch_dir(run_dir, k.epoch).display(),
            k.epoch
        );
    }
    Ok(present)
}

/// Removes the folders of `dropped` epochs (after the state that no longer lists them is
/// saved).
pub fn remove(run_dir: &Path, dropped: &[Kept]) -> Result<()> {
    for k in dropped {
        let dir = epoch_dir(run_dir, k.epoch);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TrainError::file_op("removing", &dir, e)),
        }
    }
    // A history that a resume with a lower `--checkpoint-hist` emptied leaves no folder.
    if !dropped.is_empty() {
        let top = run_dir.join(TOP_DIR);
        match fs::remove_dir(&top) {
            Err(e)
                if e.kind() != std::io::ErrorKind::NotFound
                    && e.kind() != std::io::ErrorKind::DirectoryNotEmpty =>
            {
                return Err(TrainError::file_op("removing", &top, e));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(epoch: usize, val_acc: f64, val_loss: f64) -> Kept {
        Kept {
            epoch,
            val_acc,
            val_loss,
        }
    }

    fn epochs(list: &[Kept]) -> Vec<usize> {
        list.iter().map(|k| k.epoch).collect()
    }

    #[test]
    fn the_n_best_epochs_are_kept_as_best_ranks_them() {
        let mut history = Vec::new();
        let mut admitted = Vec::new();
        let mut dropped = Vec::new();
        for epoch in [
            kept(1, 0.5, 1.0),
            kept(2, 0.6, 0.9),
            // Equal accuracy, lower loss: above epoch 2.
            kept(3, 0.6, 0.8),
            // Equal to the worst kept (epoch 2): the earlier one stays, as for best/.
            kept(4, 0.6, 0.9),
            kept(5, 0.9, f64::NAN),
            kept(6, 0.7, 2.0),
        ] {
            let offered = offer(&history, epoch, 2);
            admitted.push(offered.admitted);
            dropped.push(epochs(&offered.dropped));
            history = offered.kept;
        }
        assert_eq!(epochs(&history), [6, 3]);
        assert_eq!(admitted, [true, true, true, false, false, true]);
        assert_eq!(
            dropped,
            [vec![], vec![], vec![1], vec![], vec![], vec![2]] as [Vec<usize>; 6]
        );
        // A smaller N on resume drops the worst at the next epoch.
        let offered = offer(&history, kept(7, 0.1, 3.0), 1);
        assert_eq!((epochs(&offered.kept), offered.admitted), (vec![6], false));
        assert_eq!(epochs(&offered.dropped), [3]);
        assert_eq!(offer(&[], kept(1, 0.5, 1.0), 0).kept, []);
    }

    #[test]
    fn only_names_the_checkpoint_code_writes_are_ours() {
        for ours in [
            "epoch-004",
            "epoch-1234",
            ".epoch-004.old",
            ".epoch-004.tmp-77",
        ] {
            assert!(entry_kind(ours).is_some(), "{ours}");
        }
        let others = [
            "epoch-1",
            "epoch-0004",
            "epoch-+01",
            ".epoch-004.txt",
            ".epoch-004.my-backup",
            ".epoch-004.tmp-",
            ".epoch-4.old",
            "avg",
        ];
        for other in others {
            assert_eq!(entry_kind(other), None, "{other}");
        }
    }

    #[test]
    fn leftovers_are_removed_and_foreign_files_refused() {
        let run = tempfile::tempdir().unwrap();
        let run = run.path();
        let history = [kept(2, 0.5, 1.0)];
        for epoch in [2, 3, 99] {
            fs::create_dir_all(epoch_dir(run, epoch)).unwrap();
        }
        // A checkpoint write in progress, whatever its files are named meanwhile.
        let tmp = run.join(TOP_DIR).join(".epoch-004.tmp-123");
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("model.safetensors.tmp"), "").unwrap();
        // A listed epoch's rewrite that stopped between its two renames.
        fs::create_dir_all(run.join(TOP_DIR).join(".epoch-005.old")).unwrap();
        check_folder(run).unwrap();
        let listed = [history[0], kept(5, 0.4, 1.0), kept(6, 0.3, 1.0)];
        assert_eq!(remove_leftovers(run, &listed).unwrap(), listed[..2]);
        let mut left: Vec<String> = fs::read_dir(run.join(TOP_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["epoch-002", "epoch-005"]);
        remove(run, &listed).unwrap();
        // Emptied: no folder left.
        assert!(!run.join(TOP_DIR).exists());

        fs::create_dir(run.join(TOP_DIR)).unwrap();
        fs::write(run.join(TOP_DIR).join("notes.txt"), "mine").unwrap();
        let err = check_folder(run).unwrap_err().to_string();
        assert!(err.contains("notes.txt"), "{err}");
        assert!(run.join(TOP_DIR).join("notes.txt").is_file());
    }
}
