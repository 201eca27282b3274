use std::path::PathBuf;

/// Everything that can go wrong while fetching, importing, decoding or batching images.
///
/// A variant whose message holds its cause does not also return it from `source()`: a
/// cause chain (anyhow's "Caused by") would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("empty image data")]
    EmptyImage,
    #[error("the data is not an image (supported: JPEG, PNG, WebP, GIF, BMP)")]
    UnknownFormat,
    /// An image format recognised, but not one decoded.
    #[error(
        "{0} images are not supported (supported: JPEG, baseline or progressive, PNG, WebP, \
         GIF, BMP)"
    )]
    UnsupportedFormat(String),
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    /// Trimmed: zune-jpeg's I/O errors end in a newline, which would end up in the skip
    /// report and in the server's error responses.
    #[error("cannot decode image: {}", .0.to_string().trim_end())]
    Decode(image::ImageError),
    #[error("cannot encode image: {}", .0.to_string().trim_end())]
    Encode(image::ImageError),
    /// JPEG data that ends early: the decoder would make up the missing pixels.
    #[error("cannot decode image: truncated JPEG ({0})")]
    TruncatedJpeg(&'static str),
    #[error("cannot resize image: {0}")]
    Resize(String),
    #[error("{}: {cause}{}", .path.display(), remedy(.cause))]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A pipe or a device named as an image: reading it could block forever, or never end.
    #[error("{}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("{}: {len} bytes, more than an image of at most {max_pixels} pixels can take", path.display())]
    FileTooLarge {
        path: PathBuf,
        len: u64,
        max_pixels: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A split folder or the manifest is missing: the data set was never fetched.
    #[error(
        "{path} not found ({what}): data folders are made by `cargo xtask fetch-data`; run it \
         first (`--from DIR|ZIP` imports a copy you have)"
    )]
    NotFetched { path: PathBuf, what: String },
    #[error("invalid manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    /// A network transfer failed; `hint` says what the user can do about it.
    #[error("{what}: {message}\n{hint}")]
    Network {
        what: String,
        message: String,
        hint: String,
    },
    #[error("{path}: not a usable zip archive: {message}")]
    Zip { path: PathBuf, message: String },
    #[error("{path}: cannot read parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    /// The source does not look like the Intel Image Classification layout.
    #[error("{0}")]
    Layout(String),
    #[error("{} holds no image file (.{})", .0.display(), crate::image_files::IMAGE_EXTENSIONS.join(", ."))]
    NoImageFiles(PathBuf),
    /// Renaming a new import into place failed, and so did renaming the previous one back:
    /// it is left at `previous`, where the next import finds and restores it.
    #[error(
        "cannot move the new import into {data_dir} ({cause}) nor the previous one back from \
         {previous} ({restore_cause}); the next fetch-data puts it back, or rename it to \
         {data_dir} yourself"
    )]
    PreviousImportAside {
        data_dir: PathBuf,
        previous: PathBuf,
        cause: std::io::Error,
        restore_cause: std::io::Error,
    },
    /// Another import into the same data directory is running, or a training run reads it.
    #[error(
        "another fetch-data is writing {0}, or a training run is reading it: wait for it to \
         finish or choose another --data-dir"
    )]
    Locked(PathBuf),
    /// An import into the data directory a reader opens is running.
    #[error("fetch-data is importing into {0}: wait for it to finish")]
    Importing(PathBuf),
}

impl From<image::ImageError> for DataError {
    fn from(e: image::ImageError) -> Self {
        DataError::Decode(e)
    }
}

/// What to do about an I/O error the user can act on: a disk that filled up.
fn remedy(cause: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match cause.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
            " (free space there, then run again)"
        }
        _ => "",
    }
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
