//! Progress of an epoch: an indicatif bar with ETA and img/s on a terminal, plain log lines
//! (about every tenth of the epoch) otherwise, e.g. under CI or with output redirected.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct EpochProgress {
    bar: Option<ProgressBar>,
    label: String,
    batches: usize,
    done: usize,
    images: usize,
    next_log: usize,
    start: Instant,
}

impl EpochProgress {
    pub fn new(label: impl Into<String>, batches: usize) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(batches as u64);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.clone());
            bar
        });
        EpochProgress {
            bar,
            label,
            batches,
            done: 0,
            images: 0,
            next_log: 1,
            start: Instant::now(),
        }
    }

    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// One more batch of `images`; `status` describes the running averages.
    pub fn advance(&mut self, images: usize, status: &str) {
        self.done += 1;
        self.images += images;
        let rate = self.images_per_second();
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!("{status} {rate:.1} img/s"));
                bar.inc(1);
            }
            None => {
                let tenth = self.batches.div_ceil(10).max(1);
                if self.done >= self.next_log || self.done == self.batches {
                    let eta = (self.batches.saturating_sub(self.done)) as f64
                        * self.start.elapsed().as_secs_f64()
                        / self.done as f64;
                    tracing::info!(
                        "{} [{}/{}] {status} {rate:.1} img/s, ETA {eta:.0}s",
                        self.label,
                        self.done,
                        self.batches
                    );
                    self.next_log = self.done + tenth;
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
