//! `cargo xtask bench serve`: HTTP load against vt-serve and against a plain PyTorch server
//! (tools/reference/serve_baseline.py) on the same checkpoint and photos, at rising
//! concurrency: requests per second, p50/p99 latency and errors.
//!
//! Both servers and this load generator share the machine, so compare the two servers
//! with each other rather than with numbers from elsewhere.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::Device;
use vt_model::{Arch, Model, VtConfig};

use crate::cargo::{binary, build_binaries, target_dir};
use crate::reference::{default_python, script};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint to serve (default: a freshly initialised VT-ResNet-18 at --image-size,
    /// written to target/bench-serve/checkpoint).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Image size of the default checkpoint.
    #[arg(long, default_value_t = 150)]
    image_size: usize,
    /// Folder whose image files are the request bodies, sent in turn (default: the shared
    /// sample's seg_pred, beside the repository).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Concurrent clients, one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64", value_parser = crate::at_least_one)]
    concurrency: Vec<usize>,
    /// Requests per measurement (after a short warm-up).
    #[arg(long, default_value_t = 200, value_parser = crate::at_least_one)]
    requests: usize,
    /// CPU threads each server may use.
    #[arg(long, default_value_t = 2, value_parser = crate::at_least_one)]
    threads: usize,
    /// vt-serve's --max-batch.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// vt-serve's --max-delay-ms.
    #[arg(long, default_value_t = 2)]
    max_delay_ms: u64,
    /// vt-serve's --bf16-products (the PyTorch baseline stays f32, as the notebook served).
    #[arg(long)]
    bf16_products: bool,
    /// Servers to measure: vt-serve, pytorch.
    #[arg(long, value_delimiter = ',', default_value = "vt-serve,pytorch")]
    servers: Vec<String>,
    /// Python with PyTorch (default: ~/.cache/vt/torch-venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    json: bool,
}

struct Measurement {
    server: String,
    concurrency: usize,
    requests: usize,
    errors: usize,
    req_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A server process, killed when dropped.
struct Running {
    child: Child,
    base: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` and waits for its `listening on http://...` line.
fn start(mut command: Command, what: &str) -> anyhow::Result<Running> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .with_context(|| format!("reading the address {what} prints"))?;
    let Some(base) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
        let _ = child.kill();
        bail!("{what} did not start (first line: {line:?})");
    };
    Ok(Running { child, base })
}

fn start_server(name: &str, args: &Args, checkpoint: &Path) -> anyhow::Result<Running> {
    let threads = args.threads.to_string();
    match name {
        "vt-serve" => {
            build_binaries()?;
            let mut command = Command::new(binary("vt-serve")?);
            command.arg("--checkpoint").arg(checkpoint).args([
                "--port",
                "0",
                "--device",
                "cpu",
                "--threads",
                &threads,
                "--max-batch",
                &args.max_batch.to_string(),
                "--max-delay-ms",
                &args.max_delay_ms.to_string(),
                "--queue",
                "4096",
            ]);
            if args.bf16_products {
                command.arg("--bf16-products");
            }
            command.env("RUST_LOG", "warn");
            start(command, "vt-serve")
        }
        "pytorch" => {
            let python = args.python.clone().unwrap_or_else(default_python);
            let mut command = Command::new(&python);
            command
                .arg(script("serve_baseline.py"))
                .arg("--checkpoint")
                .arg(checkpoint)
                .args(["--port", "0", "--threads", &threads]);
            start(
                command,
                &format!("the PyTorch baseline ({})", python.display()),
            )
            .context(
                "pass --python with a Python that has PyTorch (tools/reference/README.md sets \
                 one up; its error is above), or --servers vt-serve to measure vt-serve alone",
            )
        }
        other => bail!("unknown server `{other}` (expected vt-serve or pytorch)"),
    }
}

fn load_images(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no images in {}", dir.display());
    }
    files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn default_checkpoint(image_size: usize) -> anyhow::Result<PathBuf> {
    let dir = target_dir()?.join("bench-serve/checkpoint");
    let mut config = VtConfig::new(
        Arch::VtResNet18,
        vt_data::dataset::CLASSES.len(),
        image_size,
    );
    config.class_names = vt_data::dataset::CLASSES.map(String::from).to_vec();
    Model::init(config, &Device::Cpu)?
        .save(&dir)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(dir)
}

/// Sends `requests` requests from `concurrency` clients; returns each one's latency and
/// whether it was answered 200.
async fn load(
    client: &reqwest::Client,
    url: &str,
    images: &Arc<Vec<Vec<u8>>>,
    concurrency: usize,
    requests: usize,
) -> (Duration, Vec<(Duration, bool)>) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, images, next) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(images),
            Arc::clone(&next),
        );
        workers.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return samples;
                }
                let body = images[i % images.len()].clone();
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("Content-Type", "image/jpeg")
                    .body(body)
                    .send()
                    .await;
                let ok = match response {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                samples.push((sent.elapsed(), ok));
            }
        });
    }
    let mut samples = Vec::with_capacity(requests);
    while let Some(worker) = workers.join_next().await {
        samples.extend(worker.unwrap_or_default());
    }
    (started.elapsed(), samples)
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

async fn measure(
    server: &str,
    base: &str,
    args: &Args,
    images: &Arc<Vec<Vec<u8>>>,
) -> Vec<Measurement> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap_or_default();
    let url = format!("{base}/predict");
    let mut results = Vec::new();
    for &concurrency in &args.concurrency {
        // Warm-up: open the connections and let both servers reach a steady state.
        load(&client, &url, images, concurrency, 2 * concurrency.max(4)).await;
        let (wall, samples) = load(&client, &url, images, concurrency, args.requests).await;
        let errors = samples.iter().filter(|(_, ok)| !ok).count();
        let mut latencies: Vec<Duration> = samples
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(d, _)| *d)
            .collect();
        latencies.sort();
        results.push(Measurement {
            server: server.to_owned(),
            concurrency,
            requests: samples.len(),
            errors,
            req_per_s: latencies.len() as f64 / wall.as_secs_f64(),
            p50_ms: percentile_ms(&latencies, 0.50),
            p99_ms: percentile_ms(&latencies, 0.99),
        });
    }
    results
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let checkpoint = match &args.checkpoint {
        Some(dir) => dir.clone(),
        None => default_checkpoint(args.image_size)?,
    };
    let folder = args
        .images
        .clone()
        .unwrap_or_else(|| crate::cargo::shared_sample("seg_pred"));
    let images = Arc::new(load_images(&folder)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if !args.json {
        println!(
            "serving {} ({} request bodies from {}), {} server threads, {} requests per level",
            checkpoint.display(),
            images.len(),
            folder.display(),
            args.threads,
            args.requests
        );
        println!(
            "{:<10} {:>6} {:>9} {:>9} {:>9} {:>7}",
            "server", "conc", "req/s", "p50 ms", "p99 ms", "errors"
        );
    }
    for name in &args.servers {
        let server = start_server(name, &args, &checkpoint)?;
        for m in runtime.block_on(measure(name, &server.base, &args, &images)) {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "server": m.server, "concurrency": m.concurrency, "requests": m.requests,
                        "errors": m.errors, "req_per_s": m.req_per_s, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
                    })
                );
            } else {
                println!(
                    "{:<10} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>7}",
                    m.server, m.concurrency, m.req_per_s, m.p50_ms, m.p99_ms, m.errors
                );
            }
        }
    }
    Ok(())
}
