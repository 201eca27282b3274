//! vt-train: train, evaluate and initialise VT-ResNet checkpoints (the `vt-train` binary is a
//! thin wrapper around [`cli::run`]).
//!
//! - [`train`]: the training loop, run folders, resumption; [`config`]: options and recipes;
//! - [`optim`], [`schedule`], [`loss`], [`ema`], [`mix`]: the optimisation pieces;
//! - [`eval`], [`metrics`], [`calibration`], [`compare`], [`explain`], [`plots`],
//!   [`progress`]: measuring and reporting; [`export`]: ONNX export; [`import`]: weights
//!   trained elsewhere;
//! - [`state`]: the saved training state; [`provenance`]: what trained a checkpoint;
//!   [`history`]: the checkpoints of the best epochs (`--checkpoint-hist`), which
//!   [`average`] averages; [`tensorboard`]: event files for TensorBoard; [`data`]: glue to
//!   vt-data's loader;
//! - [`learner`]: the setup and the optimiser step that [`train`] and [`lr_find`] (the
//!   learning-rate range test) share.

pub mod average;
pub mod calibrate;
pub mod calibration;
pub mod cli;
pub mod compare;
pub mod config;
pub mod data;
pub mod ema;
pub mod error;
pub mod eval;
pub mod explain;
pub mod export;
pub mod history;
pub mod import;
pub mod init;
pub mod learner;
pub mod loss;
pub mod lr_find;
pub mod metrics;
pub mod mix;
pub mod optim;
pub mod outputs;
pub mod plots;
pub mod progress;
pub mod provenance;
pub mod schedule;
pub mod state;
pub mod tensorboard;
pub mod threads;
pub mod train;

pub use error::{Result, TrainError};
