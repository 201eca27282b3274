//! The paper's transformer over visual tokens (section 3.2): no LayerNorm, no value or output
//! projection. T' = T + softmax((T Wk)(T Wq)^T / sqrt(d)) T, T_out = T' + F2(ReLU(F1(T'))).

use candle_core::{Result, Tensor, D};
use candle_nn::{ops::softmax, Module, VarBuilder};

use crate::drop_path::scaled;
use crate::layers::{linear, Linear};

/// Splits the last axis of N x L x (h*d) into heads: N x h x L x d (contiguous blocks).
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, l, c) = x.dims3()?;
    x.reshape((n, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Inverse of [`split_heads`]: N x h x L x d back to N x L x (h*d), heads in order.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (n, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((n, l, h * d))
}

#[derive(Debug, Clone)]
pub struct Transformer {
    key: Linear,
    query: Linear,
    ffn1: Linear,
    ffn2: Linear,
    heads: usize,
    scale: f64,
}

impl Transformer {
    pub fn new(token_channels: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let half = token_channels / 2;
        Ok(Transformer {
            key: linear(token_channels, half, false, vb.pp("key"))?,
            query: linear(token_channels, half, false, vb.pp("query"))?,
            ffn1: linear(token_channels, token_channels, true, vb.pp("ffn1"))?,
            ffn2: linear(token_channels, token_channels, true, vb.pp("ffn2"))?,
            heads,
            scale: 1.0 / ((half / heads) as f64).sqrt(),
        })
    }
}

impl Transformer {
    /// The transformer with its attention and feed-forward branches scaled per sample by
    /// `drops` (stochastic depth).
    pub fn forward_dropped(&self, t: &Tensor, drops: &[Option<Tensor>; 2]) -> Result<Tensor> {
        let k = split_heads(&self.key.forward(t)?, self.heads)?;
        let q = split_heads(&self.query.forward(t)?, self.heads)?;
        let v = split_heads(t, self.heads)?;
        // S[i, j] = softmax_j(K_i . Q_j / sqrt(d))
        let s = softmax(&(k.matmul(&q.transpose(2, 3)?)? * self.scale)?, D::Minus1)?;
        let attended = scaled(merge_heads(&s.matmul(&v)?)?, drops[0].as_ref())?;
        let t = (t + attended)?;
        let ffn = self.ffn2.forward(&self.ffn1.forward(&t)?.relu()?)?;
        t + scaled(ffn, drops[1].as_ref())?
    }
}
