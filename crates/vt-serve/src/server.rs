//! Starting and stopping the server: load the checkpoint, bind, serve until a shutdown
//! signal, then finish the requests in flight.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::args::ServeArgs;
use crate::router::router;
use crate::state::{AppState, StartError};

pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
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
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        self.listener.local_addr().map_err(StartError::Serve)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting connections and returns
    /// once every request in flight has been answered. Every request ends within the
    /// request timeout, so connections still open a moment past it carry none (a client that
    /// never finished sending its headers): they are closed rather than waited for.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let state = Arc::clone(&self.state);
        let began = Arc::new(Notify::new());
        let signal = Arc::clone(&began);
        let app = router(Arc::clone(&self.state));
        let serving = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            state.stop_accepting();
            tracing::info!("shutting down: finishing requests in flight");
            signal.notify_one();
        });
        let drain = self.state.limits.timeout + DRAIN_MARGIN;
        tokio::select! {
            served = serving.into_future() => served.map_err(StartError::Serve),
            () = async { began.notified().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(
                    "connections still open {:.1}s after shutdown began carry no request: \
                     closing them",
                    drain.as_secs_f64()
                );
                Ok(())
            }
        }
    }
}

/// How long past the request timeout shutdown waits for connections to close.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

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
