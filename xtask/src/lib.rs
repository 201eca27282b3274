//! Project tasks behind `cargo xtask`, as a library so that the end-to-end tests of the
//! workspace (`tests/`) run exactly what users run.

pub mod bench_data;
pub mod bench_model;
pub mod bench_serve;
pub mod cargo;
pub mod e2e;
pub mod fetch_data;
pub mod reference;

/// Parses a count that must be at least 1 (clap's ranged parser would print usize's maximum
/// in its error).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command, FromArgMatches};

    /// Counts of zero would measure nothing (and print NaN rates): refused on the command line.
    #[test]
    fn bench_counts_of_zero_are_refused() {
        fn refuses<A: Args + FromArgMatches>(argv: &[&str]) {
            let command = A::augment_args(Command::new("bench"));
            let err = command.try_get_matches_from(argv).err().unwrap();
            assert!(
                err.to_string().contains("must be at least 1"),
                "{argv:?}: {err}"
            );
        }
        refuses::<crate::bench_data::Args>(&["bench", "--threads", "1,0"]);
        for flag in ["--concurrency", "--requests", "--threads"] {
            refuses::<crate::bench_serve::Args>(&["bench", flag, "0"]);
        }
    }
}
