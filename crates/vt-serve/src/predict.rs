//! `vt-serve predict`: score image files offline, one JSON object per line per image, in
//! the order given, a folder's images in the order of their paths. An image that cannot be
//! read or decoded gets a line `{"image", "error"}` and the others are still scored; the
//! run then fails (exit status 1), saying how many failed.

use std::io::Write;
use std::path::PathBuf;

use fast_image_resize::Resizer;
use serde::Serialize;

use vt_data::decode::read_image_file;
use vt_data::image_files::{image_files, path_text};

use crate::args::DEFAULT_MAX_PIXELS;
use crate::classifier::{ClassifyError, Label};
use crate::state::{load_classifier, StartError};

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Checkpoint folder (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Device: cpu, cuda, cuda:N, or auto (the first GPU when built with CUDA, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Inference precision: f32, f16, or bf16 (bf16 on CUDA devices only).
    #[arg(long, default_value = "f32", value_parser = vt_model::DTYPE_NAMES)]
    pub dtype: String,
    /// On the CPU, multiply in bfloat16 with f32 sums inside the f32 convolutions and linear
    /// layers (CPUs with AVX512-BF16), as `vt-serve --bf16-products`; a value takes `=`
    /// (`--bf16-products=false`), since image paths follow.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub bf16_products: bool,
    /// How many of the best classes to list under "top".
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,
    /// Largest image in pixels (width x height), checked from the header before decoding.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Image files (JPEG, PNG, WebP, ...; the format is read from the content), or folders:
    /// their image files (by extension), subfolders included, in the order of their paths.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Failed<'a> {
    image: &'a str,
    error: String,
}

#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    logits: &'a [f32],
    probs: &'a [f32],
    top: Vec<Label>,
}

/// Why `predict` stopped, or why it exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Start(Box<StartError>),
    /// A failed forward pass (a GPU out of memory, say) stops the run: what the device holds
    /// afterwards cannot be trusted with the images after it.
    #[error("running the model on the {images} images from {first}: {cause}")]
    Model {
        images: usize,
        first: String,
        cause: Box<ClassifyError>,
    },
    #[error("the model returned fewer results than images")]
    MissingResults,
    #[error("writing the results: {0}")]
    Output(std::io::Error),
    #[error("{failed} of {total} images could not be scored (see their \"error\" lines)")]
    SomeFailed { failed: usize, total: usize },
    #[error("listing the images: {0}")]
    Images(vt_data::DataError),
}

impl From<StartError> for PredictError {
    fn from(e: StartError) -> Self {
        PredictError::Start(Box::new(e))
    }
}

pub fn run(args: &PredictArgs) -> Result<(), PredictError> {
    // Listed before the checkpoint is loaded: a mistyped folder fails at once.
    let images = image_files(&args.images).map_err(PredictError::Images)?;
    let (classifier, _) = load_classifier(
        &args.checkpoint,
        &args.device,
        &args.dtype,
        args.bf16_products,
    )?;
    let mut resizer = Resizer::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Of the images whose lines were written: a reader may stop early.
    let (mut failed, mut written) = (0, 0);
    'images: for chunk in images.chunks(args.batch_size as usize) {
        // The decoded images in order; each file's outcome says whether it is among them.
        let mut decoded = Vec::with_capacity(chunk.len());
        let outcomes: Vec<Result<(), String>> = chunk
            .iter()
            .map(|path| {
                let bytes =
                    read_image_file(path, args.max_pixels).map_err(|e| format!("reading {e}"))?;
                let input = classifier
                    .preprocess(&mut resizer, &bytes, args.max_pixels)
                    .map_err(|e| e.to_string())?;
                decoded.push(input);
                Ok(())
            })
            .collect();
        let mut predictions = classifier
            .predict(&decoded)
            .map_err(|cause| PredictError::Model {
                images: decoded.len(),
                first: chunk
                    .iter()
                    .zip(&outcomes)
                    .find_map(|(path, outcome)| outcome.is_ok().then(|| path.display().to_string()))
                    .unwrap_or_default(),
                cause: Box::new(cause),
            })?
            .into_iter();
        let dtype = classifier.model().dtype;
        for (path, outcome) in chunk.iter().zip(outcomes) {
            let image = path_text(path);
            let outcome = match outcome {
                Ok(()) => {
                    let p = predictions.next().ok_or(PredictError::MissingResults)?;
                    p.not_finite(dtype).map_or(Ok(p), Err)
                }
                Err(error) => Err(error),
            };
            let failure = outcome.is_err();
            let line = match outcome {
                Ok(p) => serde_json::to_string(&Line {
                    image: &image,
                    logits: &p.logits,
                    probs: &p.probs,
                    top: p.top(&classifier.config().class_names, args.top_k as usize),
                }),
                Err(error) => serde_json::to_string(&Failed {
                    image: &image,
                    error,
                }),
            };
            let line = line.map_err(|e| PredictError::Output(e.into()))?;
            match writeln!(out, "{line}") {
                // A reader that stopped early (`| head`) wants no more lines.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break 'images,
                result => result.map_err(PredictError::Output)?,
            }
            written += 1;
            failed += usize::from(failure);
        }
    }
    if failed > 0 {
        return Err(PredictError::SomeFailed {
            failed,
            total: written,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PredictArgs,
    }

    /// An image path right after `--bf16-products` is an image, not the flag's value.
    #[test]
    fn bf16_products_leaves_the_images_alone() {
        for (given, expected) in [
            (&["--bf16-products", "a.jpg"][..], true),
            (&["--bf16-products=false", "a.jpg"][..], false),
            // Read as vt-serve's VT_SERVE_BF16_PRODUCTS is.
            (&["--bf16-products=1", "a.jpg"][..], true),
            (&["--bf16-products=off", "a.jpg"][..], false),
            (&["a.jpg"][..], false),
        ] {
            let line = ["predict", "--checkpoint", "c"].iter().chain(given);
            let cli = Cli::try_parse_from(line).unwrap();
            assert_eq!(cli.args.bf16_products, expected, "{given:?}");
            assert_eq!(cli.args.images, [PathBuf::from("a.jpg")], "{given:?}");
        }
    }
}
