//! `cargo xtask bench data`: decode + augment + batch throughput of vt-data's loader on a
//! real image folder, with 1 and 2 worker threads (compare tools/reference/bench_data.py).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use vt_data::augment::AugmentConfig;
use vt_data::loader::{batches, LoaderConfig, Transform};
use vt_data::transform::Normalize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A folder of `<class>/<image>` (default: the shared sample's seg_train, beside the
    /// repository).
    #[arg(long)]
    images: Option<PathBuf>,
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Worker thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2", value_parser = crate::at_least_one)]
    threads: Vec<usize>,
    /// Batches loaded untimed before each measured pass (allocator and file cache warm-up,
    /// as every epoch after the first gets).
    #[arg(long, default_value_t = 10)]
    warmup_batches: usize,
}

fn class_folder(root: &Path) -> anyhow::Result<Vec<(PathBuf, usize)>> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut samples = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        samples.extend(files.into_iter().map(|p| (p, label)));
    }
    if samples.is_empty() {
        bail!("no images under {}", root.display());
    }
    Ok(samples)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let images = args
        .images
        .clone()
        .unwrap_or_else(|| crate::cargo::shared_sample("seg_train"));
    let samples = class_folder(&images)?;
    println!(
        "vt-data loader: {} images from {}, size {}, batch {}",
        samples.len(),
        images.display(),
        args.image_size,
        args.batch_size
    );
    for (name, transform) in [
        (
            "train",
            Transform::Train(AugmentConfig::notebook(args.image_size)),
        ),
        (
            "eval",
            Transform::Eval {
                image_size: args.image_size,
                norm: Normalize::IMAGENET,
            },
        ),
    ] {
        for &threads in &args.threads {
            let cfg = LoaderConfig {
                batch_size: args.batch_size,
                shuffle: true,
                drop_last: false,
                seed: 0,
                threads,
                prefetch: 4,
                transform: transform.clone(),
            };
            for batch in batches(&samples, &cfg, 1, &Device::Cpu).take(args.warmup_batches) {
                batch?;
            }
            let start = Instant::now();
            let mut images = 0;
            for batch in batches(&samples, &cfg, 0, &Device::Cpu) {
                images += batch?.indices.len();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "  {name:5} threads {threads}: {images} images in {secs:.2} s = {:.0} images/s",
                images as f64 / secs
            );
        }
    }
    Ok(())
}
