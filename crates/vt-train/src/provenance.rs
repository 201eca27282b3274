//! What trained a checkpoint: the record `vt-train train` writes into the `config.json` of
//! each checkpoint it saves (`best/`, `last/`, `top/`), under `training`, so that a
//! checkpoint copied out of its run, served or exported still says which epoch of which
//! options and images made it and how it scored (timm's checkpoints carry their epoch,
//! metric and arguments likewise). The contract's readers ignore the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vt_model::{checkpoint, Model};

use crate::config::TrainConfig;
use crate::data::DataUsed;
use crate::error::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// The vt-train that trained the weights.
    pub vt_version: String,
    /// Epochs completed when the weights were taken, of `options.epochs`.
    pub epoch: usize,
    /// Optimiser steps taken by then.
    pub step: u64,
    /// The validation split's accuracy and mean loss with these weights; None (absent) for
    /// weights taken within an epoch (the `last/` of an interrupted run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The training and validation images (count, and the SHA-256 of their paths within
    /// the data folder and their labels), as a resume checks them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<DataUsed>,
    /// The run's options, as its `config.toml` held them (the run folder is `run-dir`).
    pub options: TrainConfig,
}

impl TrainingRecord {
    /// The record of weights taken after `epoch` epochs and `step` steps of a run of
    /// `options`, scored `val` (accuracy, loss) when taken at an epoch's end.
    pub fn new(
        options: &TrainConfig,
        images: Option<&DataUsed>,
        epoch: usize,
        step: u64,
        val: Option<(f64, f64)>,
    ) -> Self {
        TrainingRecord {
            vt_version: env!("CARGO_PKG_VERSION").to_string(),
            epoch,
            step,
            val_accuracy: val.map(|(accuracy, _)| accuracy),
            val_loss: val.map(|(_, loss)| loss),
            images: images.cloned(),
            options: options.clone(),
        }
    }

    /// The record a checkpoint's config holds; None when it holds none, or one this
    /// vt-train does not read (written by another version).
    pub fn of(config: &vt_model::VtConfig) -> Option<Self> {
        config.training.as_ref().and_then(Self::read)
    }

    /// `record` (a config's `training`) read; None when this vt-train does not read it.
    pub fn read(record: &serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        serde_json::from_value(serde_json::Value::Object(record.clone())).ok()
    }

    /// Writes `model` to `dir` as a checkpoint (atomically) whose config holds this record.
    pub fn save(&self, model: &Model, dir: &Path) -> Result<()> {
        let serde_json::Value::Object(record) = serde_json::to_value(self)
            .map_err(|e| TrainError::Config(format!("recording the training: {e}")))?
        else {
            return Err(TrainError::Config(
                "recording the training: not a JSON object".into(),
            ));
        };
        let config = vt_model::VtConfig {
            training: Some(record),
            ..model.config.clone()
        };
        checkpoint::write(dir, &config, &model.varmap)?;
        Ok(())
    }
}
