//! The tensors a config implies, by name and shape, found without allocating them.
//!
//! A checkpoint's `config.json` fixes the shapes of its tensors, and a config claiming
//! billions of tokens implies tensors no machine holds: a loader that built the model first
//! aborted on the allocation before it saw that the weights file disagrees. So the loader
//! compares the file with these shapes first. They come from building the model itself
//! through a [`VarBuilder`] that records what it is asked for and hands out zero-stride
//! views of a single zero (construction only stores its tensors), so that the model's
//! structure is written down once, in its layers.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Result as CandleResult, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::config::VtConfig;
use crate::error::Result;
use crate::vt_resnet::VtResNet;

/// Every tensor of the model `config` describes, by contract name, with its shape. The
/// config must be valid ([`VtConfig::validate`]).
pub fn expected_shapes(config: &VtConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(&recorder), DType::F32, Device::Cpu);
    VtResNet::new(config, vb)?;
    Ok(recorder
        .shapes
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner))
}

/// A [`SimpleBackend`] that remembers each requested tensor's shape and returns a broadcast
/// zero of that shape, which owns one element whatever its size.
#[derive(Default)]
struct Recorder {
    shapes: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for &Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> CandleResult<Tensor> {
        self.shapes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), shape.dims().to_vec());
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> CandleResult<Tensor> {
        // The model asks for every tensor by its shape.
        candle_core::bail!("tensor `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::model::Model;

    /// The recorded shapes are those of the variables a built model holds.
    #[test]
    fn shapes_are_the_models() {
        let config = VtConfig {
            tokens: 4,
            token_channels: 32,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 3, 32)
        };
        let model = Model::init(config.clone(), &Device::Cpu).unwrap();
        let built: BTreeMap<String, Vec<usize>> = model
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.dims().to_vec()))
            .collect();
        assert_eq!(expected_shapes(&config).unwrap(), built);
    }

    /// Shapes of tensors far beyond any memory are named without being allocated.
    #[test]
    fn absurd_sizes_allocate_nothing() {
        let config = VtConfig {
            tokens: 8_589_934_592,
            token_channels: 16_777_216,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet34, 6, 32)
        };
        let shapes = expected_shapes(&config).unwrap();
        assert_eq!(shapes["vt.0.tokenizer.attn.weight"], [8_589_934_592, 256],);
        assert_eq!(
            shapes["vt.0.transformer.ffn1.weight"],
            [16_777_216, 16_777_216],
        );
    }
}
