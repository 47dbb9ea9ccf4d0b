//! Basic TLS termination: bytes are relayed both ways unchanged, TLS 1.2 and
//! 1.3 both work by default, `--tls-versions` restricts, HTTP keep-alive and a
//! unix-socket backend work.

use std::io::{Read, Write};
use std::time::Duration;

use gateway_tests::backend::mcp_response_body;
use gateway_tests::client::{client_config, try_connect_tls, PeerEnd, PumpOpts};
use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, seeded_bytes, Backend, Gateway, Pki, Tls,
    TlsStream,
};

/// Several writes of different shapes through an echo backend, each read
/// back byte-for-byte, then a clean TLS close in both directions.
fn echo_check(gw: &Gateway, pki: &Pki, tls: Tls) {
    let mut s = connect_tls(gw.addr(), pki, tls);

    // Small request/response, blocking style.
    s.write_all(b"hello, gateway\n").unwrap();
    s.flush().unwrap();
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello, gateway\n");

    // All 256 byte values, repeated (binary safety).
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
    let (got, out) = echo_roundtrip(&mut s, &all, &PumpOpts::default());
    assert!(out.error.is_none() && !out.timed_out, "{out:?}");
    assert_eq!(got, all, "binary payload corrupted");

    // 300 KiB of random data, full duplex.
    let payload = seeded_bytes(0xEC40 + tls as u64, 300 * 1024);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && !out.timed_out, "{out:?}");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "300 KiB random payload corrupted");

    // Client closes; the echo backend then closes; we get close_notify.
    let (rest, end) = close_and_drain(&mut s);
    assert!(rest.is_empty(), "unexpected trailing bytes: {}", rest.len());
    assert_eq!(end, PeerEnd::CloseNotify, "expected a clean TLS close");
}

#[test]
fn echo_tls13_byte_for_byte() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    echo_check(&gw, &pki, Tls::V13);
    assert_eq!(backend.stats().connections(), 1);
}

#[test]
fn echo_tls12_byte_for_byte() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    echo_check(&gw, &pki, Tls::V12);
    assert_eq!(backend.stats().connections(), 1);
}

#[test]
fn default_negotiates_tls13_and_accepts_tls12() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let s = connect_tls(gw.addr(), &pki, Tls::Any);
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3),
        "a client offering 1.2+1.3 should get 1.3"
    );
    let s12 = connect_tls(gw.addr(), &pki, Tls::V12);
    assert_eq!(
        s12.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

fn ping(s: &mut TlsStream) {
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

#[test]
fn tls_versions_flag_restricts() {
    let pki = Pki::new();
    let backend = Backend::echo();

    let gw13 = Gateway::start(&pki, &backend.arg(), &["--tls-versions", "1.3"]);
    let r = try_connect_tls(gw13.addr(), client_config(&pki, Tls::V12, &[]));
    assert!(
        r.is_err(),
        "TLS 1.2-only client must be rejected by --tls-versions 1.3"
    );
    let mut s = connect_tls(gw13.addr(), &pki, Tls::V13);
    ping(&mut s);

    let gw12 = Gateway::start(&pki, &backend.arg(), &["--tls-versions", "1.2"]);
    let r = try_connect_tls(gw12.addr(), client_config(&pki, Tls::V13, &[]));
    assert!(
        r.is_err(),
        "TLS 1.3-only client must be rejected by --tls-versions 1.2"
    );
    let mut s = connect_tls(gw12.addr(), &pki, Tls::V12);
    ping(&mut s);
    let s_any = connect_tls(gw12.addr(), &pki, Tls::Any);
    assert_eq!(
        s_any.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    let gw_both = Gateway::start(&pki, &backend.arg(), &["--tls-versions", "1.2,1.3"]);
    let mut a = connect_tls(gw_both.addr(), &pki, Tls::V12);
    let mut b = connect_tls(gw_both.addr(), &pki, Tls::V13);
    ping(&mut a);
    ping(&mut b);
}

/// Read one HTTP/1.1 response with Content-Length; returns (head, body).
fn read_http_response(s: &mut TlsStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(buf.len() < 64 * 1024, "response head too large");
        let n = s.read(&mut chunk).expect("read response");
        assert!(
            n > 0,
            "EOF inside response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "EOF inside response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(buf.len(), head_end + len, "extra bytes after response");
    (head, buf[head_end..].to_vec())
}

#[test]
fn http_keep_alive_requests_through_gateway() {
    let pki = Pki::new();
    let backend = Backend::http();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    for i in 0..3 {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"n{i}","pad":"{}"}}}}"#,
            "x".repeat(i * 5000)
        );
        let req = format!(
            "POST /mcp HTTP/1.1\r\nHost: localhost:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            gw.port(),
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        s.flush().unwrap();
        let (head, resp) = read_http_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "head: {head}");
        assert_eq!(
            String::from_utf8_lossy(&resp),
            mcp_response_body("POST", "/mcp", body.as_bytes())
        );
    }
    assert_eq!(backend.stats().requests(), 3);
    assert_eq!(
        backend.stats().connections(),
        1,
        "keep-alive requests must share one backend connection"
    );
}

#[test]
fn unix_socket_backend() {
    let pki = Pki::new();
    let backend = Backend::echo_unix();
    assert!(backend.arg().starts_with("unix:/"));
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    echo_check(&gw, &pki, Tls::V13);
    echo_check(&gw, &pki, Tls::V12);
    assert_eq!(backend.stats().connections(), 2);
}

#[test]
fn sequential_connections_are_independent() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    for i in 0..20u64 {
        let tls = if i % 2 == 0 { Tls::V13 } else { Tls::V12 };
        let mut s = connect_tls(gw.addr(), &pki, tls);
        let payload = seeded_bytes(1000 + i, 1 + (i as usize * 7919) % 40_000);
        let opts = PumpOpts {
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let (got, out) = echo_roundtrip(&mut s, &payload, &opts);
        assert!(out.error.is_none() && !out.timed_out, "conn {i}: {out:?}");
        assert!(got == payload, "conn {i}: payload corrupted");
        let (_, end) = close_and_drain(&mut s);
        assert_eq!(end, PeerEnd::CloseNotify, "conn {i}");
    }
    assert_eq!(backend.stats().connections(), 20);
}
