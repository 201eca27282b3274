//! Layer constructors with PyTorch's default initialisation, so that a freshly initialised
//! model starts where the reference implementation does.

use candle_core::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::kernels;

/// `nn.Linear`: weight and bias uniform in +-1/sqrt(in).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// A bias-free convolution with square stride and padding, run by [`kernels::conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::conv2d(x, &self.weight, self.stride, self.padding)
    }
}

/// A bias-free convolution with torchvision ResNet's Kaiming-normal (fan-out, ReLU) init.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let std = (2.0 / (out_channels * kernel * kernel) as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    Ok(Conv2d {
        weight,
        stride,
        padding,
    })
}
