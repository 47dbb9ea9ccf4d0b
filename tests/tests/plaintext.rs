//! Plaintext on the TLS port: an HTTP request gets a plaintext `400` that
//! points to `https://`, other garbage gets the connection closed without a
//! response.  In both cases the backend never sees a connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use gateway_tests::{connect_tls, seeded_bytes, wait_until, Backend, Gateway, Pki, Tls};

/// Read until EOF/reset/timeout: (bytes, how it ended).
fn raw_read_all(s: &mut TcpStream) -> (Vec<u8>, Result<(), io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (out, Err(e)),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A real TLS connection reaches the counting backend: proves the backend
/// works and lets us assert the exact number of connections it saw.
fn positive_control(gw: &Gateway, pki: &Pki, backend: &Backend) {
    let mut s = connect_tls(gw.addr(), pki, Tls::V13);
    s.write_all(b"hello over tls").unwrap();
    s.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || backend.stats().bytes_in() == 14),
        "TLS data did not reach the backend"
    );
    assert_eq!(
        backend.stats().connections(),
        1,
        "backend must have seen exactly the one TLS connection"
    );
}

#[test]
fn plaintext_http_gets_400_pointing_to_https() {
    let pki = Pki::new();
    let backend = Backend::counting();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let port = gw.port();

    let mut s = TcpStream::connect(gw.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!(
        "GET /mcp HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: gateway-tests\r\nAccept: */*\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let (resp, end) = raw_read_all(&mut s);
    if let Err(e) = &end {
        assert!(
            !is_timeout(e),
            "gateway neither answered nor closed within 5 s; got {:?}",
            String::from_utf8_lossy(&resp)
        );
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "unexpected response: {text:?}"
    );
    let (_head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator: {text:?}"));
    let want = format!("https://localhost:{port}/mcp");
    assert!(
        body.contains(&want),
        "body must point to {want}; body: {body:?}"
    );
    assert!(
        body.to_lowercase().contains("tls"),
        "body should say that the port requires TLS: {body:?}"
    );
    assert_eq!(
        backend.stats().connections(),
        0,
        "plaintext must never reach the backend"
    );
    assert_eq!(backend.stats().bytes_in(), 0);

    // A second plaintext request with a different path and Host header.
    let mut s = TcpStream::connect(gw.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /rpc/v1 HTTP/1.1\r\nHost: mcp.example.test\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let (resp, end) = raw_read_all(&mut s);
    assert!(end.as_ref().err().is_none_or(|e| !is_timeout(e)));
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(
        text.contains("https://mcp.example.test/rpc/v1"),
        "body must use the request's Host and path: {text:?}"
    );

    assert_eq!(backend.stats().connections(), 0);
    positive_control(&gw, &pki, &backend);
}

#[test]
fn garbage_gets_closed_without_response() {
    let pki = Pki::new();
    let backend = Backend::counting();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);

    for (i, first) in [0x00u8, 0x01, 0x80, 0xff, b'\r'].into_iter().enumerate() {
        let mut garbage = seeded_bytes(0x6a + i as u64, 64);
        garbage[0] = first;
        let mut s = TcpStream::connect(gw.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        // The gateway may close (and reset) as soon as it sees the first
        // byte, so a write error is acceptable here.
        let _ = s.write_all(&garbage);
        let (resp, end) = raw_read_all(&mut s);
        if let Err(e) = &end {
            assert!(
                !is_timeout(e),
                "garbage starting with {first:#04x}: connection not closed within 5 s"
            );
        }
        assert!(
            resp.is_empty(),
            "garbage starting with {first:#04x} must get no response bytes, got {:?}",
            String::from_utf8_lossy(&resp)
        );
    }
    assert_eq!(
        backend.stats().connections(),
        0,
        "garbage must never reach the backend"
    );
    assert_eq!(backend.stats().bytes_in(), 0);
    positive_control(&gw, &pki, &backend);
}
