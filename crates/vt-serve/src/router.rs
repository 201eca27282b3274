//! The HTTP routes, assembled in one place.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::header::{self, HeaderName};
use axum::http::{Extensions, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::access;
use crate::auth;
use crate::body_budget;
use crate::connection;
use crate::content_coding;
use crate::error::ApiError;
use crate::handlers;
use crate::instances;
use crate::metrics;
use crate::open_inference;
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = usize::try_from(state.limits.max_body_bytes).unwrap_or(usize::MAX);
    let cors = cors(&state.cors_origins);
    // Open to all: orchestrators' probes and scrapers send no credentials.
    let probes = Router::new()
        .route("/", get(handlers::page))
        // SageMaker's health check.
        .route("/ping", get(handlers::ready))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models/{model}", get(instances::model_ready));
    let api = Router::new()
        .route("/predict", post(handlers::predict))
        // SageMaker's inference contract.
        .route("/invocations", post(handlers::predict))
        // TorchServe's inference API, for the clients of a TorchServe deployment (whose
        // documentation sends images with `curl -T`, a PUT).
        .route(
            "/predictions/{model}",
            post(handlers::torchserve_predict).put(handlers::torchserve_predict),
        )
        .route(
            "/predictions/{model}/{version}",
            post(handlers::torchserve_predict).put(handlers::torchserve_predict),
        )
        .route("/v1/models", get(handlers::models))
        // KServe's V1 protocol and TensorFlow Serving's REST API (and Vertex AI's custom
        // containers, pointed at these routes): `POST /v1/models/NAME:predict` and KServe's
        // `POST /v1/models/NAME:explain` (`GET /v1/models/NAME`, its readiness, is a probe).
        .route("/v1/models/{model}", post(instances::predict))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_key,
        ));
    let routes = probes
        .merge(api)
        .merge(open_inference_routes(&state))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("the request handler panicked".into()).into_response()
        }))
        // Inside the decompression layer, so that the budget counts the bytes held: the
        // decoded ones.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.body_budget),
            body_budget::charge_body,
        ))
        // gzip and deflate bodies (tritonclient's request compression, `curl
        // --compressed`-style clients) are decoded as they are read, so the body limit bounds
        // the decoded size; other encodings pass through to the handlers, which refuse them
        // with a JSON error.
        .layer(middleware::from_fn(content_coding::decode_body))
        .layer(middleware::from_fn_with_state(
            state.limits.max_body_bytes,
            content_coding::bound_encoded_body,
        ))
        .layer(middleware::from_fn(
            content_coding::normalize_content_encoding,
        ))
        // Outside every layer that reads the body: whether it was read to its end is
        // whether all of it came.
        .layer(middleware::from_fn(connection::close_if_body_unread))
        // Answers are compressed when the client accepts it (Prometheus, browsers,
        // tritonclient's response compression), unless marked [`SendUncompressed`].
        .layer(
            CompressionLayer::new().compress_when(DefaultPredicate::new().and(
                |_: StatusCode, _: Version, _: &HeaderMap, extensions: &Extensions| {
                    extensions.get::<SendUncompressed>().is_none()
                },
            )),
        );
    let routes = match cors {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        // Outside every layer that answers (the panic catcher, the body checks, CORS
        // preflights), so that all answers are counted.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            metrics::track,
        ))
        // Outermost last: the id is set, then the request is logged under it, then the id is
        // copied to the answer.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(access::span)
                .on_request(())
                .on_response(access::answered)
                // Server errors are logged once, where they become answers (ApiError).
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(middleware::map_request(access::without_empty_id))
        .with_state(state)
}

/// Marks an answer to be sent uncompressed whatever the client accepts.
#[derive(Clone, Copy)]
pub struct SendUncompressed;

/// The Open Inference Protocol (KServe V2, Triton's HTTP API). Only successful inference
/// answers are compressed, as Triton does: tritonclient's asyncio client asks for gzip on
/// every request but decompresses nothing else.
fn open_inference_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let probes = Router::new()
        .route("/v2/health/live", get(open_inference::http::server_live))
        .route("/v2/health/ready", get(open_inference::http::server_ready))
        .route(
            "/v2/models/{model}/ready",
            get(open_inference::http::model_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(open_inference::http::model_ready),
        );
    let api = Router::new()
        .route("/v2", get(open_inference::http::server_metadata))
        .route(
            "/v2/models/{model}",
            get(open_inference::http::model_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}",
            get(open_inference::http::model_metadata),
        )
        .route(
            "/v2/models/{model}/config",
            get(open_inference::http::model_config),
        )
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(open_inference::http::model_config),
        )
        .route(
            "/v2/models/{model}/infer",
            post(open_inference::http::infer),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(open_inference::http::infer),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(state),
            auth::require_key,
        ));
    probes.merge(api).route_layer(middleware::from_fn(
        open_inference::http::compress_only_inference_answers,
    ))
}

/// Lets pages of the allowed origins call the API from a browser: answers their preflight
/// requests, and lets them read the headers clients need (the request id, the binary tensor
/// data's header length, when to retry).
fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allowed = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().cloned())
    };
    let headers = [
        header::CONTENT_TYPE,
        header::AUTHORIZATION,
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("inference-header-content-length"),
        header::CONTENT_ENCODING,
    ];
    Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(headers.clone())
            .expose_headers([
                headers[2].clone(),
                headers[3].clone(),
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}
