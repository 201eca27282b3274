//! VT-ResNet, the Visual Transformer of Wu et al. (arXiv 2006.03677) on a ResNet stem, in
//! candle, following the model contract (`shared/spec/vt-resnet.md`).
//!
//! Reading order follows the paper: [`stem`] gives the feature map, [`tokenizer`] turns it
//! into visual tokens (section 3.1), [`transformer`] relates them (3.2), [`projector`] fuses
//! them back into the map (3.3), and [`vt_resnet`] assembles VT-ResNet (4.1). [`onnx`]
//! exports a checkpoint as an ONNX model; [`drop_path`] is training's stochastic depth.

pub mod allocator;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod drop_path;
pub mod error;
pub mod kernels;
mod layers;
pub mod model;
pub mod onnx;
pub mod pretrained;
pub mod projector;
pub mod shapes;
pub mod stem;
pub mod temporary;
pub mod threads;
pub mod tokenizer;
mod torch_file;
pub mod transformer;
pub mod vt_resnet;

pub use config::{Arch, Variant, VtConfig};
pub use device::{
    device_name, names_a_gpu, parse_device, parse_dtype, use_bf16_products, DTYPE_NAMES,
};
pub use drop_path::PathDrops;
pub use error::{ModelError, Result};
pub use model::{Model, StartedFrom};
pub use vt_resnet::{TokenAttention, VtResNet};
