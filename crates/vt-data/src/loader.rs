//! Batches for training and evaluation: worker threads decode and transform images into a
//! bounded window of batches ahead of the consumer, and batches come out in plan order, so
//! results never depend on thread timing. A file that fails to load is skipped and reported.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use crossbeam_channel::{unbounded, Receiver, Sender};
use fast_image_resize::Resizer;
use rand::seq::SliceRandom;

use crate::augment::{augment_into, AugmentConfig};
use crate::decode::{decode_rgb_limited, read_image_file, DEFAULT_MAX_PIXELS};
use crate::error::{DataError, Result};
use crate::rng::{epoch_rng, sample_rng};
use crate::staging::Staging;
use crate::transform::{eval_into, Normalize};

#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Random augmentation, seeded per (seed, epoch, sample index).
    Train(AugmentConfig),
    /// The deterministic evaluation transform (resize, centre crop, normalise).
    Eval { image_size: u32, norm: Normalize },
}

impl Transform {
    pub fn image_size(&self) -> u32 {
        match self {
            Transform::Train(cfg) => cfg.image_size,
            Transform::Eval { image_size, .. } => *image_size,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Reshuffle the order every epoch, from (seed, epoch).
    pub shuffle: bool,
    /// Leave out a last batch smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
    /// Worker threads (0 is taken as 1).
    pub threads: usize,
    /// Finished batches that may wait for the consumer; memory holds at most
    /// `prefetch + threads` batches.
    pub prefetch: usize,
    pub transform: Transform,
}

pub struct Batch {
    /// (N, 3, S, S) f32.
    pub images: Tensor,
    /// (N,) u32.
    pub labels: Tensor,
    /// Index into the `samples` given to [`batches`] of each row.
    pub indices: Vec<usize>,
}

/// A sample that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkippedFile {
    #[serde(serialize_with = "crate::image_files::serialize_path")]
    pub path: PathBuf,
    pub reason: String,
}

/// The rows of a batch that loaded; their images are in the worker's staging buffer.
struct Loaded {
    labels: Vec<u32>,
    indices: Vec<usize>,
}

struct Shared {
    /// Where the workers put finished batches.
    device: Device,
    samples: Vec<(PathBuf, usize)>,
    plan: Vec<Vec<usize>>,
    transform: Transform,
    seed: u64,
    epoch: u64,
    stop: AtomicBool,
    skipped: Mutex<Vec<SkippedFile>>,
}

/// Iterator over one epoch's batches. Dropping it stops the workers.
pub struct BatchIter {
    shared: Arc<Shared>,
    next_batch: usize,
    next_dispatch: usize,
    jobs: Option<Sender<usize>>,
    /// Each batch, or None where every one of its files failed to load.
    results: Receiver<(usize, Result<Option<Batch>>)>,
    ready: BTreeMap<usize, Result<Option<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    error: Option<DataError>,
}

/// The batch plan of one epoch: sample indices, shuffled from (seed, epoch) when asked.
pub fn plan_epoch(
    n: usize,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        order.shuffle(&mut epoch_rng(seed, epoch));
    }
    let mut plan: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    if drop_last && plan.last().is_some_and(|b| b.len() < batch_size) {
        plan.pop();
    }
    plan
}

/// Starts the workers for one epoch over `samples` (path, label).
pub fn batches(
    samples: &[(PathBuf, usize)],
    cfg: &LoaderConfig,
    epoch: u64,
    device: &Device,
) -> BatchIter {
    let error = if cfg.batch_size == 0 {
        Some(DataError::Invalid("batch size must be at least 1".into()))
    } else if cfg.transform.image_size() == 0 {
        Some(DataError::Invalid("image size must be at least 1".into()))
    } else {
        None
    };
    let plan = if error.is_some() {
        Vec::new()
    } else {
        plan_epoch(
            samples.len(),
            cfg.batch_size,
            cfg.shuffle,
            cfg.drop_last,
            cfg.seed,
            epoch,
        )
    };
    let shared = Arc::new(Shared {
        device: device.clone(),
        samples: samples.to_vec(),
        plan,
        transform: cfg.transform.clone(),
        seed: cfg.seed,
        epoch,
        stop: AtomicBool::new(false),
        skipped: Mutex::new(Vec::new()),
    });
    let (job_tx, job_rx) = unbounded::<usize>();
    let (result_tx, result_rx) = unbounded();
    let threads = cfg.threads.max(1).min(shared.plan.len().max(1));
    let workers = (0..threads)
        .map(|_| {
            let shared = Arc::clone(&shared);
            let jobs = job_rx.clone();
            let results = result_tx.clone();
            std::thread::spawn(move || worker(&shared, &jobs, &results))
        })
        .collect();
    let mut iter = BatchIter {
        shared,
        next_batch: 0,
        next_dispatch: 0,
        jobs: Some(job_tx),
        results: result_rx,
        ready: BTreeMap::new(),
        workers,
        error,
    };
    // In flight at any time: what may wait for the consumer plus one per worker.
    for _ in 0..cfg.prefetch.max(1) + threads {
        iter.dispatch();
    }
    iter
}

fn worker(
    shared: &Shared,
    jobs: &Receiver<usize>,
    results: &Sender<(usize, Result<Option<Batch>>)>,
) {
    let mut resizer = Resizer::new();
    let mut staging = Staging::new(&shared.device);
    while let Ok(b) = jobs.recv() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        // A panic is this batch's error: a worker that died silently would leave the
        // consumer waiting for its batch forever.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let loaded = build_batch(shared, b, &mut resizer, &mut staging).transpose()?;
            // The copy to a GPU happens here, off the training thread.
            Some(loaded.and_then(|loaded| to_batch(shared, &mut staging, loaded)))
        }))
        .unwrap_or_else(|_| {
            Some(Err(DataError::Invalid(format!(
                "loader worker panicked on batch {b}"
            ))))
        });
        let Some(outcome) = outcome else {
            return; // stopped mid-batch
        };
        if results.send((b, outcome)).is_err() {
            return;
        }
    }
}

/// The batch's tensors on the loader's device; None when every file of it failed.
fn to_batch(shared: &Shared, staging: &mut Staging, loaded: Loaded) -> Result<Option<Batch>> {
    let n = loaded.labels.len();
    if n == 0 {
        return Ok(None);
    }
    let s = shared.transform.image_size() as usize;
    // The labels first: their copy to a GPU is asynchronous, on this thread's stream, which
    // the images' staging waits for before the batch goes to another thread.
    let labels = Tensor::from_vec(loaded.labels, n, &shared.device)?;
    Ok(Some(Batch {
        images: staging.batch_tensor((n, 3, s, s).into())?,
        labels,
        indices: loaded.indices,
    }))
}

/// Decodes and transforms the batch's samples into `staging`, one after another; `Ok(None)`
/// when asked to stop part-way.
fn build_batch(
    shared: &Shared,
    b: usize,
    resizer: &mut Resizer,
    staging: &mut Staging,
) -> Result<Option<Loaded>> {
    let plan = &shared.plan[b];
    let size = shared.transform.image_size() as usize;
    let sample_len = 3 * size * size;
    let images = staging.buffer(plan.len() * sample_len)?;
    let mut loaded = Loaded {
        labels: Vec::with_capacity(plan.len()),
        indices: Vec::with_capacity(plan.len()),
    };
    for &i in plan {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (path, label) = &shared.samples[i];
        // After the samples loaded so far; the next sample overwrites a failed one's slot.
        let start = loaded.labels.len() * sample_len;
        let outcome = u32::try_from(*label)
            .map_err(|_| DataError::Invalid(format!("label {label} does not fit u32")))
            .and_then(|label| {
                load_sample(
                    path,
                    shared,
                    i,
                    resizer,
                    &mut images[start..start + sample_len],
                )?;
                Ok(label)
            });
        match outcome {
            Ok(label) => {
                loaded.labels.push(label);
                loaded.indices.push(i);
            }
            Err(e) => {
                tracing::warn!("skipping {}: {e}", path.display());
                if let Ok(mut skipped) = shared.skipped.lock() {
                    skipped.push(SkippedFile {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(Some(loaded))
}

/// Decodes and transforms sample `index` into `out`.
fn load_sample(
    path: &Path,
    shared: &Shared,
    index: usize,
    resizer: &mut Resizer,
    out: &mut [f32],
) -> Result<()> {
    let bytes = read_image_file(path, DEFAULT_MAX_PIXELS)?;
    let img = decode_rgb_limited(&bytes, DEFAULT_MAX_PIXELS)?;
    match &shared.transform {
        Transform::Train(cfg) => {
            let mut rng = sample_rng(shared.seed, shared.epoch, index as u64);
            augment_into(resizer, &img, cfg, &mut rng, out)
        }
        Transform::Eval { image_size, norm } => eval_into(resizer, &img, *image_size, norm, out),
    }
}

impl BatchIter {
    fn dispatch(&mut self) {
        if self.next_dispatch < self.shared.plan.len() {
            if let Some(jobs) = &self.jobs {
                let _ = jobs.send(self.next_dispatch);
            }
            self.next_dispatch += 1;
        }
    }

    /// Planned number of batches. A batch whose every file fails to load is left out, so
    /// the iterator may yield fewer.
    pub fn len(&self) -> usize {
        self.shared.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.plan.is_empty()
    }

    /// Files skipped so far in this epoch.
    pub fn skipped(&self) -> Vec<SkippedFile> {
        self.shared
            .skipped
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        loop {
            if self.next_batch >= self.shared.plan.len() {
                return None;
            }
            if let Some(outcome) = self.ready.remove(&self.next_batch) {
                self.next_batch += 1;
                self.dispatch();
                match outcome {
                    Ok(None) => continue,
                    Ok(Some(batch)) => return Some(Ok(batch)),
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.results.recv() {
                Ok((b, outcome)) => {
                    self.ready.insert(b, outcome);
                }
                Err(_) => {
                    self.next_batch = self.shared.plan.len();
                    return Some(Err(DataError::Invalid(
                        "loader workers stopped unexpectedly".into(),
                    )));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (
            0,
            Some(self.shared.plan.len() - self.next_batch.min(self.shared.plan.len())),
        )
    }
}

impl Drop for BatchIter {
    fn drop(&mut self) {
        self.stop();
    }
}
