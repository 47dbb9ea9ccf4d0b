//! Audit records (`[audit] path`): one exact JSON line per session, SIGUSR1
//! reopen after a rename, nothing lost on SIGTERM; and PROXY v2 headers
//! with TLS TLVs (`proxy_protocol = true`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_tests::client::{pump, PeerEnd, PumpOpts};
use gateway_tests::corp_pki::{connect_sni, CorpPki};
use gateway_tests::tls_backend::ConnRecord;
use gateway_tests::tls_backend::{
    start_config, stop_gateway, stopped_counter, toml_str, TestBackend,
};
use gateway_tests::{
    client_config, close_and_drain, connect_tls, echo_roundtrip, seeded_bytes, sha256,
    stream_sha256, try_connect_tls, wait_until, Backend, Gateway, Pki, SeededStream, TempDir, Tls,
};
use gw_lib::proxy_v2::{PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS, PP2_CLIENT_SSL};

fn audit_gateway(pki: &Pki, dir: &TempDir, backend: &str, audit: &Path) -> Gateway {
    let (chain, key, audit) = (toml_str(&pki.chain), toml_str(&pki.key), toml_str(audit));
    let backend = backend.to_string();
    start_config(dir, &[], move |port| {
        format!(
            r#"
[server]
workers = 2
ktls = "off"

[audit]
path = {audit}

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
cert = {chain}
key = {key}
backend = "{backend}"
"#
        )
    })
}

/// Every JSON line of an audit file (panics on a malformed line).
fn read_all(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("audit file {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("malformed audit line {l:?}: {e}"))
        })
        .collect()
}

/// Records of TLS sessions (drops the harness's readiness probe, a TCP
/// connect closed before any byte).
fn sessions(path: &Path) -> Vec<serde_json::Value> {
    read_all(path)
        .into_iter()
        .filter(|r| r["close_reason"] != "client_gone_before_handshake")
        .collect()
}

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` into milliseconds since the epoch.
fn parse_rfc3339_ms(s: &str) -> u64 {
    let b = s.as_bytes();
    assert!(
        s.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && s.ends_with('Z'),
        "not RFC 3339 UTC: {s:?}"
    );
    let num =
        |r: std::ops::Range<usize>| -> i64 { s[r].parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let (h, mi, sec) = (num(11..13), num(14..16), num(17..19));
    let ms = if b[19] == b'.' {
        let frac = &s[20..s.len() - 1];
        let v: i64 = frac.parse().unwrap();
        match frac.len() {
            3 => v,
            6 => v / 1000,
            9 => v / 1_000_000,
            n => panic!("{s}: {n} fraction digits"),
        }
    } else {
        0
    };
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000 + ms) as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One sink+source session: uploads `up` bytes, downloads `down` bytes
/// (plus the backend's 32-byte hash), closes.  Returns (client address,
/// negotiated suite name, bytes_up, bytes_down as the gateway must count them).
fn sink_source_session(
    addr: SocketAddr,
    pki: &Pki,
    up: u64,
    down: u64,
) -> (SocketAddr, String, u64, u64) {
    let mut s = connect_tls(addr, pki, Tls::V13);
    let client = s.sock.local_addr().unwrap();
    let suite = format!("{:?}", s.conn.negotiated_cipher_suite().unwrap().suite());
    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(&up.to_le_bytes());
    header.extend_from_slice(&down.to_le_bytes());
    header.extend_from_slice(&0xA0D1u64.to_le_bytes());
    let mut hdr_pos = 0usize;
    let mut body = SeededStream::new(0x5EED, up);
    let mut source = |buf: &mut [u8]| {
        if hdr_pos < header.len() {
            let n = buf.len().min(header.len() - hdr_pos);
            buf[..n].copy_from_slice(&header[hdr_pos..hdr_pos + n]);
            hdr_pos += n;
            return n;
        }
        body.fill(buf)
    };
    let mut got = Vec::new();
    let mut sink = |d: &[u8]| got.extend_from_slice(d);
    let opts = PumpOpts {
        stop_after_recv: Some(down + 32),
        ..Default::default()
    };
    let out = pump(&mut s, &mut source, &mut sink, &opts);
    assert!(
        out.error.is_none() && !out.timed_out,
        "sink/source: {out:?}"
    );
    assert_eq!(got.len() as u64, down + 32, "downloaded length");
    assert_eq!(
        sha256(&got[..down as usize]),
        stream_sha256(0xA0D1, down),
        "download bytes"
    );
    assert_eq!(
        &got[down as usize..],
        &stream_sha256(0x5EED, up),
        "backend hash of the upload"
    );
    let (rest, end) = close_and_drain(&mut s);
    assert!(rest.is_empty() && end.is_closed(), "{rest:?} {end:?}");
    (client, suite, 24 + up, down + 32)
}

#[test]
fn audit_record_is_exact_for_one_session() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-audit"), Backend::sink_source());
    let audit = dir.join("audit.jsonl");
    let mut gw = audit_gateway(&pki, &dir, &backend.arg(), &audit);
    let t0 = now_ms();
    let (client, suite, n_up, n_down) = sink_source_session(gw.addr(), &pki, 300_001, 1_234_567);
    let t1 = now_ms();
    let log = stop_gateway(&mut gw, Duration::from_secs(20));

    let recs = sessions(&audit);
    assert_eq!(recs.len(), 1, "one record for one session: {recs:#?}");
    let r = &recs[0];
    let field = |k: &str| r[k].clone();
    assert_eq!(field("bytes_up"), n_up, "bytes_up in {r:#?}");
    assert_eq!(field("bytes_down"), n_down, "bytes_down in {r:#?}");
    assert_eq!(field("tls_version"), "TLSv1.3");
    assert_eq!(field("cipher_suite"), suite.as_str());
    assert_eq!(field("sni"), "localhost");
    assert_eq!(field("path"), "userspace");
    assert_eq!(field("close_reason"), "normal");
    assert_eq!(field("client"), client.to_string(), "client address");
    assert_eq!(field("backend"), backend.arg(), "backend address");
    assert_eq!(field("resumed"), false);
    assert_eq!(field("listener"), "listener[0]");
    assert!(
        r["id"].as_str().is_some_and(|s| !s.is_empty()),
        "id: {r:#?}"
    );
    assert!(r["kx_group"].as_str().is_some(), "kx_group: {r:#?}");
    let hs = r["handshake_ms"].as_f64().expect("handshake_ms");
    assert!(hs > 0.0 && hs < 10_000.0, "handshake_ms {hs}");
    let start = parse_rfc3339_ms(r["start"].as_str().expect("start"));
    let end = parse_rfc3339_ms(r["end"].as_str().expect("end"));
    // Clocks: same host; allow 1 s of slack for rounding.
    assert!(
        start + 1000 >= t0 && end <= t1 + 1000 && start <= end,
        "start {start} end {end} outside the session [{t0}, {t1}]"
    );
    let dur = r["duration_ms"].as_u64().expect("duration_ms");
    assert!(
        dur.abs_diff(end - start) <= 1,
        "duration_ms {dur} vs end - start {}",
        end - start
    );
    assert_eq!(stopped_counter(&log, "bytes_up"), Some(n_up), "log:\n{log}");
    assert_eq!(
        stopped_counter(&log, "bytes_down"),
        Some(n_down),
        "log:\n{log}"
    );
}

#[test]
fn audit_sigusr1_reopens_after_rename() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-audit"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let rotated = dir.join("audit.jsonl.1");
    let mut gw = audit_gateway(&pki, &dir, &backend.arg(), &audit);

    let session = |tag: u64| -> SocketAddr {
        let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
        let a = s.sock.local_addr().unwrap();
        let payload = seeded_bytes(tag, 10_000 + tag as usize);
        let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
        assert!(out.error.is_none() && got == payload, "{out:?}");
        let _ = close_and_drain(&mut s);
        a
    };

    let a1 = session(1);
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&audit)
            .is_ok_and(|t| t.contains(&format!("\"{a1}\"")))),
        "session 1 not written to the audit file within 10 s"
    );
    std::fs::rename(&audit, &rotated).unwrap();
    gw.signal(libc::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(10), || audit.exists()),
        "no new audit file at the original path 10 s after SIGUSR1"
    );
    let a2 = session(2);
    let a3 = session(3);
    let _ = stop_gateway(&mut gw, Duration::from_secs(20));

    let old: Vec<_> = sessions(&rotated);
    let new: Vec<_> = sessions(&audit);
    // Sorted: two workers flush independently, so the file order of
    // records from different workers is not the session order.
    let clients = |v: &[serde_json::Value]| -> Vec<String> {
        let mut c: Vec<String> = v
            .iter()
            .map(|r| r["client"].as_str().unwrap().to_string())
            .collect();
        c.sort();
        c
    };
    assert_eq!(
        clients(&old),
        vec![a1.to_string()],
        "rotated file: {old:#?}"
    );
    let mut want = vec![a2.to_string(), a3.to_string()];
    want.sort();
    assert_eq!(clients(&new), want, "new file: {new:#?}");
    for r in &new {
        let n = if r["client"] == a2.to_string() {
            10_002
        } else {
            10_003
        };
        assert_eq!(r["bytes_up"], n, "{r:#?}");
        assert_eq!(r["bytes_down"], n, "{r:#?}");
    }
}

#[test]
fn audit_nothing_lost_on_sigterm() {
    const K: usize = 200;
    let pki = Arc::new(Pki::new());
    let (dir, backend) = (TempDir::new("gw-audit"), Backend::echo());
    let audit = dir.join("audit.jsonl");
    let mut gw = audit_gateway(&pki, &dir, &backend.arg(), &audit);
    let addr = gw.addr();
    let cfg = client_config(&pki, Tls::Any, &[]);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let cfg = Arc::clone(&cfg);
            thread::spawn(move || {
                let mut ports = Vec::new();
                for i in 0..K / 4 {
                    let mut s = try_connect_tls(addr, cfg.clone()).expect("connect");
                    ports.push(s.sock.local_addr().unwrap());
                    let msg = format!("session {t}/{i}");
                    s.write_all(msg.as_bytes()).unwrap();
                    s.flush().unwrap();
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got).unwrap();
                    assert_eq!(got, msg.as_bytes());
                    let (_, end) = close_and_drain(&mut s);
                    assert_eq!(end, PeerEnd::CloseNotify);
                }
                ports
            })
        })
        .collect();
    let mut clients: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .map(|a| a.to_string())
        .collect();
    // Immediately after the last session: SIGTERM.
    let log = stop_gateway(&mut gw, Duration::from_secs(20));

    let recs = sessions(&audit);
    let mut got: Vec<String> = recs
        .iter()
        .map(|r| r["client"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        recs.len(),
        K,
        "expected exactly {K} session records; log:\n{log}"
    );
    clients.sort();
    got.sort();
    assert_eq!(got, clients, "records do not match the sessions one to one");
    for r in &recs {
        assert_eq!(r["close_reason"], "normal", "{r:#?}");
        assert_eq!(r["bytes_up"], r["bytes_down"], "{r:#?}");
    }
}

// ---------------------------------------------------------------------------
// PROXY v2

fn proxy_gateway(
    chain: &Path,
    key: &Path,
    dir: &TempDir,
    backend: &TestBackend,
    client_ca: Option<&Path>,
) -> Gateway {
    let (chain, key, b) = (toml_str(chain), toml_str(key), backend.addr());
    let client_auth = client_ca
        .map(|ca| {
            format!(
                "\n[listener.client_auth]\nca = {}\nrequired = true\n",
                toml_str(ca)
            )
        })
        .unwrap_or_default();
    start_config(dir, &[], move |port| {
        format!(
            r#"
[server]
workers = 2

[tls]
alpn = ["h2", "http/1.1"]

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
cert = {chain}
key = {key}
backend = "{b}"
proxy_protocol = true
{client_auth}"#
        )
    })
}

fn check_proxy_record(
    r: &ConnRecord,
    client: SocketAddr,
    gw: SocketAddr,
    version: &str,
    suite: &str,
    payload: &[u8],
) -> gw_lib::proxy_v2::Parsed {
    let p = match &r.proxy {
        Some(Ok(p)) => p.clone(),
        other => panic!("backend did not get a valid PROXY v2 header: {other:?}"),
    };
    assert_eq!(p.command, gw_lib::proxy_v2::Command::Proxy);
    assert_eq!(p.addrs, Some((client, gw)), "source/destination addresses");
    assert_eq!(
        p.authority.as_deref(),
        Some("localhost"),
        "authority (SNI) TLV"
    );
    assert_eq!(p.alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN TLV");
    let ssl = p.ssl.clone().expect("PP2_TYPE_SSL TLV");
    assert!(ssl.client & PP2_CLIENT_SSL != 0, "SSL flag: {ssl:?}");
    assert_eq!(ssl.version.as_deref(), Some(version), "version sub-TLV");
    assert_eq!(ssl.cipher.as_deref(), Some(suite), "cipher sub-TLV");
    assert_eq!(
        r.received_len,
        payload.len() as u64,
        "payload length after the header"
    );
    assert_eq!(
        r.received_sha256,
        sha256(payload),
        "payload after the header differs"
    );
    assert_eq!(
        &r.received_head[..64],
        &payload[..64],
        "first payload bytes"
    );
    p
}

#[test]
fn proxy_v2_header_carries_client_address_and_tls_details() {
    let (pki, dir) = (Pki::new(), TempDir::new("gw-pp2"));
    let backend = TestBackend::proxy_v2_echo();
    let gw = proxy_gateway(&pki.chain, &pki.key, &dir, &backend, None);
    for (i, tls) in [Tls::V13, Tls::V12].into_iter().enumerate() {
        let cfg = client_config(&pki, tls, &[b"http/1.1"]);
        let mut s = try_connect_tls(gw.addr(), cfg).expect("connect");
        let client = s.sock.local_addr().unwrap();
        let suite = format!("{:?}", s.conn.negotiated_cipher_suite().unwrap().suite());
        let payload = seeded_bytes(0x9900 + i as u64, 300_000);
        let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
        assert!(out.error.is_none() && !out.timed_out, "{tls:?}: {out:?}");
        assert!(
            got == payload,
            "{tls:?}: echo through the PROXY backend differs"
        );
        let (_, end) = close_and_drain(&mut s);
        assert_eq!(end, PeerEnd::CloseNotify);
        let recs = backend.wait_records(i + 1, Duration::from_secs(10));
        let version = if tls == Tls::V13 {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        let p = check_proxy_record(&recs[i], client, gw.addr(), version, &suite, &payload);
        let ssl = p.ssl.unwrap();
        assert_eq!(
            ssl.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS),
            0,
            "no client certificate was presented: {ssl:?}"
        );
        assert_eq!(ssl.cn, None);
    }
}

#[test]
fn proxy_v2_header_carries_client_cn_with_mtls() {
    let (corp, dir) = (CorpPki::new(), TempDir::new("gw-pp2"));
    let backend = TestBackend::proxy_v2_echo();
    let gw = proxy_gateway(
        &corp.chain,
        &corp.key,
        &dir,
        &backend,
        Some(&corp.clients_ca),
    );
    let alice = corp.client_cert("alice");
    let cfg = corp.build_client_config(Some(&alice), &[b"http/1.1"]);
    let mut s = connect_sni(gw.addr(), cfg, "localhost").expect("mTLS connect");
    let client = s.sock.local_addr().unwrap();
    let suite = format!("{:?}", s.conn.negotiated_cipher_suite().unwrap().suite());
    let version = match s.conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        _ => "TLSv1.2",
    };
    let payload = seeded_bytes(0xA11CE, 70_000);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && got == payload, "{out:?}");
    let _ = close_and_drain(&mut s);
    let recs = backend.wait_records(1, Duration::from_secs(10));
    let p = check_proxy_record(&recs[0], client, gw.addr(), version, &suite, &payload);
    let ssl = p.ssl.unwrap();
    assert_eq!(
        ssl.cn.as_deref(),
        Some("alice"),
        "client CN sub-TLV: {ssl:?}"
    );
    assert_eq!(
        ssl.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS),
        PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        "certificate flags: {ssl:?}"
    );
    assert_eq!(ssl.verify, 0, "verified certificate: {ssl:?}");
}
