//! Everything the request handlers share, built once at startup, and the reload that
//! swaps in a new model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use candle_core::Device;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use crate::admission::Admission;
use crate::args::ServeArgs;
use crate::auth::ApiKey;
use crate::batcher::{Arriving, BatchConfig, Batcher, ServedModel};
use crate::body_budget::BodyBudget;
use crate::classifier::Classifier;
use crate::error::ApiError;
use crate::fetch::UrlFetcher;
use crate::metrics::Metrics;
use crate::poll::Fingerprint;

/// Why the server did not start. Variants print their cause and do not also return it from
/// `source()`: a cause chain (anyhow's "Caused by") would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Args(crate::args::ArgsError),
    #[error(transparent)]
    Device(vt_model::ModelError),
    #[error("loading checkpoint {path}: {cause}")]
    Checkpoint {
        path: PathBuf,
        cause: vt_model::ModelError,
    },
    #[error("setting up metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("starting the model thread: {0}")]
    Thread(std::io::Error),
    #[error("warming up the model: {0}")]
    WarmUp(crate::classifier::ClassifyError),
    #[error("building the URL fetch client: {0}")]
    HttpClient(reqwest::Error),
    #[error("cannot listen on {addr}: {cause}{hint}")]
    Bind {
        addr: String,
        cause: std::io::Error,
        /// What to do about it, when the cause says (empty otherwise).
        hint: String,
    },
    #[error("reading the address the server is bound to: {0}")]
    Address(std::io::Error),
    #[error("cannot listen for {name}: {cause}")]
    Signal {
        /// The signal, and what it is for.
        name: &'static str,
        cause: std::io::Error,
    },
}

/// What a check of the checkpoint for changes found ([`AppState::reload_if_changed`]).
#[derive(Debug)]
pub enum Checked {
    Unchanged,
    /// Its files could not be read (the folder being replaced, or gone).
    Unreadable(std::io::Error),
    /// It changed, and a reload was tried: logged and counted, whatever its outcome.
    Reloaded,
}

/// What `GET /v1/models` reports about the loaded checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The checkpoint folder's name.
    pub name: String,
    pub arch: String,
    pub classes: Vec<String>,
    pub image_size: usize,
    pub parameters: usize,
    /// SHA-256 of model.safetensors, hex.
    pub sha256: String,
    pub device: String,
    /// Inference precision: f32, f16 or bf16.
    pub dtype: String,
    /// Whether f32 products multiply in bfloat16 (`--bf16-products`).
    pub bf16_products: bool,
    /// The checkpoint's temperature (`vt-train calibrate`): the probabilities are
    /// softmax(logits / T). None (null): uncalibrated.
    pub temperature: Option<f32>,
    /// What trained the weights, as `vt-train train` recorded it in config.json (epoch,
    /// validation scores, options, images). None (null): not recorded (`init`, `import`,
    /// `average`, or an earlier vt).
    pub training: Option<serde_json::Map<String, serde_json::Value>>,
    /// 1 for the model loaded at startup, one more for each successful reload.
    pub generation: u64,
    /// When this model was loaded, in seconds since the Unix epoch.
    pub loaded_at: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_pixels: u64,
    pub timeout: Duration,
    /// Time a connection may take to send the headers of its next request.
    pub header_timeout: Duration,
}

impl Limits {
    /// The answer to a request that ran past `timeout`.
    pub fn timed_out(&self) -> ApiError {
        ApiError::Timeout {
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }

    /// The answer to a request whose body had not all come when `timeout` passed.
    pub fn body_timed_out(&self) -> ApiError {
        ApiError::RequestTimeout {
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }
}

pub struct AppState {
    pub limits: Limits,
    /// Bounds concurrent decoding (and so its memory) to the number of threads.
    pub decode_slots: Arc<Semaphore>,
    pub admission: Admission,
    /// `--max-inflight-body-bytes`: the request body bytes all requests may hold at once.
    pub body_budget: Arc<BodyBudget>,
    /// Holds the current model, which a reload replaces.
    pub batcher: Batcher,
    pub fetcher: UrlFetcher,
    pub metrics: Arc<Metrics>,
    /// `--cors-allow-origin`: the web origins whose pages may call the API.
    pub cors_origins: Vec<HeaderValue>,
    /// `--api-key` (or the key in `--api-key-file`): what requests must present.
    pub api_key: Option<ApiKey>,
    source: ModelSource,
    batch: BatchConfig,
    /// The checkpoint's fingerprint taken before the last load or reload tried, which
    /// `--reload-poll-ms` compares the files with; held for a whole reload, so that reloads
    /// run one at a time.
    reloading: Mutex<Option<Fingerprint>>,
    /// Cleared when shutdown begins, so that readiness probes stop routing traffic here.
    accepting: AtomicBool,
    /// Set when a second shutdown signal closes the connections: the requests dropped then
    /// are the server's doing, not their clients'.
    cut_short: AtomicBool,
}

/// Reads the `--device`, `--dtype` and `--bf16-products` flags and loads the checkpoint onto
/// that device: the start of both the server and `predict`.
pub fn load_classifier(
    checkpoint: &Path,
    device: &str,
    dtype: &str,
    bf16_products: bool,
) -> Result<(Classifier, Device), StartError> {
    let device = vt_model::parse_device(device).map_err(StartError::Device)?;
    let dtype = vt_model::parse_dtype(dtype, &device).map_err(StartError::Device)?;
    vt_model::use_bf16_products(bf16_products, &device, dtype).map_err(StartError::Device)?;
    let classifier =
        Classifier::load(checkpoint, &device, dtype).map_err(|cause| StartError::Checkpoint {
            path: checkpoint.to_path_buf(),
            cause,
        })?;
    Ok((classifier, device))
}

/// Where the server's model comes from and how it is loaded: the same at startup and at
/// every reload.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub checkpoint: PathBuf,
    /// `--model-name`, else the checkpoint folder's name as given: named once, so that a
    /// reload of a link that now points elsewhere keeps the name clients call.
    pub name: String,
    pub device: String,
    pub dtype: String,
    pub bf16_products: bool,
}

impl ModelSource {
    pub fn new(args: &ServeArgs) -> ModelSource {
        ModelSource {
            checkpoint: args.checkpoint.clone(),
            name: args
                .model_name
                .clone()
                .unwrap_or_else(|| checkpoint_name(&args.checkpoint)),
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            bf16_products: args.bf16_products,
        }
    }

    /// Loads the checkpoint and describes it as model number `generation`. Blocking:
    /// reads and hashes files.
    pub fn load(&self, generation: u64) -> Result<(Classifier, ModelInfo), StartError> {
        let (classifier, device) = load_classifier(
            &self.checkpoint,
            &self.device,
            &self.dtype,
            self.bf16_products,
        )?;
        let config = classifier.config();
        let info = ModelInfo {
            name: self.name.clone(),
            arch: config.arch.to_string(),
            classes: config.class_names.clone(),
            image_size: config.image_size,
            parameters: classifier.model().num_parameters(),
            sha256: classifier.sha256().to_string(),
            device: vt_model::device_name(&device),
            dtype: self.dtype.clone(),
            bf16_products: self.bf16_products,
            temperature: config.temperature,
            training: config.training.clone(),
            generation,
            // A clock before 1970 is no reason to refuse a model: it reads 0 then.
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        Ok((classifier, info))
    }
}

impl AppState {
    /// Loads the checkpoint and starts the model thread. Blocking: reads and hashes files.
    pub fn load(args: &ServeArgs) -> Result<AppState, StartError> {
        args.validate().map_err(StartError::Args)?;
        let api_key = args.api_key().map_err(StartError::Args)?;
        let source = ModelSource::new(args);
        // Taken first, so that a change during the load is seen at the first check.
        let fingerprint = Fingerprint::of(&source.checkpoint).ok();
        let (classifier, info) = source.load(1)?;
        let metrics = Arc::new(Metrics::new().map_err(StartError::Metrics)?);
        metrics.serving(&info);
        let batch = BatchConfig {
            max_batch: args.max_batch as usize,
            max_delay: Duration::from_millis(args.max_delay_ms),
            queue: args.queue as usize,
        };
        let model = ServedModel::spawn(classifier, info, batch, Arc::clone(&metrics))?;
        Ok(AppState {
            limits: Limits {
                max_body_bytes: args.max_body_bytes,
                max_pixels: args.max_pixels,
                timeout: Duration::from_millis(args.timeout_ms),
                header_timeout: Duration::from_millis(args.header_timeout_ms),
            },
            decode_slots: Arc::new(Semaphore::new(args.threads())),
            admission: Admission::new(
                args.queue as usize,
                metrics.queue_depth.clone(),
                metrics.queue_waiting.clone(),
            ),
            body_budget: Arc::new(BodyBudget::new(
                args.inflight_body_bytes(),
                args.max_body_bytes,
                metrics.inflight_body_bytes.clone(),
            )),
            batcher: Batcher::new(model, &metrics),
            fetcher: UrlFetcher::new(&args.allow_url_fetch, args.max_body_bytes)
                .map_err(StartError::HttpClient)?,
            metrics,
            cors_origins: args.cors_allow_origin.clone(),
            api_key,
            source,
            batch,
            reloading: Mutex::new(fingerprint),
            accepting: AtomicBool::new(true),
            cut_short: AtomicBool::new(false),
        })
    }

    /// Loads the checkpoint again, from the same path with the same options, off the async
    /// runtime; starts its model thread (warmed up on a GPU, as at startup) and swaps it in.
    /// Requests that already took the previous model finish on it; later ones get the new
    /// one. On failure the previous model keeps serving. Either way the outcome is logged and
    /// counted. One reload runs at a time: a call during one waits for it, then reloads.
    pub async fn reload(&self) -> Result<Arc<ServedModel>, StartError> {
        let mut tried = self.reloading.lock().await;
        *tried = self.fingerprint().await.ok();
        self.load_and_swap().await
    }

    /// Reloads the checkpoint ([`AppState::reload`]) if its files changed since the last
    /// load or reload tried, whichever started it: a reload that failed is tried again only
    /// once the files change again, and one that SIGHUP started is not repeated.
    pub async fn reload_if_changed(&self) -> Checked {
        let mut tried = self.reloading.lock().await;
        match self.fingerprint().await {
            Err(e) => Checked::Unreadable(e),
            Ok(now) if tried.as_ref() == Some(&now) => Checked::Unchanged,
            Ok(now) => {
                *tried = Some(now);
                let checkpoint = self.source.checkpoint.display();
                tracing::info!(%checkpoint, "the checkpoint changed: reloading");
                // `load_and_swap` logs and counts a failure; the previous model keeps
                // serving.
                let _ = self.load_and_swap().await;
                Checked::Reloaded
            }
        }
    }

    /// The checkpoint's fingerprint now, read off the async runtime.
    async fn fingerprint(&self) -> std::io::Result<Fingerprint> {
        let checkpoint = self.source.checkpoint.clone();
        tokio::task::spawn_blocking(move || Fingerprint::of(&checkpoint))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// The body of a reload, run while `reloading` is held.
    async fn load_and_swap(&self) -> Result<Arc<ServedModel>, StartError> {
        let current = self.batcher.current();
        let serving = current.info.generation;
        let source = self.source.clone();
        let (batch, metrics) = (self.batch, Arc::clone(&self.metrics));
        let started = tokio::task::spawn_blocking(move || {
            let (classifier, info) = source.load(serving + 1)?;
            // The same weights and config (a SIGHUP with nothing new, a file touched): the
            // model served stays, under its version, as Triton keeps an unchanged model.
            if classifier.sha256() == current.info.sha256 && *classifier.config() == current.config
            {
                return Ok(None);
            }
            ServedModel::spawn(classifier, info, batch, metrics).map(Some)
        })
        .await
        .unwrap_or_else(|e| Err(StartError::Thread(std::io::Error::other(e))));
        let checkpoint = self.source.checkpoint.display();
        match started {
            Ok(None) => {
                self.metrics
                    .model_reloads
                    .with_label_values(&["unchanged"])
                    .inc();
                tracing::info!(
                    %checkpoint,
                    "the checkpoint is unchanged (the same weights and config): still serving \
                     generation {serving}"
                );
                Ok(self.batcher.current())
            }
            Ok(Some(model)) => {
                let model = self.batcher.swap(model);
                self.metrics.serving(&model.info);
                self.metrics.model_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    %checkpoint,
                    generation = model.info.generation,
                    sha256 = %model.info.sha256,
                    "reloaded the model"
                );
                Ok(model)
            }
            Err(e) => {
                self.metrics
                    .model_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    %checkpoint,
                    "reload failed, still serving generation {serving}: {e}"
                );
                Err(e)
            }
        }
    }

    /// Announces an inference request to the batcher ([`Batcher::arriving`]); refused once
    /// shutdown began: the drain waits for the requests in flight then, not for those that
    /// begin during it (on a connection whose request was still arriving), which it would
    /// cut off.
    pub fn arriving(&self) -> Result<Arriving, ApiError> {
        if !self.is_accepting() {
            return Err(ApiError::NotReady("shutting down".into()));
        }
        Ok(self.batcher.arriving())
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Whether the server takes requests, and the status probes answer: 200, or 503 once
    /// shutdown began.
    pub fn readiness(&self) -> (StatusCode, bool) {
        let ready = self.is_accepting();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, ready)
    }

    /// The model new requests get, if `name` is its name.
    pub fn model_named(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        let model = self.batcher.current();
        if name != model.info.name {
            return Err(ApiError::UnknownModel(format!(
                "unknown model `{name}`: this server serves `{}`",
                model.info.name
            )));
        }
        Ok(model)
    }

    /// `--max-batch`, `--max-delay-ms` and `--queue`.
    pub fn batch_config(&self) -> BatchConfig {
        self.batch
    }

    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
    }

    pub fn cut_short(&self) {
        self.cut_short.store(true, Ordering::Relaxed);
    }

    pub fn is_cut_short(&self) -> bool {
        self.cut_short.load(Ordering::Relaxed)
    }
}

/// The checkpoint folder's name as given (`runs/x/best` is `best`, though a link to
/// `epoch-007`); the name of the folder it resolves to only when the path ends in `..` or is
/// `.`.
fn checkpoint_name(dir: &Path) -> String {
    let resolved;
    let named = match dir.file_name() {
        Some(_) => dir,
        None => {
            resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            &resolved
        }
    };
    named.file_name().map_or_else(
        || named.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
