//! `vt-serve predict`: score image files offline, one JSON object per line per image.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use fast_image_resize::Resizer;
use serde::Serialize;

use crate::classifier::{Classifier, Label};

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Checkpoint folder (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Inference precision: f32, f16, or bf16 (CUDA only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// On the CPU, multiply in bfloat16 with f32 sums inside the f32 convolutions and linear
    /// layers (CPUs with AVX512-BF16), as `vt-serve --bf16-products`.
    #[arg(long)]
    pub bf16_products: bool,
    /// How many of the best classes to list under "top".
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Image files (JPEG, PNG, WebP, ...; the format is read from the content).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    logits: &'a [f32],
    probs: &'a [f32],
    top: Vec<Label>,
}

pub fn run(args: &PredictArgs) -> anyhow::Result<()> {
    let device = vt_model::parse_device(&args.device)?;
    let dtype = vt_model::parse_dtype(&args.dtype, &device)?;
    vt_model::use_bf16_products(args.bf16_products, &device)?;
    let classifier = Classifier::load(&args.checkpoint, &device, dtype)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let mut resizer = Resizer::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for chunk in args.images.chunks(args.batch_size.max(1)) {
        let inputs = chunk
            .iter()
            .map(|path| {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                classifier
                    .preprocess(&mut resizer, &bytes, u64::MAX)
                    .with_context(|| format!("image {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let predictions = classifier.predict(&inputs).context("running the model")?;
        for (path, p) in chunk.iter().zip(&predictions) {
            let line = Line {
                image: &path.to_string_lossy(),
                logits: &p.logits,
                probs: &p.probs,
                top: p.top(&classifier.config().class_names, args.top_k),
            };
            serde_json::to_writer(&mut out, &line)?;
            writeln!(out)?;
        }
    }
    Ok(())
}
