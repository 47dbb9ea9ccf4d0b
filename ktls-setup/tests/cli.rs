//! The `ktls-setup` binary on this host. The build host has no kernel TLS
//! (CONFIG_TLS unset), so `probe` must exit 1 and say why; on a host that
//! has it, the exit status must match what the library's probe says.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ktls-setup"))
        .args(args)
        .output()
        .expect("running ktls-setup")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn probe_exit_status_and_reason() {
    let o = run(&["probe"]);
    let out = text(&o);
    match ktls_setup::ulp_available() {
        Err(why) => {
            assert_eq!(o.status.code(), Some(1), "{out}");
            assert!(out.contains("offload: NO"), "{out}");
            assert!(out.contains("kernel TLS unavailable"), "{out}");
            assert!(out.contains("TCP_ULP"), "{out}");
            // The same reason the library gives the gateway.
            assert!(out.contains(&why), "{out}\n---\n{why}");
            if out.contains("CONFIG_TLS is not set") {
                assert!(out.contains("CONFIG_TLS=y or CONFIG_TLS=m"), "{out}");
            }
        }
        Ok(()) => {
            let can = ktls_setup::probe().can_offload().is_ok();
            assert_eq!(o.status.code(), Some(if can { 0 } else { 1 }), "{out}");
        }
    }
}

#[test]
fn probe_json_matches_exit_status() {
    let o = run(&["probe", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("probe --json prints JSON");
    assert_eq!(v["schema"], "ktls-setup/probe/v1");
    let can = v["can_offload"].as_bool().expect("can_offload is a bool");
    assert_eq!(o.status.code(), Some(if can { 0 } else { 1 }));
    assert_eq!(v["ciphers"].as_array().map(Vec::len), Some(6));
    if ktls_setup::ulp_available().is_err() {
        assert_eq!(v["ulp"]["status"], "failed");
        let reasons = v["reasons"].as_array().expect("reasons is an array");
        assert!(!reasons.is_empty());
        assert!(reasons[0]
            .as_str()
            .unwrap_or("")
            .contains("kernel TLS unavailable"));
        for c in v["ciphers"].as_array().into_iter().flatten() {
            assert_eq!(c["tx"]["status"], "skipped");
        }
    }
}

#[test]
fn selftest_fails_fast_without_ktls() {
    if let Err(why) = ktls_setup::ulp_available() {
        let t0 = std::time::Instant::now();
        let o = run(&["selftest"]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(out.contains(&why), "{out}");
        assert!(out.contains("selftest: 0 passed, 1 failed"), "{out}");
        assert!(
            t0.elapsed().as_secs() < 10,
            "selftest took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn enable_refuses_without_config_tls() {
    let k = ktls_setup::probe::KernelInfo::read();
    if k.config_tls == ktls_setup::probe::ConfigState::Unset {
        for args in [&["enable", "--dry-run"][..], &["enable"][..]] {
            let o = run(args);
            let out = text(&o);
            assert_eq!(o.status.code(), Some(1), "{out}");
            assert!(out.contains("CONFIG_TLS is not set"), "{out}");
        }
    }
}
