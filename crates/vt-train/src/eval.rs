//! Evaluation: the validation pass of training and `vt-train eval` (accuracy, per-class
//! precision/recall/F1, confusion matrix as text, JSON and PNG, calibration and its
//! reliability diagram, per-image predictions as CSV and the most confident mistakes).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, D};
use serde::Serialize;
use vt_data::dataset::{ImageFolder, Manifest, Split};
use vt_data::fetch::DEFAULT_DATA_DIR;
use vt_data::image_files::{path_text, serialize_path};
use vt_data::loader::{batches, LoaderConfig, SkippedFile};
use vt_model::{parse_device, parse_dtype, use_bf16_products, Model, VtConfig, DTYPE_NAMES};

use crate::calibration::{self, Calibration};
use crate::cli::{at_least_one, thread_count};
use crate::config::TrainOptions;
use crate::data;
use crate::error::{Result, ResultExt, TrainError};
use crate::history::TOP_DIR;
use crate::loss::{cross_entropy, predictions};
use crate::metrics::{stage_csv, ClassScores, ConfusionMatrix};
use crate::outputs;
use crate::plots::stage_evaluation;
use crate::progress::EpochProgress;
use crate::provenance::TrainingRecord;
use crate::state;
use crate::threads;
use crate::train::CONFIG_TOML;

pub struct Evaluation {
    /// Mean cross-entropy (no label smoothing) over the images.
    pub loss: f64,
    pub matrix: ConfusionMatrix,
    /// One per image the matrix counts, in the order of the samples; skipped files have none.
    pub predictions: Vec<Prediction>,
    pub skipped: Vec<SkippedFile>,
}

/// What the model said about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Position in the evaluated samples.
    pub index: usize,
    pub label: usize,
    /// The argmax of the logits, as the confusion matrix counts it: where two classes tie in
    /// f32 probabilities their logits may still differ.
    pub predicted: usize,
    /// The logits, as the model computes them, in the classes' order.
    pub logits: Vec<f32>,
    /// Softmax over the logits (divided by the checkpoint's temperature, if it has one).
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// The probability of the predicted class.
    pub fn confidence(&self) -> f32 {
        self.probabilities[self.predicted]
    }

    pub fn label_probability(&self) -> f32 {
        self.probabilities[self.label]
    }

    pub fn correct(&self) -> bool {
        self.predicted == self.label
    }
}

/// A prediction of `probabilities` (the argmax as predicted; their logs as the logits), for
/// tests.
#[cfg(test)]
pub(crate) fn prediction(index: usize, label: usize, probabilities: &[f32]) -> Prediction {
    let predicted = (0..probabilities.len())
        .max_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b]))
        .unwrap_or(0);
    Prediction {
        index,
        label,
        predicted,
        logits: probabilities.iter().map(|p| p.ln()).collect(),
        probabilities: probabilities.to_vec(),
    }
}

/// The wrong predictions the model was surest of: up to `n`, highest confidence first, equal
/// ones in the order given. A NaN confidence (a diverged model) ranks last rather than first,
/// where `total_cmp` would put it.
pub fn most_confident_mistakes(predictions: &[Prediction], n: usize) -> Vec<&Prediction> {
    let mut mistakes: Vec<&Prediction> = predictions.iter().filter(|p| !p.correct()).collect();
    mistakes.sort_by(|a, b| {
        let (a, b) = (a.confidence(), b.confidence());
        a.is_nan().cmp(&b.is_nan()).then(b.total_cmp(&a))
    });
    mistakes.truncate(n);
    mistakes
}

/// Runs `model` in eval mode over `samples`.
pub fn evaluate(
    model: &Model,
    samples: &[(PathBuf, usize)],
    loader: &LoaderConfig,
    classes: &[String],
    label: &str,
) -> Result<Evaluation> {
    let k = classes.len();
    let mut matrix = ConfusionMatrix::new(classes.to_vec());
    let mut per_image = Vec::new();
    let mut loss_sum = 0.0;
    let mut iter = batches(samples, loader, 0, &model.device);
    let mut progress = EpochProgress::new(label, iter.len());
    for batch in iter.by_ref() {
        let batch = batch?;
        let raw = model
            .forward_t(&batch.images.to_dtype(model.dtype)?, false)?
            .to_dtype(DType::F32)?;
        let logits = model.config.calibrated(&raw)?;
        let n = batch.indices.len();
        let loss = cross_entropy(&logits, &batch.labels, 0.0)?.to_scalar::<f32>()?;
        loss_sum += f64::from(loss) * n as f64;
        let outputs = logits.dim(D::Minus1)?;
        if outputs != k {
            return Err(TrainError::Config(format!(
                "{label}: the model has {outputs} outputs for {k} classes"
            )));
        }
        let labels = batch.labels.to_vec1::<u32>()?;
        let predicted = predictions(&logits)?;
        matrix.add(&labels, &predicted);
        // N x K numbers read back: small beside the forward pass, even every epoch.
        let probabilities = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let raw = raw.to_vec2::<f32>()?;
        for ((((&index, &truth), &predicted), probabilities), logits) in batch
            .indices
            .iter()
            .zip(&labels)
            .zip(&predicted)
            .zip(probabilities)
            .zip(raw)
        {
            // The rows the matrix counts (an argmax of K logits is below K), so that the
            // predictions agree with its accuracy.
            if (truth as usize) < k {
                per_image.push(Prediction {
                    index,
                    label: truth as usize,
                    predicted: predicted as usize,
                    logits,
                    probabilities,
                });
            }
        }
        progress.advance(
            n,
            &format!("loss {:.4}", loss_sum / matrix.total().max(1) as f64),
        );
    }
    progress.finish();
    if matrix.total() == 0 {
        return Err(TrainError::Config(format!(
            "{label}: none of the {} images could be loaded",
            samples.len()
        )));
    }
    per_image.sort_by_key(|p| p.index);
    // In the order of the files, not of the workers that met them.
    let mut skipped = iter.skipped();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Evaluation {
        loss: loss_sum / matrix.total() as f64,
        matrix,
        predictions: per_image,
        skipped,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Test,
    Val,
    Train,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Split {
        match s {
            SplitArg::Test => Split::Test,
            SplitArg::Val => Split::Val,
            SplitArg::Train => Split::Train,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint folder (config.json + model.safetensors), e.g. runs/NAME/best
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Data folder, as `vt-train train --data` reads it [default: the `data` of the
    /// checkpoint's run (RUN/config.toml beside it, or above its top/), else data/intel]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Split to evaluate
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// Report file (JSON, in an existing folder, not named .png or .csv); the confusion
    /// matrix and reliability diagram PNG and the per-image predictions CSV go beside it with
    /// .png and .csv extensions [default: eval-<checkpoint>-<split>.json beside the checkpoint
    /// folder; a top/ epoch's beside its run]
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Evaluate a random subset of N images
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Precision of the weights and activations, as `vt-serve --dtype` serves them: f32,
    /// f16, or bf16 (CUDA devices only); the checkpoint's f32 weights are converted when
    /// loaded. The report's default name then ends in -f16 or -bf16, beside the f32 one to
    /// `compare` with
    #[arg(long, default_value = "f32", value_parser = DTYPE_NAMES)]
    pub dtype: String,
    /// On the CPU, multiply in bfloat16 with f32 sums inside the f32 convolutions and linear
    /// layers, as `vt-serve --bf16-products` does (CPUs with AVX512-BF16). The report's
    /// default name then ends in -bf16-products
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub bf16_products: bool,
}

/// Where a checkpoint runs over a split, and in what batches: `eval`'s and `calibrate`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct ComputeArgs {
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images per forward pass
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Compute threads [default: all cores]
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
}

impl ComputeArgs {
    /// Sets the compute threads (before candle's first parallel work reads them) and opens
    /// the device; returns it with the number of compute threads.
    pub fn start(&self) -> Result<(Device, usize)> {
        let compute = threads::set_compute_threads(self.threads);
        Ok((parse_device(&self.device)?, compute))
    }

    /// The evaluation batches of `model` on `device`, decoded by the cores `compute` leaves.
    pub fn loader(&self, model: &VtConfig, device: &Device, compute: usize) -> LoaderConfig {
        data::eval_loader(
            model,
            self.batch_size,
            threads::default_loader_threads(compute, device.is_cuda()),
        )
    }
}

impl EvalArgs {
    /// How the report's default name tells an evaluation in another precision from the f32
    /// one: "", "-f16", "-bf16", "-bf16-products".
    fn precision_suffix(&self) -> String {
        let mut suffix = String::new();
        if self.dtype != "f32" {
            suffix = format!("-{}", self.dtype);
        }
        if self.bf16_products {
            suffix.push_str("-bf16-products");
        }
        suffix
    }
}

/// How many of the most confident mistakes the report lists.
const MISTAKES_LISTED: usize = 10;

/// A wrong prediction, as the report lists it.
#[derive(Debug, Serialize)]
pub struct Mistake {
    #[serde(serialize_with = "serialize_path")]
    pub path: PathBuf,
    pub label: String,
    pub prediction: String,
    /// The probability of `prediction`.
    pub confidence: f32,
    /// The probability of `label`.
    pub label_probability: f32,
}

/// `vt-train eval --out FILE`.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    #[serde(serialize_with = "serialize_path")]
    pub checkpoint: PathBuf,
    #[serde(serialize_with = "serialize_path")]
    pub data: PathBuf,
    pub split: String,
    /// The precision evaluated in (`--dtype`): f32, f16 or bf16.
    pub dtype: String,
    /// Whether products were taken in bfloat16 (`--bf16-products`).
    pub bf16_products: bool,
    /// The checkpoint's temperature (`vt-train calibrate`), which divided the logits before
    /// their softmax; None (null): uncalibrated.
    pub temperature: Option<f32>,
    /// What trained the checkpoint, as its config.json records it (`vt-train train`'s
    /// epoch, validation scores, options and images). None (null): not recorded.
    pub training: Option<serde_json::Map<String, serde_json::Value>>,
    pub images: u64,
    pub loss: f64,
    pub accuracy: f64,
    /// The accuracy's 95 % Wilson score interval, [low, high].
    pub accuracy_ci95: [f64; 2],
    /// F1 averaged over the classes present in the labels or the predictions.
    pub macro_f1: f64,
    pub classes: Vec<ClassScores>,
    pub confusion_matrix: ConfusionMatrix,
    /// Evaluated images with a byte-identical copy in the training or validation split
    /// (`manifest.json`'s `duplicates`): the model may have been trained or selected on them.
    /// None (null): not known, the data having no manifest that lists duplicates.
    pub copies_in_other_splits: Option<Vec<PathBuf>>,
    /// Whether these are the validation images the checkpoint's run ranked its epochs on
    /// (its training record or its run's state lists them). None (null): not known (another
    /// split, `--limit`, no record, a run that validated on a subset).
    pub the_runs_validation_images: Option<bool>,
    /// How well the confidences match the accuracy (15 bins, as Guo et al.).
    pub calibration: Calibration,
    pub skipped: Vec<SkippedFile>,
    /// The CSV of every image's probabilities.
    #[serde(serialize_with = "serialize_path")]
    pub predictions: PathBuf,
    /// The wrong predictions with the highest confidence, most confident first.
    pub mistakes: Vec<Mistake>,
}

/// The data folder to evaluate `checkpoint` on: `data` (`--data`), else the one the
/// checkpoint's run trained on
/// (`data` in its `config.toml`, as written there: relative to where training ran, as a
/// resume reads it), else the default. A run's folder that is not there from here is
/// refused, naming `--data`: nothing records where a relative one was taken from.
pub fn data_folder(checkpoint: &Path, data: Option<&Path>) -> Result<PathBuf> {
    if let Some(data) = data {
        return Ok(data.to_path_buf());
    }
    let beside = outputs::resolved(checkpoint)
        .parent()
        .map(Path::to_path_buf);
    let run = outputs::run_keeping(checkpoint)
        .or(beside)
        .filter(|run| run.join(CONFIG_TOML).is_file());
    let Some(options) = run.map(|run| run.join(CONFIG_TOML)) else {
        return Ok(PathBuf::from(DEFAULT_DATA_DIR));
    };
    match TrainOptions::from_toml_file(&options) {
        Ok(TrainOptions {
            data: Some(data), ..
        }) => {
            if !data.is_dir() {
                return Err(TrainError::Config(format!(
                    "{} trained on the data folder {}, which is not there from {} (a relative \
                     one is relative to where training ran): give --data",
                    options.display(),
                    data.display(),
                    std::env::current_dir()
                        .map_or_else(|_| "here".to_string(), |d| d.display().to_string())
                )));
            }
            tracing::info!("--data {}: from {}", data.display(), options.display());
            Ok(data)
        }
        Ok(_) => Ok(PathBuf::from(DEFAULT_DATA_DIR)),
        Err(e) => {
            tracing::warn!("{e}: evaluating on {DEFAULT_DATA_DIR}; give --data to choose");
            Ok(PathBuf::from(DEFAULT_DATA_DIR))
        }
    }
}

fn default_out(checkpoint: &Path, split: Split, suffix: &str) -> PathBuf {
    let name = checkpoint.file_name().map_or_else(
        || "checkpoint".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    // An epoch a run keeps in `top/` is reported beside the run: `top/` holds only epochs.
    if let Some(run) = outputs::run_keeping(checkpoint) {
        return run.join(format!("eval-{TOP_DIR}-{name}-{split}{suffix}.json"));
    }
    let parent = checkpoint
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!("eval-{name}-{split}{suffix}.json"))
}

/// "trained N of M epochs in RUN (validation accuracy A %)", from a checkpoint's training
/// record; None for a record this vt-train does not read.
fn trained_line(record: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let record = TrainingRecord::read(record)?;
    let run = record
        .options
        .run_dir
        .map_or_else(String::new, |run| format!(" in {}", run.display()));
    let scored = match record.val_accuracy {
        Some(accuracy) => format!(" (validation accuracy {:.2}%)", 100.0 * accuracy),
        None => ", interrupted within the next one".into(),
    };
    Some(format!(
        "trained {} of {} epochs{run}{scored}\n",
        record.epoch, record.options.epochs
    ))
}

/// The report as text: accuracy, the per-class table, the confusion matrix and the most
/// confident mistakes.
pub fn report_text(report: &EvalReport) -> String {
    let width = report
        .classes
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(9);
    let mut precision = match (report.dtype.as_str(), report.bf16_products) {
        ("f32", false) => String::new(),
        (dtype, false) => format!(" in {dtype}"),
        (dtype, true) => format!(" in {dtype} with bfloat16 products"),
    };
    if let Some(t) = report.temperature {
        precision += &format!(", calibrated (temperature {t})");
    }
    let mut out = format!(
        "{} on {}{precision} ({} image{}): accuracy {:.2}% (95% interval {:.2}-{:.2}%), loss {:.4}, macro F1 {:.4}\n",
        report.checkpoint.display(),
        report.split,
        report.images,
        if report.images == 1 { "" } else { "s" },
        100.0 * report.accuracy,
        100.0 * report.accuracy_ci95[0],
        100.0 * report.accuracy_ci95[1],
        report.loss,
        report.macro_f1
    );
    if let Some(trained) = report.training.as_ref().and_then(trained_line) {
        out += &trained;
    }
    if !report.skipped.is_empty() {
        out += &format!(
            "note: {} more file(s) could not be read and are not counted (\"skipped\" in the \
             JSON report names each, with the reason)\n",
            report.skipped.len()
        );
    }
    out += &format!(
        "\n{:>width$} {:>9} {:>9} {:>9} {:>8}\n",
        "class", "precision", "recall", "f1", "support"
    );
    for c in &report.classes {
        out += &format!(
            "{:>width$} {:>9.4} {:>9.4} {:>9.4} {:>8}\n",
            c.class, c.precision, c.recall, c.f1, c.support
        );
    }
    match report.copies_in_other_splits.as_deref() {
        Some([]) => {}
        Some(copies) => {
            out += &format!(
                "\nnote: {} of these images have a byte-identical copy in a training or \
                 validation split (manifest.json \"duplicates\", listed in the JSON report): \
                 the model may have been trained or selected on them\n",
                copies.len()
            );
        }
        None => {
            out += "\nnote: not known whether these images have copies in a training or \
                    validation split: the data has no manifest.json that lists duplicates (an \
                    import by `cargo xtask fetch-data` of this version writes one)\n";
        }
    }
    if report.the_runs_validation_images == Some(false) {
        out += "\nnote: these are not the validation images the checkpoint's run ranked its \
                epochs on (was the data imported again, with another --seed or \
                --val-fraction?): some may be images it trained on, and the accuracy is then \
                not a held-out one\n";
    }
    let calibration = &report.calibration;
    out += &format!(
        "\ncalibration: expected error {:.2}% over {} confidence bins, mean confidence {} accuracy by {:.2} points\n",
        100.0 * calibration.ece,
        calibration.bins.len(),
        if calibration.overconfidence() >= 0.0 { "above" } else { "below" },
        100.0 * calibration.overconfidence().abs()
    );
    out += "\nconfusion matrix (rows: true class, columns: prediction)\n";
    out += &report.confusion_matrix.to_text();
    let matrix = &report.confusion_matrix;
    let wrong = matrix.total() - matrix.correct();
    if report.mistakes.is_empty() {
        out += "\nmost confident mistakes: none, every image is classified correctly\n";
    } else {
        out += &format!(
            "\nmost confident mistakes ({} of {wrong} wrong)\n",
            report.mistakes.len()
        );
        for m in &report.mistakes {
            out += &format!(
                "  {}: {} -> {} ({:.1}%)\n",
                m.path.display(),
                m.label,
                m.prediction,
                100.0 * m.confidence
            );
        }
    }
    out
}

/// The columns of the predictions CSV before each class's probability.
const PREDICTION_COLUMNS: [&str; 6] = [
    "path",
    "label",
    "prediction",
    "confidence",
    "label_probability",
    "correct",
];

/// The per-image predictions as CSV: [`PREDICTION_COLUMNS`], then `p_<class>` per class;
/// one row per prediction, in their order.
fn prediction_rows(
    predictions: &[Prediction],
    samples: &[(PathBuf, usize)],
    classes: &[String],
) -> Vec<Vec<String>> {
    let mut header: Vec<String> = PREDICTION_COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    let mut rows = vec![header];
    for p in predictions {
        let mut row = vec![
            path_text(&samples[p.index].0),
            classes[p.label].clone(),
            classes[p.predicted].clone(),
            // Every digit the f32 holds: a confident mistake's small label probability
            // ranks mistakes (as fastai's top losses) where 6 decimals would print 0.
            p.confidence().to_string(),
            p.label_probability().to_string(),
            p.correct().to_string(),
        ];
        row.extend(p.probabilities.iter().map(|q| q.to_string()));
        rows.push(row);
    }
    rows
}

/// The evaluated images that the data set's manifest lists with a copy in a split the model
/// is trained or selected on (train or val, other than the one evaluated). None for data
/// without a manifest, or with one from before imports listed duplicates: not known.
fn copies_in_other_splits(
    data: &Path,
    split: Split,
    samples: &[(PathBuf, usize)],
) -> Option<Vec<PathBuf>> {
    let manifest = match Manifest::read(data) {
        Ok(manifest) => manifest,
        // A folder of class folders without a manifest: nothing looked.
        Err(vt_data::DataError::NotFetched { .. }) => return None,
        Err(e) => {
            tracing::warn!("{e}: the images with copies in other splits are not listed");
            return None;
        }
    };
    let duplicates = manifest.duplicates?;
    let prefix = format!("{}/", split.dir_name());
    let seen = [Split::Train, Split::Val]
        .into_iter()
        .filter(|&s| s != split)
        .map(|s| format!("{}/", s.dir_name()))
        .collect::<Vec<_>>();
    let copied: HashSet<PathBuf> = duplicates
        .iter()
        .filter(|group| {
            group
                .files
                .iter()
                .any(|f| seen.iter().any(|s| f.starts_with(s)))
        })
        .flat_map(|group| group.files.iter().filter(|f| f.starts_with(&prefix)))
        .map(|f| data.join(f))
        .collect();
    let copies = samples
        .iter()
        .filter(|(path, _)| copied.contains(path))
        .map(|(path, _)| path.clone())
        .collect();
    Some(copies)
}

/// `split` of `data` (a random `limit` of its images), labelled with `classes`, the model's:
/// refused when the split has a class the model lacks.
pub fn open_labelled(
    data: &Path,
    split: Split,
    limit: Option<usize>,
    classes: &[String],
) -> Result<ImageFolder> {
    let folder = data::open_split(data, split, limit, 0)
        .with_context(|| format!("reading the {split} split of {}", data.display()))?;
    let found = folder.classes.clone();
    labelled_as_the_model(folder, classes).ok_or_else(|| {
        TrainError::Config(format!(
            "the checkpoint's classes {classes:?} differ from the split's {found:?} ({})",
            data.join(split.dir_name()).display()
        ))
    })
}

/// `folder` with the model's class names and labels, when all its classes are the model's: a
/// split in torchvision's layout without a folder for a class that has no images there is
/// labelled by name, not by its folders' order. None when a class is not the model's.
fn labelled_as_the_model(folder: ImageFolder, classes: &[String]) -> Option<ImageFolder> {
    if folder.classes == classes {
        return Some(folder);
    }
    let label_of: Vec<usize> = folder
        .classes
        .iter()
        .map(|name| classes.iter().position(|c| c == name))
        .collect::<Option<_>>()?;
    Some(ImageFolder {
        classes: classes.to_vec(),
        samples: folder
            .samples
            .into_iter()
            .map(|(path, label)| (path, label_of[label]))
            .collect(),
    })
}

/// Whether `folder`, the whole validation split, holds the images the checkpoint's run
/// validated on, as the checkpoint's training record lists them (or, for a checkpoint
/// written before records, its run's state): a data folder imported again since (another
/// `--seed` or `--val-fraction`) files under val/ photos the run trained on. None when it
/// cannot be told.
fn the_runs_validation_images(
    args: &EvalArgs,
    config: &VtConfig,
    split: Split,
    data: &Path,
    folder: &ImageFolder,
) -> Option<bool> {
    if split != Split::Val || args.limit.is_some() {
        return None;
    }
    let (options, images) = match TrainingRecord::of(config) {
        Some(record) => (record.options, record.images),
        None => {
            let checkpoint = outputs::resolved(&args.checkpoint);
            let beside = checkpoint.parent().filter(|run| outputs::is_run(run));
            let run =
                outputs::run_keeping(&args.checkpoint).or_else(|| beside.map(Path::to_path_buf))?;
            let progress = state::read_saved_progress(&run).ok()?;
            (progress.config, progress.data)
        }
    };
    if options.limit_val.is_some() {
        return None;
    }
    Some(data::ImagesUsed::of(folder, data) == images?.val)
}

/// Where `vt-train eval` writes.
struct OutputPaths {
    report: PathBuf,
    /// The confusion matrix and the reliability diagram, beside the report.
    png: PathBuf,
    /// The per-image predictions, beside the report.
    csv: PathBuf,
}

/// The report's path and those of the plots' PNG and the predictions CSV beside
/// it. Refused before any work: a path that is a folder (or anything but a file), a file
/// that no evaluation wrote ([`outputs::refuse_replacing`]), a folder that holds a
/// checkpoint, that a run manages or that holds data ([`outputs::refuse_managed_folder`]);
/// and for a given --out, one whose PNG or CSV would replace the report, or whose folder is
/// missing.
fn output_paths(args: &EvalArgs, split: Split) -> Result<OutputPaths> {
    // `.` and `..` name no folder to put the report beside: the folder they stand for does.
    let checkpoint = match args.checkpoint.file_name() {
        Some(_) => args.checkpoint.clone(),
        None => std::fs::canonicalize(&args.checkpoint)
            .map_err(|e| TrainError::file_op("--checkpoint", &args.checkpoint, e))?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out(&checkpoint, split, &args.precision_suffix()));
    let paths = OutputPaths {
        png: out.with_extension("png"),
        csv: out.with_extension("csv"),
        report: out,
    };
    let out = &paths.report;
    for path in [&paths.report, &paths.png, &paths.csv] {
        if path.exists() && !path.is_file() {
            return Err(TrainError::Config(format!(
                "--out {}: {} is there and is not a file; choose another --out",
                out.display(),
                path.display()
            )));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let option = if args.out.is_none() {
        "the report"
    } else {
        "--out"
    };
    if args.out.is_none() {
        outputs::refuse_managed_folder(option, out, parent)?;
        refuse_replacing_others(&paths, option)?;
        outputs::refuse_unwritable_folder(option, out, parent)?;
        return Ok(paths);
    }
    for (beside, what, extension) in [
        (&paths.png, "the plots are", "png"),
        (&paths.csv, "the per-image predictions are", "csv"),
    ] {
        // Compared without case: on a case-insensitive file system R.PNG is r.png.
        if beside
            .to_string_lossy()
            .eq_ignore_ascii_case(&out.to_string_lossy())
        {
            return Err(TrainError::Config(format!(
                "--out {}: the report is JSON and {what} written beside it with a \
                 .{extension} extension; give the report another extension (e.g. .json)",
                out.display()
            )));
        }
    }
    let parent = outputs::existing_folder_of("--out", out)?;
    outputs::refuse_managed_folder(option, out, parent)?;
    refuse_replacing_others(&paths, option)?;
    outputs::refuse_unwritable_folder(option, out, parent)?;
    Ok(paths)
}

/// Refuses outputs that would replace files no evaluation wrote; an earlier evaluation's
/// are replaced. The CSV is written first, so a killed one may have left it (and the PNG)
/// without the report.
fn refuse_replacing_others(paths: &OutputPaths, option: &str) -> Result<()> {
    // Reports of every vt version have a confusion matrix (the CSV came later).
    let report_ours = outputs::is_json_with(&paths.report, &["confusion_matrix"]);
    let csv_ours = outputs::starts_with(&paths.csv, &(PREDICTION_COLUMNS.join(",") + ","));
    outputs::refuse_replacing(
        option,
        &paths.report,
        &[
            (&paths.report, report_ours),
            (&paths.csv, csv_ours),
            (&paths.png, report_ours || csv_ours),
        ],
    )
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if args.limit == Some(0) {
        return Err(TrainError::Config(
            "--limit 0: evaluate at least 1 image, or leave --limit out for all".into(),
        ));
    }
    let split = Split::from(args.split);
    // Before the report's path is made from it: a file given names the mistake.
    vt_model::checkpoint::refuse_non_checkpoint(&args.checkpoint)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let paths = output_paths(args, split)?;
    let (device, compute) = args.compute.start()?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    use_bf16_products(args.bf16_products, &device, dtype)?;
    let model = Model::load_as(&args.checkpoint, &device, dtype)
        .and_then(Model::into_frozen)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let data = data_folder(&args.checkpoint, args.data.as_deref())?;
    let folder = open_labelled(&data, split, args.limit, &model.config.class_names)?;
    let loader = args.compute.loader(&model.config, &device, compute);
    let eval = evaluate(
        &model,
        &folder.samples,
        &loader,
        &folder.classes,
        &format!("eval {split}"),
    )?;
    let not_finite = eval
        .predictions
        .iter()
        .find(|p| p.logits.iter().any(|l| !l.is_finite()));
    if let Some(p) = not_finite {
        let hint = match dtype {
            DType::F16 => ": its activations overflowed f16's range; evaluate with --dtype f32",
            _ => "",
        };
        return Err(TrainError::Config(format!(
            "the model's logits for {} ({split} split) are not finite (NaN or infinite){hint}",
            folder.samples[p.index].0.display()
        )));
    }
    if !eval.loss.is_finite() {
        let largest = eval
            .predictions
            .iter()
            .flat_map(|p| &p.logits)
            .fold(0f32, |m, l| m.max(l.abs()));
        return Err(TrainError::Config(format!(
            "the loss on the {split} split is not finite although every logit is: logits as \
             large as {largest:e} overflow f32 in the loss's log-softmax (damaged weights?)"
        )));
    }
    let classes = eval.matrix.scores();
    let macro_f1 = eval.matrix.macro_f1();
    let mistakes = most_confident_mistakes(&eval.predictions, MISTAKES_LISTED)
        .into_iter()
        .map(|p| Mistake {
            path: folder.samples[p.index].0.clone(),
            label: folder.classes[p.label].clone(),
            prediction: folder.classes[p.predicted].clone(),
            confidence: p.confidence(),
            label_probability: p.label_probability(),
        })
        .collect();
    let report = EvalReport {
        checkpoint: args.checkpoint.clone(),
        data: data.clone(),
        split: split.to_string(),
        dtype: args.dtype.clone(),
        bf16_products: args.bf16_products,
        temperature: model.config.temperature,
        training: model.config.training.clone(),
        images: eval.matrix.total(),
        loss: eval.loss,
        accuracy: eval.matrix.accuracy(),
        accuracy_ci95: {
            let (low, high) = eval.matrix.accuracy_interval();
            [low, high]
        },
        macro_f1,
        classes,
        calibration: Calibration::of(&eval.predictions, calibration::BINS),
        copies_in_other_splits: copies_in_other_splits(&data, split, &folder.samples),
        the_runs_validation_images: the_runs_validation_images(
            args,
            &model.config,
            split,
            &data,
            &folder,
        ),
        confusion_matrix: eval.matrix,
        skipped: eval.skipped,
        predictions: paths.csv.clone(),
        mistakes,
    };
    print!("{}", report_text(&report));
    let json = serde_json::to_string_pretty(&report).map_err(|cause| TrainError::JsonWrite {
        path: paths.report.clone(),
        cause,
    })?;
    // The report is the mark of a complete evaluation: `compare` reads the CSV beside it.
    let rows = prediction_rows(&eval.predictions, &folder.samples, &folder.classes);
    let mut staged = vec![stage_csv(&paths.csv, &rows)?];
    let title = format!(
        "{} on {split}: {:.2}%",
        args.checkpoint.display(),
        100.0 * report.accuracy
    );
    // A picture is a convenience: one that cannot be drawn (more classes than pixels)
    // leaves the numbers written, and no earlier evaluation's picture beside them. One that
    // cannot be written (a full disk) fails the evaluation, which replaces nothing then.
    let mut gone = Vec::new();
    match stage_evaluation(
        &paths.png,
        &report.confusion_matrix,
        &report.calibration,
        &title,
    ) {
        Ok(picture) => staged.push(picture),
        Err(e @ TrainError::Plot { .. }) => {
            tracing::warn!("{e}");
            gone.push(paths.png.as_path());
        }
        Err(e) => return Err(e),
    }
    let drawn = gone.is_empty();
    outputs::write_with_report(&paths.report, format!("{json}\n").as_bytes(), staged, &gone)?;
    if drawn {
        eprintln!(
            "wrote {}, {} and {}",
            paths.report.display(),
            paths.csv.display(),
            paths.png.display()
        );
    } else {
        eprintln!(
            "wrote {} and {}",
            paths.report.display(),
            paths.csv.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split without a folder for one of the model's classes keeps each image's class by
    /// name; a class the model does not know is refused.
    #[test]
    fn a_split_lacking_classes_is_labelled_by_name() {
        let classes = ["forest", "sea", "street"].map(String::from).to_vec();
        let split = ImageFolder {
            classes: vec!["sea".into(), "street".into()],
            samples: vec![("a.jpg".into(), 0), ("b.jpg".into(), 1)],
        };
        let labelled = labelled_as_the_model(split, &classes).unwrap();
        assert_eq!(labelled.classes, classes);
        assert_eq!(labelled.samples, [("a.jpg".into(), 1), ("b.jpg".into(), 2)]);
        let unknown = ImageFolder {
            classes: vec!["Sea".into()],
            samples: Vec::new(),
        };
        assert!(labelled_as_the_model(unknown, &classes).is_none());
    }

    #[test]
    fn mistakes_rank_by_confidence_without_the_correct_ones() {
        let predictions = [
            prediction(0, 0, &[0.1, 0.9]),
            prediction(1, 1, &[0.05, 0.95]), // right: never listed
            prediction(2, 1, &[0.7, 0.3]),
            prediction(3, 0, &[0.3, 0.7]),
            Prediction {
                predicted: 1,
                ..prediction(4, 0, &[f32::NAN, f32::NAN])
            },
            prediction(5, 1, &[0.99, 0.01]),
        ];
        let ranked = |n| -> Vec<usize> {
            most_confident_mistakes(&predictions, n)
                .iter()
                .map(|p| p.index)
                .collect()
        };
        // 0.99, 0.9, then the two at 0.7 in sample order; a diverged image last.
        assert_eq!(ranked(10), [5, 0, 2, 3, 4]);
        assert_eq!(ranked(2), [5, 0]);
        assert!(ranked(0).is_empty());
        let right = [prediction(0, 1, &[0.2, 0.8])];
        assert!(most_confident_mistakes(&right, 10).is_empty());
    }

    #[test]
    fn the_predictions_csv_quotes_paths_and_classes() {
        let classes = vec!["a,b".to_string(), "c".to_string()];
        let samples = vec![
            (PathBuf::from("x/one.jpg"), 1),
            (PathBuf::from("x/\"two\".jpg"), 0),
        ];
        let rows = prediction_rows(
            &[
                prediction(0, 1, &[0.25, 0.75]),
                prediction(1, 0, &[0.4, 0.6]),
            ],
            &samples,
            &classes,
        );
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("predictions.csv");
        crate::metrics::write_csv_atomically(&csv, &rows).unwrap();
        assert_eq!(
            std::fs::read_to_string(&csv).unwrap(),
            "path,label,prediction,confidence,label_probability,correct,\"p_a,b\",p_c\n\
             x/one.jpg,c,c,0.75,0.75,true,0.25,0.75\n\
             \"x/\"\"two\"\".jpg\",\"a,b\",c,0.6,0.4,false,0.4,0.6\n"
        );
    }
}
