//! Sources that feed an [`Importer`](crate::import::Importer): local folders and zips in
//! the Kaggle layout, parquet mirrors, and generated synthetic data.

pub mod folder;
pub mod parquet;
pub mod synthetic;
pub mod zip;

/// Refuse single files larger than this: the real images are a few kilobytes, and it stops a
/// stray video or a zip bomb from filling memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
