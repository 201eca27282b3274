//! VT-ResNet: a ResNet stem whose last stage is replaced by M visual-transformer modules
//! (tokenizer, transformer, projector), classified from the mean of the final tokens.

use candle_core::{Result, Tensor};
use candle_nn::{Module, ModuleT, VarBuilder};

use crate::config::{VtConfig, FEATURE_CHANNELS};
use crate::drop_path::PathDrops;
use crate::layers::{linear, Linear};
use crate::projector::Projector;
use crate::stem::Stem;
use crate::tokenizer::Tokenizer;
use crate::transformer::Transformer;

/// One visual-transformer module `vt.{i}`.
#[derive(Debug, Clone)]
pub struct VtModule {
    tokenizer: Tokenizer,
    transformer: Transformer,
    /// Absent in the last module, whose tokens go to the head.
    projector: Option<Projector>,
}

impl VtModule {
    fn new(config: &VtConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        let (c, ct) = (FEATURE_CHANNELS, config.token_channels);
        let projector = if index + 1 < config.vt_modules {
            Some(Projector::new(c, ct, config.heads, vb.pp("projector"))?)
        } else {
            None
        };
        Ok(VtModule {
            tokenizer: Tokenizer::new(c, config.tokens, ct, index > 0, vb.pp("tokenizer"))?,
            transformer: Transformer::new(ct, config.heads, vb.pp("transformer"))?,
            projector,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        previous: Option<&Tensor>,
        drops: &[Option<Tensor>; 2],
    ) -> Result<ModuleOutput> {
        let (tokens, attention) = self.tokenizer.forward(x, previous)?;
        let tokens = self.transformer.forward_dropped(&tokens, drops)?;
        let x = match &self.projector {
            Some(projector) => projector.forward(x, &tokens)?,
            None => x.clone(),
        };
        Ok(ModuleOutput {
            x,
            tokens,
            attention,
        })
    }
}

struct ModuleOutput {
    /// The updated feature map, N x P x C.
    x: Tensor,
    /// This module's tokens, N x L x CT.
    tokens: Tensor,
    /// Its tokenizer's spatial attention, N x P x L.
    attention: Tensor,
}

/// Logits together with where each module's tokens looked ([`VtResNet::token_attention`]).
#[derive(Debug, Clone)]
pub struct TokenAttention {
    /// N x num_classes.
    pub logits: Tensor,
    /// One N x L x H x W tensor per VT module, over the stem's H x W feature map: the share
    /// of each token that each position makes up (each token's map sums to 1).
    pub maps: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct VtResNet {
    stem: Stem,
    vt: Vec<VtModule>,
    head: Linear,
}

impl VtResNet {
    /// Builds the model, taking every tensor by its contract name from `vb`. Call
    /// [`VtConfig::validate`] first: this assumes a valid config.
    pub fn new(config: &VtConfig, vb: VarBuilder) -> Result<Self> {
        let stem = Stem::new(config.arch.stem_blocks(), vb.clone())?;
        let vt = (0..config.vt_modules)
            .map(|i| VtModule::new(config, i, vb.pp("vt").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let head = linear(
            config.token_channels,
            config.num_classes,
            true,
            vb.pp("head"),
        )?;
        Ok(VtResNet { stem, vt, head })
    }

    /// Training-mode logits with the stem frozen, as timm freezes a backbone: the stem runs
    /// in evaluation mode (BatchNorm normalises with its running statistics and leaves them
    /// as they are) and is cut from the graph, so the backward pass stops at the VT stage.
    pub fn forward_frozen_stem(&self, images: &Tensor) -> Result<Tensor> {
        let features = self.stem.forward_t(images, false)?.detach();
        self.classify(&features)
    }

    /// Training-mode logits with stochastic depth: every residual branch scaled per sample
    /// as `drops` says; with `stem_frozen`, as [`VtResNet::forward_frozen_stem`] (the stem's
    /// drops unused).
    pub fn forward_dropped(
        &self,
        images: &Tensor,
        drops: &PathDrops,
        stem_frozen: bool,
    ) -> Result<Tensor> {
        let features = if stem_frozen {
            self.stem.forward_t(images, false)?.detach()
        } else {
            self.stem.forward_dropped(images, true, &drops.stem)?
        };
        Ok(self.vt_stage(&features, &drops.vt)?.0)
    }

    /// Evaluation-mode logits and the spatial attention of every module's tokenizer: which
    /// parts of the image each visual token gathers (the paper's token visualisations).
    pub fn token_attention(&self, images: &Tensor) -> Result<TokenAttention> {
        let features = self.stem.forward_t(images, false)?;
        let (n, _, h, w) = features.dims4()?;
        let (logits, attention) = self.vt_stage(&features, &[])?;
        let maps = attention
            .iter()
            .map(|a| {
                let tokens = a.dim(2)?;
                a.transpose(1, 2)?.reshape((n, tokens, h, w))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TokenAttention { logits, maps })
    }

    /// The VT stage and the head over the stem's feature map.
    fn classify(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.vt_stage(features, &[])?.0)
    }

    /// Logits, and each module's spatial attention (N x P x L); module i's transformer
    /// branches scaled by `drops[i]` (kept whole past its end).
    fn vt_stage(
        &self,
        features: &Tensor,
        drops: &[[Option<Tensor>; 2]],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        // N x C x H x W -> N x P x C with p = y * W + x.
        let mut x = features.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut tokens: Option<Tensor> = None;
        let mut attention = Vec::with_capacity(self.vt.len());
        for (i, module) in self.vt.iter().enumerate() {
            let whole = [None, None];
            let out = module.forward(&x, tokens.as_ref(), drops.get(i).unwrap_or(&whole))?;
            x = out.x;
            tokens = Some(out.tokens);
            attention.push(out.attention);
        }
        let tokens = tokens.ok_or_else(|| candle_core::Error::Msg("no VT modules".into()))?;
        Ok((self.head.forward(&tokens.mean(1)?)?, attention))
    }
}

impl ModuleT for VtResNet {
    /// `images`: N x 3 x S x S normalised. Returns N x num_classes logits. In training mode
    /// BatchNorm uses batch statistics and updates its running statistics.
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        self.classify(&self.stem.forward_t(images, train)?)
    }
}
