//! The ResNet stem (conv1, bn1, max-pool, layer1..layer3 of BasicBlocks), named as in
//! torchvision and timm so that ImageNet weights load directly.

use candle_core::{Result, Tensor};
use candle_nn::{batch_norm, BatchNorm, Module, ModuleT, VarBuilder};

use crate::layers::{conv2d, Conv2d};

const BN_EPS: f64 = 1e-5;
/// Widths of layer1, layer2 and layer3.
const STAGE_CHANNELS: [usize; 3] = [64, 128, 256];

fn bn(channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
    // candle's BatchNorm follows PyTorch: momentum 0.1, biased variance to normalise and
    // unbiased variance for the running estimate.
    batch_norm(channels, BN_EPS, vb)
}

/// `layerK.B`: conv3x3-bn-relu-conv3x3-bn, plus the shortcut, then ReLU.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let downsample = if stride != 1 || in_channels != out_channels {
            let vb = vb.pp("downsample");
            Some((
                conv2d(in_channels, out_channels, 1, stride, 0, vb.pp("0"))?,
                bn(out_channels, vb.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv2d(in_channels, out_channels, 3, stride, 1, vb.pp("conv1"))?,
            bn1: bn(out_channels, vb.pp("bn1"))?,
            conv2: conv2d(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?,
            bn2: bn(out_channels, vb.pp("bn2"))?,
            downsample,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// Every `step`-th element of `dim` from `start`, `len` of them; `x` must hold at least
/// `start + len * step` elements along `dim`.
fn strided(x: &Tensor, dim: usize, start: usize, len: usize, step: usize) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let picked = x.narrow(dim, start, len * step)?;
    shape[dim] = len;
    shape.insert(dim + 1, step);
    picked
        .reshape(shape)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)
}

/// Max-pool 3x3, stride 2, padding 1, floor rounding, built from strided views and
/// element-wise maxima because candle's own max-pool has no backward pass when the window
/// is larger than the stride. Zero padding is exact here: the input is post-ReLU (>= 0).
fn max_pool_3x3_stride2_pad1(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (out_h, out_w) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // One extra zero row/column on the far side lets every strided view take 2 * out elements.
    let padded = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 2)?;
    let mut result: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = strided(&padded, 2, dy, out_h, 2)?;
        for dx in 0..3 {
            let window = strided(&rows, 3, dx, out_w, 2)?;
            result = Some(match result {
                Some(r) => r.maximum(&window)?,
                None => window,
            });
        }
    }
    result.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// conv1 (7x7/2) - bn1 - ReLU - max-pool (3x3/2, pad 1) - layer1 - layer2 - layer3.
#[derive(Debug, Clone)]
pub struct Stem {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<BasicBlock>>,
}

impl Stem {
    pub fn new(blocks: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let mut in_channels = 64;
        let mut layers = Vec::with_capacity(3);
        for (stage, (&count, &channels)) in blocks.iter().zip(&STAGE_CHANNELS).enumerate() {
            let vb_layer = vb.pp(format!("layer{}", stage + 1));
            let first_stride = if stage == 0 { 1 } else { 2 };
            let layer = (0..count)
                .map(|b| {
                    let stride = if b == 0 { first_stride } else { 1 };
                    let block = BasicBlock::new(in_channels, channels, stride, vb_layer.pp(b));
                    in_channels = channels;
                    block
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(layer);
        }
        Ok(Stem {
            conv1: conv2d(3, 64, 7, 2, 3, vb.pp("conv1"))?,
            bn1: bn(64, vb.pp("bn1"))?,
            layers,
        })
    }
}

impl ModuleT for Stem {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let mut x = max_pool_3x3_stride2_pad1(&x)?;
        for block in self.layers.iter().flatten() {
            x = block.forward_t(&x, train)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_pool_matches_the_padded_window_maximum() {
        for (h, w) in [(5, 5), (6, 7), (1, 1), (2, 3)] {
            let x = Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let ours = max_pool_3x3_stride2_pad1(&x).unwrap();
            let padded = x
                .pad_with_zeros(2, 1, 1)
                .unwrap()
                .pad_with_zeros(3, 1, 1)
                .unwrap();
            let reference = padded.max_pool2d_with_stride(3, 2).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{h}x{w}");
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}
