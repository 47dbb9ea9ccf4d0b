//! `--handshake-timeout`: silent or stalled clients are closed, established
//! connections are not affected.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::client::PumpOpts;
use gateway_tests::{connect_tls, echo_roundtrip, seeded_bytes, Backend, Gateway, Pki, Tls};

/// Connect, optionally send `prefix`, then wait for the gateway to close.
/// Returns the elapsed time until EOF/reset.
fn time_until_closed(addr: std::net::SocketAddr, prefix: &[u8]) -> Result<Duration, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t0 = Instant::now();
    if !prefix.is_empty() {
        s.write_all(prefix).map_err(|e| e.to_string())?;
    }
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(t0.elapsed()),
            Ok(_) => continue, // e.g. a TLS alert; keep reading until closed
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("not closed after {:?}", t0.elapsed()))
            }
            Err(_) => return Ok(t0.elapsed()), // reset
        }
    }
}

#[test]
fn handshake_timeout_closes_silent_and_stalled_clients() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &["--handshake-timeout", "1s"]);
    let addr = gw.addr();

    // (a) sends nothing; (b) sends a partial TLS record header then stalls.
    let silent = thread::spawn(move || time_until_closed(addr, b""));
    let stalled = thread::spawn(move || time_until_closed(addr, b"\x16\x03\x01\x02"));

    // (c) an established connection idle for longer than the handshake
    // timeout must keep working.
    let mut s = connect_tls(addr, &pki, Tls::V13);
    thread::sleep(Duration::from_millis(1600));
    let payload = seeded_bytes(3, 10_000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(
        out.error.is_none() && !out.timed_out,
        "established connection broken after idling past the handshake timeout: {out:?}"
    );
    assert!(got == payload);

    for (name, h) in [("silent", silent), ("stalled", stalled)] {
        let elapsed = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{name} client: {e} (handshake timeout is 1s)"));
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(5),
            "{name} client closed after {elapsed:?}; expected within 1-5 s for --handshake-timeout 1s"
        );
    }
    assert_eq!(
        backend.stats().connections(),
        1,
        "only the completed handshake may reach the backend"
    );
}

#[test]
fn idle_timeout_closes_idle_connections_only() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &["--idle-timeout", "1s"]);
    let addr = gw.addr();

    // An established connection that goes quiet must be closed (bounded
    // wait only: the socket read timeout and read_to_close's deadline).
    let mut quiet = connect_tls(addr, &pki, Tls::V13);
    let payload = seeded_bytes(11, 1000);
    let (got, out) = echo_roundtrip(&mut quiet, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && got == payload, "{out:?}");

    // Meanwhile a connection with traffic every 200 ms for 2.5 s stays up.
    let mut busy = connect_tls(addr, &pki, Tls::V12);
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_millis(2500) {
        let p = seeded_bytes(100 + i, 100);
        let (got, out) = echo_roundtrip(&mut busy, &p, &PumpOpts::default());
        assert!(
            out.error.is_none() && !out.timed_out && got == p,
            "active connection broken after {:?} with --idle-timeout 1s: {out:?}",
            t0.elapsed()
        );
        i += 1;
        thread::sleep(Duration::from_millis(200));
    }

    quiet
        .sock
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let (rest, end) = gateway_tests::read_to_close(&mut quiet);
    assert!(rest.is_empty());
    assert!(
        end.is_closed(),
        "idle connection not closed with --idle-timeout 1s: {end:?}"
    );
}
