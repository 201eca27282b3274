//! Project tasks behind `cargo xtask`, as a library so that the end-to-end tests of the
//! workspace (`tests/`) run exactly what users run.

pub mod bench_data;
pub mod bench_model;
pub mod bench_serve;
pub mod cargo;
pub mod e2e;
pub mod fetch_data;
pub mod reference;
