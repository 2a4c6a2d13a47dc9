//! What a TCPStore server counts for its operators, in Prometheus's text
//! format (version 0.0.4): every name starts with `distcore_`. The event
//! loop's thread writes (relaxed atomic adds: a few nanoseconds each); any
//! thread renders ([`Metrics::render`]) without stopping it.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `distcore_build_info` | gauge (1) | `version` |
//! | `distcore_requests_total` | counter | `command` |
//! | `distcore_request_errors_total` | counter | `command` |
//! | `distcore_request_duration_seconds` | histogram | `command` |
//! | `distcore_connections` | gauge | `kind`: handshake, pytorch, distcore |
//! | `distcore_connections_accepted_total` | counter | |
//! | `distcore_connections_refused_total` | counter | `reason` |
//! | `distcore_connections_throttled_total` | counter | |
//! | `distcore_connections_throttled` | gauge | |
//! | `distcore_waiters` | gauge | |
//! | `distcore_keys` | gauge | |
//! | `distcore_stored_bytes` | gauge | |
//! | `distcore_quota_limit` | gauge | `quota` (only those set) |
//! | `distcore_quota_refusals_total` | counter | `quota` |

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::super::protocol::Command;
use super::Quotas;

/// Why the server closed a connection (its peer did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address is outside the allow-list.
    NotAllowed,
    /// The server held its maximum of connections.
    ConnectionQuota,
    /// The process had no file descriptor left to accept it with.
    OutOfDescriptors,
    /// It sent a request before authenticating.
    Unauthenticated,
    /// Its proof of the secret was wrong.
    AuthenticationFailed,
    /// It made a request in clear where the server requires TLS.
    Plaintext,
    /// Its TLS handshake failed (no certificate or one not trusted, or no
    /// TLS at all).
    TlsFailed,
    /// It had not finished its handshake (TLS, authentication) within the
    /// handshake timeout.
    HandshakeTimeout,
    /// It broke the protocol (a bad magic, an unknown command, a request
    /// over the limits).
    Malformed,
    /// A request of a PyTorch client failed, which PyTorch's protocol can
    /// only tell by closing the connection (its server does the same).
    RequestFailed,
    /// It belonged to a liveness session that failed (its TTL passed, a
    /// newer incarnation fenced it, it reported an error, or its own
    /// connection was lost): its process learns so.
    SessionFailed,
}

impl Refusal {
    const ALL: [(Refusal, &'static str); 11] = [
        (Refusal::NotAllowed, "not_allowed"),
        (Refusal::ConnectionQuota, "connection_quota"),
        (Refusal::OutOfDescriptors, "out_of_descriptors"),
        (Refusal::Unauthenticated, "unauthenticated"),
        (Refusal::AuthenticationFailed, "authentication_failed"),
        (Refusal::Plaintext, "plaintext"),
        (Refusal::TlsFailed, "tls_failed"),
        (Refusal::HandshakeTimeout, "handshake_timeout"),
        (Refusal::Malformed, "malformed"),
        (Refusal::RequestFailed, "request_failed"),
        (Refusal::SessionFailed, "session_failed"),
    ];

    /// Its place in `ALL` (the variants are declared in that order).
    fn index(self) -> usize {
        self as usize
    }
}

/// What a connection has shown itself to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnKind {
    /// Not validated yet, or not yet through what the server requires
    /// (authentication, TLS).
    Handshake,
    /// Validated, without distcore's extensions (a PyTorch client).
    PyTorch,
    /// Negotiated distcore's extensions.
    Distcore,
}

impl ConnKind {
    const ALL: [(ConnKind, &'static str); 3] = [
        (ConnKind::Handshake, "handshake"),
        (ConnKind::PyTorch, "pytorch"),
        (ConnKind::Distcore, "distcore"),
    ];

    /// Its place in `ALL` (the variants are declared in that order).
    fn index(self) -> usize {
        self as usize
    }
}

/// A quota a server enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quota {
    Connections,
    /// Connections still in their handshake.
    Handshakes,
    Keys,
    StoredBytes,
}

impl Quota {
    const ALL: [(Quota, &'static str); 4] = [
        (Quota::Connections, "connections"),
        (Quota::Handshakes, "handshakes"),
        (Quota::Keys, "keys"),
        (Quota::StoredBytes, "stored_bytes"),
    ];

    /// Its place in `ALL` (the variants are declared in that order).
    fn index(self) -> usize {
        self as usize
    }

    fn limit(self, quotas: &Quotas, max_handshakes: Option<usize>) -> Option<u64> {
        match self {
            Quota::Connections => quotas.max_connections.map(|n| n as u64),
            Quota::Handshakes => max_handshakes.map(|n| n as u64),
            Quota::Keys => quotas.max_keys.map(|n| n as u64),
            Quota::StoredBytes => quotas.max_stored_bytes,
        }
    }
}

/// Upper bounds of the duration buckets, in seconds (10 µs to 5 min: an
/// in-memory request to a long wait).
const BOUNDS: [f64; 14] = [
    1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// A histogram of durations: a count per bucket (not cumulative; made so
/// when rendered) and the sum.
struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

const COMMANDS: usize = Command::ALL.len();

/// A server's counters and gauges.
pub(crate) struct Metrics {
    quotas: Quotas,
    /// The budget of connections in their handshake, on a server that
    /// has one (a secret or TLS).
    max_handshakes: Option<usize>,
    requests: [AtomicU64; COMMANDS],
    errors: [AtomicU64; COMMANDS],
    durations: [Histogram; COMMANDS],
    accepted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    quota_refusals: [AtomicU64; Quota::ALL.len()],
    throttled: AtomicU64,
    connections: [AtomicU64; ConnKind::ALL.len()],
    throttled_now: AtomicU64,
    waiters: AtomicU64,
    keys: AtomicU64,
    stored_bytes: AtomicU64,
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// What the core publishes after each turn of the loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gauges {
    pub(crate) connections: [u64; ConnKind::ALL.len()],
    pub(crate) throttled: u64,
    pub(crate) waiters: u64,
    pub(crate) keys: u64,
    pub(crate) stored_bytes: u64,
}

impl Gauges {
    /// Connections of `kind`.
    pub(crate) fn connections_of(&mut self, kind: ConnKind) -> &mut u64 {
        &mut self.connections[kind.index()]
    }
}

impl Metrics {
    /// Zeroed metrics of a server enforcing `quotas`, and `max_handshakes`
    /// if connections have something to prove.
    pub(crate) fn new(quotas: Quotas, max_handshakes: Option<usize>) -> Metrics {
        Metrics {
            quotas,
            max_handshakes,
            requests: counters(),
            errors: counters(),
            durations: std::array::from_fn(|_| Histogram::default()),
            accepted: AtomicU64::new(0),
            refused: counters(),
            quota_refusals: counters(),
            throttled: AtomicU64::new(0),
            connections: counters(),
            throttled_now: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        }
    }

    /// A request of `command` was answered after `took`, with an error if
    /// `failed`.
    pub(crate) fn served(&self, command: Command, took: Duration, failed: bool) {
        let i = command.index();
        self.requests[i].fetch_add(1, Relaxed);
        if failed {
            self.errors[i].fetch_add(1, Relaxed);
        }
        self.durations[i].observe(took);
    }

    /// A connection was accepted.
    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// The server closed a connection, for `why`.
    pub(crate) fn refused(&self, why: Refusal) {
        self.refused_many(why, 1);
    }

    /// The server closed `n` connections, for `why`.
    pub(crate) fn refused_many(&self, why: Refusal, n: u64) {
        if n > 0 {
            self.refused[why.index()].fetch_add(n, Relaxed);
        }
    }

    /// A quota refused a connection or a write.
    pub(crate) fn over_quota(&self, quota: Quota) {
        self.quota_refusals[quota.index()].fetch_add(1, Relaxed);
    }

    /// A connection was paused: its unsent replies passed the cap.
    pub(crate) fn throttled(&self) {
        self.throttled.fetch_add(1, Relaxed);
    }

    /// Sets the gauges.
    pub(crate) fn publish(&self, gauges: &Gauges) {
        for (slot, n) in self.connections.iter().zip(gauges.connections) {
            slot.store(n, Relaxed);
        }
        self.throttled_now.store(gauges.throttled, Relaxed);
        self.waiters.store(gauges.waiters, Relaxed);
        self.keys.store(gauges.keys, Relaxed);
        self.stored_bytes.store(gauges.stored_bytes, Relaxed);
    }

    /// Open connections, of every kind.
    pub(crate) fn open_connections(&self) -> u64 {
        self.connections.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Pending waits.
    pub(crate) fn waiters(&self) -> u64 {
        self.waiters.load(Relaxed)
    }

    /// Keys holding a value or a queue.
    pub(crate) fn keys(&self) -> u64 {
        self.keys.load(Relaxed)
    }

    /// The metrics in Prometheus's text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        let o = &mut out;
        let load = |n: &AtomicU64| n.load(Relaxed);
        let version = [(crate::VERSION, 1)];
        family(
            o,
            "build_info",
            "gauge",
            "distcore's version.",
            "version",
            version,
        );
        family(
            o,
            "requests_total",
            "counter",
            "Requests served, by command.",
            "command",
            by_command(&self.requests),
        );
        family(
            o,
            "request_errors_total",
            "counter",
            "Requests answered with an error (or, for PyTorch's clients, a closed connection), by command.",
            "command",
            by_command(&self.errors),
        );
        header(
            o,
            "request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its answer (waits included), by command.",
        );
        for ((_, name), h) in Command::ALL.iter().zip(&self.durations) {
            if h.count() == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (bucket, bound) in h.buckets.iter().zip(BOUNDS.iter().map(Some).chain([None])) {
                cumulative += load(bucket);
                let le = bound.map_or_else(|| "+Inf".to_owned(), |b| format!("{b:e}"));
                let _ = writeln!(
                    o,
                    "distcore_request_duration_seconds_bucket{{command=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = load(&h.sum_nanos) as f64 / 1e9;
            let _ = writeln!(
                o,
                "distcore_request_duration_seconds_sum{{command=\"{name}\"}} {sum}"
            );
            let _ = writeln!(
                o,
                "distcore_request_duration_seconds_count{{command=\"{name}\"}} {cumulative}"
            );
        }
        family(
            o,
            "connections",
            "gauge",
            "Open connections, by kind: handshake (not validated yet), pytorch, distcore.",
            "kind",
            ConnKind::ALL
                .iter()
                .zip(&self.connections)
                .map(|((_, k), n)| (*k, load(n))),
        );
        single(
            o,
            "connections_accepted_total",
            "counter",
            "Connections accepted.",
            &self.accepted,
        );
        family(
            o,
            "connections_refused_total",
            "counter",
            "Connections the server closed, by reason.",
            "reason",
            Refusal::ALL
                .iter()
                .zip(&self.refused)
                .map(|((_, r), n)| (*r, load(n))),
        );
        single(
            o,
            "connections_throttled_total",
            "counter",
            "Times a connection was paused because its unsent replies passed 256 KiB (backpressure).",
            &self.throttled,
        );
        single(
            o,
            "connections_throttled",
            "gauge",
            "Connections paused now by backpressure.",
            &self.throttled_now,
        );
        single(
            o,
            "waiters",
            "gauge",
            "Pending WAIT, WAIT_GET and BARRIER requests.",
            &self.waiters,
        );
        single(
            o,
            "keys",
            "gauge",
            "Keys holding a value or a queue.",
            &self.keys,
        );
        single(
            o,
            "stored_bytes",
            "gauge",
            "Bytes stored: keys with their values and queue elements.",
            &self.stored_bytes,
        );
        let limits: Vec<_> = Quota::ALL
            .iter()
            .filter_map(|(q, name)| Some((*name, q.limit(&self.quotas, self.max_handshakes)?)))
            .collect();
        if !limits.is_empty() {
            let help = "The quotas the server enforces.";
            family(o, "quota_limit", "gauge", help, "quota", limits);
        }
        family(
            o,
            "quota_refusals_total",
            "counter",
            "Connections and writes refused by a quota, by quota.",
            "quota",
            Quota::ALL
                .iter()
                .zip(&self.quota_refusals)
                .map(|((_, q), n)| (*q, load(n))),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP distcore_{name} {help}");
    let _ = writeln!(out, "# TYPE distcore_{name} {kind}");
}

/// One sample per command, from a counter per command.
fn by_command(counters: &[AtomicU64; COMMANDS]) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    Command::ALL
        .iter()
        .zip(counters)
        .map(|((_, name), n)| (*name, n.load(Relaxed)))
}

/// A metric without labels.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: &AtomicU64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "distcore_{name} {}", value.load(Relaxed));
}

/// A metric with one sample per value of `label`.
fn family<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    header(out, name, kind, help);
    for (value, n) in samples {
        let _ = writeln!(out, "distcore_{name}{{{label}=\"{value}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_tables_are_in_declaration_order() {
        for (i, (r, _)) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, (k, _)) in ConnKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        for (i, (q, _)) in Quota::ALL.iter().enumerate() {
            assert_eq!(q.index(), i);
        }
    }

    #[test]
    fn histograms_are_cumulative_and_counters_labelled() {
        let m = Metrics::new(
            Quotas {
                max_keys: Some(10),
                ..Quotas::default()
            },
            Some(128),
        );
        m.served(Command::Get, Duration::from_micros(3), false);
        m.served(Command::Get, Duration::from_millis(2), true);
        m.served(Command::Get, Duration::from_secs(1000), false);
        m.refused(Refusal::NotAllowed);
        m.over_quota(Quota::Keys);
        let text = m.render();
        for line in [
            "distcore_requests_total{command=\"get\"} 3",
            "distcore_requests_total{command=\"set\"} 0",
            "distcore_request_errors_total{command=\"get\"} 1",
            "distcore_request_duration_seconds_bucket{command=\"get\",le=\"1e-5\"} 1",
            "distcore_request_duration_seconds_bucket{command=\"get\",le=\"5e-3\"} 2",
            "distcore_request_duration_seconds_bucket{command=\"get\",le=\"3e2\"} 2",
            "distcore_request_duration_seconds_bucket{command=\"get\",le=\"+Inf\"} 3",
            "distcore_request_duration_seconds_count{command=\"get\"} 3",
            "distcore_connections_refused_total{reason=\"not_allowed\"} 1",
            "distcore_quota_limit{quota=\"keys\"} 10",
            "distcore_quota_limit{quota=\"handshakes\"} 128",
            "distcore_quota_refusals_total{quota=\"keys\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("command=\"set\",le="),
            "unused histograms are left out"
        );
        assert!(!text.contains("quota=\"connections\"} 0\ndistcore_quota_limit"));
    }
}
