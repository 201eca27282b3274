//! Prometheus metrics: request counts and latencies by route (gRPC calls by method),
//! batch sizes, inference time, the number of requests waiting or arriving, the request
//! body bytes held, the model served, and model reloads.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::RequestPartsExt;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use tracing::Span;

use crate::access::{self, OnAbandon};
use crate::instances::Verb;
use crate::state::{AppState, ModelInfo};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    grpc_requests: IntCounterVec,
    grpc_request_seconds: HistogramVec,
    pub batch_size: Histogram,
    pub inference_seconds: Histogram,
    /// Images answered, by the class predicted: what the model sees, for drift alerts.
    predictions: IntCounterVec,
    /// The predicted class's probability, per image answered.
    confidence: Histogram,
    pub queue_depth: IntGauge,
    /// Images of requests waiting for room in the queue, at most `--queue`.
    pub queue_waiting: IntGauge,
    pub requests_arriving: IntGauge,
    /// Request body bytes held, of `--max-inflight-body-bytes`.
    pub inflight_body_bytes: IntGauge,
    /// Reloads (SIGHUP, `--reload-poll-ms`) by result, `ok` or `error`.
    pub model_reloads: IntCounterVec,
    /// 1, labelled with the model served ([`Metrics::serving`]).
    model_info: IntGaugeVec,
    model_loaded: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "vt_serve_requests_total",
                "HTTP requests answered, by route and status",
            ),
            &["route", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "vt_serve_request_duration_seconds",
                "HTTP request latency, by route",
            )
            .buckets(REQUEST_SECONDS.into()),
            &["route"],
        )?;
        // Apart from the HTTP series: a gRPC call's HTTP status is 200 whatever its outcome.
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "vt_serve_grpc_requests_total",
                "gRPC calls answered, by method and status code (OK, INVALID_ARGUMENT...)",
            ),
            &["method", "code"],
        )?;
        let grpc_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "vt_serve_grpc_request_duration_seconds",
                "gRPC call latency, by method",
            )
            .buckets(REQUEST_SECONDS.into()),
            &["method"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("vt_serve_batch_size", "Images per forward pass")
                // Powers of two up to --max-batch's largest.
                .buckets((0..=12).map(|power| f64::from(1u32 << power)).collect()),
        )?;
        let inference_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "vt_serve_inference_seconds",
                "Time of one forward pass (a batch, or its images asking for attention)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let predictions = IntCounterVec::new(
            Opts::new(
                "vt_serve_predictions_total",
                "Images answered, by the class predicted (the most probable)",
            ),
            &["class"],
        )?;
        let confidence = Histogram::with_opts(
            HistogramOpts::new(
                "vt_serve_prediction_confidence",
                "The predicted class's probability, per image answered",
            )
            .buckets(vec![0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]),
        )?;
        let queue_depth = IntGauge::new(
            "vt_serve_queue_depth",
            "Images admitted and not yet answered (decoding, waiting for a batch or running)",
        )?;
        let queue_waiting = IntGauge::new(
            "vt_serve_queue_waiting",
            "Images of requests waiting, in arrival order, for room in the queue (--queue), at \
             most --queue",
        )?;
        let requests_arriving = IntGauge::new(
            "vt_serve_requests_arriving",
            "Prediction requests being read or decoded, not yet queued; a forming batch waits \
             for them (up to --max-delay-ms)",
        )?;
        let inflight_body_bytes = IntGauge::new(
            "vt_serve_inflight_body_bytes",
            "Request body bytes (decoded) held by the requests being read or answered, at most \
             --max-inflight-body-bytes",
        )?;
        let model_reloads = IntCounterVec::new(
            Opts::new(
                "vt_serve_model_reloads_total",
                "Checkpoint reloads (SIGHUP, --reload-poll-ms), by result: ok, unchanged (the \
                 same weights and config: the model served stays), or error (the previous \
                 model kept serving)",
            ),
            &["result"],
        )?;
        // Both series exist from the start, so that an alert on errors sees them rise from 0.
        for result in ["ok", "unchanged", "error"] {
            model_reloads.with_label_values(&[result]);
        }
        let model_info = IntGaugeVec::new(
            Opts::new(
                "vt_serve_model_info",
                "The model served, in its labels: the checkpoint's name, its generation (1 \
                 at startup, one more per reload of changed files), the SHA-256 of its \
                 weights, its device and precision; valued 1",
            ),
            &["name", "generation", "sha256", "device", "dtype"],
        )?;
        let model_loaded = IntGauge::new(
            "vt_serve_model_loaded_timestamp_seconds",
            "When the model served was loaded, in seconds since the Unix epoch",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_request_seconds.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(inference_seconds.clone()))?;
        registry.register(Box::new(predictions.clone()))?;
        registry.register(Box::new(confidence.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_waiting.clone()))?;
        registry.register(Box::new(requests_arriving.clone()))?;
        registry.register(Box::new(inflight_body_bytes.clone()))?;
        registry.register(Box::new(model_reloads.clone()))?;
        registry.register(Box::new(model_info.clone()))?;
        registry.register(Box::new(model_loaded.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            grpc_requests,
            grpc_request_seconds,
            batch_size,
            inference_seconds,
            predictions,
            confidence,
            queue_depth,
            queue_waiting,
            requests_arriving,
            inflight_body_bytes,
            model_reloads,
            model_info,
            model_loaded,
        })
    }

    /// Makes `info` the model the metrics describe: its series of `vt_serve_model_info`
    /// replaces the previous model's, so that a dashboard shows which model serves and
    /// when a reload swapped it.
    pub fn serving(&self, info: &ModelInfo) {
        self.model_info.reset();
        self.model_info
            .with_label_values(&[
                info.name.as_str(),
                &info.generation.to_string(),
                &info.sha256,
                &info.device,
                &info.dtype,
            ])
            .set(1);
        self.model_loaded
            .set(i64::try_from(info.loaded_at).unwrap_or(i64::MAX));
    }

    /// Counts an image answered with `probabilities` over `classes`: its most probable class
    /// and that class's probability.
    pub fn predicted(&self, classes: &[String], probabilities: &[f32]) {
        let Some(best) = crate::classifier::ranked(probabilities).next() else {
            return;
        };
        let class = classes.get(best).map_or("", String::as_str);
        self.predictions.with_label_values(&[class]).inc();
        self.confidence.observe(f64::from(probabilities[best]));
    }

    /// Counts a gRPC call to `method` (one of the service's, or `unknown`) that ended with
    /// `code` after `seconds`.
    pub fn observe_grpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.grpc_request_seconds
            .with_label_values(&[method])
            .observe(seconds);
        self.grpc_requests
            .with_label_values(&[method, code_name(code)])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> prometheus::Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Latency buckets of HTTP requests and gRPC calls, in seconds: past the default
/// --timeout-ms (30 s) for longer ones.
const REQUEST_SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A gRPC status code's name, as the gRPC specification spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Middleware counting every response by its route pattern (not the raw path, which would
/// let clients create unbounded label values) and status; a request whose client went away
/// before its answer is counted as 499 (and logged so), CORS preflights under `preflight`
/// (when the server answers them: else an `OPTIONS` is its route's, 405), and one the server
/// dropped, cut short by a second shutdown signal, as 0.
pub async fn track(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let metrics = &state.metrics;
    let cors = !state.cors_origins.is_empty();
    let mut route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let preflight = cors
        && request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        // Apart from the route's own requests, whose latencies they would skew.
        route = "preflight".to_owned();
    } else if route == "/v1/models/{model}" && request.method() == Method::POST {
        // Predictions, explanations and readiness probes share one route pattern
        // (`NAME:predict` is one path segment, which routing percent-decodes); they are
        // counted apart, and verbs the route does not know apart from both.
        let (mut parts, body) = request.into_parts();
        let segment = parts.extract::<Path<String>>().await.ok();
        let verb = segment.and_then(|Path(segment)| Verb::of(&segment).map(|(_, verb)| verb));
        route.push_str(match verb {
            Some(Verb::Predict) => ":predict",
            Some(Verb::Explain) => ":explain",
            None => ":unknown",
        });
        request = Request::from_parts(parts, body);
    }
    let started = Instant::now();
    let observe = |status: &str| {
        metrics
            .request_seconds
            .with_label_values(&[route.as_str()])
            .observe(started.elapsed().as_secs_f64());
        metrics
            .requests
            .with_label_values(&[route.as_str(), status])
            .inc();
    };
    // Inside the access log's span.
    let span = Span::current();
    let abandoned = OnAbandon::new(|| {
        let server_stopped = state.is_cut_short();
        observe(if server_stopped { "0" } else { "499" });
        access::unanswered(&span, started.elapsed(), server_stopped);
    });
    let response = next.run(request).await;
    abandoned.answered();
    observe(response.status().as_str());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest batch (--max-batch 4096) and a request as long as a raised --timeout-ms
    /// allow fall in buckets of their own, not only in `+Inf`.
    #[test]
    fn the_buckets_reach_the_largest_batches_and_long_requests() {
        let metrics = Metrics::new().unwrap();
        metrics.batch_size.observe(4096.0);
        metrics.observe_grpc("ModelInfer", tonic::Code::Ok, 45.0);
        let text = metrics.render().unwrap();
        for (series, count) in [
            (r#"vt_serve_batch_size_bucket{le="2048"}"#, "0"),
            (r#"vt_serve_batch_size_bucket{le="4096"}"#, "1"),
            (
                r#"vt_serve_grpc_request_duration_seconds_bucket{method="ModelInfer",le="30"}"#,
                "0",
            ),
            (
                r#"vt_serve_grpc_request_duration_seconds_bucket{method="ModelInfer",le="60"}"#,
                "1",
            ),
        ] {
            assert!(
                text.contains(&format!("{series} {count}\n")),
                "{series}\n{text}"
            );
        }
    }
}
