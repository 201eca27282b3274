//! The imported data set on disk: `train/<class>/*`, `val/<class>/*`, `test/<class>/*`,
//! `pred/*` and `manifest.json`, as written by `cargo xtask fetch-data`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::image_files::folder_image_files;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const PRED_DIR: &str = "pred";

/// The Intel Image Classification classes, in the order of the integer labels of its parquet
/// mirrors.
pub const CLASSES: [&str; 6] = [
    "buildings",
    "forest",
    "glacier",
    "mountain",
    "sea",
    "street",
];

/// A file that was left out of the import, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEntry {
    /// Path inside the source (archive member, folder-relative path or parquet row).
    pub path: String,
    pub reason: String,
}

/// Image counts per split; labelled splits are keyed by class name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train: BTreeMap<String, usize>,
    pub val: BTreeMap<String, usize>,
    pub test: BTreeMap<String, usize>,
    pub pred: usize,
}

/// Files of the import with identical bytes: one photo filed more than once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// Paths relative to the data directory (`train/street/2764.jpg`), sorted.
    pub files: Vec<String>,
    /// Whether the copies are filed under different classes, so that at most one of their
    /// labels is right.
    pub conflicting_labels: bool,
}

impl DuplicateGroup {
    /// Whether a copy is in the test split and another in train or val: the test accuracy
    /// then counts images the model was trained or selected on.
    pub fn leaks_into_test(&self) -> bool {
        let in_test = |f: &String| f.starts_with("test/");
        self.files.iter().any(in_test) && !self.files.iter().all(in_test)
    }
}

/// `manifest.json`: what was imported from where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `hf`, `kaggle`, `zip`, `folder` or `synthetic`.
    pub source: String,
    /// Class names; a label is an index into this list.
    pub classes: Vec<String>,
    pub splits: SplitCounts,
    pub skipped: Vec<SkippedEntry>,
    pub val_fraction: f64,
    pub seed: u64,
    /// Where the data came from (repository and revision, URL or path), for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
    /// The labelled images (train, val, test) found more than once, by their bytes: always
    /// written, so that an empty list reads as checked. None: an import by an earlier
    /// version, which did not look.
    #[serde(default)]
    pub duplicates: Option<Vec<DuplicateGroup>>,
    /// The images filed under another name than the source gave them (for its characters,
    /// the format its bytes hold, or a name two source files share): path in the data
    /// folder -> path in the source.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renamed: BTreeMap<String, String>,
}

impl Manifest {
    pub fn read(data_dir: &Path) -> Result<Manifest> {
        let path = data_dir.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::NotFetched {
                    path,
                    what: "no manifest".into(),
                })
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        serde_json::from_str(&text).map_err(|e| DataError::Manifest {
            path,
            message: e.to_string(),
        })
    }

    pub fn write(&self, data_dir: &Path) -> Result<()> {
        let path = data_dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Flushed: it marks a complete import (see `import`).
        fs::File::create(&path)
            .and_then(|mut file| {
                file.write_all((text + "\n").as_bytes())?;
                file.sync_all()
            })
            .map_err(|e| DataError::io(path, e))
    }

    pub fn count(&self, split: Split) -> usize {
        self.split_counts(split).values().sum()
    }

    pub fn split_counts(&self, split: Split) -> &BTreeMap<String, usize> {
        match split {
            Split::Train => &self.splits.train,
            Split::Val => &self.splits.val,
            Split::Test => &self.splits.test,
        }
    }
}

/// A labelled split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// The folder name under the data directory.
    pub fn dir_name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// One labelled split as (path, label) pairs, in a stable order (by class, then path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    pub classes: Vec<String>,
    pub samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Classes come from the manifest when there is one (so that every split agrees on the
    /// label indices even when a split lacks a class), else from the sorted folder names.
    pub fn open(data_dir: &Path, split: Split) -> Result<ImageFolder> {
        let root = data_dir.join(split.dir_name());
        if !root.is_dir() {
            return Err(DataError::NotFetched {
                path: root,
                what: format!("no {split} split"),
            });
        }
        let manifest_path = data_dir.join(MANIFEST_FILE);
        let classes = if manifest_path.exists() {
            let classes = Manifest::read(data_dir)?.classes;
            refuse_unknown_class_folders(&root, &classes)?;
            classes
        } else {
            // A class name is text in every report: a folder whose name is not is refused,
            // not left out.
            let mut names = Vec::new();
            for folder in list_dir(&root)?.into_iter().filter(|p| p.is_dir()) {
                match folder.file_name().and_then(|n| n.to_str()) {
                    Some(name) => names.push(name.to_string()),
                    None => {
                        return Err(DataError::Layout(format!(
                            "{}: a class folder's name must be UTF-8; rename it",
                            folder.display()
                        )))
                    }
                }
            }
            names.sort();
            names
        };
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            if !dir.is_dir() {
                // A class with no images in this split (e.g. an empty test set).
                continue;
            }
            // Subfolders included, as torchvision's ImageFolder and the import read them.
            let files = folder_image_files(&dir)?;
            samples.extend(files.into_iter().map(|p| (p, label)));
        }
        Ok(ImageFolder { classes, samples })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Refuses a folder of a split that is not one of the manifest's classes (one a user added,
/// or `Sea` beside `sea`): its images would be left out of training or evaluation unsaid.
fn refuse_unknown_class_folders(root: &Path, classes: &[String]) -> Result<()> {
    for folder in list_dir(root)?.into_iter().filter(|p| p.is_dir()) {
        let known = folder
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|name| classes.iter().any(|c| c == name));
        if !known {
            return Err(DataError::Layout(format!(
                "{} is not a folder of one of the classes of {MANIFEST_FILE} ({}): its images \
                 would not be used; move them into a class folder, or, to add a class, move it \
                 into the source you imported from and import that again (cargo xtask \
                 fetch-data)",
                folder.display(),
                classes.join(", ")
            )));
        }
    }
    Ok(())
}

/// Entries of `dir`, hidden files (dot files) excluded.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        out.push(entry.path());
    }
    Ok(out)
}
