//! `vt-train train`: the training loop, checkpoints, metrics, plots and resumption.
//!
//! Every optimiser step's loss, learning rate and gradient norm go to a TensorBoard event
//! file. After every epoch, in this order: a line appended to `metrics.jsonl` (and
//! `metrics.csv`, the epoch's scalars to the event file, plots rewritten), `top/epoch-NNN/`
//! when the epoch enters the checkpoint history, `state/`, `best/` when validation improved,
//! `last/`, then the folders that left the history. An epoch whose weights or validation
//! loss are no longer finite (a diverged run) writes none of them: the run stops with an
//! error. A run killed
//! anywhere resumes from `state/` with the options of its `config.toml` (the last start's or
//! resume's), dropping metric lines (and TensorBoard points) of epochs after the saved one,
//! so every epoch is logged exactly once; killed before its first epoch ended, it starts
//! again from its `config.toml`. The process that trains holds a lock on `RUN/.lock`.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vt_data::dataset::{ImageFolder, Split};
use vt_data::download::error_chain;
use vt_data::loader::{batches, LoaderConfig};
use vt_model::checkpoint::{dir_contents, previous_version, DirContents};
use vt_model::pretrained::is_stem;
use vt_model::Model;

use crate::calibration::{self, Calibration};
use crate::config::{count_steps, resolve_file_over, TrainConfig, TrainOptions};
use crate::data::{self, DataUsed, ImagesUsed};
use crate::ema::Ema;
use crate::error::{Result, ResultExt, TrainError};
use crate::eval::evaluate;
use crate::history::{self, Kept};
use crate::learner::{
    model_config, new_model, open_training_images, prepare_device, training_loader, Group, Learner,
};
use crate::metrics::{write_atomically, EpochRecord, MetricsLog, METRICS_CSV, METRICS_JSONL};
use crate::outputs;
use crate::plots::{draw_confusion, draw_curves, CONFUSION_PNG, CURVES_PNG};
use crate::progress::EpochProgress;
use crate::provenance::TrainingRecord;
use crate::schedule::LrSchedule;
use crate::state::{self, Progress, BEST_DIR, LAST_DIR};
use crate::tensorboard::EventWriter;

pub const CONFIG_TOML: &str = "config.toml";

/// What a run writes in its folder: any of them marks the folder as a run's.
const RUN_OUTPUTS: [&str; 9] = [
    CONFIG_TOML,
    METRICS_JSONL,
    METRICS_CSV,
    CURVES_PNG,
    CONFUSION_PNG,
    BEST_DIR,
    LAST_DIR,
    state::STATE_DIR,
    history::TOP_DIR,
];

/// Locked by the process that trains in the run folder.
pub const LOCK_FILE: &str = ".lock";

#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainArgs {
    /// TOML file of options, named as the flags without dashes in front (e.g.
    /// `batch-size = 64`); flags override it. A run's config.toml is such a file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in --run-dir after its last completed epoch; options given now
    /// override the saved ones (e.g. --epochs to train longer)
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub options: TrainOptions,
}

/// Set by Ctrl-C; a second Ctrl-C exits at once (every file is written atomically).
pub(crate) fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting now");
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping after the current step (Ctrl-C again to exit at once)");
    })
    .map_err(TrainError::CtrlC)?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// `runs/YYYYMMDD-HHMMSS` (UTC).
fn default_run_dir() -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(timestamp(secs))
}

/// `YYYYMMDD-HHMMSS` of a Unix time, UTC.
fn timestamp(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The settings and where the run lives, before any tensor exists.
struct Plan {
    config: TrainConfig,
    run_dir: PathBuf,
    /// The saved progress when resuming after a completed epoch; its config is still the
    /// run's, for the checks against `config`.
    resumed: Option<Progress>,
    /// The run folder's lock, when taken while planning (on resume).
    lock: Option<File>,
    /// The saved options a resume overrides, logged once every check accepted them.
    overrides: Vec<String>,
}

/// Takes `RUN/.lock` for as long as the returned file lives (the OS drops the lock when the
/// process ends, however it ends), so that two processes never write one run folder.
fn lock_run_dir(run_dir: &Path) -> Result<File> {
    let path = run_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TrainError::file_op("opening", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(TrainError::RunInUse {
            run_dir: run_dir.to_path_buf(),
            lock: path,
        }),
        Err(TryLockError::Error(e)) => Err(TrainError::file_op("locking", path, e)),
    }
}

/// A new run may take an empty folder, or one of other files, never a run's.
fn refuse_run_outputs(run_dir: &Path) -> Result<()> {
    // An output a killed write left at `.NAME.old` is there too: the run would restore it.
    let found = |name: &str| -> Result<Option<String>> {
        let path = run_dir.join(name);
        Ok(if path.exists() {
            Some(name.to_string())
        } else {
            previous_version(&path)?.map(|_| format!(".{name}.old"))
        })
    };
    let first = RUN_OUTPUTS
        .iter()
        .find_map(|name| found(name).transpose())
        .transpose()?;
    let Some(first) = first else {
        return Ok(());
    };
    let resumable = outputs::is_run(run_dir) || run_dir.join(state::STATE_DIR).exists();
    let run_dir = run_dir.to_path_buf();
    Err(if resumable {
        TrainError::RunExists { run_dir }
    } else {
        TrainError::RunOutputs {
            run_dir,
            found: first,
        }
    })
}

fn plan(args: &TrainArgs) -> Result<Plan> {
    let file = match &args.config {
        Some(path) => TrainOptions::from_toml_file(path)?,
        None => TrainOptions::default(),
    };
    let given = file.overridden_by(&args.options);
    if args.resume {
        let run_dir = given.run_dir.clone().ok_or_else(|| {
            TrainError::Config("--resume needs --run-dir (or run-dir in --config)".into())
        })?;
        if !run_dir.is_dir() {
            let why = if run_dir.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            return Err(TrainError::Config(format!(
                "--run-dir {} {why}: nothing to resume",
                run_dir.display()
            )));
        }
        // Before the lock: its file would be left in a folder that is no run.
        refuse_checkpoint_as_run(&run_dir)?;
        if !outputs::is_run(&run_dir) && !run_dir.join(state::STATE_DIR).exists() {
            return Err(nothing_to_resume(&run_dir));
        }
        let lock = lock_run_dir(&run_dir)?;
        return plan_resume(&given, run_dir, lock);
    }
    let mut config = resolve_file_over(args.config.as_deref(), &file, &args.options)?;
    let run_dir = config.run_dir.clone().unwrap_or_else(default_run_dir);
    outputs::refuse_file_on_path("--run-dir", &run_dir, &run_dir)?;
    outputs::refuse_data_folder("--run-dir", &run_dir, &run_dir)?;
    refuse_run_dir_in_checkpoint(&run_dir)?;
    config.run_dir = Some(run_dir.clone());
    Ok(Plan {
        config,
        run_dir,
        resumed: None,
        lock: None,
        overrides: Vec::new(),
    })
}

/// Refuses a new run's folder that is, or is right inside, a checkpoint folder, or lies in
/// a run's `best/`, `state/`, ... : the run would write among their files, and that
/// checkpoint would no longer load, nor that run resume. Only the folder and its parent are
/// checked for a checkpoint: a model folder higher up (config.json + model.safetensors) may
/// hold anything.
fn refuse_run_dir_in_checkpoint(run_dir: &Path) -> Result<()> {
    let resolved = outputs::resolved(run_dir);
    let mut nearest = std::iter::once(resolved.as_path()).chain(resolved.parent());
    let checkpoint =
        nearest.find(|folder| dir_contents(folder).is_ok_and(|c| c == DirContents::Checkpoint));
    let runs_own = resolved
        .ancestors()
        .find(|folder| outputs::is_run_folder(folder));
    match checkpoint.or(runs_own) {
        Some(folder) => Err(TrainError::Config(format!(
            "--run-dir {}: {} is a checkpoint or a training run's folder, which must hold only \
             what its writer puts there; choose a folder outside it",
            run_dir.display(),
            folder.display()
        ))),
        None => Ok(()),
    }
}

fn nothing_to_resume(run_dir: &Path) -> TrainError {
    TrainError::Config(format!(
        "{} holds no training run (neither a saved training state, state/training.json, nor \
         the {CONFIG_TOML} of a run started there): nothing to resume; start the run without \
         --resume (an options file is given with --config)",
        run_dir.display()
    ))
}

/// Refuses to resume a checkpoint folder (a run's `best/`, say) given for its run.
fn refuse_checkpoint_as_run(run_dir: &Path) -> Result<()> {
    if !outputs::is_checkpoint(run_dir) {
        return Ok(());
    }
    let run = outputs::resolved(run_dir);
    let hint = match run.parent() {
        Some(parent) if outputs::is_run(parent) => {
            format!(": its run is {}", parent.display())
        }
        _ => String::new(),
    };
    Err(TrainError::Config(format!(
        "--run-dir {} is a checkpoint folder, not a training run{hint}",
        run_dir.display()
    )))
}

fn plan_resume(given: &TrainOptions, run_dir: PathBuf, lock: File) -> Result<Plan> {
    let saved = run_dir.join(CONFIG_TOML);
    if state::exists(&run_dir)? {
        let progress = state::read_progress(&run_dir)?;
        // The options the run last started with: a resume writes them to config.toml before
        // its first epoch, the state keeps the older ones until an epoch completes.
        let options = if saved.is_file() {
            TrainOptions::from_toml_file(&saved)?
        } else {
            progress.config.to_options()
        };
        // Resolved, so that a key removed from the file shows as the default it falls to. A
        // value of the file refused here may be replaced by a flag given now.
        if let Ok(from_file) = TrainConfig::resolve(&options) {
            for change in progress
                .config
                .to_options()
                .changes(&from_file.to_options())
            {
                tracing::info!(
                    "resume: {} differs from the state of epoch {}: {change}",
                    saved.display(),
                    progress.epochs_done
                );
            }
        }
        let mut config = resolve_file_over(Some(&saved), &options, given)?;
        config.run_dir = Some(run_dir.clone());
        config.check_resume(&progress.config)?;
        // Accepted: another `--initial-checkpoint` can only name the run's own by another
        // path, which is kept as the run wrote it and is no override.
        config
            .initial_checkpoint
            .clone_from(&progress.config.initial_checkpoint);
        let given = &TrainOptions {
            initial_checkpoint: None,
            ..given.clone()
        };
        if config.epochs < progress.epochs_done {
            return Err(TrainError::Config(format!(
                "--epochs {} is below the {} epochs {} has completed: give at least {}",
                config.epochs,
                progress.epochs_done,
                run_dir.display(),
                progress.epochs_done
            )));
        }
        return Ok(Plan {
            config,
            run_dir,
            resumed: Some(progress),
            lock: Some(lock),
            overrides: options.changes(given),
        });
    }
    // Killed or interrupted before its first epoch ended: the run starts again from its
    // options, which is what the interrupt message promises.
    if !saved.is_file() {
        return Err(nothing_to_resume(&run_dir));
    }
    // A run killed in its first epoch may have logged that epoch before its state (and
    // Ctrl-C writes `last/`); one that logged more, or wrote `best/` (which follows the
    // state), had a state, and starting over would discard its epochs and checkpoints.
    let logged = MetricsLog::new(&run_dir).read()?;
    let epochs = logged.iter().map(|r| r.epoch).max().unwrap_or(0);
    let has_best = run_dir.join(BEST_DIR).exists();
    if epochs > 1 || has_best {
        let mut saved = Vec::new();
        if epochs > 0 {
            let plural = if epochs == 1 { "" } else { "s" };
            saved.push(format!("logged {epochs} epoch{plural} in {METRICS_JSONL}"));
        }
        if has_best {
            saved.push(format!("wrote {BEST_DIR}/"));
        }
        return Err(TrainError::Config(format!(
            "{} {} but holds no training state (state/training.json): it cannot resume \
             without it, and starting over would discard its epochs and checkpoints; start a \
             new run with another --run-dir",
            run_dir.display(),
            saved.join(" and ")
        )));
    }
    let options = TrainOptions::from_toml_file(&saved)?;
    let mut config = resolve_file_over(Some(&saved), &options, given)?;
    config.run_dir = Some(run_dir.clone());
    tracing::info!(
        "{} has no completed epoch: its run starts from the beginning",
        run_dir.display()
    );
    Ok(Plan {
        config,
        run_dir,
        resumed: None,
        lock: Some(lock),
        overrides: options.changes(given),
    })
}

struct Trainer {
    /// The run's config, model and optimiser.
    learner: Learner,
    run_dir: PathBuf,
    classes: Vec<String>,
    train_set: ImageFolder,
    val_set: ImageFolder,
    ema: Option<Ema>,
    schedule: LrSchedule,
    train_loader: LoaderConfig,
    val_loader: LoaderConfig,
    progress: Progress,
    records: Vec<EpochRecord>,
    metrics: MetricsLog,
    events: EventWriter,
    interrupted: Arc<AtomicBool>,
}

/// Sums over the steps of one epoch.
#[derive(Default)]
struct EpochTotals {
    loss_sum: f64,
    correct: u64,
    images: u64,
    grad_norm_sum: f64,
    grad_norm_max: f64,
    grad_norms: u64,
    clipped: u64,
    skipped: u64,
    lr: f64,
    seconds: f64,
}

enum EpochEnd {
    Completed(EpochTotals),
    Interrupted,
}

impl Trainer {
    /// The weights that are validated and saved: the average when EMA is on.
    fn served(&self) -> &Model {
        self.ema.as_ref().map_or(&self.learner.model, |e| &e.model)
    }

    /// Writes the served weights to the checkpoint `dir`, recorded as taken after `epoch`
    /// epochs, scored `val` (accuracy, loss) at an epoch's end.
    fn save_served(&self, dir: &Path, epoch: usize, val: Option<(f64, f64)>) -> Result<()> {
        let progress = &self.progress;
        TrainingRecord::new(
            &progress.config,
            progress.data.as_ref(),
            epoch,
            progress.global_step,
            val,
        )
        .save(self.served(), dir)
        .with_context(|| format!("writing {}", dir.display()))
    }

    /// One optimiser step with `group`'s summed gradients at the schedule's rate; returns
    /// the running averages for the progress line. Only the parameters `selected` keeps are
    /// updated.
    fn update(
        &mut self,
        group: Group,
        selected: &dyn Fn(&str) -> bool,
        totals: &mut EpochTotals,
    ) -> Result<String> {
        let lr = self.schedule.lr(self.progress.global_step);
        let step = self.learner.update(group, lr, selected)?;
        self.progress.global_step += 1;
        totals.lr = lr;
        let norm = step.grad_norm;
        // Skipped steps too: their non-finite loss or norm is what a diverging run shows.
        self.events.scalars(
            self.progress.global_step,
            &[
                ("train/loss_step", step.loss()),
                ("train/lr", lr),
                ("train/grad_norm", norm),
            ],
        );
        if !step.applied {
            totals.skipped += 1;
            let loss = step.loss();
            tracing::warn!(
                "step {}: loss {loss}, gradient norm {norm}: update skipped",
                self.progress.global_step
            );
            return Ok(format!("step skipped (loss {loss}, |g| {norm})"));
        }
        if step.clipped {
            totals.clipped += 1;
        }
        if let Some(ema) = &self.ema {
            ema.update(&self.learner.model)?;
        }
        totals.correct += step.correct;
        totals.loss_sum += step.loss_sum;
        totals.images += step.images;
        totals.grad_norm_sum += norm;
        totals.grad_norm_max = totals.grad_norm_max.max(norm);
        totals.grad_norms += 1;
        let images = totals.images.max(1) as f64;
        Ok(format!(
            "loss {:.4} acc {:.1}% lr {lr:.2e} |g| {norm:.2}",
            totals.loss_sum / images,
            100.0 * totals.correct as f64 / images
        ))
    }

    /// Trains one epoch: an update every `--grad-accum-steps` batches, the last one over the
    /// batches left.
    fn train_epoch(&mut self, epoch: usize) -> Result<EpochEnd> {
        let frozen = epoch < self.learner.config.freeze_stem_epochs;
        let selected = move |name: &str| !(frozen && is_stem(name));
        let mut totals = EpochTotals::default();
        let start = Instant::now();
        let label = format!("epoch {}/{}", epoch + 1, self.learner.config.epochs);
        let first_step = self.progress.global_step;
        let mut iter = batches(
            &self.train_set.samples,
            &self.train_loader,
            epoch as u64,
            &self.learner.model.device,
        );
        let per_update = self.learner.config.grad_accum_steps;
        let batch_count = iter.len();
        let mut bar = EpochProgress::new(label, batch_count);
        let mut group = Group::default();
        let mut status = String::new();
        for (index, batch) in iter.by_ref().enumerate() {
            let batch =
                batch.with_context(|| format!("loading training batch of epoch {}", epoch + 1))?;
            let in_group = index % per_update;
            let group_len = per_update.min(batch_count - (index - in_group));
            // Without accumulation the draws are the update's number, as they always were.
            let draw = self.progress.global_step * per_update as u64 + in_group as u64;
            let share = 1.0 / group_len as f64;
            self.learner
                .accumulate_batch(&batch, (frozen, share, draw), &mut group)?;
            if in_group + 1 == group_len {
                status = self.update(std::mem::take(&mut group), &selected, &mut totals)?;
            }
            bar.advance(batch.indices.len(), &status);
            if self.interrupted.load(Ordering::SeqCst) {
                bar.finish();
                return Ok(EpochEnd::Interrupted);
            }
        }
        // A batch the loader left out (every file unreadable) leaves the last group short of
        // the size it was planned with: its gradients still make an update.
        if !group.is_empty() {
            self.update(group, &selected, &mut totals)?;
        }
        bar.finish();
        // The schedule and a resume count the planned steps, whatever batches were left out.
        self.progress.global_step = first_step + self.schedule.steps_per_epoch;
        totals.seconds = start.elapsed().as_secs_f64();
        if totals.images == 0 {
            return Err(TrainError::NoStepSucceeded {
                epoch: epoch + 1,
                kept: epoch,
            });
        }
        Ok(EpochEnd::Completed(totals))
    }

    /// Runs the remaining epochs.
    fn run(&mut self) -> Result<Outcome> {
        for epoch in self.progress.epochs_done..self.learner.config.epochs {
            let start = Instant::now();
            let searched_before = vt_model::kernels::algorithm_search_time();
            let totals = match self.train_epoch(epoch)? {
                EpochEnd::Completed(totals) => totals,
                EpochEnd::Interrupted => {
                    let last = self.run_dir.join(LAST_DIR);
                    // Weights that are not finite would make a `last/` that nothing loads.
                    if let Some(tensor) = state::first_non_finite(self.served())? {
                        tracing::warn!(
                            "interrupted in epoch {}: `{tensor}` is not finite; {} is left \
                             as it was",
                            epoch + 1,
                            last.display()
                        );
                        return Ok(Outcome::Interrupted);
                    }
                    self.save_served(&last, epoch, None)?;
                    tracing::info!(
                        "interrupted in epoch {}: {} holds the current weights; `--resume --run-dir {}` \
                         restarts epoch {} from its beginning",
                        epoch + 1,
                        last.display(),
                        self.run_dir.display(),
                        epoch + 1
                    );
                    return Ok(Outcome::Interrupted);
                }
            };
            // Saved, such weights would make a state and checkpoints that nothing loads: the
            // run's files stay as the last epoch left them.
            let averaged = self.ema.as_ref().map(|e| &e.model);
            for model in std::iter::once(&self.learner.model).chain(averaged) {
                if let Some(tensor) = state::first_non_finite(model)? {
                    return Err(TrainError::Diverged {
                        epoch: epoch + 1,
                        what: format!("`{tensor}` is no longer finite"),
                        kept: epoch,
                    });
                }
            }
            let label = format!("validate {}/{}", epoch + 1, self.learner.config.epochs);
            let val = evaluate(
                self.served(),
                &self.val_set.samples,
                &self.val_loader,
                &self.classes,
                &label,
            )?;
            let (val_acc, val_loss) = (val.matrix.accuracy(), val.loss);
            // Finite weights that overflow the forward pass are as far gone: saved, they
            // would be what a resume at a lower rate starts from.
            if !val_loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch: epoch + 1,
                    what: format!("the validation loss is {val_loss}"),
                    kept: epoch,
                });
            }
            let best = self.progress.improves(val_acc, val_loss);
            // What --early-stop waits for: a tie in accuracy with a lower loss is a new best/,
            // not an improvement of the accuracy.
            let acc_improved = best && self.progress.best_val_acc.is_none_or(|acc| val_acc > acc);
            let images = totals.images as f64;
            let record = EpochRecord {
                epoch: epoch + 1,
                train_loss: totals.loss_sum / images,
                train_acc: totals.correct as f64 / images,
                val_loss,
                val_acc,
                val_class_acc: val.matrix.class_accuracy(),
                lr: totals.lr,
                img_per_s: images / totals.seconds.max(1e-9),
                epoch_time_s: start.elapsed().as_secs_f64(),
                grad_norm_mean: totals.grad_norm_sum / totals.grad_norms.max(1) as f64,
                grad_norm_max: totals.grad_norm_max,
                clipped_steps: totals.clipped,
                skipped_steps: totals.skipped,
                global_step: self.progress.global_step,
                stem_frozen: epoch < self.learner.config.freeze_stem_epochs,
                best,
            };
            self.metrics.append(&record)?;
            let calibration = Calibration::of(&val.predictions, calibration::BINS);
            self.log_epoch(&record, calibration.ece);
            self.records.push(record.clone());
            self.metrics.write_csv(&self.records, &self.classes)?;
            self.draw_plots(&val.matrix, epoch + 1);
            if best {
                self.progress.best_val_acc = Some(val_acc);
                self.progress.best_val_loss = Some(val_loss);
                self.progress.best_epoch = Some(epoch + 1);
            }
            if acc_improved {
                self.progress.epochs_since_best = 0;
            } else {
                self.progress.epochs_since_best += 1;
            }
            let offered = history::offer(
                &self.progress.top,
                Kept {
                    epoch: epoch + 1,
                    val_acc,
                    val_loss,
                },
                self.learner.config.checkpoint_hist,
            );
            // The new folder before the state that lists it, the dropped ones after the
            // state that no longer does: a kill in between leaves only unlisted folders.
            if offered.admitted {
                let dir = history::epoch_dir(&self.run_dir, epoch + 1);
                self.save_served(&dir, epoch + 1, Some((val_acc, val_loss)))?;
            }
            self.progress.top = offered.kept;
            self.progress.epochs_done = epoch + 1;
            let patience = self.learner.config.early_stop;
            self.progress.stopped_early =
                patience.is_some_and(|p| self.progress.epochs_since_best >= p);
            let saved = state::save(
                &self.run_dir,
                &self.progress,
                &self.learner.model,
                &self.learner.optimizer,
                self.ema.as_ref(),
            );
            if let Err(e) = saved {
                // No state lists the epoch's new folder in `top/`: it goes (a full disk
                // may have stopped the save, and it holds a model's size).
                if offered.admitted {
                    let _ = std::fs::remove_dir_all(history::epoch_dir(&self.run_dir, epoch + 1));
                }
                return Err(e).with_context(|| {
                    format!("writing the training state in {}", self.run_dir.display())
                });
            }
            // After the state: a kill before these leaves them behind it, and the resume
            // writes them from it (in `run`). Written first, `best/` could hold an epoch that
            // the resume runs again and then finds no better.
            for (due, name) in [(best, BEST_DIR), (true, LAST_DIR)] {
                if due {
                    let dir = self.run_dir.join(name);
                    self.save_served(&dir, epoch + 1, Some((val_acc, val_loss)))?;
                }
            }
            history::remove(&self.run_dir, &offered.dropped)?;
            tracing::info!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}%{} | lr {:.2e} | \
                 {:.1} img/s | {:.1}s | |g| mean {:.2} max {:.2}, {} clipped",
                record.epoch,
                self.learner.config.epochs,
                record.train_loss,
                100.0 * record.train_acc,
                record.val_loss,
                100.0 * record.val_acc,
                if best { " (best)" } else { "" },
                record.lr,
                record.img_per_s,
                record.epoch_time_s,
                record.grad_norm_mean,
                record.grad_norm_max,
                record.clipped_steps
            );
            if offered.admitted || !offered.dropped.is_empty() {
                tracing::info!(
                    "epoch {}: {}/ keeps epochs {}",
                    record.epoch,
                    history::TOP_DIR,
                    epoch_list(&self.progress.top)
                );
            }
            let searched = vt_model::kernels::algorithm_search_time() - searched_before;
            if !searched.is_zero() {
                tracing::info!(
                    "epoch {}: {:.2}s of it went into timing cuDNN's convolution algorithms \
                     (once per shape and batch bucket)",
                    record.epoch,
                    searched.as_secs_f64()
                );
            }
            if self.progress.stopped_early {
                // The best checkpoint may be a later epoch of the same accuracy and a lower
                // loss.
                let since = self.progress.epochs_since_best;
                tracing::info!(
                    "early stop: validation accuracy not improved for {since} epochs, since \
                     epoch {} (best/: epoch {})",
                    (epoch + 1).saturating_sub(since),
                    self.progress.best_epoch.unwrap_or(0)
                );
                break;
            }
            if self.interrupted.load(Ordering::SeqCst) && epoch + 1 < self.learner.config.epochs {
                tracing::info!(
                    "interrupted: stopped after epoch {}; continue with `--resume --run-dir {}`",
                    epoch + 1,
                    self.run_dir.display()
                );
                return Ok(Outcome::Interrupted);
            }
        }
        match (self.progress.best_val_acc, self.progress.best_epoch) {
            (Some(acc), Some(epoch)) => tracing::info!(
                "done: best validation accuracy {:.2}% at epoch {epoch}; checkpoints in {}/{{{BEST_DIR},{LAST_DIR}}}",
                100.0 * acc,
                self.run_dir.display()
            ),
            _ => tracing::warn!(
                "done, but no epoch had a finite validation loss: {} holds no {BEST_DIR}/ checkpoint",
                self.run_dir.display()
            ),
        }
        if !self.progress.top.is_empty() {
            tracing::info!(
                "{}/ keeps epochs {}: `vt-train average --run-dir {} --out DIR` averages them",
                history::TOP_DIR,
                epoch_list(&self.progress.top),
                self.run_dir.display()
            );
        }
        // Ctrl-C during the last validation: the run is complete, but the caller asked to stop.
        Ok(if self.interrupted.load(Ordering::SeqCst) {
            Outcome::Interrupted
        } else {
            Outcome::Finished
        })
    }

    /// The epoch's metrics for TensorBoard, at the step that ended it, with the validation
    /// calibration error.
    fn log_epoch(&mut self, record: &EpochRecord, val_ece: f64) {
        let per_class: Vec<(String, f64)> = record
            .val_class_acc
            .iter()
            .filter(|(_, acc)| !acc.is_nan())
            .map(|(class, acc)| (format!("val/accuracy/{class}"), *acc))
            .collect();
        let mut scalars = vec![
            ("epoch", record.epoch as f64),
            ("train/loss", record.train_loss),
            ("train/accuracy", record.train_acc),
            ("val/loss", record.val_loss),
            ("val/accuracy", record.val_acc),
            ("val/ece", val_ece),
            ("train/img_per_s", record.img_per_s),
        ];
        scalars.extend(per_class.iter().map(|(tag, acc)| (tag.as_str(), *acc)));
        self.events.scalars(record.global_step, &scalars);
    }

    /// Plots are a convenience: failing to draw one is logged, not fatal.
    fn draw_plots(&self, matrix: &crate::metrics::ConfusionMatrix, epoch: usize) {
        let curves = draw_curves(&self.run_dir.join(CURVES_PNG), &self.records);
        let title = format!("validation, epoch {epoch}");
        let confusion = draw_confusion(&self.run_dir.join(CONFUSION_PNG), matrix, &title);
        for err in [curves.err(), confusion.err()].into_iter().flatten() {
            tracing::warn!("{}", error_chain(&err));
        }
    }
}

/// Takes back what a killed epoch drew when no epoch follows to replace it: TensorBoard
/// drops its points once a session starts at the saved step, and its confusion matrix is
/// not the saved model's.
fn retract_unsaved_epoch(run_dir: &Path, global_step: u64) -> Result<()> {
    if let Err(e) = EventWriter::create(run_dir, global_step + 1) {
        tracing::warn!("{e}: TensorBoard keeps the points of the epoch that was not saved");
    }
    outputs::remove_file_synced(&run_dir.join(CONFUSION_PNG))?;
    Ok(())
}

/// "6, 3, 4": the epochs of a checkpoint history, best first.
fn epoch_list(kept: &[Kept]) -> String {
    if kept.is_empty() {
        return "none".into();
    }
    let epochs: Vec<String> = kept.iter().map(|k| k.epoch.to_string()).collect();
    epochs.join(", ")
}

/// How a training command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch ran, training stopped early, or there was nothing left to do.
    Finished,
    /// Ctrl-C stopped it; what it had done is saved.
    Interrupted,
}

pub fn run(args: &TrainArgs) -> Result<Outcome> {
    let Plan {
        config,
        run_dir,
        resumed,
        lock,
        overrides,
    } = plan(args)?;
    let device = prepare_device(&config)?;
    // Held while training reads the photos: an import would replace them under it.
    let _data_lock = vt_data::import::lock_for_reading(&config.data)?;
    let train_set = open_training_images(&config)?;
    let val_set = data::open_split(&config.data, Split::Val, config.limit_val, config.seed)
        .with_context(|| format!("reading the validation split of {}", config.data.display()))?;
    data::require_same_classes(&train_set, &val_set, &config.data)?;
    data::warn_unmeasured(&val_set);
    let classes = train_set.classes.clone();
    let wanted = model_config(&config, classes.clone());
    let steps_per_epoch = data::batches_per_epoch(
        train_set.len(),
        &training_loader(&config, &wanted, train_set.len()),
    )
    .div_ceil(config.grad_accum_steps as u64);
    let data_used = DataUsed {
        train: ImagesUsed::of(&train_set, &config.data),
        val: ImagesUsed::of(&val_set, &config.data),
    };
    // Before anything in the run folder changes: a refused resume leaves it as it was.
    if let Some(progress) = &resumed {
        match &progress.data {
            Some(run_data) => data_used.check_resume(run_data, &config.data)?,
            None => tracing::warn!(
                "{}: the run was saved by an earlier vt-train, which did not record its images: \
                 those of {} cannot be checked against them, and are recorded from now on. \
                 Rules changed since may apply from this epoch on: TrivialAugment resamples \
                 bilinearly, GPU convolutions use TF32 (--tf32 false keeps f32), the modern \
                 recipe's cosine ends at lr/100 below --lr 1e-4, --early-stop counts epochs \
                 since accuracy last rose",
                run_dir.display(),
                config.data.display()
            ),
        }
        // Every epoch takes the same number of steps, skipped ones included.
        let run_steps = progress.global_step / progress.epochs_done.max(1) as u64;
        config.check_resume_steps(&progress.config, run_steps, steps_per_epoch)?;
    }
    // A new run takes its folder only once its data is readable and its model built (a
    // --pretrained or --initial-checkpoint loaded), so that a mistyped option leaves no
    // empty run folder behind.
    let fresh = resumed.is_none() && lock.is_none();
    // An existing folder is locked and checked before the model is built (which may
    // download): a refusal comes first.
    let lock = match lock {
        None if run_dir.is_dir() => {
            let lock = lock_run_dir(&run_dir)?;
            refuse_run_outputs(&run_dir)?;
            Some(lock)
        }
        lock => lock,
    };
    let new = match resumed {
        Some(_) => None,
        None => Some(new_model(&config, classes.clone(), &device)?),
    };
    let _lock = match lock {
        Some(lock) => lock,
        None => {
            std::fs::create_dir_all(&run_dir)
                .map_err(|e| TrainError::file_op("creating", &run_dir, e))?;
            let lock = lock_run_dir(&run_dir)?;
            refuse_run_outputs(&run_dir)?;
            lock
        }
    };
    if fresh {
        // At once: from here on a killed run is resumed from its options.
        write_atomically(&run_dir.join(CONFIG_TOML), config.to_toml()?.as_bytes())?;
    }
    state::finish_interrupted_writes(&run_dir, &RUN_OUTPUTS)?;
    // Checked before any epoch is computed: a save refuses a folder holding anything but a
    // checkpoint, and would otherwise end the run after the epoch's work.
    for dir in [BEST_DIR, LAST_DIR, state::STATE_DIR] {
        let path = run_dir.join(dir);
        if let DirContents::Foreign(reason) = dir_contents(&path)? {
            return Err(TrainError::ForeignFiles { path, reason });
        }
    }
    history::check_folder(&run_dir)?;
    let kept = history::remove_leftovers(&run_dir, resumed.as_ref().map_or(&[], |p| &p.top))?;

    let model = match new {
        None => {
            let model = state::load_model(&run_dir, &device)?;
            if model.config.class_names != classes {
                return Err(TrainError::Config(format!(
                    "the classes of {} {:?} differ from the run's {:?}: they cannot change on \
                     resume",
                    config.data.display(),
                    classes,
                    model.config.class_names
                )));
            }
            if model.config != wanted {
                return Err(TrainError::State {
                    path: run_dir.join(state::STATE_DIR),
                    message: format!(
                        "the saved model does not match the run's options in {}",
                        run_dir.join(CONFIG_TOML).display()
                    ),
                });
            }
            model
        }
        Some(model) => model,
    };
    let mut learner = Learner::new(config, model);
    // Borrowed apart from the optimiser, which loading the state changes.
    let (config, model) = (&learner.config, &learner.model);
    let ema = config.ema.map(|decay| Ema::new(model, decay)).transpose()?;

    let train_loader = training_loader(config, &model.config, train_set.len());
    let val_loader = data::eval_loader(&model.config, config.batch_size, config.loader_threads);
    // The options the saved epoch was trained with, before the resume's replace them.
    let saved_options = resumed.as_ref().map(|p| p.config.clone());
    let mut progress = match resumed {
        Some(mut progress) => {
            state::load_training(
                &run_dir,
                &progress,
                &mut learner.optimizer,
                ema.as_ref(),
                &device,
            )?;
            progress.config = config.clone();
            progress.top = kept;
            progress.data = Some(data_used);
            progress
        }
        None => Progress::new(config.clone(), data_used),
    };
    // Only now that every check of the resume accepted them: a refused one is not made.
    for change in overrides {
        tracing::info!("resume: overriding {change}");
    }
    let schedule = LrSchedule {
        base_lr: config.lr,
        decay: config.decay(),
        warmup_steps: (config.warmup_epochs * steps_per_epoch as f64).round() as u64,
        steps_per_epoch,
        total_steps: steps_per_epoch * config.epochs as u64,
    };
    let metrics = MetricsLog::new(&run_dir);
    let mut records = metrics.read()?;
    // Before the returns below: a kill between an epoch's metrics line and its state leaves
    // that line behind the state even when nothing is left to train.
    let logged = records.len();
    records.retain(|r| r.epoch <= progress.epochs_done);
    let dropped_epoch = records.len() != logged;
    // Each epoch's line is written before the state that counts it: fewer lines than the
    // state's epochs were lost, and the rewrite below would make the loss final.
    if !records.iter().map(|r| r.epoch).eq(1..=progress.epochs_done) {
        return Err(TrainError::Config(format!(
            "{} holds {} lines for the {} epochs the run's saved state has trained (lines \
             missing, repeated or out of order: the file was cut, replaced or edited); put \
             back the run's own file to resume, or start a new run in another --run-dir",
            metrics.jsonl.display(),
            records.len(),
            progress.epochs_done
        )));
    }
    // Recomputed, so that resuming with a larger --early-stop continues the run.
    progress.stopped_early = config
        .early_stop
        .is_some_and(|p| progress.epochs_since_best >= p);
    let nothing_to_do = progress.stopped_early || progress.epochs_done >= config.epochs;
    if dropped_epoch {
        tracing::info!(
            "dropping {} metric lines logged after the saved epoch",
            logged - records.len()
        );
        // What was drawn from the lines before they go: a kill in between leaves them for
        // the next resume to drop again.
        if nothing_to_do {
            retract_unsaved_epoch(&run_dir, progress.global_step)?;
        }
        // Plots are a convenience: failing to draw one is logged, not fatal.
        if let Err(e) = draw_curves(&run_dir.join(CURVES_PNG), &records) {
            tracing::warn!("{}", error_chain(&e));
        }
    }
    metrics.rewrite(&records, &classes)?;
    if let (Some(options), Some(saved)) = (&saved_options, records.last()) {
        // A kill after the state's save, before the checkpoints', left them behind it.
        let served = state::load_served(&run_dir, &device)?;
        let best = progress.best_epoch == Some(saved.epoch);
        let record = TrainingRecord::new(
            options,
            progress.data.as_ref(),
            saved.epoch,
            progress.global_step,
            Some((saved.val_acc, saved.val_loss)),
        );
        for (due, name) in [(best, BEST_DIR), (true, LAST_DIR)] {
            let dir = run_dir.join(name);
            if due && !state::holds(&dir, &served) {
                tracing::info!(
                    "{} is not the saved state's epoch {}: writing it from the state",
                    dir.display(),
                    saved.epoch
                );
                record
                    .save(&served, &dir)
                    .with_context(|| format!("writing {}", dir.display()))?;
            }
        }
        let best_dir = run_dir.join(BEST_DIR);
        if let (false, Some(epoch), false) = (best, progress.best_epoch, best_dir.exists()) {
            let kept = progress
                .top
                .iter()
                .any(|k| k.epoch == epoch)
                .then(|| crate::history::epoch_dir(&run_dir, epoch))
                .filter(|dir| dir.is_dir());
            let remedy = match kept {
                Some(dir) => format!("{} holds it: copy that folder to best/", dir.display()),
                None => format!("last/ holds epoch {}", saved.epoch),
            };
            tracing::warn!(
                "{} is missing, and its epoch {epoch} is not the saved state's ({}), which \
                 cannot write it; {remedy}",
                best_dir.display(),
                saved.epoch
            );
        }
    }
    // Before anything else is written: a resume with nothing to do leaves the run as the
    // saved state has it.
    if nothing_to_do {
        if progress.stopped_early {
            tracing::info!(
                "{} stopped early at epoch {}, its validation accuracy not risen for {} \
                 epochs: nothing to do (a larger --early-stop, or --early-stop 0, continues it)",
                run_dir.display(),
                progress.epochs_done,
                progress.epochs_since_best
            );
        } else {
            tracing::info!(
                "{} has completed its {} epoch{} (give a larger --epochs to continue)",
                run_dir.display(),
                config.epochs,
                if config.epochs == 1 { "" } else { "s" }
            );
        }
        return Ok(Outcome::Finished);
    }

    if progress.top.len() > config.checkpoint_hist {
        tracing::info!(
            "--checkpoint-hist {}: the worst {} of the {} epochs in {}/ leave it at the end of \
             the next epoch",
            config.checkpoint_hist,
            progress.top.len() - config.checkpoint_hist,
            progress.top.len(),
            history::TOP_DIR
        );
    }

    write_atomically(&run_dir.join(CONFIG_TOML), config.to_toml()?.as_bytes())?;
    // Steps are counted from 1: what an interrupted process logged past the saved state is
    // dropped.
    let events = EventWriter::create(&run_dir, progress.global_step + 1).unwrap_or_else(|e| {
        tracing::warn!("{e}: training goes on without TensorBoard logging");
        EventWriter::disabled(&run_dir)
    });
    // Installed before the first step: from here on Ctrl-C stops cleanly.
    let interrupted = interrupt_flag()?;
    tracing::info!(
        "{} {}: {} parameters, {} classes, {} px | {} train / {} val images, {} per epoch | \
         {} recipe, {}, {} | device {}, {} compute + {} loader threads | run {}",
        if progress.epochs_done > 0 {
            "resuming"
        } else {
            "training"
        },
        model.config.arch,
        model.num_parameters(),
        classes.len(),
        model.config.image_size,
        train_set.len(),
        val_set.len(),
        count_steps(steps_per_epoch),
        config.recipe.name(),
        config.method(),
        config.decay(),
        vt_model::device_name(&device),
        config.threads,
        config.loader_threads,
        run_dir.display()
    );
    let mut trainer = Trainer {
        interrupted,
        learner,
        run_dir,
        classes,
        train_set,
        val_set,
        ema,
        schedule,
        train_loader,
        val_loader,
        progress,
        records,
        metrics,
        events,
    };
    trainer.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_folders_are_named_by_utc_time() {
        assert_eq!(timestamp(0), "19700101-000000");
        assert_eq!(timestamp(1_700_000_000), "20231114-221320");
        assert_eq!(timestamp(951_782_400), "20000229-000000");
        assert!(default_run_dir().starts_with("runs"));
    }
}
