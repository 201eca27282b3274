//! Admission control: at most `capacity` images are in the server at once (decoding,
//! queued or running). A request that does not fit waits for room, in arrival order, until
//! its deadline (the handlers' timeout ends the wait): tokio's semaphore is fair, so a large
//! request (a Triton client sending `max_batch_size` images) is not overtaken by small ones
//! forever. What waits is bounded too: at most `capacity` more images wait so, and a request
//! that would wait past that is refused at once with 503, so an overloaded server answers
//! quickly instead of timing everyone out. The bytes of waiting requests' bodies are held
//! within the body budget (`--max-inflight-body-bytes`) all the while.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batcher::Arriving;
use crate::error::ApiError;

pub struct Admission {
    slots: Arc<Semaphore>,
    /// Room for the images of the requests waiting for slots.
    waiting_room: Arc<Semaphore>,
    capacity: usize,
    depth: IntGauge,
    waiting: IntGauge,
}

/// Slots held by one request; released (and the gauge lowered) when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    _depth: GaugeShare,
}

/// A share of a gauge, taken off it when dropped.
struct GaugeShare {
    gauge: IntGauge,
    count: i64,
}

impl GaugeShare {
    fn add(gauge: &IntGauge, count: u32) -> GaugeShare {
        let count = i64::from(count);
        gauge.add(count);
        GaugeShare {
            gauge: gauge.clone(),
            count,
        }
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.sub(self.count);
    }
}

impl Admission {
    pub fn new(capacity: usize, depth: IntGauge, waiting: IntGauge) -> Admission {
        // Tokio's semaphores hold at most `Semaphore::MAX_PERMITS`.
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Admission {
            slots: Arc::new(Semaphore::new(capacity)),
            waiting_room: Arc::new(Semaphore::new(capacity)),
            capacity,
            depth,
            waiting,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes `images` slots, waiting for them behind the requests that came first when
    /// there are not enough. Refuses at once, with 400 a request that could never fit (more
    /// images than the queue holds), with 503 one that finds the waiting room full. While
    /// it waits, the request is away from `arriving`.
    pub async fn admit(&self, images: usize, arriving: &Arriving) -> Result<Admitted, ApiError> {
        let wanted = u32::try_from(images)
            .ok()
            .filter(|_| images <= self.capacity)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{images} images, more than the {} a request may carry (--queue)",
                    self.capacity
                ))
            })?;
        // Fails too while any request waits, whose slots are set aside for it as they are
        // released: this one then waits behind it.
        let permit = match Arc::clone(&self.slots).try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(_) => self.wait(wanted, arriving).await?,
        };
        Ok(Admitted {
            _permit: permit,
            _depth: GaugeShare::add(&self.depth, wanted),
        })
    }

    async fn wait(
        &self,
        wanted: u32,
        arriving: &Arriving,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let _room = Arc::clone(&self.waiting_room)
            .try_acquire_many_owned(wanted)
            .map_err(|_| ApiError::Overloaded)?;
        let _waiting = GaugeShare::add(&self.waiting, wanted);
        // Room comes only as batches are answered: forming batches do not wait for this one.
        let _away = arriving.away();
        Arc::clone(&self.slots)
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| ApiError::NotReady("admission has stopped".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An admission of `capacity` images with its gauges.
    struct Queue {
        admission: Arc<Admission>,
        depth: IntGauge,
        waiting: IntGauge,
        arrivals: IntGauge,
    }

    impl Queue {
        fn of(capacity: usize) -> Queue {
            let gauge = |name: &str| IntGauge::new(name, name).unwrap();
            let (depth, waiting) = (gauge("depth"), gauge("waiting"));
            Queue {
                admission: Arc::new(Admission::new(capacity, depth.clone(), waiting.clone())),
                depth,
                waiting,
                arrivals: gauge("arriving"),
            }
        }

        /// A request of `images` arriving and asking for admission, on a task of its own.
        fn admit(&self, images: usize) -> tokio::task::JoinHandle<Result<Admitted, ApiError>> {
            let admission = Arc::clone(&self.admission);
            let arriving = Arriving::new(&self.arrivals);
            tokio::spawn(async move { admission.admit(images, &arriving).await })
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("never {what}");
    }

    /// A request that does not fit waits, away from the arriving count, and the requests
    /// after it wait behind it even when they would fit: a large request is not starved by
    /// small ones. Past the waiting room, and past the queue's size, requests are refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_wait_for_room_in_arrival_order() {
        let queue = Queue::of(4);
        let (depth, waiting, arrivals) = (&queue.depth, &queue.waiting, &queue.arrivals);
        let admit = |images| queue.admit(images);
        let first = admit(2).await.unwrap().unwrap();
        let large = admit(4);
        until("waiting for 4", || waiting.get() == 4).await;
        // Two slots are free, but the large request came first; the room is full.
        let refused = admit(1).await.unwrap();
        assert!(matches!(refused, Err(ApiError::Overloaded)));
        let too_many = admit(5).await.unwrap();
        assert!(matches!(too_many, Err(ApiError::BadRequest(_))));
        assert!(!large.is_finished());
        // The large request's announcement is away while it waits (the others' tasks ended).
        assert_eq!((depth.get(), arrivals.get()), (2, 0));

        drop(first);
        let large = large.await.unwrap().unwrap();
        assert_eq!((depth.get(), waiting.get()), (4, 0));
        let small = admit(1);
        until("waiting for 1", || waiting.get() == 1).await;
        drop(large);
        let small = small.await.unwrap().unwrap();
        assert_eq!((depth.get(), waiting.get()), (1, 0));
        drop(small);
        assert_eq!(depth.get(), 0);
    }

    /// With a large request waiting, a small one that would fit waits behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_requests_do_not_overtake_a_waiting_large_one() {
        let queue = Queue::of(4);
        let (depth, waiting) = (&queue.depth, &queue.waiting);
        let admit = |images| queue.admit(images);
        let first = admit(2).await.unwrap().unwrap();
        let large = admit(3);
        until("waiting for 3", || waiting.get() == 3).await;
        let small = admit(1);
        until("waiting for 4", || waiting.get() == 4).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!small.is_finished(), "a small request overtook a large one");
        drop(first);
        let large = large.await.unwrap().unwrap();
        let small = small.await.unwrap().unwrap();
        assert_eq!((depth.get(), waiting.get()), (4, 0));
        drop((large, small));
    }
}
