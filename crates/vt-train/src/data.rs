//! The training and evaluation samples and their loader settings (vt_data does the work).

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vt_data::dataset::{ImageFolder, Manifest, Split};
use vt_data::loader::{LoaderConfig, Transform};
use vt_data::rng::derive_seed;
use vt_data::transform::Normalize;
use vt_data::DataError;
use vt_model::VtConfig;

use crate::error::{Result, TrainError};

/// Which images of a split a run uses: how many, and a SHA-256 of their paths within the
/// data folder and their classes, in order. A resume compares them with the run's: other
/// images would continue a schedule planned for these, and rank `best/` on another
/// validation set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesUsed {
    pub count: usize,
    pub sha256: String,
}

impl ImagesUsed {
    pub fn of(set: &ImageFolder, data_dir: &Path) -> Self {
        let mut hasher = Sha256::new();
        for (path, label) in &set.samples {
            // Within the data folder: a moved folder holds the same images.
            let within = path.strip_prefix(data_dir).unwrap_or(path);
            hasher.update(within.as_os_str().as_encoded_bytes());
            hasher.update([0]);
            hasher.update(set.classes[*label].as_bytes());
            hasher.update([0]);
        }
        ImagesUsed {
            count: set.samples.len(),
            sha256: format!("{:x}", hasher.finalize()),
        }
    }
}

/// The images of a run's training and validation splits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataUsed {
    pub train: ImagesUsed,
    pub val: ImagesUsed,
}

impl DataUsed {
    /// Refuses a resume on other images than `run`'s, naming the options that choose them.
    pub fn check_resume(&self, run: &DataUsed, data_dir: &Path) -> Result<()> {
        let differ = [
            ("training", &run.train, &self.train, "--limit-train"),
            ("validation", &run.val, &self.val, "--limit-val"),
        ]
        .into_iter()
        .find(|(_, then, now, _)| then != now);
        let Some((split, then, now, limit)) = differ else {
            return Ok(());
        };
        let same_count = if then.count == now.count {
            ", as many but others"
        } else {
            ""
        };
        Err(TrainError::Config(format!(
            "the {split} images of {} are not the run's ({} images then, {} now{same_count}): \
             --data, {limit} and, with a limit, --seed choose them, as does what the folder \
             holds (was it imported again?), and they cannot change on resume (the schedule \
             was planned for the run's images, and best/ chosen on its validation images). Give the run's options, or start a new run \
             (--initial-checkpoint RUN/last carries the weights over)",
            data_dir.display(),
            then.count,
            now.count
        )))
    }
}

/// Batches decoded ahead of the training step.
const PREFETCH: usize = 2;
/// Domain tag of the subset draw, so it is independent of the shuffle and augmentation.
const TAG_SUBSET: u64 = 0x5355_4253;

/// One labelled split, optionally reduced to a random subset of `limit` images (drawn from
/// `seed`, kept in folder order).
pub fn open_split(
    data_dir: &Path,
    split: Split,
    limit: Option<usize>,
    seed: u64,
) -> Result<ImageFolder> {
    let folder = open_nonempty(data_dir, split)?;
    Ok(subset(folder, split, limit, seed))
}

/// The training split as [`open_split`] opens it, refused when a class has no images
/// (torchvision's ImageFolder refuses it too): the model would learn a class it never sees.
/// The check precedes `limit`, whose subset may miss a class by design.
pub fn open_train_split(data_dir: &Path, limit: Option<usize>, seed: u64) -> Result<ImageFolder> {
    let split = Split::Train;
    let folder = open_nonempty(data_dir, split)?;
    let mut seen = vec![false; folder.classes.len()];
    for &(_, label) in &folder.samples {
        seen[label] = true;
    }
    if let Some(empty) = seen.iter().position(|s| !s) {
        return Err(TrainError::Config(format!(
            "{} has no images: every class needs training images",
            data_dir
                .join(split.dir_name())
                .join(&folder.classes[empty])
                .display()
        )));
    }
    Ok(subset(folder, split, limit, seed))
}

fn open_nonempty(data_dir: &Path, split: Split) -> Result<ImageFolder> {
    let folder = match ImageFolder::open(data_dir, split) {
        // A folder of the user's own (train/ beside it) that lacks a split is not a
        // missing import.
        Err(DataError::NotFetched { path, .. })
            if split != Split::Train && data_dir.join(Split::Train.dir_name()).is_dir() =>
        {
            let hint = match split {
                Split::Test => "this data folder has no test split, use --split val",
                _ => {
                    "put validation images in val/<class>/ folders, as torchvision's layout \
                      has them, or rename train/ to seg_train/ and import the folder with \
                      cargo xtask fetch-data, which sets some aside"
                }
            };
            return Err(TrainError::Config(format!(
                "{} not found: {hint}",
                path.display()
            )));
        }
        Err(DataError::NotFetched { path, what }) if split == Split::Train => {
            return Err(match misplaced_data_hint(data_dir) {
                Some(hint) => TrainError::Config(format!("{} not found: {hint}", path.display())),
                None => DataError::NotFetched { path, what }.into(),
            });
        }
        opened => opened?,
    };
    if folder.is_empty() {
        // Data imported from a folder without seg_test (the sample) has no test split.
        let hint = match split {
            Split::Test => ": this data folder has no test images, use --split val".to_owned(),
            Split::Val => match Manifest::read(data_dir) {
                Ok(manifest) if manifest.val_fraction == 0.0 => {
                    ": it was imported with --val-fraction 0; import again with a fraction \
                     above 0 (cargo xtask fetch-data --val-fraction 0.1)"
                        .to_owned()
                }
                Ok(_) => ": its classes have too few training images to set any aside; import \
                           more images, or again with a larger --val-fraction"
                    .to_owned(),
                // A folder not made by an import.
                Err(_) => ": put validation images in its CLASS/ folders, or import the data \
                            with cargo xtask fetch-data, which sets some aside"
                    .to_owned(),
            },
            _ => String::new(),
        };
        return Err(TrainError::Config(format!(
            "{} has no images{hint}",
            data_dir.join(split.dir_name()).display()
        )));
    }
    Ok(folder)
}

/// Where the data probably is when `data_dir` has no `train/`: an archive or a Kaggle
/// layout to import, or the folder a level above or below.
fn misplaced_data_hint(data_dir: &Path) -> Option<String> {
    let import = |source: &Path| {
        format!(
            "import it with `cargo xtask fetch-data --from {}`, then give --data the folder it \
             writes",
            source.display()
        )
    };
    if data_dir.is_file() {
        return Some(format!(
            "{} is a file; {}",
            data_dir.display(),
            import(data_dir)
        ));
    }
    // `data` stands for `./data`, whose parent is `.`.
    let parent = || {
        data_dir.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
    };
    let train = Split::Train.dir_name();
    let kaggle = if data_dir.ends_with("seg_train") {
        parent()
    } else {
        Some(data_dir).filter(|d| d.join("seg_train").is_dir())
    };
    if let Some(source) = kaggle {
        return Some(format!(
            "{} is in the Kaggle layout (seg_train/); {}",
            source.display(),
            import(source)
        ));
    }
    let is_split = Split::ALL
        .iter()
        .any(|split| data_dir.ends_with(split.dir_name()));
    if let Some(parent) = parent().filter(|p| is_split && p.join(train).is_dir()) {
        return Some(format!(
            "give --data {}, the folder that holds {train}/",
            parent.display()
        ));
    }
    let mut below: Vec<String> = std::fs::read_dir(data_dir)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path()))
        // Not a hidden folder: an interrupted import's, which is no data set.
        .filter(|child| {
            !child
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|child| child.join(train).is_dir())
        .map(|child| child.display().to_string())
        .collect();
    below.sort();
    (!below.is_empty()).then(|| format!("give --data {}, which holds {train}/", below.join(" or ")))
}

fn subset(mut folder: ImageFolder, split: Split, limit: Option<usize>, seed: u64) -> ImageFolder {
    if let Some(limit) = limit.filter(|&n| n < folder.len()) {
        let mut picked: Vec<usize> = (0..folder.len()).collect();
        picked.shuffle(&mut StdRng::seed_from_u64(derive_seed(&[
            TAG_SUBSET,
            seed,
            split as u64,
        ])));
        picked.truncate(limit);
        picked.sort_unstable();
        folder.samples = picked
            .into_iter()
            .map(|i| folder.samples[i].clone())
            .collect();
    }
    folder
}

/// Warns of the classes `val` holds no image of (an import's class of one image, a class
/// folder removed, a `--limit-val` subset): validation does not measure them.
pub fn warn_unmeasured(val: &ImageFolder) {
    let mut seen = vec![false; val.classes.len()];
    for &(_, label) in &val.samples {
        seen[label] = true;
    }
    let unmeasured: Vec<&str> = val
        .classes
        .iter()
        .zip(seen)
        .filter(|(_, seen)| !seen)
        .map(|(class, _)| class.as_str())
        .collect();
    if !unmeasured.is_empty() {
        tracing::warn!(
            "the validation images hold none of class(es) {}: validation accuracy does not \
             measure them (their per-class accuracy is null)",
            unmeasured.join(", ")
        );
    }
}

/// Refuses a validation split whose classes differ from the training split's (possible
/// without a manifest, where each split's folder names are its classes): its labels would
/// be read as other classes.
pub fn require_same_classes(train: &ImageFolder, val: &ImageFolder, data_dir: &Path) -> Result<()> {
    if train.classes == val.classes {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "the class folders of {} {:?} differ from those of {} {:?}: both splits need the \
         same classes",
        data_dir.join(Split::Val.dir_name()).display(),
        val.classes,
        data_dir.join(Split::Train.dir_name()).display(),
        train.classes
    )))
}

pub fn normalize(config: &VtConfig) -> Normalize {
    Normalize {
        mean: config.mean,
        std: config.std,
    }
}

/// Deterministic evaluation batches (the contract's resize and centre crop).
pub fn eval_loader(config: &VtConfig, batch_size: usize, threads: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: false,
        drop_last: false,
        seed: 0,
        threads,
        prefetch: PREFETCH,
        transform: Transform::Eval {
            image_size: config.image_size as u32,
            norm: normalize(config),
        },
    }
}

/// Shuffled, augmented training batches. The last partial batch is dropped when there is
/// more than one batch, so BatchNorm never sees a batch of one image.
pub fn train_loader(
    transform: Transform,
    images: usize,
    batch_size: usize,
    seed: u64,
    threads: usize,
) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: true,
        drop_last: images > batch_size,
        seed,
        threads,
        prefetch: PREFETCH,
        transform,
    }
}

/// Batches per epoch under `loader`.
pub fn batches_per_epoch(images: usize, loader: &LoaderConfig) -> u64 {
    let b = loader.batch_size.max(1);
    let batches = if loader.drop_last {
        images / b
    } else {
        images.div_ceil(b)
    };
    batches.max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_test_split_says_to_evaluate_on_val() {
        let data = tempfile::tempdir().unwrap();
        for split in [Split::Test, Split::Val] {
            std::fs::create_dir(data.path().join(split.dir_name())).unwrap();
        }
        let err = open_split(data.path(), Split::Test, None, 0).err().unwrap();
        assert!(err.to_string().contains("use --split val"), "{err}");
        let err = open_split(data.path(), Split::Val, None, 0).err().unwrap();
        assert!(!err.to_string().contains("--split"), "{err}");
    }

    /// A folder of the user's own with train/ only is not a missing import.
    #[test]
    fn a_missing_split_beside_train_says_what_to_do() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join(Split::Train.dir_name())).unwrap();
        let err = open_split(data.path(), Split::Test, None, 0).err().unwrap();
        let err = err.to_string();
        assert!(err.contains("has no test split, use --split val"), "{err}");
        assert!(!err.contains("fetch-data"), "{err}");
        let err = open_split(data.path(), Split::Val, None, 0).err().unwrap();
        let err = err.to_string();
        assert!(
            err.contains("put validation images in val/<class>/"),
            "{err}"
        );
        assert!(!err.contains("run it first"), "{err}");
    }
}
