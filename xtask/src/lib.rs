//! The part of `cargo xtask` that the benchmarks and the demo (the
//! `gracewatch-bench` crate) build on too: running external programs
//! ([`cmd`]), making the host able to build ([`setup`]) and building and
//! starting the release binary with the privileges it needs ([`run`]).
//! The tasks themselves (`setup`, `run`, `test`, `ci`, and the pass-through
//! to `gracewatch-bench` for `bench` and `demo`) are in `main.rs`.

pub mod cmd;
pub mod run;
pub mod setup;
