//! `vt-train export`: a checkpoint as an ONNX model (timm's `onnx_export.py`), to run in
//! ONNX Runtime and the servers built on it; the graph is [`vt_model::onnx`]'s.

use std::path::{Path, PathBuf};

use prost::Message;
use vt_model::onnx;

use crate::error::{Result, ResultExt, TrainError};
use crate::metrics::write_atomically;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Checkpoint folder (config.json + model.safetensors), e.g. runs/NAME/best
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The ONNX file to write, e.g. model.onnx (not inside the checkpoint folder)
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

/// Refuses an `--out` that exists (unless `force`) or that lies in the checkpoint folder:
/// a checkpoint folder holding other files is one that training no longer replaces.
fn check_out_file(out: &Path, checkpoint: &Path, force: bool) -> Result<()> {
    if out.is_dir() {
        return Err(TrainError::Config(format!(
            "--out {} is a folder: give the ONNX file to write, e.g. {}",
            out.display(),
            out.join("model.onnx").display()
        )));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(parent), Ok(checkpoint)) = (parent.canonicalize(), checkpoint.canonicalize()) {
        if parent == checkpoint {
            return Err(TrainError::Config(format!(
                "--out {} is inside the checkpoint folder, which must hold only the \
                 checkpoint: write it beside it instead",
                out.display()
            )));
        }
    }
    if out.exists() && !force {
        return Err(TrainError::Config(format!(
            "--out {} exists: choose another file, or add --force to replace it",
            out.display()
        )));
    }
    Ok(())
}
