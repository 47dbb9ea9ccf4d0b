//! Runs inside the kTLS VM (see `tests/ktls-vm/gateway/`): starts the real
//! gateway with `--ktls require` against in-process backends, drives it
//! with rustls clients, and checks both the bytes and the gateway's own
//! counters (every connection offloaded, bytes spliced, no silent
//! fallback) and the kernel's `/proc/net/tls_stat`.
//!
//! Prints one line per case and `ktls-vm-gateway: N passed, N failed`;
//! exits non-zero on any failure.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::client::{PeerEnd, PumpOpts, TlsStream};
use gateway_tests::{
    close_and_drain, echo_roundtrip, read_to_close, seeded_bytes, try_connect_tls, Backend,
    Gateway, Pki,
};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore, SupportedCipherSuite};

struct Run {
    passed: usize,
    failed: usize,
}

impl Run {
    fn case(&mut self, name: &str, f: impl FnOnce() -> Result<String, String>) {
        let t = Instant::now();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
        let ms = t.elapsed().as_millis();
        match res {
            Ok(note) => {
                self.passed += 1;
                println!("PASS {name} ({ms} ms) {note}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name} ({ms} ms): {e}");
            }
        }
        let _ = std::io::stdout().flush();
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "?".into())
}

fn suite(name: &str) -> SupportedCipherSuite {
    rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        .find(|s| format!("{:?}", s.suite()) == name)
        .unwrap_or_else(|| panic!("no suite {name}"))
}

fn client_cfg(pki: &Pki, suite_name: &str) -> Arc<ClientConfig> {
    let s = suite(suite_name);
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![s];
    let mut roots = RootCertStore::empty();
    let ca = std::fs::read(&pki.ca).expect("ca.pem");
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        let c: CertificateDer<'static> = c.expect("ca pem");
        roots.add(c).expect("add root");
    }
    let version = s.version();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn opts() -> PumpOpts {
    PumpOpts {
        timeout: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Echo `len` seeded bytes full duplex, then close cleanly.
fn echo_case(
    addr: std::net::SocketAddr,
    cfg: Arc<ClientConfig>,
    len: usize,
    seed: u64,
) -> Result<String, String> {
    let mut s = try_connect_tls(addr, cfg)?;
    let payload = seeded_bytes(seed, len);
    let (got, out) = echo_roundtrip(&mut s, &payload, &opts());
    if out.error.is_some() || out.timed_out {
        return Err(format!("transfer: {out:?}"));
    }
    if got != payload {
        return Err(format!(
            "echo differs: sent {} got {}",
            payload.len(),
            got.len()
        ));
    }
    let (rest, end) = close_and_drain(&mut s);
    if !rest.is_empty() || end != PeerEnd::CloseNotify {
        return Err(format!("close: {} extra bytes, end {end:?}", rest.len()));
    }
    Ok(format!("{len} B each way"))
}

fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

fn tls_stat() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn stat(v: &[(String, u64)], k: &str) -> u64 {
    v.iter().find(|(n, _)| n == k).map_or(0, |(_, x)| *x)
}

fn counter(log: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("stopped"))?;
    let key = format!("{name}=");
    let start = line.find(&key)? + key.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn main() {
    if let Ok(bin) = std::env::var("MCP_TLS_GATEWAY_BIN") {
        eprintln!("gateway binary: {bin}");
    }
    let big: usize = std::env::var("KTLS_VM_BIG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32 << 20);
    let mut run = Run {
        passed: 0,
        failed: 0,
    };
    let stat_before = tls_stat();
    let pki = Arc::new(Pki::new());
    let echo = Backend::echo();
    let mut gw = Gateway::start(
        &pki,
        &echo.arg(),
        &["--ktls", "require", "--log-level", "info"],
    );
    let addr = gw.addr();
    let mut expected_conns = 0u64;
    let mut expected_bytes = 0u64;

    // Every cipher and version, sizes from 1 B up.
    for name in [
        "TLS13_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ] {
        for (i, len) in [1usize, 1024, 16 * 1024 + 1, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let cfg = client_cfg(&pki, name);
            run.case(&format!("echo {name} {len}B"), || {
                echo_case(addr, cfg, len, i as u64 + 1)
            });
            expected_conns += 1;
            expected_bytes += len as u64;
        }
    }
    for name in [
        "TLS13_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ] {
        let cfg = client_cfg(&pki, name);
        run.case(&format!("echo {name} {big}B (large)"), || {
            echo_case(addr, cfg, big, 99)
        });
        expected_conns += 1;
        expected_bytes += big as u64;
    }

    // 100 concurrent connections.
    {
        let cfg = client_cfg(&pki, "TLS13_AES_128_GCM_SHA256");
        run.case("100 concurrent connections", || {
            let handles: Vec<_> = (0..100u64)
                .map(|i| {
                    let cfg = cfg.clone();
                    std::thread::spawn(move || {
                        echo_case(addr, cfg, 4096 + (i as usize) * 512, 1000 + i)
                    })
                })
                .collect();
            let mut errs = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => errs.push(e),
                    Err(_) => errs.push("thread panicked".into()),
                }
            }
            if errs.is_empty() {
                Ok("all byte-exact".into())
            } else {
                Err(format!("{} failed, first: {}", errs.len(), errs[0]))
            }
        });
        expected_conns += 100;
        expected_bytes += (0..100u64).map(|i| 4096 + i * 512).sum::<u64>();
    }

    // Pipelined: app data written before the handshake completes goes out
    // right behind the client's Finished.
    {
        let cfg = client_cfg(&pki, "TLS13_AES_128_GCM_SHA256");
        run.case("bytes pipelined behind client Finished", || {
            let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
            tcp.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            let mut conn =
                rustls::ClientConnection::new(cfg, "localhost".try_into().map_err(|_| "name")?)
                    .map_err(|e| e.to_string())?;
            let payload = seeded_bytes(7, 3000);
            conn.writer()
                .write_all(&payload)
                .map_err(|e| e.to_string())?;
            let mut s: TlsStream = rustls::StreamOwned::new(conn, tcp);
            // The first read drives the handshake; rustls sends the buffered
            // bytes in the same flight as its Finished.
            let mut got = vec![0u8; payload.len()];
            std::io::Read::read_exact(&mut s, &mut got).map_err(|e| format!("read: {e}"))?;
            if got != payload {
                return Err("echo differs".into());
            }
            let (_, end) = close_and_drain(&mut s);
            if end != PeerEnd::CloseNotify {
                return Err(format!("end {end:?}"));
            }
            Ok("echoed".into())
        });
        expected_conns += 1;
        expected_bytes += 3000;
    }

    // Client close_notify first; the backend answers after EOF.
    let collect = Backend::collect_then_reply(5, 100_000);
    let mut gw2 = Gateway::start(
        &pki,
        &collect.arg(),
        &["--ktls", "require", "--log-level", "info"],
    );
    for name in [
        "TLS13_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ] {
        let cfg = client_cfg(&pki, name);
        let addr2 = gw2.addr();
        run.case(&format!("client close_notify first ({name})"), || {
            let mut s = try_connect_tls(addr2, cfg)?;
            let payload = seeded_bytes(11, 50_000);
            s.conn
                .writer()
                .write_all(&payload)
                .map_err(|e| e.to_string())?;
            let (reply, end) = close_and_drain(&mut s);
            let head = format!(
                "GOT {} {}\n",
                payload.len(),
                gateway_tests::hex(&gateway_tests::sha256(&payload))
            );
            if !reply.starts_with(head.as_bytes()) {
                return Err(format!(
                    "reply starts {:?}",
                    String::from_utf8_lossy(&reply[..reply.len().min(80)])
                ));
            }
            if reply[head.len()..] != seeded_bytes(5, 100_000)[..] || end != PeerEnd::CloseNotify {
                return Err(format!(
                    "reply body or end wrong: {} bytes, {end:?}",
                    reply.len()
                ));
            }
            Ok("backend saw EOF after exact bytes; reply + close_notify".into())
        });
    }

    // Backend closes first; the client keeps sending (TLS 1.3 half-close).
    let hello = b"HELLO".to_vec();
    let half = Backend::write_then_half_close(hello.len(), seeded_bytes(6, 70_000));
    let mut gw3 = Gateway::start(
        &pki,
        &half.arg(),
        &["--ktls", "require", "--log-level", "info"],
    );
    {
        let cfg = client_cfg(&pki, "TLS13_CHACHA20_POLY1305_SHA256");
        let addr3 = gw3.addr();
        let half_stats = half.stats();
        run.case("backend closes first, client keeps sending", || {
            let mut s = try_connect_tls(addr3, cfg)?;
            s.conn
                .writer()
                .write_all(&hello)
                .map_err(|e| e.to_string())?;
            let (resp, end) = read_to_close(&mut s);
            if resp != seeded_bytes(6, 70_000) || end != PeerEnd::CloseNotify {
                return Err(format!("got {} bytes, end {end:?}", resp.len()));
            }
            let late = seeded_bytes(8, 40_000);
            s.conn
                .writer()
                .write_all(&late)
                .map_err(|e| e.to_string())?;
            let (_, _) = close_and_drain(&mut s);
            let ok = gateway_tests::wait_until(Duration::from_secs(10), || {
                half_stats
                    .records()
                    .iter()
                    .any(|r| r.saw_eof && r.received == late)
            });
            if ok {
                Ok("late bytes reached the backend, then EOF".into())
            } else {
                Err(format!(
                    "backend records: {:?}",
                    half_stats
                        .records()
                        .iter()
                        .map(|r| (r.received.len(), r.saw_eof, r.note.clone()))
                        .collect::<Vec<_>>()
                ))
            }
        });
    }

    // KeyUpdate from the client mid-stream.
    {
        let cfg = client_cfg(&pki, "TLS13_AES_128_GCM_SHA256");
        run.case("client KeyUpdate mid-stream", || {
            let mut s = try_connect_tls(addr, cfg)?;
            let first = seeded_bytes(21, 20_000);
            let (got, out) = echo_roundtrip(&mut s, &first, &opts());
            if got != first {
                return Err(format!("before KeyUpdate: {out:?}"));
            }
            s.conn.refresh_traffic_keys().map_err(|e| e.to_string())?;
            let second = seeded_bytes(22, 20_000);
            let (got2, out2) = echo_roundtrip(&mut s, &second, &opts());
            if got2 == second {
                let (_, end) = close_and_drain(&mut s);
                return Ok(format!("rekeyed by the kernel; data flows (end {end:?})"));
            }
            // A kernel without rekey support must close cleanly, never corrupt.
            let (rest, end) = read_to_close(&mut s);
            if !got2.is_empty() || !rest.is_empty() {
                return Err(format!(
                    "bytes after an unsupported KeyUpdate: {} + {}",
                    got2.len(),
                    rest.len()
                ));
            }
            if end != PeerEnd::CloseNotify && out2.peer_end != PeerEnd::CloseNotify {
                return Err(format!("not a clean close: {end:?} / {:?}", out2.peer_end));
            }
            Ok("kernel cannot rekey: clean close (close_notify)".into())
        });
        expected_conns += 1;
        expected_bytes += 20_000;
    }

    // User-space memory per open connection: offloaded vs. the user-space
    // record path (a measurement, printed, not asserted).
    {
        // Fresh gateways, so earlier connections' freed memory does not hide
        // the cost of new ones.
        let on = Gateway::start(
            &pki,
            &echo.arg(),
            &["--ktls", "require", "--log-level", "warn"],
        );
        let off = Gateway::start(&pki, &echo.arg(), &["--ktls", "off", "--log-level", "warn"]);
        for (label, g) in [("kTLS offload", &on), ("user-space records", &off)] {
            let cfg = client_cfg(&pki, "TLS13_AES_128_GCM_SHA256");
            let (pid, a) = (g.pid(), g.addr());
            run.case(&format!("memory per connection, {label}"), || {
                let n = 200;
                let before = rss_kib(pid)?;
                let mut conns = Vec::new();
                for i in 0..n {
                    let mut s = try_connect_tls(a, cfg.clone())?;
                    let p = seeded_bytes(500 + i, 2048);
                    let (got, _) = echo_roundtrip(&mut s, &p, &opts());
                    if got != p {
                        return Err("echo failed".into());
                    }
                    conns.push(s);
                }
                std::thread::sleep(Duration::from_millis(300));
                let after = rss_kib(pid)?;
                for mut s in conns {
                    let _ = close_and_drain(&mut s);
                }
                let per = (after.saturating_sub(before)) as f64 / n as f64;
                Ok(format!("gateway RSS {before} -> {after} KiB with {n} idle connections: {per:.1} KiB per connection"))
            });
        }
    }

    // Double TLS: the backend speaks TLS too; both sockets go into the
    // kernel and the worker splices between two kTLS sockets.
    let dtls_before = tls_stat();
    let tls_backend = gateway_tests::tls_backend::TestBackend::tls_echo(
        gateway_tests::tls_backend::BackendTls::new(&pki.chain, &pki.key),
    );
    let dtls_dir = gateway_tests::TempDir::new("vm-double-tls");
    let mut gw4 = {
        let (chain, key, ca) = (pki.chain.clone(), pki.key.clone(), pki.ca.clone());
        let backend = tls_backend.addr();
        gateway_tests::tls_backend::start_config(
            &dtls_dir,
            &["--ktls", "require", "--log-level", "info"],
            move |port| {
                format!(
                    "[[listener]]\nlisten = \"127.0.0.1:{port}\"\ncert = {}\nkey = {}\nbackend = {{ addr = \"{backend}\", tls = {{ ca = {}, server_name = \"localhost\" }} }}\n",
                    gateway_tests::tls_backend::toml_str(&chain),
                    gateway_tests::tls_backend::toml_str(&key),
                    gateway_tests::tls_backend::toml_str(&ca),
                )
            },
        )
    };
    let mut dtls_conns = 0u64;
    let mut dtls_bytes = 0u64;
    {
        let addr4 = gw4.addr();
        for name in [
            "TLS13_AES_128_GCM_SHA256",
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        ] {
            for (i, len) in [1usize, 20_000, 1 << 20].into_iter().enumerate() {
                let cfg = client_cfg(&pki, name);
                run.case(&format!("double TLS echo {name} {len}B"), || {
                    echo_case(addr4, cfg, len, 300 + i as u64)
                });
                dtls_conns += 1;
                dtls_bytes += len as u64;
            }
        }
        let cfg = client_cfg(&pki, "TLS13_AES_128_GCM_SHA256");
        run.case(&format!("double TLS echo {big}B (large)"), || {
            echo_case(addr4, cfg, big, 333)
        });
        dtls_conns += 1;
        dtls_bytes += big as u64;
        let cfg = client_cfg(&pki, "TLS13_AES_256_GCM_SHA384");
        run.case("double TLS: 20 concurrent connections", || {
            let handles: Vec<_> = (0..20u64)
                .map(|i| {
                    let cfg = cfg.clone();
                    std::thread::spawn(move || echo_case(addr4, cfg, 70_000 + i as usize, 400 + i))
                })
                .collect();
            let errs: Vec<String> = handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some("thread panicked".into()),
                })
                .collect();
            if errs.is_empty() {
                Ok("all byte-exact".into())
            } else {
                Err(format!("{} failed, first: {}", errs.len(), errs[0]))
            }
        });
        dtls_conns += 20;
        dtls_bytes += (0..20u64).map(|i| 70_000 + i).sum::<u64>();
    }
    let dtls_stat = tls_stat();
    gw4.sigterm();
    let dtls_status = gw4.wait_exit(Duration::from_secs(40));
    let dtls_log = gw4.log();
    run.case("double TLS: both legs offloaded, bytes spliced", || {
        if !dtls_status.is_some_and(|s| s.success()) {
            return Err(format!("exit {dtls_status:?}"));
        }
        let get = |k: &str| {
            counter(&dtls_log, k).ok_or_else(|| format!("no counter {k} in log:\n{dtls_log}"))
        };
        let (k, u, f, bt) = (
            get("ktls_connections")?,
            get("userspace_path")?,
            get("ktls_failures")?,
            get("backend_tls_failures")?,
        );
        let (su, sd) = (get("spliced_up")?, get("spliced_down")?);
        if u != 0 || f != 0 || bt != 0 || k < dtls_conns {
            return Err(format!(
                "ktls_connections={k} userspace_path={u} ktls_failures={f} backend_tls_failures={bt} expected>={dtls_conns}"
            ));
        }
        if su < dtls_bytes || sd < dtls_bytes {
            return Err(format!("spliced_up={su} spliced_down={sd} expected>={dtls_bytes}"));
        }
        // Both sockets of every connection are kTLS sockets: the kernel's
        // counters grew by at least two per connection.
        let d = |k: &str| stat(&dtls_stat, k).saturating_sub(stat(&dtls_before, k));
        let (tx, rx) = (d("TlsTxSw"), d("TlsRxSw"));
        if tx < 2 * dtls_conns || rx < 2 * dtls_conns {
            return Err(format!(
                "TlsTxSw +{tx} TlsRxSw +{rx}: expected >= {} (two kTLS sockets per connection)",
                2 * dtls_conns
            ));
        }
        Ok(format!(
            "ktls_connections={k} userspace_path=0 spliced_up={su} spliced_down={sd}; TlsTxSw +{tx} TlsRxSw +{rx} for {dtls_conns} connections"
        ))
    });

    // Counters: stop the gateways and read their final counters.
    let stat_after = tls_stat();
    gw.sigterm();
    let status = gw.wait_exit(Duration::from_secs(40));
    let log = gw.log();
    run.case("gateway exits 0 on SIGTERM", || match status {
        Some(s) if s.success() => Ok(String::new()),
        other => Err(format!("{other:?}")),
    });
    run.case("every connection offloaded, bytes spliced", || {
        let get = |k: &str| counter(&log, k).ok_or_else(|| format!("no counter {k} in log:\n{log}"));
        let (k, u, f, hs) = (get("ktls_connections")?, get("userspace_path")?, get("ktls_failures")?, get("handshakes")?);
        let (su, sd) = (get("spliced_up")?, get("spliced_down")?);
        if u != 0 || f != 0 || k != hs || k < expected_conns {
            return Err(format!("ktls_connections={k} userspace_path={u} ktls_failures={f} handshakes={hs} expected>={expected_conns}"));
        }
        if su < expected_bytes || sd < expected_bytes {
            return Err(format!("spliced_up={su} spliced_down={sd} expected>={expected_bytes}"));
        }
        Ok(format!("ktls_connections={k} userspace_path=0 spliced_up={su} spliced_down={sd}"))
    });
    run.case(
        "kernel tls_stat shows software kTLS in both directions",
        || {
            let d = |k: &str| stat(&stat_after, k).saturating_sub(stat(&stat_before, k));
            let (tx, rx, derr) = (d("TlsTxSw"), d("TlsRxSw"), d("TlsDecryptError"));
            if tx < expected_conns || rx < expected_conns {
                return Err(format!(
                    "TlsTxSw +{tx} TlsRxSw +{rx}, expected >= {expected_conns}"
                ));
            }
            Ok(format!(
                "TlsTxSw +{tx} TlsRxSw +{rx} TlsDecryptError +{derr}"
            ))
        },
    );
    for g in [&mut gw2, &mut gw3] {
        g.sigterm();
        let _ = g.wait_exit(Duration::from_secs(40));
    }
    if run.failed > 0 {
        println!("--- gateway log (tail) ---");
        for l in log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("{l}");
        }
    } else if let Some(l) = log.lines().find(|l| l.contains("kernel TLS offload on")) {
        println!("gateway: {l}");
    }
    println!(
        "ktls-vm-gateway: {} passed, {} failed",
        run.passed, run.failed
    );
    std::process::exit(if run.failed == 0 { 0 } else { 1 });
}
