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
        }

        /// A point-in-time sum over workers.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Snapshot {
            fn add(&mut self, w: &WorkerMetrics) {
                $(self.$name += w.$name.load(Ordering::Relaxed);)*
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
    }
}
