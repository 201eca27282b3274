//! The projector (section 3.3): fuses the tokens back into the feature map,
//! X_out = X + softmax((X Wq)(T Wk)^T / sqrt(d)) (T Wv), with multi-head attention.

use candle_core::{Result, Tensor, D};
use candle_nn::{ops::softmax, Module, VarBuilder};

use crate::layers::{linear, Linear};
use crate::transformer::{merge_heads, split_heads};

#[derive(Debug, Clone)]
pub struct Projector {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: usize,
    scale: f64,
}

impl Projector {
    pub fn new(
        channels: usize,
        token_channels: usize,
        heads: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Projector {
            query: linear(channels, channels, false, vb.pp("query"))?,
            key: linear(token_channels, channels, false, vb.pp("key"))?,
            value: linear(token_channels, channels, false, vb.pp("value"))?,
            heads,
            scale: 1.0 / ((channels / heads) as f64).sqrt(),
        })
    }

    /// `x`: N x P x C feature map, `tokens`: N x L x CT. Returns the new N x P x C map.
    pub fn forward(&self, x: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let k = split_heads(&self.key.forward(tokens)?, self.heads)?;
        let v = split_heads(&self.value.forward(tokens)?, self.heads)?;
        let attn = softmax(&(q.matmul(&k.transpose(2, 3)?)? * self.scale)?, D::Minus1)?;
        x + merge_heads(&attn.matmul(&v)?)?
    }
}
