//! Starting and stopping the server: load the checkpoint, bind, serve until a shutdown
//! signal, then finish the requests in flight. On Unix, SIGHUP reloads the checkpoint
//! ([`AppState::reload`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
#[cfg(unix)]
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::args::ServeArgs;
use crate::router::router;
use crate::state::{AppState, StartError};

pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    /// SIGHUP, listened for from `bind` on: its default action would end the process.
    #[cfg(unix)]
    hangup: Signal,
}

impl Server {
    /// Loads the checkpoint (off the async runtime) and binds the listening socket.
    pub async fn bind(args: &ServeArgs) -> Result<Server, StartError> {
        let load_args = args.clone();
        let state = tokio::task::spawn_blocking(move || AppState::load(&load_args))
            .await
            .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
        let addr = format!("{}:{}", args.host, args.port);
        let listener = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|cause| StartError::Bind { addr, cause })?;
        Ok(Server {
            listener,
            state: Arc::new(state),
            #[cfg(unix)]
            hangup: signal(SignalKind::hangup()).map_err(StartError::Signal)?,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        self.listener.local_addr().map_err(StartError::Address)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting connections and returns
    /// once every request in flight has been answered. Every request ends within the
    /// request timeout, so connections still open a moment past it carry none (a client
    /// still sending its headers): they are closed rather than waited for.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server {
            mut listener,
            state,
            #[cfg(unix)]
            hangup,
        } = self;
        #[cfg(unix)]
        let reloads = tokio::spawn(reload_on_hangup(Arc::clone(&state), hangup));
        let app = router(Arc::clone(&state));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(state.limits.header_timeout);
        let connections = GracefulShutdown::new();
        let mut shutdown = pin!(shutdown);
        loop {
            tokio::select! {
                // axum's accept retries after errors such as running out of file descriptors.
                (stream, peer) = Listener::accept(&mut listener) => {
                    let service = TowerToHyperService::new(app.clone());
                    let connection =
                        connections.watch(http.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("connection from {peer}: {e}");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        // No reload starts while draining; one under way finishes on its blocking thread.
        #[cfg(unix)]
        reloads.abort();
        state.stop_accepting();
        tracing::info!("shutting down: finishing requests in flight");
        let drain = state.limits.timeout + DRAIN_MARGIN;
        if tokio::time::timeout(drain, connections.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open {:.1}s after shutdown began carry no request: \
                 closing them",
                drain.as_secs_f64()
            );
        }
        Ok(())
    }
}

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

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
