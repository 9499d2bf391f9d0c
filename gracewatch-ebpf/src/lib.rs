//! Empty on purpose: this library target only exists so that `gracewatch`
//! can name the eBPF crate as a build dependency and be rebuilt when it
//! changes. The programs live in `main.rs`, built for the BPF target by
//! `aya-build`.
#![no_std]
