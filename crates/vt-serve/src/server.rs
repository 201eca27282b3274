//! Starting and stopping the server: load the checkpoint, bind (the HTTP port, and the
//! gRPC port when there is one), serve until a shutdown signal, then finish the requests in
//! flight on both. On Unix, SIGHUP reloads the checkpoint ([`AppState::reload`]), and so
//! do `--reload-poll-ms`'s checks when its files change.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::response::Response;
use axum::serve::Listener;
use axum::Router;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio_io_timeout::TimeoutStream;

use crate::args::ServeArgs;
use crate::open_inference::grpc;
use crate::poll::Poll;
use crate::router::router;
use crate::state::{AppState, StartError};

pub struct Server {
    listener: TcpListener,
    /// `--grpc-port`'s, for the Open Inference Protocol's gRPC service.
    grpc_listener: Option<TcpListener>,
    state: Arc<AppState>,
    /// SIGHUP, listened for from the start of `bind` on: its default action would end the
    /// process. One that arrives while the checkpoint loads is a reload once serving.
    #[cfg(unix)]
    hangup: Signal,
    /// `--reload-poll-ms`'s checks, started with the serving.
    poll: Option<Poll>,
}

/// How [`Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every request in flight was answered (or its connection closed past the drain).
    Drained,
    /// A second shutdown signal ended the drain at once: requests still in flight were
    /// dropped.
    CutShort,
}

impl Server {
    /// Loads the checkpoint (off the async runtime) and binds the listening socket.
    pub async fn bind(args: &ServeArgs) -> Result<Server, StartError> {
        #[cfg(unix)]
        let hangup = listen("SIGHUP (reloads)", SignalKind::hangup())?;
        let load_args = args.clone();
        let state = tokio::task::spawn_blocking(move || AppState::load(&load_args))
            .await
            .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
        let listener = bind(&args.host, args.port, "--port").await?;
        let grpc_listener = match args.grpc_port {
            Some(port) => Some(bind(&args.host, port, "--grpc-port").await?),
            None => None,
        };
        Ok(Server {
            listener,
            grpc_listener,
            state: Arc::new(state),
            #[cfg(unix)]
            hangup,
            poll: Poll::new(args),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        self.listener.local_addr().map_err(StartError::Address)
    }

    /// The gRPC service's address, when `--grpc-port` asked for one.
    pub fn grpc_local_addr(&self) -> Result<Option<SocketAddr>, StartError> {
        self.grpc_listener
            .as_ref()
            .map(|listener| listener.local_addr().map_err(StartError::Address))
            .transpose()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` yields, then stops accepting connections and returns once
    /// every request in flight has been answered, or at once when `shutdown` yields again.
    /// Every request ends within the request timeout, so connections still open a moment
    /// past it carry none (a client still sending its headers): they are closed rather than
    /// waited for.
    pub async fn run(
        self,
        shutdown: impl Stream<Item = ()> + Send + 'static,
    ) -> Result<Stopped, StartError> {
        let Server {
            mut listener,
            mut grpc_listener,
            state,
            #[cfg(unix)]
            hangup,
            poll,
        } = self;
        #[cfg(unix)]
        let reloads = tokio::spawn(reload_on_hangup(Arc::clone(&state), hangup));
        let polls = poll.map(|poll| tokio::spawn(poll.run(Arc::clone(&state))));
        let app = router(Arc::clone(&state));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(state.limits.header_timeout);
        let grpc_app = grpc::router(Arc::clone(&state));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        // Flow-control windows sized to the connection's bandwidth-delay product: they start
        // at HTTP/2's 64 KiB (below hyper's fixed 1 MiB default) and grow as a fast link
        // needs. Pings find the peers gone without closing their connection mid-call.
        http2
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(GRPC_KEEP_ALIVE)
            .keep_alive_timeout(GRPC_KEEP_ALIVE);
        // Set when shutdown begins: every connection is asked to close then. Each holds a
        // receiver until it ends, which the drain waits for.
        let (stopping, _) = watch::channel(false);
        // Set by a second shutdown signal: every connection closes then.
        let (cut, _) = watch::channel(false);
        // Fused: a stream that ended is never polled again, and never yields.
        let mut shutdown = pin!(shutdown.fuse());
        loop {
            tokio::select! {
                // axum's accept retries after errors such as running out of file descriptors.
                (stream, peer) = Listener::accept(&mut listener) => {
                    let service = TowerToHyperService::new(app.clone());
                    let io = with_write_timeout(stream, state.limits.header_timeout);
                    let connection = http.serve_connection(io, service);
                    serve(connection, peer, None, stopping.subscribe(), cut.subscribe());
                }
                (stream, peer) = accept_grpc(&mut grpc_listener) => {
                    let streams = Streams::new();
                    let service = streams.track(TowerToHyperService::new(grpc_app.clone()));
                    let io = with_write_timeout(stream, state.limits.header_timeout);
                    let connection = http2.serve_connection(io, service);
                    let grpc = Some((streams, state.limits.header_timeout));
                    serve(connection, peer, grpc, stopping.subscribe(), cut.subscribe());
                }
                Some(()) = shutdown.next() => break,
            }
        }
        drop(listener);
        drop(grpc_listener);
        // No reload starts while draining; one under way finishes on its blocking thread.
        #[cfg(unix)]
        reloads.abort();
        if let Some(polls) = polls {
            polls.abort();
        }
        state.stop_accepting();
        stopping.send_replace(true);
        tracing::info!("shutting down: finishing requests in flight");
        let drain = state.limits.timeout + DRAIN_MARGIN;
        let mut closed = pin!(stopping.closed());
        tokio::select! {
            drained = tokio::time::timeout(drain, &mut closed) => {
                if drained.is_err() {
                    tracing::warn!(
                        "connections still open {:.1}s after shutdown began carry no \
                         request: closing them",
                        drain.as_secs_f64()
                    );
                }
                Ok(Stopped::Drained)
            }
            Some(()) = shutdown.next() => {
                state.cut_short();
                tracing::warn!(
                    "second shutdown signal: closing the connections still open, requests \
                     in flight unanswered"
                );
                // Their requests are dropped, and logged, before the process ends.
                cut.send_replace(true);
                if tokio::time::timeout(DRAIN_MARGIN, closed).await.is_err() {
                    tracing::warn!("connections still open after the cut: leaving them");
                }
                Ok(Stopped::CutShort)
            }
        }
    }
}

/// Listens on `host:port`, which `flag` set.
async fn bind(host: &str, port: u16, flag: &str) -> Result<TcpListener, StartError> {
    // An IPv6 address as URLs (and the startup line) write it: `[::1]`.
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    TcpListener::bind((unbracketed, port))
        .await
        .map_err(|cause| {
            let hint = match cause.kind() {
                std::io::ErrorKind::AddrInUse => format!(
                    " (another process listens there: stop it, or choose another {flag}; \
                 {flag} 0 takes a free one)"
                ),
                std::io::ErrorKind::PermissionDenied if port < 1024 => {
                    format!(" (ports below 1024 need privileges: choose a {flag} from 1024 up)")
                }
                _ => String::new(),
            };
            StartError::Bind {
                addr: format!("{host}:{port}"),
                cause,
                hint,
            }
        })
}

/// The next gRPC connection; never, without a gRPC port.
async fn accept_grpc(listener: &mut Option<TcpListener>) -> (TcpStream, SocketAddr) {
    match listener {
        Some(listener) => Listener::accept(listener).await,
        None => std::future::pending().await,
    }
}

/// Whether a connection ended for [`with_write_timeout`].
fn write_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |error| error.source()).any(|error| {
        error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// `stream`, whose writes fail once they have made no progress for `timeout`: a client that
/// stops reading its answers (its receive window full) is let go, as one that stops sending
/// its request is by the header-read timeout.
fn with_write_timeout(
    stream: TcpStream,
    timeout: Duration,
) -> TokioIo<Pin<Box<TimeoutStream<TcpStream>>>> {
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(timeout));
    TokioIo::new(Box::pin(stream))
}

/// Serves `connection` on a task of its own until it ends. It is asked to close (HTTP/1:
/// after the request in flight; HTTP/2: by a GOAWAY, after which its client sends new calls
/// on a new connection while those in flight are answered) when `stopping` turns true, and
/// a gRPC connection also once it has had no call for the time `grpc` gives with its
/// [`Streams`]. A gRPC connection still open [`SHUTDOWN_GRACE`] after its last call then
/// is dropped (a client that never sent HTTP/2's preface, or never acknowledges the
/// GOAWAY's ping); any connection is dropped when `cut` turns true or goes (the server is
/// done with it). The task holds `stopping` until the connection ends: the drain waits
/// for every receiver.
fn serve<C>(
    connection: C,
    peer: SocketAddr,
    grpc: Option<(Streams, Duration)>,
    mut stopping: watch::Receiver<bool>,
    mut cut: watch::Receiver<bool>,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: std::error::Error + Send + 'static,
{
    let (streams, idle_after) = grpc.unzip();
    // Never, for an HTTP/1 connection.
    let quiet_for = move |wait: Duration| {
        let streams = streams.clone();
        async move {
            match streams {
                Some(streams) => streams.quiet_for(wait).await,
                None => std::future::pending().await,
            }
        }
    };
    tokio::spawn(async move {
        let served = async {
            let mut connection = pin!(connection);
            tokio::select! {
                result = connection.as_mut() => return Some(result),
                () = quiet_for(idle_after.unwrap_or(Duration::MAX)) => {
                    tracing::debug!("connection from {peer}: idle, closing");
                }
                _ = stopping.wait_for(|&stop| stop) => {}
            }
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => Some(result),
                () = quiet_for(SHUTDOWN_GRACE) => None,
            }
        };
        tokio::select! {
            served = served => match served {
                // The answers it was sent are in the access log as answered.
                Some(Err(e)) if write_timed_out(&e) => tracing::warn!(
                    "connection from {peer}: closed, its client stopped reading its answers \
                     for --header-timeout-ms"
                ),
                Some(Err(e)) => tracing::debug!("connection from {peer}: {e}"),
                Some(Ok(())) => {}
                None => tracing::debug!("connection from {peer}: dropped, still open after its last call"),
            },
            _ = cut.wait_for(|&cut| cut) => {
                tracing::debug!("connection from {peer}: closed by a second shutdown signal");
            }
        }
    });
}

/// How often a gRPC connection is pinged when it is silent, and how long its peer has to
/// answer before the connection is closed.
const GRPC_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The streams (calls) of a gRPC connection. hyper's HTTP/2 server has no counterpart of
/// HTTP/1's header-read timeout, and its graceful shutdown waits on a connection that never
/// sent its preface: [`serve`] asks a connection to close once it has had no stream for
/// `--header-timeout-ms`, and drops one still open a moment after its last stream once it
/// was asked to close (an answer's body is dropped before hyper has sent all of its frames,
/// so hyper's graceful shutdown is what writes the last answers).
#[derive(Clone)]
struct Streams(Arc<watch::Sender<usize>>);

/// One stream, counted until it is dropped.
struct Open(Arc<watch::Sender<usize>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open -= 1);
    }
}

impl Streams {
    fn new() -> Streams {
        Streams(Arc::new(watch::Sender::new(0)))
    }

    /// `service`, each call counted until its answer's body is dropped: sent, or abandoned.
    fn track(
        &self,
        service: TowerToHyperService<Router>,
    ) -> impl Service<
        hyper::Request<Incoming>,
        Response = Response,
        Error = Infallible,
        Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
    > + Clone {
        let streams = self.clone();
        service_fn(move |request| {
            streams.0.send_modify(|open| *open += 1);
            let open = Open(Arc::clone(&streams.0));
            let answer = service.call(request);
            async move {
                let response = answer.await?;
                // The count goes with the body, whose end is the stream's.
                Ok(response.map(|body| {
                    AxumBody::new(body.map_err(move |e| {
                        let _ = &open;
                        e
                    }))
                }))
            }
        })
    }

    /// Completes once the connection has had no stream for `wait`.
    async fn quiet_for(self, wait: Duration) {
        let mut streams = self.0.subscribe();
        loop {
            // Never an error: `self` holds the sender.
            let _ = streams.wait_for(|&open| open == 0).await;
            tokio::select! {
                () = tokio::time::sleep(wait) => return,
                _ = streams.changed() => {}
            }
        }
    }
}

/// How long a gRPC connection asked to close is left to hyper's graceful shutdown after its
/// last stream: enough to write the last answers and close, which needs the client to
/// answer a ping; a client that never does is not waited for longer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long past the request timeout shutdown waits for connections to close.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// Reloads the checkpoint at each SIGHUP, one reload at a time. SIGHUPs that arrive during
/// a reload are queued as one more reload after it: the checkpoint may have changed again
/// after this one read it.
#[cfg(unix)]
async fn reload_on_hangup(state: Arc<AppState>, mut hangup: Signal) {
    while hangup.recv().await.is_some() {
        // `reload` logs and counts a failure, and the previous model keeps serving.
        let _ = state.reload().await;
    }
}

/// A stream of `kind`, named `name` should it fail.
#[cfg(unix)]
fn listen(name: &'static str, kind: SignalKind) -> Result<Signal, StartError> {
    signal(kind).map_err(|cause| StartError::Signal { name, cause })
}

/// Yields at each SIGINT (Ctrl-C) and, on Unix, SIGTERM, from its call on: the first
/// begins the shutdown, a second cuts its drain short ([`Server::run`]).
#[cfg(unix)]
pub fn shutdown_signals() -> Result<impl Stream<Item = ()> + Send + 'static, StartError> {
    let interrupt = listen("SIGINT (shutdown)", SignalKind::interrupt())?;
    let terminate = listen("SIGTERM (shutdown)", SignalKind::terminate())?;
    Ok(futures_util::stream::unfold(
        (interrupt, terminate),
        |(mut interrupt, mut terminate)| async move {
            tokio::select! {
                Some(()) = interrupt.recv() => {}
                Some(()) = terminate.recv() => {}
                else => return None,
            }
            Some(((), (interrupt, terminate)))
        },
    ))
}

/// Yields at each Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signals() -> Result<impl Stream<Item = ()> + Send + 'static, StartError> {
    Ok(futures_util::stream::unfold((), |()| async {
        tokio::signal::ctrl_c().await.ok()?;
        Some(((), ()))
    }))
}
