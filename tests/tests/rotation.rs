//! Certificate rotation under load: SIGHUP, file-change watch and
//! `PUT /certs/<name>`, with a client loop that must never see a failure;
//! and refused rotations (bad upload, corrupt file) keep the old
//! certificate serving.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use gateway_tests::corp_pki::{
    admin_get, connect_sni, echo_exact, http_request, metric_value, peer_fingerprint, write_atomic,
    CorpPki, Leaf,
};
use gateway_tests::{free_port, loopback, seeded_bytes, Backend, Gateway};
use rustls::ClientConfig;

const CERT_NAME: &str = "main";

fn config_toml(pki: &CorpPki, port: u16, admin: u16, backend: &str, watch: bool) -> String {
    format!(
        r#"[server]
workers = 2

[tls]
trust_roots = "{roots}"

[admin]
listen = "127.0.0.1:{admin}"

[reload]
watch = {watch}

[[listener]]
listen = "127.0.0.1:{port}"
backend = "{backend}"

[[listener.certs]]
name = "{CERT_NAME}"
cert = "{chain}"
key = "{key}"
default = true
"#,
        roots = pki.roots.display(),
        chain = pki.chain.display(),
        key = pki.key.display(),
    )
}

/// Starts the gateway on the PKI's chain.pem/key.pem; returns it and the
/// admin address (already answering).
fn start(pki: &CorpPki, backend: &Backend, watch: bool) -> (Gateway, SocketAddr) {
    let mut admin_port = 0;
    let gw = Gateway::start_with(|port| {
        admin_port = free_port();
        let path = pki.path(&format!("gateway-{port}.toml"));
        std::fs::write(
            &path,
            config_toml(pki, port, admin_port, &backend.arg(), watch),
        )
        .unwrap();
        vec!["--config".into(), path.display().to_string()]
    });
    let admin = loopback(admin_port);
    admin_get(admin, "/healthz", Duration::from_secs(10));
    (gw, admin)
}

/// The fingerprint a fresh handshake (no resumption) sees, or an error.
fn served(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Result<String, String> {
    let mut s = connect_sni(addr, cfg.clone(), "localhost")?;
    let fp = peer_fingerprint(&s);
    let payload = seeded_bytes(9, 1000);
    let got = echo_exact(&mut s, &payload).map_err(|e| format!("echo: {e}"))?;
    if got != payload {
        return Err("echo bytes differ".into());
    }
    Ok(fp)
}

/// Polls fresh handshakes until `want` is served (at most 10 s).
fn wait_served(addr: SocketAddr, cfg: &Arc<ClientConfig>, want: &Leaf, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match served(addr, cfg) {
            Ok(fp) if fp == want.fingerprint() => return,
            Ok(fp) => last = format!("still serving {fp}"),
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{step}: new handshakes did not see the new certificate {} within 10 s; last: {last}",
        want.fingerprint()
    );
}

fn put_cert(admin: SocketAddr, name: &str, body: &str) -> (u16, String) {
    http_request(
        admin,
        "PUT",
        &format!("/certs/{name}"),
        &["Content-Type: application/x-pem-file"],
        body.as_bytes(),
    )
    .unwrap_or_else(|e| panic!("PUT /certs/{name}: {e}"))
}

/// What one load thread observed.
#[derive(Debug, Default)]
struct Observed {
    ok: u64,
    failures: Vec<String>,
    /// Distinct fingerprints in the order first seen.
    sequence: Vec<String>,
}

/// Two client threads, each looping: new TLS connection (no resumption),
/// echo a 2 KiB request, verify the bytes, record the leaf fingerprint.
/// Bounded by `stop`, a 45 s deadline and 200 000 iterations.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Observed>>,
}

impl Load {
    fn start(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..2u64)
            .map(|t| {
                let (stop, ok, cfg) = (stop.clone(), ok.clone(), cfg.clone());
                thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(45);
                    let mut obs = Observed::default();
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && i < 200_000 {
                        i += 1;
                        let payload = seeded_bytes(t * 1_000_000 + i, 2048);
                        match connect_sni(addr, cfg.clone(), "localhost") {
                            Err(e) => obs.failures.push(format!("thread {t} #{i}: connect: {e}")),
                            Ok(mut s) => {
                                let fp = peer_fingerprint(&s);
                                match echo_exact(&mut s, &payload) {
                                    Ok(got) if got == payload => {
                                        obs.ok += 1;
                                        ok.fetch_add(1, Ordering::SeqCst);
                                        if obs.sequence.last() != Some(&fp) {
                                            obs.sequence.push(fp);
                                        }
                                    }
                                    Ok(_) => obs
                                        .failures
                                        .push(format!("thread {t} #{i}: echo bytes differ")),
                                    Err(e) => {
                                        obs.failures.push(format!("thread {t} #{i}: echo: {e}"))
                                    }
                                }
                                s.conn.send_close_notify();
                                let _ = s.conn.write_tls(&mut s.sock);
                            }
                        }
                    }
                    obs
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Waits until the loop completed `n` more successful requests (10 s).
    fn advance(&self, n: u64, step: &str) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "{step}: the client loop stalled at {} successful requests",
                self.ok.load(Ordering::SeqCst)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> Vec<Observed> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect()
    }
}

/// Zero failures, and every thread saw the certificates in rotation order
/// (never an older one after a newer one), ending with the last.
fn check_load(obs: &[Observed], order: &[&Leaf]) {
    let order: Vec<String> = order.iter().map(|l| l.fingerprint()).collect();
    let failures: Vec<&String> = obs.iter().flat_map(|o| &o.failures).collect();
    let ok: u64 = obs.iter().map(|o| o.ok).sum();
    assert!(
        failures.is_empty(),
        "{} failed requests out of {} during rotation; first ones: {:#?}",
        failures.len(),
        ok as usize + failures.len(),
        &failures[..failures.len().min(10)]
    );
    eprintln!(
        "rotation load: {ok} requests ok, per-thread certificate sequences: {:?}",
        obs.iter().map(|o| o.sequence.len()).collect::<Vec<_>>()
    );
    for (t, o) in obs.iter().enumerate() {
        assert!(o.ok > 0, "thread {t} completed no request");
        let idx: Vec<usize> = o
            .sequence
            .iter()
            .map(|fp| {
                order
                    .iter()
                    .position(|x| x == fp)
                    .unwrap_or_else(|| panic!("thread {t} saw an unknown certificate {fp}"))
            })
            .collect();
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "thread {t} saw certificates out of rotation order: {idx:?}"
        );
        assert_eq!(
            idx.last(),
            Some(&(order.len() - 1)),
            "thread {t} did not end on the last certificate: {idx:?}"
        );
    }
}

fn replace_files(pki: &CorpPki, leaf: &Leaf) {
    write_atomic(&pki.chain, pki.chain_pem(leaf).as_bytes());
    write_atomic(&pki.key, leaf.key_pem().as_bytes());
}

fn normalized_fp(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_lowercase()
}

/// The fingerprint GET /certs reports for `name`.
fn admin_cert_fp(admin: SocketAddr, name: &str) -> String {
    let body = admin_get(admin, "/certs", Duration::from_secs(5));
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /certs: {e}: {body}"));
    let entry = v
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("GET /certs has no {name}: {body}"));
    normalized_fp(entry["fingerprint_sha256"].as_str().unwrap_or(""))
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = admin_get(admin, "/metrics", Duration::from_secs(5));
    metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[test]
fn rotation_by_sighup_and_admin_upload_under_load_drops_nothing() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    let (gw, admin) = start(&pki, &backend, false);
    let cfg = pki.client_config();
    let l0 = &pki.leaf;
    assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());

    let load = Load::start(gw.addr(), cfg.clone());
    load.advance(20, "warm-up");

    // (a) New files (temp + rename), then SIGHUP.
    let l1 = pki.leaf_for(&["localhost"]);
    replace_files(&pki, &l1);
    // watch = false: the rename alone must not rotate (the watcher's
    // debounce is 300 ms; give it well over that).
    thread::sleep(Duration::from_millis(800));
    assert_eq!(
        served(gw.addr(), &cfg).unwrap(),
        l0.fingerprint(),
        "with [reload] watch = false a file change alone rotated the certificate"
    );
    gw.signal(libc::SIGHUP);
    wait_served(gw.addr(), &cfg, &l1, "SIGHUP");
    load.advance(20, "after SIGHUP");
    assert!(metric(admin, "mcp_gateway_reloads_total") >= 1.0);
    assert_eq!(admin_cert_fp(admin, CERT_NAME), l1.fingerprint());

    // (c) Upload chain + key through the admin API.
    let l2 = pki.leaf_for(&["localhost"]);
    let body = format!("{}{}", pki.chain_pem(&l2), l2.key_pem());
    let (code, resp) = put_cert(admin, CERT_NAME, &body);
    assert_eq!(code, 200, "PUT /certs/{CERT_NAME}: {resp}");
    wait_served(gw.addr(), &cfg, &l2, "PUT /certs");
    load.advance(20, "after PUT");
    assert_eq!(admin_cert_fp(admin, CERT_NAME), l2.fingerprint());

    let obs = load.finish();
    check_load(&obs, &[l0, &l1, &l2]);
    let total: u64 = obs.iter().map(|o| o.ok).sum();
    assert!(total >= 60, "only {total} requests completed");
    drop(gw);
}

#[test]
fn rotation_by_file_watch_under_load_drops_nothing() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    let (gw, admin) = start(&pki, &backend, true);
    let cfg = pki.client_config();
    let l0 = &pki.leaf;
    assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());

    let load = Load::start(gw.addr(), cfg.clone());
    load.advance(20, "warm-up");

    // (b) Replace the files, no signal: twice, so the watch survives the
    // first rename replacing the watched files' inodes.
    let l1 = pki.leaf_for(&["localhost"]);
    replace_files(&pki, &l1);
    wait_served(gw.addr(), &cfg, &l1, "file change #1");
    load.advance(20, "after file change #1");

    let l2 = pki.leaf_for(&["localhost"]);
    replace_files(&pki, &l2);
    wait_served(gw.addr(), &cfg, &l2, "file change #2");
    load.advance(20, "after file change #2");
    assert_eq!(admin_cert_fp(admin, CERT_NAME), l2.fingerprint());

    let obs = load.finish();
    check_load(&obs, &[l0, &l1, &l2]);
    assert!(
        gw.log().contains("file change"),
        "reload trigger not logged:\n{}",
        gw.log()
    );
}

#[test]
fn refused_rotations_keep_the_old_certificate_serving() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    let (gw, admin) = start(&pki, &backend, false);
    let cfg = pki.client_config();
    let l0 = &pki.leaf;
    assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());

    // Upload with a key that does not belong to the leaf: 422 + error.
    let l1 = pki.leaf_for(&["localhost"]);
    let other = pki.leaf_for(&["localhost"]);
    let body = format!("{}{}", pki.chain_pem(&l1), other.key_pem());
    let (code, resp) = put_cert(admin, CERT_NAME, &body);
    assert_eq!(code, 422, "PUT with a wrong key: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp)
        .unwrap_or_else(|e| panic!("422 body is not JSON ({e}): {resp}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {resp}"));
    assert!(
        msg.contains("match"),
        "error does not explain the key mismatch: {msg}"
    );
    for _ in 0..5 {
        assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());
    }
    assert_eq!(admin_cert_fp(admin, CERT_NAME), l0.fingerprint());

    // A chain from an unrelated root is refused too (trust_roots).
    let (foreign, foreign_inter) = pki.wrong_root_leaf(&["localhost"]);
    let body = format!(
        "{}{}",
        foreign.chain_pem(&[&foreign_inter]),
        foreign.key_pem()
    );
    let (code, resp) = put_cert(admin, CERT_NAME, &body);
    assert_eq!(code, 422, "PUT with a chain from another root: {resp}");
    assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());

    // Unknown name: 404.
    let body = format!("{}{}", pki.chain_pem(&l1), l1.key_pem());
    let (code, resp) = put_cert(admin, "no-such-cert", &body);
    assert_eq!(code, 404, "PUT to an unknown name: {resp}");

    // SIGHUP with a corrupt certificate file: reload fails, old cert serves.
    write_atomic(
        &pki.chain,
        b"-----BEGIN CERTIFICATE-----\nMIIB!!!garbage###\n-----END CERTIFICATE-----\n",
    );
    gw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no \"reload failed\" log line after SIGHUP with a corrupt file:\n{}",
            gw.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap()
        .to_string();
    assert!(
        line.contains(pki.chain.to_str().unwrap()),
        "the reload failure does not name the file: {line}"
    );
    for _ in 0..5 {
        assert_eq!(served(gw.addr(), &cfg).unwrap(), l0.fingerprint());
    }
    assert!(metric(admin, "mcp_gateway_reload_failures_total") >= 1.0);
    assert_eq!(metric(admin, "mcp_gateway_reloads_total"), 0.0);

    // Fixing the files and SIGHUP again rotates: the failure left no damage.
    replace_files(&pki, &l1);
    gw.signal(libc::SIGHUP);
    wait_served(gw.addr(), &cfg, &l1, "SIGHUP after fixing the file");
    assert!(metric(admin, "mcp_gateway_reloads_total") >= 1.0);

    // And a valid upload after the refused ones works.
    let l2 = pki.leaf_for(&["localhost"]);
    let body = format!("{}{}", pki.chain_pem(&l2), l2.key_pem());
    let (code, resp) = put_cert(admin, CERT_NAME, &body);
    assert_eq!(code, 200, "valid PUT: {resp}");
    wait_served(gw.addr(), &cfg, &l2, "PUT after refused ones");
}
