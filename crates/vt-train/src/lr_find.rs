//! `vt-train lr-find`: the learning-rate range test of fastai's `lr_find` (Leslie Smith,
//! "Cyclical Learning Rates for Training Neural Networks", 2017). The model, optimiser, data
//! and augmentation are those `vt-train train` would start with; the rate grows
//! exponentially from `--start-lr` to `--end-lr` over `--steps` optimiser steps, the loss is
//! smoothed, the test stops once it diverges, and the rate where the smoothed loss falls
//! fastest is suggested for `train --lr`. Nothing of a run is written: only the report
//! (JSON) and its plot (PNG).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use candle_core::Device;
use serde::Serialize;
use vt_data::loader::{batches, Batch, BatchIter, LoaderConfig};
use vt_model::pretrained::is_stem;

use crate::config::{check_rate, count_steps, resolve_file_over, TrainConfig, TrainOptions};
use crate::error::{Result, ResultExt, TrainError};
use crate::learner::{
    new_model, open_training_images, prepare_device, training_loader, Group, Learner,
};
use crate::outputs;
use crate::plots::stage_lr_find;
use crate::progress::EpochProgress;
use crate::train::{interrupt_flag, Outcome};

/// fastai's smoothing of the loss: an exponential moving average with this weight on the past.
pub const SMOOTHING_BETA: f64 = 0.98;
/// The test stops when the smoothed loss exceeds this multiple of its lowest value (fastai's).
pub const DIVERGENCE_FACTOR: f64 = 4.0;
/// Where the report goes without `--out`.
pub const DEFAULT_OUT: &str = "lr-find.json";

/// Training options that have no part in the test: the rate is swept, not scheduled, and no
/// run is written or validated. Refused as flags; a `--config` file (a run's config.toml)
/// may hold them. Named as in the file (the flags without their dashes).
const NOT_APPLICABLE: [&str; 12] = [
    "lr",
    "epochs",
    "warmup-epochs",
    "sched",
    "decay-epochs",
    "decay-rate",
    "min-lr",
    "ema",
    "early-stop",
    "checkpoint-hist",
    "run-dir",
    "limit-val",
];

/// Hides the options of [`NOT_APPLICABLE`] from `vt-train lr-find --help`.
fn hide_not_applicable(arg: clap::Arg) -> clap::Arg {
    let name = arg.get_id().as_str().replace('_', "-");
    let hidden = NOT_APPLICABLE.contains(&name.as_str());
    arg.hide(hidden)
}

#[derive(Debug, Clone, clap::Args)]
#[command(mut_args(hide_not_applicable))]
pub struct LrFindArgs {
    /// TOML file of training options (e.g. a run's config.toml); flags override it. Its
    /// lr, epochs, warmup-epochs, sched, decay-epochs, decay-rate, min-lr, ema, early-stop,
    /// checkpoint-hist, run-dir and limit-val are not used
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: TrainOptions,
    /// Learning rate of the first step
    #[arg(long, value_name = "LR", default_value = "1e-7")]
    pub start_lr: f64,
    /// Learning rate of the last step
    #[arg(long, value_name = "LR", default_value = "10")]
    pub end_lr: f64,
    /// Optimiser steps from --start-lr to --end-lr (the data is cycled through as often as
    /// they need); the test stops earlier when the loss diverges
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Report file (JSON, in an existing folder); the plot goes beside it as .png
    /// [default: lr-find.json in the current folder]
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
}

/// The exponential sweep: `lr_i = start * (end / start)^(i / (steps - 1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSweep {
    pub start: f64,
    pub end: f64,
    pub steps: usize,
}

impl LrSweep {
    /// Refuses a sweep that is not an increasing range of positive rates over two steps or more.
    pub fn new(start: f64, end: f64, steps: usize) -> Result<LrSweep> {
        if !(start.is_finite() && start > 0.0 && end.is_finite() && end > start) {
            return Err(TrainError::Config(format!(
                "--start-lr and --end-lr must be positive with --end-lr above --start-lr, \
                 got {start:e} and {end:e}"
            )));
        }
        // Within f32's range, `end / start` stays finite.
        check_rate("--start-lr", start)?;
        check_rate("--end-lr", end)?;
        if steps < 2 {
            return Err(TrainError::Config(format!(
                "--steps must be at least 2 to sweep a range, got {steps}"
            )));
        }
        Ok(LrSweep { start, end, steps })
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let fraction = step as f64 / (self.steps - 1) as f64;
        self.start * (self.end / self.start).powf(fraction)
    }

    /// Points at the start left out of the suggestions: the smoothed loss is mostly the first
    /// few raw losses there (fastai skips a tenth of the steps).
    pub fn skipped_at_start(&self) -> usize {
        self.steps / 10
    }
}

/// An exponential moving average with bias correction, so that the first values are not
/// pulled towards zero: `avg_i = beta avg_(i-1) + (1 - beta) loss_i`, smoothed
/// `avg_i / (1 - beta^i)` (fastai's `SmoothenValue`).
#[derive(Debug, Clone)]
pub struct SmoothedLoss {
    beta: f64,
    average: f64,
    count: i32,
}

impl SmoothedLoss {
    pub fn new(beta: f64) -> SmoothedLoss {
        SmoothedLoss {
            beta,
            average: 0.0,
            count: 0,
        }
    }

    /// Adds a loss; returns the smoothed value.
    pub fn add(&mut self, loss: f64) -> f64 {
        self.count = self.count.saturating_add(1);
        self.average = self.beta * self.average + (1.0 - self.beta) * loss;
        self.average / (1.0 - self.beta.powi(self.count))
    }
}

/// One optimiser step of the test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub step: usize,
    pub lr: f64,
    /// The step's mean training loss (null in the JSON where it was not finite).
    pub loss: f64,
    pub smoothed_loss: f64,
}

/// Why the test stopped before its last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// The smoothed loss went over [`DIVERGENCE_FACTOR`] times its lowest value.
    AboveLowest { smoothed: f64, lowest: f64 },
    /// The loss was not finite.
    LossNotFinite { loss: f64 },
    /// The loss was, but the gradient norm was not: the step was skipped.
    GradientNotFinite { grad_norm: f64 },
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::AboveLowest { smoothed, lowest } => write!(
                f,
                "the smoothed loss {smoothed:.4} exceeds {DIVERGENCE_FACTOR} x its lowest \
                 over all steps so far, {lowest:.4}"
            ),
            Divergence::LossNotFinite { loss } => write!(f, "the loss is {loss}"),
            Divergence::GradientNotFinite { grad_norm } => {
                write!(f, "the gradient norm is {grad_norm}")
            }
        }
    }
}

/// The points of the test and the divergence check.
#[derive(Debug, Clone)]
pub struct Recorder {
    smoothing: SmoothedLoss,
    lowest: f64,
    pub points: Vec<Point>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            smoothing: SmoothedLoss::new(SMOOTHING_BETA),
            lowest: f64::INFINITY,
            points: Vec::new(),
        }
    }
}

impl Recorder {
    /// Records the loss of a step at `lr`; returns why the test must stop, when it must.
    pub fn record(&mut self, lr: f64, loss: f64) -> Option<Divergence> {
        let smoothed = self.smoothing.add(loss);
        self.points.push(Point {
            step: self.points.len(),
            lr,
            loss,
            smoothed_loss: smoothed,
        });
        if !smoothed.is_finite() {
            return Some(Divergence::LossNotFinite { loss });
        }
        self.lowest = self.lowest.min(smoothed);
        (smoothed > DIVERGENCE_FACTOR * self.lowest).then_some(Divergence::AboveLowest {
            smoothed,
            lowest: self.lowest,
        })
    }
}

/// The rates the test suggests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Suggestion {
    /// Where the smoothed loss falls fastest against log10(lr): the test's suggestion. None
    /// when too few points precede the lowest loss to measure a slope, or the loss falls at
    /// none of them (a model already trained, whose loss only climbs).
    pub steepest: Option<f64>,
    /// A tenth of `min_loss_lr` (fastai's "minimum"): a step back from where the loss stops
    /// falling.
    pub minimum: f64,
    /// The rate of the lowest smoothed loss.
    pub min_loss_lr: f64,
    pub min_smoothed_loss: f64,
}

impl Suggestion {
    /// The rate to train with: the steepest descent, else the minimum's tenth.
    pub fn lr(&self) -> f64 {
        self.steepest.unwrap_or(self.minimum)
    }
}

/// The suggestions from `points`, leaving out the first `skip_start` and the diverged tail:
/// the points from the first whose smoothed loss is not finite, and, for the slope, those
/// past the lowest smoothed loss, where the loss only climbs towards divergence. The slope
/// at a point is the central difference of the smoothed loss over log10(lr) between its
/// neighbours, measured where both are kept; only a falling one is a descent. None when no
/// point past the first `skip_start` has a finite smoothed loss.
pub fn suggest(points: &[Point], skip_start: usize) -> Option<Suggestion> {
    let finite = points
        .iter()
        .take_while(|p| p.smoothed_loss.is_finite())
        .count();
    let curve = &points[..finite];
    let lowest = (skip_start..finite)
        .min_by(|&a, &b| curve[a].smoothed_loss.total_cmp(&curve[b].smoothed_loss))?;
    let slope = |i: usize| {
        let (before, after) = (&curve[i - 1], &curve[i + 1]);
        (after.smoothed_loss - before.smoothed_loss) / (after.lr.log10() - before.lr.log10())
    };
    // Central differences need a point on either side.
    let last = lowest.min(finite.saturating_sub(2));
    // From the point after the first kept one: a slope uses the point before it.
    let steepest = (skip_start + 1..=last)
        .map(|i| (i, slope(i)))
        .filter(|&(_, slope)| slope < 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| curve[i].lr);
    let min_loss_lr = curve[lowest].lr;
    Some(Suggestion {
        steepest,
        minimum: min_loss_lr / 10.0,
        min_loss_lr,
        min_smoothed_loss: curve[lowest].smoothed_loss,
    })
}

/// How the test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// Every step ran.
    Completed,
    /// The loss diverged: `divergence` says how.
    Diverged,
    /// Ctrl-C stopped it.
    Interrupted,
}

/// The report, `FILE.json`.
#[derive(Debug, Serialize)]
pub struct LrFindReport {
    /// The resolved training options that shape the loss (those of [`NOT_APPLICABLE`] left
    /// out), named as in a `--config` file, with the recipe's `optimizer`.
    pub config: serde_json::Value,
    pub train_images: usize,
    pub start_lr: f64,
    pub end_lr: f64,
    pub steps: usize,
    pub steps_run: usize,
    /// The first points, left out of the suggestions.
    pub skipped_at_start: usize,
    pub ended: Ending,
    pub divergence: Option<String>,
    /// The rate to train with: `suggestion.steepest`, else `suggestion.minimum`.
    pub suggested_lr: Option<f64>,
    pub suggestion: Option<Suggestion>,
    /// The plot.
    pub plot: PathBuf,
    pub points: Vec<Point>,
}

/// The report's path and the plot's beside it, refused unless the report is `.json` in a
/// folder that exists, and neither replaces a file that lr-find did not write, nor goes into
/// a checkpoint's, a run's or the data's folders ([`outputs::refuse_managed_folder`]).
fn output_paths(out: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let report = out.map_or_else(|| PathBuf::from(DEFAULT_OUT), Path::to_path_buf);
    let is_json = report
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if !is_json {
        return Err(TrainError::Config(format!(
            "--out {}: the report is JSON and its plot is written beside it as .png: name it \
             FILE.json",
            report.display()
        )));
    }
    let folder = outputs::existing_folder_of("--out", &report)?;
    let plot = report.with_extension("png");
    // The plot is removed before the report is written: a plot is a sweep's when its report
    // is there. One alone is the user's: it stays.
    let ours = outputs::is_json_with(&report, &["points", "plot"]);
    outputs::refuse_replacing("--out", &report, &[(&report, ours), (&plot, ours)])?;
    outputs::refuse_managed_folder("--out", &report, folder)?;
    outputs::refuse_unwritable_folder("--out", &report, folder)?;
    Ok((report, plot))
}

/// The flags of [`NOT_APPLICABLE`] that `options` sets, as `--name`.
fn not_applicable_flags(options: &TrainOptions) -> Vec<String> {
    let Ok(serde_json::Value::Object(given)) = serde_json::to_value(options) else {
        return Vec::new();
    };
    NOT_APPLICABLE
        .iter()
        .filter(|name| given.get(**name).is_some_and(|v| !v.is_null()))
        .map(|name| format!("--{name}"))
        .collect()
}

fn config_summary(config: &TrainConfig) -> serde_json::Value {
    let mut summary = serde_json::to_value(config).unwrap_or_default();
    if let Some(fields) = summary.as_object_mut() {
        for name in NOT_APPLICABLE {
            fields.remove(name);
        }
        if let Ok(method) = serde_json::to_value(config.method()) {
            fields.insert("optimizer".into(), method);
        }
    }
    summary
}

/// The training batches epoch after epoch, each epoch shuffled and augmented as `train`'s.
struct CyclingBatches<'a> {
    samples: &'a [(PathBuf, usize)],
    loader: &'a LoaderConfig,
    device: &'a Device,
    epoch: u64,
    iter: BatchIter,
    /// Whether `iter` has given a batch: an epoch without one would restart forever.
    yielded: bool,
}

impl<'a> CyclingBatches<'a> {
    fn new(samples: &'a [(PathBuf, usize)], loader: &'a LoaderConfig, device: &'a Device) -> Self {
        CyclingBatches {
            samples,
            loader,
            device,
            epoch: 0,
            iter: batches(samples, loader, 0, device),
            yielded: false,
        }
    }

    fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(batch) = self.iter.next() {
                self.yielded = true;
                return batch.with_context(|| {
                    format!("loading training batch of epoch {}", self.epoch + 1)
                });
            }
            if !self.yielded {
                return Err(TrainError::Config(format!(
                    "none of the {} training images could be loaded",
                    self.samples.len()
                )));
            }
            self.epoch += 1;
            self.iter = batches(self.samples, self.loader, self.epoch, self.device);
            self.yielded = false;
        }
    }
}

/// The human summary: how far the test went, the suggestions and the flag to train with.
pub fn summary_text(report: &LrFindReport) -> String {
    let mut out = format!(
        "lr-find: {} of {} steps, lr {:.1e} to {:.1e}: ",
        report.steps_run, report.steps, report.start_lr, report.end_lr
    );
    // Named as the report's points name it.
    let (last_step, last_lr) = report
        .points
        .last()
        .map_or((0, report.start_lr), |p| (p.step, p.lr));
    out += &match (report.ended, &report.divergence) {
        (Ending::Diverged, Some(why)) => {
            format!("diverged at step {last_step} (lr {last_lr:.2e}): {why}\n")
        }
        (Ending::Interrupted, _) => "interrupted\n".to_string(),
        _ => "completed without diverging\n".to_string(),
    };
    let Some(suggestion) = &report.suggestion else {
        return out
            + &format!(
                "no suggestion: no step past the first {} has a finite smoothed loss\n",
                count_steps(report.skipped_at_start as u64)
            );
    };
    out += &match suggestion.steepest {
        Some(lr) => format!("steepest descent of the smoothed loss: lr {lr:.2e}\n"),
        None => "steepest descent: none (too few steps before the lowest loss to measure a \
                 slope, or the loss never falls)\n"
            .to_string(),
    };
    let past = match report.skipped_at_start {
        0 => String::new(),
        n => format!(
            " past the first {} (which the suggestion leaves out)",
            count_steps(n as u64)
        ),
    };
    out += &format!(
        "lowest smoothed loss{past}: {:.4} at lr {:.2e}; a tenth of that rate (fastai's \
         minimum): {:.2e}\n",
        suggestion.min_smoothed_loss, suggestion.min_loss_lr, suggestion.minimum
    );
    out + &format!("train with --lr {:.1e}\n", suggestion.lr())
}

pub fn run(args: &LrFindArgs) -> Result<Outcome> {
    let (report_path, plot_path) = output_paths(args.out.as_deref())?;
    let sweep = LrSweep::new(args.start_lr, args.end_lr, args.steps)?;
    let refused = not_applicable_flags(&args.options);
    if !refused.is_empty() {
        return Err(TrainError::Config(format!(
            "lr-find does not use {}: it sweeps the rate from --start-lr to --end-lr over \
             --steps and writes no run; leave {} out",
            refused.join(", "),
            if refused.len() == 1 { "it" } else { "them" }
        )));
    }
    let file = match &args.config {
        // The schedule is not used: a file's is not checked either (a cosine with a step
        // run's decay settings is no mistake here).
        Some(path) => TrainOptions {
            sched: None,
            decay_epochs: None,
            decay_rate: None,
            min_lr: None,
            ..TrainOptions::from_toml_file(path)?
        },
        None => TrainOptions::default(),
    };
    let config = resolve_file_over(args.config.as_deref(), &file, &args.options)?;
    let device = prepare_device(&config)?;
    // Held while the photos are read: an import would replace them meanwhile.
    let _data_lock = vt_data::import::lock_for_reading(&config.data)?;
    let train_set = open_training_images(&config)?;
    let model = new_model(&config, train_set.classes.clone(), &device)?;
    let loader = training_loader(&config, &model.config, train_set.len());
    tracing::info!(
        "lr-find {}: {} parameters, {} classes, {} px | {} train images | {} recipe, {} | \
         lr {:.1e} to {:.1e} over {} steps | device {}",
        config.arch,
        model.num_parameters(),
        train_set.classes.len(),
        config.image_size,
        train_set.len(),
        config.recipe.name(),
        config.method(),
        sweep.start,
        sweep.end,
        sweep.steps,
        vt_model::device_name(&device)
    );

    // As in train's first epochs: a stem frozen for some epochs stays frozen here.
    let frozen = config.freeze_stem_epochs > 0;
    let selected = move |name: &str| !(frozen && is_stem(name));
    let per_step = config.grad_accum_steps;
    let summary = config_summary(&config);
    let mut learner = Learner::new(config, model);
    // Installed before the first step: from here on Ctrl-C stops after a step, and the
    // points so far are written.
    let interrupted = interrupt_flag()?;
    let mut stream = CyclingBatches::new(&train_set.samples, &loader, &device);
    let mut recorder = Recorder::default();
    let mut bar = EpochProgress::new("lr-find", sweep.steps);
    let mut ended = Ending::Completed;
    let mut divergence = None;
    for step in 0..sweep.steps {
        let lr = sweep.lr(step);
        let mut group = Group::default();
        let mut images = 0;
        for in_group in 0..per_step {
            let batch = stream.next_batch()?;
            // The draws train's first steps make, so that mixing matches its run.
            let draw = (step * per_step + in_group) as u64;
            let share = 1.0 / per_step as f64;
            learner.accumulate_batch(&batch, (frozen, share, draw), &mut group)?;
            images += batch.indices.len();
        }
        let outcome = learner.update(group, lr, &selected)?;
        let recorded = recorder.record(lr, outcome.loss());
        let smoothed = recorder.points.last().map_or(f64::NAN, |p| p.smoothed_loss);
        bar.advance(
            images,
            &format!(
                "lr {lr:.2e} loss {:.4} smoothed {smoothed:.4}",
                outcome.loss()
            ),
        );
        let skipped = (!outcome.applied).then_some(Divergence::GradientNotFinite {
            grad_norm: outcome.grad_norm,
        });
        if let Some(why) = recorded.or(skipped) {
            ended = Ending::Diverged;
            divergence = Some(why.to_string());
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            ended = Ending::Interrupted;
            break;
        }
    }
    bar.finish();

    let suggestion = suggest(&recorder.points, sweep.skipped_at_start());
    let report = LrFindReport {
        config: summary,
        train_images: train_set.len(),
        start_lr: sweep.start,
        end_lr: sweep.end,
        steps: sweep.steps,
        steps_run: recorder.points.len(),
        skipped_at_start: sweep.skipped_at_start(),
        ended,
        divergence,
        suggested_lr: suggestion.map(|s| s.lr()),
        suggestion,
        plot: plot_path.clone(),
        points: recorder.points,
    };
    print!("{}", summary_text(&report));
    let json = serde_json::to_string_pretty(&report).map_err(|cause| TrainError::JsonWrite {
        path: report_path.clone(),
        cause,
    })?;
    // The plot is drawn before either file is replaced: one that cannot be written leaves
    // the earlier sweep's report and plot as they were, and the report, which names the
    // plot, comes last.
    let plot = stage_lr_find(&plot_path, &report)?;
    outputs::write_with_report(
        &report_path,
        format!("{json}\n").as_bytes(),
        vec![plot],
        &[],
    )?;
    eprintln!(
        "wrote {} and {}",
        report_path.display(),
        plot_path.display()
    );
    Ok(match ended {
        Ending::Interrupted => Outcome::Interrupted,
        Ending::Completed | Ending::Diverged => Outcome::Finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs()
    }

    #[test]
    fn the_sweep_is_exponential_from_start_to_end() {
        let sweep = LrSweep::new(1e-7, 10.0, 100).unwrap();
        let lrs: Vec<f64> = (0..100).map(|i| sweep.lr(i)).collect();
        assert_eq!(lrs[0], 1e-7);
        assert!(close(lrs[99], 10.0), "{}", lrs[99]);
        assert!(lrs.windows(2).all(|w| w[1] > w[0]), "{lrs:?}");
        // A constant ratio between steps: 1e8^(1/99).
        let ratio = 1e8f64.powf(1.0 / 99.0);
        assert!(lrs.windows(2).all(|w| close(w[1] / w[0], ratio)));
        let two = LrSweep::new(1e-3, 1.0, 2).unwrap();
        assert_eq!((two.lr(0), two.lr(1)), (1e-3, 1.0));
        assert_eq!(sweep.skipped_at_start(), 10);
        for (start, end, steps) in [(0.0, 1.0, 10), (1.0, 0.1, 10), (1e-3, f64::NAN, 10)] {
            let err = LrSweep::new(start, end, steps).unwrap_err().to_string();
            assert!(err.contains("--end-lr above --start-lr"), "{err}");
        }
        let err = LrSweep::new(1e-3, 1.0, 1).unwrap_err().to_string();
        assert!(err.contains("--steps must be at least 2"), "{err}");
        let err = LrSweep::new(5e-324, 1e-3, 3).unwrap_err().to_string();
        assert!(err.contains("--start-lr 5e-324 cannot be used"), "{err}");
        let err = LrSweep::new(1e-3, 1e39, 3).unwrap_err().to_string();
        assert!(err.contains("--end-lr 1e39 cannot be used"), "{err}");
    }

    #[test]
    fn smoothing_corrects_the_bias_of_the_average() {
        let mut smoothed = SmoothedLoss::new(0.98);
        // avg 0.02 -> 0.02 / 0.02; avg 0.0596 -> / (1 - 0.98^2); avg 0.118408 -> / (1 - 0.98^3).
        let expected = [1.0, 0.0596 / 0.0396, 0.118408 / 0.058808];
        for (loss, want) in [1.0, 2.0, 3.0].into_iter().zip(expected) {
            let got = smoothed.add(loss);
            assert!((got - want).abs() < 1e-12, "{got} != {want}");
        }
        // A constant loss stays itself from the first step on.
        let mut constant = SmoothedLoss::new(0.98);
        assert!((0..50).all(|_| (constant.add(2.5) - 2.5).abs() < 1e-12));
    }

    #[test]
    fn the_test_stops_when_the_smoothed_loss_diverges() {
        // After four losses of 2 the smoothed loss is 2; a fifth raw loss L makes it
        // (0.98 * 2 * (1 - 0.98^4) + 0.02 L) / (1 - 0.98^5): 7.82852 for 30, 8.24485 for 32.
        let run = |last: f64| {
            let mut recorder = Recorder::default();
            for step in 0..4 {
                assert_eq!(recorder.record(1e-3 * (step + 1) as f64, 2.0), None);
            }
            (recorder.record(1.0, last), recorder.points)
        };
        let (stop, points) = run(30.0);
        assert_eq!(stop, None);
        assert!(
            (points[4].smoothed_loss - 7.82852).abs() < 1e-5,
            "{points:?}"
        );
        let (stop, points) = run(32.0);
        let Some(Divergence::AboveLowest { smoothed, lowest }) = stop else {
            panic!("{stop:?}")
        };
        assert!((smoothed - 8.24485).abs() < 1e-5 && (lowest - 2.0).abs() < 1e-12);
        assert_eq!(points.len(), 5, "the diverged step is recorded");
        assert_eq!((points[4].step, points[4].loss), (4, 32.0));
        let (stop, points) = run(f64::NAN);
        assert!(
            matches!(stop, Some(Divergence::LossNotFinite { .. })),
            "{stop:?}"
        );
        assert!(points[4].smoothed_loss.is_nan());
    }

    /// The summary names the diverged step as the report's points do, and says which
    /// lowest loss each line means.
    #[test]
    fn the_summary_names_steps_and_lowest_losses_as_the_report_does() {
        let mut recorder = Recorder::default();
        let losses = [9.0, 1.0, 1.5, 2.0, 60.0];
        let mut stop = None;
        for (step, loss) in losses.into_iter().enumerate() {
            stop = recorder.record(1e-3 * 2f64.powi(step as i32), loss);
        }
        let why = stop.expect("the last loss diverges");
        let suggestion = suggest(&recorder.points, 1);
        let report = LrFindReport {
            config: serde_json::Value::Null,
            train_images: 8,
            start_lr: 1e-3,
            end_lr: 1.0,
            steps: 10,
            steps_run: recorder.points.len(),
            skipped_at_start: 1,
            ended: Ending::Diverged,
            divergence: Some(why.to_string()),
            suggested_lr: suggestion.map(|s| s.lr()),
            suggestion,
            plot: PathBuf::from("lr-find.png"),
            points: recorder.points,
        };
        let text = summary_text(&report);
        assert!(text.contains("5 of 10 steps"), "{text}");
        assert!(
            text.contains("diverged at step 4 (lr 1.60e-2): the smoothed loss"),
            "{text}"
        );
        assert!(text.contains("its lowest over all steps so far"), "{text}");
        assert!(
            text.contains(
                "lowest smoothed loss past the first 1 step (which the suggestion leaves out)"
            ),
            "{text}"
        );
    }

    /// A smoothed loss over log10(lr) from -7 to 1 in steps of 0.1: a tanh falling fastest at
    /// -3 (lr 1e-3), lowest at -1 (lr 0.1), rising after; plus traps the suggestion must
    /// avoid: a steeper fall among the first points, a spike and a steeper fall past the
    /// lowest loss, and a NaN at the end.
    #[test]
    fn the_suggestion_is_the_steepest_descent_before_the_lowest_loss() {
        let sweep = LrSweep::new(1e-7, 10.0, 81).unwrap();
        let mut points: Vec<Point> = (0..81)
            .map(|step| {
                let x = -7.0 + step as f64 * 0.1;
                let rise = (x + 1.0).max(0.0);
                let smoothed_loss = 2.0 - (2.0 * (x + 3.0)).tanh() + 5.0 * rise * rise;
                Point {
                    step,
                    lr: sweep.lr(step),
                    loss: smoothed_loss,
                    smoothed_loss,
                }
            })
            .collect();
        points[0].smoothed_loss = 30.0;
        points[65].smoothed_loss = 60.0;
        points[66].smoothed_loss = 6.0;
        points[80].smoothed_loss = f64::NAN;
        let suggestion = suggest(&points, sweep.skipped_at_start()).unwrap();
        let steepest = suggestion.steepest.unwrap();
        assert!(close(steepest, 1e-3), "{suggestion:?}");
        assert!(close(suggestion.min_loss_lr, 0.1), "{suggestion:?}");
        assert!(close(suggestion.minimum, 0.01), "{suggestion:?}");
        assert_eq!(suggestion.lr(), steepest);
        assert!((suggestion.min_smoothed_loss - (2.0 - 4f64.tanh())).abs() < 1e-12);

        // Without the skip the first points' fall wins: the skip is what ignores them.
        let unskipped = suggest(&points, 0).unwrap();
        assert!(
            close(unskipped.steepest.unwrap(), sweep.lr(1)),
            "{unskipped:?}"
        );
        // Lowest at the second point: no slope to measure, the minimum's tenth is suggested.
        let early = suggest(&points[..2], 0).unwrap();
        assert_eq!(early.steepest, None);
        assert_eq!(early.lr(), early.minimum);
        assert_eq!(suggest(&points[80..], 0), None);
        // A loss that only climbs (a trained model): no descent, the minimum's tenth.
        let climbing = suggest(&points[68..80], 0).unwrap();
        assert_eq!(climbing.steepest, None, "{climbing:?}");
        assert!(close(climbing.min_loss_lr, sweep.lr(68)), "{climbing:?}");
        // Lowest at the second point considered, after the skip, the loss rising there.
        let mut rising = [&points[..8], &points[68..80]].concat();
        assert_eq!(suggest(&rising, 8).unwrap().steepest, None);
        // A spike among the skipped points is no descent after them.
        rising[7].smoothed_loss = 100.0;
        assert_eq!(suggest(&rising, 8).unwrap().steepest, None);
        // Every point among the skipped ones (an interrupted test): nothing to suggest.
        assert_eq!(suggest(&points[..8], 8), None);
    }
}
