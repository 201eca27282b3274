//! Dynamic batching: preprocessed images wait in a bounded queue; one dedicated thread owns
//! the model, takes up to `max_batch` of them within `max_delay` of the first, runs them in
//! one forward pass and answers each caller on its own channel. The window stays open only
//! while other requests are arriving (being read or decoded): a lone caller, or a batch
//! that already holds everything in the server, runs at once.
//!
//! Each loaded model has its own thread and queue ([`ServedModel`]); the [`Batcher`] holds
//! the current one. A reload starts the new model's thread beside the old one and swaps it
//! in: a request keeps the model it took for all its images (preprocessed at that model's
//! size), and the old thread ends once the last such request has its answers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use prometheus::IntGauge;
use tokio::sync::oneshot;

use crate::admission::Admitted;
use crate::classifier::{Classifier, ClassifyError, Prediction, Preprocessor};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::state::{ModelInfo, StartError};

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue: usize,
}

/// The answer to one image: its scores, or why it has none.
pub type Answer = Result<Prediction, Unanswered>;

/// Why an image got no scores.
#[derive(Debug)]
pub enum Unanswered {
    /// Its request's deadline passed while it waited in the queue.
    Expired,
    /// The forward pass failed; why, in words for the client.
    Failed(String),
}

struct Job {
    input: Vec<f32>,
    /// Whether the answer carries the image's token attention.
    with_attention: bool,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
    /// The admission of the image's request, held until the model thread is done with the
    /// image (answered or skipped), so that the queue's room goes to no other request while
    /// the image still fills it: a request that gave up leaves its images queued.
    admitted: Arc<Admitted>,
}

/// One loaded model and the sending side of its thread's queue. The thread ends once every
/// handle is dropped and the queue is empty, so images already queued are always answered.
pub struct ServedModel {
    pub info: ModelInfo,
    /// The checkpoint's config, which with `info.sha256` tells a reload of the same files.
    pub config: vt_model::VtConfig,
    /// How images must be prepared for this model (its size and normalisation).
    pub preprocessor: Preprocessor,
    jobs: Sender<Job>,
}

impl ServedModel {
    /// Starts the model thread and returns once it takes requests: on a GPU, after it ran
    /// every batch size it will meet first ([`Classifier::warm_up`]). Blocking.
    pub fn spawn(
        classifier: Classifier,
        info: ModelInfo,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ServedModel, StartError> {
        let preprocessor = classifier.preprocessor();
        let model_config = classifier.config().clone();
        let (jobs, queue) = crossbeam_channel::bounded(config.queue.max(1));
        let (ready, warmed) = crossbeam_channel::bounded(1);
        thread::Builder::new()
            .name("vt-serve-model".into())
            .spawn(move || {
                // On the model thread: cuDNN's handles and CUDA's streams are per thread.
                let warmed_up = if classifier.model().device.is_cuda() {
                    warm_up(&classifier, config.max_batch)
                } else {
                    Ok(())
                };
                let failed = warmed_up.is_err();
                // `spawn` waits for this message; it cannot have gone.
                let _ = ready.send(warmed_up);
                if !failed {
                    run(&classifier, &queue, config, &metrics);
                }
                // Replaced by a reload (or stopped): its memory goes back.
                drop(classifier);
                vt_model::allocator::release_freed_memory();
            })
            .map_err(StartError::Thread)?;
        match warmed.recv() {
            Ok(Ok(())) => Ok(ServedModel {
                info,
                config: model_config,
                preprocessor,
                jobs,
            }),
            Ok(Err(e)) => Err(StartError::WarmUp(e)),
            Err(_) => Err(StartError::Thread(std::io::Error::other(
                "the model thread stopped while warming up",
            ))),
        }
    }

    /// Queues one image preprocessed by [`Self::preprocessor`], of the request `admitted`;
    /// never waits. The answer arrives on the receiver, with the image's token attention if
    /// `with_attention`. The admission is held until the model thread is done with the
    /// image, so that admitted images always find room in the queue.
    pub fn submit(
        &self,
        input: Vec<f32>,
        with_attention: bool,
        deadline: Instant,
        admitted: &Arc<Admitted>,
    ) -> Result<oneshot::Receiver<Answer>, ApiError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input,
            with_attention,
            enqueued: Instant::now(),
            deadline,
            reply,
            admitted: Arc::clone(admitted),
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(ApiError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                Err(ApiError::NotReady("the model thread has stopped".into()))
            }
        }
    }
}

/// The model that new requests get, swapped whole by a reload.
pub struct Batcher {
    current: RwLock<Arc<ServedModel>>,
    arriving: IntGauge,
}

/// A request on its way to the queue; while any is alive a forming batch waits for it.
pub struct Arriving {
    gauge: IntGauge,
}

impl Arriving {
    /// Counts one more request on `gauge` until dropped.
    pub fn new(gauge: &IntGauge) -> Arriving {
        gauge.inc();
        Arriving {
            gauge: gauge.clone(),
        }
    }

    /// Leaves the count until the guard is dropped: while its request waits for room in the
    /// queue, which only answered batches make, a forming batch should not wait for it.
    pub fn away(&self) -> Away<'_> {
        self.gauge.dec();
        Away(&self.gauge)
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A request away from the arriving count ([`Arriving::away`]); it counts again once this
/// is dropped.
pub struct Away<'a>(&'a IntGauge);

impl Drop for Away<'_> {
    fn drop(&mut self) {
        self.0.inc();
    }
}

impl Batcher {
    pub fn new(model: ServedModel, metrics: &Metrics) -> Batcher {
        Batcher {
            current: RwLock::new(Arc::new(model)),
            arriving: metrics.requests_arriving.clone(),
        }
    }

    /// The model that a request starting now uses for all its images.
    pub fn current(&self) -> Arc<ServedModel> {
        // Nothing panics while holding the lock (an Arc is cloned or replaced), so a
        // poisoned one still holds a whole value.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `model` the one new requests get. Requests holding the previous one finish on
    /// it; its thread ends after their images.
    pub fn swap(&self, model: ServedModel) -> Arc<ServedModel> {
        let model = Arc::new(model);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&model);
        model
    }

    /// Announces a request that will submit images once read and decoded. Drop the guard
    /// after its last `submit` (or when it fails), never before.
    pub fn arriving(&self) -> Arriving {
        Arriving::new(&self.arriving)
    }
}

/// How often a forming batch looks again whether requests are still arriving.
const RECHECK: Duration = Duration::from_millis(1);

/// `first` and whatever joins it: up to `max_batch` images, waiting up to `max_delay` from
/// `first`'s arrival only while other requests are arriving.
fn gather(first: Job, queue: &Receiver<Job>, config: BatchConfig, arriving: &IntGauge) -> Vec<Job> {
    let close = first.enqueued + config.max_delay;
    let mut batch = vec![first];
    while batch.len() < config.max_batch {
        if let Ok(job) = queue.try_recv() {
            batch.push(job);
            continue;
        }
        // Requests leave the arriving count only after queueing their images: with none
        // arriving, everything that could join is in the batch already.
        let now = Instant::now();
        if arriving.get() == 0 || now >= close {
            break;
        }
        // Waiting in short slices: the last request may queue its image and leave the
        // count just after the check above, and should not cost the whole window.
        match queue.recv_timeout((close - now).min(RECHECK)) {
            Ok(job) => batch.push(job),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    batch
}

fn run(classifier: &Classifier, queue: &Receiver<Job>, config: BatchConfig, metrics: &Metrics) {
    while let Ok(first) = queue.recv() {
        let batch = gather(first, queue, config, &metrics.requests_arriving);
        // Callers past their deadline get no work done; they answer 504.
        let now = Instant::now();
        let (batch, expired): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .filter(|job| !job.reply.is_closed())
            .partition(|job| job.deadline > now);
        for Job {
            reply, admitted, ..
        } in expired
        {
            // Its room first, as for answered images ([`forward`]).
            drop(admitted);
            let _ = reply.send(Err(Unanswered::Expired));
        }
        // The images that ask for their token attention go through a forward pass of their
        // own: its cost, and a failure of it (a GPU out of memory), stay with them.
        let (explained, predicted): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|job| job.with_attention);
        for (jobs, explain) in [(predicted, false), (explained, true)] {
            if !jobs.is_empty() {
                forward(classifier, jobs, explain, metrics);
            }
        }
    }
}

/// Runs one forward pass for `batch`, keeping the attention if `explain`, and answers each
/// job.
fn forward(classifier: &Classifier, batch: Vec<Job>, explain: bool, metrics: &Metrics) {
    let (inputs, (replies, admissions)): (Vec<_>, (Vec<_>, Vec<_>)) = batch
        .into_iter()
        .map(|job| (job.input, (job.reply, job.admitted)))
        .unzip();
    metrics.batch_size.observe(inputs.len() as f64);
    let started = Instant::now();
    // A panic inside the model must not take the server down with it.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if explain {
            classifier.explain(&inputs)
        } else {
            classifier.predict(&inputs)
        }
    }));
    metrics
        .inference_seconds
        .observe(started.elapsed().as_secs_f64());
    // The images' room in the queue, kept until the model is done with them, and given back
    // before their answers go: a client holding its answer finds it free.
    drop(admissions);
    match outcome {
        Ok(Ok(predictions)) if predictions.len() == replies.len() => {
            let dtype = classifier.model().dtype;
            for (reply, prediction) in replies.into_iter().zip(predictions) {
                // Logged with its request, as other refusals are.
                let answer = match prediction.not_finite(dtype) {
                    Some(why) => Err(Unanswered::Failed(why)),
                    None => Ok(prediction),
                };
                // The caller may have given up meanwhile; nothing to do then.
                let _ = reply.send(answer);
            }
        }
        Ok(Ok(predictions)) => fail_all(
            replies,
            &format!(
                "the model returned {} results for {} images",
                predictions.len(),
                inputs.len()
            ),
        ),
        Ok(Err(e)) => fail_all(replies, &e.to_string()),
        Err(_) => fail_all(replies, "the model panicked"),
    }
}

fn warm_up(classifier: &Classifier, max_batch: usize) -> Result<(), ClassifyError> {
    let started = Instant::now();
    let searched = vt_model::kernels::algorithm_search_time();
    let sizes = classifier.warm_up(max_batch)?;
    tracing::info!(
        "warmed up at batch sizes {sizes:?} in {:.2}s ({:.2}s of it timing cuDNN's \
         convolution algorithms)",
        started.elapsed().as_secs_f64(),
        (vt_model::kernels::algorithm_search_time() - searched).as_secs_f64()
    );
    Ok(())
}

fn fail_all(replies: Vec<oneshot::Sender<Answer>>, message: &str) {
    tracing::error!(message, "batch failed");
    for reply in replies {
        let _ = reply.send(Err(Unanswered::Failed(message.to_owned())));
    }
}
