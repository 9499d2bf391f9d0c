//! `/metrics`: what the agent exports to Prometheus, through the
//! `prometheus-client` crate. It encodes OpenMetrics text, served to
//! clients that ask for it (`Accept: application/openmetrics-text`, as
//! Prometheus does); everyone else gets the Prometheus text format 0.0.4
//! it is rewritten to (see [`Format`]).
//!
//! Two kinds of series. Those read from the current [`Status`] (per process,
//! per listener, lost events, BPF run time, processes draining now) are
//! encoded afresh at every scrape by a [`Collector`], so a process or
//! listener that went away stops being exported at once instead of
//! lingering as a stale series. Those only the agent can count (connections
//! accepted and closed since it started, drains by outcome and their
//! durations, and from the restart model's [`Fact`]s: observed drains,
//! handovers, connections dropped by exits) live in a registry for the
//! agent's lifetime.
//!
//! Label cardinality is bounded by construction: `pid`/`comm` only for
//! processes that hold a listening socket or a live inbound connection,
//! `netns`/`address` only for the listening sockets of the current status
//! (never on the agent-lifetime series, where every pod's namespace would
//! add series for good), `outcome` has six values. Where a process runs
//! (`container_id`, `pod_uid`, `cgroup`) is added to the per-process series
//! only when asked (`--metric-labels`, see [`MetricLabels`]): it adds no
//! series per scrape (a process has one of each), but every container ever
//! started leaves new label values in the time-series database's index.
//! Label values come from processes (`comm`, `cgroup`): control characters
//! in them are escaped ([`label_safe`]) so no CR or ESC reaches a scraper.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::{
    drain::{DrainReport, Outcome},
    event::ConnEvent,
    governor::Reason,
    monitor::ProgramStats,
    tracker::{
        ProcessStatus, Status,
        restart::{Change, Fact, Role},
    },
};

/// The two exposition formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`), the default.
    Text,
}

impl Format {
    /// Picks the format an `Accept` header prefers: OpenMetrics only when it
    /// is asked for with a quality at least that of `text/plain` or `*/*`.
    pub(crate) fn negotiate(accept: &str) -> Self {
        let mut open_metrics = 0.0_f32;
        let mut text = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: no `# UNIT` or
/// `# EOF` lines, and counters described under their sample name
/// (`…_total`), which is what `promtool check metrics` and 0.0.4 parsers
/// look for.
fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match described {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A label value with control characters (CR, ESC, …) written as Rust
/// escapes (`\r`, `\u{1b}`): process names are chosen by whoever runs the
/// process, and must not reach a terminal or a parser raw.
pub(crate) fn label_safe(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// An optional label of the per-process series (`--metric-labels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricLabel {
    /// `container_id`: the container id its cgroup names.
    Container,
    /// `pod_uid`: the Kubernetes pod UID its cgroup names.
    Pod,
    /// `cgroup`: its cgroup v2 path (long, and distinct per systemd unit
    /// and per container).
    Cgroup,
}

/// Which optional labels the per-process series carry: none by default,
/// so the series stay as they were. A label whose value is unknown (null
/// in the status) is left out of that series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MetricLabels {
    pub(crate) container: bool,
    pub(crate) pod: bool,
    pub(crate) cgroup: bool,
}

impl MetricLabels {
    pub(crate) fn of(labels: &[MetricLabel]) -> Self {
        Self {
            container: labels.contains(&MetricLabel::Container),
            pod: labels.contains(&MetricLabel::Pod),
            cgroup: labels.contains(&MetricLabel::Cgroup),
        }
    }

    /// As bits, to keep in an atomic.
    pub(crate) fn bits(self) -> u8 {
        u8::from(self.container) | u8::from(self.pod) << 1 | u8::from(self.cgroup) << 2
    }

    pub(crate) fn from_bits(bits: u8) -> Self {
        Self {
            container: bits & 1 != 0,
            pod: bits & 2 != 0,
            cgroup: bits & 4 != 0,
        }
    }

    /// The labels of process `p`'s series: `pid`, `comm`, then those asked for.
    fn of_process(self, p: &ProcessStatus) -> Vec<(&'static str, String)> {
        let mut labels = vec![("pid", p.pid.to_string()), ("comm", label_safe(&p.comm))];
        let optional = [
            ("container_id", self.container, &p.container_id),
            ("pod_uid", self.pod, &p.pod_uid),
            ("cgroup", self.cgroup, &p.cgroup),
        ];
        for (name, on, value) in optional {
            if let (true, Some(v)) = (on, value) {
                labels.push((name, label_safe(v)));
            }
        }
        labels
    }
}

/// Drain durations range from "already idle" to "long-poll clients for an hour".
const DRAIN_BUCKETS: [f64; 13] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

type OutcomeLabel = [(&'static str, &'static str); 1];

fn new_drain_histogram() -> Histogram {
    Histogram::new(DRAIN_BUCKETS)
}

/// The agent-lifetime metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    accepted: Counter,
    closed: Counter,
    queue_drops: Counter,
    events_skipped: Counter,
    drains: Family<OutcomeLabel, Counter>,
    drain_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    drains_running: Gauge,
    observed_drain_seconds: Histogram,
    handovers: Counter,
    dropped_by_exit: Counter,
    /// The governor's series, registered once it is on (the exposition of
    /// an agent without it stays as it was).
    governor: std::sync::OnceLock<GovernorMetrics>,
}

/// `gracewatch_governor_signals_total` and
/// `gracewatch_governor_signal_failures_total`, by `reason` (two values).
#[derive(Debug)]
struct GovernorMetrics {
    registry: Registry,
    signals: Family<OutcomeLabel, Counter>,
    failures: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            accepted: Counter::default(),
            closed: Counter::default(),
            queue_drops: Counter::default(),
            events_skipped: Counter::default(),
            drains: Family::default(),
            drain_seconds: Family::new_with_constructor(new_drain_histogram),
            drains_running: Gauge::default(),
            observed_drain_seconds: new_drain_histogram(),
            handovers: Counter::default(),
            dropped_by_exit: Counter::default(),
            governor: std::sync::OnceLock::new(),
        };
        let r = &mut m.registry;
        r.register(
            "gracewatch_connections_accepted",
            "Inbound TCP connections accepted by any process since the agent started",
            m.accepted.clone(),
        );
        r.register(
            "gracewatch_connections_closed",
            "Live inbound TCP connections that ended since the agent started",
            m.closed.clone(),
        );
        r.register(
            "gracewatch_accept_queue_drops",
            "Connections that died in an accept queue (reset before any accept) since the agent started",
            m.queue_drops.clone(),
        );
        r.register(
            "gracewatch_agent_events_skipped",
            "Events the agent's counters missed because it fell behind (the counters above undercount by this much)",
            m.events_skipped.clone(),
        );
        r.register(
            "gracewatch_drains",
            "Drains run through this agent, by outcome",
            m.drains.clone(),
        );
        r.register_with_unit(
            "gracewatch_drain_duration",
            "How long drains run through this agent took, by outcome",
            Unit::Seconds,
            m.drain_seconds.clone(),
        );
        r.register(
            "gracewatch_drains_running",
            "Drains running in this agent now",
            m.drains_running.clone(),
        );
        r.register_with_unit(
            "gracewatch_observed_drain_duration",
            "How long old generations took to drain, as the monitor saw them (whoever ran the drain): from when a process stopped accepting to zero",
            Unit::Seconds,
            m.observed_drain_seconds.clone(),
        );
        r.register(
            "gracewatch_handovers",
            "Handovers seen: a process started accepting on a listener an older process of the same namespace serves",
            m.handovers.clone(),
        );
        r.register(
            "gracewatch_connections_dropped_by_exit",
            "Live inbound connections ended because the process holding them exited",
            m.dropped_by_exit.clone(),
        );
        // Every outcome is exported from the start, so rate() and absent()
        // behave before the first drain.
        for o in OUTCOMES {
            let _ = m.drains.get_or_create(&[("outcome", outcome_label(o))]);
        }
        m
    }

    /// Counts one event the monitor applied.
    pub(crate) fn observe(&self, ev: &ConnEvent) {
        match ev {
            ConnEvent::Accept { .. } => {
                self.accepted.inc();
            }
            ConnEvent::Close { .. } | ConnEvent::PreexistingClose { .. } => {
                self.closed.inc();
            }
            ConnEvent::QueueDrop { .. } => {
                self.queue_drops.inc();
            }
            _ => {}
        }
    }

    /// Counts one fact of the restart model: a drain that reached zero, a
    /// handover, an exit that dropped connections.
    pub(crate) fn fact(&self, fact: &Fact) {
        match &fact.change {
            Change::Handover { .. } => {
                self.handovers.inc();
            }
            Change::Role {
                drained: Some((took, _)),
                ..
            } => self.observed_drain_seconds.observe(took.as_secs_f64()),
            Change::Exited { held, .. } if *held > 0 => {
                self.dropped_by_exit.inc_by(*held);
            }
            Change::Role { .. } | Change::Exited { .. } => {}
        }
    }

    pub(crate) fn skipped(&self, n: u64) {
        self.events_skipped.inc_by(n);
    }

    pub(crate) fn drain_started(&self) {
        self.drains_running.inc();
    }

    /// Undoes [`Metrics::drain_started`] for a drain that was refused.
    pub(crate) fn drain_not_started(&self) {
        self.drains_running.dec();
    }

    pub(crate) fn drain_finished(&self, report: &DrainReport) {
        self.drains_running.dec();
        let label = [("outcome", outcome_label(report.outcome))];
        self.drains.get_or_create(&label).inc();
        self.drain_seconds
            .get_or_create(&label)
            .observe(report.duration_ms as f64 / 1000.0);
    }

    /// Exports the governor's counters from now on, each reason at 0.
    pub(crate) fn governor_on(&self) {
        self.governor.get_or_init(|| {
            let mut g = GovernorMetrics {
                registry: Registry::default(),
                signals: Family::default(),
                failures: Family::default(),
            };
            g.registry.register(
                "gracewatch_governor_signals",
                "Draining generations the governor signalled, by the limit they were past (max_draining, max_age)",
                g.signals.clone(),
            );
            g.registry.register(
                "gracewatch_governor_signal_failures",
                "Draining generations past a limit the governor did not signal (a protected process, a reused pid, the kernel's refusal), by limit",
                g.failures.clone(),
            );
            for r in Reason::ALL {
                let _ = g.signals.get_or_create(&[("reason", r.code())]);
                let _ = g.failures.get_or_create(&[("reason", r.code())]);
            }
            g
        });
    }

    /// Counts one governor action: a delivered signal or a failure (a
    /// generation that exited first is neither).
    pub(crate) fn governor_action(&self, reason: Reason, delivered: bool) {
        if let Some(g) = self.governor.get() {
            let label = [("reason", reason.code())];
            if delivered {
                g.signals.get_or_create(&label).inc();
            } else {
                g.failures.get_or_create(&label).inc();
            }
        }
    }

    /// The whole exposition: agent-lifetime series, then those of `now`.
    pub(crate) fn render(&self, now: Scrape, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry)?;
        if let Some(g) = self.governor.get() {
            text::encode_registry(&mut out, &g.registry)?;
        }
        let mut current = Registry::default();
        current.register_collector(Box::new(now));
        text::encode_registry(&mut out, &current)?;
        text::encode_eof(&mut out)?;
        Ok(match format {
            Format::OpenMetrics => out,
            Format::Text => to_text_format(&out),
        })
    }
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::Drained,
    Outcome::TargetExited,
    Outcome::SignalRefused,
    Outcome::Timeout,
    Outcome::Interrupted,
    Outcome::Error,
];

/// The `outcome` label: the same word as the report's JSON `outcome`.
fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Drained => "drained",
        Outcome::TargetExited => "target_exited",
        Outcome::SignalRefused => "signal_refused",
        Outcome::Timeout => "timeout",
        Outcome::Interrupted => "interrupted",
        Outcome::Error => "error",
    }
}

/// What a scrape reads from the monitor, encoded by [`Collector::encode`].
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    /// `None` until the monitor is started.
    pub(crate) status: Option<Arc<Status>>,
    pub(crate) programs: Option<ProgramStats>,
    pub(crate) bpf_stats_enabled: bool,
    /// The optional labels of the per-process series.
    pub(crate) labels: MetricLabels,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut enc,
            "gracewatch_ready",
            "1 once the eBPF programs are attached and the startup snapshot is merged.",
            None,
            i64::from(self.status.is_some()),
        )?;
        let Some(status) = &self.status else {
            return Ok(());
        };
        gauge_f64(
            &mut enc,
            "gracewatch_monitor_uptime",
            "Time since the monitor started.",
            Some(&Unit::Seconds),
            status.uptime_ms as f64 / 1000.0,
        )?;

        let proc_labels = |p: &ProcessStatus| self.labels.of_process(p);
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_process_live_connections",
                "Live inbound TCP connections (ESTABLISHED or CLOSE_WAIT) a process holds.",
                None,
                MetricType::Gauge,
            )?;
            for p in &status.processes {
                ConstGauge::new(saturate(p.live)).encode(m.encode_family(&proc_labels(p))?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_process_oldest_connection_age",
                "Age of the oldest live inbound connection a process holds (a lower bound for connections older than the agent).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for p in &status.processes {
                if let Some(ms) = p.oldest_live_ms {
                    ConstGauge::new(ms as f64 / 1000.0)
                        .encode(m.encode_family(&proc_labels(p))?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_process_accepted_connections",
                "Connections a process accepted since the monitor started.",
                None,
                MetricType::Counter,
            )?;
            for p in &status.processes {
                ConstCounter::new(p.accepted_total).encode(m.encode_family(&proc_labels(p))?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_process_closed_connections",
                "Connections a process held that ended since the monitor started.",
                None,
                MetricType::Counter,
            )?;
            for p in &status.processes {
                ConstCounter::new(p.closed_total).encode(m.encode_family(&proc_labels(p))?)?;
            }
        }

        let listener_labels = |netns: u32, address: &str| {
            [
                ("netns", netns.to_string()),
                ("address", label_safe(address)),
            ]
        };
        type Field = fn(&crate::tracker::ListenerStatus) -> u64;
        let listener_gauges: [(&str, &str, Field); 3] = [
            (
                "gracewatch_listener_live_connections",
                "Live inbound connections that came through a listening socket, summed over its holders.",
                |l| l.holders.iter().map(|h| h.live).sum(),
            ),
            (
                "gracewatch_listener_accept_queue_depth",
                "Connections whose handshake completed but that no process accepted yet.",
                |l| l.accept_queue,
            ),
            (
                "gracewatch_listener_holders",
                "Processes holding a listening socket (more than one during a handover).",
                |l| l.holders.len() as u64,
            ),
        ];
        for (name, help, field) in listener_gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for l in &status.listeners {
                ConstGauge::new(saturate(field(l)))
                    .encode(m.encode_family(&listener_labels(l.netns, &l.address.to_string()))?)?;
            }
        }
        let listener_counters: [(&str, &str, Field); 2] = [
            (
                "gracewatch_listener_accepted_connections",
                "Connections accepted from a listening socket since the monitor started.",
                |l| l.accepted_total,
            ),
            (
                "gracewatch_listener_queue_drops",
                "Connections that died in a listener's accept queue since the monitor started.",
                |l| l.queue_drops_total,
            ),
        ];
        for (name, help, field) in listener_counters {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &status.listeners {
                ConstCounter::new(field(l))
                    .encode(m.encode_family(&listener_labels(l.netns, &l.address.to_string()))?)?;
            }
        }

        // Roles: from the generations of each current listener, so a
        // listener that went away takes its series with it.
        let draining = |l: &crate::tracker::ListenerStatus| {
            l.generations
                .iter()
                .filter(|g| g.role == Role::Draining)
                .map(|g| g.role_since_ms)
                .collect::<Vec<u64>>()
        };
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_processes_draining",
                "Processes draining now among a listener's generations (they hold live connections and stopped accepting on it).",
                None,
                MetricType::Gauge,
            )?;
            for l in &status.listeners {
                ConstGauge::new(saturate(draining(l).len() as u64))
                    .encode(m.encode_family(&listener_labels(l.netns, &l.address.to_string()))?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "gracewatch_oldest_draining",
                "How long the longest-draining process among a listener's generations has been draining (no series while none drains).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for l in &status.listeners {
                if let Some(since) = draining(l).into_iter().min() {
                    ConstGauge::new(status.uptime_ms.saturating_sub(since) as f64 / 1000.0)
                        .encode(
                            m.encode_family(&listener_labels(l.netns, &l.address.to_string()))?,
                        )?;
                }
            }
        }

        ConstCounter::new(status.lost_events).encode(enc.encode_descriptor(
            "gracewatch_lost_events",
            "Kernel events lost (ring buffer full) since the programs were loaded; counts may be stale until the next rescan.",
            None,
            MetricType::Counter,
        )?)?;

        ConstCounter::new(status.map_full_total).encode(enc.encode_descriptor(
            "gracewatch_map_full",
            "Episodes in which connections went untracked (a kernel table full, or a pre-existing connection not registered); counts may lag until the next rescan.",
            None,
            MetricType::Counter,
        )?)?;

        if let Some(p) = self.programs {
            gauge(
                &mut enc,
                "gracewatch_bpf_stats_enabled",
                "1 while the kernel measures BPF run time (the two series below stay flat otherwise).",
                None,
                i64::from(self.bpf_stats_enabled),
            )?;
            ConstCounter::new(p.run_time.as_secs_f64()).encode(enc.encode_descriptor(
                "gracewatch_bpf_run_time",
                "Time the kernel spent running gracewatch's eBPF programs.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?)?;
            ConstCounter::new(p.run_count).encode(enc.encode_descriptor(
                "gracewatch_bpf_runs",
                "Times gracewatch's eBPF programs ran.",
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn gauge_f64(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Family, HolderStatus, ListenerStatus, ProcessStatus};

    fn status() -> Status {
        Status {
            schema: crate::tracker::STATUS_SCHEMA.to_owned(),
            uptime_ms: 1500,
            processes: vec![ProcessStatus {
                pid: 42,
                comm: "we\"ird\\name\n\r\u{1b}]0;x".to_owned(),
                live: 3,
                listeners: vec![([0, 0, 0, 0], 80).into()],
                accepted_total: 5,
                closed_total: 2,
                oldest_live_ms: Some(2500),
                ..ProcessStatus::default()
            }],
            listeners: vec![ListenerStatus {
                netns: 4026531840,
                address: ([0, 0, 0, 0], 80).into(),
                family: Family::Ipv4,
                holders: vec![HolderStatus {
                    pid: 42,
                    comm: "nginx".to_owned(),
                    live: 3,
                }],
                accept_queue: 1,
                accepted_total: 5,
                queue_drops_total: 0,
                generations: Vec::new(),
            }],
            lost_events: 7,
            map_full_total: 2,
        }
    }

    #[test]
    fn exposition_has_every_family_and_escapes_labels() {
        let m = Metrics::new();
        m.drain_started();
        m.drain_finished(&DrainReport {
            targets: vec![42],
            outcome: Outcome::Timeout,
            initial_live: 1,
            peak_live: 1,
            duration_ms: 2000,
            signal_sent: None,
            still_held: 1,
            held: vec![],
            ended_by: None,
            excluded: vec![],
            peers: vec![],
            idle: vec![],
            message: String::new(),
        });
        let text = m
            .render(
                Scrape {
                    status: Some(Arc::new(status())),
                    programs: Some(ProgramStats {
                        run_time: std::time::Duration::from_millis(250),
                        run_count: 9,
                    }),
                    bpf_stats_enabled: true,
                    labels: MetricLabels::default(),
                },
                Format::OpenMetrics,
            )
            .expect("encodes");
        for line in [
            "gracewatch_ready 1",
            "gracewatch_process_live_connections{pid=\"42\",comm=\"we\\\"ird\\\\name\\\\n\\\\r\\\\u{1b}]0;x\"} 3",
            "gracewatch_listener_live_connections{netns=\"4026531840\",address=\"0.0.0.0:80\"} 3",
            "gracewatch_listener_accept_queue_depth{netns=\"4026531840\",address=\"0.0.0.0:80\"} 1",
            "gracewatch_listener_accepted_connections_total{netns=\"4026531840\",address=\"0.0.0.0:80\"} 5",
            "gracewatch_lost_events_total 7",
            "gracewatch_map_full_total 2",
            "gracewatch_drains_total{outcome=\"timeout\"} 1",
            "gracewatch_drains_total{outcome=\"drained\"} 0",
            "gracewatch_drains_total{outcome=\"signal_refused\"} 0",
            "gracewatch_drain_duration_seconds_count{outcome=\"timeout\"} 1",
            "gracewatch_drains_running 0",
            "gracewatch_bpf_run_time_seconds_total 0.25",
            "gracewatch_bpf_runs_total 9",
            "gracewatch_process_oldest_connection_age_seconds{pid=\"42\",comm=\"we\\\"ird\\\\name\\\\n\\\\r\\\\u{1b}]0;x\"} 2.5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn restart_facts_and_roles_are_exported() {
        use std::time::Duration;

        use crate::tracker::{GenerationStatus, restart::Why};

        let m = Metrics::new();
        let fact = |change| Fact {
            seq: 0,
            at: Duration::ZERO,
            pid: 42,
            change,
        };
        m.fact(&fact(Change::Handover {
            listener: crate::event::ListenAddr {
                netns: 1,
                local: ([0, 0, 0, 0], 80).into(),
            },
            comm: "nginx".to_owned(),
            alongside: vec![41],
        }));
        m.fact(&fact(Change::Role {
            from: Role::Draining,
            to: Role::Drained,
            why: Why::ReachedZero,
            live: 0,
            drained: Some((Duration::from_millis(1500), 3)),
        }));
        // Not a drain that reached zero: no observation.
        m.fact(&fact(Change::Role {
            from: Role::Serving,
            to: Role::Draining,
            why: Why::ClosedItsListener,
            live: 3,
            drained: None,
        }));
        m.fact(&fact(Change::Exited {
            held: 4,
            was: Role::Draining,
        }));
        m.fact(&fact(Change::Exited {
            held: 0,
            was: Role::Drained,
        }));

        let mut st = status();
        let generation = |pid, role, role_since_ms| GenerationStatus {
            pid,
            comm: "nginx".to_owned(),
            role,
            role_since_ms,
            live: 1,
        };
        st.listeners[0].generations = vec![
            generation(40, Role::Draining, 300),
            generation(41, Role::Draining, 500),
            generation(42, Role::Serving, 500),
        ];
        let mut idle = st.listeners[0].clone();
        idle.address = ([0, 0, 0, 0], 81).into();
        idle.generations = vec![generation(42, Role::Serving, 0)];
        st.listeners.push(idle);
        let text = m
            .render(
                Scrape {
                    status: Some(Arc::new(st)),
                    ..Scrape::default()
                },
                Format::Text,
            )
            .expect("encodes");
        for line in [
            "gracewatch_handovers_total 1",
            "gracewatch_connections_dropped_by_exit_total 4",
            "gracewatch_observed_drain_duration_seconds_count 1",
            "gracewatch_observed_drain_duration_seconds_sum 1.5",
            "gracewatch_observed_drain_duration_seconds_bucket{le=\"2.5\"} 1",
            "gracewatch_observed_drain_duration_seconds_bucket{le=\"1.0\"} 0",
            "gracewatch_processes_draining{netns=\"4026531840\",address=\"0.0.0.0:80\"} 2",
            "gracewatch_processes_draining{netns=\"4026531840\",address=\"0.0.0.0:81\"} 0",
            "gracewatch_oldest_draining_seconds{netns=\"4026531840\",address=\"0.0.0.0:80\"} 1.2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("gracewatch_oldest_draining_seconds{") && l.contains(":81")),
            "no oldest-draining series while none drains: {text}"
        );
        for family in [
            "gracewatch_handovers_total",
            "gracewatch_connections_dropped_by_exit_total",
            "gracewatch_observed_drain_duration_seconds",
            "gracewatch_processes_draining",
            "gracewatch_oldest_draining_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "no HELP for {family}: {text}"
            );
        }
    }

    #[test]
    fn before_the_monitor_starts_only_agent_series_are_exported() {
        let text = Metrics::new()
            .render(Scrape::default(), Format::Text)
            .expect("encodes");
        assert!(text.contains("gracewatch_ready 0\n"), "{text}");
        assert!(!text.contains("gracewatch_process_"), "{text}");
    }

    #[test]
    fn governor_series_only_once_it_is_on() {
        let m = Metrics::new();
        let off = m.render(Scrape::default(), Format::Text).expect("encodes");
        assert!(!off.contains("gracewatch_governor"), "{off}");
        m.governor_action(Reason::MaxDraining, true);
        m.governor_on();
        m.governor_action(Reason::MaxDraining, true);
        m.governor_action(Reason::MaxDraining, true);
        m.governor_action(Reason::MaxAge, false);
        let on = m.render(Scrape::default(), Format::Text).expect("encodes");
        for line in [
            "# TYPE gracewatch_governor_signals_total counter",
            "gracewatch_governor_signals_total{reason=\"max_draining\"} 2",
            "gracewatch_governor_signals_total{reason=\"max_age\"} 0",
            "gracewatch_governor_signal_failures_total{reason=\"max_draining\"} 0",
            "gracewatch_governor_signal_failures_total{reason=\"max_age\"} 1",
        ] {
            assert!(on.lines().any(|l| l == line), "no {line:?} in\n{on}");
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8b5c3f2e-1d4a-4e6b-9c7d-0a1b2c3d4e5f";

    /// [`status`] with a second process in a pod's container, the first in
    /// no container.
    fn status_in_a_pod() -> Status {
        let mut st = status();
        st.processes[0].set_cgroup(Some("/system.slice/nginx.service"));
        let mut p = st.processes[0].clone();
        p.pid = 43;
        p.comm = "server".to_owned();
        p.set_cgroup(Some(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        )));
        st.processes.push(p);
        st
    }

    fn render(m: &Metrics, st: Status, labels: MetricLabels) -> String {
        m.render(
            Scrape {
                status: Some(Arc::new(st)),
                labels,
                ..Scrape::default()
            },
            Format::Text,
        )
        .expect("encodes")
    }

    #[test]
    fn where_processes_run_is_no_label_unless_asked() {
        let st = status_in_a_pod();
        let mut nowhere = st.clone();
        for p in &mut nowhere.processes {
            p.set_cgroup(None);
        }
        let m = Metrics::new();
        let off = render(&m, st.clone(), MetricLabels::default());
        // Byte for byte what a status without cgroups gives.
        assert_eq!(off, render(&m, nowhere, MetricLabels::default()));
        assert!(
            off.contains("\ngracewatch_process_live_connections{pid=\"43\",comm=\"server\"} 3\n")
        );
        for label in ["container_id", "pod_uid", "cgroup="] {
            assert!(!off.contains(label), "{label} in\n{off}");
        }

        let all = render(
            &m,
            st.clone(),
            MetricLabels::of(&[
                MetricLabel::Container,
                MetricLabel::Pod,
                MetricLabel::Cgroup,
            ]),
        );
        let cgroup = st.processes[1].cgroup.clone().expect("a cgroup");
        for family in [
            "gracewatch_process_live_connections",
            "gracewatch_process_oldest_connection_age_seconds",
            "gracewatch_process_accepted_connections_total",
            "gracewatch_process_closed_connections_total",
        ] {
            let want = format!(
                "{family}{{pid=\"43\",comm=\"server\",container_id=\"{ID}\",pod_uid=\"{UID}\",cgroup=\"{cgroup}\"}}"
            );
            assert!(all.contains(&want), "missing {want} in\n{all}");
        }
        // Where the path names no container, only the cgroup.
        assert!(all.contains(
            "\ngracewatch_process_live_connections{pid=\"42\",comm=\"we\\\"ird\\\\name\\\\n\\\\r\\\\u{1b}]0;x\",cgroup=\"/system.slice/nginx.service\"} 3\n"
        ), "{all}");

        let pod_only = render(&m, st, MetricLabels::of(&[MetricLabel::Pod]));
        assert!(pod_only.contains(&format!(
            "\ngracewatch_process_live_connections{{pid=\"43\",comm=\"server\",pod_uid=\"{UID}\"}} 3\n"
        )), "{pod_only}");
        assert!(!pod_only.contains("container_id") && !pod_only.contains("cgroup="));
    }

    #[test]
    fn metric_labels_round_trip_through_bits() {
        for labels in [
            vec![],
            vec![MetricLabel::Container],
            vec![MetricLabel::Pod, MetricLabel::Cgroup],
            vec![
                MetricLabel::Container,
                MetricLabel::Pod,
                MetricLabel::Cgroup,
            ],
        ] {
            let l = MetricLabels::of(&labels);
            assert_eq!(MetricLabels::from_bits(l.bits()), l, "{labels:?}");
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn accept_headers_pick_the_format() {
        for (accept, want) in [
            ("", Format::Text),
            ("text/plain", Format::Text),
            ("*/*", Format::Text),
            ("application/json", Format::Text),
            ("application/openmetrics-text", Format::OpenMetrics),
            (
                "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                Format::OpenMetrics,
            ),
            (
                "application/openmetrics-text;q=0.2, text/plain",
                Format::Text,
            ),
            ("application/openmetrics-text;q=0", Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept}");
        }
    }

    #[test]
    fn the_text_format_describes_counters_by_sample_name() {
        let m = Metrics::new();
        let text = m.render(Scrape::default(), Format::Text).expect("encodes");
        assert!(
            text.contains("# HELP gracewatch_connections_accepted_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE gracewatch_connections_accepted_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\ngracewatch_connections_accepted_total 0\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let open = m
            .render(Scrape::default(), Format::OpenMetrics)
            .expect("encodes");
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    fn control_characters_never_reach_a_label_raw() {
        assert_eq!(label_safe("nginx"), "nginx");
        let safe = label_safe("a\r\u{1b}[2Jb\u{9b}");
        assert!(!safe.chars().any(char::is_control), "{safe:?}");
        assert!(safe.starts_with("a\\r\\u{1b}[2Jb"), "{safe:?}");
    }
}
