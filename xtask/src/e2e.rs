//! `cargo xtask e2e`: the whole user journey with the real binaries: fetch or import the
//! data, train a short run, evaluate on the test split, serve the best checkpoint on a free
//! local port, classify real test images over HTTP, check every answer against
//! `vt-serve predict`, stop the server and print a summary. Any failure names its step.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::ValueEnum;
use serde_json::Value;
use vt_data::fetch::{fetch, FetchOptions, FetchSource};
use vt_data::hf::HfOptions;
use vt_data::source::synthetic::SyntheticConfig;

use crate::cargo::{binary, build_binaries};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// The Hugging Face mirror (needs the hub).
    Hf,
    /// Kaggle's API (needs a Kaggle token).
    Kaggle,
    /// A generated data set: works offline.
    Synthetic,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the data comes from.
    #[arg(long, value_enum, default_value = "hf", conflicts_with = "from")]
    pub source: Source,
    /// Import a local zip or folder in the Kaggle layout instead (e.g. ../shared/data/intel-sample).
    #[arg(long, value_name = "PATH")]
    pub from: Option<PathBuf>,
    /// A small model and a few images: a check in minutes rather than a real training run.
    #[arg(long)]
    pub quick: bool,
    /// Working folder for the data and the run [default: target/e2e].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Training epochs [default: 1 with --quick, else 3].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Test images sent over HTTP.
    #[arg(long, default_value_t = 24)]
    pub requests: usize,
}

/// Timings of the steps, in order.
#[derive(Default)]
struct Steps(Vec<(&'static str, Duration)>);

impl Steps {
    fn run<T>(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        eprintln!("==> {name}");
        let start = Instant::now();
        let result = step().with_context(|| format!("e2e step `{name}` failed"))?;
        self.0.push((name, start.elapsed()));
        Ok(result)
    }
}

fn run_checked(command: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    ensure!(
        output.status.success(),
        "{shown} exited with {}",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A server process that is sent SIGTERM (and reaped) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(checkpoint: &Path) -> anyhow::Result<Server> {
        let mut child = Command::new(binary("vt-serve"))
            .arg("--checkpoint")
            .arg(checkpoint)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting vt-serve")?;
        let stdout = child.stdout.take().context("vt-serve stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(line) => {
                    let line = line.context("reading vt-serve output")?;
                    if let Some(url) = line.split("listening on ").nth(1) {
                        break url.trim().to_string();
                    }
                }
                None => bail!("vt-serve exited before listening ({:?})", child.wait()?),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Server { child, url })
    }

    /// SIGTERM, then the exit status: a graceful drain must exit 0.
    fn stop(mut self) -> anyhow::Result<()> {
        terminate(&self.child)?;
        let status = self.child.wait().context("waiting for vt-serve")?;
        ensure!(
            status.success(),
            "vt-serve exited with {status} after SIGTERM"
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = terminate(&self.child);
            let _ = self.child.wait();
        }
    }
}

fn terminate(child: &Child) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM {} failed", child.id());
    Ok(())
}

/// Labelled test images: `(path, class)` from the test split, else validation.
fn test_images(data: &Path, count: usize) -> anyhow::Result<(String, Vec<(PathBuf, String)>)> {
    for split in ["test", "val"] {
        let dir = data.join(split);
        let mut classes: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect(),
            Err(_) => continue,
        };
        classes.sort();
        let mut per_class: Vec<Vec<PathBuf>> = classes
            .iter()
            .map(|c| {
                let mut files: Vec<PathBuf> = std::fs::read_dir(c)
                    .map(|e| e.filter_map(|e| e.ok().map(|e| e.path())).collect())
                    .unwrap_or_default();
                files.sort();
                files
            })
            .collect();
        // Round-robin over classes so that every class is asked about.
        let mut picked = Vec::new();
        while picked.len() < count && per_class.iter().any(|f| !f.is_empty()) {
            for (class, files) in classes.iter().zip(per_class.iter_mut()) {
                if picked.len() < count && !files.is_empty() {
                    let name = class
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    picked.push((files.remove(0), name));
                }
            }
        }
        if !picked.is_empty() {
            return Ok((split.to_string(), picked));
        }
    }
    bail!(
        "{} has no labelled test or validation images",
        data.display()
    )
}

fn http_predictions(url: &str, images: &[(PathBuf, String)]) -> anyhow::Result<Vec<Value>> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    images
        .iter()
        .map(|(path, _)| {
            let body =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let response = client
                .post(format!("{url}/predict?top_k=100"))
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .with_context(|| format!("POST /predict {}", path.display()))?;
            let status = response.status();
            let json: Value = response
                .json()
                .with_context(|| format!("answer for {}", path.display()))?;
            ensure!(
                status.is_success(),
                "POST /predict {}: {status} {json}",
                path.display()
            );
            Ok(json)
        })
        .collect()
}

/// Each HTTP answer must list the same classes with the same probabilities as the offline
/// command; returns how many top-1 labels were right.
fn compare(images: &[(PathBuf, String)], http: &[Value], offline: &str) -> anyhow::Result<usize> {
    let offline: Vec<Value> = offline
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing vt-serve predict output")?;
    ensure!(
        offline.len() == images.len(),
        "vt-serve predict gave {} lines for {} images",
        offline.len(),
        images.len()
    );
    let mut correct = 0;
    for (((path, class), served), local) in images.iter().zip(http).zip(&offline) {
        let served = served["predictions"]
            .as_array()
            .context("no predictions in the HTTP answer")?;
        let local = local["top"]
            .as_array()
            .context("no top in the predict line")?;
        ensure!(
            served.len() == local.len(),
            "{}: {} vs {} classes",
            path.display(),
            served.len(),
            local.len()
        );
        for (s, l) in served.iter().zip(local) {
            let (sl, ll) = (&s["label"], &l["label"]);
            let (ss, ls) = (
                s["score"].as_f64().unwrap_or(f64::NAN),
                l["score"].as_f64().unwrap_or(f64::NAN),
            );
            ensure!(
                sl == ll && (ss - ls).abs() <= 1e-5,
                "{}: server says {sl} {ss}, vt-serve predict says {ll} {ls}",
                path.display()
            );
        }
        if served.first().and_then(|p| p["label"].as_str()) == Some(class.as_str()) {
            correct += 1;
        }
    }
    Ok(correct)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| crate::cargo::target_dir().join("e2e"));
    let data = work.join("data");
    let run_dir = work.join("run");
    let mut steps = Steps::default();

    steps.run("build", build_binaries)?;
    steps.run("fetch data", || {
        let source = match (&args.from, args.source) {
            (Some(path), _) => FetchSource::Path(path.clone()),
            (None, Source::Synthetic) => FetchSource::Synthetic(SyntheticConfig::default()),
            (None, Source::Hf) => FetchSource::HuggingFace(HfOptions::default()),
            (None, Source::Kaggle) => FetchSource::Kaggle {
                endpoint: None,
                credentials: None,
            },
        };
        fetch(&FetchOptions::new(&data, source)).map(drop).context(
            "no data: on a machine without the hub or Kaggle, use `--source synthetic` or \
             `--from PATH` (a Kaggle zip or an extracted folder)",
        )
    })?;

    let epochs = args.epochs.unwrap_or(if args.quick { 1 } else { 3 });
    steps.run("train", || {
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("clearing {}", run_dir.display()))?;
        }
        let mut train = Command::new(binary("vt-train"));
        train
            .arg("train")
            .arg("--data")
            .arg(&data)
            .arg("--run-dir")
            .arg(&run_dir);
        train.args(["--epochs", &epochs.to_string(), "--recipe", "modern"]);
        if args.quick {
            train.args([
                "--image-size",
                "48",
                "--tokens",
                "4",
                "--token-channels",
                "64",
                "--heads",
                "4",
            ]);
            train.args([
                "--batch-size",
                "16",
                "--limit-train",
                "192",
                "--limit-val",
                "48",
            ]);
        } else {
            train.args(["--image-size", "112", "--batch-size", "32"]);
        }
        run_checked(&mut train).map(drop)
    })?;

    let checkpoint = run_dir.join("best");
    let report_path = run_dir.join("eval-test.json");
    let (split, images) = test_images(&data, args.requests)?;
    let report: Value = steps.run("evaluate", || {
        let mut eval = Command::new(binary("vt-train"));
        eval.arg("eval")
            .arg("--checkpoint")
            .arg(&checkpoint)
            .arg("--data")
            .arg(&data);
        eval.args(["--split", &split])
            .arg("--out")
            .arg(&report_path);
        if args.quick {
            eval.args(["--limit", "96"]);
        }
        run_checked(&mut eval)?;
        let text = std::fs::read_to_string(&report_path)
            .with_context(|| format!("reading {}", report_path.display()))?;
        Ok(serde_json::from_str(&text)?)
    })?;

    let server = steps.run("start server", || Server::start(&checkpoint))?;
    let http = steps.run("predict over HTTP", || {
        http_predictions(&server.url, &images)
    })?;
    let url = server.url.clone();
    steps.run("stop server (SIGTERM)", || server.stop())?;
    let offline = steps.run("vt-serve predict", || {
        let mut predict = Command::new(binary("vt-serve"));
        predict
            .arg("predict")
            .arg("--checkpoint")
            .arg(&checkpoint)
            .args(["--top-k", "100"]);
        predict.args(images.iter().map(|(p, _)| p));
        run_checked(&mut predict)
    })?;
    let correct = steps.run("compare answers", || compare(&images, &http, &offline))?;

    println!("\ne2e passed");
    println!("  data:        {}", data.display());
    println!(
        "  run:         {} (metrics.jsonl, curves.png, confusion.png)",
        run_dir.display()
    );
    println!("  checkpoint:  {}", checkpoint.display());
    println!(
        "  evaluation:  {} split, {} images, accuracy {:.3}",
        report["split"].as_str().unwrap_or(&split),
        report["images"],
        report["accuracy"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "  served:      {url}: {} images, {correct} top-1 correct, all equal to vt-serve predict",
        images.len()
    );
    for (name, elapsed) in &steps.0 {
        println!("  {name:<22} {:>8.1} s", elapsed.as_secs_f64());
    }
    Ok(())
}
