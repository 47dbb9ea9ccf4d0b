//! `--config FILE`, `check-config FILE` and startup errors.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gateway_tests::client::{client_config, try_connect_tls, PumpOpts};
use gateway_tests::{
    echo_roundtrip, gateway_bin, run_with_timeout, seeded_bytes, Backend, Gateway, Pki, TempDir,
};

fn config_text(pki: &Pki, port: u16, backend: &str, handshake: &str, extra_server: &str) -> String {
    format!(
        r#"[server]
workers = 2
{extra_server}
[timeouts]
handshake = "{handshake}"
idle = "10m"
drain = "30s"

[tls]
versions = ["1.2", "1.3"]
alpn = ["http/1.1"]

[[listener]]
listen = "127.0.0.1:{port}"
cert = "{}"
key = "{}"
backend = "{backend}"
"#,
        pki.chain.display(),
        pki.key.display()
    )
}

fn check_config(path: &Path) -> gateway_tests::util::CmdOutput {
    let mut cmd = Command::new(gateway_bin());
    cmd.arg("check-config").arg(path);
    run_with_timeout(&mut cmd, None, false, Duration::from_secs(10))
}

#[test]
fn check_config_accepts_valid_file() {
    let pki = Pki::new();
    let dir = TempDir::new("gw-cfg");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_text(&pki, 8443, "127.0.0.1:9100", "10s", "")).unwrap();
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "check-config rejected a valid file ({}):\n{}{}",
        out.status,
        out.stdout_str(),
        out.stderr_str()
    );
}

#[test]
fn check_config_rejects_bad_duration_naming_the_key() {
    let pki = Pki::new();
    let dir = TempDir::new("gw-cfg");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_text(&pki, 8443, "127.0.0.1:9100", "soon", "")).unwrap();
    let out = check_config(&path);
    assert!(
        !out.status.success(),
        "check-config accepted handshake = \"soon\""
    );
    let msg = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        msg.contains("handshake"),
        "error message must name the offending key `handshake`:\n{msg}"
    );
}

#[test]
fn check_config_rejects_unknown_field_naming_it() {
    let pki = Pki::new();
    let dir = TempDir::new("gw-cfg");
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        config_text(&pki, 8443, "127.0.0.1:9100", "10s", "wrokers = 3"),
    )
    .unwrap();
    let out = check_config(&path);
    assert!(
        !out.status.success(),
        "check-config accepted unknown key `wrokers`"
    );
    let msg = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        msg.contains("wrokers"),
        "error message must name the unknown key `wrokers`:\n{msg}"
    );
}

#[test]
fn missing_cert_file_fails_clearly() {
    let pki = Pki::new();
    let missing = pki.dir.join("does-not-exist-chain.pem");
    let mut cmd = Command::new(gateway_bin());
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{}", gateway_tests::free_port()),
    ])
    .arg("--cert")
    .arg(&missing)
    .arg("--key")
    .arg(&pki.key)
    .args(["--backend", "127.0.0.1:9", "--workers", "2"]);
    // Must exit on its own (run_with_timeout panics if it keeps running).
    let out = run_with_timeout(&mut cmd, None, false, Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "gateway started without its cert file"
    );
    let msg = out.stderr_str();
    assert!(
        msg.contains("does-not-exist-chain.pem"),
        "error on stderr must name the missing file:\n{msg}"
    );
}

#[test]
fn config_file_runs_gateway_with_alpn() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let dir = TempDir::new("gw-cfg");
    let path = dir.join("gateway.toml");
    let backend_arg = backend.arg();
    let gw = Gateway::start_with(|port| {
        std::fs::write(&path, config_text(&pki, port, &backend_arg, "10s", "")).unwrap();
        vec!["--config".into(), path.display().to_string()]
    });
    for tls in [gateway_tests::Tls::V13, gateway_tests::Tls::V12] {
        let cfg = client_config(&pki, tls, &[b"h2", b"http/1.1"]);
        let mut s = try_connect_tls(gw.addr(), cfg).unwrap_or_else(|e| panic!("{tls:?}: {e}"));
        assert_eq!(
            s.conn.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "{tls:?}: ALPN from [tls] alpn"
        );
        let payload = seeded_bytes(42, 100_000);
        let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
        assert!(out.error.is_none() && !out.timed_out, "{out:?}");
        assert!(got == payload, "{tls:?}: payload corrupted");
    }
}

#[test]
fn check_config_rejects_missing_cert_file() {
    let pki = Pki::new();
    let dir = TempDir::new("gw-cfg");
    let path = dir.join("gateway.toml");
    let text = config_text(&pki, 8443, "127.0.0.1:9100", "10s", "").replace(
        &pki.chain.display().to_string(),
        &dir.join("missing-chain.pem").display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    let out = check_config(&path);
    assert!(
        !out.status.success(),
        "check-config accepted a config whose cert file does not exist"
    );
    let msg = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        msg.contains("missing-chain.pem"),
        "error must name the missing file:\n{msg}"
    );
}

#[test]
fn json_log_format_emits_json_lines() {
    let pki = Pki::new();
    let backend = Backend::echo();
    let gw = Gateway::start(
        &pki,
        &backend.arg(),
        &["--log-format", "json", "--log-level", "debug"],
    );
    let mut s = gateway_tests::connect_tls(gw.addr(), &pki, gateway_tests::Tls::V13);
    let payload = seeded_bytes(1, 100);
    let (got, _) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(got == payload);
    drop(s);
    let log = gw.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output at --log-level debug");
    for l in &lines {
        let t = l.trim();
        assert!(
            t.starts_with('{') && t.ends_with('}') && t.contains("\":"),
            "not a JSON log line with --log-format json: {l:?}"
        );
    }
}
