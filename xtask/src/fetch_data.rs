//! `cargo xtask fetch-data`: a thin command line over `vt_data::fetch`.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use vt_data::dataset::Manifest;
use vt_data::fetch::{self, FetchOptions, FetchSource};
use vt_data::hf::{HfOptions, HfRepoSpec};
use vt_data::source::synthetic::SyntheticConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// A Hugging Face dataset repository (default; see --hf-repo).
    Hf,
    /// Kaggle's puneet6060/intel-image-classification (needs a Kaggle API token).
    Kaggle,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the data set goes (replaced atomically when it is a previous import).
    #[arg(long, default_value = fetch::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Network source, when neither --from nor --synthetic is given.
    #[arg(long, value_enum, conflicts_with_all = ["from", "synthetic"])]
    source: Option<Source>,
    /// Import a local zip or extracted folder in the Kaggle layout instead of downloading.
    #[arg(long, value_name = "PATH", conflicts_with = "synthetic")]
    from: Option<PathBuf>,
    /// Generate a small synthetic 6-class data set (offline demos and tests).
    #[arg(long)]
    synthetic: bool,
    /// Training images per class for --synthetic.
    #[arg(long, default_value_t = SyntheticConfig::default().train_per_class, requires = "synthetic")]
    synthetic_per_class: usize,
    /// Hugging Face dataset repository, OWNER/NAME[@REVISION].
    #[arg(long, value_name = "OWNER/NAME[@REV]")]
    hf_repo: Option<String>,
    /// Fraction of each class of seg_train held out for validation.
    #[arg(long, default_value_t = fetch::DEFAULT_VAL_FRACTION)]
    val_fraction: f64,
    /// Seed of the train/val split (and of --synthetic).
    #[arg(long, default_value_t = fetch::DEFAULT_SEED)]
    seed: u64,
    /// Where downloaded archives are kept for re-runs [default: <data dir>/../.downloads].
    #[arg(long)]
    download_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let source = if let Some(path) = args.from.clone() {
        FetchSource::Path(path)
    } else if args.synthetic {
        FetchSource::Synthetic(SyntheticConfig {
            train_per_class: args.synthetic_per_class,
            seed: args.seed,
            ..SyntheticConfig::default()
        })
    } else {
        match args.source.unwrap_or(Source::Hf) {
            Source::Hf => {
                let repo = match &args.hf_repo {
                    Some(spec) => spec.parse::<HfRepoSpec>()?,
                    None => HfRepoSpec::default(),
                };
                FetchSource::HuggingFace(HfOptions {
                    repo,
                    ..HfOptions::default()
                })
            }
            Source::Kaggle => FetchSource::Kaggle {
                endpoint: None,
                credentials: None,
            },
        }
    };
    let opts = FetchOptions {
        data_dir: args.data_dir.clone(),
        source,
        val_fraction: args.val_fraction,
        seed: args.seed,
        download_dir: args.download_dir,
    };
    let manifest = fetch::fetch(&opts)
        .with_context(|| format!("fetch-data into {} failed", args.data_dir.display()))?;
    report(&args.data_dir, &manifest);
    Ok(())
}

fn report(data_dir: &std::path::Path, m: &Manifest) {
    let total = |split: vt_data::dataset::Split| m.count(split);
    println!(
        "imported {} ({}) into {}",
        m.source,
        m.origin,
        data_dir.display()
    );
    println!("classes: {}", m.classes.join(", "));
    for split in vt_data::dataset::Split::ALL {
        let per_class: Vec<String> = m
            .classes
            .iter()
            .map(|c| format!("{c} {}", m.split_counts(split).get(c).copied().unwrap_or(0)))
            .collect();
        println!(
            "{split:>5}: {:>6}  ({})",
            total(split),
            per_class.join(", ")
        );
    }
    println!(" pred: {:>6}", m.splits.pred);
    if total(vt_data::dataset::Split::Test) == 0 {
        println!("note: the source has no seg_test images, so the test split is empty");
    }
    if !m.skipped.is_empty() {
        println!("skipped {} file(s):", m.skipped.len());
        for s in m.skipped.iter().take(20) {
            println!("  {}: {}", s.path, s.reason);
        }
        if m.skipped.len() > 20 {
            println!("  … see {}/manifest.json", data_dir.display());
        }
    }
}
