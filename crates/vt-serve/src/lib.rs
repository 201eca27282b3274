//! Serving VT-ResNet predictions: the offline `predict` command and the HTTP server.
//!
//! The server: [`Server::bind`] loads the checkpoint into [`state::AppState`]; [`router`]
//! assembles the routes of [`handlers`]; [`content_coding`] bounds and refuses compressed
//! bodies around the decompression layer, inside which [`body_budget`] bounds the body bytes
//! all requests hold at once, and [`connection`] closes connections whose request was
//! answered before its body was read; [`input`] reads the images of a request, which are decoded on
//! blocking threads and queued to the [`batcher`]'s model thread, behind [`admission`]
//! control. [`open_inference`] speaks the Open Inference Protocol (KServe V2,
//! Triton) over the same pipeline, over HTTP and, on the gRPC port, as the gRPC service
//! Triton's and KServe's clients call; [`instances`] speaks the `{"instances"}` JSON of KServe V1,
//! TensorFlow Serving and Vertex AI; [`auth`] checks `--api-key`. [`AppState::reload`] (SIGHUP, or [`poll`]'s checks) swaps in a
//! newly loaded model. Every error is an [`ApiError`].

pub mod access;
pub mod admission;
pub mod args;
pub mod auth;
pub mod batcher;
pub mod body_budget;
pub mod classifier;
pub mod connection;
pub mod content_coding;
pub mod error;
pub mod fetch;
pub mod handlers;
pub mod input;
pub mod instances;
pub mod metrics;
pub mod open_inference;
pub mod poll;
pub mod predict;
pub mod router;
pub mod server;
pub mod state;

pub use args::ServeArgs;
pub use classifier::{Classifier, ClassifyError, Label, Prediction, Preprocessor};
pub use error::ApiError;
pub use router::router;
pub use server::{shutdown_signals, Server, Stopped};
pub use state::{AppState, StartError};
