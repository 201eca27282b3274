//! Admission control: at most `capacity` images are in the server at once (decoding,
//! queued or running). Past that, requests are refused at once rather than queued without
//! bound, so an overloaded server answers 503 quickly instead of timing everyone out.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    depth: IntGauge,
}

/// Slots held by one request; released (and the gauge lowered) when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    count: i64,
    depth: IntGauge,
}

impl Admission {
    pub fn new(capacity: usize, depth: IntGauge) -> Admission {
        let capacity = capacity.max(1);
        Admission {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            depth,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes `images` slots or refuses with 503 without waiting.
    pub fn try_admit(&self, images: usize) -> Result<Admitted, ApiError> {
        let wanted = u32::try_from(images).unwrap_or(u32::MAX);
        let permit = self
            .slots
            .clone()
            .try_acquire_many_owned(wanted)
            .map_err(|_| ApiError::Overloaded)?;
        let count = i64::from(wanted);
        self.depth.add(count);
        Ok(Admitted {
            _permit: permit,
            count,
            depth: self.depth.clone(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.depth.sub(self.count);
    }
}
