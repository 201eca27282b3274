//! Which algorithm each convolution runs, picked once and remembered (feature `cudnn`; also
//! built for the tests, so that the reuse rules are checked on machines without a GPU).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Nanoseconds spent timing algorithms since the process started.
static SEARCH_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time spent so far timing algorithms (the `time` of [`Picks::pick`]).
pub(super) fn search_time() -> Duration {
    Duration::from_nanos(SEARCH_NANOS.load(Ordering::Relaxed))
}

/// The batch size whose timed algorithms serve a batch of `n`: the next power of two. A
/// training epoch's smaller last batch and validation's reuse the full batch's choice, and a
/// server that batches requests dynamically times log2(max batch) + 1 sizes, not every one.
pub(super) fn batch_bucket(n: usize) -> usize {
    n.next_power_of_two()
}

/// The algorithms picked so far for one pass, shared by every thread (the choice depends on
/// the device, not on the thread that asks): `K` says which convolution on which device, `A`
/// is the algorithm.
pub(super) struct Picks<K, A>(Mutex<Option<Tables<K, A>>>);

struct Tables<K, A> {
    /// By exact sizes, with the workspace in bytes that those sizes need.
    exact: HashMap<K, (A, usize)>,
    /// By sizes with the batch rounded up to its [`batch_bucket`].
    bucket: HashMap<K, A>,
}

impl<K: Hash + Eq, A: Copy> Picks<K, A> {
    pub(super) const fn new() -> Self {
        Picks(Mutex::new(None))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Tables<K, A>) -> R) -> R {
        let mut tables = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(tables.get_or_insert_with(|| Tables {
            exact: HashMap::new(),
            bucket: HashMap::new(),
        }))
    }

    /// The algorithm for the `exact` sizes and its workspace in bytes: the one picked before
    /// for these sizes; else the one picked for their `bucket` (the same sizes with the batch
    /// rounded up) where `workspace` gives its workspace for these sizes, None meaning that
    /// it does not run them; else `time`'s, remembered for both. Nothing is held locked
    /// while `time` runs.
    pub(super) fn pick<E>(
        &self,
        exact: K,
        bucket: K,
        workspace: impl Fn(A) -> Option<usize>,
        time: impl FnOnce() -> Result<(A, usize), E>,
    ) -> Result<(A, usize), E> {
        let (known, in_bucket) =
            self.with(|t| (t.exact.get(&exact).copied(), t.bucket.get(&bucket).copied()));
        if let Some(known) = known {
            return Ok(known);
        }
        let reused = in_bucket.and_then(|algo| Some((algo, workspace(algo)?)));
        let picked = match reused {
            Some(picked) => picked,
            None => {
                let start = Instant::now();
                let timed = time();
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                SEARCH_NANOS.fetch_add(nanos, Ordering::Relaxed);
                timed?
            }
        };
        self.with(|t| {
            t.exact.insert(exact, picked);
            t.bucket.entry(bucket).or_insert(picked.0);
        });
        Ok(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn buckets_are_the_next_powers_of_two() {
        let buckets: Vec<usize> = [1, 2, 3, 4, 5, 84, 128, 129].map(batch_bucket).to_vec();
        assert_eq!(buckets, [1, 2, 4, 4, 8, 128, 128, 256]);
    }

    /// A batch takes the algorithm timed for its bucket where that one runs its sizes, with
    /// their own workspace, and is timed otherwise; each timing counts in the search time.
    #[test]
    fn batches_in_one_bucket_share_an_algorithm() {
        let picks: Picks<usize, char> = Picks::new();
        let timings = Cell::new(0);
        let pick = |n: usize, workspace: &dyn Fn(char) -> Option<usize>, timed: char| {
            picks.pick(n, batch_bucket(n), workspace, || {
                timings.set(timings.get() + 1);
                std::thread::sleep(Duration::from_millis(2));
                Ok::<_, String>((timed, 100))
            })
        };
        let runs = |_| Some(64);
        let searched = search_time();
        assert_eq!(pick(128, &runs, 'a'), Ok(('a', 100)));
        assert!(search_time() >= searched + Duration::from_millis(2));
        assert_eq!(pick(84, &runs, 'b'), Ok(('a', 64)), "128's algorithm");
        let asked = |_| panic!("sizes seen before need no workspace query");
        assert_eq!(pick(84, &asked, 'b'), Ok(('a', 64)));
        assert_eq!(
            pick(100, &|_| None, 'c'),
            Ok(('c', 100)),
            "128's does not run 100"
        );
        assert_eq!(
            pick(120, &runs, 'd'),
            Ok(('a', 64)),
            "the bucket keeps its first pick"
        );
        assert_eq!(pick(1, &runs, 'e'), Ok(('e', 100)));
        assert_eq!(timings.get(), 3, "timed: 128, 100 and 1");
        let failed = picks.pick(2, 2, runs, || Err("no algorithm".to_owned()));
        assert_eq!(failed, Err("no algorithm".to_owned()));
        assert_eq!(
            pick(2, &runs, 'f'),
            Ok(('f', 100)),
            "a failure is not remembered"
        );
    }
}
