//! `vt-serve`: serve a VT-ResNet checkpoint over HTTP, or score images offline.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use futures_util::StreamExt;
use tracing_subscriber::EnvFilter;
use vt_serve::args::{flag_taken_for_key, server_flag, LogFormat};
use vt_serve::predict::{self, PredictArgs};
use vt_serve::{shutdown_signals, ServeArgs, Server, Stopped};

/// The log target of the error that ends the server: logged whatever RUST_LOG says, as
/// the text format's `Error:` line is printed.
const FATAL: &str = "vt_serve::fatal";

/// With no subcommand, serves (the server's flags go at the top level). Read by [`parse`],
/// not by the derived parser.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Serve VT-ResNet image classifiers",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    serve: Option<ServeArgs>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve predictions over HTTP (the default).
    Serve(ServeArgs),
    /// Score image files offline and print one JSON object per line per image.
    Predict(PredictArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    vt_model::allocator::retain_freed_memory();
    unset_empty_settings();
    match parse() {
        Command::Predict(args) => Ok(predict::run(&args).map(|()| ExitCode::SUCCESS)?),
        Command::Serve(args) => match serve(&args) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            // A log collector reads JSON lines only: the error that ends the server is one,
            // which no RUST_LOG leaves out (see `FATAL`).
            Err(e) if args.log_format == LogFormat::Json => {
                tracing::error!(target: FATAL, "{e:#}");
                Ok(ExitCode::FAILURE)
            }
            Err(e) => Err(e),
        },
    }
}

/// The subcommand, `serve` when none is given. The server's flags at the top level read
/// their environment variables (`VT_SERVE_PORT`) only without a subcommand: clap would read
/// and check them beside one too, refusing a value the subcommand's own flag replaces, or
/// that `predict` never reads. The derived parser would then also build them, and refuse
/// them for want of a checkpoint.
fn parse() -> Command {
    let cli = Cli::command();
    // A subcommand comes first: the top-level flags conflict with one. (`help` prints them
    // with their variables.)
    let first = std::env::args_os().nth(1);
    let subcommand = first.is_some_and(|first| {
        cli.get_subcommands()
            .any(|command| first == command.get_name())
    });
    let cli = if subcommand {
        cli.mut_args(|arg| arg.env(None))
    } else {
        cli
    };
    let matches = cli.clone().try_get_matches().unwrap_or_else(|e| {
        // `--api-key --port 8080` takes `--port` for the key, and refuses 8080 as a
        // subcommand: the key left out is the cause to name.
        let args: Vec<String> = std::env::args().collect();
        let taken = args
            .windows(2)
            .find_map(|pair| (pair[0] == "--api-key").then(|| server_flag(&pair[1]))?);
        match taken {
            Some(flag) => cli
                .clone()
                .error(
                    ErrorKind::ValueValidation,
                    format!("--api-key: {}", flag_taken_for_key(&flag)),
                )
                .exit(),
            None => name_the_variable(e, &cli).exit(),
        }
    });
    let command = match matches.subcommand_name() {
        Some(_) => Command::from_arg_matches(&matches),
        // clap requires --checkpoint when no subcommand is given.
        None => ServeArgs::from_arg_matches(&matches).map(Command::Serve),
    };
    let command = command.unwrap_or_else(|e| e.exit());
    // Options that do not go together are a usage error, as clap's own conflicts are.
    if let Command::Serve(args) = &command {
        if let Err(e) = args.validate() {
            Cli::command().error(ErrorKind::ArgumentConflict, e).exit();
        }
    }
    command
}

/// Adds to clap's error about a refused value the environment variable it came from: the
/// error names the flag, which a container's settings never show.
fn name_the_variable(mut error: clap::Error, cli: &clap::Command) -> clap::Error {
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return error;
    }
    let Some(ContextValue::String(refused)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let given = |long: &str| {
        std::env::args_os().skip(1).any(|arg| {
            let arg = arg.to_string_lossy();
            arg.strip_prefix("--")
                .and_then(|arg| arg.strip_prefix(long))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    };
    // The top-level flags, or `serve`'s.
    let mut arguments = cli.get_arguments().chain(
        cli.get_subcommands()
            .flat_map(|command| command.get_arguments()),
    );
    let variable = arguments.find_map(|arg| {
        let (long, variable) = (arg.get_long()?, arg.get_env()?);
        let named = refused
            .strip_prefix("--")
            .and_then(|refused| refused.strip_prefix(long))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '));
        (named && !given(long) && std::env::var_os(variable).is_some())
            .then(|| variable.to_string_lossy().into_owned())
    });
    if let Some(variable) = variable {
        let mut tips = match error.get(ContextKind::Suggested) {
            Some(ContextValue::StyledStrs(tips)) => tips.clone(),
            _ => Vec::new(),
        };
        tips.push(format!("the value comes from the environment variable {variable}").into());
        error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    }
    error
}

/// Removes the `VT_SERVE_*` environment variables that are set but empty or blank (as Helm
/// charts and Compose files leave optional ones), so that they read as unset rather than as
/// an empty value, which most flags refuse. Before any thread starts, as `remove_var` needs.
/// The API key's are kept, to be refused: a secret that came out empty must not leave the
/// server open.
fn unset_empty_settings() {
    for (name, value) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if value.to_string_lossy().trim().is_empty()
            && name_text.starts_with("VT_SERVE_")
            && !name_text.starts_with("VT_SERVE_API_KEY")
        {
            std::env::remove_var(name);
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    // A blank RUST_LOG (as Helm charts and Compose files leave optional variables) is unset;
    // one that does not parse is said to be so, once logging works.
    let (filter, unread_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
        },
        Err(std::env::VarError::NotUnicode(_)) => {
            (EnvFilter::new("info"), Some("not UTF-8".to_owned()))
        }
        _ => (EnvFilter::new("info"), None),
    };
    let fatal = format!("{FATAL}=error")
        .parse()
        .context("the fatal errors' log directive")?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter.add_directive(fatal))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe: the log reader went away)
        // is dropped. Otherwise the subscriber reports the failure with `eprintln!`, which
        // panics on that same pipe, inside whatever request was logging.
        .log_internal_errors(false);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // The event's fields at the top level and the request's (method, path, id) under
        // "span": what log queries filter on.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    if let Some(e) = unread_filter {
        tracing::warn!("RUST_LOG is not a log filter ({e}): logging at info");
    }
    // Before any thread starts: candle reads these settings once.
    vt_model::threads::set_compute_threads(args.threads());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        // Caught from before the model loads: as a container's PID 1 the process would not
        // be ended by a signal it has no handler for. One while the model loads ends the
        // process at once (nothing is served yet, and Ctrl-C must stop a slow load); from
        // before the address is printed on, it shuts the server down.
        let mut signals = Box::pin(shutdown_signals()?);
        let server = tokio::select! {
            server = Server::bind(args) => server?,
            Some(()) = signals.next() => {
                tracing::info!("shutdown signal while the checkpoint was loading: stopped");
                return Ok(());
            }
        };
        let addr = server.local_addr()?;
        let grpc_addr = server.grpc_local_addr()?;
        // The HTTP address first: tools read the first line for it.
        let urls = [
            Some(format!("http://{addr}")),
            grpc_addr.map(|a| format!("grpc://{a}")),
        ];
        let mut stdout = std::io::stdout().lock();
        urls.iter()
            .flatten()
            .try_for_each(|url| match args.log_format {
                LogFormat::Text => writeln!(stdout, "listening on {url}"),
                // Standard output and error often end in one log: JSON lines both.
                LogFormat::Json => writeln!(stdout, "{}", serde_json::json!({ "listening": url })),
            })
            .and_then(|()| stdout.flush())
            .context("cannot print the addresses listened on to standard output")?;
        drop(stdout);
        // The settings an operator checks a deployment by (the device `auto` chose). The
        // model itself is not held: a reload replaces it.
        let (device, dtype) = {
            let info = &server.state().batcher.current().info;
            (info.device.clone(), info.dtype.clone())
        };
        tracing::info!(
            checkpoint = %args.checkpoint.display(),
            %addr,
            grpc_addr = grpc_addr.map(tracing::field::display),
            %device,
            %dtype,
            threads = args.threads(),
            max_batch = args.max_batch,
            max_delay_ms = args.max_delay_ms,
            queue = args.queue,
            timeout_ms = args.timeout_ms,
            reload_poll_ms = args.reload_poll_ms,
            api_key = server.state().api_key.is_some(),
            version = env!("CARGO_PKG_VERSION"),
            "serving"
        );
        if server.run(signals).await? == Stopped::CutShort {
            anyhow::bail!(
                "stopped by a second shutdown signal before the requests in flight were answered"
            );
        }
        tracing::info!("stopped");
        Ok(())
    });
    // Not waiting for blocking work still running (a reload's checkpoint load): dropping the
    // runtime would, past the drain and any second signal.
    runtime.shutdown_background();
    served
}
