//! gracewatch's pure part: the connection events every source produces
//! ([`event`]) and the tracker that folds them, with the current time, into
//! the per-process and per-listener [`tracker::Status`] every consumer reads
//! (ARCHITECTURE.md §2). No I/O, no kernel, no async runtime: it builds and
//! tests with a stable toolchain alone, without the eBPF toolchain the
//! monitor needs (as aya keeps `aya-obj` apart from `aya`).

pub mod cgroup;
pub mod event;
pub mod governor;
pub mod peers;
pub mod tracker;
