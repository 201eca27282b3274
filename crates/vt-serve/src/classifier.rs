//! A loaded checkpoint that turns image bytes into class scores: the part shared by the
//! offline `predict` command and the HTTP server.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use fast_image_resize::Resizer;
use serde::Serialize;
use vt_data::decode::decode_rgb_limited;
use vt_data::transform::{eval_chw, Normalize};
use vt_model::{Model, VtConfig};

/// Why an image got no scores. `Inference` prints its cause, so it does not also return it
/// from `source()` (a cause chain would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Image(#[from] vt_data::DataError),
    #[error("inference failed: {0}")]
    Inference(candle_core::Error),
}

impl From<candle_core::Error> for ClassifyError {
    fn from(e: candle_core::Error) -> Self {
        ClassifyError::Inference(e)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Label {
    pub label: String,
    pub score: f32,
}

/// The scores of one image, and its token attention when asked for.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub logits: Vec<f32>,
    /// Softmax probabilities.
    pub probs: Vec<f32>,
    /// One entry per VT module, in order ([`Classifier::explain`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<TokenMaps>>,
}

/// One VT module's token attention over the stem's `height` x `width` feature map: for each
/// visual token, the share of it that each position makes up (row-major; each map sums to
/// 1, up to rounding in f16 or bf16), as `vt-train explain` draws it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenMaps {
    pub height: usize,
    pub width: usize,
    pub maps: Vec<Vec<f32>>,
}

impl Prediction {
    /// Why these scores cannot be given, when a logit or probability is NaN or infinite: the
    /// activations overflowed, which an f16 model's do past 65,504, and no class can be said
    /// to be more likely than another.
    pub fn not_finite(&self, dtype: DType) -> Option<String> {
        let finite = |values: &[f32]| values.iter().all(|v| v.is_finite());
        if finite(&self.logits) && finite(&self.probs) {
            return None;
        }
        let hint = match dtype {
            DType::F16 => ": its activations overflowed f16's range; use --dtype f32",
            _ => "",
        };
        Some(format!(
            "the model's scores for this image are not finite (NaN or infinite logits){hint}"
        ))
    }

    /// The `k` most probable classes, best first.
    pub fn top(&self, class_names: &[String], k: usize) -> Vec<Label> {
        ranked(&self.probs)
            .take(k)
            .map(|i| Label {
                label: class_names.get(i).cloned().unwrap_or_else(|| i.to_string()),
                score: self.probs[i],
            })
            .collect()
    }
}

/// The indices of `values`, highest value first.
pub fn ranked(values: &[f32]) -> impl Iterator<Item = usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.into_iter()
}

/// The contract's evaluation preprocessing, separate from the model so that request
/// handlers can decode and resize on their own threads while the model runs elsewhere.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocessor {
    pub image_size: u32,
    pub norm: Normalize,
}

impl Preprocessor {
    pub fn new(config: &VtConfig) -> Preprocessor {
        Preprocessor {
            image_size: config.image_size as u32,
            norm: Normalize {
                mean: config.mean,
                std: config.std,
            },
        }
    }

    /// Decodes (format sniffed from the bytes, images over `max_pixels` refused before
    /// decoding) and returns 3 x S x S normalised floats.
    pub fn run(
        &self,
        resizer: &mut Resizer,
        bytes: &[u8],
        max_pixels: u64,
    ) -> Result<Vec<f32>, ClassifyError> {
        let img = decode_rgb_limited(bytes, max_pixels)?;
        Ok(eval_chw(resizer, &img, self.image_size, &self.norm)?)
    }
}

pub struct Classifier {
    model: Model,
    preprocessor: Preprocessor,
    /// The SHA-256 of the weights file, as read.
    sha256: String,
}

impl Classifier {
    /// Loads a checkpoint on `device`, its weights converted to `dtype`.
    pub fn load(checkpoint: &Path, device: &Device, dtype: DType) -> vt_model::Result<Classifier> {
        let (model, sha256) = Model::load_hashed(checkpoint, device, dtype)?;
        let model = model.into_frozen()?;
        // The weights were copied on this thread's GPU stream; the model thread, on its own
        // stream, derives values from them once (folded batch norms) and keeps them.
        device.synchronize()?;
        let preprocessor = Preprocessor::new(&model.config);
        Ok(Classifier {
            model,
            preprocessor,
            sha256,
        })
    }

    /// The SHA-256 (hex) of the `model.safetensors` bytes the weights were read from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn config(&self) -> &VtConfig {
        &self.model.config
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn preprocessor(&self) -> Preprocessor {
        self.preprocessor
    }

    /// Decodes (format sniffed from the bytes) and applies the contract's evaluation
    /// preprocessing: 3 x S x S normalised floats.
    pub fn preprocess(
        &self,
        resizer: &mut Resizer,
        bytes: &[u8],
        max_pixels: u64,
    ) -> Result<Vec<f32>, ClassifyError> {
        self.preprocessor.run(resizer, bytes, max_pixels)
    }

    /// Runs the model once at each batch size that a server batching up to `max_batch`
    /// images reaches first (1, 2, 4, ... and `max_batch`) and returns those sizes. On a GPU
    /// the first batch of a size loads kernels and times cuDNN's convolution algorithms for
    /// its power-of-two bucket, which would otherwise hold up the first requests by up to
    /// seconds.
    pub fn warm_up(&self, max_batch: usize) -> Result<Vec<usize>, ClassifyError> {
        let mut sizes: Vec<usize> = std::iter::successors(Some(1), |n| Some(n * 2))
            .take_while(|&n| n < max_batch)
            .collect();
        sizes.push(max_batch.max(1));
        let s = self.model.config.image_size;
        let blank = vec![0.0; 3 * s * s];
        for &n in &sizes {
            self.predict(&vec![blank.clone(); n])?;
        }
        Ok(sizes)
    }

    /// Runs one batch of preprocessed images in evaluation mode.
    pub fn predict(&self, images: &[Vec<f32>]) -> Result<Vec<Prediction>, ClassifyError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.model.forward_t(&self.batch(images)?, false)?;
        scores(&logits, &self.model.config)
    }

    /// As [`Self::predict`], each prediction with its token attention: the same forward
    /// pass, whose tokenizers' attention is kept ([`vt_model::Model::token_attention`]).
    pub fn explain(&self, images: &[Vec<f32>]) -> Result<Vec<Prediction>, ClassifyError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let attention = self.model.token_attention(&self.batch(images)?)?;
        let mut predictions = scores(&attention.logits, &self.model.config)?;
        let mut modules = Vec::with_capacity(attention.maps.len());
        for maps in &attention.maps {
            let (_, tokens, height, width) = maps.dims4()?;
            let maps = maps
                .to_dtype(DType::F32)?
                .reshape((images.len(), tokens, height * width))?
                .to_device(&Device::Cpu)?
                .to_vec3::<f32>()?;
            modules.push((height, width, maps));
        }
        for (i, prediction) in predictions.iter_mut().enumerate() {
            let of_image = modules.iter().map(|(height, width, maps)| TokenMaps {
                height: *height,
                width: *width,
                maps: maps[i].clone(),
            });
            prediction.attention = Some(of_image.collect());
        }
        Ok(predictions)
    }

    /// `images` as one N x 3 x S x S tensor on the model's device, in its precision.
    fn batch(&self, images: &[Vec<f32>]) -> Result<Tensor, ClassifyError> {
        let s = self.model.config.image_size;
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        Ok(
            Tensor::from_vec(flat, (images.len(), 3, s, s), &Device::Cpu)?
                .to_device(&self.model.device)?
                .to_dtype(self.model.dtype)?,
        )
    }
}

/// Each image's logits and softmax probabilities (of the logits divided by the checkpoint's
/// temperature, if it has one), in f32 whatever the model's precision.
fn scores(logits: &Tensor, config: &VtConfig) -> Result<Vec<Prediction>, ClassifyError> {
    let logits = logits.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax(&config.calibrated(&logits)?, D::Minus1)?;
    let logits = logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let probs = probs.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    Ok(logits
        .into_iter()
        .zip(probs)
        .map(|(logits, probs)| Prediction {
            logits,
            probs,
            attention: None,
        })
        .collect())
}
