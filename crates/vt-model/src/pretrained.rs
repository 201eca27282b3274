//! ImageNet-pretrained stems: conv1, bn1 and layer1..3 from a torchvision- or timm-named
//! ResNet-18/34 safetensors file, a local path or a Hugging Face hub model id such as
//! `timm/resnet34.a1_in1k` (fetched with hf-hub, which honours `HF_ENDPOINT`, `HF_TOKEN`
//! and `HF_HOME`). `layer4` and `fc` are ignored: the VT stage replaces them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::checkpoint::{read_tensors, WEIGHTS_FILE};
use crate::error::{ModelError, Result};
use crate::model::Model;

/// Prefixes that wrappers (DataParallel, Lightning, ...) put in front of ResNet names.
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "model."];
const STEM_PREFIXES: [&str; 5] = ["conv1.", "bn1.", "layer1.", "layer2.", "layer3."];

/// Whether a tensor belongs to the ResNet stem (conv1, bn1, layer1..3).
pub fn is_stem(name: &str) -> bool {
    STEM_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Where pretrained weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl Source {
    /// An existing path is a file (or a folder holding `model.safetensors`); otherwise
    /// `OWNER/NAME[@REVISION]` is a hub model id.
    pub fn parse(spec: &str) -> Result<Source> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Source::File(path.join(WEIGHTS_FILE)));
        }
        if path.exists() {
            return Ok(Source::File(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (spec, None),
        };
        let valid_id = repo.split('/').count() == 2
            && repo.split('/').all(|part| !part.is_empty())
            && !spec.ends_with(".safetensors");
        if valid_id {
            Ok(Source::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(ModelError::Pretrained(format!(
                "`{spec}` is neither an existing file nor a hub model id like timm/resnet34.a1_in1k"
            )))
        }
    }

    /// The local safetensors file, downloading it from the hub when needed.
    pub fn fetch(&self) -> Result<PathBuf> {
        match self {
            Source::File(path) => Ok(path.clone()),
            Source::Hub { repo, revision } => {
                let client = hf_hub::HFClient::builder()
                    .retry_max_attempts(2)
                    .build_sync()
                    .map_err(|e| {
                        ModelError::Pretrained(format!("cannot create a hub client: {e}"))
                    })?;
                let (owner, name) = hf_hub::split_id(repo);
                client
                    .model(owner, name)
                    .download_file()
                    .filename(WEIGHTS_FILE)
                    .maybe_revision(revision.clone())
                    .send()
                    .map_err(|e| {
                        ModelError::Pretrained(format!(
                            "cannot download {WEIGHTS_FILE} of hub model `{repo}`: {e}"
                        ))
                    })
            }
        }
    }
}

/// The stem tensors of a ResNet file, with wrapper prefixes removed.
fn stem_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let tensors = read_tensors(path, device)?;
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let stripped = WRAPPER_PREFIXES
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .map(str::to_string)
                .unwrap_or(name);
            (stripped, t)
        })
        .filter(|(name, _)| is_stem(name))
        .collect())
}

/// Blocks per stage in layer1..3 of a ResNet file.
fn blocks_per_stage(tensors: &BTreeMap<String, Tensor>) -> [usize; 3] {
    std::array::from_fn(|stage| {
        let prefix = format!("layer{}.", stage + 1);
        tensors
            .keys()
            .filter_map(|n| {
                n.strip_prefix(&prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |last| last + 1)
    })
}

/// Loads the stem of `model` from `source`; returns the number of tensors loaded.
pub fn load_stem(model: &Model, source: &Source) -> Result<usize> {
    let path = source.fetch()?;
    let tensors = stem_tensors(&path, &model.device)?;
    let fail = |message: String| ModelError::Weights {
        path: path.clone(),
        message,
    };
    if tensors.keys().any(|n| n.ends_with(".conv3.weight")) {
        return Err(fail(
            "this is a Bottleneck ResNet (ResNet-50 or larger); VT-ResNet needs the BasicBlocks \
             of ResNet-18 or ResNet-34"
                .into(),
        ));
    }
    let found = blocks_per_stage(&tensors);
    let wanted = model.config.arch.stem_blocks();
    if found != wanted {
        let named = match found {
            [2, 2, 2] => " (ResNet-18)",
            [3, 4, 6] => " (ResNet-34)",
            _ => "",
        };
        return Err(fail(format!(
            "blocks per stage in layer1..3 are {found:?}{named}, but {} needs {wanted:?}",
            model.config.arch
        )));
    }
    let vars = model
        .varmap
        .data()
        .lock()
        .map_err(|_| fail("variable map lock poisoned".into()))?;
    let mut loaded = 0;
    for (name, var) in vars.iter().filter(|(n, _)| is_stem(n)) {
        let tensor = tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: path.clone(),
            name: name.clone(),
        })?;
        if tensor.dims() != var.dims() {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        var.set(tensor)?;
        loaded += 1;
    }
    if let Some(name) = tensors.keys().find(|n| !vars.contains_key(n.as_str())) {
        return Err(ModelError::UnexpectedTensor {
            path: path.clone(),
            name: name.clone(),
        });
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stem_tensors_are_recognised() {
        assert!(is_stem("layer3.1.conv2.weight") && is_stem("bn1.bias") && is_stem("conv1.weight"));
        assert!(!is_stem("vt.0.tokenizer.attn.weight") && !is_stem("head.bias"));
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("timm/resnet34.a1_in1k").unwrap(),
            Source::Hub {
                repo: "timm/resnet34.a1_in1k".into(),
                revision: None
            }
        );
        assert_eq!(
            Source::parse("timm/resnet18.a1_in1k@abc123").unwrap(),
            Source::Hub {
                repo: "timm/resnet18.a1_in1k".into(),
                revision: Some("abc123".into())
            }
        );
        assert!(Source::parse("missing/file.safetensors").is_err());
        assert!(Source::parse("just-a-name").is_err());
    }
}
