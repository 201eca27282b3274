//! ImageNet-pretrained stems: conv1, bn1 and layer1..3 from a torchvision- or timm-named
//! ResNet-18/34 safetensors or PyTorch file (f32, f16, bf16 or f64; torchvision publishes
//! `resnet18-f37072fd.pth`), a local path or a Hugging Face hub
//! model id such as `timm/resnet34.a1_in1k` (fetched with hf-hub, which honours
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`). `layer4` and `fc` are ignored: the VT stage
//! replaces them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use hf_hub::progress::{ProgressEvent, ProgressHandler};
use tokio::sync::Notify;

use crate::checkpoint::{read_selected, Floats, WEIGHTS_FILE};
use crate::error::{ModelError, Result};
use crate::model::Model;

/// Prefixes that wrappers put in front of ResNet names, possibly nested (`module.model.`):
/// DataParallel, Lightning and timm wrappers, torch.compile, detection backbones.
const WRAPPER_PREFIXES: [&str; 4] = ["module.", "model.", "_orig_mod.", "backbone."];
const STEM_PREFIXES: [&str; 5] = ["conv1.", "bn1.", "layer1.", "layer2.", "layer3."];

/// Longest silence from the hub: for a response's headers, then between two reads of the
/// body. reqwest's read timeout restarts after every read, so it bounds a stalled hub, not
/// the time a large download takes.
pub const HUB_READ_TIMEOUT: Duration = Duration::from_secs(15);
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One quick retry of a dropped connection; with [`HUB_READ_TIMEOUT`] a hub that accepts
/// connections but never answers fails in about 30 s.
const HUB_RETRIES: u32 = 1;

/// Whether a tensor belongs to the ResNet stem (conv1, bn1, layer1..3).
pub fn is_stem(name: &str) -> bool {
    STEM_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `name` without the wrapper prefixes in front of it.
pub(crate) fn unwrapped(mut name: &str) -> &str {
    while let Some(rest) = WRAPPER_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        name = rest;
    }
    name
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

/// How [`Source::fetch_with`] talks to the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Overrides `HF_ENDPOINT` (tests point it at a local server).
    pub endpoint: Option<String>,
    /// Overrides the hub cache (`HF_HOME/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Overrides [`HUB_READ_TIMEOUT`] (tests use a short one).
    pub read_timeout: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            endpoint: None,
            cache_dir: None,
            read_timeout: HUB_READ_TIMEOUT,
        }
    }
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
            Some((_, "")) => {
                return Err(ModelError::Pretrained(format!(
                    "`{spec}` names no revision after '@'"
                )))
            }
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
        self.fetch_with(&HubOptions::default())
    }

    /// [`Source::fetch`] with other hub settings.
    pub fn fetch_with(&self, hub: &HubOptions) -> Result<PathBuf> {
        match self {
            Source::File(path) => Ok(path.clone()),
            Source::Hub { repo, revision } => download(repo, revision.as_deref(), hub),
        }
    }
}

/// Wakes [`download`]'s watchdog at hf-hub's first progress event: the hub has answered.
struct Answered(Arc<Notify>);

impl ProgressHandler for Answered {
    fn on_progress(&self, _: &ProgressEvent) {
        self.0.notify_one();
    }
}

/// `model.safetensors` of hub model `repo` in the hub cache.
fn download(repo: &str, revision: Option<&str>, hub: &HubOptions) -> Result<PathBuf> {
    let fail = |what: &str, e: &dyn std::error::Error| {
        ModelError::Pretrained(format!("{what}: {}", error_chain(e)))
    };
    let http = reqwest::Client::builder()
        .connect_timeout(HUB_CONNECT_TIMEOUT)
        .read_timeout(hub.read_timeout)
        .user_agent(concat!(
            "vt-model/",
            env!("CARGO_PKG_VERSION"),
            "; hf-hub/1"
        ))
        .build()
        .map_err(|e| fail("cannot set up the HTTP client", &e))?;
    let mut builder = hf_hub::HFClient::builder()
        .client(http)
        .retry_max_attempts(HUB_RETRIES as usize)
        .retry_base_delay(Duration::from_millis(200));
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(dir) = &hub.cache_dir {
        builder = builder.cache_dir(dir.clone());
    }
    let client = builder
        .build()
        .map_err(|e| fail("cannot create a hub client", &e))?;
    let what = format!(
        "cannot download {WEIGHTS_FILE} of hub model `{repo}` from {}",
        client.endpoint()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("cannot start the download runtime", &e))?;
    let (owner, name) = hf_hub::split_id(repo);
    let model = client.model(owner, name);
    let revision = revision.map(str::to_string);
    // hf-hub asks for the file's metadata through an HTTP client of its own, without
    // timeouts: a hub that accepts the connection and never answers would hold it forever.
    // Its answer is bounded here, as long as our client would wait; the body's reads are
    // bounded by our client's read timeout.
    let patience = hub.read_timeout * (HUB_RETRIES + 1);
    let answered = Arc::new(Notify::new());
    runtime.block_on(async {
        let download = model
            .download_file()
            .filename(WEIGHTS_FILE)
            .maybe_revision(revision.clone())
            .progress(Answered(answered.clone()))
            .send();
        tokio::pin!(download);
        tokio::select! {
            result = &mut download => return result.map_err(|e| fail(&what, &e)),
            waited = tokio::time::timeout(patience, answered.notified()) => {
                if waited.is_err() {
                    // A cached copy will do, as hf-hub decides for an unreachable hub.
                    return model
                        .download_file()
                        .filename(WEIGHTS_FILE)
                        .maybe_revision(revision)
                        .local_files_only(true)
                        .send()
                        .await
                        .map_err(|_| {
                            ModelError::Pretrained(format!(
                                "{what}: the hub did not answer within {} s",
                                patience.as_secs_f32()
                            ))
                        });
                }
            }
        }
        download.await.map_err(|e| fail(&what, &e))
    })
}

/// `e` and its causes (connection refused, DNS failure, timeout...), each said once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The stem tensors of a ResNet file, in f32, with wrapper prefixes removed. Only these are
/// read: a layer4 or fc of another dtype does not matter.
fn stem_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    // What the other names start with, to say what the file holds when it has no stem.
    let mut others = BTreeSet::new();
    let tensors = read_selected(
        path,
        device,
        |name| {
            let stem = unwrapped(name);
            if stem.ends_with(".num_batches_tracked") {
                return None;
            }
            if is_stem(stem) {
                return Some(stem.to_string());
            }
            let wrappers = name.len() - stem.len();
            let end = stem.find('.').map_or(name.len(), |dot| wrappers + dot + 1);
            others.insert(name[..end].to_string());
            None
        },
        Floats::AnyToF32,
    )?;
    if tensors.is_empty() {
        const SHOWN: usize = 6;
        let mut starts: Vec<String> = others
            .iter()
            .take(SHOWN)
            .map(|p| format!("`{p}`"))
            .collect();
        if others.len() > SHOWN {
            starts.push("...".into());
        }
        let holds = if starts.is_empty() {
            "it holds no tensors".to_string()
        } else {
            format!("its tensor names start with {}", starts.join(", "))
        };
        return Err(ModelError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "no ResNet stem tensors (conv1.weight, bn1.*, layer1.0.*, ...) found; {holds}"
            ),
        });
    }
    Ok(tensors)
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
    let fail = |message: String| ModelError::Invalid {
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
    // Every check before the first write, so that a refused file leaves the model as it was.
    if let Some(name) = tensors.keys().find(|n| !vars.contains_key(n.as_str())) {
        return Err(ModelError::UnexpectedTensor {
            path: path.clone(),
            name: name.clone(),
        });
    }
    let mut assignments = Vec::new();
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
        assignments.push((var, tensor));
    }
    for (var, tensor) in &assignments {
        var.set(tensor)?;
    }
    Ok(assignments.len())
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
        assert!(Source::parse("timm/resnet18.a1_in1k@").is_err());
    }
}
