//! `vt-train import`: a VT-ResNet trained elsewhere (in PyTorch, by `tools/reference` or a
//! notebook whose model follows the contract) as a vt checkpoint, for eval, vt-serve and the
//! rest: its state dict, from a PyTorch or safetensors file, checked tensor by tensor.

use std::path::PathBuf;

use candle_core::Device;
use vt_model::Model;

use crate::error::{Result, ResultExt};
use crate::init::{check_class_names, check_out_dir, write_checkpoint, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The weights: a PyTorch file (`torch.save` of the model's `state_dict()`, alone or
    /// under `state_dict`, `model` or `model_state_dict`) or a safetensors file, in any
    /// float precision, named as the model contract names them (prefixes such as `module.`
    /// are removed; `num_batches_tracked` is ignored).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated class names, in the order of the head's outputs (torchvision's
    /// ImageFolder sorts the folder names: buildings,forest,glacier,mountain,sea,street for
    /// the Intel photos). --heads too must be the model's: no weight's shape shows it.
    #[arg(long, value_delimiter = ',', required = true)]
    pub class_names: Vec<String>,
    /// Output checkpoint folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the checkpoint that --out already holds (never a folder holding anything
    /// else).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ImportArgs) -> Result<()> {
    check_class_names(&args.class_names)?;
    check_out_dir(&args.out, args.force)?;
    let config = args.model.config(args.class_names.clone());
    let model = Model::import(config, &args.weights, &Device::Cpu).with_context(|| {
        format!(
            "importing {} as {} ({} classes, {} px, tokens {}, token channels {}, heads {})",
            args.weights.display(),
            args.model.arch,
            args.class_names.len(),
            args.model.image_size,
            args.model.tokens,
            args.model.token_channels,
            args.model.heads
        )
    })?;
    write_checkpoint(&model, &args.out)
}
