//! Backend failures: refused connections and resets mid-stream.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use gateway_tests::client::{PeerEnd, PumpOpts};
use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, read_to_close, seeded_bytes, wait_until, Backend,
    Gateway, Pki, RefusedAddr, Tls,
};

#[test]
fn backend_refused_http_client_gets_502() {
    let pki = Pki::new();
    let refused = RefusedAddr::new();
    let gw = Gateway::start(&pki, &refused.arg(), &[]);
    for tls in [Tls::V13, Tls::V12] {
        let mut s = connect_tls(gw.addr(), &pki, tls);
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
        let req = format!(
            "POST /mcp HTTP/1.1\r\nHost: localhost:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            gw.port(),
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        s.flush().unwrap();
        let (resp, end) = read_to_close(&mut s);
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{tls:?}: expected an encrypted 502, got {text:?} then {end:?}"
        );
        assert_eq!(
            end,
            PeerEnd::CloseNotify,
            "{tls:?}: the 502 must be followed by a clean close"
        );
    }
}

#[test]
fn backend_refused_non_http_client_gets_clean_close() {
    let pki = Pki::new();
    let refused = RefusedAddr::new();
    let gw = Gateway::start(&pki, &refused.arg(), &[]);
    for tls in [Tls::V13, Tls::V12] {
        let mut s = connect_tls(gw.addr(), &pki, tls);
        s.write_all(b"\x00\x01\x02 binary frame, not HTTP\n")
            .unwrap();
        s.flush().unwrap();
        let (resp, end) = read_to_close(&mut s);
        assert!(
            resp.is_empty(),
            "{tls:?}: non-HTTP client must get no response bytes, got {:?}",
            String::from_utf8_lossy(&resp)
        );
        assert_eq!(end, PeerEnd::CloseNotify, "{tls:?}: expected a clean close");
    }
}

#[test]
fn backend_reset_mid_stream_is_isolated() {
    let pki = Arc::new(Pki::new());
    // Connections whose first bytes are `RESET` are reset after 4 KiB;
    // all others are echoed.
    let backend = Backend::reset(Some(b"RESET".to_vec()), 5 + 4096);
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let addr = gw.addr();

    // A healthy, slow-ish transfer in flight while the resets happen.
    let progress = Arc::new(AtomicU64::new(0));
    let healthy = {
        let (pki, progress) = (Arc::clone(&pki), Arc::clone(&progress));
        thread::spawn(move || {
            let mut s = connect_tls(addr, &pki, Tls::V13);
            let payload = seeded_bytes(0xBEEF, 2 * 1024 * 1024);
            let opts = PumpOpts {
                timeout: Duration::from_secs(60),
                pace: Some((64 * 1024, Duration::from_millis(25))),
                progress: Some(progress),
                ..Default::default()
            };
            let (got, out) = echo_roundtrip(&mut s, &payload, &opts);
            let (_, end) = close_and_drain(&mut s);
            (got == payload, got.len(), out, end)
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || progress.load(Ordering::SeqCst)
            >= 256 * 1024),
        "healthy transfer did not start"
    );

    for (i, tls) in [Tls::V13, Tls::V12, Tls::V13].into_iter().enumerate() {
        let mut s = connect_tls(addr, &pki, tls);
        let mut msg = b"RESET".to_vec();
        msg.extend_from_slice(&seeded_bytes(i as u64, 4096));
        s.write_all(&msg).unwrap();
        s.flush().unwrap();
        // Bounded by the socket read timeout: a hang fails as Timeout.
        let (resp, end) = read_to_close(&mut s);
        assert!(resp.is_empty(), "reset conn {i}: unexpected data");
        assert!(
            matches!(end, PeerEnd::CloseNotify | PeerEnd::Eof),
            "reset conn {i} ({tls:?}): expected a close/EOF after the backend reset, got {end:?}"
        );
    }
    assert_eq!(backend.stats().resets(), 3);

    let (equal, len, out, end) = healthy.join().expect("healthy thread panicked");
    assert!(
        out.error.is_none() && !out.timed_out,
        "healthy transfer: {out:?}"
    );
    assert_eq!(len, 2 * 1024 * 1024, "healthy transfer length");
    assert!(equal, "healthy transfer corrupted by the resets");
    assert_eq!(end, PeerEnd::CloseNotify);

    // The gateway still serves new connections.
    let mut s = connect_tls(addr, &pki, Tls::V12);
    let payload = seeded_bytes(77, 50_000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && !out.timed_out, "{out:?}");
    assert!(got == payload);
}

#[test]
fn backend_reset_before_any_reply_closes_client() {
    // Every connection is reset after 10 bytes.
    let pki = Pki::new();
    let backend = Backend::reset(None, 10);
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    for tls in [Tls::V13, Tls::V12] {
        let mut s = connect_tls(gw.addr(), &pki, tls);
        s.write_all(b"0123456789abcdef").unwrap();
        s.flush().unwrap();
        let (resp, end) = read_to_close(&mut s);
        assert!(resp.is_empty());
        assert!(
            matches!(end, PeerEnd::CloseNotify | PeerEnd::Eof),
            "{tls:?}: expected close/EOF, got {end:?}"
        );
    }
    assert_eq!(backend.stats().resets(), 2);
}
