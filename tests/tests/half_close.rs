//! TLS half-close in both directions.
//!
//! client -> backend: the client sends data then close_notify (optionally
//! also `shutdown(Write)` on TCP); the backend must see EOF right after the
//! exact bytes, and its answer (sent only after that EOF) must reach the
//! client in full, followed by close_notify.
//!
//! backend -> client: the backend sends its data and shuts down its write
//! side; the client gets the data then close_notify, and can keep sending
//! (TLS 1.3); the backend still receives those bytes.

use std::io::Write;
use std::time::Duration;

use gateway_tests::client::{PeerEnd, PumpOpts};
use gateway_tests::{
    connect_tls, hex, pump, read_to_close, seeded_bytes, sha256, wait_until, Backend, Gateway, Pki,
    Tls,
};

fn client_half_close(tls: Tls, tcp_shutdown: bool) {
    const REPLY_SEED: u64 = 77;
    const REPLY_LEN: usize = 200_000;
    let pki = Pki::new();
    let backend = Backend::collect_then_reply(REPLY_SEED, REPLY_LEN);
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let mut s = connect_tls(gw.addr(), &pki, tls);

    let payload = seeded_bytes(5 + tls as u64, 100_003);
    let mut pos = 0;
    let mut source = |buf: &mut [u8]| {
        let n = buf.len().min(payload.len() - pos);
        buf[..n].copy_from_slice(&payload[pos..pos + n]);
        pos += n;
        n
    };
    let mut got = Vec::new();
    let mut sink = |d: &[u8]| got.extend_from_slice(d);
    let opts = PumpOpts {
        timeout: Duration::from_secs(20),
        close_after_send: true,
        tcp_shutdown_after_close: tcp_shutdown,
        stop_after_recv: None, // until the gateway closes towards us
        ..Default::default()
    };
    let out = pump(&mut s, &mut source, &mut sink, &opts);
    let ctx = format!("{tls:?}, tcp_shutdown={tcp_shutdown}");

    let mut expected = format!("GOT {} {}\n", payload.len(), hex(&sha256(&payload))).into_bytes();
    expected.extend_from_slice(&seeded_bytes(REPLY_SEED, REPLY_LEN));

    assert!(out.error.is_none(), "{ctx}: {out:?}");
    assert!(
        !out.timed_out,
        "{ctx}: no close from the gateway within 20 s (did the backend ever see EOF?); got {} of {} reply bytes; backend records: {:?}",
        got.len(),
        expected.len(),
        backend.stats().records().iter().map(|r| (r.received.len(), r.saw_eof, r.note.clone())).collect::<Vec<_>>()
    );
    assert_eq!(out.sent, payload.len() as u64, "{ctx}");
    assert_eq!(
        got.len(),
        expected.len(),
        "{ctx}: reply length (first bytes: {:?}; peer end: {:?})",
        String::from_utf8_lossy(&got[..got.len().min(80)]),
        out.peer_end
    );
    assert!(got == expected, "{ctx}: reply corrupted");
    assert_eq!(
        out.peer_end,
        PeerEnd::CloseNotify,
        "{ctx}: reply must be followed by close_notify"
    );

    assert!(
        wait_until(Duration::from_secs(5), || backend.stats().records().len()
            == 1),
        "{ctx}: backend did not finish"
    );
    let rec = &backend.stats().records()[0];
    assert!(rec.saw_eof, "{ctx}: backend saw no clean EOF: {}", rec.note);
    assert_eq!(
        rec.received.len(),
        payload.len(),
        "{ctx}: backend byte count"
    );
    assert!(
        rec.received == payload,
        "{ctx}: backend received corrupted bytes"
    );
}

#[test]
fn client_half_close_tls12() {
    client_half_close(Tls::V12, false);
}

#[test]
fn client_half_close_tls12_with_tcp_shutdown() {
    client_half_close(Tls::V12, true);
}

#[test]
fn client_half_close_tls13() {
    client_half_close(Tls::V13, false);
}

#[test]
fn client_half_close_tls13_with_tcp_shutdown() {
    client_half_close(Tls::V13, true);
}

#[test]
fn backend_half_close_tls13_client_keeps_sending() {
    let pki = Pki::new();
    let response = seeded_bytes(9, 300_001);
    let backend = Backend::write_then_half_close(6, response.clone());
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);

    // The greeting makes sure the backend connection exists regardless of
    // whether the gateway connects eagerly or on first data.
    s.write_all(b"HELLO\n").unwrap();
    s.flush().unwrap();

    let (got, end) = read_to_close(&mut s);
    assert_eq!(got.len(), response.len(), "response length");
    assert!(got == response, "response corrupted");
    assert_eq!(
        end,
        PeerEnd::CloseNotify,
        "backend's write shutdown must arrive as close_notify"
    );

    // Keep sending after receiving close_notify (TLS 1.3 half-close).
    let more = seeded_bytes(10, 150_007);
    let mut pos = 0;
    let mut source = |buf: &mut [u8]| {
        let n = buf.len().min(more.len() - pos);
        buf[..n].copy_from_slice(&more[pos..pos + n]);
        pos += n;
        n
    };
    let mut extra = Vec::new();
    let mut sink = |d: &[u8]| extra.extend_from_slice(d);
    let opts = PumpOpts {
        timeout: Duration::from_secs(20),
        close_after_send: true,
        ..Default::default()
    };
    let out = pump(&mut s, &mut source, &mut sink, &opts);
    assert!(out.error.is_none() && !out.timed_out, "{out:?}");
    assert_eq!(out.sent, more.len() as u64);
    assert!(extra.is_empty(), "data after close_notify?");

    assert!(
        wait_until(Duration::from_secs(10), || backend.stats().records().len()
            == 1),
        "backend never saw EOF after the client's extra bytes; received so far: {} bytes",
        backend.stats().bytes_in()
    );
    let rec = &backend.stats().records()[0];
    assert!(rec.saw_eof, "backend: {}", rec.note);
    assert_eq!(
        rec.received.len(),
        more.len(),
        "bytes sent after half-close"
    );
    assert!(
        rec.received == more,
        "bytes sent after half-close corrupted"
    );
}
