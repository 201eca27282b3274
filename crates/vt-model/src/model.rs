//! A VT-ResNet together with its variables: what training updates and checkpoints hold.

use std::path::Path;

use candle_core::{DType, Device, Result as CandleResult, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};

use crate::checkpoint::{self, WEIGHTS_FILE};
use crate::config::VtConfig;
use crate::error::Result;
use crate::vt_resnet::VtResNet;

pub struct Model {
    pub config: VtConfig,
    /// Every tensor of the checkpoint, BatchNorm running statistics included; the
    /// optimiser only updates those that receive gradients.
    pub varmap: VarMap,
    pub net: VtResNet,
    pub device: Device,
}

impl Model {
    /// A freshly initialised model (PyTorch's default initialisation).
    pub fn init(config: VtConfig, device: &Device) -> Result<Model> {
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net = VtResNet::new(&config, vb)?;
        Ok(Model {
            config,
            varmap,
            net,
            device: device.clone(),
        })
    }

    /// Loads a checkpoint folder strictly (see [`checkpoint`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Model> {
        let config = checkpoint::read_config(dir)?;
        let model = Model::init(config, device)?;
        let path = dir.join(WEIGHTS_FILE);
        let tensors = checkpoint::read_tensors(&path, device)?;
        checkpoint::assign_strict(&path, &model.varmap, &tensors)?;
        Ok(model)
    }

    /// Writes the checkpoint folder atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::write(dir, &self.config, &self.varmap)
    }

    /// Logits for a batch of normalised images (N x 3 x S x S).
    pub fn forward_t(&self, images: &Tensor, train: bool) -> CandleResult<Tensor> {
        self.net.forward_t(images, train)
    }

    /// Number of trainable parameters (BatchNorm running statistics excluded).
    pub fn num_parameters(&self) -> usize {
        self.varmap
            .data()
            .lock()
            .map(|vars| {
                vars.iter()
                    .filter(|(name, _)| {
                        !name.ends_with("running_mean") && !name.ends_with("running_var")
                    })
                    .map(|(_, var)| var.elem_count())
                    .sum()
            })
            .unwrap_or(0)
    }
}
