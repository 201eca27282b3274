//! A budget of request body bytes held at once, all requests together
//! (`--max-inflight-body-bytes`). Each body is bounded by `--max-body-bytes`, but bodies are
//! read whole before admission control counts their images: without this bound, N clients
//! uploading at once would make the server hold N times that limit. A body that does not
//! fit is answered 503 once the client has sent it (what is past the budget is dropped), or
//! at once to a client waiting for `100 Continue`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::{future, stream, StreamExt};
use prometheus::IntGauge;
use tokio::sync::Semaphore;

use crate::error::ApiError;

pub struct BodyBudget {
    /// One permit per byte.
    bytes: Semaphore,
    budget: u64,
    /// `--max-body-bytes`: the most of a refused body read (and dropped) before answering.
    max_body_bytes: u64,
    held: IntGauge,
}

impl BodyBudget {
    pub fn new(budget: u64, max_body_bytes: u64, held: IntGauge) -> BodyBudget {
        // Past tokio's largest semaphore (2^61 bytes on 64-bit targets), the budget bounds
        // nothing anyway.
        let permits = usize::try_from(budget)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Semaphore::new(permits),
            budget,
            max_body_bytes,
            held,
        }
    }

    fn spent(&self) -> ApiError {
        ApiError::BodyBudgetSpent {
            budget: self.budget,
        }
    }
}

/// The bytes one request's body holds of the budget, given back (and the gauge lowered)
/// when the last of its holders drops it: the middleware, once the handler has answered,
/// or the body, if it outlives that.
struct Charge {
    budget: Arc<BodyBudget>,
    held: AtomicU64,
    /// Whether the body was refused for want of budget: its read fails.
    refused: AtomicBool,
    /// Whether a refused body went past the body limit while it was read to be dropped: it
    /// is too large, whatever the budget.
    too_large: AtomicBool,
}

impl Charge {
    fn new(budget: &Arc<BodyBudget>) -> Charge {
        Charge {
            budget: Arc::clone(budget),
            held: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            too_large: AtomicBool::new(false),
        }
    }

    /// Takes `bytes` more of the budget, or refuses the body at once rather than waiting (a
    /// client that waited would hold what it sent meanwhile). Whether they were taken.
    fn take(&self, bytes: usize) -> bool {
        let permit = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.bytes.try_acquire_many(n).ok());
        let Some(permit) = permit else {
            self.refuse();
            return false;
        };
        // Given back in one `add_permits` by `drop`, however many chunks took them.
        permit.forget();
        self.held.fetch_add(bytes as u64, Ordering::Relaxed);
        self.budget.held.add(bytes as i64);
        true
    }

    fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn is_too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        // `held` came from the semaphore in u32 steps, so it fits its permits.
        self.budget
            .bytes
            .add_permits(usize::try_from(held).unwrap_or(usize::MAX));
        self.budget
            .held
            .sub(i64::try_from(held).unwrap_or(i64::MAX));
    }
}

/// Whether a request's body read failed for want of budget: set by [`charge_body`], read
/// where the body is read, whose error does not say why.
#[derive(Clone, Default)]
pub struct BodyCharge(Option<Arc<Charge>>);

impl BodyCharge {
    pub fn of(request: &Request) -> BodyCharge {
        request
            .extensions()
            .get::<BodyCharge>()
            .cloned()
            .unwrap_or_default()
    }

    /// The 503 to answer, when the budget could not cover the body.
    pub fn refusal(&self) -> Option<ApiError> {
        self.0
            .as_ref()
            .filter(|charge| charge.is_refused())
            .map(|charge| charge.budget.spent())
    }

    /// Extends the charge to `bytes` in all, the body's length once decoded where it is
    /// decoded after it was charged (a compressed gRPC message): what is past the bytes
    /// already charged is taken, or the body refused as one read past the budget is.
    pub fn cover(&self, bytes: usize) -> Result<(), ApiError> {
        let Some(charge) = &self.0 else {
            return Ok(());
        };
        let held = usize::try_from(charge.held.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        if charge.is_refused() || !charge.take(bytes.saturating_sub(held)) {
            return Err(charge.budget.spent());
        }
        Ok(())
    }

    /// Whether the body went past the body limit while a refused body was dropped: it gets
    /// 413, which retrying would not change, rather than the 503.
    pub fn too_large(&self) -> bool {
        self.0.as_ref().is_some_and(|charge| charge.is_too_large())
    }
}

/// Charges the request's body to the budget as it is read, decoded (this runs inside the
/// decompression layer), and holds the charge until the handler has answered, when the
/// body's bytes are gone. A body the budget cannot cover fails to read, with the 503 to
/// answer; so does one whose declared length is more than the budget has left, charged
/// nothing. Declared lengths are not reserved: a client that sent only its headers would
/// hold its reservation until its request timed out.
pub async fn charge_body(
    State(budget): State<Arc<BodyBudget>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let charge = Arc::new(Charge::new(&budget));
    let left = budget.bytes.available_permits() as u64;
    // Past the body limit, the handler answers 413 before reading it.
    if declared_length(&parts.headers).is_some_and(|n| n > left && n <= budget.max_body_bytes) {
        charge.refuse();
    }
    // A client that waits for `100 Continue` has sent nothing yet: it gets the 503 instead,
    // without sending the body to be dropped.
    let body = if charge.is_refused() && expects_continue(&parts.headers) {
        let refused = Err::<Bytes, _>(axum::Error::new(budget.spent()));
        Body::from_stream(stream::once(async move { refused }))
    } else {
        charged(body, Arc::clone(&charge))
    };
    parts
        .extensions
        .insert(BodyCharge(Some(Arc::clone(&charge))));
    let response = next.run(Request::from_parts(parts, body)).await;
    // Until here: the handler has answered, and dropped what it read.
    drop(charge);
    response
}

/// `body`, each chunk charged to `charge` as it is read. Once one does not fit, the rest
/// is read and dropped, up to the body limit, before the read fails: the client is still
/// sending it, and a connection closed on unread bytes is reset, which most clients report
/// as a broken connection rather than the 503.
fn charged(body: Body, charge: Arc<Charge>) -> Body {
    let limit = charge.budget.max_body_bytes;
    let mut read = 0u64;
    let at_end = Arc::clone(&charge);
    let chunks = body.into_data_stream().filter_map(move |chunk| {
        let kept = match chunk {
            Ok(chunk) => {
                read = read.saturating_add(chunk.len() as u64);
                if !charge.is_refused() && charge.take(chunk.len()) {
                    Some(Ok(chunk))
                } else if read > limit {
                    charge.too_large.store(true, Ordering::Relaxed);
                    Some(Err(axum::Error::new(ApiError::body_too_large(limit))))
                } else {
                    None
                }
            }
            Err(e) => Some(Err(e)),
        };
        future::ready(kept)
    });
    let refusal = stream::once(async move {
        at_end
            .is_refused()
            .then(|| Err(axum::Error::new(at_end.budget.spent())))
    })
    .filter_map(future::ready);
    Body::from_stream(chunks.chain(refusal))
}

/// The body length the request declares, when its body arrives as sent (the decompression
/// layer removes the header of a body it decodes).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one request takes is given back whole when it is dropped, the gauge following.
    #[test]
    fn charges_are_refused_past_the_budget_and_given_back_when_dropped() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = Arc::new(BodyBudget::new(100, 100, gauge.clone()));
        let first = Charge::new(&budget);
        assert!(first.take(40));
        assert!(first.take(30));
        assert_eq!(gauge.get(), 70);
        let second = Charge::new(&budget);
        assert!(second.take(30));
        assert!(!second.take(1));
        assert!(second.is_refused());
        assert!(!first.is_refused());
        drop(first);
        assert_eq!(gauge.get(), 30);
        assert_eq!(budget.bytes.available_permits(), 70);
        drop(second);
        assert_eq!(gauge.get(), 0);
        assert_eq!(budget.bytes.available_permits(), 100);
    }

    /// A chunk past the budget fails the read only once the rest of the body is read (and
    /// dropped, uncharged); what was charged stays held until the charge is dropped.
    #[tokio::test]
    async fn a_body_past_the_budget_is_read_to_its_end_then_refused() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = Arc::new(BodyBudget::new(100, 1000, gauge.clone()));
        let read = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&read);
        let chunks = stream::iter([60, 60, 10]).map(move |n| {
            counted.fetch_add(n as u64, Ordering::Relaxed);
            Ok::<_, axum::Error>(Bytes::from(vec![0; n]))
        });
        let held = Arc::new(Charge::new(&budget));
        let body = charged(Body::from_stream(chunks), Arc::clone(&held));
        let error = axum::body::to_bytes(body, usize::MAX).await.unwrap_err();
        assert!(error
            .to_string()
            .contains("--max-inflight-body-bytes (100 bytes)"));
        assert_eq!(read.load(Ordering::Relaxed), 130);
        assert!(BodyCharge(Some(Arc::clone(&held))).refusal().is_some());
        assert_eq!(gauge.get(), 60);
        drop(held);
        assert_eq!(gauge.get(), 0);
    }

    /// Past the body limit, a refused body is no longer read.
    #[tokio::test]
    async fn a_refused_body_is_read_only_up_to_the_body_limit() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = Arc::new(BodyBudget::new(100, 200, gauge));
        let chunks = stream::repeat_with(|| Ok::<_, axum::Error>(Bytes::from(vec![0; 90])));
        let held = Arc::new(Charge::new(&budget));
        let body = charged(Body::from_stream(chunks), Arc::clone(&held));
        let error = axum::body::to_bytes(body, usize::MAX).await.unwrap_err();
        // Too large, whatever the budget: 413, not a 503 that retrying cannot change.
        assert!(error.to_string().contains("limit of 200 bytes"), "{error}");
        assert!(BodyCharge(Some(held)).too_large());
    }

    #[test]
    fn a_budget_past_the_largest_semaphore_is_clamped() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = BodyBudget::new(u64::MAX, 1, gauge);
        assert_eq!(budget.bytes.available_permits(), Semaphore::MAX_PERMITS);
    }
}
