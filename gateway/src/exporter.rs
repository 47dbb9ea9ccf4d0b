//! The Prometheus exposition behind `GET /metrics`: worker counters summed
//! at scrape time (no lock on the data path), the handshake-latency
//! histogram, certificate expiry, reloads and the audit writer.

use crate::metrics::HANDSHAKE_BUCKETS_US;
use crate::prom::{BucketCounts, PromWriter};
use crate::server::Shared;

const P: &str = "mcp_gateway";

/// Renders every metric as Prometheus text (format 0.0.4).
pub fn render(shared: &Shared) -> String {
    let s = shared.snapshot();
    let mut w = PromWriter::new();
    let c = |w: &mut PromWriter, name: &str, help: &str, v: u64| {
        w.counter(&format!("{P}_{name}"), help, &[], v);
    };
    c(
        &mut w,
        "connections_accepted_total",
        "Client connections accepted.",
        s.accepted,
    );
    w.gauge(
        &format!("{P}_connections_active"),
        "Client connections open now.",
        &[],
        s.active,
    );
    c(
        &mut w,
        "connections_closed_total",
        "Client connections closed.",
        s.closed,
    );
    c(
        &mut w,
        "connections_rejected_full_total",
        "Connections closed at once because a worker was at max_connections_per_worker.",
        s.rejected_max_connections,
    );
    c(
        &mut w,
        "handshakes_total",
        "TLS handshakes completed.",
        s.handshakes,
    );
    // Failures by reason, one family with a label.
    let failures = [
        ("handshake_failed", s.handshake_failures),
        ("handshake_timeout", s.handshake_timeouts),
        ("plaintext_http", s.plaintext_http),
        ("not_tls", s.not_tls),
        ("backend_connect", s.backend_connect_failures),
        ("backend_reset", s.backend_resets),
        ("backend_tls", s.backend_tls_failures),
        ("client_error", s.client_errors),
        ("tls_error", s.tls_errors),
        ("idle_timeout", s.idle_timeouts),
        ("shutdown", s.shutdown_closes),
        ("ktls_failed", s.ktls_failures),
        ("ktls_closed", s.ktls_closes),
        ("internal_error", s.internal_errors),
    ];
    for (reason, v) in failures {
        w.counter(
            &format!("{P}_connection_failures_total"),
            "Connections that ended other than normally, by reason.",
            &[("reason", reason)],
            v,
        );
    }
    c(
        &mut w,
        "responses_502_total",
        "502 answers sent to clients whose backend failed.",
        s.responses_502,
    );
    w.counter(
        &format!("{P}_bytes_total"),
        "Plaintext bytes relayed.",
        &[("direction", "up")],
        s.bytes_up,
    );
    w.counter(
        &format!("{P}_bytes_total"),
        "Plaintext bytes relayed.",
        &[("direction", "down")],
        s.bytes_down,
    );
    w.counter(
        &format!("{P}_record_path_total"),
        "Finished TLS connections by record path.",
        &[("path", "ktls")],
        s.ktls_connections,
    );
    w.counter(
        &format!("{P}_record_path_total"),
        "Finished TLS connections by record path.",
        &[("path", "userspace")],
        s.userspace_path,
    );
    w.counter(
        &format!("{P}_spliced_bytes_total"),
        "Bytes moved with splice between kTLS sockets and backends.",
        &[("direction", "up")],
        s.spliced_up,
    );
    w.counter(
        &format!("{P}_spliced_bytes_total"),
        "Bytes moved with splice between kTLS sockets and backends.",
        &[("direction", "down")],
        s.spliced_down,
    );
    c(
        &mut w,
        "policy_deviations_total",
        "Handshakes outside tls.expected_cipher_suites (warn) or refused for it (enforce).",
        s.policy_deviations,
    );
    c(
        &mut w,
        "cert_expired_refusals_total",
        "Handshakes refused because the selected certificate has expired.",
        shared.tls.expired_refusals(),
    );
    c(
        &mut w,
        "ticket_decrypt_failures_total",
        "Session tickets that did not decrypt with any configured key.",
        shared.tls.ticket_decrypt_failures(),
    );
    c(
        &mut w,
        "reloads_total",
        "Successful reloads of the TLS material.",
        shared.reloads.load(std::sync::atomic::Ordering::Relaxed),
    );
    c(
        &mut w,
        "reload_failures_total",
        "Reloads refused (the old material kept serving).",
        shared
            .reload_failures
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let bounds: Vec<f64> = HANDSHAKE_BUCKETS_US
        .iter()
        .map(|&us| us as f64 / 1e6)
        .collect();
    let h = &s.handshake_time;
    w.histogram(
        &format!("{P}_handshake_duration_seconds"),
        "From accept to the end of the TLS handshake.",
        &[],
        &bounds,
        BucketCounts::PerBucket(&h.buckets[..HANDSHAKE_BUCKETS_US.len()]),
        h.sum_us as f64 / 1e6,
        h.count(),
    );
    for (listener, info) in shared.tls.cert_infos() {
        w.gauge(
            &format!("{P}_cert_expiry_seconds"),
            "Seconds until the certificate expires (negative: expired).",
            &[("listener", &listener), ("name", &info.name)],
            info.seconds_to_expiry,
        );
    }
    if let Some(a) = shared.audit_stats() {
        c(
            &mut w,
            "audit_records_written_total",
            "Audit records written.",
            a.records_written,
        );
        c(
            &mut w,
            "audit_write_errors_total",
            "Audit write errors.",
            a.write_errors,
        );
        c(
            &mut w,
            "audit_records_dropped_total",
            "Audit records dropped (writer far behind).",
            a.records_dropped,
        );
    }
    w.finish()
}
