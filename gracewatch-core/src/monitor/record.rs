//! The raw event stream of the kernel side, for recording (`gracewatch
//! record`, hidden): what a replay source later plays back. Consumers get it
//! here rather than from the source, like everything else.

use crate::{event::ConnEvent, source::ebpf::EbpfSource};

use super::SourceOptions;

/// Attached eBPF programs whose decoded events are read batch by batch,
/// without a tracker. The programs detach when it is dropped.
pub struct Recorder {
    source: EbpfSource,
}

impl Recorder {
    /// Loads and attaches the programs (same privileges as a monitor).
    pub fn start(opts: SourceOptions) -> anyhow::Result<Self> {
        Ok(Self {
            source: EbpfSource::start(opts)?,
        })
    }

    /// Waits for events and moves the ones delivered so far into `out`
    /// (possibly none: a wake-up without events is fine). Cancel-safe.
    pub async fn next_batch(&mut self, out: &mut Vec<ConnEvent>) -> anyhow::Result<()> {
        self.source.readable().await?;
        self.source.drain(out);
        Ok(())
    }
}
