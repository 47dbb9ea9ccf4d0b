//! Certificate validation (check-config and start-up), SNI selection and a
//! certificate that expires while the gateway runs, against a generated
//! corporate PKI (root -> intermediate -> leaves).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gateway_tests::corp_pki::{
    admin_get, connect_sni, echo_exact, fingerprint, metric_value, peer_fingerprint, CorpPki,
    LeafSpec,
};
use gateway_tests::util::CmdOutput;
use gateway_tests::{
    free_port, gateway_bin, loopback, run_with_timeout, seeded_bytes, Backend, Gateway,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// A config with one listener and one certificate, trust roots and optional
/// CRLs.
fn single_cert_toml(
    pki: &CorpPki,
    port: u16,
    backend: &str,
    chain: &Path,
    key: &Path,
    crls: &[&Path],
) -> String {
    let crls: Vec<String> = crls
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!(
        r#"[server]
workers = 2

[tls]
trust_roots = "{roots}"
crls = [{crls}]

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
backend = "{backend}"
cert = "{chain}"
key = "{key}"
"#,
        roots = pki.roots.display(),
        crls = crls.join(", "),
        chain = chain.display(),
        key = key.display(),
    )
}

fn check_config(path: &Path) -> CmdOutput {
    let mut cmd = Command::new(gateway_bin());
    cmd.arg("check-config").arg(path);
    run_with_timeout(&mut cmd, None, false, Duration::from_secs(10))
}

/// Runs `mcp-tls-gateway --config FILE`, expecting it to refuse to start
/// (exit on its own within 10 s; a gateway that starts is killed and the
/// helper panics, failing the test).
fn start_expecting_refusal(path: &Path) -> CmdOutput {
    let mut cmd = Command::new(gateway_bin());
    cmd.arg("--config").arg(path);
    run_with_timeout(&mut cmd, None, false, Duration::from_secs(10))
}

/// One invalid-certificate case: what to write, and which words the error
/// must contain.
struct Case {
    what: &'static str,
    chain: std::path::PathBuf,
    key: std::path::PathBuf,
    crls: Vec<std::path::PathBuf>,
    /// Every entry is a set of alternatives; one of each must appear
    /// (case-insensitive) in stderr.
    expect: Vec<Vec<String>>,
    /// The file the message must name.
    names: std::path::PathBuf,
}

fn words(sets: &[&[&str]]) -> Vec<Vec<String>> {
    sets.iter()
        .map(|alts| alts.iter().map(|w| w.to_string()).collect())
        .collect()
}

fn invalid_cases(pki: &CorpPki) -> Vec<Case> {
    let mut cases = Vec::new();

    let (foreign, foreign_inter) = pki.wrong_root_leaf(&["localhost"]);
    let (chain, key) = pki.write_foreign("wrong-root", &foreign, &foreign_inter);
    cases.push(Case {
        what: "wrong root",
        names: chain.clone(),
        chain,
        key,
        crls: vec![],
        expect: words(&[&["trust roots"], &[pki.roots.to_str().unwrap()]]),
    });

    let expired = pki.issue(&LeafSpec::localhost(&[]).expired());
    let (chain, key) = pki.write_leaf("expired", &expired);
    cases.push(Case {
        what: "expired",
        names: chain.clone(),
        chain,
        key,
        crls: vec![],
        expect: words(&[&["expired"]]),
    });

    let future = pki.issue(&LeafSpec::localhost(&[]).not_yet_valid());
    let (chain, key) = pki.write_leaf("future", &future);
    cases.push(Case {
        what: "not yet valid",
        names: chain.clone(),
        chain,
        key,
        crls: vec![],
        expect: words(&[&["not valid before", "not valid until", "not yet valid"]]),
    });

    let revoked = pki.issue(&LeafSpec::localhost(&[]));
    let (chain, key) = pki.write_leaf("revoked", &revoked);
    // The CRL also lists an unrelated serial: matching must be by serial.
    let crl = pki.write_crl(&[revoked.serial.wrapping_add(1), revoked.serial]);
    cases.push(Case {
        what: "revoked",
        names: chain.clone(),
        chain,
        key,
        crls: vec![crl.clone()],
        expect: words(&[&["revoked"], &[crl.to_str().unwrap()]]),
    });

    let a = pki.issue(&LeafSpec::localhost(&[]));
    let b = pki.issue(&LeafSpec::localhost(&[]));
    let (chain, _) = pki.write_leaf("mismatch-a", &a);
    let (_, key) = pki.write_leaf("mismatch-b", &b);
    cases.push(Case {
        what: "key mismatch",
        names: key.clone(),
        chain,
        key,
        crls: vec![],
        expect: words(&[&["do not match", "does not match", "mismatch"]]),
    });

    let corrupt = pki.path("corrupt-chain.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN CERTIFICATE-----\nMIIB!!!this is not base64@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    cases.push(Case {
        what: "corrupt PEM",
        names: corrupt.clone(),
        chain: corrupt,
        key: pki.key.clone(),
        crls: vec![],
        expect: words(&[&["PEM"]]),
    });
    cases
}

fn assert_error_mentions(case: &Case, out: &CmdOutput, ctx: &str) {
    let stderr = out.stderr_str();
    let lower = stderr.to_lowercase();
    assert!(
        !out.status.success(),
        "{ctx} [{}]: expected a non-zero exit, got {}\nstdout: {}\nstderr: {stderr}",
        case.what,
        out.status,
        out.stdout_str()
    );
    assert!(
        stderr.contains(case.names.to_str().unwrap()),
        "{ctx} [{}]: stderr does not name {}:\n{stderr}",
        case.what,
        case.names.display()
    );
    for alternatives in &case.expect {
        assert!(
            alternatives
                .iter()
                .any(|w| lower.contains(&w.to_lowercase())),
            "{ctx} [{}]: stderr mentions none of {alternatives:?}:\n{stderr}",
            case.what
        );
    }
}

#[test]
fn check_config_accepts_a_good_chain_and_rejects_each_bad_one() {
    let pki = CorpPki::new();

    // Good chain: leaf + intermediate verifying to roots.pem, with a CRL that
    // revokes some other serial.
    let good = pki.path("good.toml");
    let crl = pki.write_crl_as("other.crl.pem", &[pki.leaf.serial.wrapping_add(7)]);
    std::fs::write(
        &good,
        single_cert_toml(&pki, 8443, "127.0.0.1:9", &pki.chain, &pki.key, &[&crl]),
    )
    .unwrap();
    let out = check_config(&good);
    assert!(
        out.status.success(),
        "check-config rejected a good chain ({}):\n{}{}",
        out.status,
        out.stdout_str(),
        out.stderr_str()
    );
    assert!(
        out.stdout_str().contains("OK"),
        "no OK line: {}",
        out.stdout_str()
    );

    for (i, case) in invalid_cases(&pki).iter().enumerate() {
        let path = pki.path(&format!("bad-{i}.toml"));
        let crls: Vec<&Path> = case.crls.iter().map(|p| p.as_path()).collect();
        std::fs::write(
            &path,
            single_cert_toml(&pki, 8443, "127.0.0.1:9", &case.chain, &case.key, &crls),
        )
        .unwrap();
        let out = check_config(&path);
        assert_eq!(
            out.status.code(),
            Some(1),
            "check-config [{}] exit status; stderr:\n{}",
            case.what,
            out.stderr_str()
        );
        assert!(
            out.stderr_str().contains("mcp-tls-gateway: error:"),
            "check-config [{}]: no error prefix:\n{}",
            case.what,
            out.stderr_str()
        );
        assert_error_mentions(case, &out, "check-config");
    }
}

#[test]
fn gateway_refuses_to_start_with_an_invalid_certificate() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    for (i, case) in invalid_cases(&pki).iter().enumerate() {
        let port = free_port();
        let path = pki.path(&format!("start-{i}.toml"));
        let crls: Vec<&Path> = case.crls.iter().map(|p| p.as_path()).collect();
        std::fs::write(
            &path,
            single_cert_toml(&pki, port, &backend.arg(), &case.chain, &case.key, &crls),
        )
        .unwrap();
        let out = start_expecting_refusal(&path);
        assert_error_mentions(case, &out, "start");
    }
    // Control: the same template with the good chain starts and relays.
    let gw = Gateway::start_with(|port| {
        let path = pki.path(&format!("start-good-{port}.toml"));
        std::fs::write(
            &path,
            single_cert_toml(&pki, port, &backend.arg(), &pki.chain, &pki.key, &[]),
        )
        .unwrap();
        vec!["--config".into(), path.display().to_string()]
    });
    let mut s = connect_sni(gw.addr(), pki.client_config(), "localhost").expect("good chain");
    let payload = seeded_bytes(1, 4096);
    assert_eq!(echo_exact(&mut s, &payload).expect("echo"), payload);
    assert_eq!(peer_fingerprint(&s), pki.leaf.fingerprint());
    // The intermediate was sent along: the client's chain has two certs.
    assert_eq!(s.conn.peer_certificates().unwrap().len(), 2);
}

/// The error of a handshake that must fail; panics with `why` if it succeeded.
fn handshake_error(r: Result<gateway_tests::TlsStream, String>, why: &str) -> String {
    match r {
        Ok(_) => panic!("the handshake succeeded: {why}"),
        Err(e) => e,
    }
}

/// Accepts any server certificate (records nothing itself: the test reads
/// `peer_certificates()`), still checking handshake signatures.  Used to see
/// which certificate is served for a name it does not cover.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    Arc::new(cfg)
}

#[allow(clippy::too_many_arguments)]
fn two_cert_toml(
    pki: &CorpPki,
    port: u16,
    backend: &str,
    admin: Option<u16>,
    a: (&Path, &Path, &str),
    b: (&Path, &Path, &str),
) -> String {
    let admin = admin
        .map(|p| format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    format!(
        r#"[server]
workers = 2

[tls]
trust_roots = "{roots}"

[reload]
watch = false

{admin}
[[listener]]
listen = "127.0.0.1:{port}"
backend = "{backend}"

[[listener.certs]]
name = "a"
cert = "{a_chain}"
key = "{a_key}"
sni = ["{a_sni}"]
default = true

[[listener.certs]]
name = "b"
cert = "{b_chain}"
key = "{b_key}"
sni = ["{b_sni}"]
"#,
        roots = pki.roots.display(),
        a_chain = a.0.display(),
        a_key = a.1.display(),
        a_sni = a.2,
        b_chain = b.0.display(),
        b_key = b.1.display(),
        b_sni = b.2,
    )
}

#[test]
fn sni_selects_the_certificate_and_falls_back_to_the_default() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    let leaf_a = pki.leaf_for(&["a.test"]);
    let leaf_b = pki.leaf_for(&["b.test"]);
    let (a_chain, a_key) = pki.write_leaf("a", &leaf_a);
    let (b_chain, b_key) = pki.write_leaf("b", &leaf_b);
    let gw = Gateway::start_with(|port| {
        let path = pki.path(&format!("sni-{port}.toml"));
        std::fs::write(
            &path,
            two_cert_toml(
                &pki,
                port,
                &backend.arg(),
                None,
                (&a_chain, &a_key, "a.test"),
                (&b_chain, &b_key, "b.test"),
            ),
        )
        .unwrap();
        vec!["--config".into(), path.display().to_string()]
    });
    assert_ne!(leaf_a.fingerprint(), leaf_b.fingerprint());

    // Several rounds, alternating names, each a fresh full handshake.
    for round in 0..3u64 {
        for (name, cfg, want) in [
            ("a.test", pki.client_config(), &leaf_a),
            ("b.test", pki.client_config(), &leaf_b),
            ("other.test", accept_any_config(), &leaf_a),
        ] {
            let mut s = connect_sni(gw.addr(), cfg, name)
                .unwrap_or_else(|e| panic!("round {round}: handshake for {name}: {e}"));
            let certs = s.conn.peer_certificates().expect("peer certs").to_vec();
            assert_eq!(
                certs[0].as_ref(),
                want.cert.der().as_ref(),
                "round {round}: SNI {name} got the leaf {} instead of {}",
                fingerprint(certs[0].as_ref()),
                want.fingerprint()
            );
            assert_eq!(
                certs.get(1).map(|c| c.as_ref().to_vec()),
                Some(pki.inter.der().as_ref().to_vec()),
                "SNI {name}: the intermediate must follow the leaf"
            );
            let payload = seeded_bytes(round * 10 + name.len() as u64, 20_000);
            let got = echo_exact(&mut s, &payload)
                .unwrap_or_else(|e| panic!("round {round}: echo via {name}: {e}"));
            assert!(
                got == payload,
                "round {round}: echo via {name}: bytes differ"
            );
        }
    }

    // The verifying client must refuse the default cert for other.test:
    // proves the fallback really served a's leaf, not one covering the name.
    let err = handshake_error(
        connect_sni(gw.addr(), pki.client_config(), "other.test"),
        "a.test's leaf must not verify for other.test",
    );
    assert!(
        err.to_lowercase().contains("certificate"),
        "unexpected error: {err}"
    );
}

#[test]
fn certificate_expiring_while_running_is_refused_but_open_connections_continue() {
    let pki = CorpPki::new();
    let backend = Backend::echo();
    // "short" expires a few seconds after start; "long" stays valid.
    let short = pki.issue(&LeafSpec::server(&["short.test"]).expiring_in(Duration::from_secs(5)));
    let long = pki.leaf_for(&["long.test"]);
    let (s_chain, s_key) = pki.write_leaf("short", &short);
    let (l_chain, l_key) = pki.write_leaf("long", &long);
    let mut admin_port = 0;
    let gw = Gateway::start_with(|port| {
        admin_port = free_port();
        let path = pki.path(&format!("expiry-{port}.toml"));
        std::fs::write(
            &path,
            two_cert_toml(
                &pki,
                port,
                &backend.arg(),
                Some(admin_port),
                (&l_chain, &l_key, "long.test"),
                (&s_chain, &s_key, "short.test"),
            ),
        )
        .unwrap();
        vec!["--config".into(), path.display().to_string()]
    });
    let admin = loopback(admin_port);
    assert!(
        SystemTime::now() < short.not_after,
        "the test setup took too long: the short certificate already expired"
    );

    // Before expiry: handshakes for short.test succeed and relay.
    let mut kept = connect_sni(gw.addr(), pki.client_config(), "short.test")
        .expect("handshake for short.test before expiry");
    assert_eq!(peer_fingerprint(&kept), short.fingerprint());
    let p0 = seeded_bytes(100, 10_000);
    assert_eq!(echo_exact(&mut kept, &p0).expect("echo before expiry"), p0);
    {
        let metrics = admin_get(admin, "/metrics", Duration::from_secs(10));
        let secs = metric_value(
            &metrics,
            "mcp_gateway_cert_expiry_seconds",
            &[("name", "b")],
        )
        .unwrap_or_else(|| panic!("no cert_expiry_seconds for b:\n{metrics}"));
        assert!(
            (-1.0..=6.0).contains(&secs),
            "expiry seconds of the short cert before expiry: {secs}"
        );
        let refusals =
            metric_value(&metrics, "mcp_gateway_cert_expired_refusals_total", &[]).unwrap_or(0.0);
        assert_eq!(refusals, 0.0, "refusals before expiry");
    }

    // Wait (bounded) until the certificate is past notAfter (+1 s for the
    // one-second resolution of X.509 times and the gateway's clock check).
    let expiry = short.not_after + Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while SystemTime::now() < expiry {
        assert!(Instant::now() < deadline, "clock did not reach expiry");
        std::thread::sleep(Duration::from_millis(50));
    }

    // After expiry: a new handshake for short.test fails with an alert.
    let err = handshake_error(
        connect_sni(gw.addr(), pki.client_config(), "short.test"),
        "a handshake with an expired certificate must fail",
    );
    assert!(
        err.to_lowercase().contains("alert"),
        "expected a TLS alert from the gateway, got: {err}"
    );
    // Even a client that accepts anything is refused (the server refuses,
    // not the client's verifier).
    let err = handshake_error(
        connect_sni(gw.addr(), accept_any_config(), "short.test"),
        "the gateway must refuse to serve the expired certificate",
    );
    assert!(err.to_lowercase().contains("alert"), "got: {err}");

    // The connection opened before expiry still relays, in both directions.
    let p1 = seeded_bytes(101, 50_000);
    assert_eq!(
        echo_exact(&mut kept, &p1).expect("echo on the kept connection after expiry"),
        p1
    );

    // The other name is still served.
    let mut other = connect_sni(gw.addr(), pki.client_config(), "long.test")
        .expect("long.test must still be served");
    assert_eq!(peer_fingerprint(&other), long.fingerprint());
    let p2 = seeded_bytes(102, 8_000);
    assert_eq!(echo_exact(&mut other, &p2).expect("echo long.test"), p2);

    let metrics = admin_get(admin, "/metrics", Duration::from_secs(5));
    let refusals = metric_value(&metrics, "mcp_gateway_cert_expired_refusals_total", &[])
        .unwrap_or_else(|| panic!("no mcp_gateway_cert_expired_refusals_total:\n{metrics}"));
    assert!(refusals >= 2.0, "expired refusals: {refusals}\n{metrics}");
    let secs = metric_value(
        &metrics,
        "mcp_gateway_cert_expiry_seconds",
        &[("name", "b")],
    )
    .unwrap_or_else(|| panic!("no cert_expiry_seconds for b:\n{metrics}"));
    assert!(secs <= 0.0, "expired cert's expiry seconds: {secs}");
    let secs_a = metric_value(
        &metrics,
        "mcp_gateway_cert_expiry_seconds",
        &[("name", "a")],
    )
    .unwrap_or_else(|| panic!("no cert_expiry_seconds for a:\n{metrics}"));
    assert!(
        secs_a > 86_400.0 * 300.0,
        "valid cert's expiry seconds: {secs_a}"
    );
    let log = gw.log();
    assert!(
        log.contains("refusing TLS handshake") || log.to_lowercase().contains("expired"),
        "the refusal was not logged:\n{log}"
    );
}
