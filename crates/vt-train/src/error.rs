use std::path::PathBuf;

/// Errors of the training library: configuration, run folders, state files, metrics and
/// plots.
///
/// A variant whose message holds its cause does not also return it from `source()`: a
/// cause chain (anyhow's "Caused by") would print it twice. Conversely, the variants that
/// only say what was being done ([`TrainError::Context`], [`TrainError::FileOp`],
/// [`TrainError::CtrlC`]) return their cause from `source()` and leave it out of their
/// message: print them with their chain (as the `vt-train` binary does), not with `{}`
/// alone.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Options that are invalid or that contradict each other, the run or the data; the
    /// message names the flag, file or folder at fault.
    #[error("{0}")]
    Config(String),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// `action` on `path` failed (e.g. "creating runs/x"); the OS error is the cause.
    #[error("{action} {path}")]
    FileOp {
        action: &'static str,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    /// A value that could not be written as JSON into `path`.
    #[error("cannot write {path} as JSON: {cause}")]
    JsonWrite {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: invalid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
    /// Another process trains in the run folder: it holds `lock`.
    #[error(
        "{run_dir} is in use by another vt-train process (it holds {lock}): wait for it to \
         end, or choose another --run-dir"
    )]
    RunInUse { run_dir: PathBuf, lock: PathBuf },
    /// A new run was asked for in the folder of an existing one.
    #[error(
        "{run_dir} already holds a training run: add --resume to continue it, or choose \
         another --run-dir"
    )]
    RunExists { run_dir: PathBuf },
    /// A new run was asked for in a folder holding one of a run's outputs, but nothing to
    /// resume.
    #[error(
        "{run_dir} holds {found}, which a training run writes, but no run to resume \
         (config.toml or state/): move it away, or choose another --run-dir"
    )]
    RunOutputs { run_dir: PathBuf, found: String },
    /// A run's checkpoint folder (`best/`, `last/`, `state/`) holds something else, which
    /// the run's saves would refuse to replace.
    #[error(
        "{path}: {reason}; it holds the run's checkpoints only: move that away, then run again"
    )]
    ForeignFiles { path: PathBuf, reason: String },
    /// Checkpoints of different models cannot be averaged: `first`'s and `other`'s configs
    /// (both `config.json` files) differ in `differences` (field: first's value vs
    /// other's).
    #[error(
        "{first} and {other} differ in {differences}: only checkpoints of one model \
         configuration can be averaged"
    )]
    ConfigMismatch {
        first: PathBuf,
        other: PathBuf,
        differences: String,
    },
    /// Every step of an epoch was skipped (a non-finite loss or gradient norm): nothing of
    /// it was saved, the run's files keep epoch `kept`.
    #[error(
        "epoch {epoch}: no training step succeeded (see the warnings above): the learning \
         rate is likely too high; the run's state keeps {} (`--resume` with a lower --lr, or \
         a --clip-grad, continues from there)",
        kept_epochs(*kept)
    )]
    NoStepSucceeded { epoch: usize, kept: usize },
    /// An epoch left weights that are not finite, or so large that the validation loss is
    /// not (`what` says which): nothing of it was saved, the run's files keep epoch `kept`.
    #[error(
        "diverged in epoch {epoch}: {what}; the run's state keeps {} (`--resume` with a \
         lower --lr, or a --clip-grad, continues from there)",
        kept_epochs(*kept)
    )]
    Diverged {
        epoch: usize,
        what: String,
        kept: usize,
    },
    /// `vt-train explain` could not read or draw some of the images (each named on stderr).
    #[error("{failed} of {total} images could not be explained (see above)")]
    NotExplained { failed: usize, total: usize },
    #[error("installing the Ctrl-C handler")]
    CtrlC(#[source] ctrlc::Error),
    /// What was being done when `cause` happened, naming the file, folder, flag or tensor:
    /// "loading checkpoint runs/x/best".
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        cause: Box<TrainError>,
    },
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

    /// `action` ("opening", "creating", ...) on `path` failed with `source`.
    pub fn file_op(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::FileOp {
            action,
            path: path.into(),
            cause: source,
        }
    }
}

/// Adds to an error what was being done, as [`TrainError::Context`].
pub trait ResultExt<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<TrainError>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| TrainError::Context {
            what: what.into(),
            cause: Box::new(e.into()),
        })
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| TrainError::Context {
            what: what(),
            cause: Box::new(e.into()),
        })
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// "epoch 3", or what a run has before its first epoch completes.
fn kept_epochs(kept: usize) -> String {
    match kept {
        0 => "no epoch".to_string(),
        n => format!("epoch {n}"),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// The messages of an error and of its causes, as anyhow's chain prints them.
    fn chain(err: &TrainError) -> Vec<String> {
        let mut messages = vec![err.to_string()];
        let mut source = err.source();
        while let Some(cause) = source {
            messages.push(cause.to_string());
            source = cause.source();
        }
        messages
    }

    #[test]
    fn a_context_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let err: Result<()> = Err(TrainError::file_op("creating", "runs/x", io));
        let err = err
            .with_context(|| "starting the run".to_string())
            .unwrap_err();
        assert_eq!(
            chain(&err),
            ["starting the run", "creating runs/x", "denied"]
        );
        let config: Result<()> = Err(TrainError::Config("--lr must be positive".into()));
        let err = TrainError::NoStepSucceeded { epoch: 2, kept: 1 }.to_string();
        assert!(
            err.contains("the run's state keeps epoch 1 (`--resume` with a lower --lr"),
            "{err}"
        );
        let err = config.context("--config a.toml").unwrap_err();
        assert_eq!(chain(&err), ["--config a.toml", "--lr must be positive"]);
    }
}
