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
