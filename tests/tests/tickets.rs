//! Session tickets with keys from files (`tls.ticket_keys`): a ticket from
//! one gateway resumes on another with the same keys, not with other keys;
//! rotation by SIGHUP with [new, old] keeps old tickets valid and encrypts
//! new ones with the new key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::tls_backend::{start_config, stop_gateway, toml_str, ClientOpts};
use gateway_tests::{close_and_drain, try_connect_tls, wait_until, Backend, Gateway, Pki, TempDir};
use rand::RngCore;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
use rustls::{ClientConfig, HandshakeKind};

fn key_file(dir: &TempDir, name: &str) -> PathBuf {
    let mut k = [0u8; 80];
    rand::rng().fill_bytes(&mut k);
    let p = dir.join(name);
    std::fs::write(&p, k).unwrap();
    p
}

fn ticket_gateway(pki: &Pki, dir: &TempDir, backend: &Backend, keys: &[&Path]) -> Gateway {
    let (chain, key, b) = (toml_str(&pki.chain), toml_str(&pki.key), backend.arg());
    let keys = keys
        .iter()
        .map(|p| toml_str(p))
        .collect::<Vec<_>>()
        .join(", ");
    start_config(dir, &[], move |port| {
        format!(
            r#"
[server]
workers = 2

[tls]
ticket_keys = [{keys}]

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

/// A client config with a fresh session cache.  rustls only resumes a
/// session with the very config (verifier) that made it, so one config is
/// shared by every connection that should share tickets.
fn new_cache(pki: &Pki) -> Arc<ClientConfig> {
    let store: Arc<dyn ClientSessionStore> = Arc::new(ClientSessionMemoryCache::new(64));
    ClientOpts {
        session_store: Some(store),
        tls13_only: true,
        ..ClientOpts::trusting(&pki.ca_der)
    }
    .build()
}

/// Connect with `cfg`, echo a few bytes (so the tickets sent after the
/// handshake are processed), close; returns how the handshake went.
fn session(gw: &Gateway, cfg: &Arc<ClientConfig>) -> HandshakeKind {
    let mut s =
        try_connect_tls(gw.addr(), Arc::clone(cfg)).unwrap_or_else(|e| panic!("connect: {e}"));
    let kind = s
        .conn
        .handshake_kind()
        .expect("handshake kind after the handshake");
    let msg = b"ticket probe";
    s.write_all(msg).unwrap();
    s.flush().unwrap();
    let mut got = [0u8; 12];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, msg);
    let _ = close_and_drain(&mut s);
    kind
}

#[test]
fn ticket_from_one_gateway_resumes_on_another_with_the_same_keys() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-tkt"), Backend::echo());
    let shared = key_file(&dir, "shared.key");
    let a = ticket_gateway(&pki, &dir, &backend, &[&shared]);
    let b = ticket_gateway(&pki, &dir, &backend, &[&shared]);

    let cache = new_cache(&pki);
    assert_eq!(
        session(&a, &cache),
        HandshakeKind::Full,
        "first contact with A"
    );
    assert_eq!(
        session(&b, &cache),
        HandshakeKind::Resumed,
        "B must resume A's ticket (same key file)"
    );
    // And back: B's ticket works on A.
    let cache = new_cache(&pki);
    assert_eq!(session(&b, &cache), HandshakeKind::Full);
    assert_eq!(
        session(&a, &cache),
        HandshakeKind::Resumed,
        "A resumes B's ticket"
    );
}

#[test]
fn ticket_does_not_resume_with_a_different_key() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-tkt"), Backend::echo());
    let ka = key_file(&dir, "a.key");
    let kb = key_file(&dir, "b.key");
    let a = ticket_gateway(&pki, &dir, &backend, &[&ka]);
    let b = ticket_gateway(&pki, &dir, &backend, &[&kb]);

    let cache = new_cache(&pki);
    assert_eq!(session(&a, &cache), HandshakeKind::Full);
    assert_eq!(
        session(&b, &cache),
        HandshakeKind::Full,
        "B (other key) must not resume A's ticket"
    );
    // B's own ticket resumes on B: the full handshake above was not a
    // broken resumption path.
    assert_eq!(
        session(&b, &cache),
        HandshakeKind::Resumed,
        "B resumes its own ticket"
    );
}

#[test]
fn ticket_key_rotation_on_sighup_keeps_old_tickets() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-tkt"), Backend::echo());
    let old = key_file(&dir, "old.key");
    let new = key_file(&dir, "new.key");
    let filler = key_file(&dir, "filler.key");
    let old_bytes = std::fs::read(&old).unwrap();
    let new_bytes = std::fs::read(&new).unwrap();

    // A: [old].  B: [current, previous] files, at first [old, filler].
    let b_cur = dir.join("b-current.key");
    let b_prev = dir.join("b-previous.key");
    std::fs::write(&b_cur, &old_bytes).unwrap();
    std::fs::copy(&filler, &b_prev).unwrap();
    let a = ticket_gateway(&pki, &dir, &backend, &[&old]);
    let mut b = ticket_gateway(&pki, &dir, &backend, &[&b_cur, &b_prev]);
    // C: [new] only; D: [old] only (to see which key B encrypts with).
    let c = ticket_gateway(&pki, &dir, &backend, &[&new]);
    let d = ticket_gateway(&pki, &dir, &backend, &[&old]);

    // A ticket from A (encrypted with `old`), held across the rotation.
    let held = new_cache(&pki);
    assert_eq!(session(&a, &held), HandshakeKind::Full);

    // Rotate B to [new, old] and SIGHUP.
    std::fs::write(&b_cur, &new_bytes).unwrap();
    std::fs::write(&b_prev, &old_bytes).unwrap();
    let reloads_before = b.log().matches("reloaded TLS material").count();
    b.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || b
            .log()
            .matches("reloaded TLS material")
            .count()
            > reloads_before),
        "no reload logged after SIGHUP; log:\n{}",
        b.log()
    );
    assert!(
        b.log().contains("ticket_keys=2"),
        "the reload should report 2 ticket keys; log:\n{}",
        b.log()
    );

    assert_eq!(
        session(&b, &held),
        HandshakeKind::Resumed,
        "B after rotation must still resume a ticket made with the old key"
    );

    // New tickets from B are encrypted with `new`: C ([new]) resumes them,
    // D ([old]) does not.
    let cache = new_cache(&pki);
    assert_eq!(session(&b, &cache), HandshakeKind::Full);
    assert_eq!(
        session(&c, &cache),
        HandshakeKind::Resumed,
        "a ticket from B after the rotation should be encrypted with the new key"
    );
    let cache = new_cache(&pki);
    assert_eq!(session(&b, &cache), HandshakeKind::Full);
    assert_eq!(
        session(&d, &cache),
        HandshakeKind::Full,
        "a gateway with only the old key must not resume B's new tickets"
    );
    let _ = stop_gateway(&mut b, Duration::from_secs(20));
}

#[test]
fn ticket_key_reload_error_keeps_the_old_keys() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-tkt"), Backend::echo());
    let k = key_file(&dir, "k.key");
    let k_bytes = std::fs::read(&k).unwrap();
    let mut b = ticket_gateway(&pki, &dir, &backend, &[&k]);
    let cache = new_cache(&pki);
    assert_eq!(session(&b, &cache), HandshakeKind::Full);

    // A truncated key file: the reload fails, the old key keeps working.
    std::fs::write(&k, &k_bytes[..33]).unwrap();
    b.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || b
            .log()
            .contains("reload failed")),
        "no 'reload failed' line; log:\n{}",
        b.log()
    );
    assert!(
        b.log().contains("k.key"),
        "the error should name the key file; log:\n{}",
        b.log()
    );
    assert_eq!(
        session(&b, &cache),
        HandshakeKind::Resumed,
        "after a failed reload the previous key must still decrypt"
    );
    let _ = stop_gateway(&mut b, Duration::from_secs(20));
}
