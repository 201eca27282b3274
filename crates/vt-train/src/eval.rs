//! Evaluation: the validation pass of training and `vt-train eval` (accuracy, per-class
//! precision/recall/F1, confusion matrix as text, JSON and PNG).

use std::path::{Path, PathBuf};

use serde::Serialize;
use vt_data::dataset::Split;
use vt_data::loader::{batches, LoaderConfig, SkippedFile};
use vt_model::{parse_device, Model};

use crate::data;
use crate::error::{Result, ResultExt, TrainError};
use crate::loss::{cross_entropy, predictions};
use crate::metrics::{write_atomically, ClassScores, ConfusionMatrix};
use crate::plots::draw_confusion;
use crate::progress::EpochProgress;
use crate::threads;

pub struct Evaluation {
    /// Mean cross-entropy (no label smoothing) over the images.
    pub loss: f64,
    pub matrix: ConfusionMatrix,
    pub skipped: Vec<SkippedFile>,
}

/// Runs `model` in eval mode over `samples`.
pub fn evaluate(
    model: &Model,
    samples: &[(PathBuf, usize)],
    loader: &LoaderConfig,
    classes: &[String],
    label: &str,
) -> Result<Evaluation> {
    let mut matrix = ConfusionMatrix::new(classes.to_vec());
    let mut loss_sum = 0.0;
    let mut iter = batches(samples, loader, 0, &model.device);
    let mut progress = EpochProgress::new(label, iter.len());
    for batch in iter.by_ref() {
        let batch = batch?;
        let logits = model.forward_t(&batch.images, false)?;
        let n = batch.indices.len();
        let loss = cross_entropy(&logits, &batch.labels, 0.0)?.to_scalar::<f32>()?;
        loss_sum += f64::from(loss) * n as f64;
        matrix.add(&batch.labels.to_vec1::<u32>()?, &predictions(&logits)?);
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
    Ok(Evaluation {
        loss: loss_sum / matrix.total() as f64,
        matrix,
        skipped: iter.skipped(),
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
    /// Data folder in the `cargo xtask fetch-data` layout
    #[arg(long, value_name = "DIR", default_value = vt_data::fetch::DEFAULT_DATA_DIR)]
    pub data: PathBuf,
    /// Split to evaluate
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// Report file (JSON, in an existing folder, not named .png); the confusion matrix PNG
    /// goes beside it with a .png extension [default: eval-<checkpoint>-<split>.json beside
    /// the checkpoint folder]
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images per forward pass
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Evaluate a random subset of N images
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `vt-train eval --out FILE`.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub split: String,
    pub images: u64,
    pub loss: f64,
    pub accuracy: f64,
    /// F1 averaged over the classes present in the labels or the predictions.
    pub macro_f1: f64,
    pub classes: Vec<ClassScores>,
    pub confusion_matrix: ConfusionMatrix,
    pub skipped: Vec<SkippedFile>,
}

fn default_out(checkpoint: &Path, split: Split) -> PathBuf {
    let name = checkpoint.file_name().map_or_else(
        || "checkpoint".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let parent = checkpoint
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!("eval-{name}-{split}.json"))
}

/// The report as text: accuracy, the per-class table and the confusion matrix.
pub fn report_text(report: &EvalReport) -> String {
    let width = report
        .classes
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(9);
    let mut out = format!(
        "{} on {} ({} images): accuracy {:.2}%, loss {:.4}, macro F1 {:.4}\n\n",
        report.checkpoint.display(),
        report.split,
        report.images,
        100.0 * report.accuracy,
        report.loss,
        report.macro_f1
    );
    out += &format!(
        "{:>width$} {:>9} {:>9} {:>9} {:>8}\n",
        "class", "precision", "recall", "f1", "support"
    );
    for c in &report.classes {
        out += &format!(
            "{:>width$} {:>9.4} {:>9.4} {:>9.4} {:>8}\n",
            c.class, c.precision, c.recall, c.f1, c.support
        );
    }
    out += "\nconfusion matrix (rows: true class, columns: prediction)\n";
    out += &report.confusion_matrix.to_text();
    out
}

/// The report's path and the confusion matrix PNG's beside it. A given --out is refused
/// before any work when the two would coincide, its folder is missing or is the checkpoint
/// folder (whose next save would refuse a folder holding other files; the default's folder
/// holds the checkpoint folder).
fn output_paths(args: &EvalArgs, split: Split) -> Result<(PathBuf, PathBuf)> {
    // `.` and `..` name no folder to put the report beside: the folder they stand for does.
    let checkpoint = match args.checkpoint.file_name() {
        Some(_) => args.checkpoint.clone(),
        None => std::fs::canonicalize(&args.checkpoint)
            .map_err(|e| TrainError::file_op("--checkpoint", &args.checkpoint, e))?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out(&checkpoint, split));
    let png = out.with_extension("png");
    if args.out.is_none() {
        return Ok((out, png));
    }
    // Compared without case: on a case-insensitive file system R.PNG is r.png.
    if png
        .to_string_lossy()
        .eq_ignore_ascii_case(&out.to_string_lossy())
    {
        return Err(TrainError::Config(format!(
            "--out {}: the report is JSON and the confusion matrix is written beside it with \
             a .png extension; give the report another extension (e.g. .json)",
            out.display()
        )));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(TrainError::Config(format!(
            "--out {}: the folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    if std::fs::canonicalize(parent).ok() == std::fs::canonicalize(&checkpoint).ok() {
        return Err(TrainError::Config(format!(
            "--out {}: the report would go into the checkpoint folder, which holds only the \
             checkpoint; write it beside it",
            out.display()
        )));
    }
    Ok((out, png))
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let split = Split::from(args.split);
    let (out, png) = output_paths(args, split)?;
    let compute = threads::set_compute_threads(args.threads);
    let device = parse_device(&args.device)?;
    let model = Model::load(&args.checkpoint, &device)
        .and_then(Model::into_frozen)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let folder = data::open_split(&args.data, split, args.limit, 0)
        .with_context(|| format!("reading the {split} split of {}", args.data.display()))?;
    if folder.classes != model.config.class_names {
        return Err(TrainError::Config(format!(
            "the checkpoint's classes {:?} differ from the data set's {:?} ({})",
            model.config.class_names,
            folder.classes,
            args.data.display()
        )));
    }
    let loader = data::eval_loader(
        &model.config,
        args.batch_size.max(1),
        threads::default_loader_threads(compute, device.is_cuda()),
    );
    let eval = evaluate(
        &model,
        &folder.samples,
        &loader,
        &folder.classes,
        &format!("eval {split}"),
    )?;
    let classes = eval.matrix.scores();
    let macro_f1 = eval.matrix.macro_f1();
    let report = EvalReport {
        checkpoint: args.checkpoint.clone(),
        data: args.data.clone(),
        split: split.to_string(),
        images: eval.matrix.total(),
        loss: eval.loss,
        accuracy: eval.matrix.accuracy(),
        macro_f1,
        classes,
        confusion_matrix: eval.matrix,
        skipped: eval.skipped,
    };
    print!("{}", report_text(&report));
    let json = serde_json::to_string_pretty(&report).map_err(|cause| TrainError::JsonWrite {
        path: out.clone(),
        cause,
    })?;
    write_atomically(&out, format!("{json}\n").as_bytes())?;
    let title = format!(
        "{} on {split}: {:.2}%",
        args.checkpoint.display(),
        100.0 * report.accuracy
    );
    draw_confusion(&png, &report.confusion_matrix, &title)?;
    eprintln!("wrote {} and {}", out.display(), png.display());
    Ok(())
}
