//! `cargo xtask fetch-data`: a thin command line over `vt_data::fetch`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
    /// A generated 6-class stand-in, as --synthetic (the name `cargo xtask e2e` takes).
    Synthetic,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the data set goes (replaced atomically when it is a previous import).
    #[arg(long, default_value = fetch::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Network source, when neither --from nor --synthetic is given.
    #[arg(long, value_enum, conflicts_with_all = ["from", "synthetic"])]
    source: Option<Source>,
    /// Import a local zip or extracted folder in the Kaggle layout instead of downloading:
    /// seg_train/<class>/, optionally seg_test/<class>/ and seg_pred/ (your own images too).
    #[arg(long, value_name = "PATH", conflicts_with = "synthetic")]
    from: Option<PathBuf>,
    /// Generate a small synthetic 6-class data set (offline demos and tests).
    #[arg(long)]
    synthetic: bool,
    /// Images per class for --synthetic's seg_train, before --val-fraction of them become
    /// validation images (each class also gets 10 test images) [default: 50]
    #[arg(long)]
    synthetic_per_class: Option<usize>,
    /// Hugging Face dataset repository, OWNER/NAME[@REVISION]. Downloads are cached under
    /// HF_HOME; with HF_HUB_OFFLINE=1 the cached download is imported without the hub.
    #[arg(long, value_name = "OWNER/NAME[@REV]", conflicts_with_all = ["from", "synthetic"])]
    hf_repo: Option<String>,
    /// Fraction of each class of seg_train held out for validation.
    #[arg(long, default_value_t = fetch::DEFAULT_VAL_FRACTION)]
    val_fraction: f64,
    /// Seed of the train/val split (and of --synthetic).
    #[arg(long, default_value_t = fetch::DEFAULT_SEED)]
    seed: u64,
    /// Where the Kaggle zip is kept for re-runs, with --source kaggle [default: <data
    /// dir>/../.downloads].
    #[arg(long, conflicts_with_all = ["from", "synthetic"])]
    download_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // clap refuses --synthetic beside --source.
    let chosen = if args.synthetic {
        Source::Synthetic
    } else {
        args.source.unwrap_or(Source::Hf)
    };
    // Checked here, not by clap's `requires`: `--source synthetic` is synthetic too, and
    // `requires` takes the flag --synthetic's default for given.
    if args.synthetic_per_class.is_some() && chosen != Source::Synthetic {
        anyhow::bail!("--synthetic-per-class sizes the --synthetic data set: add --synthetic");
    }
    let source = if let Some(path) = args.from.clone() {
        FetchSource::Path(path)
    } else {
        match chosen {
            Source::Synthetic => {
                if args.hf_repo.is_some() || args.download_dir.is_some() {
                    anyhow::bail!(
                        "--hf-repo and --download-dir have no use with the synthetic data set"
                    );
                }
                let defaults = SyntheticConfig::default();
                FetchSource::Synthetic(SyntheticConfig {
                    train_per_class: args.synthetic_per_class.unwrap_or(defaults.train_per_class),
                    seed: args.seed,
                    ..defaults
                })
            }
            Source::Hf => {
                if args.download_dir.is_some() {
                    anyhow::bail!(
                        "--download-dir keeps the Kaggle zip; it has no use with the Hugging Face \
                         source, whose downloads are cached under HF_HOME (add --source kaggle \
                         to download from Kaggle)"
                    );
                }
                let repo = match &args.hf_repo {
                    Some(spec) => spec.parse::<HfRepoSpec>()?,
                    None => HfRepoSpec::default(),
                };
                FetchSource::HuggingFace(HfOptions {
                    repo,
                    ..HfOptions::default()
                })
            }
            Source::Kaggle => {
                if args.hf_repo.is_some() {
                    anyhow::bail!(
                        "--hf-repo names a Hugging Face repository; it has no use with --source \
                         kaggle"
                    );
                }
                FetchSource::Kaggle {
                    endpoint: None,
                    credentials: None,
                }
            }
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
    print_report(&mut io::stdout().lock(), &args.data_dir, &manifest)
}

/// Prints the summary; a reader that stopped early (`| head`) is not an error, the import is
/// done either way.
fn print_report(out: &mut impl Write, data_dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    match report(out, data_dir, m).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot print the import summary")
        }
        _ => Ok(()),
    }
}

/// The first 20 of a list of the manifest's, indented, and where the rest are.
fn write_first(
    out: &mut impl Write,
    lines: impl ExactSizeIterator<Item = String>,
    data_dir: &Path,
) -> io::Result<()> {
    const SHOWN: usize = 20;
    let more = lines.len() > SHOWN;
    for line in lines.take(SHOWN) {
        writeln!(out, "  {line}")?;
    }
    if more {
        writeln!(out, "  … see {}/manifest.json", data_dir.display())?;
    }
    Ok(())
}

fn report(out: &mut impl Write, data_dir: &Path, m: &Manifest) -> io::Result<()> {
    let total = |split: vt_data::dataset::Split| m.count(split);
    writeln!(
        out,
        "imported {} ({}) into {}",
        m.source,
        m.origin,
        data_dir.display()
    )?;
    writeln!(out, "classes: {}", m.classes.join(", "))?;
    for split in vt_data::dataset::Split::ALL {
        let per_class: Vec<String> = m
            .classes
            .iter()
            .map(|c| format!("{c} {}", m.split_counts(split).get(c).copied().unwrap_or(0)))
            .collect();
        let label = format!("{split}:");
        writeln!(
            out,
            "{label:<6} {:>6}  ({})",
            total(split),
            per_class.join(", ")
        )?;
    }
    writeln!(out, "{:<6} {:>6}", "pred:", m.splits.pred)?;
    if total(vt_data::dataset::Split::Test) == 0 {
        writeln!(
            out,
            "note: the source has no seg_test images, so the test split is empty"
        )?;
    }
    let duplicates = m.duplicates.as_deref().unwrap_or_default();
    if !duplicates.is_empty() {
        let conflicting = duplicates.iter().filter(|d| d.conflicting_labels).count();
        let leaking = duplicates.iter().filter(|d| d.leaks_into_test()).count();
        writeln!(
            out,
            "duplicates: {} image(s) filed more than once (identical bytes), {conflicting} of \
             them under different classes, {leaking} in the test split and in train or val; \
             copies in train stay out of val:",
            duplicates.len()
        )?;
        let lines = duplicates.iter().map(|d| {
            let note = if d.conflicting_labels {
                " (different classes)"
            } else {
                ""
            };
            format!("{}{note}", d.files.join(" = "))
        });
        write_first(out, lines, data_dir)?;
    }
    if !m.renamed.is_empty() {
        writeln!(
            out,
            "renamed {} file(s) (their characters, their format's extension, or a name taken):",
            m.renamed.len()
        )?;
        let lines = m.renamed.iter().map(|(to, from)| format!("{from} -> {to}"));
        write_first(out, lines, data_dir)?;
    }
    if !m.skipped.is_empty() {
        writeln!(out, "skipped {} file(s):", m.skipped.len())?;
        let lines = m
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.path, s.reason));
        write_first(out, lines, data_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    /// Options of one source are refused with another, not silently ignored.
    #[test]
    fn options_of_another_source_are_refused() {
        for argv in [
            &["fetch-data", "--from", "archive.zip", "--hf-repo", "o/n"][..],
            &["fetch-data", "--synthetic", "--hf-repo", "o/n"],
            &["fetch-data", "--from", "archive.zip", "--download-dir", "d"],
            &["fetch-data", "--synthetic", "--download-dir", "d"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
        let kaggle = Cli::try_parse_from(["fetch-data", "--source", "kaggle", "--hf-repo", "o/n"])
            .unwrap()
            .args;
        let err = run(kaggle).unwrap_err().to_string();
        assert!(err.contains("--hf-repo"), "{err}");
        for argv in [
            &["fetch-data", "--download-dir", "d"][..],
            &["fetch-data", "--source", "hf", "--download-dir", "d"],
            &["fetch-data", "--source", "synthetic", "--download-dir", "d"],
            &["fetch-data", "--source", "synthetic", "--hf-repo", "o/n"],
            &["fetch-data", "--from", "d", "--synthetic-per-class", "5"],
            &[
                "fetch-data",
                "--source",
                "kaggle",
                "--synthetic-per-class",
                "5",
            ],
        ] {
            let args = Cli::try_parse_from(argv).unwrap().args;
            let err = run(args).unwrap_err().to_string();
            let flag = argv[argv.len() - 2];
            assert!(err.contains(flag), "{argv:?}: {err}");
        }
    }
    use vt_data::dataset::SplitCounts;

    /// Accepts `room` bytes, then fails as a closed pipe or a full disk does.
    struct Closing {
        room: usize,
        kind: io::ErrorKind,
    }

    impl Write for Closing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(self.kind));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_ends_the_summary_quietly_other_write_errors_do_not() {
        let manifest = Manifest {
            source: "synthetic".into(),
            classes: vec!["forest".into()],
            splits: SplitCounts::default(),
            skipped: Vec::new(),
            val_fraction: 0.1,
            seed: 0,
            origin: "synthetic:seed=0".into(),
            duplicates: Some(Vec::new()),
            renamed: [("pred/7606.png".into(), "seg_pred/7606.jpg".into())].into(),
        };
        let dir = Path::new("data/intel");
        let mut pipe = Closing {
            room: 10,
            kind: io::ErrorKind::BrokenPipe,
        };
        assert!(print_report(&mut pipe, dir, &manifest).is_ok());
        let mut disk = Closing {
            room: 10,
            kind: io::ErrorKind::StorageFull,
        };
        assert!(print_report(&mut disk, dir, &manifest).is_err());
        let mut all = Vec::new();
        print_report(&mut all, dir, &manifest).unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(text.starts_with("imported synthetic"), "{text}");
        assert!(
            text.contains("renamed 1 file(s)")
                && text.contains("\n  seg_pred/7606.jpg -> pred/7606.png\n"),
            "{text}"
        );
        // The counts line up in one column.
        for line in [
            "train:      0",
            "val:        0",
            "test:       0",
            "pred:       0",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{line} in {text}"
            );
        }
    }
}
