//! Sources that feed an [`Importer`](crate::import::Importer): local folders and zips in
//! the Kaggle layout, parquet mirrors, and generated synthetic data.

pub mod folder;
pub mod parquet;
pub mod synthetic;
pub mod zip;

/// Refuse single files larger than this: the real images are a few kilobytes, and it stops a
/// stray video or a zip bomb from filling memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why an image of `len` bytes (`what`: "file", "entry"...) is skipped: it is over
/// [`MAX_FILE_BYTES`].
pub fn too_large(what: &str, len: u64) -> String {
    format!(
        "{what} of {len} bytes is over the {} MiB an image may have",
        MAX_FILE_BYTES >> 20
    )
}
