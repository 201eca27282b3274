//! The model configuration, stored as a checkpoint's `config.json`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Channels of the stem's last stage (layer3), the feature width C of the VT stage.
pub const FEATURE_CHANNELS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "vt-resnet18")]
    VtResNet18,
    #[serde(rename = "vt-resnet34")]
    VtResNet34,
}

impl Arch {
    /// BasicBlocks in layer1, layer2 and layer3.
    pub fn stem_blocks(self) -> [usize; 3] {
        match self {
            Arch::VtResNet18 => [2, 2, 2],
            Arch::VtResNet34 => [3, 4, 6],
        }
    }

    /// Number of visual-transformer modules M.
    pub fn vt_modules(self) -> usize {
        match self {
            Arch::VtResNet18 => 2,
            Arch::VtResNet34 => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::VtResNet18 => "vt-resnet18",
            Arch::VtResNet34 => "vt-resnet34",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vt-resnet18" => Ok(Arch::VtResNet18),
            "vt-resnet34" => Ok(Arch::VtResNet34),
            other => Err(ModelError::Config(format!(
                "unknown arch `{other}` (expected vt-resnet18 or vt-resnet34)"
            ))),
        }
    }
}

/// Model variants. `paper` is the contract's default and stays bit-for-bit as specified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    #[default]
    Paper,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VtConfig {
    pub arch: Arch,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    pub image_size: usize,
    /// L, the number of visual tokens.
    pub tokens: usize,
    /// CT, the token width.
    pub token_channels: usize,
    pub heads: usize,
    pub vt_modules: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Required, as the contract lists it: a config that lost it is not read as `paper`.
    pub variant: Variant,
    /// Temperature scaling (Guo et al., 2017), beyond the contract: the class probabilities
    /// are softmax(logits / T), the logits as the contract computes them. Written by
    /// `vt-train calibrate`; absent, the probabilities are the logits' softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// What trained the weights, beyond the contract: `vt-train train` records the epoch,
    /// validation scores, options and images (as timm's checkpoints carry their epoch,
    /// metric and arguments). The model ignores it; vt-serve and the ONNX export report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The largest `image_size` loaded or built: far above any classifier's input, and below
/// what would fail allocating a single image's activations (a checkpoint claiming a million
/// pixels a side aborted on a 12 TB allocation instead of being refused).
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The temperatures a checkpoint may hold, as (lowest, highest): what `vt-train calibrate`
/// searches. Past them a calibration says nothing the logits do not (all certain, or all
/// uniform), and a hand-edited 1e-40 would overflow every logit.
pub const TEMPERATURE_RANGE: (f32, f32) = (0.01, 100.0);

impl VtConfig {
    /// The contract's defaults for `arch`, with classes named `class0`, `class1`, ...
    pub fn new(arch: Arch, num_classes: usize, image_size: usize) -> Self {
        VtConfig {
            arch,
            num_classes,
            class_names: (0..num_classes).map(|i| format!("class{i}")).collect(),
            image_size,
            tokens: 16,
            token_channels: 1024,
            heads: 16,
            vt_modules: arch.vt_modules(),
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            variant: Variant::Paper,
            temperature: None,
            training: None,
        }
    }

    /// `logits` (N x K) divided by the temperature, where the checkpoint has one: what the
    /// class probabilities are the softmax of.
    pub fn calibrated(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        match self.temperature {
            Some(t) => logits / f64::from(t),
            None => Ok(logits.clone()),
        }
    }

    /// Sets `num_classes` from `class_names`.
    pub fn with_num_classes(mut self) -> Self {
        self.num_classes = self.class_names.len();
        self
    }

    /// Side of layer3's feature map for this image size (PyTorch's floor rounding).
    pub fn feature_map_size(&self) -> usize {
        let down = |s: usize, k: usize, stride: usize, pad: usize| {
            (s + 2 * pad).checked_sub(k).map_or(0, |v| v / stride + 1)
        };
        let conv1 = down(self.image_size, 7, 2, 3);
        let pool = down(conv1, 3, 2, 1);
        let layer2 = down(pool, 3, 2, 1);
        down(layer2, 3, 2, 1)
    }

    /// Checks every constraint of the contract; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(ModelError::Config(msg));
        if self.num_classes == 0 {
            return fail("num_classes must be at least 1".into());
        }
        if self.class_names.len() != self.num_classes {
            return fail(format!(
                "class_names has {} entries but num_classes is {}",
                self.class_names.len(),
                self.num_classes
            ));
        }
        if let Some(index) = self.class_names.iter().position(|n| n.trim().is_empty()) {
            return fail(format!("class_names[{index}] is empty"));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = self.class_names.iter().find(|n| !seen.insert(n.as_str())) {
            return fail(format!(
                "class_names lists `{twice}` twice: class names must be distinct"
            ));
        }
        if self.vt_modules != self.arch.vt_modules() {
            return fail(format!(
                "vt_modules is {} but {} has {}",
                self.vt_modules,
                self.arch,
                self.arch.vt_modules()
            ));
        }
        if self.tokens == 0 || self.token_channels == 0 || self.heads == 0 {
            return fail("tokens, token_channels and heads must be at least 1".into());
        }
        if !self.token_channels.is_multiple_of(2 * self.heads) {
            return fail(format!(
                "token_channels ({}) must be divisible by 2 * heads ({})",
                self.token_channels,
                2 * self.heads
            ));
        }
        if !FEATURE_CHANNELS.is_multiple_of(self.heads) {
            return fail(format!(
                "feature channels ({FEATURE_CHANNELS}) must be divisible by heads ({})",
                self.heads
            ));
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return fail(format!(
                "image_size {} is over {MAX_IMAGE_SIZE}, the largest this implementation runs",
                self.image_size
            ));
        }
        if self.image_size == 0 || self.feature_map_size() == 0 {
            return fail(format!(
                "image_size {} leaves no layer3 feature map",
                self.image_size
            ));
        }
        if self.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return fail(format!("std must be positive, got {:?}", self.std));
        }
        // A number too large for f32 reads as infinity, which would make every input NaN.
        if self.mean.iter().any(|m| !m.is_finite()) {
            return fail(format!("mean must be finite, got {:?}", self.mean));
        }
        if let Some(t) = self.temperature {
            let (low, high) = TEMPERATURE_RANGE;
            if !(low..=high).contains(&t) {
                return fail(format!(
                    "temperature must be between {low} and {high}, got {t}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_serialise_with_contract_names() {
        let config = VtConfig::new(Arch::VtResNet34, 6, 224);
        config.validate().unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["arch"], "vt-resnet34");
        assert_eq!(json["variant"], "paper");
        assert_eq!(json["vt_modules"], 3);
        assert_eq!(config.feature_map_size(), 14);
    }

    #[test]
    fn feature_map_follows_floor_rounding() {
        assert_eq!(
            VtConfig::new(Arch::VtResNet18, 6, 150).feature_map_size(),
            10
        );
        assert_eq!(VtConfig::new(Arch::VtResNet18, 6, 40).feature_map_size(), 3);
        assert_eq!(VtConfig::new(Arch::VtResNet18, 6, 1).feature_map_size(), 1);
    }

    #[test]
    fn broken_constraints_are_named() {
        let base = VtConfig::new(Arch::VtResNet18, 6, 64);
        let cases: Vec<(VtConfig, &str)> = vec![
            (
                VtConfig {
                    heads: 3,
                    ..base.clone()
                },
                "divisible",
            ),
            (
                VtConfig {
                    token_channels: 48,
                    heads: 16,
                    ..base.clone()
                },
                "2 * heads",
            ),
            (
                VtConfig {
                    vt_modules: 3,
                    ..base.clone()
                },
                "vt_modules",
            ),
            (
                VtConfig {
                    num_classes: 5,
                    ..base.clone()
                },
                "class_names",
            ),
            (
                VtConfig {
                    image_size: 0,
                    ..base.clone()
                },
                "image_size",
            ),
            (
                VtConfig {
                    image_size: 1_000_000,
                    ..base.clone()
                },
                "over 4096",
            ),
            (
                VtConfig {
                    class_names: ["a", "b", "c", "d", "b", "f"].map(String::from).to_vec(),
                    ..base.clone()
                },
                "`b` twice",
            ),
            (
                VtConfig {
                    class_names: ["a", "b", " ", "d", "e", "f"].map(String::from).to_vec(),
                    ..base.clone()
                },
                "class_names[2] is empty",
            ),
        ];
        for (config, needle) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    /// A hand-edited config.json whose mean is out of f32's range reads as infinity.
    #[test]
    fn a_mean_beyond_f32_is_refused() {
        let mut json = serde_json::to_value(VtConfig::new(Arch::VtResNet18, 6, 64)).unwrap();
        json["mean"] = serde_json::json!([1e39, 0.45, 0.4]);
        let config: VtConfig = serde_json::from_value(json).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("mean must be finite"), "{err}");
    }
}
