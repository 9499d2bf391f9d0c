//! The tracker owns the meaning of "live", "queued", "holder": a pure state
//! machine fed with [`ConnEvent`]s and [`Snapshot`]s, read as a [`Status`].
//! No I/O, no clocks: callers pass the time in.

mod status;

pub use status::*;

use std::time::Duration;

use crate::event::{ConnEvent, Snapshot, Tuple};

#[derive(Debug, Default)]
pub struct Tracker {}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, _ev: &ConnEvent) {}

    pub fn merge_snapshot(&mut self, _snap: &Snapshot) -> Vec<(Tuple, u32)> {
        Vec::new()
    }

    pub fn forget_connection(&mut self, _tuple: &Tuple) {}

    pub fn status(&self, _now: Duration) -> Status {
        Status::default()
    }
}
