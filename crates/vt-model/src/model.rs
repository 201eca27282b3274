//! A VT-ResNet together with its variables: what training updates and checkpoints hold.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::PoisonError;

use candle_core::{DType, Device, Result as CandleResult, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};

use crate::checkpoint::{self, Floats, WEIGHTS_FILE};
use crate::config::VtConfig;
use crate::drop_path::PathDrops;
use crate::error::{ModelError, Result};
use crate::pretrained::unwrapped;
use crate::shapes::expected_shapes;
use crate::vt_resnet::{TokenAttention, VtResNet};

/// What [`Model::start_from`] took from the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedFrom {
    AllWeights,
    /// Its classes differ from the model's.
    AllButTheHead,
}

/// The prefix of the classifier head's tensors.
const HEAD: &str = "head.";

pub struct Model {
    pub config: VtConfig,
    /// Every tensor of the checkpoint, BatchNorm running statistics included; the
    /// optimiser only updates those that receive gradients.
    pub varmap: VarMap,
    pub net: VtResNet,
    pub device: Device,
    /// The precision of every variable; inputs are converted to it.
    pub dtype: DType,
}

impl Model {
    /// A freshly initialised model (PyTorch's default initialisation), in f32.
    pub fn init(config: VtConfig, device: &Device) -> Result<Model> {
        Model::init_as(config, device, DType::F32)
    }

    /// A freshly initialised model in `dtype` (f16/bf16: for inference benchmarks).
    pub fn init_as(config: VtConfig, device: &Device, dtype: DType) -> Result<Model> {
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let net = VtResNet::new(&config, vb)?;
        Ok(Model {
            config,
            varmap,
            net,
            device: device.clone(),
            dtype,
        })
    }

    /// Loads a checkpoint folder strictly (see [`checkpoint`]), in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Model> {
        Model::load_as(dir, device, DType::F32)
    }

    /// Loads a checkpoint folder strictly, converting its f32 weights to `dtype` (f16 or
    /// bf16 for inference).
    pub fn load_as(dir: &Path, device: &Device, dtype: DType) -> Result<Model> {
        Ok(Model::load_with_bytes(dir, device, dtype, checkpoint::read_config)?.0)
    }

    /// A model of `config` with every weight from the state dict in `path`: a PyTorch file
    /// (`torch.save`) or a safetensors file, in any float precision, its tensors named as
    /// the contract names them once wrapper prefixes (`module.`, `model.`, ...) are removed;
    /// `num_batches_tracked` is ignored. Strict: a tensor missing, left over or of another
    /// shape is an error naming it.
    pub fn import(config: VtConfig, path: &Path, device: &Device) -> Result<Model> {
        let model = Model::init(config, device)?;
        let tensors = checkpoint::read_selected(
            path,
            device,
            |name| {
                let name = unwrapped(name);
                (!name.ends_with(".num_batches_tracked")).then(|| name.to_string())
            },
            Floats::AnyToF32,
        )?;
        let expected = expected_shapes(&model.config)?;
        let missing: Vec<&String> = expected
            .keys()
            .filter(|n| !tensors.contains_key(*n))
            .collect();
        let extra: Vec<&String> = tensors
            .keys()
            .filter(|n| !expected.contains_key(*n))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            // Both sides, a few names each: a model named otherwise shows how at once.
            let some = |names: &[&String]| {
                let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
                match names.len() {
                    n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
                    _ => shown.join(", "),
                }
            };
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("missing {}", some(&missing)));
            }
            if !extra.is_empty() {
                parts.push(format!("not the model's {}", some(&extra)));
            }
            return Err(ModelError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "its tensors are not the model contract's: {} (the file holds {} tensor{}, \
                     the model has {})",
                    parts.join("; "),
                    tensors.len(),
                    if tensors.len() == 1 { "" } else { "s" },
                    expected.len()
                ),
            });
        }
        checkpoint::assign_strict(path, &model.varmap, &tensors, |_| true)?;
        Ok(model)
    }

    /// Loads the model of a run's `state/`, which [`Model::load`] refuses when it keeps a
    /// weight average: to resume the run.
    pub fn load_run_state(dir: &Path, device: &Device) -> Result<Model> {
        let read_config = checkpoint::read_run_state_config;
        Ok(Model::load_with_bytes(dir, device, DType::F32, read_config)?.0)
    }

    /// As [`Model::load_as`], with the SHA-256 ([`checkpoint::sha256_hex`]) of the weights
    /// file it read: of the same bytes, though the folder be replaced meanwhile (as training
    /// replaces `best/`).
    pub fn load_hashed(dir: &Path, device: &Device, dtype: DType) -> Result<(Model, String)> {
        let (model, bytes) = Model::load_with_bytes(dir, device, dtype, checkpoint::read_config)?;
        Ok((model, checkpoint::sha256_hex(&bytes)))
    }

    /// The model of the checkpoint in `dir`, and the bytes of the weights file it read.
    ///
    /// The folder may be replaced while it is read (training renames a new `best/` in, a
    /// deployment points a link elsewhere): the config is read again after the weights, and
    /// when it changed, both are read afresh, so that one checkpoint's class names never
    /// label another's scores.
    fn load_with_bytes(
        dir: &Path,
        device: &Device,
        dtype: DType,
        read_config: fn(&Path) -> Result<VtConfig>,
    ) -> Result<(Model, Vec<u8>)> {
        const READS: usize = 3;
        let path = dir.join(WEIGHTS_FILE);
        for _ in 0..READS {
            let config = read_config(dir)?;
            let bytes = fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            if read_config(dir)? != config {
                continue;
            }
            // The file's shapes first: the config alone may ask for more than any memory.
            checkpoint::check_shapes(&path, &bytes, &expected_shapes(&config)?)?;
            let model = Model::init_as(config, device, dtype)?;
            let tensors = checkpoint::tensors_of(&path, &bytes, device)?;
            checkpoint::assign_strict(&path, &model.varmap, &tensors, |_| true)?;
            return Ok((model, bytes));
        }
        Err(ModelError::Invalid {
            path: dir.to_path_buf(),
            message: format!(
                "its config.json changed while its weights were read, {READS} times in a row"
            ),
        })
    }

    /// Sets this model's weights to those of the checkpoint in `dir`, the start of a
    /// fine-tuning run: all of them when the two have the same classes, all but the head's
    /// otherwise (the head stays as initialised, since one for other classes is of no use).
    /// Everything else the weights depend on must agree; the image size need not.
    pub fn start_from(&self, dir: &Path) -> Result<StartedFrom> {
        let source = checkpoint::read_config(dir)?;
        let ours = &self.config;
        let differences: Vec<String> = [
            ("arch", source.arch.to_string(), ours.arch.to_string()),
            ("tokens", source.tokens.to_string(), ours.tokens.to_string()),
            (
                "token channels",
                source.token_channels.to_string(),
                ours.token_channels.to_string(),
            ),
            ("heads", source.heads.to_string(), ours.heads.to_string()),
            (
                "mean",
                format!("{:?}", source.mean),
                format!("{:?}", ours.mean),
            ),
            (
                "std",
                format!("{:?}", source.std),
                format!("{:?}", ours.std),
            ),
        ]
        .into_iter()
        .filter(|(_, theirs, ours)| theirs != ours)
        .map(|(what, theirs, ours)| format!("{what} {theirs} (wanted {ours})"))
        .collect();
        if !differences.is_empty() {
            return Err(ModelError::Invalid {
                path: dir.to_path_buf(),
                message: format!(
                    "a model to start from must match this one: it has {}",
                    differences.join(", ")
                ),
            });
        }
        let started = if source.class_names == ours.class_names {
            StartedFrom::AllWeights
        } else {
            StartedFrom::AllButTheHead
        };
        let keep = |name: &str| started == StartedFrom::AllWeights || !name.starts_with(HEAD);
        let path = dir.join(WEIGHTS_FILE);
        let mut tensors = checkpoint::read_tensors(&path, &self.device)?;
        tensors.retain(|name, _| keep(name));
        checkpoint::assign_strict(&path, &self.varmap, &tensors, keep)?;
        Ok(started)
    }

    /// The same model for inference only. Its layers take the weights as plain tensors
    /// (sharing the variables' memory) instead of variables, which tells them the weights
    /// never change: they keep what they derive from them from call to call (weights packed
    /// for the products or moved into Winograd's transform domain, folded batch norms). Not
    /// for training: the optimiser's updates of the variables would not reach them.
    pub fn into_frozen(self) -> Result<Model> {
        let tensors: HashMap<String, Tensor> = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, self.dtype, &self.device);
        let net = VtResNet::new(&self.config, vb)?;
        Ok(Model { net, ..self })
    }

    /// Writes the checkpoint folder atomically. Checkpoints are f32 by contract, so a model
    /// loaded at another precision for inference cannot be saved.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.dtype != DType::F32 {
            return Err(ModelError::Invalid {
                path: dir.to_path_buf(),
                message: format!(
                    "checkpoints are f32; this model was loaded as {:?} for inference",
                    self.dtype
                ),
            });
        }
        checkpoint::write(dir, &self.config, &self.varmap)
    }

    /// Logits for a batch of normalised images (N x 3 x S x S).
    pub fn forward_t(&self, images: &Tensor, train: bool) -> CandleResult<Tensor> {
        self.net.forward_t(images, train)
    }

    /// Training-mode logits with the stem frozen ([`VtResNet::forward_frozen_stem`]).
    pub fn forward_frozen_stem(&self, images: &Tensor) -> CandleResult<Tensor> {
        self.net.forward_frozen_stem(images)
    }

    /// Training-mode logits with stochastic depth ([`VtResNet::forward_dropped`]).
    pub fn forward_dropped(
        &self,
        images: &Tensor,
        drops: &PathDrops,
        stem_frozen: bool,
    ) -> CandleResult<Tensor> {
        self.net.forward_dropped(images, drops, stem_frozen)
    }

    /// Evaluation-mode logits with each VT module's token attention maps
    /// ([`VtResNet::token_attention`]).
    pub fn token_attention(&self, images: &Tensor) -> CandleResult<TokenAttention> {
        self.net.token_attention(images)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    /// Images smaller than the stem's kernel or the network's stride of 32 leave one-pixel
    /// feature maps, whose kernel columns fall wholly in the padding: the model still trains
    /// and infers on them, as PyTorch's does.
    #[test]
    fn tiny_images_train_and_infer() {
        for image_size in [1, 7, 16, 17, 33] {
            let model =
                Model::init(VtConfig::new(Arch::VtResNet18, 3, image_size), &Device::Cpu).unwrap();
            let images =
                Tensor::randn(0f32, 1.0, (2, 3, image_size, image_size), &Device::Cpu).unwrap();
            let logits = model.forward_t(&images, true).unwrap();
            assert_eq!(logits.dims(), [2, 3], "{image_size} px");
            logits.sum_all().unwrap().backward().unwrap();
            let frozen = model.into_frozen().unwrap();
            let logits = frozen.forward_t(&images, false).unwrap();
            let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{image_size} px");
        }
    }
}
