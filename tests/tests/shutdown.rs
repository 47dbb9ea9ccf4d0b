//! SIGTERM: stop accepting, drain in-flight connections, exit 0.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::client::{PeerEnd, PumpOpts};
use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, read_to_close, seeded_bytes, wait_until, Backend,
    Gateway, Pki, Tls,
};

const MIB: usize = 1024 * 1024;

fn connect_refused(addr: std::net::SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

#[test]
fn sigterm_drains_inflight_transfer_and_exits_zero() {
    let pki = Arc::new(Pki::new());
    let backend = Backend::echo();
    let mut gw = Gateway::start(&pki, &backend.arg(), &["--drain-timeout", "30s"]);
    let addr = gw.addr();

    // 8 MiB echoed, paced to take ~3 s.
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let (pki, progress) = (Arc::clone(&pki), Arc::clone(&progress));
        thread::spawn(move || {
            let mut s = connect_tls(addr, &pki, Tls::V13);
            let payload = seeded_bytes(0xD4A1, 8 * MIB);
            let opts = PumpOpts {
                timeout: Duration::from_secs(60),
                pace: Some((128 * 1024, Duration::from_millis(45))),
                progress: Some(progress),
                ..Default::default()
            };
            let (got, out) = echo_roundtrip(&mut s, &payload, &opts);
            let (rest, end) = close_and_drain(&mut s);
            (got == payload, got.len(), out, rest.len(), end)
        })
    };
    assert!(
        wait_until(Duration::from_secs(15), || progress.load(Ordering::SeqCst)
            >= 2 * MIB as u64),
        "transfer did not get going"
    );
    assert!(
        progress.load(Ordering::SeqCst) < 6 * MIB as u64,
        "transfer progressed too fast for the test to be meaningful"
    );
    let t_term = Instant::now();
    gw.sigterm();

    // New connections are refused shortly after.
    assert!(
        wait_until(Duration::from_secs(2), || connect_refused(addr)),
        "new TCP connections still accepted 2 s after SIGTERM"
    );
    assert!(
        gw.is_running(),
        "gateway exited while a transfer was in flight: {:?}",
        gw.try_wait()
    );

    let (equal, len, out, rest, end) = transfer.join().expect("transfer thread panicked");
    assert!(
        out.error.is_none() && !out.timed_out,
        "in-flight transfer: {out:?}"
    );
    assert_eq!(len, 8 * MIB, "in-flight transfer truncated");
    assert!(equal, "in-flight transfer corrupted");
    assert_eq!(rest, 0);
    assert!(
        end.is_closed(),
        "no close after the drained transfer: {end:?}"
    );

    let status = gw
        .wait_exit(
            Duration::from_secs(30).saturating_sub(t_term.elapsed()) + Duration::from_secs(2),
        )
        .expect("gateway did not exit within the drain timeout after its last connection closed");
    assert!(
        status.success(),
        "gateway exit status after SIGTERM: {status}"
    );
}

#[test]
fn sigterm_drain_timeout_bounds_shutdown() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let mut gw = Gateway::start(&pki, &backend.arg(), &["--drain-timeout", "2s"]);

    // An established but idle connection that never finishes on its own.
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let payload = seeded_bytes(1, 1000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && got == payload, "{out:?}");

    let t0 = Instant::now();
    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit within 10 s with --drain-timeout 2s and an idle connection");
    let elapsed = t0.elapsed();
    assert!(status.success(), "exit status: {status}");
    // The idle connection gets closed (any kind of close, no hang).
    let (_, end) = read_to_close(&mut s);
    assert!(end.is_closed(), "idle client not closed: {end:?}");
    assert_ne!(end, PeerEnd::Timeout);
    eprintln!("exited {elapsed:?} after SIGTERM");
}
