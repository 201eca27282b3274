use std::path::PathBuf;

/// Errors of model construction, checkpoints and pretrained weights.
///
/// A variant whose message holds its cause does not also return it from `source()`: a
/// cause chain (anyhow's "Caused by") would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("writing {target}: creating its temporary {temporary}: {cause}")]
    Temporary {
        temporary: PathBuf,
        target: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor `{name}` (not part of this model)")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {found}, expected F32")]
    DType {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{path}: tensor `{name}` holds {value} at element {index}: weights must be finite")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    /// A BatchNorm running variance below zero: the contract's sqrt(var + eps) is NaN
    /// there, which vt's fused ReLUs would hide (f32::max maps NaN to 0) while ONNX
    /// Runtime and PyTorch give NaN.
    #[error(
        "{path}: tensor `{name}` holds {value} at element {index}: a running variance must \
         not be negative"
    )]
    NegativeVariance {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    /// A checkpoint path where nothing is.
    #[error("no checkpoint folder at {path}")]
    NoCheckpoint { path: PathBuf },
    /// A run's `best/` or `last/` missing beside its saved state: the save stopped between
    /// them (a full disk), and a resume writes it from the state (or says why it cannot:
    /// a `best/` of an earlier epoch than the state's, removed by hand).
    #[error(
        "no checkpoint folder at {path}: the run's last save stopped before writing it, or it \
         was removed; `vt-train train --resume --run-dir {run}` writes it from the run's \
         state where that holds its epoch"
    )]
    RunCheckpointMissing { path: PathBuf, run: PathBuf },
    /// A run's `state/` with a weight average, given as a checkpoint.
    #[error(
        "{path} is a run's training state, whose model.safetensors holds the raw weights, \
         not the weight average (--ema) the run validated: give the run's best or last \
         checkpoint, beside it"
    )]
    AveragedRunState { path: PathBuf },
    /// A file where a checkpoint folder is expected.
    #[error(
        "{path} is a file: a checkpoint is the folder that holds config.json and \
         model.safetensors"
    )]
    NotAFolder { path: PathBuf },
    /// A folder whose subfolders are checkpoints (`checkpoints`, listed).
    #[error("{path} holds checkpoints, not one: give one of them ({checkpoints})")]
    FolderOfCheckpoints { path: PathBuf, checkpoints: String },
    /// A training run's folder where one of its checkpoints (`checkpoints`, listed) is
    /// expected.
    #[error("{path} is a training run's folder, not a checkpoint: give one of its checkpoints, {checkpoints}")]
    RunFolder { path: PathBuf, checkpoints: String },
    #[error(
        "{path}: {reason}; only a checkpoint folder is replaced: choose a new or empty folder"
    )]
    NotACheckpoint { path: PathBuf, reason: String },
    /// A file or folder that cannot be used as it is: not safetensors, a config that
    /// contradicts itself, a path that names no folder...
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A file's tensors that candle could not write (a full disk).
    #[error("{path}: {cause}")]
    Write {
        path: PathBuf,
        cause: Box<candle_core::Error>,
    },
    /// A file's tensor that candle could not read or place on the device (a GPU out of
    /// memory).
    #[error("{path}: tensor `{name}`: {cause}")]
    Tensor {
        path: PathBuf,
        name: String,
        cause: Box<candle_core::Error>,
    },
    #[error("pretrained weights: {0}")]
    Pretrained(String),
    #[error("device: {0}")]
    Device(String),
    /// An inference precision that is unknown or that the device cannot run.
    #[error("precision: {0}")]
    Precision(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
