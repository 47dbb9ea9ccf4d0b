//! 500 concurrent TLS connections, each echoing a distinct random payload.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::client::{client_config, try_connect_tls, PeerEnd, PumpOpts};
use gateway_tests::{
    close_and_drain, echo_roundtrip, raise_nofile_limit, seeded_bytes, wait_until, Backend,
    Gateway, Pki, Tls,
};

const N: usize = 500;

#[test]
fn concurrent_500_connections() {
    // Client + backend sockets live in this process (~2 per connection);
    // the gateway inherits the raised limit too.
    let limit = raise_nofile_limit(8192);
    assert!(limit >= 4 * N as u64, "RLIMIT_NOFILE too low: {limit}");

    let pki = Pki::new();
    let cfg12 = client_config(&pki, Tls::V12, &[]);
    let cfg13 = client_config(&pki, Tls::V13, &[]);
    let backend = Backend::echo();
    let gw = Gateway::start(&pki, &backend.arg(), &["--max-connections", "2000"]);
    let addr = gw.addr();
    let started = Instant::now();

    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(N);
    for i in 0..N {
        let (connected, failed) = (Arc::clone(&connected), Arc::clone(&failed));
        let (cfg12, cfg13) = (Arc::clone(&cfg12), Arc::clone(&cfg13));
        let h = thread::Builder::new()
            .name(format!("client-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || -> Result<(), String> {
                let tls = if i % 3 == 0 { Tls::V12 } else { Tls::V13 };
                let cfg = if tls == Tls::V12 { cfg12 } else { cfg13 };
                let mut s = match try_connect_tls(addr, cfg) {
                    Ok(s) => s,
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        return Err(format!("conn {i} ({tls:?}): {e}"));
                    }
                };
                connected.fetch_add(1, Ordering::SeqCst);
                // Start transferring only once all N connections are open, so
                // they really are concurrent.
                let all = wait_until(Duration::from_secs(90), || {
                    connected.load(Ordering::SeqCst) == N || failed.load(Ordering::SeqCst)
                });
                if !all || failed.load(Ordering::SeqCst) {
                    return Err(format!("conn {i}: gave up waiting for the others"));
                }
                let len = 4096 + (i * 7919) % (60 * 1024);
                let payload = seeded_bytes(0x5000 + i as u64, len);
                let opts = PumpOpts {
                    timeout: Duration::from_secs(60),
                    ..Default::default()
                };
                let (got, out) = echo_roundtrip(&mut s, &payload, &opts);
                if out.error.is_some() || out.timed_out || got != payload {
                    failed.store(true, Ordering::SeqCst);
                    return Err(format!(
                        "conn {i} ({tls:?}, {len} B): got {} B, equal={}, {out:?}",
                        got.len(),
                        got == payload
                    ));
                }
                let (rest, end) = close_and_drain(&mut s);
                if !rest.is_empty() || end != PeerEnd::CloseNotify {
                    return Err(format!(
                        "conn {i}: close: {} trailing bytes, {end:?}",
                        rest.len()
                    ));
                }
                Ok(())
            })
            .expect("spawn client thread");
        handles.push(h);
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("client thread panicked".into()),
        }
    }
    eprintln!("{N} connections done in {:?}", started.elapsed());
    assert!(
        errors.is_empty(),
        "{} of {N} connections failed; first ones:\n{}\nbackend: {} connections, {} bytes in, notes: {:?}",
        errors.len(),
        errors.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        backend.stats().connections(),
        backend.stats().bytes_in(),
        backend
            .stats()
            .records()
            .iter()
            .take(10)
            .map(|r| r.note.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(backend.stats().connections(), N);
    drop(gw);
}
