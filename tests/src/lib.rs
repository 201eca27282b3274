//! The workspace-level tests live in `tests/`; this package has no library code.
