//! TLS from the gateway to the backend (`backend = { addr, tls = {...} }`):
//! byte-exact relay over a verified upstream TLS connection, refusal (502 /
//! clean close, nothing leaked in plaintext) on a wrong name or an
//! untrusted CA, `insecure = true`, gateway client certificates, and the
//! config check.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gateway_tests::client::{PeerEnd, PumpOpts};
use gateway_tests::corp_pki::CorpPki;
use gateway_tests::tls_backend::{
    start_config, stop_gateway, stopped_counter, toml_str, BackendTls, TestBackend,
};
use gateway_tests::util::run_with_timeout;
use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, gateway_bin, read_to_close, seeded_bytes, sha256,
    Gateway, Pki, TempDir, Tls,
};

const MIB: usize = 1024 * 1024;

/// A gateway whose listener uses `pki`'s leaf and relays to `backend` with
/// the given `tls = { ... }` inline table body.
fn gateway(pki: &Pki, dir: &TempDir, backend: &TestBackend, tls_body: &str) -> Gateway {
    let (chain, key) = (toml_str(&pki.chain), toml_str(&pki.key));
    let addr = backend.addr();
    let tls_body = tls_body.to_string();
    let dirp = dir.path().to_owned();
    start_config(dir, &[], move |port| {
        let audit = toml_str(&audit_path(&dirp, port));
        format!(
            r#"
[server]
workers = 2

[audit]
path = {audit}

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
cert = {chain}
key = {key}
backend = {{ addr = "{addr}", tls = {{ {tls_body} }} }}
"#
        )
    })
}

/// The audit file of the gateway listening on `port`.
fn audit_path(dir: &Path, port: u16) -> std::path::PathBuf {
    dir.join(format!("audit-{port}.jsonl"))
}

/// Audit records of TLS sessions (without the harness's readiness probe).
fn audit_records(dir: &TempDir, gw: &Gateway) -> Vec<serde_json::Value> {
    let path = audit_path(dir.path(), gw.port());
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit JSON line"))
        .filter(|r| r["close_reason"] != "client_gone_before_handshake")
        .collect()
}

/// The backend's own PKI (a separate root from the client-facing one).
fn backend_tls(bpki: &Pki) -> TestBackend {
    TestBackend::tls_echo(BackendTls::new(&bpki.chain, &bpki.key))
}

#[test]
fn upstream_tls_relays_one_mib_each_way_byte_exact() {
    let (pki, bpki, dir) = (Pki::new(), Pki::new(), TempDir::new("gw-up"));
    let backend = backend_tls(&bpki);
    let gw = gateway(
        &pki,
        &dir,
        &backend,
        &format!("ca = {}, server_name = \"localhost\"", toml_str(&bpki.ca)),
    );
    for (i, tls) in [Tls::V13, Tls::V12].into_iter().enumerate() {
        let mut s = connect_tls(gw.addr(), &pki, tls);
        let payload = seeded_bytes(0x0B57 + i as u64, MIB);
        let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
        assert!(
            out.error.is_none() && !out.timed_out,
            "{tls:?}: transfer: {out:?}"
        );
        assert_eq!(got.len(), MIB, "{tls:?}: echoed length");
        assert_eq!(
            sha256(&got),
            sha256(&payload),
            "{tls:?}: echoed bytes differ"
        );
        let (rest, end) = close_and_drain(&mut s);
        assert!(rest.is_empty(), "{tls:?}: extra bytes after the echo");
        assert_eq!(end, PeerEnd::CloseNotify, "{tls:?}: close");

        let recs = backend.wait_records(i + 1, Duration::from_secs(10));
        let r = &recs[i];
        assert_eq!(
            r.handshake,
            Some(Ok(())),
            "{tls:?}: backend handshake: {r:?}"
        );
        assert_eq!(
            r.sni.as_deref(),
            Some("localhost"),
            "SNI sent to the backend"
        );
        assert_eq!(r.received_len, MIB as u64, "{tls:?}: backend received");
        assert_eq!(
            r.received_sha256,
            sha256(&payload),
            "{tls:?}: backend saw other bytes"
        );
        assert!(
            r.saw_eof,
            "{tls:?}: backend did not see a clean close: {}",
            r.note
        );
        // The backend link is TLS: the raw bytes start with a handshake
        // record and never contain the plaintext.
        assert_eq!(
            r.raw.first(),
            Some(&0x16),
            "backend link does not start with TLS"
        );
        assert!(
            !r.raw.windows(64).any(|w| w == &payload[..64]),
            "{tls:?}: plaintext visible on the backend socket"
        );
    }
}

/// Wrong name or untrusted CA: the upstream handshake fails; HTTP clients
/// get a 502, others a clean close; the backend never sees plaintext; the
/// failures are counted.
fn assert_upstream_refused(pki: &Pki, dir: &TempDir, backend: &TestBackend, tls_body: &str) {
    let mut gw = gateway(pki, dir, backend, tls_body);
    let marker = b"SECRET-PLAINTEXT-MARKER-0123456789";

    // HTTP request -> 502, then a clean close.
    let mut s = connect_tls(gw.addr(), pki, Tls::V13);
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        marker.len()
    )
    .into_bytes();
    req.extend_from_slice(marker);
    s.write_all(&req).unwrap();
    s.flush().unwrap();
    let (resp, end) = read_to_close(&mut s);
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.starts_with("HTTP/1.1 502 "),
        "[{tls_body}] HTTP client: expected a 502, got {text:?} then {end:?}"
    );
    assert_eq!(end, PeerEnd::CloseNotify, "[{tls_body}] after the 502");

    // Non-HTTP bytes -> no answer, clean close.
    let mut s = connect_tls(gw.addr(), pki, Tls::V12);
    let mut bin = b"\x00\x01\x02".to_vec();
    bin.extend_from_slice(marker);
    s.write_all(&bin).unwrap();
    s.flush().unwrap();
    let (resp, end) = read_to_close(&mut s);
    assert!(
        resp.is_empty(),
        "[{tls_body}] non-HTTP client got bytes: {:?}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(end, PeerEnd::CloseNotify, "[{tls_body}] non-HTTP close");

    let recs = backend.wait_records(2, Duration::from_secs(10));
    for r in &recs {
        assert!(
            matches!(r.handshake, Some(Err(_))),
            "[{tls_body}] the backend handshake should have failed: {r:?}"
        );
        assert_eq!(r.received_len, 0, "[{tls_body}] backend received plaintext");
        assert!(
            !r.raw.windows(marker.len()).any(|w| w == marker),
            "[{tls_body}] the client's bytes reached the backend socket in plaintext"
        );
    }

    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(
        stopped_counter(&log, "backend_tls_failures"),
        Some(2),
        "[{tls_body}] backend_tls_failures in the stopped line; log:\n{log}"
    );
    assert_eq!(
        stopped_counter(&log, "responses_502"),
        Some(1),
        "log:\n{log}"
    );
    let recs = audit_records(dir, &gw);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for r in &recs {
        assert_eq!(r["close_reason"], "backend_tls_failed", "{r:#?}");
        assert_eq!(r["bytes_up"], 0, "nothing relayed upstream: {r:#?}");
    }
}

#[test]
fn upstream_wrong_server_name_is_refused() {
    let (pki, bpki, dir) = (Pki::new(), Pki::new(), TempDir::new("gw-up"));
    let backend = backend_tls(&bpki);
    assert_upstream_refused(
        &pki,
        &dir,
        &backend,
        &format!(
            "ca = {}, server_name = \"mcp.internal.example\"",
            toml_str(&bpki.ca)
        ),
    );
}

#[test]
fn upstream_untrusted_ca_is_refused() {
    let (pki, bpki, other, dir) = (Pki::new(), Pki::new(), Pki::new(), TempDir::new("gw-up"));
    let backend = backend_tls(&bpki);
    assert_upstream_refused(
        &pki,
        &dir,
        &backend,
        &format!("ca = {}, server_name = \"localhost\"", toml_str(&other.ca)),
    );
}

#[test]
fn upstream_insecure_accepts_untrusted_and_warns() {
    let (pki, bpki, other, dir) = (Pki::new(), Pki::new(), Pki::new(), TempDir::new("gw-up"));
    let backend = backend_tls(&bpki);
    // An untrusted CA *and* a wrong name: insecure accepts anything.
    let mut gw = gateway(
        &pki,
        &dir,
        &backend,
        &format!(
            "ca = {}, server_name = \"mcp.internal.example\", insecure = true",
            toml_str(&other.ca)
        ),
    );
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let payload = seeded_bytes(0x1A5E, 200_000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && !out.timed_out, "{out:?}");
    assert!(got == payload, "insecure upstream: echo differs");
    let (_, end) = close_and_drain(&mut s);
    assert_eq!(end, PeerEnd::CloseNotify);
    let recs = backend.wait_records(1, Duration::from_secs(10));
    assert_eq!(recs[0].handshake, Some(Ok(())));
    assert_eq!(recs[0].received_sha256, sha256(&payload));

    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    let warn_line = log.lines().find(|l| {
        l.contains("WARN") && l.to_lowercase().contains("insecure") && l.contains("DISABLED")
    });
    assert!(
        warn_line.is_some(),
        "no loud WARN line about backend.tls.insecure; log:\n{log}"
    );
    assert_eq!(
        stopped_counter(&log, "backend_tls_failures"),
        Some(0),
        "log:\n{log}"
    );
}

#[test]
fn upstream_client_certificate_is_presented() {
    // The backend requires a client certificate from the corporate client CA;
    // the gateway presents one via backend.tls.cert/key.
    let (pki, bpki, corp, dir) = (
        Pki::new(),
        Pki::new(),
        CorpPki::new(),
        TempDir::new("gw-up"),
    );
    let gw_client = corp.client_cert("gateway-upstream");
    let cert = dir.join("gw-client.pem");
    let key = dir.join("gw-client.key");
    std::fs::write(&cert, gw_client.cert_pem()).unwrap();
    std::fs::write(&key, gw_client.key_pem()).unwrap();
    let mut tls = BackendTls::new(&bpki.chain, &bpki.key);
    tls.client_ca = Some(corp.clients_ca.clone());
    tls.client_cert_required = true;
    let backend = TestBackend::tls_echo(tls);

    // With the client certificate: works, and the backend saw it.
    let mut gw = gateway(
        &pki,
        &dir,
        &backend,
        &format!(
            "ca = {}, server_name = \"localhost\", cert = {}, key = {}",
            toml_str(&bpki.ca),
            toml_str(&cert),
            toml_str(&key)
        ),
    );
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let payload = seeded_bytes(0xC1, 100_000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(
        out.error.is_none() && !out.timed_out && got == payload,
        "{out:?}"
    );
    let _ = close_and_drain(&mut s);
    let recs = backend.wait_records(1, Duration::from_secs(10));
    assert_eq!(recs[0].handshake, Some(Ok(())), "{:?}", recs[0]);
    assert_eq!(
        recs[0].client_cert.as_deref(),
        Some(gw_client.der().as_ref()),
        "the backend did not see the gateway's client certificate"
    );
    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(
        stopped_counter(&log, "backend_tls_failures"),
        Some(0),
        "log:\n{log}"
    );

    // Without it: the backend refuses, the client gets a clean close.
    let mut gw = gateway(
        &pki,
        &dir,
        &backend,
        &format!("ca = {}, server_name = \"localhost\"", toml_str(&bpki.ca)),
    );
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    s.write_all(b"\x00binary hello").unwrap();
    s.flush().unwrap();
    let (resp, end) = read_to_close(&mut s);
    assert!(resp.is_empty(), "got {resp:?}");
    assert!(end.is_closed(), "{end:?}");
    let recs = backend.wait_records(2, Duration::from_secs(10));
    assert!(
        matches!(recs[1].handshake, Some(Err(_))) || recs[1].received_len == 0,
        "backend accepted a connection without a client certificate: {:?}",
        recs[1]
    );
    assert_eq!(recs[1].received_len, 0);
    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(
        stopped_counter(&log, "backend_tls_failures"),
        Some(1),
        "log:\n{log}"
    );
}

fn check_config(path: &Path) -> (bool, String) {
    let out = run_with_timeout(
        Command::new(gateway_bin()).arg("check-config").arg(path),
        None,
        false,
        Duration::from_secs(20),
    );
    (
        out.status.success(),
        format!("{}{}", out.stdout_str(), out.stderr_str()),
    )
}

#[test]
fn upstream_tls_config_errors() {
    let (pki, bpki, dir) = (Pki::new(), Pki::new(), TempDir::new("gw-up-cfg"));
    let write = |name: &str, tls_body: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                r#"
[[listener]]
listen = "127.0.0.1:18443"
cert = {}
key = {}
backend = {{ addr = "127.0.0.1:19000", tls = {{ {tls_body} }} }}
"#,
                toml_str(&pki.chain),
                toml_str(&pki.key)
            ),
        )
        .unwrap();
        path
    };

    // Neither ca nor insecure.
    let p = write("no-ca.toml", "server_name = \"localhost\"");
    let (ok, out) = check_config(&p);
    assert!(!ok, "check-config accepted backend.tls without ca: {out}");
    assert!(
        out.contains("mcp-tls-gateway: error:") && out.contains("backend.tls.ca"),
        "error must name backend.tls.ca: {out}"
    );

    // The same with ca: OK; with insecure and no ca: OK.
    let p = write(
        "ok.toml",
        &format!("ca = {}, server_name = \"localhost\"", toml_str(&bpki.ca)),
    );
    let (ok, out) = check_config(&p);
    assert!(
        ok && out.contains(": OK"),
        "valid upstream config refused: {out}"
    );
    let p = write(
        "insecure.toml",
        "server_name = \"localhost\", insecure = true",
    );
    let (ok, out) = check_config(&p);
    assert!(ok, "insecure without ca refused: {out}");

    // A CA file that does not exist is named.
    let missing = dir.join("missing-ca.pem");
    let p = write(
        "missing.toml",
        &format!("ca = {}, server_name = \"localhost\"", toml_str(&missing)),
    );
    let (ok, out) = check_config(&p);
    assert!(!ok, "missing CA file accepted: {out}");
    assert!(
        out.contains("missing-ca.pem"),
        "error must name the CA file: {out}"
    );

    // The gateway itself refuses to start with the bad config too.
    let p = write("no-ca-run.toml", "server_name = \"localhost\"");
    let out = run_with_timeout(
        Command::new(gateway_bin()).arg("--config").arg(&p),
        None,
        false,
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "gateway started without backend.tls.ca"
    );
    assert!(
        out.stderr_str().contains("backend.tls.ca"),
        "{}",
        out.stderr_str()
    );
}
