//! Tracker tests, one file per theme: each table row is its own `#[test]`
//! (the [`case!`] macro of [`kit`]), every row's sequence is checked against
//! the tracker's invariants after each step, a randomized run compares the
//! tracker with a reference model, and the JSON contract of the status is
//! checked against its schema.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod kit;

mod connections;
mod exits;
mod fd_tables;
mod first_io;
mod listeners;
mod publishing;
mod randomized;
mod repair;
mod restarts;
mod schema;
mod snapshots;
