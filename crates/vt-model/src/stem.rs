//! The ResNet stem (conv1, bn1, max-pool, layer1..layer3 of BasicBlocks), named as in
//! torchvision and timm so that ImageNet weights load directly.

use candle_core::{Result, Tensor};
use candle_nn::{ModuleT, VarBuilder};

use crate::drop_path::scaled;
use crate::kernels::{add_relu, max_pool_3x3_stride2_pad1};
use crate::layers::{conv_bn, ConvBn};

/// Widths of layer1, layer2 and layer3.
const STAGE_CHANNELS: [usize; 3] = [64, 128, 256];

/// `layerK.B`: conv3x3-bn-relu-conv3x3-bn, plus the shortcut, then ReLU.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    downsample: Option<ConvBn>,
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
            Some(conv_bn(
                (in_channels, out_channels),
                (1, stride, 0),
                vb.pp("0"),
                vb.pp("1"),
            )?)
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv_bn(
                (in_channels, out_channels),
                (3, stride, 1),
                vb.pp("conv1"),
                vb.pp("bn1"),
            )?,
            conv2: conv_bn(
                (out_channels, out_channels),
                (3, 1, 1),
                vb.pp("conv2"),
                vb.pp("bn2"),
            )?,
            downsample,
        })
    }
}

impl BasicBlock {
    /// The block with its residual branch scaled per sample by `drop` (stochastic depth).
    fn forward_dropped(&self, x: &Tensor, train: bool, drop: Option<&Tensor>) -> Result<Tensor> {
        let y = self.conv1.forward_t(x, train, true)?;
        let y = scaled(self.conv2.forward_t(&y, train, false)?, drop)?;
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward_t(x, train, false)?,
            None => x.clone(),
        };
        add_relu(&y, &shortcut)
    }
}

/// conv1 (7x7/2) - bn1 - ReLU - max-pool (3x3/2, pad 1) - layer1 - layer2 - layer3.
#[derive(Debug, Clone)]
pub struct Stem {
    conv1: ConvBn,
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
            conv1: conv_bn((3, 64), (7, 2, 3), vb.pp("conv1"), vb.pp("bn1"))?,
            layers,
        })
    }
}

impl Stem {
    /// The stem with block i's residual branch scaled per sample by `drops[i]` (stochastic
    /// depth; blocks past the end of `drops` kept whole).
    pub fn forward_dropped(
        &self,
        x: &Tensor,
        train: bool,
        drops: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let x = self.conv1.forward_t(x, train, true)?;
        let mut x = max_pool_3x3_stride2_pad1(&x)?;
        for (i, block) in self.layers.iter().flatten().enumerate() {
            let drop = drops.get(i).and_then(Option::as_ref);
            x = block.forward_dropped(&x, train, drop)?;
        }
        Ok(x)
    }
}

impl ModuleT for Stem {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_dropped(x, train, &[])
    }
}
