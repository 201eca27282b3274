//! Starting and stopping the server: load the checkpoint, bind, serve until a shutdown
//! signal, then finish the requests in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

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
            .map_err(|source| StartError::Bind { addr, source })?;
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
    /// once every request in flight has been answered.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let state = Arc::clone(&self.state);
        let app = router(Arc::clone(&self.state));
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                state.stop_accepting();
                tracing::info!("shutting down: finishing requests in flight");
            })
            .await
            .map_err(StartError::Serve)
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
