//! `vt-train export`: a checkpoint as an ONNX model (timm's `onnx_export.py`), to run in
//! ONNX Runtime and the servers built on it; the graph is [`vt_model::onnx`]'s.

use std::path::{Path, PathBuf};

use prost::Message;
use vt_model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use vt_model::onnx;

use crate::error::{Result, ResultExt, TrainError};
use crate::metrics::write_atomically;
use crate::outputs;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Checkpoint folder (config.json + model.safetensors), e.g. runs/NAME/best
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The ONNX file to write, e.g. model.onnx (not inside a checkpoint folder)
    #[arg(long, value_name = "FILE.onnx")]
    pub out: PathBuf,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    check_out_file(&args.out, &args.checkpoint, args.force)?;
    let model = onnx::export(&args.checkpoint)
        .with_context(|| format!("exporting checkpoint {}", args.checkpoint.display()))?;
    write_atomically(&args.out, &model.encode_to_vec())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} (ONNX opset {}, IR version {})",
        args.out.display(),
        onnx::OPSET,
        onnx::IR_VERSION
    );
    if let Some(graph) = &model.graph {
        for input in &graph.input {
            eprintln!("  input  {}", onnx::signature(input));
        }
        for output in &graph.output {
            eprintln!("  output {}", onnx::signature(output));
        }
    }
    eprintln!("  input preprocessing: {}", onnx::PREPROCESSING);
    Ok(())
}

/// Refuses an `--out` that exists (unless `force`) or that lies in a checkpoint folder (the
/// one exported, at any depth, or another): a checkpoint folder holding other files is one
/// that training no longer replaces; nor in a run's or the data's folders
/// ([`outputs::refuse_managed_folder`]).
fn check_out_file(out: &Path, checkpoint: &Path, force: bool) -> Result<()> {
    if out.is_dir() {
        return Err(TrainError::Config(format!(
            "--out {} is a folder: give the ONNX file to write, e.g. {}",
            out.display(),
            out.join("model.onnx").display()
        )));
    }
    // Triton's onnxruntime backend and ONNX tools look for the extension; another is most
    // likely a slip (`--out config.json`).
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
    {
        return Err(TrainError::Config(format!(
            "--out {}: the model is written in ONNX: name it FILE.onnx",
            out.display()
        )));
    }
    let parent = outputs::existing_folder_of("--out", out)?;
    let in_checkpoint = match (parent.canonicalize(), checkpoint.canonicalize()) {
        (Ok(parent), Ok(checkpoint)) => parent.starts_with(checkpoint),
        _ => false,
    };
    if in_checkpoint || parent.join(CONFIG_FILE).exists() || parent.join(WEIGHTS_FILE).exists() {
        return Err(TrainError::Config(format!(
            "--out {} is inside a checkpoint folder, which must hold only its checkpoint: \
             write it beside it instead",
            out.display()
        )));
    }
    outputs::refuse_managed_folder("--out", out, parent)?;
    // A link counts as there even when what it names is not.
    if out.symlink_metadata().is_ok() && !force {
        return Err(TrainError::Config(format!(
            "--out {} exists: choose another file, or add --force to replace it",
            out.display()
        )));
    }
    Ok(())
}
