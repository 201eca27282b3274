//! Layer constructors with PyTorch's initialisation: torchvision ResNet's for convolutions,
//! the `nn.Linear` and `nn.BatchNorm2d` defaults for the rest.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Result;
use candle_core::{Module, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::kernels;

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// `nn.Linear`: `x W^T + b` over the last axis, the product run by [`kernels::linear_product`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Used while the weight is not a candle variable: then it never changes.
    frozen: Arc<kernels::FrozenLinear>,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let frozen = (!self.weight.is_variable()).then_some(&self.frozen);
        let y = kernels::linear_product(x, &self.weight, frozen)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

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
    Ok(Linear {
        weight,
        bias,
        frozen: Arc::default(),
    })
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

/// `nn.BatchNorm2d` with PyTorch's defaults (eps 1e-5, momentum 0.1). Training runs
/// [`kernels::batch_norm`], optionally fused with the ReLU that follows; evaluation folds it
/// into the convolution before it (see [`ConvBn`]).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    /// Normalises with the batch's statistics, updating the running ones; then ReLU when
    /// `relu`, in the same pass.
    fn normalize_batch(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let affine = Tensor::stack(&[&self.weight, &self.bias], 0)?;
        let moments = kernels::channel_moments(x)?;
        self.update_running(&moments.detach(), x.elem_count() / x.dim(1)?)?;
        kernels::batch_norm(x, &moments, &affine, BN_EPS, relu)
    }

    /// The evaluation-mode normalisation as a per-channel `x * scale + shift`.
    fn running_affine(&self) -> Result<kernels::ChannelAffine> {
        let scale = self
            .weight
            .broadcast_div(&(self.running_var.as_tensor() + BN_EPS)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        kernels::ChannelAffine::new(scale, shift)
    }

    /// PyTorch's update: an exponential average of the batch mean and of the unbiased
    /// batch variance (while the batch is normalised with the biased one).
    fn update_running(&self, moments: &Tensor, count: usize) -> Result<()> {
        if count < 2 {
            candle_core::bail!("batch norm needs more than one value per channel when training");
        }
        let blend = |running: &Var, batch: Tensor| {
            running.set(&((running.as_tensor() * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?)
        };
        blend(&self.running_mean, moments.get(0)?)?;
        blend(
            &self.running_var,
            (moments.get(1)? * (count as f64 / (count - 1) as f64))?,
        )
    }
}

/// A batch norm over `channels`, named as torchvision names it (weight, bias, running_mean,
/// running_var) and initialised as PyTorch does.
pub fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
    let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
    Ok(BatchNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        running_mean: Var::from_tensor(&running_mean)?,
        running_var: Var::from_tensor(&running_var)?,
    })
}

/// A convolution followed by its batch norm (and optionally a ReLU). In evaluation mode the
/// batch norm is folded into the convolution, which saves a pass over the output.
///
/// While the convolution's weight is not a candle variable (a model loaded for inference)
/// it never changes, and evaluation keeps what it derives from it and from the batch norm
/// from call to call; a training-mode pass, which moves the running statistics, drops the
/// batch norm's part.
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    frozen: Arc<kernels::FrozenConv>,
    frozen_affine: Arc<Mutex<Option<Arc<kernels::ChannelAffine>>>>,
}

/// A bias-free convolution (weights under `conv_vb`) and its batch norm (under `bn_vb`).
pub fn conv_bn(
    (in_channels, out_channels): (usize, usize),
    (kernel, stride, padding): (usize, usize, usize),
    conv_vb: VarBuilder,
    bn_vb: VarBuilder,
) -> Result<ConvBn> {
    Ok(ConvBn {
        conv: conv2d(in_channels, out_channels, kernel, stride, padding, conv_vb)?,
        bn: batch_norm(out_channels, bn_vb)?,
        frozen: Arc::default(),
        frozen_affine: Arc::default(),
    })
}

impl ConvBn {
    /// `bn(conv(x))`, then ReLU when `relu`; batch statistics when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let mut frozen_affine = self
            .frozen_affine
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if train {
            // The batch statistics move the running ones the kept affine was made from.
            *frozen_affine = None;
            drop(frozen_affine);
            return self.bn.normalize_batch(&self.conv.forward(x)?, relu);
        }
        let Conv2d {
            weight,
            stride,
            padding,
        } = &self.conv;
        if weight.is_variable() {
            let affine = self.bn.running_affine()?;
            return kernels::conv2d_affine(x, weight, &affine, relu, *stride, *padding, None);
        }
        let affine = match &*frozen_affine {
            Some(affine) => affine.clone(),
            None => frozen_affine
                .insert(Arc::new(self.bn.running_affine()?))
                .clone(),
        };
        drop(frozen_affine);
        let frozen = Some(&self.frozen);
        kernels::conv2d_affine(x, weight, &affine, relu, *stride, *padding, frozen)
    }
}
