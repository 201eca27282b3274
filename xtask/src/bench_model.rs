//! `cargo xtask bench model`: forward and training-step throughput of vt-model on this
//! machine, side by side with the PyTorch reference (tools/reference/bench_model.py) run in
//! the same invocation with the same cases, threads and iteration counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::loss::cross_entropy;
use serde::{Deserialize, Serialize};
use vt_model::{Arch, Model, VtConfig};
use vt_train::optim::{trainable_params, Method, Optimizer};

use crate::reference::{default_python, script};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cases as MODE:ARCH:IMAGE_SIZE:BATCH, comma-separated (MODE is train or infer).
    #[arg(
        long,
        default_value = "train:vt-resnet18:150:32,infer:vt-resnet18:150:1,infer:vt-resnet18:150:32,\
train:vt-resnet18:224:32,infer:vt-resnet18:224:1,infer:vt-resnet18:224:32,\
train:vt-resnet34:224:32,infer:vt-resnet34:224:1,infer:vt-resnet34:224:32"
    )]
    cases: String,
    /// Device for both sides: cpu, cuda, cuda:N or auto (PyTorch gets its first GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the inference cases: f32, f16 or bf16 (CUDA); training stays f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Compute threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed iterations per case (after the warm-up).
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one)]
    iters: usize,
    /// Untimed warm-up iterations per case.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with PyTorch for the reference side (default: the venv of tools/reference/README.md,
    /// else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Training cases in full f32 too: no TF32 convolutions (which vt-train, like PyTorch,
    /// allows on GPUs by default; PyTorch's side keeps its default).
    #[arg(long)]
    no_tf32: bool,
    /// f32 products on the CPU in bfloat16 with f32 sums (AVX512-BF16), on both sides:
    /// vt-model's `--bf16-products`, PyTorch's `torch.backends.mkldnn.fp32_precision = "bf16"`.
    #[arg(long)]
    bf16_products: bool,
    /// Skip the PyTorch side.
    #[arg(long)]
    no_torch: bool,
    /// One JSON object per case instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Train,
    Infer,
}

#[derive(Debug, Clone, PartialEq)]
struct Case {
    mode: Mode,
    arch: Arch,
    image_size: usize,
    batch: usize,
}

fn parse_cases(text: &str) -> anyhow::Result<Vec<Case>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let parts: Vec<&str> = item.trim().split(':').collect();
            let [mode, arch, size, batch] = parts[..] else {
                bail!("bad case `{item}`: want MODE:ARCH:IMAGE_SIZE:BATCH");
            };
            let mode = match mode {
                "train" => Mode::Train,
                "infer" => Mode::Infer,
                other => bail!("bad mode `{other}` in `{item}`: want train or infer"),
            };
            Ok(Case {
                mode,
                arch: arch.parse()?,
                image_size: size
                    .parse()
                    .with_context(|| format!("image size in `{item}`"))?,
                batch: batch
                    .parse()
                    .with_context(|| format!("batch in `{item}`"))?,
            })
        })
        .collect()
}

/// Images per second of one case in vt-model: evaluation-mode forward passes, or training
/// steps (forward, cross-entropy, backward, SGD step with momentum 0.9 as on PyTorch's side).
fn bench_vt(
    case: &Case,
    (device, dtype): (&Device, DType),
    (iters, warmup): (usize, usize),
    tf32: bool,
) -> anyhow::Result<f64> {
    let dtype = match case.mode {
        Mode::Infer => dtype,
        Mode::Train => DType::F32,
    };
    // As the binaries run: vt-train lets convolutions use TF32 (PyTorch's default), vt-serve
    // computes in full f32.
    vt_model::kernels::allow_tf32(tf32 && case.mode == Mode::Train);
    let config = VtConfig::new(case.arch, 6, case.image_size);
    let model = Model::init_as(config, device, dtype)?;
    // Inference as vt-serve runs it: on frozen weights.
    let model = match case.mode {
        Mode::Infer => model.into_frozen()?,
        Mode::Train => model,
    };
    let s = case.image_size;
    let x = Tensor::randn(0f32, 1.0, (case.batch, 3, s, s), device)?.to_dtype(dtype)?;
    let labels: Vec<u32> = (0..case.batch as u32).map(|i| i % 6).collect();
    let y = Tensor::new(labels.as_slice(), device)?;
    // vt-train's optimiser, with PyTorch's side's settings.
    let mut optimizer = Optimizer::new(
        Method::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        0.0,
        trainable_params(&model.varmap),
    );
    let mut step = || -> anyhow::Result<()> {
        match case.mode {
            // The logits come back to the host, as a served prediction's must (PyTorch's
            // side does the same).
            Mode::Infer => {
                model
                    .forward_t(&x, false)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
            }
            Mode::Train => {
                let loss = cross_entropy(&model.forward_t(&x, true)?, &y)?;
                optimizer.step(&loss.backward()?, 0.01, 1.0, &|_| true)?;
            }
        }
        Ok(())
    };
    let (warm, searched) = (Instant::now(), vt_model::kernels::algorithm_search_time());
    for _ in 0..warmup {
        step()?;
    }
    device.synchronize()?;
    let searched = vt_model::kernels::algorithm_search_time() - searched;
    if !searched.is_zero() {
        eprintln!(
            "warm-up: {:.2}s, {:.2}s of it timing cuDNN's convolution algorithms",
            warm.elapsed().as_secs_f64(),
            searched.as_secs_f64()
        );
    }
    // The timed iterations are the region a profiler started with `--profile-from-start off`
    // records (bench/gpu.sh's kernel profile), without the warm-up's one-time work.
    #[cfg(feature = "cuda")]
    let profiled = device
        .is_cuda()
        .then(candle_core::cuda::cudarc::driver::Profiler::new)
        .transpose()?;
    let start = Instant::now();
    for _ in 0..iters {
        step()?;
    }
    // GPU work is asynchronous: count it to its end.
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    drop(profiled);
    Ok((case.batch * iters) as f64 / start.elapsed().as_secs_f64())
}

#[derive(Debug, Deserialize)]
struct TorchResult {
    mode: Mode,
    arch: String,
    image_size: usize,
    batch: usize,
    img_s: f64,
}

/// How to get past a PyTorch side that cannot run.
const TORCH_HINT: &str = "pass --python with a Python that has PyTorch (tools/reference/README.md \
    sets one up), or --no-torch to measure vt-model alone";

fn bench_torch(
    args: &Args,
    (device, dtype): (&Device, DType),
    python: &Path,
) -> anyhow::Result<Vec<TorchResult>> {
    let script = script("bench_model.py");
    let output = Command::new(python)
        .arg(&script)
        .args(["--cases", &args.cases, "--json"])
        .args(["--threads", &args.threads.to_string()])
        .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
        .args(["--dtype", torch_dtype(dtype)])
        .args(args.bf16_products.then_some("--mkldnn-bf16"))
        .args([
            "--iters",
            &args.iters.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ])
        .output()
        .with_context(|| {
            format!(
                "cannot run the PyTorch reference's interpreter {}: {TORCH_HINT}",
                python.display()
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "the PyTorch reference ({} {}) failed ({}): {TORCH_HINT}\n{}",
            python.display(),
            script.display(),
            output.status,
            stderr.trim_end()
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing `{l}`")))
        .collect()
}

/// PyTorch's name for a precision that `vt_model::parse_dtype` accepted.
fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

#[derive(Serialize)]
struct Row<'a> {
    case: Mode,
    arch: &'a str,
    image_size: usize,
    batch: usize,
    /// The inference precision (training is always f32).
    dtype: &'a str,
    /// Whether training let f32 convolutions use TF32 on a GPU.
    tf32: bool,
    vt_img_s: f64,
    torch_img_s: Option<f64>,
    ratio: Option<f64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cases = parse_cases(&args.cases)?;
    // candle reads the thread settings once, at its first parallel operation.
    vt_model::threads::set_compute_threads(args.threads);
    let device = vt_model::parse_device(&args.device)?;
    let dtype = vt_model::parse_dtype(&args.dtype, &device)?;
    vt_model::use_bf16_products(args.bf16_products, &device, dtype)?;
    let mut vt = Vec::new();
    for case in &cases {
        eprintln!("vt-model: {case:?} on {} ({})", args.device, args.dtype);
        let iterations = (args.iters, args.warmup);
        let img_s = bench_vt(case, (&device, dtype), iterations, !args.no_tf32)
            .with_context(|| format!("{case:?}"))?;
        // Logged at once: a run stopped before the table (PyTorch's side timed out, say)
        // keeps what it measured.
        eprintln!("vt-model: {case:?}: {img_s:.1} img/s");
        vt.push(img_s);
    }
    // A failing PyTorch side fails the command only after vt-model's results are printed.
    let torch = if args.no_torch {
        Ok(Vec::new())
    } else {
        let python = args.python.clone().unwrap_or_else(default_python);
        eprintln!("PyTorch reference with {}", python.display());
        bench_torch(&args, (&device, dtype), &python)
    };
    let torch_rows = torch.as_deref().unwrap_or_default();
    if !args.json {
        println!("| case | arch | px | batch | vt img/s | torch img/s | ratio |");
        println!("|---|---|---|---|---|---|---|");
    }
    for (case, vt_img_s) in cases.iter().zip(vt) {
        let torch_img_s = torch_rows
            .iter()
            .find(|t| {
                t.mode == case.mode
                    && t.arch == case.arch.name()
                    && t.image_size == case.image_size
                    && t.batch == case.batch
            })
            .map(|t| t.img_s);
        let row = Row {
            case: case.mode,
            arch: case.arch.name(),
            image_size: case.image_size,
            batch: case.batch,
            dtype: match case.mode {
                Mode::Infer => &args.dtype,
                Mode::Train => "f32",
            },
            tf32: case.mode == Mode::Train && !args.no_tf32 && !device.is_cpu(),
            vt_img_s,
            torch_img_s,
            ratio: torch_img_s.map(|t| vt_img_s / t),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            let fmt =
                |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
            println!(
                "| {:?} | {} | {} | {} | {:.1} | {} | {} |",
                row.case,
                row.arch,
                row.image_size,
                row.batch,
                row.vt_img_s,
                fmt(row.torch_img_s, 1),
                fmt(row.ratio, 2)
            );
        }
    }
    torch
        .map(drop)
        .context("vt-model's results are above, without PyTorch's")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_parse_and_bad_ones_are_named() {
        let cases = parse_cases("train:vt-resnet18:150:32, infer:vt-resnet34:224:1").unwrap();
        assert_eq!(
            cases[1],
            Case {
                mode: Mode::Infer,
                arch: Arch::VtResNet34,
                image_size: 224,
                batch: 1
            }
        );
        assert!(parse_cases("fly:vt-resnet18:150:32")
            .unwrap_err()
            .to_string()
            .contains("fly"));
        assert!(parse_cases("train:vt-resnet18:150").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("bench-model").chain(argv.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn zero_iterations_are_refused() {
        assert!(parse(&["--iters", "0"]).is_err());
        assert_eq!(parse(&["--iters", "1"]).unwrap().iters, 1);
    }

    #[test]
    fn a_missing_interpreter_is_named_with_the_flags_that_get_past_it() {
        let args = parse(&["--cases", "infer:vt-resnet18:32:1"]).unwrap();
        let python = Path::new("/nonexistent/python");
        let err = bench_torch(&args, (&Device::Cpu, DType::F32), python).unwrap_err();
        let text = format!("{err:#}");
        for wanted in ["/nonexistent/python", "--python", "--no-torch"] {
            assert!(text.contains(wanted), "{wanted} missing from: {text}");
        }
    }
}
