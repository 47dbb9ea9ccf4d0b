//! Cipher-suite policy (`tls.expected_cipher_suites`, warn / enforce) and
//! client certificates (`[listener.client_auth]`, required / optional), with
//! the verified identity in the audit record.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::corp_pki::{connect_sni, Ca, CorpPki, Leaf, LeafSpec};
use gateway_tests::tls_backend::{
    start_config, stop_gateway, stopped_counter, suite, toml_str, ClientOpts,
};
use gateway_tests::{close_and_drain, try_connect_tls, Backend, Gateway, Pki, TempDir, TlsStream};
use rustls::ClientConfig;

// ---------------------------------------------------------------------------
// Cipher-suite policy

/// `[tls] expected_cipher_suites = ["TLS13_AES_256_GCM_SHA384"]` with
/// `policy = mode`.  Enforce mode runs TLS 1.3 only: with 1.2 enabled no
/// TLS 1.2 suite would be left and the gateway refuses the config.
fn policy_gateway(pki: &Pki, dir: &TempDir, backend: &Backend, mode: &str) -> Gateway {
    let (chain, key, b) = (toml_str(&pki.chain), toml_str(&pki.key), backend.arg());
    let mode = mode.to_string();
    let versions = if mode == "enforce" {
        r#"["1.3"]"#
    } else {
        r#"["1.2", "1.3"]"#
    };
    start_config(dir, &[], move |port| {
        format!(
            r#"
[server]
workers = 2

[tls]
versions = {versions}
expected_cipher_suites = ["TLS13_AES_256_GCM_SHA384"]
policy = "{mode}"

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
cert = {chain}
key = {key}
backend = "{b}"
"#
        )
    })
}

/// A TLS 1.3-only client offering exactly one suite.
fn one_suite_client(pki: &Pki, name: &str) -> Arc<ClientConfig> {
    ClientOpts {
        suites: Some(vec![suite(name)]),
        tls13_only: true,
        ..ClientOpts::trusting(&pki.ca_der)
    }
    .build()
}

/// Echo `payload` through `s` (blocking, small payloads).
fn echo(s: &mut TlsStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(payload)?;
    s.flush()?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

fn negotiated(s: &TlsStream) -> String {
    format!("{:?}", s.conn.negotiated_cipher_suite().map(|c| c.suite()))
}

#[test]
fn policy_warn_allows_deviation_logs_and_counts_it() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-pol"), Backend::echo());
    let mut gw = policy_gateway(&pki, &dir, &backend, "warn");

    // AES-128 only: outside the expected set, but warn mode lets it through.
    let mut s = try_connect_tls(
        gw.addr(),
        one_suite_client(&pki, "TLS13_AES_128_GCM_SHA256"),
    )
    .expect("warn mode must accept a client outside the expected suites");
    assert_eq!(negotiated(&s), "Some(TLS13_AES_128_GCM_SHA256)");
    let got = echo(&mut s, b"deviating client payload").expect("echo");
    assert_eq!(got, b"deviating client payload");
    let _ = close_and_drain(&mut s);

    // AES-256: expected, no deviation.
    let mut s = try_connect_tls(
        gw.addr(),
        one_suite_client(&pki, "TLS13_AES_256_GCM_SHA384"),
    )
    .expect("AES-256 client");
    assert_eq!(negotiated(&s), "Some(TLS13_AES_256_GCM_SHA384)");
    assert_eq!(echo(&mut s, b"conforming").expect("echo"), b"conforming");
    let _ = close_and_drain(&mut s);

    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(
        stopped_counter(&log, "policy_deviations"),
        Some(1),
        "exactly one deviation (the AES-128 client); log:\n{log}"
    );
    assert_eq!(stopped_counter(&log, "handshakes"), Some(2), "log:\n{log}");
    let warn = log
        .lines()
        .filter(|l| l.contains("WARN") && l.to_lowercase().contains("policy deviation"))
        .collect::<Vec<_>>();
    assert_eq!(
        warn.len(),
        1,
        "expected one WARN line about the policy deviation; log:\n{log}"
    );
    assert!(
        warn[0].contains("TLS13_AES_128_GCM_SHA256"),
        "the warning should name the negotiated suite: {}",
        warn[0]
    );
}

#[test]
fn policy_enforce_refuses_deviation_with_alert_and_counts_it() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-pol"), Backend::echo());
    let mut gw = policy_gateway(&pki, &dir, &backend, "enforce");
    // Every check is collected so that one run reports all of them.
    let mut problems = Vec::new();

    let err = match try_connect_tls(
        gw.addr(),
        one_suite_client(&pki, "TLS13_AES_128_GCM_SHA256"),
    ) {
        Ok(mut s) => {
            let r = echo(&mut s, b"should not pass");
            panic!("enforce mode accepted an AES-128-only client (echo: {r:?})");
        }
        Err(e) => e,
    };
    // rustls answers a ClientHello it refuses while choosing the
    // certificate with access_denied.
    if !(err.contains("alert") && err.contains("AccessDenied")) {
        problems.push(format!(
            "the refused client should get a fatal alert (access_denied), got: {err}"
        ));
    }
    assert_eq!(
        backend.stats().connections(),
        0,
        "refused client reached the backend"
    );

    // A conforming client still works.
    let mut s = try_connect_tls(
        gw.addr(),
        one_suite_client(&pki, "TLS13_AES_256_GCM_SHA384"),
    )
    .expect("AES-256 client in enforce mode");
    assert_eq!(negotiated(&s), "Some(TLS13_AES_256_GCM_SHA384)");
    assert_eq!(echo(&mut s, b"conforming").expect("echo"), b"conforming");
    let _ = close_and_drain(&mut s);

    // And a client offering both gets the expected suite (even though
    // rustls clients prefer AES-128 first).
    let both = ClientOpts {
        suites: Some(vec![
            suite("TLS13_AES_128_GCM_SHA256"),
            suite("TLS13_AES_256_GCM_SHA384"),
        ]),
        tls13_only: true,
        ..ClientOpts::trusting(&pki.ca_der)
    }
    .build();
    let mut s = try_connect_tls(gw.addr(), both).expect("client offering both suites");
    assert_eq!(negotiated(&s), "Some(TLS13_AES_256_GCM_SHA384)");
    assert_eq!(echo(&mut s, b"both").expect("echo"), b"both");
    let _ = close_and_drain(&mut s);

    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(stopped_counter(&log, "handshakes"), Some(2), "log:\n{log}");
    let dev = stopped_counter(&log, "policy_deviations");
    if dev != Some(1) {
        problems.push(format!(
            "policy_deviations should count the one refusal, stopped line says {dev:?}"
        ));
    }
    if !log
        .lines()
        .any(|l| l.contains("WARN") && l.contains("expected_cipher_suites"))
    {
        problems.push("no WARN line about the refused client".to_string());
    }
    assert!(
        problems.is_empty(),
        "enforce mode: {problems:#?}\nlog:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// mTLS

fn mtls_gateway(
    corp: &CorpPki,
    dir: &TempDir,
    backend: &Backend,
    required: bool,
    audit: &std::path::Path,
) -> Gateway {
    let (chain, key, ca, b, audit) = (
        toml_str(&corp.chain),
        toml_str(&corp.key),
        toml_str(&corp.clients_ca),
        backend.arg(),
        toml_str(audit),
    );
    start_config(dir, &[], move |port| {
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
backend = "{b}"

[listener.client_auth]
ca = {ca}
required = {required}
"#
        )
    })
}

/// Connect and echo a few bytes: `Ok(())` if the echo came back,
/// `Err(description)` if the handshake or the first read failed.  `Ok`
/// carries the client's address.
fn try_session(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<SocketAddr, String> {
    let mut s = connect_sni(addr, cfg, "localhost")?;
    let me = s.sock.local_addr().unwrap();
    let msg = b"mtls probe payload";
    match echo(&mut s, msg) {
        Ok(got) if got == msg => {
            let _ = close_and_drain(&mut s);
            Ok(me)
        }
        Ok(got) => panic!("echo returned other bytes: {got:?}"),
        Err(e) => Err(format!("first read/write after the handshake: {e}")),
    }
}

/// The audit records, without the ones of the test harness's readiness
/// probe (a TCP connect that closes before any TLS byte).
fn read_audit(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("audit file {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))
        })
        .filter(|r| r["close_reason"] != "client_gone_before_handshake")
        .collect()
}

fn other_ca_client(cn: &str) -> (Ca, Leaf) {
    let other = Ca::root("Some Other Client CA");
    let leaf = other.issue(&LeafSpec::client(cn));
    (other, leaf)
}

fn assert_refused(err: &str, what: &str) {
    assert!(
        err.to_lowercase().contains("alert"),
        "{what}: the refusal should be a TLS alert, got: {err}"
    );
}

/// After refusals the gateway must still be running and serving.
fn assert_still_serving(gw: &mut Gateway, corp: &CorpPki, what: &str) {
    assert!(
        gw.is_running(),
        "{what}: the gateway died: {:?}; log:\n{}",
        gw.try_wait(),
        gw.log()
    );
    let carol = corp.client_cert("carol");
    try_session(gw.addr(), corp.client_config_with_cert(&carol))
        .unwrap_or_else(|e| panic!("{what}: a valid client is no longer served: {e}"));
}

#[test]
fn mtls_required_accepts_client_ca_cert_and_audits_identity() {
    let (corp, dir, backend) = (CorpPki::new(), TempDir::new("gw-mtls"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = mtls_gateway(&corp, &dir, &backend, true, &audit);

    let alice = corp.client_cert("alice");
    try_session(gw.addr(), corp.client_config_with_cert(&alice))
        .expect("client with a certificate from the client CA");
    assert_eq!(backend.stats().connections(), 1);

    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(stopped_counter(&log, "handshakes"), Some(1), "log:\n{log}");
    let recs = read_audit(&audit);
    assert_eq!(recs.len(), 1, "audit records: {recs:#?}");
    assert_eq!(recs[0]["close_reason"], "normal", "{:#?}", recs[0]);
    let id = recs[0]["client_identity"].as_str().unwrap_or_default();
    assert!(
        id.contains("CN=alice") && id.contains("O=Corp"),
        "client_identity of the mTLS session: {id:?} in {:#?}",
        recs[0]
    );
}

#[test]
fn mtls_required_refuses_client_without_cert() {
    let (corp, dir, backend) = (CorpPki::new(), TempDir::new("gw-mtls"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = mtls_gateway(&corp, &dir, &backend, true, &audit);
    for tls in ["1.3", "1.2"] {
        let cfg = if tls == "1.3" {
            corp.client_config()
        } else {
            tls12_config(&corp, None)
        };
        let err =
            try_session(gw.addr(), cfg).expect_err("a client without a certificate was served");
        assert_refused(&err, &format!("TLS {tls}, no client cert"));
    }
    assert_eq!(
        backend.stats().connections(),
        0,
        "refused clients reached the backend"
    );
    assert_still_serving(
        &mut gw,
        &corp,
        "after refusing clients without a certificate",
    );
    let log = stop_gateway(&mut gw, Duration::from_secs(20));
    assert_eq!(
        stopped_counter(&log, "handshake_failures"),
        Some(2),
        "log:\n{log}"
    );
}

#[test]
fn mtls_required_refuses_cert_from_other_ca() {
    let (corp, dir, backend) = (CorpPki::new(), TempDir::new("gw-mtls"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = mtls_gateway(&corp, &dir, &backend, true, &audit);
    let (_other, mallory) = other_ca_client("mallory");
    for tls in ["1.3", "1.2"] {
        let cfg = if tls == "1.3" {
            corp.client_config_with_cert(&mallory)
        } else {
            tls12_config(&corp, Some(&mallory))
        };
        let err = try_session(gw.addr(), cfg)
            .expect_err("a client certificate from an unknown CA was accepted");
        assert_refused(&err, &format!("TLS {tls}, foreign client cert"));
    }
    assert_eq!(
        backend.stats().connections(),
        0,
        "refused clients reached the backend"
    );
    assert_still_serving(&mut gw, &corp, "after refusing foreign client certificates");
    let _ = stop_gateway(&mut gw, Duration::from_secs(20));
    for r in read_audit(&audit) {
        assert!(
            !r["client_identity"]
                .as_str()
                .unwrap_or_default()
                .contains("mallory"),
            "an unverified identity was recorded: {r:#?}"
        );
    }
}

#[test]
fn mtls_optional_accepts_without_cert() {
    let (corp, dir, backend) = (CorpPki::new(), TempDir::new("gw-mtls"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = mtls_gateway(&corp, &dir, &backend, false, &audit);
    let addr = gw.addr();

    let anon =
        try_session(addr, corp.client_config()).expect("optional mTLS: client without a cert");
    let bob = corp.client_cert("bob");
    let bob_addr = try_session(addr, corp.client_config_with_cert(&bob))
        .expect("optional mTLS: client with a cert");

    let _ = stop_gateway(&mut gw, Duration::from_secs(20));
    let recs = read_audit(&audit);
    assert_eq!(recs.len(), 2, "audit records: {recs:#?}");
    // Matched by client address: two workers flush in any order.
    let identity = |a: SocketAddr| {
        let r = recs
            .iter()
            .find(|r| r["client"] == a.to_string())
            .unwrap_or_else(|| panic!("no record for {a}: {recs:#?}"));
        r["client_identity"].as_str().map(str::to_owned)
    };
    assert_eq!(
        identity(anon),
        None,
        "the session without a certificate has no identity: {recs:#?}"
    );
    assert!(
        identity(bob_addr).is_some_and(|i| i.contains("CN=bob")),
        "bob's identity missing: {recs:#?}"
    );
}

#[test]
fn mtls_optional_still_refuses_a_bad_presented_cert() {
    let (corp, dir, backend) = (CorpPki::new(), TempDir::new("gw-mtls"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = mtls_gateway(&corp, &dir, &backend, false, &audit);
    let (_other, mallory) = other_ca_client("mallory");
    let err = try_session(gw.addr(), corp.client_config_with_cert(&mallory))
        .expect_err("optional mTLS accepted a certificate from an unknown CA");
    assert_refused(&err, "optional mTLS, foreign client cert");
    assert_still_serving(&mut gw, &corp, "after refusing a foreign certificate");
}

/// A TLS 1.2-only client config trusting the corporate root.
fn tls12_config(corp: &CorpPki, client: Option<&Leaf>) -> Arc<ClientConfig> {
    ClientOpts {
        roots: vec![corp.root.der()],
        client_cert: client.map(|c| (vec![c.der()], Arc::new(c.key_der()))),
        tls12_only: true,
        ..Default::default()
    }
    .build()
}
