//! The training and evaluation samples and their loader settings (vt_data does the work).

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use vt_data::dataset::{ImageFolder, Manifest, Split};
use vt_data::loader::{LoaderConfig, Transform};
use vt_data::rng::derive_seed;
use vt_data::transform::Normalize;
use vt_data::DataError;
use vt_model::VtConfig;

use crate::error::{Result, TrainError};

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
