//! `vt-train calibrate`: temperature scaling (Guo et al., "On Calibration of Modern Neural
//! Networks", 2017). The temperature that makes the validation split's labels most likely is
//! written, with the checkpoint's weights, as a new checkpoint whose probabilities vt-serve,
//! `eval`, `explain` and `export` then compute as softmax(logits / T).

use std::path::PathBuf;

use candle_core::Device;
use vt_data::dataset::Split;
use vt_model::config::TEMPERATURE_RANGE;
use vt_model::Model;

use crate::calibration::{self, Calibration};
use crate::error::{Result, ResultExt, TrainError};
use crate::eval::{data_folder, evaluate, open_labelled, ComputeArgs};
use crate::init::{check_out_dir, write_checkpoint};
use crate::outputs;

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// Checkpoint folder to calibrate (config.json + model.safetensors), e.g. runs/NAME/best
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Data folder whose validation split the temperature is fitted on [default: as `eval`:
    /// the data of the checkpoint's run, else data/intel]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Output checkpoint folder (new or empty): the checkpoint's weights, its config.json
    /// with the temperature
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the checkpoint that --out already holds (never a folder holding anything
    /// else)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(args: &CalibrateArgs) -> Result<()> {
    let loading = || format!("loading checkpoint {}", args.checkpoint.display());
    vt_model::checkpoint::refuse_non_checkpoint(&args.checkpoint).with_context(loading)?;
    let checkpoint = outputs::resolved(&args.checkpoint);
    if outputs::resolved(&args.out) == checkpoint {
        return Err(TrainError::Config(format!(
            "--out {} is the checkpoint calibrated: write the calibrated one beside it (e.g. \
             {}-calibrated), so that the two can be compared",
            args.out.display(),
            checkpoint.display()
        )));
    }
    check_out_dir(&args.out, args.force)?;
    let (device, compute) = args.compute.start()?;
    let model = Model::load(&args.checkpoint, &device)
        .and_then(Model::into_frozen)
        .with_context(loading)?;
    let data = data_folder(&args.checkpoint, args.data.as_deref())?;
    let folder = open_labelled(&data, Split::Val, None, &model.config.class_names)?;
    let loader = args.compute.loader(&model.config, &device, compute);
    let eval = evaluate(
        &model,
        &folder.samples,
        &loader,
        &folder.classes,
        "calibrate val",
    )?;
    let before = model.config.temperature.map_or(1.0, f64::from);
    let temperature = calibration::fit_temperature(&eval.predictions);
    let fitted = calibration::at_temperature(&eval.predictions, temperature);
    let (ece_before, ece_after) = (
        Calibration::of(&eval.predictions, calibration::BINS),
        Calibration::of(&fitted, calibration::BINS),
    );
    if eval.matrix.accuracy() == 1.0 {
        tracing::warn!(
            "every validation image is predicted right: the likelihood only grows as the \
             model grows surer, and the temperature fitted ({temperature:.4}) makes it certain \
             of everything; calibrate on a split with mistakes"
        );
    } else if [TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1]
        .iter()
        .any(|&end| (temperature / f64::from(end)).ln().abs() < 1e-3)
    {
        tracing::warn!(
            "the temperature {temperature:.4} is at the end of the range searched ({} to {}): \
             the validation split tells little of the model's confidence",
            TEMPERATURE_RANGE.0,
            TEMPERATURE_RANGE.1
        );
    }
    // The weights as the checkpoint holds them, not the frozen model's folded ones.
    let mut calibrated = Model::load(&args.checkpoint, &Device::Cpu).with_context(loading)?;
    // Within the range a checkpoint may hold, which f32's rounding of its ends may leave.
    let (lowest, highest) = TEMPERATURE_RANGE;
    calibrated.config.temperature = Some((temperature as f32).clamp(lowest, highest));
    write_checkpoint(&calibrated, &args.out)?;
    let images = eval.predictions.len();
    println!(
        "temperature {temperature:.4} fitted on the val split of {} ({images} image{}): \
         negative log-likelihood {:.4} -> {:.4}, expected calibration error {:.2}% -> {:.2}% \
         (mean confidence {:+.1} -> {:+.1} points from the accuracy)",
        data.display(),
        if images == 1 { "" } else { "s" },
        calibration::nll_at(&eval.predictions, before),
        calibration::nll_at(&eval.predictions, temperature),
        100.0 * ece_before.ece,
        100.0 * ece_after.ece,
        100.0 * ece_before.overconfidence(),
        100.0 * ece_after.overconfidence(),
    );
    Ok(())
}
