//! `cargo xtask e2e`: the whole user journey with the real binaries: fetch or import the
//! data, train a short run, evaluate on the test split (the validation split where the data
//! has none), serve the best checkpoint on a free local port, classify labelled images of
//! that split over HTTP, check every answer against
//! `vt-serve predict`, stop the server and print a summary. Any failure names its step.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, ErrorKind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use clap::ValueEnum;
use serde_json::{json, Value};
use vt_data::error::DataError;
use vt_data::fetch::{default_download_dir, fetch, FetchOptions, FetchSource};
use vt_data::hf::HfOptions;
use vt_data::kaggle::{KaggleCredentials, ZIP_NAME};
use vt_data::source::synthetic::SyntheticConfig;
use vt_train::metrics::METRICS_JSONL;
use vt_train::state::STATE_DIR;
use vt_train::train::{CONFIG_TOML, LOCK_FILE};

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
    #[arg(long, value_parser = crate::at_least_one)]
    pub epochs: Option<usize>,
    /// Test images sent over HTTP.
    #[arg(long, default_value_t = 24, value_parser = crate::at_least_one)]
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
        let program = binary("vt-serve")?;
        let mut child = Command::new(&program)
            .arg("--checkpoint")
            .arg(checkpoint)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model-name",
                MODEL_NAME,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
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
                None => {
                    let status = child
                        .wait()
                        .context("waiting for vt-serve, which closed its output")?;
                    bail!("vt-serve exited before listening ({status})")
                }
            }
        };
        // Its stdout is read here, so the address is echoed while the server is in use.
        eprintln!("    vt-serve listening on {url}");
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
        .status()
        .with_context(|| format!("running `kill -TERM {}`", child.id()))?;
    ensure!(status.success(), "kill -TERM {} failed", child.id());
    Ok(())
}

/// What a network source's failure adds to vt-data's message.
const NO_NETWORK_DATA: &str = "no data: on a machine without the hub or Kaggle, use \
    `--source synthetic` or `--from PATH` (a Kaggle zip or an extracted folder)";

/// vt-data's messages name fetch-data's flags: e2e spells them differently, and only a
/// network failure calls for the offline alternatives.
fn in_e2e_terms(e: DataError) -> anyhow::Error {
    let network = matches!(e, DataError::Network { .. });
    let error = anyhow!(e
        .to_string()
        .replace("--synthetic", "--source synthetic")
        .replace("--data-dir", "--work-dir"));
    if network {
        error.context(NO_NETWORK_DATA)
    } else {
        error
    }
}

/// Kaggle's download into `data`, its credentials found by `discover` before the build
/// (missing ones fail at once), unless only a download needs them: the zip an earlier run
/// kept is reused without them.
fn kaggle_source(
    data: &Path,
    discover: impl FnOnce() -> Result<KaggleCredentials, DataError>,
) -> anyhow::Result<FetchSource> {
    let kept = default_download_dir(data).join(ZIP_NAME).is_file();
    let credentials = if kept {
        None
    } else {
        Some(discover().map_err(|e| anyhow!(e).context(NO_NETWORK_DATA))?)
    };
    Ok(FetchSource::Kaggle {
        endpoint: None,
        credentials,
    })
}

fn fetch_data(data: &Path, source: FetchSource) -> anyhow::Result<()> {
    fetch(&FetchOptions::new(data, source))
        .map(drop)
        .map_err(in_e2e_terms)
}

/// The run folder is deleted before training, so it must be one that vt-train wrote (even
/// partly) or an empty one: never a folder that holds anything else.
fn check_replaceable_run(run_dir: &Path) -> anyhow::Result<()> {
    let metadata = match std::fs::symlink_metadata(run_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        metadata => metadata.with_context(|| format!("reading {}", run_dir.display()))?,
    };
    let refuse = |why: &str| {
        anyhow!(
            "refusing to replace {}: {why}; choose another --work-dir or remove it",
            run_dir.display()
        )
    };
    if !metadata.is_dir() {
        return Err(refuse("it is not a folder"));
    }
    let mut entries =
        std::fs::read_dir(run_dir).with_context(|| format!("reading {}", run_dir.display()))?;
    if entries.next().is_none() {
        return Ok(());
    }
    let markers = [CONFIG_TOML, METRICS_JSONL, STATE_DIR, LOCK_FILE];
    if !markers.iter().any(|m| run_dir.join(m).exists()) {
        return Err(refuse(&format!(
            "it is not empty and not a vt-train run (none of {})",
            markers.join(", ")
        )));
    }
    // vt-train holds its run's lock while it trains (a run started by hand, say).
    let lock = run_dir.join(LOCK_FILE);
    match OpenOptions::new().write(true).open(&lock) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("opening {}", lock.display())),
        Ok(file) => match file.try_lock() {
            Ok(()) => Ok(()),
            Err(TryLockError::WouldBlock) => Err(refuse("a vt-train process is training in it")),
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", lock.display()))
            }
        },
    }
}

/// Takes `WORK/.e2e.lock` for this run, refusing a work folder another e2e holds.
fn lock_work_dir(work: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let path = work.join(".e2e.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => bail!(
            "another `cargo xtask e2e` is running in {}: wait for it, or choose another --work-dir",
            work.display()
        ),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
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

/// The served model's name, in the Open Inference Protocol's URLs.
const MODEL_NAME: &str = "vt-e2e";
/// Images per Open Inference Protocol request: within vt-serve's default queue and body limit.
const IMAGES_PER_INFERENCE: usize = 64;

/// Every image's classes, best first, as `(label, probability)`, from `/v2/models/.../infer`
/// requests of up to [`IMAGES_PER_INFERENCE`] images each, sent as tritonclient sends them:
/// the files as binary tensor data after the JSON, the classification extension asked for
/// all classes.
fn open_inference_rankings(
    url: &str,
    images: &[(PathBuf, String)],
) -> anyhow::Result<Vec<Vec<(String, f64)>>> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut rankings = Vec::new();
    for chunk in images.chunks(IMAGES_PER_INFERENCE) {
        let mut data = Vec::new();
        for (path, _) in chunk {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let length = u32::try_from(bytes.len())
                .with_context(|| format!("{} is over 4 GiB", path.display()))?;
            data.extend_from_slice(&length.to_le_bytes());
            data.extend_from_slice(&bytes);
        }
        let header = serde_json::to_vec(&json!({
            "inputs": [{
                "name": "image", "shape": [chunk.len()], "datatype": "BYTES",
                "parameters": {"binary_data_size": data.len()},
            }],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1000}}],
        }))?;
        let header_length = header.len();
        let response = client
            .post(format!("{url}/v2/models/{MODEL_NAME}/infer"))
            .header("inference-header-content-length", header_length)
            .header("content-type", "application/octet-stream")
            .body([header, data].concat())
            .send()
            .context("POST /v2/models/.../infer")?;
        let status = response.status();
        let json: Value = response.json().context("reading the inference answer")?;
        ensure!(
            status.is_success(),
            "POST /v2/models/.../infer: {status} {json}"
        );
        let output = &json["outputs"][0];
        let width = output["shape"][1]
            .as_u64()
            .context("no shape in the answer")? as usize;
        let strings = output["data"].as_array().context("no data in the answer")?;
        ensure!(
            width > 0 && strings.len() == chunk.len() * width,
            "{} classification strings for {} images: {json}",
            strings.len(),
            chunk.len()
        );
        for row in strings.chunks(width) {
            let ranking = row
                .iter()
                .map(|s| {
                    // `value:index:label`.
                    let text = s.as_str().unwrap_or_default();
                    let mut parts = text.splitn(3, ':');
                    let value = parts.next().and_then(|v| v.parse::<f64>().ok());
                    match (value, parts.next(), parts.next()) {
                        (Some(value), Some(_), Some(label)) => Ok((label.to_string(), value)),
                        _ => Err(anyhow!("not a classification string: {s}")),
                    }
                })
                .collect::<anyhow::Result<_>>()?;
            rankings.push(ranking);
        }
    }
    Ok(rankings)
}

/// Every image's classes, best first, as `(label, probability)`, from
/// `/v1/models/.../:predict` requests of up to [`IMAGES_PER_INFERENCE`] `{"b64"}` instances
/// each, the bodies gzip-compressed and the answers asked compressed, as a Python client
/// with `requests` would send them.
fn instances_rankings(
    url: &str,
    images: &[(PathBuf, String)],
) -> anyhow::Result<Vec<Vec<(String, f64)>>> {
    use base64::Engine;
    use std::io::{Read, Write};
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let what = format!("POST /v1/models/{MODEL_NAME}:predict");
    let mut rankings = Vec::new();
    for chunk in images.chunks(IMAGES_PER_INFERENCE) {
        let instances = chunk
            .iter()
            .map(|(path, _)| {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Ok(json!({"b64": base64::engine::general_purpose::STANDARD.encode(bytes)}))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&serde_json::to_vec(&json!({ "instances": instances }))?)?;
        let response = client
            .post(format!("{url}/v1/models/{MODEL_NAME}:predict"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .header("accept-encoding", "gzip")
            .body(gzip.finish()?)
            .send()
            .with_context(|| what.clone())?;
        let status = response.status();
        let compressed = response
            .headers()
            .get("content-encoding")
            .is_some_and(|e| e == "gzip");
        let body = response.bytes().context("reading the answer")?;
        ensure!(
            status.is_success(),
            "{what}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        ensure!(compressed, "{what}: the answer is not gzip-compressed");
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut text)
            .with_context(|| format!("{what}: decompressing the answer"))?;
        let json: Value = serde_json::from_slice(&text).context("parsing the answer")?;
        let predictions = json["predictions"]
            .as_array()
            .filter(|p| p.len() == chunk.len())
            .with_context(|| format!("{what}: not one prediction per image: {json}"))?;
        for prediction in predictions {
            let (Some(names), Some(confidences)) = (
                prediction["displayNames"].as_array(),
                prediction["confidences"].as_array(),
            ) else {
                bail!("{what}: not a classification: {prediction}");
            };
            let ranking = names
                .iter()
                .zip(confidences)
                .map(
                    |(name, confidence)| match (name.as_str(), confidence.as_f64()) {
                        (Some(name), Some(value)) => Ok((name.to_string(), value)),
                        _ => Err(anyhow!("{what}: not a classification: {prediction}")),
                    },
                )
                .collect::<anyhow::Result<_>>()?;
            rankings.push(ranking);
        }
    }
    Ok(rankings)
}

/// Another protocol's rankings must be `/predict`'s: same classes in the same order,
/// probabilities within 1e-5 (the images were batched differently).
fn compare_rankings(
    protocol: &str,
    images: &[(PathBuf, String)],
    http: &[Value],
    rankings: &[Vec<(String, f64)>],
) -> anyhow::Result<()> {
    ensure!(
        rankings.len() == images.len(),
        "{} answers for {} images",
        rankings.len(),
        images.len()
    );
    for (((path, _), served), ranking) in images.iter().zip(http).zip(rankings) {
        let predictions = served["predictions"]
            .as_array()
            .context("no predictions in the HTTP answer")?;
        ensure!(
            predictions.len() == ranking.len(),
            "{}: /predict ranks {} classes, {protocol} {}",
            path.display(),
            predictions.len(),
            ranking.len()
        );
        for (p, (label, value)) in predictions.iter().zip(ranking) {
            let score = p["score"].as_f64().unwrap_or(f64::NAN);
            ensure!(
                p["label"] == label.as_str() && (score - value).abs() <= 1e-5,
                "{}: /predict says {} {score}, {protocol} {label} {value}",
                path.display(),
                p["label"]
            );
        }
    }
    Ok(())
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
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => crate::cargo::target_dir()?.join("e2e"),
    };
    let data = work.join("data");
    let run_dir = work.join("run");
    // Held to the end: a second e2e on this folder would replace the data and the run
    // under this one's training.
    let _work_lock = lock_work_dir(&work)?;
    // Everything that can be checked without building or fetching is checked first.
    check_replaceable_run(&run_dir)?;
    let source = match (&args.from, args.source) {
        (Some(path), _) => FetchSource::Path(path.clone()),
        (None, Source::Synthetic) => FetchSource::Synthetic(SyntheticConfig::default()),
        (None, Source::Hf) => FetchSource::HuggingFace(HfOptions::default()),
        (None, Source::Kaggle) => kaggle_source(&data, KaggleCredentials::discover)?,
    };
    let mut steps = Steps::default();

    steps.run("build", build_binaries)?;
    steps.run("fetch data", || fetch_data(&data, source))?;

    let epochs = args.epochs.unwrap_or(if args.quick { 1 } else { 3 });
    steps.run("train", || {
        // Again: a vt-train may have started in the folder during the build and the fetch.
        check_replaceable_run(&run_dir)?;
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("clearing {}", run_dir.display()))?;
        }
        let mut train = Command::new(binary("vt-train")?);
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
    let (split, images) = test_images(&data, args.requests)?;
    if split != "test" {
        println!(
            "note: {} has no test split; evaluating and serving {split} images, which also \
             chose best/",
            data.display()
        );
    }
    let report_path = run_dir.join(format!("eval-{split}.json"));
    let report: Value = steps.run("evaluate", || {
        let mut eval = Command::new(binary("vt-train")?);
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
        serde_json::from_str(&text).with_context(|| format!("parsing {}", report_path.display()))
    })?;

    let explain_dir = run_dir.join("explain");
    let explained = steps.run("explain", || {
        let (image, _) = images
            .first()
            .context("no image to explain in the evaluated split")?;
        let mut explain = Command::new(binary("vt-train")?);
        explain
            .arg("explain")
            .arg("--checkpoint")
            .arg(&checkpoint)
            .arg("--out")
            .arg(&explain_dir)
            .arg(image);
        Ok(run_checked(&mut explain)?.trim().to_string())
    })?;

    let server = steps.run("start server", || Server::start(&checkpoint))?;
    let http = steps.run("predict over HTTP", || {
        http_predictions(&server.url, &images)
    })?;
    let rankings = steps.run("infer (Open Inference)", || {
        open_inference_rankings(&server.url, &images)
    })?;
    let instances = steps.run("instances (gzip)", || {
        instances_rankings(&server.url, &images)
    })?;
    let url = server.url.clone();
    steps.run("stop server (SIGTERM)", || server.stop())?;
    let offline = steps.run("vt-serve predict", || {
        let mut predict = Command::new(binary("vt-serve")?);
        predict
            .arg("predict")
            .arg("--checkpoint")
            .arg(&checkpoint)
            .args(["--top-k", "100"]);
        predict.args(images.iter().map(|(p, _)| p));
        run_checked(&mut predict)
    })?;
    let correct = steps.run("compare answers", || {
        compare_rankings("the Open Inference Protocol", &images, &http, &rankings)?;
        compare_rankings("{\"instances\"}", &images, &http, &instances)?;
        compare(&images, &http, &offline)
    })?;

    println!("\ne2e passed");
    println!("  data:        {}", data.display());
    println!(
        "  run:         {} (metrics.jsonl, curves.png, confusion.png, TensorBoard events)",
        run_dir.display()
    );
    println!("  checkpoint:  {}", checkpoint.display());
    println!(
        "  evaluation:  {} split, {} images, accuracy {:.3}, calibration error {:.3}",
        report["split"].as_str().unwrap_or(&split),
        report["images"],
        report["accuracy"].as_f64().unwrap_or(f64::NAN),
        report["calibration"]["ece"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  explained:   {explained}");
    println!(
        "  served:      {url}: {} images, {correct} top-1 correct, all equal to vt-serve predict \
         and to the Open Inference Protocol's and {{\"instances\"}} answers",
        images.len()
    );
    for (name, elapsed) in &steps.0 {
        println!("  {name:<22} {:>8.1} s", elapsed.as_secs_f64());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary one (xtask has no tempfile).
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn zero_requests_or_epochs_are_refused_by_the_command_line() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        use clap::Parser;
        for flag in ["--requests", "--epochs"] {
            let err = Cli::try_parse_from(["e2e", flag, "0"]).err().unwrap();
            assert!(err.to_string().contains("must be at least 1"), "{err}");
        }
    }

    /// Kaggle's credentials are asked for before the build, unless the zip an earlier run
    /// downloaded is there to reuse.
    #[test]
    fn kaggle_credentials_are_needed_only_to_download() {
        let work = scratch("kaggle");
        let data = work.join("data");
        let missing = || Err(DataError::Invalid("no kaggle.json".into()));
        let err = kaggle_source(&data, missing).unwrap_err();
        assert!(format!("{err:#}").contains("no kaggle.json"), "{err:#}");
        std::fs::create_dir(work.join(".downloads")).unwrap();
        std::fs::write(work.join(".downloads").join(ZIP_NAME), b"zip").unwrap();
        let source = kaggle_source(&data, missing).unwrap();
        assert!(
            matches!(
                source,
                FetchSource::Kaggle {
                    credentials: None,
                    ..
                }
            ),
            "{source:?}"
        );
    }

    #[test]
    fn only_a_missing_empty_or_vt_train_run_folder_is_replaced() {
        let work = scratch("run");
        let run = work.join("run");
        check_replaceable_run(&run).unwrap();
        std::fs::create_dir(&run).unwrap();
        check_replaceable_run(&run).unwrap();
        std::fs::create_dir(run.join("important")).unwrap();
        let err = check_replaceable_run(&run).unwrap_err().to_string();
        assert!(err.contains(&run.display().to_string()), "{err}");
        assert!(err.contains("--work-dir"), "{err}");
        std::fs::write(run.join(CONFIG_TOML), "").unwrap();
        check_replaceable_run(&run).unwrap();
        // Not while vt-train holds the run's lock.
        let training = File::create(run.join(LOCK_FILE)).unwrap();
        training.lock().unwrap();
        let err = check_replaceable_run(&run).unwrap_err().to_string();
        assert!(
            err.contains("a vt-train process is training in it"),
            "{err}"
        );
        drop(training);
        check_replaceable_run(&run).unwrap();
        let file = work.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_replaceable_run(&file)
            .unwrap_err()
            .to_string()
            .contains("not a folder"));
        std::fs::remove_dir_all(work).unwrap();
    }

    #[test]
    fn a_work_folder_is_used_by_one_e2e_at_a_time() {
        let work = scratch("lock");
        let first = lock_work_dir(&work).unwrap();
        let err = lock_work_dir(&work).unwrap_err().to_string();
        assert!(
            err.contains("another `cargo xtask e2e` is running in"),
            "{err}"
        );
        drop(first);
        drop(lock_work_dir(&work).unwrap());
        std::fs::remove_dir_all(work).unwrap();
    }

    #[test]
    fn fetch_errors_name_e2e_flags_and_only_network_ones_suggest_offline_sources() {
        let work = scratch("fetch");
        let missing =
            fetch_data(&work.join("data"), FetchSource::Path("/nonexistent".into())).unwrap_err();
        let text = format!("{missing:#}");
        assert!(text.contains("/nonexistent"), "{text}");
        assert!(!text.contains(NO_NETWORK_DATA), "{text}");

        let kept = work.join("kept");
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::write(kept.join("notes.txt"), "").unwrap();
        let refused =
            fetch_data(&kept, FetchSource::Synthetic(SyntheticConfig::default())).unwrap_err();
        let text = format!("{refused:#}");
        assert!(
            text.contains("--work-dir") && !text.contains("--data-dir"),
            "{text}"
        );
        assert!(!text.contains(NO_NETWORK_DATA), "{text}");

        // Nothing listens on port 1: the hub cannot be reached.
        let hub = HfOptions {
            endpoint: Some("http://127.0.0.1:1".into()),
            cache_dir: Some(work.join("hub")),
            read_timeout: Some(Duration::from_secs(2)),
            ..HfOptions::default()
        };
        let offline = fetch_data(&work.join("data"), FetchSource::HuggingFace(hub)).unwrap_err();
        let text = format!("{offline:#}");
        assert!(text.starts_with(NO_NETWORK_DATA), "{text}");
        assert!(text.contains("--source synthetic (generated"), "{text}");
        assert!(!text.contains(" --synthetic"), "{text}");
        std::fs::remove_dir_all(work).unwrap();
    }
}
