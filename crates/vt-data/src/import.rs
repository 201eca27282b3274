//! Builds a data directory from any source: every image is decoded once to prove it is
//! usable (failures are recorded, never fatal), written under a temporary sibling folder, split
//! into train/val, and only then renamed into place, so nothing half-done ever looks done.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use image::ImageFormat;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::dataset::{
    DuplicateGroup, Manifest, SkippedEntry, Split, SplitCounts, MANIFEST_FILE, PRED_DIR,
};
use crate::decode;
use crate::error::{DataError, Result};
use crate::layout::{self, Role};
use crate::split;

/// Images are verified and written in chunks of this many, in parallel.
const CHUNK: usize = 256;
/// ... or of this many bytes, whichever comes first: 256 images of up to
/// [`MAX_FILE_BYTES`](crate::source::MAX_FILE_BYTES) each would be 16 GiB in memory.
const CHUNK_BYTES: usize = 256 << 20;

/// One image as the source delivers it.
#[derive(Debug, Clone)]
pub struct RawImage {
    /// Where it came from, for the skip report.
    pub source_path: String,
    pub role: Role,
    /// Original file name; the stem is kept, the extension follows the sniffed format.
    pub name: String,
    /// Whether the source gave `name`: one is made up for a parquet row without a path, and
    /// its file name is no renaming to report.
    pub named_by_source: bool,
    pub bytes: Vec<u8>,
}

pub struct Importer {
    data_dir: PathBuf,
    staging: PathBuf,
    /// Held until the importer is dropped, which releases the lock.
    _lock: Option<File>,
    source: String,
    origin: String,
    val_fraction: f64,
    seed: u64,
    classes: Option<Vec<String>>,
    pending: Vec<RawImage>,
    /// The bytes of `pending`.
    pending_bytes: usize,
    used_paths: HashSet<PathBuf>,
    /// Every `seg_train` class seen, with usable images or not.
    class_folders: BTreeSet<String>,
    train: BTreeMap<String, Vec<String>>,
    test: BTreeMap<String, usize>,
    pred: usize,
    /// Where each labelled image was filed, by the SHA-256 of its bytes.
    filed: BTreeMap<[u8; 32], Vec<Filed>>,
    /// The images filed under another name than the source's, with their source paths.
    renamed: Vec<(Filed, String)>,
    skipped: Vec<SkippedEntry>,
    finished: bool,
}

/// A labelled image as filed before the train/val split: its source split and class, and
/// its file name there.
#[derive(Debug, Clone)]
struct Filed {
    role: Role,
    name: String,
}

/// Where the train/val split puts each class's `seg_train` images: (train, val) file names,
/// each sorted.
type Assignment = BTreeMap<String, (Vec<String>, Vec<String>)>;

impl Importer {
    /// Replaces the description of where the data comes from, once the source knows it
    /// exactly (a repository's resolved commit).
    pub fn set_origin(&mut self, origin: String) {
        self.origin = origin;
    }

    /// Prepares an empty staging folder beside `data_dir`. Refuses to go on when `data_dir`
    /// exists, is not empty and is not a previous import, so a wrong `--data-dir` never
    /// replaces unrelated files, or when another import into it is running. A symlinked
    /// `data_dir` keeps its link: the import replaces the link's target.
    pub fn new(
        data_dir: &Path,
        source: &str,
        origin: &str,
        val_fraction: f64,
        seed: u64,
    ) -> Result<Importer> {
        split::check_fraction(val_fraction)?;
        let target = resolve_links(data_dir)?;
        if target.exists() && !target.is_dir() {
            return Err(DataError::Invalid(format!(
                "{} is a file: the data set is imported into a folder; choose another \
                 --data-dir",
                data_dir.display()
            )));
        }
        let lock = lock(&target, data_dir)?;
        // Under the lock: another import may be between its renames until it is released.
        restore_interrupted_swap(&target)?;
        check_replaceable(&target)?;
        let staging = sibling(&target, "incoming")?;
        remove_if_exists(&staging)?;
        // What a crash while deleting a previous import left.
        remove_if_exists(&sibling(&target, "deleting")?)?;
        fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
        Ok(Importer {
            data_dir: target,
            staging,
            _lock: lock,
            source: source.into(),
            origin: origin.into(),
            val_fraction,
            seed,
            classes: None,
            pending: Vec::new(),
            pending_bytes: 0,
            used_paths: HashSet::new(),
            class_folders: BTreeSet::new(),
            train: BTreeMap::new(),
            test: BTreeMap::new(),
            pred: 0,
            filed: BTreeMap::new(),
            renamed: Vec::new(),
            skipped: Vec::new(),
            finished: false,
        })
    }

    /// The data directory the import will replace (a link's target).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Fixes the class order (label indices), e.g. from a parquet mirror's label column.
    /// Listed classes without images are left out, since they could not be trained; classes
    /// found but not listed follow, sorted. Without it, classes are the sorted names found.
    pub fn set_classes(&mut self, classes: Vec<String>) {
        self.classes = Some(classes);
    }

    /// Records a source file that cannot be imported. Pending images are processed first so
    /// the skip report follows the source's order.
    pub fn skip(&mut self, path: impl Into<String>, reason: impl Into<String>) -> Result<()> {
        self.flush()?;
        self.record_skip(path.into(), reason.into());
        Ok(())
    }

    /// Records a `seg_train` class folder seen in the source, so that one without usable
    /// images is reported rather than silently missing from the classes.
    pub fn note_class_folder(&mut self, class: &str) {
        if !self.class_folders.contains(class) {
            self.class_folders.insert(class.to_string());
        }
    }

    fn record_skip(&mut self, path: String, reason: String) {
        self.skipped.push(SkippedEntry { path, reason });
    }

    pub fn add(&mut self, image: RawImage) -> Result<()> {
        self.pending_bytes += image.bytes.len();
        self.pending.push(image);
        if self.pending.len() >= CHUNK || self.pending_bytes >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        // Names are chosen sequentially so collisions resolve the same way on every run.
        let mut planned: Vec<(RawImage, std::result::Result<PathBuf, String>)> = Vec::new();
        for image in pending {
            if let Role::Train(class) = &image.role {
                self.note_class_folder(class);
            }
            // A class is never dropped for its name: its images are the user's data.
            if let Some((class, why)) = image
                .role
                .class()
                .and_then(|class| unusable_class_name(class).map(|why| (class, why)))
            {
                return Err(DataError::Layout(format!(
                    "class {class:?} (a folder or label of {}) cannot name a class: {why}; \
                     rename it",
                    self.origin
                )));
            }
            let target = match decode::sniff_format(&image.bytes) {
                Err(e) => Err(e.to_string()),
                Ok(format) => Ok(self.unique_path(&image.role, &image.name, format)),
            };
            planned.push((image, target));
        }
        let staging = &self.staging;
        type Outcome = std::result::Result<(PathBuf, [u8; 32]), String>;
        let outcomes: Vec<Result<Outcome>> = planned
            .par_iter()
            .map(|(image, target)| {
                let rel = match target {
                    Ok(rel) => rel,
                    Err(reason) => return Ok(Err(reason.clone())),
                };
                if let Err(e) = decode::decode_rgb_limited(&image.bytes, decode::DEFAULT_MAX_PIXELS)
                {
                    return Ok(Err(e.to_string()));
                }
                let path = staging.join(rel);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
                }
                // Original bytes are kept: re-encoding would change the pixels. Flushed, as
                // the import replaces the previous one once written.
                write_synced(&path, &image.bytes)?;
                Ok(Ok((rel.clone(), Sha256::digest(&image.bytes).into())))
            })
            .collect();
        for ((image, _), outcome) in planned.into_iter().zip(outcomes) {
            match outcome? {
                Err(reason) => self.record_skip(image.source_path, reason),
                Ok((rel, digest)) => {
                    let file_name = rel
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let filed = Filed {
                        role: image.role.clone(),
                        name: file_name.clone(),
                    };
                    // Filed under another name than the source's (for its characters, its
                    // format, another file of that name): the manifest says where it came
                    // from.
                    let renamed = Path::new(&image.name)
                        .file_name()
                        .is_none_or(|n| n != file_name.as_str());
                    if image.named_by_source && renamed {
                        self.renamed.push((filed.clone(), image.source_path));
                    }
                    if image.role != Role::Pred {
                        self.filed.entry(digest).or_default().push(filed);
                    }
                    match image.role {
                        Role::Train(class) => self.train.entry(class).or_default().push(file_name),
                        Role::Test(class) => *self.test.entry(class).or_default() += 1,
                        Role::Pred => self.pred += 1,
                    }
                }
            }
        }
        Ok(())
    }

    fn unique_path(&mut self, role: &Role, name: &str, format: ImageFormat) -> PathBuf {
        let dir = match role {
            Role::Train(c) => Path::new(Split::Train.dir_name()).join(c),
            Role::Test(c) => Path::new(Split::Test.dir_name()).join(c),
            Role::Pred => PathBuf::from(PRED_DIR),
        };
        let stem = sanitize_stem(name);
        let ext = extension(format);
        let mut candidate = dir.join(format!("{stem}.{ext}"));
        let mut n = 1;
        while !self.used_paths.insert(candidate.clone()) {
            candidate = dir.join(format!("{stem}-{n}.{ext}"));
            n += 1;
        }
        candidate
    }

    /// Splits train/val, writes the manifest and renames the result into place.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush()?;
        if self.train.is_empty() {
            // `--from .../seg_train` names a split of the archive, not the archive.
            let split_given = Path::new(&self.origin)
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| ["seg_train", "seg_test", "seg_pred"].contains(n));
            let other_layout = self
                .skipped
                .iter()
                .any(|s| s.reason == layout::OUTSIDE_SPLITS);
            let hint = match split_given {
                Some(name) => format!("; give the folder that holds {name}, not {name} itself"),
                None if other_layout => "; to import, put the class folders in seg_train/ \
                                         (a test split's in seg_test/). A folder in \
                                         torchvision's layout, train/<class>/ and \
                                         val/<class>/, needs no import: vt-train train --data \
                                         DIR reads it as it is"
                    .into(),
                None => String::new(),
            };
            return Err(DataError::Layout(format!(
                "no usable training images in {}: expected seg_train/<class>/<image> \
                 (as in the Kaggle archive), {} file(s) skipped{}{hint}",
                self.origin,
                self.skipped.len(),
                first_skips(self.skipped.iter())
            )));
        }
        let empty: Vec<&str> = self
            .class_folders
            .iter()
            .filter(|c| !self.train.contains_key(*c))
            .map(String::as_str)
            .collect();
        // torchvision's ImageFolder refuses a class without images too: the class was meant
        // to be learnt, and its files are all unusable (skipped, with the reasons).
        if !empty.is_empty() {
            // A file or folder in the class's folder.
            let in_empty = |s: &&SkippedEntry| {
                layout::train_class_of_folder(&s.path)
                    .is_some_and(|class| empty.contains(&class.as_str()))
            };
            return Err(DataError::Layout(format!(
                "training class(es) {} in {} have no usable images{}; fix or remove their \
                 files",
                quoted(&empty),
                self.origin,
                first_skips(self.skipped.iter().filter(in_empty))
            )));
        }
        // A test class without training images is a misnamed folder or label (`Forest` beside
        // `forest`), not a class the model could learn.
        let untrained: Vec<&str> = self
            .test
            .keys()
            .filter(|c| !self.train.contains_key(*c))
            .map(String::as_str)
            .collect();
        if !untrained.is_empty() {
            return Err(DataError::Layout(format!(
                "test class(es) {} in {} have no training images; the training classes are {}. \
                 Test folder names (or labels) must match the training ones",
                quoted(&untrained),
                self.origin,
                quoted(&self.train.keys().map(String::as_str).collect::<Vec<_>>())
            )));
        }
        // Every class found has training images (test classes were checked above); a preset
        // one without any could not be trained, so it is no class of this import.
        let (mut classes, absent): (Vec<String>, Vec<String>) = self
            .classes
            .take()
            .unwrap_or_default()
            .into_iter()
            .partition(|class| self.train.contains_key(class));
        if !absent.is_empty() {
            tracing::warn!(
                "no image in {} is labelled {}: left out of the classes",
                self.origin,
                quoted(&absent.iter().map(String::as_str).collect::<Vec<_>>())
            );
        }
        for class in self.train.keys() {
            if !classes.contains(class) {
                classes.push(class.clone());
            }
        }
        // A classifier of one class learns nothing: a wrong folder or a broken source.
        if classes.len() < 2 {
            return Err(DataError::Layout(format!(
                "{} has training images of only {} class ({}); a classifier needs at least 2",
                self.origin,
                classes.len(),
                quoted(&classes.iter().map(String::as_str).collect::<Vec<_>>())
            )));
        }
        // Training images with a copy among the others stay in training.
        let mut copied: HashSet<(&str, &str)> = HashSet::new();
        for group in self.filed.values() {
            let in_train: Vec<(&str, &str)> = group
                .iter()
                .filter_map(|f| match &f.role {
                    Role::Train(class) => Some((class.as_str(), f.name.as_str())),
                    _ => None,
                })
                .collect();
            if in_train.len() > 1 {
                copied.extend(in_train);
            }
        }
        let assignment: Assignment = classes
            .iter()
            .map(|class| {
                let names = self.train.remove(class).unwrap_or_default();
                let copied = |name: &str| copied.contains(&(class.as_str(), name));
                let split = split::split_class(class, names, self.val_fraction, self.seed, copied);
                (class.clone(), split)
            })
            .collect();
        let groups: Vec<&Vec<Filed>> = self.filed.values().filter(|g| g.len() > 1).collect();
        let mut counts = SplitCounts::default();
        for class in &classes {
            for split in Split::ALL {
                let dir = self.staging.join(split.dir_name()).join(class);
                fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            }
            let (train, val) = &assignment[class];
            for name in val {
                let from = self.staging.join("train").join(class).join(name);
                let to = self.staging.join("val").join(class).join(name);
                fs::rename(&from, &to).map_err(|e| DataError::io(&from, e))?;
            }
            counts.train.insert(class.clone(), train.len());
            counts.val.insert(class.clone(), val.len());
            counts
                .test
                .insert(class.clone(), self.test.get(class).copied().unwrap_or(0));
        }
        counts.pred = self.pred;
        let unmeasured: Vec<&str> = counts
            .val
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(class, _)| class.as_str())
            .collect();
        if counts.val.values().sum::<usize>() == 0 {
            tracing::warn!(
                "the val split is empty (--val-fraction {}): vt-train needs validation images; \
                 import with a fraction above 0, or more images per class ({COPIES_STAY})",
                self.val_fraction
            );
        } else if !unmeasured.is_empty() {
            tracing::warn!(
                "class(es) {} have no validation images: validation accuracy will not measure \
                 them; add images to them ({COPIES_STAY})",
                quoted(&unmeasured)
            );
        }
        let pred_dir = self.staging.join(PRED_DIR);
        fs::create_dir_all(&pred_dir).map_err(|e| DataError::io(&pred_dir, e))?;
        let mut duplicates: Vec<DuplicateGroup> = groups
            .iter()
            .map(|group| duplicate_group(group, &assignment))
            .collect();
        duplicates.sort_by(|a, b| a.files.cmp(&b.files));
        let manifest = Manifest {
            source: self.source.clone(),
            classes,
            splits: counts,
            skipped: std::mem::take(&mut self.skipped),
            val_fraction: self.val_fraction,
            seed: self.seed,
            origin: self.origin.clone(),
            duplicates: Some(duplicates),
            renamed: self
                .renamed
                .iter()
                .map(|(filed, source)| (final_path(filed, &assignment), source.clone()))
                .collect(),
        };
        write_file_list(&self.staging)?;
        // Written last inside staging, once everything else is on disk: its presence marks
        // a complete import.
        sync_folders(&self.staging)?;
        manifest.write(&self.staging)?;
        sync_folder(&self.staging)?;
        swap_into_place(&self.staging, &self.data_dir)?;
        self.finished = true;
        Ok(manifest)
    }
}

/// The first few of `skipped` with their reasons, for an error that says nothing (of a
/// class) was usable.
fn first_skips<'a>(skipped: impl Iterator<Item = &'a SkippedEntry>) -> String {
    const SHOWN: usize = 5;
    let skipped: Vec<&SkippedEntry> = skipped.collect();
    if skipped.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = skipped
        .iter()
        .take(SHOWN)
        .map(|s| format!("{} ({})", s.path, s.reason))
        .collect();
    let more = match skipped.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!("; {n} more in the same way or others"),
    };
    format!(": {}{more}", shown.join("; "))
}

/// Whether `name` of `class`'s `seg_train` images went to validation.
fn in_val(assignment: &Assignment, class: &str, name: &str) -> bool {
    assignment
        .get(class)
        .is_some_and(|(_, val)| val.binary_search_by(|n| n.as_str().cmp(name)).is_ok())
}

/// Why a class may lack validation images beside its size.
const COPIES_STAY: &str = "photos filed more than once stay in training";

/// Where an imported image ends up, relative to the data folder.
fn final_path(f: &Filed, assignment: &Assignment) -> String {
    let (split, class) = match &f.role {
        Role::Test(class) => (Split::Test, class),
        Role::Train(class) if in_val(assignment, class, &f.name) => (Split::Val, class),
        Role::Train(class) => (Split::Train, class),
        Role::Pred => return format!("{PRED_DIR}/{}", f.name),
    };
    format!("{split}/{class}/{}", f.name)
}

/// A group of identical images as the manifest lists it, by their final paths.
fn duplicate_group(group: &[Filed], assignment: &Assignment) -> DuplicateGroup {
    let mut files: Vec<String> = group
        .iter()
        .filter(|f| f.role != Role::Pred)
        .map(|f| final_path(f, assignment))
        .collect();
    files.sort();
    let classes: HashSet<&str> = group.iter().filter_map(|f| f.role.class()).collect();
    DuplicateGroup {
        files,
        conflicting_labels: classes.len() > 1,
    }
}

impl Drop for Importer {
    fn drop(&mut self) {
        if !self.finished {
            // An abandoned import leaves nothing behind that could be mistaken for data.
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// `<parent>/.<name>.<tag>`: same filesystem as `data_dir`, so renames are atomic.
pub(crate) fn sibling(data_dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = data_dir.file_name().ok_or_else(|| {
        DataError::Invalid(format!(
            "data folder {}: name it by its own name (as ../intel), not by `.` or `..`: an \
             import is built beside the folder and renamed into its place",
            data_dir.display()
        ))
    })?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    Ok(parent.join(format!(".{}.{tag}", name.to_string_lossy())))
}

/// The names, each quoted, comma-separated.
pub(crate) fn quoted(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    quoted.join(", ")
}

/// Follows `path` while it is a symlink, so that the import replaces the link's target (which
/// need not exist yet) and keeps the link.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut path = path.to_path_buf();
    // The kernel's own limit: a longer chain is a loop.
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path).map_err(|e| DataError::io(&path, e))?;
                path = match path.parent() {
                    Some(parent) => parent.join(target),
                    None => target,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(DataError::Invalid(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

/// Shares the lock of the import in `data_dir`, if one made it, for as long as the returned
/// file lives: no import replaces the folder meanwhile (a training run would read photos of
/// two imports and lose the others), and none may be running when it is taken.
pub fn lock_for_reading(data_dir: &Path) -> Result<Option<File>> {
    // Canonical: `.` or `train/..` name a folder too, and the lock is beside it.
    let target = fs::canonicalize(data_dir).or_else(|_| resolve_links(data_dir))?;
    let Some(name) = target.file_name() else {
        return Ok(None);
    };
    let path = target.with_file_name(format!(".{}.lock", name.to_string_lossy()));
    // An import without one (copied, or by a version before imports locked) gets one, as
    // an import would make it; a folder no import made is not written beside.
    let is_import = target.join(MANIFEST_FILE).is_file();
    let unwritable = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
        )
    };
    let opened = OpenOptions::new()
        .read(true)
        .write(is_import)
        .create(is_import)
        .truncate(false)
        .open(&path)
        .or_else(|e| {
            if unwritable(&e) {
                File::open(&path)
            } else {
                Err(e)
            }
        });
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        // Beside a folder this user may only read: no import of theirs replaces it either.
        Err(e) if unwritable(&e) => return Ok(None),
        Err(e) => return Err(DataError::io(&path, e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Err(DataError::Importing(data_dir.to_path_buf())),
        Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => Ok(None),
        Err(TryLockError::Error(e)) => Err(DataError::io(&path, e)),
    }
}

/// Locks `.<name>.lock` beside `data_dir` so that two imports into it cannot undo each
/// other's staging; `shown` names the data directory as the user gave it. The lock file is
/// left behind: deleting it would let two later imports lock two different files at once.
fn lock(data_dir: &Path, shown: &Path) -> Result<Option<File>> {
    let path = sibling(data_dir, "lock")?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DataError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Err(DataError::Locked(shown.to_path_buf())),
        // A filesystem without locks (some network mounts) still imports, as before locking.
        Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {
            tracing::warn!(
                "cannot lock {}: {e}; not guarding against a concurrent fetch-data",
                path.display()
            );
            Ok(None)
        }
        Err(TryLockError::Error(e)) => Err(DataError::io(&path, e)),
    }
}

/// Only an earlier import may be replaced: a `--data-dir` pointing at anything else, even a
/// folder that happens to hold some other manifest.json, is refused rather than deleted.
fn check_replaceable(data_dir: &Path) -> Result<()> {
    let mut entries = match fs::read_dir(data_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        entries => entries.map_err(|e| DataError::io(data_dir, e))?,
    };
    if entries.next().is_none() {
        return Ok(());
    }
    let refuse = |why: String| {
        DataError::Invalid(format!(
            "refusing to replace {}: it is not empty and not an earlier import ({why}); choose \
             another --data-dir or remove it",
            data_dir.display()
        ))
    };
    if !data_dir.join(MANIFEST_FILE).is_file() {
        return Err(refuse(format!("no {MANIFEST_FILE}")));
    }
    let manifest = Manifest::read(data_dir).map_err(|e| refuse(e.to_string()))?;
    let folders: Vec<&str> = Split::ALL
        .iter()
        .map(|s| s.dir_name())
        .chain(std::iter::once(PRED_DIR))
        .collect();
    for dir in &folders {
        if !data_dir.join(dir).is_dir() {
            return Err(refuse(format!("no {dir}/ folder")));
        }
    }
    // What a user put beside the import (runs, reports) or into its folders (a photo, a
    // class, notes) would go with it.
    let mut others: Vec<String> = list_entries(data_dir)?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            ![MANIFEST_FILE, FILE_LIST].contains(&name.as_str())
                && !folders.contains(&name.as_str())
        })
        .collect();
    let written = read_file_list(data_dir)?;
    for split in Split::ALL {
        let counts = manifest.split_counts(split);
        for (class, is_dir) in list_entries(&data_dir.join(split.dir_name()))? {
            let folder = format!("{split}/{class}");
            match counts.get(&class) {
                Some(&imported) if is_dir => {
                    others.extend(added_to_folder(data_dir, &folder, imported, &written)?)
                }
                _ => others.push(folder),
            }
        }
    }
    others.extend(added_to_folder(
        data_dir,
        PRED_DIR,
        manifest.splits.pred,
        &written,
    )?);
    if !others.is_empty() {
        const NAMED: usize = 10;
        let more = match others.len().saturating_sub(NAMED) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        return Err(DataError::Invalid(format!(
            "refusing to replace {}: besides an earlier import it holds {}{more}, which the \
             new import would delete; move {} away first",
            data_dir.display(),
            others[..others.len().min(NAMED)].join(", "),
            if others.len() == 1 { "it" } else { "them" }
        )));
    }
    Ok(())
}

/// The files an import wrote, one per line: the path relative to its folder
/// (`train/sea/1.jpg`), a tab and the size in bytes, so that a later import can tell a
/// user's additions and edits from them. Paths hold no control characters (see
/// [`sanitize_stem`] and [`unusable_class_name`]).
const FILE_LIST: &str = ".imported-files";

/// The files an import wrote, by path, with their sizes (none in the list of the version
/// that wrote paths only).
type WrittenFiles = HashMap<String, Option<u64>>;

/// Writes [`FILE_LIST`] of the import in `staging`: the files of its splits and `pred/`.
fn write_file_list(staging: &Path) -> Result<()> {
    let mut paths = Vec::new();
    for split in Split::ALL {
        for (class, _) in list_entries(&staging.join(split.dir_name()))? {
            let folder = format!("{split}/{class}");
            for (name, _) in list_entries(&staging.join(&folder))? {
                paths.push(format!("{folder}/{name}"));
            }
        }
    }
    for (name, _) in list_entries(&staging.join(PRED_DIR))? {
        paths.push(format!("{PRED_DIR}/{name}"));
    }
    let mut list = String::new();
    for path in paths {
        let file = staging.join(&path);
        let size = fs::metadata(&file)
            .map_err(|e| DataError::io(&file, e))?
            .len();
        list.push_str(&format!("{path}\t{size}\n"));
    }
    write_synced(&staging.join(FILE_LIST), list.as_bytes())
}

/// [`FILE_LIST`] of the import in `data_dir`; None for an import by an earlier version,
/// which wrote none. A list of paths alone, as the first version with one wrote, has no
/// sizes; a line that is neither form is refused, not read as unchecked.
fn read_file_list(data_dir: &Path) -> Result<Option<WrittenFiles>> {
    let path = data_dir.join(FILE_LIST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    // The form of most lines: one damaged line, the first included, is the one named.
    let with_size = text.lines().filter(|line| line.contains('\t')).count();
    let sized = 2 * with_size >= text.lines().count();
    let mut written = WrittenFiles::new();
    for (number, line) in text.lines().enumerate() {
        let entry = match line.split_once('\t') {
            Some((file, size)) if sized => size.parse().ok().map(|size| (file, Some(size))),
            None if !sized => Some((line, None)),
            _ => None,
        };
        let Some((file, size)) = entry else {
            return Err(DataError::Invalid(format!(
                "{} is damaged: line {} ({line:?}) is not {}; restore it, or remove it to \
                 have the import checked by its manifest's counts only",
                path.display(),
                number + 1,
                if sized {
                    "a data path, a tab and a size"
                } else {
                    "a data path"
                }
            )));
        };
        written.insert(file.to_string(), size);
    }
    Ok(Some(written))
}

/// What a user added to `folder` (relative to `data_dir`) of an import that wrote
/// `imported` files there, `written` by name and size: its subfolders, the files the import
/// did not write, and those whose size changed since (a photo edited or replaced). Without
/// the names (an earlier version's import), only more files than it wrote are noticed.
fn added_to_folder(
    data_dir: &Path,
    folder: &str,
    imported: usize,
    written: &Option<WrittenFiles>,
) -> Result<Vec<String>> {
    let entries = list_entries(&data_dir.join(folder))?;
    let files = entries.iter().filter(|(_, is_dir)| !is_dir).count();
    let mut added = Vec::new();
    for (name, is_dir) in entries {
        let path = format!("{folder}/{name}");
        if is_dir {
            added.push(path);
            continue;
        }
        match written.as_ref().map(|w| w.get(&path)) {
            Some(None) => added.push(path),
            Some(Some(&Some(size))) => {
                let file = data_dir.join(&path);
                let now = fs::metadata(&file)
                    .map_err(|e| DataError::io(&file, e))?
                    .len();
                if now != size {
                    added.push(format!("{path} (changed since the import)"));
                }
            }
            Some(Some(None)) | None => {}
        }
    }
    if written.is_none() && files > imported {
        added.push(format!(
            "{} more file(s) in {folder} than the import wrote there ({imported})",
            files - imported
        ));
    }
    Ok(added)
}

/// The entries of `dir` but file managers' clutter, sorted, each with whether it is a folder
/// (links followed); none when `dir` is missing.
fn list_entries(dir: &Path) -> Result<Vec<(String, bool)>> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(|e| DataError::io(dir, e))?,
    };
    let mut listed = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(|e| DataError::io(dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !is_os_metadata(dir, &name) {
            let is_dir = dir.join(&name).is_dir();
            listed.push((name, is_dir));
        }
    }
    listed.sort();
    Ok(listed)
}

/// Whether `name` in `dir` is a file that file managers leave in the folders they show
/// (macOS's Finder, Windows' Explorer; macOS's `._NAME` beside files on other file
/// systems): no user's work. Known by its name and its format's first bytes, so that a
/// folder or a user's own file of such a name is not taken for one.
fn is_os_metadata(dir: &Path, name: &str) -> bool {
    // The first bytes of each; None for Explorer's folder settings, an INI file (in UTF-8
    // or UTF-16) that opens with one of Explorer's sections.
    let magic: Option<&[u8]> = match name {
        ".DS_Store" => Some(b"\0\0\0\x01Bud1"),
        // An OLE compound file.
        "Thumbs.db" => Some(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),
        "desktop.ini" => None,
        // AppleDouble.
        _ if name.starts_with("._") => Some(b"\0\x05\x16\x07"),
        _ => return false,
    };
    let path = dir.join(name);
    // Only a regular file is opened: a FIFO of such a name would block the import.
    if !fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_file()) {
        return false;
    }
    let mut start = Vec::new();
    if File::open(&path)
        .and_then(|file| file.take(64).read_to_end(&mut start))
        .is_err()
    {
        return false;
    }
    if let Some(magic) = magic {
        return start.starts_with(magic);
    }
    // UTF-16's NULs and a BOM dropped: the first line as ASCII.
    let text: String = start
        .iter()
        .filter(|b| b.is_ascii() && **b != 0)
        .map(|b| char::from(*b))
        .collect();
    let section = text.trim_start().lines().next().unwrap_or_default().trim();
    EXPLORER_SECTIONS.contains(&section) || section.starts_with("[{")
}

/// The sections Windows Explorer opens a `desktop.ini` with (a folder's GUID sections,
/// `[{...}]`, too).
const EXPLORER_SECTIONS: [&str; 3] = ["[.ShellClassInfo]", "[LocalizedFileNames]", "[ViewState]"];

/// Replaces `data_dir` by `staging`: old one renamed away, new one renamed in, old deleted.
/// Between the two renames `data_dir` is briefly absent, never half-written; a crash there
/// leaves the previous import aside, which [`restore_interrupted_swap`] puts back.
fn swap_into_place(staging: &Path, data_dir: &Path) -> Result<()> {
    let old = sibling(data_dir, "old")?;
    discard(&old, data_dir)?;
    let had_old = data_dir.exists();
    if had_old {
        fs::rename(data_dir, &old).map_err(|e| DataError::io(data_dir, e))?;
    }
    if let Err(cause) = fs::rename(staging, data_dir) {
        if had_old {
            // Put the previous import back rather than leave nothing.
            if let Err(restore_cause) = fs::rename(&old, data_dir) {
                return Err(DataError::PreviousImportAside {
                    data_dir: data_dir.to_path_buf(),
                    previous: old,
                    cause,
                    restore_cause,
                });
            }
        }
        return Err(DataError::io(data_dir, cause));
    }
    // The new name on disk before the previous import goes.
    let parent = data_dir.parent().filter(|p| !p.as_os_str().is_empty());
    sync_folder(parent.unwrap_or(Path::new(".")))?;
    if had_old {
        discard(&old, data_dir)?;
    }
    Ok(())
}

/// Deletes the previous import `old` of `data_dir`. Renamed away first: a crash while
/// deleting leaves a partial copy under a name that [`restore_interrupted_swap`] never puts
/// back (and the next import removes), not at `old`, where it would pass for the whole.
fn discard(old: &Path, data_dir: &Path) -> Result<()> {
    let doomed = sibling(data_dir, "deleting")?;
    remove_if_exists(&doomed)?;
    match fs::rename(old, &doomed) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        renamed => renamed.map_err(|e| DataError::io(old, e))?,
    }
    remove_if_exists(&doomed)
}

/// A crash between the two renames of [`swap_into_place`] leaves the previous import at
/// `.NAME.old` and nothing at `NAME`: put it back before an import can replace or delete it.
fn restore_interrupted_swap(data_dir: &Path) -> Result<()> {
    let old = sibling(data_dir, "old")?;
    let missing = match fs::symlink_metadata(data_dir) {
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) => return Err(DataError::io(data_dir, e)),
    };
    if missing && old.join(MANIFEST_FILE).is_file() {
        fs::rename(&old, data_dir).map_err(|e| DataError::io(&old, e))?;
        tracing::warn!(
            "an earlier fetch-data was interrupted while replacing {}: put the previous import \
             back from {}",
            data_dir.display(),
            old.display()
        );
    }
    Ok(())
}

/// Flushes the names in `dir` and in every folder below it to disk (the files are flushed as
/// they are written).
fn sync_folders(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path.is_dir() {
            sync_folders(&path)?;
        }
    }
    sync_folder(dir)
}

/// Flushes a folder's entries to disk. A file system that cannot (EINVAL: some network and
/// FUSE ones) offers nothing more durable, nor does a folder one may write in but not read
/// (mode 0300, a drop box).
fn sync_folder(dir: &Path) -> Result<()> {
    match fs::File::open(dir).and_then(|folder| folder.sync_all()) {
        Err(e)
            if !matches!(
                e.kind(),
                ErrorKind::InvalidInput | ErrorKind::PermissionDenied
            ) =>
        {
            Err(DataError::io(dir, e))
        }
        _ => Ok(()),
    }
}

/// Writes a file and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::File::create(path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|e| DataError::io(path, e))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataError::io(path, e)),
        _ => Ok(()),
    }
}

/// Why `class` cannot name a class folder of the import and a label in reports, if it
/// cannot. Any other name, in any script, is kept as it is.
fn unusable_class_name(class: &str) -> Option<&'static str> {
    if class.trim().is_empty() {
        Some("it is blank")
    } else if class.trim() != class {
        Some("it starts or ends with white space")
    } else if class.starts_with('.') {
        Some("it starts with a dot (a hidden folder)")
    } else if class.contains(['/', '\\']) {
        Some("it holds a path separator")
    } else if class.chars().any(char::is_control) {
        Some("it holds a control character")
    } else if class.contains(char::REPLACEMENT_CHARACTER) {
        // Read from a name that is not UTF-8: two such folders could read the same.
        Some("it is not valid UTF-8")
    } else if class.len() > 255 {
        // A zip's names have no limit; the class folder's has.
        Some("it is longer than the 255 bytes a folder name may have")
    } else {
        None
    }
}

/// The longest stem of an imported file, in bytes.
const MAX_STEM_BYTES: usize = 200;

fn sanitize_stem(name: &str) -> String {
    let stem = Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Every script's characters (combining marks too), and of ASCII the letters, digits and
    // what camera and download names hold (`IMG (1)`); separators, quotes, control
    // characters and other white space are replaced.
    let kept = |c: char| match c {
        c if c.is_ascii() => {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ' | '(' | ')')
        }
        // U+FFFD stands for bytes that are not UTF-8: two names could read the same.
        c => !c.is_control() && !c.is_whitespace() && c != char::REPLACEMENT_CHARACTER,
    };
    let clean: String = stem
        .chars()
        .map(|c| if kept(c) { c } else { '_' })
        .collect();
    // Not hidden, no white space at the ends, and room for a `-N` and an extension within
    // the 255 bytes a file name may have (a zip's names have no limit).
    let mut clean = clean.trim_start_matches(|c: char| c == '.' || c.is_whitespace());
    while clean.len() > MAX_STEM_BYTES {
        let last = clean.chars().next_back().map_or(0, char::len_utf8);
        clean = &clean[..clean.len() - last];
    }
    let clean = clean.trim_end();
    if clean.is_empty() {
        "image".into()
    } else {
        clean.into()
    }
}

pub(crate) fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        ImageFormat::Gif => "gif",
        ImageFormat::Bmp => "bmp",
        _ => "jpg",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_sanitised() {
        assert_eq!(sanitize_stem("7606.jpg"), "7606");
        assert_eq!(sanitize_stem("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_stem("a b?.png"), "a b_");
        assert_eq!(sanitize_stem("猫 (1).jpg"), "猫 (1)");
        // Decomposed, as macOS writes names, and a script of combining marks.
        assert_eq!(sanitize_stem("e\u{301}te\u{301}.jpg"), "e\u{301}te\u{301}");
        assert_eq!(sanitize_stem("नमस्ते.jpg"), "नमस्ते");
        let long = sanitize_stem(&format!("{}.jpg", "猫".repeat(100)));
        assert_eq!(long, "猫".repeat(66));
        assert_eq!(sanitize_stem("été\n.jpg"), "été_");
        assert_eq!(sanitize_stem(".hidden"), "hidden");
        assert_eq!(sanitize_stem(" . .hidden .jpg"), "hidden");
        assert_eq!(sanitize_stem(""), "image");
        for usable in ["buildings", "forêt", "Main St", "猫", "sea-shore (2)"] {
            assert_eq!(unusable_class_name(usable), None, "{usable}");
        }
        let long = "猫".repeat(90);
        for unusable in [
            &long,
            "",
            " ",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "sea ",
            "a\tb",
            "caf\u{fffd}",
        ] {
            assert!(unusable_class_name(unusable).is_some(), "{unusable:?}");
        }
    }

    #[test]
    fn a_foreign_folder_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        fs::create_dir_all(&target).unwrap();
        fs::write(target.join("thesis.tex"), "precious").unwrap();
        assert!(Importer::new(&target, "folder", "x", 0.1, 0).is_err());
        assert!(target.join("thesis.tex").exists());
    }
}
