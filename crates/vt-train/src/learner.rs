//! What `vt-train train` and `vt-train lr-find` share: the device, the training images, the
//! model as a new run starts it, its loader, and one optimiser step (forward and backward
//! passes of a group of batches, clipping, the update), so that the range test measures the
//! run that `train` would make.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vt_data::dataset::ImageFolder;
use vt_data::loader::{Batch, LoaderConfig, Transform};
use vt_data::rng::derive_seed;
use vt_model::pretrained::{load_stem, Source};
use vt_model::{parse_device, Model, PathDrops, StartedFrom, VtConfig};

use crate::config::TrainConfig;
use crate::data;
use crate::error::{Result, ResultExt};
use crate::init::seeded_model;
use crate::loss::{correct_predictions, cross_entropy};
use crate::optim::{clip_scale, is_running_stat, trainable_params, Optimizer};
use crate::threads;

/// Tags the draws of stochastic depth in the seed derivation.
const TAG_DROP_PATH: u64 = 0x4450_4154;

/// Sets the compute threads and the products' precision, then opens the device. The threads
/// come first: they must be set before any tensor exists.
pub fn prepare_device(config: &TrainConfig) -> Result<Device> {
    threads::set_compute_threads(Some(config.threads));
    vt_model::kernels::allow_tf32(config.tf32);
    let device = parse_device(&config.device)?;
    vt_model::use_bf16_products(config.bf16_products, &device, DType::F32)
        .context("--bf16-products")?;
    Ok(device)
}

/// The training split, limited by `--limit-train`.
pub fn open_training_images(config: &TrainConfig) -> Result<ImageFolder> {
    data::open_train_split(&config.data, config.limit_train, config.seed)
        .with_context(|| format!("reading the training split of {}", config.data.display()))
}

pub fn model_config(config: &TrainConfig, class_names: Vec<String>) -> VtConfig {
    VtConfig {
        tokens: config.tokens,
        token_channels: config.token_channels,
        heads: config.heads,
        class_names,
        ..VtConfig::new(config.arch, 0, config.image_size)
    }
    .with_num_classes()
}

/// The model a new run starts from: seeded weights, then the `--pretrained` stem or the
/// `--initial-checkpoint` weights.
pub fn new_model(config: &TrainConfig, classes: Vec<String>, device: &Device) -> Result<Model> {
    let model = seeded_model(model_config(config, classes), device, config.seed)?;
    if let Some(spec) = &config.pretrained {
        let loaded = load_stem(&model, &Source::parse(spec)?)
            .with_context(|| format!("loading the pretrained stem from {spec}"))?;
        tracing::info!("loaded {loaded} stem tensors from {spec}");
    }
    if let Some(dir) = &config.initial_checkpoint {
        let started = model
            .start_from(dir)
            .with_context(|| format!("starting from --initial-checkpoint {}", dir.display()))?;
        match started {
            StartedFrom::AllWeights => {
                tracing::info!("starting from the weights of {}", dir.display())
            }
            StartedFrom::AllButTheHead => tracing::info!(
                "starting from the weights of {} but its head, whose classes differ",
                dir.display()
            ),
        }
    }
    Ok(model)
}

/// The recipe's augmented, shuffled batches of `images` training images.
pub fn training_loader(config: &TrainConfig, model: &VtConfig, images: usize) -> LoaderConfig {
    data::train_loader(
        Transform::Train(config.augment(data::normalize(model))),
        images,
        config.batch_size,
        config.seed,
        config.loader_threads,
    )
}

/// The batches of one optimiser step so far: their summed gradients and, per batch, its
/// loss, correct predictions and images, read only at the update.
#[derive(Default)]
pub struct Group {
    grads: GradStore,
    batches: Vec<(Tensor, Tensor, usize)>,
    /// The BatchNorm running statistics before the group's first forward pass, put back when
    /// the step is skipped: the passes of a diverged step would leave them non-finite.
    running: Vec<(Var, Tensor)>,
}

impl Group {
    /// Whether the group holds no batch.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// Copies of `model`'s BatchNorm running statistics (a forward pass updates them in place).
fn running_stats(model: &Model) -> Result<Vec<(Var, Tensor)>> {
    let vars = model
        .varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut stats = Vec::new();
    for (name, var) in vars.iter() {
        if is_running_stat(name) {
            stats.push((var.clone(), var.as_tensor().copy()?));
        }
    }
    Ok(stats)
}

/// What one optimiser step measured and did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The batches' mean losses times their images, summed.
    pub loss_sum: f64,
    pub correct: u64,
    pub images: u64,
    /// The global L2 norm of the gradients, before clipping.
    pub grad_norm: f64,
    /// False when the loss or the gradient norm was not finite: the weights were left alone.
    pub applied: bool,
    /// Whether clipping scaled the gradients down.
    pub clipped: bool,
}

impl StepOutcome {
    /// The mean loss over the step's images.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.images.max(1) as f64
    }
}

/// The model being trained, its optimiser (the recipe's) and the settings of the loss and
/// the update.
pub struct Learner {
    pub config: TrainConfig,
    pub model: Model,
    pub optimizer: Optimizer,
}

impl Learner {
    /// `model` with a fresh optimiser of the recipe, over its trainable parameters.
    pub fn new(config: TrainConfig, model: Model) -> Learner {
        let optimizer = Optimizer::new(
            config.method(),
            config.weight_decay,
            trainable_params(&model.varmap),
        );
        Learner {
            config,
            model,
            optimizer,
        }
    }

    /// The forward and backward pass of one batch, its gradients (of its loss times
    /// `share`, its part of the update) added to `group`. With the stem frozen it runs in
    /// evaluation mode, its BatchNorm statistics kept. `draw` seeds the batch's mixing and
    /// its stochastic depth.
    pub fn accumulate_batch(
        &mut self,
        batch: &Batch,
        (stem_frozen, share, draw): (bool, f64, u64),
        group: &mut Group,
    ) -> Result<()> {
        if group.batches.is_empty() {
            group.running = running_stats(&self.model)?;
        }
        let mixed =
            self.config
                .mixing()
                .apply(&batch.images, &batch.labels, self.config.seed, draw)?;
        let images = mixed.as_ref().map_or(&batch.images, |m| &m.images);
        let rate = self.config.drop_path;
        let logits = if rate > 0.0 {
            let mut rng =
                StdRng::seed_from_u64(derive_seed(&[TAG_DROP_PATH, self.config.seed, draw]));
            let drops = PathDrops::draw(
                rate,
                &self.model.config,
                batch.indices.len(),
                (&self.model.device, self.model.dtype),
                || rng.random(),
            )?;
            self.model.forward_dropped(images, &drops, stem_frozen)?
        } else if stem_frozen {
            self.model.forward_frozen_stem(images)?
        } else {
            self.model.forward_t(images, true)?
        };
        let smoothing = self.config.label_smoothing;
        let mut loss = cross_entropy(&logits, &batch.labels, smoothing)?;
        if let Some(m) = &mixed {
            let partners = cross_entropy(&logits, &m.partner_labels, smoothing)?;
            loss = ((loss * m.lambda)? + (partners * (1.0 - m.lambda))?)?;
        }
        let grads = if share == 1.0 {
            loss.backward()?
        } else {
            (&loss * share)?.backward()?
        };
        self.optimizer.accumulate(&mut group.grads, &grads)?;
        let labels = mixed
            .as_ref()
            .map_or(&batch.labels, |m| m.dominant_labels(&batch.labels));
        let correct = correct_predictions(&logits, labels)?;
        // Detached: a loss kept whole would keep its batch's activations alive until the
        // update, and accumulation is there to hold one batch's at a time.
        group
            .batches
            .push((loss.detach(), correct.detach(), batch.indices.len()));
        Ok(())
    }

    /// One optimiser step at `lr` with `group`'s summed gradients, clipped to `--clip-grad`;
    /// skipped, the BatchNorm running statistics put back as they were before the group,
    /// when the loss or the gradient norm is not finite. Only the parameters
    /// `selected` keeps are updated.
    pub fn update(
        &mut self,
        group: Group,
        lr: f64,
        selected: &dyn Fn(&str) -> bool,
    ) -> Result<StepOutcome> {
        // Everything up to the gradient norm was queued before the first value is read, so
        // that a GPU waits once per step (for the norm, which decides the update).
        let grad_norm = self.optimizer.grad_norm(&group.grads, selected)?;
        let (mut loss_sum, mut correct, mut images) = (0.0, 0, 0);
        for (loss, right, n) in &group.batches {
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * *n as f64;
            correct += u64::from(right.to_scalar::<u32>()?);
            images += *n as u64;
        }
        let mut outcome = StepOutcome {
            loss_sum,
            correct,
            images,
            grad_norm,
            applied: false,
            clipped: false,
        };
        if !(loss_sum.is_finite() && grad_norm.is_finite()) {
            for (var, saved) in &group.running {
                var.set(saved)?;
            }
            return Ok(outcome);
        }
        let scale = clip_scale(grad_norm, self.config.clip_grad);
        self.optimizer.step(&group.grads, lr, scale, selected)?;
        outcome.applied = true;
        outcome.clipped = scale < 1.0;
        Ok(outcome)
    }
}
