//! Intel Image Classification data for VT-ResNet: download, import, decoding, augmentation
//! and batching.
//!
//! - [`fetch`]: `cargo xtask fetch-data`, from Hugging Face, Kaggle, a local zip or folder,
//!   or synthetic data, into `train/ val/ test/ pred/` plus `manifest.json`;
//! - [`dataset`]: reading that layout back ([`dataset::ImageFolder`], [`dataset::Manifest`]);
//! - [`augment`], [`color_jitter`], [`trivial_augment`], [`transform`]: torchvision-compatible training and
//!   evaluation transforms;
//! - [`loader`]: parallel, deterministic batching into candle tensors.

mod affine;
pub mod augment;
pub mod color_jitter;
pub mod dataset;
pub mod decode;
pub mod download;
pub mod error;
pub mod fetch;
pub mod hf;
mod hub_cache;
pub mod image_files;
pub mod import;
pub mod kaggle;
pub mod layout;
pub mod loader;
pub mod rng;
pub mod source;
pub mod split;
mod staging;
pub mod transform;
pub mod trivial_augment;

pub use error::{DataError, Result};
