//! Per-worker counters. Each worker writes only its own cache-line-aligned
//! block with relaxed atomics (no lock, no shared line on the data path);
//! readers sum the blocks.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::session::CloseReason;

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        /// One worker's counters.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct WorkerMetrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// Handshake durations (accept to Finished).
            pub handshake_time: Histogram,
        }

        /// A point-in-time sum over workers.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $(#[doc = $doc] pub $name: u64,)*
            pub handshake_time: HistogramSnapshot,
        }

        impl Snapshot {
            fn add(&mut self, w: &WorkerMetrics) {
                $(self.$name += w.$name.load(Ordering::Relaxed);)*
                w.handshake_time.add_to(&mut self.handshake_time);
            }

            /// `(name, value)` pairs, for logs and exporters.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    accepted: "Connections accepted.",
    rejected_max_connections: "Connections closed at once because the worker was full.",
    active: "Connections open now.",
    handshakes: "TLS handshakes completed.",
    handshake_failures: "TLS handshakes that failed (bad ClientHello, no common suite...).",
    handshake_timeouts: "Connections closed by the handshake timeout.",
    plaintext_http: "Plaintext HTTP requests on the TLS port (answered 400).",
    not_tls: "Connections whose first bytes were neither TLS nor HTTP.",
    backend_connect_failures: "Backend connects that failed or timed out.",
    backend_resets: "Backend connections that failed after connecting.",
    backend_tls_failures: "TLS connections to the backend that failed (verification, handshake, records).",
    internal_errors: "Connections closed because of an internal error (a bug: a panic caught per connection).",
    policy_deviations: "Handshakes outside tls.expected_cipher_suites (warn mode), or refused for offering none of them (enforce mode).",
    responses_502: "502 answers sent to clients.",
    client_errors: "Client connections that ended in a socket error.",
    tls_errors: "TLS errors after the handshake.",
    idle_timeouts: "Connections closed by the idle timeout.",
    shutdown_closes: "Connections closed when the drain period ran out.",
    closed: "Connections closed.",
    bytes_up: "Plaintext bytes relayed client to backend.",
    bytes_down: "Plaintext bytes relayed backend to client.",
    userspace_path: "Connections relayed with user-space TLS records (no kTLS).",
    ktls_connections: "Connections whose records went through kernel TLS.",
    ktls_failures: "Connections lost because kernel TLS could not take them over.",
    ktls_closes: "kTLS connections closed for a kernel TLS reason (no rekey support, decrypt error...).",
    spliced_up: "Bytes moved client to backend with splice (kernel TLS).",
    spliced_down: "Bytes moved backend to client with splice (kernel TLS).",
}

/// Upper bounds of the handshake-duration buckets, in microseconds.
pub const HANDSHAKE_BUCKETS_US: [u64; 12] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

/// A fixed-bucket latency histogram one worker writes (relaxed atomics).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; HANDSHAKE_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// Summed histogram: per-bucket counts (not cumulative), sum, count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; HANDSHAKE_BUCKETS_US.len() + 1],
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

impl Histogram {
    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = HANDSHAKE_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(HANDSHAKE_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn add_to(&self, s: &mut HistogramSnapshot) {
        for (acc, b) in s.buckets.iter_mut().zip(&self.buckets) {
            *acc += b.load(Ordering::Relaxed);
        }
        s.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

impl WorkerMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished connection by its close reason.
    pub fn record_close(&self, reason: Option<&CloseReason>) {
        let counter = match reason {
            None | Some(CloseReason::Normal) | Some(CloseReason::ClientGoneBeforeHandshake) => None,
            Some(CloseReason::PlaintextHttp) => Some(&self.plaintext_http),
            Some(CloseReason::NotTls) => Some(&self.not_tls),
            Some(CloseReason::HandshakeTimeout) => Some(&self.handshake_timeouts),
            Some(CloseReason::HandshakeFailed(_)) => Some(&self.handshake_failures),
            Some(CloseReason::TlsError(_)) => Some(&self.tls_errors),
            Some(CloseReason::BackendConnectFailed(_))
            | Some(CloseReason::BackendConnectTimeout) => Some(&self.backend_connect_failures),
            Some(CloseReason::BackendReset(_)) => Some(&self.backend_resets),
            Some(CloseReason::BackendTlsFailed(_)) => Some(&self.backend_tls_failures),
            Some(CloseReason::ClientError(_)) => Some(&self.client_errors),
            Some(CloseReason::IdleTimeout) => Some(&self.idle_timeouts),
            Some(CloseReason::Shutdown) => Some(&self.shutdown_closes),
            Some(CloseReason::KtlsFailed(_)) => Some(&self.ktls_failures),
            Some(CloseReason::KtlsClosed(_)) => Some(&self.ktls_closes),
        };
        if let Some(c) = counter {
            Self::inc(c);
        }
        Self::inc(&self.closed);
    }
}

/// Sums the workers' counters.
pub fn snapshot<'a>(workers: impl IntoIterator<Item = &'a WorkerMetrics>) -> Snapshot {
    let mut s = Snapshot::default();
    for w in workers {
        s.add(w);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_workers_and_counts_reasons() {
        let a = WorkerMetrics::default();
        let b = WorkerMetrics::default();
        a.record_close(Some(&CloseReason::PlaintextHttp));
        b.record_close(Some(&CloseReason::PlaintextHttp));
        b.record_close(Some(&CloseReason::Normal));
        let s = snapshot([&a, &b]);
        assert_eq!(s.plaintext_http, 2);
        assert_eq!(s.closed, 3);
        assert!(s.pairs().contains(&("closed", 3)));
        assert_eq!(std::mem::align_of::<WorkerMetrics>(), 128);
        a.handshake_time
            .record(std::time::Duration::from_micros(300));
        b.handshake_time.record(std::time::Duration::from_secs(60));
        let s = snapshot([&a, &b]);
        assert_eq!(
            s.handshake_time.buckets[1], 1,
            "300 µs lands in the 500 µs bucket"
        );
        assert_eq!(
            s.handshake_time.buckets[HANDSHAKE_BUCKETS_US.len()],
            1,
            "+Inf"
        );
        assert_eq!(s.handshake_time.count(), 2);
        assert_eq!(s.handshake_time.sum_us, 60_000_300);
    }
}
