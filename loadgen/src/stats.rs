//! Per-thread counters and latency histograms, and their merge into a
//! [`Report`].

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Error classes counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    Connect,
    Tls,
    Io,
    Eof,
    Timeout,
    Parse,
    Status,
    Verify,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Io,
        ErrorKind::Eof,
        ErrorKind::Timeout,
        ErrorKind::Parse,
        ErrorKind::Status,
        ErrorKind::Verify,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Io => "io",
            ErrorKind::Eof => "closed_by_peer",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Parse => "bad_http",
            ErrorKind::Status => "non_2xx",
            ErrorKind::Verify => "verify_mismatch",
        }
    }
}

/// Highest latency the histograms track (longer values are clamped).
pub const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // Constant bounds (1 ns .. 1 h, 3 significant digits) that hdrhistogram
    // accepts; `histogram_bounds_are_valid` checks it.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

fn record_into(h: &mut Histogram<u64>, d: Duration) {
    let ns = (d.as_nanos().min(u128::from(MAX_LATENCY_NS)) as u64).max(1);
    h.saturating_record(ns);
}

/// One thread's counters.
#[derive(Debug, Clone)]
pub struct ThreadStats {
    pub hist: Histogram<u64>,
    pub uncorrected: Histogram<u64>,
    pub interval: Histogram<u64>,
    pub interval_requests: u64,
    pub requests: u64,
    pub warmup_requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: [u64; 8],
    pub connects: u64,
    pub handshakes: u64,
    pub resumed: u64,
    pub events: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Default for ThreadStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ThreadStats {
    pub fn new() -> Self {
        Self {
            hist: new_hist(),
            uncorrected: new_hist(),
            interval: new_hist(),
            interval_requests: 0,
            requests: 0,
            warmup_requests: 0,
            bytes_in: 0,
            bytes_out: 0,
            errors: [0; 8],
            connects: 0,
            handshakes: 0,
            resumed: 0,
            events: 0,
            first: None,
            last: None,
        }
    }

    pub fn error(&mut self, k: ErrorKind) {
        if let Some(i) = ErrorKind::ALL.iter().position(|&e| e == k) {
            self.errors[i] += 1;
        }
    }

    /// Records one completed request; requests not `measured` (started
    /// during the warm-up) are only counted as warm-up.
    pub fn record(
        &mut self,
        done: Instant,
        measured: bool,
        latency: Duration,
        uncorrected: Option<Duration>,
        bytes_out: u64,
        bytes_in: u64,
    ) {
        if !measured {
            self.warmup_requests += 1;
            return;
        }
        record_into(&mut self.hist, latency);
        record_into(&mut self.interval, latency);
        if let Some(u) = uncorrected {
            record_into(&mut self.uncorrected, u);
        }
        self.requests += 1;
        self.interval_requests += 1;
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        self.first.get_or_insert(done);
        self.last = Some(done);
    }

    /// Takes the interval histogram and count, resetting them.
    pub fn take_interval(&mut self) -> (Histogram<u64>, u64) {
        let h = std::mem::replace(&mut self.interval, new_hist());
        let n = std::mem::take(&mut self.interval_requests);
        (h, n)
    }

    pub fn merge(&mut self, o: &ThreadStats) {
        let _ = self.hist.add(&o.hist);
        let _ = self.uncorrected.add(&o.uncorrected);
        self.requests += o.requests;
        self.warmup_requests += o.warmup_requests;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            *a += b;
        }
        self.connects += o.connects;
        self.handshakes += o.handshakes;
        self.resumed += o.resumed;
        self.events += o.events;
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            p9999: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }
}

/// The result of a run (also the `--json` document).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub tls: bool,
    pub threads: usize,
    pub connections: usize,
    /// Target rate (open loop), requests/s.
    pub rate: Option<f64>,
    pub req_bytes: usize,
    pub resp_bytes: usize,
    pub sse: bool,
    pub verify: bool,
    pub warmup_s: f64,
    /// Measured window (first to last completion after warm-up).
    pub duration_s: f64,
    pub requests: u64,
    pub warmup_requests: u64,
    pub requests_per_s: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// (bytes_in + bytes_out) / duration, MiB/s.
    pub mib_per_s: f64,
    /// Latency (coordinated-omission corrected in open loop).
    pub latency_us: Latency,
    /// Open loop only: latency from the actual send time.
    pub latency_uncorrected_us: Option<Latency>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub connects: u64,
    pub handshakes: u64,
    pub resumed: u64,
    pub handshakes_per_s: f64,
    /// Idle: connections established and still open at the end.
    pub established: u64,
    pub open_at_end: u64,
    pub sse_events: u64,
    /// CPU time of this loadgen process during the run (user + system).
    pub client_cpu_s: f64,
}

impl Report {
    /// Fills the counters and summaries from merged stats; `window` is the
    /// measured duration.
    pub fn fill(&mut self, s: &ThreadStats, window: Duration, open_loop: bool) {
        let secs = window.as_secs_f64().max(1e-9);
        self.duration_s = window.as_secs_f64();
        self.requests = s.requests;
        self.warmup_requests = s.warmup_requests;
        self.requests_per_s = s.requests as f64 / secs;
        self.bytes_in = s.bytes_in;
        self.bytes_out = s.bytes_out;
        self.mib_per_s = (s.bytes_in + s.bytes_out) as f64 / secs / (1024.0 * 1024.0);
        self.latency_us = Latency::from_hist(&s.hist);
        self.latency_uncorrected_us = open_loop.then(|| Latency::from_hist(&s.uncorrected));
        self.errors = ErrorKind::ALL
            .iter()
            .zip(s.errors.iter())
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| (k.name().to_string(), n))
            .collect();
        self.errors_total = s.errors.iter().sum();
        self.connects = s.connects;
        self.handshakes = s.handshakes;
        self.resumed = s.resumed;
        self.handshakes_per_s = s.handshakes as f64 / secs;
        self.sse_events = s.events;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bounds_are_valid() {
        assert!(Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_NS, 3).is_ok());
    }

    /// Known latencies 1..=10000 µs, one each: the percentiles are known.
    #[test]
    fn percentiles_of_known_latencies() {
        let t0 = Instant::now();
        let mut s = ThreadStats::new();
        for us in 1..=10_000u64 {
            s.record(t0, true, Duration::from_micros(us), None, 10, 20);
        }
        let l = Latency::from_hist(&s.hist);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert_eq!(l.count, 10_000);
        assert!(close(l.p50, 5000.0), "p50 {}", l.p50);
        assert!(close(l.p90, 9000.0), "p90 {}", l.p90);
        assert!(close(l.p99, 9900.0), "p99 {}", l.p99);
        assert!(close(l.p999, 9990.0), "p99.9 {}", l.p999);
        assert!(close(l.p9999, 9999.0), "p99.99 {}", l.p9999);
        assert!(close(l.max, 10_000.0), "max {}", l.max);
        assert!(close(l.min, 1.0), "min {}", l.min);
        assert!(close(l.mean, 5000.5), "mean {}", l.mean);
    }

    #[test]
    fn warmup_is_not_measured_and_threads_merge() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut a = ThreadStats::new();
        a.record(t0, false, Duration::from_millis(500), None, 1, 1);
        a.record(later, true, Duration::from_micros(100), None, 1, 2);
        a.error(ErrorKind::Verify);
        let mut b = ThreadStats::new();
        b.record(later, true, Duration::from_micros(300), None, 4, 8);
        b.error(ErrorKind::Verify);
        b.error(ErrorKind::Connect);
        a.merge(&b);
        let mut r = Report::default();
        r.fill(&a, Duration::from_secs(2), false);
        assert_eq!(r.requests, 2);
        assert_eq!(r.warmup_requests, 1);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.bytes_in, 10);
        assert_eq!(r.bytes_out, 5);
        assert_eq!(r.errors.get("verify_mismatch"), Some(&2));
        assert_eq!(r.errors.get("connect"), Some(&1));
        assert_eq!(r.errors_total, 3);
        assert!(
            (r.latency_us.max - 300.0).abs() < 0.5,
            "{}",
            r.latency_us.max
        );
        assert!((r.latency_us.min - 100.0).abs() < 0.1);
        assert!(r.latency_uncorrected_us.is_none());
    }
}
