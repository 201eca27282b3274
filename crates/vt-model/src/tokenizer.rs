//! Tokenizers (paper section 3.1): turn the feature map X (N x P x C) into L visual tokens
//! T (N x L x CT) by spatial attention A = softmax_P(logits / sqrt(C)), T = A^T V.

use candle_core::{Result, Tensor};
use candle_nn::{ops::softmax, Module, VarBuilder};

use crate::layers::{linear, Linear};

/// Where the tokenizer's grouping logits come from.
#[derive(Debug, Clone)]
enum Grouping {
    /// Filter-based (first module): logits = attn(X), a fixed set of L filters.
    Filter { attn: Linear },
    /// Recurrent (later modules): R = recur(T_prev), logits = X R^T.
    Recurrent { recur: Linear },
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    grouping: Grouping,
    value: Linear,
    scale: f64,
}

impl Tokenizer {
    /// `recurrent` selects the recurrent form (every module after the first).
    pub fn new(
        channels: usize,
        tokens: usize,
        token_channels: usize,
        recurrent: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let grouping = if recurrent {
            Grouping::Recurrent {
                recur: linear(token_channels, channels, false, vb.pp("recur"))?,
            }
        } else {
            Grouping::Filter {
                attn: linear(channels, tokens, false, vb.pp("attn"))?,
            }
        };
        Ok(Tokenizer {
            grouping,
            value: linear(channels, token_channels, false, vb.pp("value"))?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    /// `x`: N x P x C; `previous`: the previous module's tokens (N x L x CT), required by
    /// the recurrent form. Returns the tokens (N x L x CT) and the spatial attention A
    /// (N x P x L): how much each position contributes to each token.
    pub fn forward(&self, x: &Tensor, previous: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let logits = match (&self.grouping, previous) {
            (Grouping::Filter { attn }, _) => attn.forward(x)?,
            (Grouping::Recurrent { recur }, Some(tokens)) => {
                let r = recur.forward(tokens)?;
                x.matmul(&r.transpose(1, 2)?)?
            }
            (Grouping::Recurrent { .. }, None) => {
                candle_core::bail!("a recurrent tokenizer needs the previous module's tokens")
            }
        };
        // softmax over the P positions (dim 1) of N x P x L.
        let a = softmax(&(logits * self.scale)?, 1)?;
        // T = A^T value(X) = value(A^T X): `value` is linear without bias, and pooling the
        // P positions into L tokens first makes its product P / L times smaller.
        let tokens = self.value.forward(&a.transpose(1, 2)?.matmul(x)?)?;
        Ok((tokens, a))
    }
}
