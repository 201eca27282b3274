//! The server's command-line options.

use std::path::PathBuf;

use axum::http::HeaderValue;

use crate::auth::{ApiKey, GivenKey};

pub use vt_data::decode::DEFAULT_MAX_PIXELS;
/// `--max-inflight-body-bytes` unless `--max-body-bytes` is larger.
pub const DEFAULT_INFLIGHT_BODY_BYTES: u64 = 256 * 1024 * 1024;

/// The largest `--queue`: its slots take memory from the start (about 90 bytes each).
const MAX_QUEUE: i64 = 65_536;

/// Every option can also be set by an environment variable, `VT_SERVE_` and its name
/// (`VT_SERVE_CHECKPOINT=/opt/ml/model`): how containers are configured, since SageMaker
/// starts one as `IMAGE serve` with no other arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Checkpoint folder (config.json + model.safetensors).
    #[arg(long, env = "VT_SERVE_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The model's name in answers, `GET /v1/models` and the Open Inference Protocol's
    /// `/v2/models/NAME/...` routes [default: the checkpoint folder's name].
    #[arg(long, env = "VT_SERVE_MODEL_NAME", value_parser = parse_model_name)]
    pub model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "VT_SERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the bound address is printed on startup).
    #[arg(long, env = "VT_SERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Port for the Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`,
    /// as Triton and KServe serve it), on the same --host; 0 picks a free one (printed on
    /// startup). Without it there is no gRPC service.
    #[arg(long, env = "VT_SERVE_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Device: cpu, cuda, cuda:N, or auto (the first GPU when built with CUDA, else the CPU).
    #[arg(long, env = "VT_SERVE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Inference precision: f32, f16, or bf16 (bf16 on CUDA devices only). The checkpoint's
    /// f32 weights are converted when loaded.
    #[arg(long, env = "VT_SERVE_DTYPE", default_value = "f32", value_parser = vt_model::DTYPE_NAMES)]
    pub dtype: String,
    /// On the CPU, multiply in bfloat16 with f32 sums inside the f32 convolutions and linear
    /// layers (CPUs with AVX512-BF16): faster, with probabilities within about 1e-2 of f32's.
    #[arg(long, env = "VT_SERVE_BF16_PRODUCTS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub bf16_products: bool,
    /// Most images per forward pass.
    #[arg(long, env = "VT_SERVE_MAX_BATCH", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch: u32,
    /// Longest the first image of a batch waits for others to join it, in milliseconds. It
    /// waits only while other requests are still being read or decoded.
    #[arg(long, env = "VT_SERVE_MAX_DELAY_MS", default_value_t = 5)]
    pub max_delay_ms: u64,
    /// Most images admitted at once (decoding, queued or running). A request that does not
    /// fit waits for room, in arrival order, within its --timeout-ms; as many images more
    /// may wait so, and past that a request gets 503 with Retry-After at once. Also the most
    /// images one request may carry. At most 65536: the queue's slots are allocated at start.
    #[arg(long, env = "VT_SERVE_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=MAX_QUEUE))]
    pub queue: u32,
    /// Time limit of one request, from its arrival to its answer, in milliseconds; past it
    /// the answer is 504, or 408 when the client had not sent all of its body, at once: images
    /// the model has begun computing are finished, and their results dropped.
    #[arg(long, env = "VT_SERVE_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Time a client has to send a request's headers, counted from when its connection
    /// opened or its previous answer was sent, in milliseconds; past it the connection is
    /// closed (slow clients, and idle keep-alive connections). Also the longest a client may
    /// leave the answers unread.
    #[arg(long, env = "VT_SERVE_HEADER_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// Largest request body (and fetched URL) in bytes; larger ones get 413. Also the
    /// largest gRPC request message (decoded): RESOURCE_EXHAUSTED.
    #[arg(long, env = "VT_SERVE_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: u64,
    /// Most bytes of request bodies (decoded) held at once, all requests together; a body
    /// that does not fit gets 503 with Retry-After. At least --max-body-bytes [default: 256
    /// MiB, or --max-body-bytes when that is larger]
    #[arg(long, env = "VT_SERVE_MAX_INFLIGHT_BODY_BYTES")]
    pub max_inflight_body_bytes: Option<u64>,
    /// Largest image in pixels (width x height), checked from the header before decoding;
    /// larger ones get 413.
    #[arg(long, env = "VT_SERVE_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Hosts (comma-separated, `host` or `host:port`) that `{"url": ...}` inputs may be
    /// fetched from. Without it URL inputs are refused.
    #[arg(long, env = "VT_SERVE_ALLOW_URL_FETCH", value_delimiter = ',', value_parser = parse_host)]
    pub allow_url_fetch: Vec<String>,
    /// Web origins (comma-separated, e.g. `https://app.example.com`, or `*` for any) whose
    /// pages may call the API from the browser (CORS). Without it only pages served by
    /// vt-serve itself may.
    #[arg(long, env = "VT_SERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_allow_origin: Vec<HeaderValue>,
    /// CPU threads for the model and for image decoding (default: RAYON_NUM_THREADS when
    /// set, else all cores).
    #[arg(long, env = "VT_SERVE_THREADS", value_parser = clap::value_parser!(u32).range(1..=vt_model::threads::MAX_THREADS as i64))]
    pub threads: Option<u32>,
    /// Check the checkpoint's files every this many milliseconds, and reload it when they
    /// changed (as Triton's --model-control-mode=poll): a server of a training run's `best/`
    /// serves each better model once vt-train writes it. SIGHUP reloads with or without it.
    #[arg(long, env = "VT_SERVE_RELOAD_POLL_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub reload_poll_ms: Option<u64>,
    /// Answer the inference and model routes (HTTP and gRPC) only for requests carrying
    /// `Authorization: Bearer KEY`, others 401 (gRPC: UNAUTHENTICATED); the health and
    /// readiness probes, /metrics and the page stay open. Prefer the environment variable or
    /// --api-key-file: a flag's value shows in the process list
    #[arg(
        long,
        env = "VT_SERVE_API_KEY",
        hide_env_values = true,
        value_name = "KEY",
        allow_hyphen_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<GivenKey>,
    /// --api-key read from this file (a mounted secret), its trailing line break left out.
    #[arg(long, env = "VT_SERVE_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Log lines on stderr, one per answered request among them: `text` to read, `json` (one
    /// object per line) for log collectors. RUST_LOG filters them (e.g.
    /// `RUST_LOG=info,vt_serve::access=off` leaves out the request lines).
    #[arg(
        long,
        env = "VT_SERVE_LOG_FORMAT",
        value_enum,
        ignore_case = true,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A host of `--allow-url-fetch`, without the spaces around it in a list
/// (`a.example, b.example`).
fn parse_host(host: &str) -> Result<String, String> {
    Ok(host.trim().to_owned())
}

/// `*`, or an origin as browsers send it: `scheme://host[:port]`, no path; the spaces
/// around it in a list (`https://a.example, https://b.example`) are not part of it.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let origin = origin.trim();
    let well_formed = origin == "*"
        || origin.split_once("://").is_some_and(|(scheme, rest)| {
            !scheme.is_empty()
                && !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
    match HeaderValue::from_str(origin) {
        Ok(value) if well_formed => Ok(value),
        _ => Err("an origin is `*` or `scheme://host[:port]`, e.g. https://app.example.com".into()),
    }
}

/// The server's flag that `value` is (`--port` or `--port=8080`), if it is one.
pub fn server_flag(value: &str) -> Option<String> {
    let flag = value.strip_prefix("--")?;
    let flag = flag.split('=').next().unwrap_or(flag);
    let args = <ServeArgs as clap::Args>::augment_args(clap::Command::new("vt-serve"));
    let known = args.get_arguments().any(|arg| arg.get_long() == Some(flag));
    known.then(|| flag.to_owned())
}

/// Why an `--api-key` whose value is the server's `flag` is refused.
pub fn flag_taken_for_key(flag: &str) -> String {
    format!("its value is the flag --{flag}: give the key after --api-key")
}

/// A name that stands in a URL path as it is: letters, digits, `.`, `_` and `-`, but not
/// `.` or `..`, which clients resolve away (`/v2/models/./ready` is sent as
/// `/v2/models/ready`).
fn parse_model_name(name: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name == "." || name == ".." {
        Err("`.` and `..` are no names in a URL path, which clients resolve away".into())
    } else if !name.is_empty() && name.chars().all(allowed) {
        Ok(name.to_owned())
    } else {
        Err("use letters, digits, `.`, `_` and `-` only (it is part of URLs)".into())
    }
}

/// Options that each parse but do not go together.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(
        "--max-inflight-body-bytes ({inflight}) is less than --max-body-bytes ({body}): a body \
         of the largest allowed size could never be read; raise the first or lower the second"
    )]
    BodyBudgetBelowBodyLimit { inflight: u64, body: u64 },
    #[error("--grpc-port is --port ({0}): give the gRPC service a port of its own")]
    SamePort(u16),
    #[error("--api-key (or VT_SERVE_API_KEY): {0}")]
    ApiKey(String),
    #[error("--api-key-file (or VT_SERVE_API_KEY_FILE) {path}: {cause}")]
    ApiKeyFile { path: PathBuf, cause: String },
}

impl ServeArgs {
    pub fn threads(&self) -> usize {
        self.threads
            .map_or_else(vt_model::threads::default_compute_threads, |n| n as usize)
    }

    /// `--max-inflight-body-bytes`, or its default: one that never keeps a body of the
    /// largest allowed size from being read.
    pub fn inflight_body_bytes(&self) -> u64 {
        self.max_inflight_body_bytes
            .unwrap_or(DEFAULT_INFLIGHT_BODY_BYTES.max(self.max_body_bytes))
    }

    /// The key requests must present: `--api-key-file`'s, or `--api-key`'s (or its
    /// variable's); none when neither is given.
    pub fn api_key(&self) -> Result<Option<ApiKey>, ArgsError> {
        if let Some(path) = &self.api_key_file {
            return ApiKey::read(path)
                .map(Some)
                .map_err(|cause| ArgsError::ApiKeyFile {
                    path: path.clone(),
                    cause,
                });
        }
        let Some(GivenKey(key)) = &self.api_key else {
            return Ok(None);
        };
        // A key may start with `-`; one that reads as a flag of the server is a missing key
        // whose next flag was taken for it.
        if let Some(flag) = server_flag(key) {
            return Err(ArgsError::ApiKey(flag_taken_for_key(&flag)));
        }
        ApiKey::parse(key).map(Some).map_err(ArgsError::ApiKey)
    }

    /// Checks what clap checks of no single option.
    pub fn validate(&self) -> Result<(), ArgsError> {
        if self.port != 0 && self.grpc_port == Some(self.port) {
            return Err(ArgsError::SamePort(self.port));
        }
        match self.max_inflight_body_bytes {
            Some(inflight) if inflight < self.max_body_bytes => {
                Err(ArgsError::BodyBudgetBelowBodyLimit {
                    inflight,
                    body: self.max_body_bytes,
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// `--bf16-products` reads as in vt-train: bare, or with a value.
    #[test]
    fn bf16_products_takes_an_optional_value() {
        for (given, expected) in [
            (&[][..], false),
            (&["--bf16-products"][..], true),
            (&["--bf16-products", "true"][..], true),
            (&["--bf16-products=false"][..], false),
            // As environment variables are often set.
            (&["--bf16-products", "1"][..], true),
            (&["--bf16-products", "off"][..], false),
        ] {
            let line = ["vt-serve", "--checkpoint", "c"].iter().chain(given);
            let cli = Cli::try_parse_from(line).unwrap();
            assert_eq!(cli.args.bf16_products, expected, "{given:?}");
        }
    }

    /// A model name is part of `/v2/models/NAME/...` URLs, so it is one plain path segment.
    #[test]
    fn model_names_are_url_path_segments() {
        let parse = |name: &str| {
            Cli::try_parse_from(["vt-serve", "--checkpoint", "c", "--model-name", name])
                .map(|cli| cli.args.model_name)
        };
        assert_eq!(
            parse("intel-vt_2.1").unwrap().as_deref(),
            Some("intel-vt_2.1")
        );
        for bad in ["", "a/b", "a b", "mod%65l", "é"] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains("part of URLs"), "{bad:?}: {error}");
        }
        for dots in [".", ".."] {
            let error = parse(dots).unwrap_err().to_string();
            assert!(error.contains("clients resolve away"), "{dots:?}: {error}");
        }
        assert_eq!(parse("..a").unwrap().as_deref(), Some("..a"));
    }

    #[test]
    fn the_body_budget_holds_at_least_one_body_of_the_largest_size() {
        let parse = |extra: &[&str]| {
            let line = ["vt-serve", "--checkpoint", "c"].iter().chain(extra);
            Cli::try_parse_from(line).unwrap().args
        };
        let defaults = parse(&[]);
        assert_eq!(defaults.inflight_body_bytes(), 256 << 20);
        assert!(defaults.validate().is_ok());
        // A body limit above the default budget raises the default with it.
        let large = parse(&["--max-body-bytes", "300000000"]);
        assert_eq!(large.inflight_body_bytes(), 300_000_000);
        assert!(large.validate().is_ok());
        let equal = [
            "--max-body-bytes",
            "1000",
            "--max-inflight-body-bytes",
            "1000",
        ];
        assert!(parse(&equal).validate().is_ok());
        let error = parse(&[
            "--max-body-bytes",
            "1001",
            "--max-inflight-body-bytes",
            "1000",
        ])
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("--max-inflight-body-bytes (1000) is less than --max-body-bytes (1001)"),
            "{error}"
        );
    }

    /// Both services on one port, or a queue whose slots would not fit in memory, are refused
    /// before anything starts.
    #[test]
    fn ports_and_queue_sizes_that_cannot_serve_are_refused() {
        let parse = |extra: &[&str]| {
            let line = ["vt-serve", "--checkpoint", "c"].iter().chain(extra);
            Cli::try_parse_from(line).map(|cli| cli.args)
        };
        let error = parse(&["--port", "9000", "--grpc-port", "9000"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("--grpc-port is --port (9000)"), "{error}");
        // Two free ports, whatever they are.
        let free = parse(&["--port", "0", "--grpc-port", "0"]).unwrap();
        assert!(free.validate().is_ok());
        assert!(parse(&["--queue", "65536"]).is_ok());
        assert!(parse(&["--queue", "65537"]).is_err());
    }

    /// A key may start with `-` (as `secrets.token_urlsafe` keys do) without being read as
    /// a flag, which clap would refuse quoting it.
    #[test]
    fn api_keys_may_start_with_a_dash() {
        let cli = Cli::try_parse_from(["vt-serve", "--checkpoint", "c", "--api-key", "--Xs3cret"])
            .unwrap();
        let key = cli.args.api_key().unwrap().unwrap();
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_static("Bearer --Xs3cret"),
        );
        assert!(key.admits(&headers));
        // A key left out, the next flag taken for it: refused, naming the flag.
        for taken in ["--max-batch=4", "--port"] {
            let line = ["vt-serve", "--checkpoint", "c", "--api-key", taken];
            let err = Cli::try_parse_from(line)
                .unwrap()
                .args
                .api_key()
                .unwrap_err();
            assert!(
                err.to_string().contains("its value is the flag --"),
                "{err}"
            );
        }
    }

    #[test]
    fn cors_origins_are_star_or_scheme_and_host() {
        let parse = |origins: &str| {
            Cli::try_parse_from([
                "vt-serve",
                "--checkpoint",
                "c",
                "--cors-allow-origin",
                origins,
            ])
            .map(|cli| cli.args.cors_allow_origin)
        };
        let origins = parse("https://a.example,http://localhost:3000").unwrap();
        assert_eq!(origins, ["https://a.example", "http://localhost:3000"]);
        // A list as people write it, spaces after the commas.
        let origins = parse("https://a.example, http://localhost:3000 ").unwrap();
        assert_eq!(origins, ["https://a.example", "http://localhost:3000"]);
        assert_eq!(parse("*").unwrap(), ["*"]);
        for bad in [
            "a.example",
            "https://a.example/page",
            "https://",
            "://a",
            "https://a b",
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains("scheme://host"), "{bad:?}: {error}");
        }
    }
}
