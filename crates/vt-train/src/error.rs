use std::path::PathBuf;

/// Errors of the training library: configuration, state files, metrics and plots.
///
/// A variant whose message holds its cause does not also return it from `source()`: a
/// cause chain (anyhow's "Caused by") would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: invalid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] vt_model::ModelError),
    #[error(transparent)]
    Data(#[from] vt_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
