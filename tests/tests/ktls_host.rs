//! Kernel TLS policy on a host without kernel TLS (like the build machines:
//! `CONFIG_TLS` unset). The offload itself is tested in the VM
//! (`tests/ktls-vm/gateway`); here: `require` refuses to start and says
//! why, `auto` falls back to user-space records, logged and counted.

use std::process::Command;
use std::time::Duration;

use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, gateway_bin, run_with_timeout, seeded_bytes,
    Backend, Gateway, Pki, Tls,
};

/// Whether this host's kernel accepts the `tls` ULP (then these tests do
/// not apply: they describe a host without it).
fn host_has_ktls() -> bool {
    std::fs::read_to_string("/proc/modules").is_ok_and(|m| m.lines().any(|l| l.starts_with("tls ")))
        || std::path::Path::new("/proc/net/tls_stat").exists()
}

#[test]
fn require_refuses_to_start_without_kernel_tls() {
    if host_has_ktls() {
        eprintln!("host has kernel TLS: the refusal path is covered where it is missing");
        return;
    }
    let pki = Pki::new();
    let backend = Backend::echo();
    let out = run_with_timeout(
        Command::new(gateway_bin()).args([
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &pki.chain.display().to_string(),
            "--key",
            &pki.key.display().to_string(),
            "--backend",
            &backend.arg(),
            "--ktls",
            "require",
        ]),
        None,
        false,
        Duration::from_secs(20),
    );
    let err = out.stderr_str();
    assert!(!out.status.success(), "must not start: {err}");
    assert!(err.contains("ktls = \"require\""), "{err}");
    assert!(err.contains("CONFIG_TLS"), "says why: {err}");
    assert!(
        err.contains("boot a kernel with CONFIG_TLS") || err.contains("ktls-setup enable"),
        "says how to fix: {err}"
    );
}

#[test]
fn auto_falls_back_to_user_space_logged_and_counted() {
    if host_has_ktls() {
        eprintln!("host has kernel TLS: fallback not exercised here");
        return;
    }
    let pki = Pki::new();
    let backend = Backend::echo();
    let mut gw = Gateway::start(&pki, &backend.arg(), &["--ktls", "auto"]);
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let payload = seeded_bytes(3, 100_000);
    let (got, _) = echo_roundtrip(&mut s, &payload, &Default::default());
    assert!(got == payload);
    let _ = close_and_drain(&mut s);
    gw.sigterm();
    let status = gw.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = gw.log();
    assert!(
        log.contains("kernel TLS unavailable") && log.contains("user-space"),
        "fallback is logged at start:\n{log}"
    );
    let stopped = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped"))
        .unwrap_or("");
    assert!(stopped.contains("userspace_path=1"), "{stopped}");
    assert!(stopped.contains("ktls_connections=0"), "{stopped}");
}
