//! The admin API: metrics, sessions, certificates, health/readiness, the
//! HTML index, bearer tokens off loopback, and the Unix socket.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::client::PumpOpts;
use gateway_tests::tls_backend::{
    http_get, http_on, http_request, load_certs, prom_value, start_config, stop_gateway, toml_str,
    wait_http,
};
use gateway_tests::util::run_with_timeout;
use gateway_tests::{
    close_and_drain, connect_tls, echo_roundtrip, free_port, gateway_bin, hex, seeded_bytes,
    sha256, wait_until, Backend, Gateway, Pki, TempDir, Tls,
};

/// A gateway with `[admin] <admin_body>`; `admin_body(admin_port)` builds
/// the section's lines.  Returns the gateway and the admin port used.
fn admin_gateway(
    pki: &Pki,
    dir: &TempDir,
    backend: &Backend,
    drain: &str,
    admin_body: impl Fn(u16) -> String,
) -> (Gateway, u16) {
    let (chain, key, b) = (toml_str(&pki.chain), toml_str(&pki.key), backend.arg());
    let drain = drain.to_string();
    let mut admin_port = 0;
    let gw = start_config(dir, &[], |port| {
        admin_port = free_port();
        format!(
            r#"
[server]
workers = 2

[timeouts]
drain = "{drain}"

[admin]
{}

[reload]
watch = false

[[listener]]
listen = "127.0.0.1:{port}"
cert = {chain}
key = {key}
backend = "{b}"
"#,
            admin_body(admin_port)
        )
    });
    (gw, admin_port)
}

fn loopback_admin(port: u16) -> String {
    format!("listen = \"127.0.0.1:{port}\"")
}

#[test]
fn admin_endpoints_report_metrics_sessions_certs_health() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-admin"), Backend::echo());
    let (mut gw, aport) = admin_gateway(&pki, &dir, &backend, "30s", loopback_admin);
    let admin = SocketAddr::from(([127, 0, 0, 1], aport));
    let h = wait_http(admin, "/healthz", Duration::from_secs(10));
    assert_eq!(h.status, 200, "/healthz: {h:?}");

    // One open session.
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let client = s.sock.local_addr().unwrap();
    let payload = seeded_bytes(5, 4321);
    let (got, out) = echo_roundtrip(&mut s, &payload, &PumpOpts::default());
    assert!(out.error.is_none() && got == payload, "{out:?}");

    // /metrics
    let m = http_get(admin, "/metrics");
    assert_eq!(m.status, 200, "/metrics: {m:?}");
    assert!(
        m.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "/metrics content type: {:?}",
        m.header("content-type")
    );
    let text = m.text();
    let hs = prom_value(&text, "mcp_gateway_handshakes_total");
    assert!(
        hs.is_some_and(|v| v >= 1.0),
        "handshakes_total {hs:?} in:\n{text}"
    );
    let count = prom_value(&text, "mcp_gateway_handshake_duration_seconds_count");
    assert!(
        count.is_some_and(|v| v >= 1.0),
        "histogram _count {count:?} in:\n{text}"
    );
    assert!(
        prom_value(
            &text,
            "mcp_gateway_handshake_duration_seconds_bucket{le=\"+Inf\"}"
        ) == count,
        "+Inf bucket must equal _count:\n{text}"
    );
    assert!(
        prom_value(&text, "mcp_gateway_handshake_duration_seconds_sum").is_some_and(|v| v > 0.0),
        "histogram _sum:\n{text}"
    );
    assert!(
        text.contains("# TYPE mcp_gateway_handshake_duration_seconds histogram"),
        "histogram TYPE line missing:\n{text}"
    );
    assert_eq!(
        prom_value(&text, "mcp_gateway_connections_active"),
        Some(1.0),
        "one active connection:\n{text}"
    );

    // /sessions lists the open connection.
    let r = http_get(admin, "/sessions");
    assert_eq!(r.status, 200, "/sessions: {r:?}");
    let v = r.json();
    let list = v
        .as_array()
        .unwrap_or_else(|| panic!("/sessions is not an array: {v}"));
    let ours: Vec<_> = list
        .iter()
        .filter(|x| x["client"] == client.to_string())
        .collect();
    assert_eq!(ours.len(), 1, "our session ({client}) in /sessions: {v:#}");
    let me = ours[0];
    assert_eq!(me["close_reason"], "active", "{me:#}");
    assert_eq!(me["sni"], "localhost", "{me:#}");
    assert_eq!(me["tls_version"], "TLSv1.3", "{me:#}");
    assert_eq!(me["bytes_up"], 4321, "{me:#}");
    assert_eq!(me["bytes_down"], 4321, "{me:#}");

    // /certs lists the certificate.
    let r = http_get(admin, "/certs");
    assert_eq!(r.status, 200, "/certs: {r:?}");
    let v = r.json();
    let certs = v
        .as_array()
        .unwrap_or_else(|| panic!("/certs is not an array: {v}"));
    assert_eq!(certs.len(), 1, "{v:#}");
    let c = &certs[0];
    assert_eq!(c["name"], "default", "{c:#}");
    let leaf = &load_certs(&pki.chain)[0];
    assert_eq!(
        c["fingerprint_sha256"]
            .as_str()
            .map(|f| f.replace(':', "").to_lowercase()),
        Some(hex(&sha256(leaf.as_ref()))),
        "fingerprint: {c:#}"
    );
    assert!(
        c["subject"]
            .as_str()
            .is_some_and(|s| s.contains("localhost")),
        "{c:#}"
    );
    assert!(
        c["issuer"]
            .as_str()
            .is_some_and(|s| s.contains("test root CA")),
        "{c:#}"
    );
    assert!(
        c["seconds_to_expiry"].as_i64().is_some_and(|s| s > 0),
        "{c:#}"
    );

    // Probes and the index page.
    assert_eq!(http_get(admin, "/healthz").status, 200);
    assert_eq!(http_get(admin, "/readyz").status, 200);
    let idx = http_get(admin, "/");
    assert_eq!(idx.status, 200, "{idx:?}");
    assert!(
        idx.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "index content type: {:?}",
        idx.header("content-type")
    );
    assert!(
        idx.text().to_lowercase().contains("<html"),
        "{}",
        idx.text()
    );
    assert_eq!(http_get(admin, "/nope").status, 404);

    let _ = close_and_drain(&mut s);
    // Gone from /sessions once closed.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let v = http_get(admin, "/sessions").json();
            !v.as_array()
                .unwrap()
                .iter()
                .any(|x| x["client"] == client.to_string())
        }),
        "closed session still listed"
    );
    let _ = stop_gateway(&mut gw, Duration::from_secs(20));
}

#[test]
fn admin_readyz_turns_503_while_draining() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-admin"), Backend::echo());
    let (mut gw, aport) = admin_gateway(&pki, &dir, &backend, "60s", loopback_admin);
    let admin = SocketAddr::from(([127, 0, 0, 1], aport));
    assert_eq!(
        wait_http(admin, "/readyz", Duration::from_secs(10)).status,
        200
    );

    // Hold one connection open so the drain lasts.
    let mut s = connect_tls(gw.addr(), &pki, Tls::V13);
    let (got, _) = echo_roundtrip(&mut s, b"hold", &PumpOpts::default());
    assert_eq!(got, b"hold");

    gw.sigterm();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    while Instant::now() < deadline {
        match http_request(admin, "GET", "/readyz", &[], b"") {
            Ok(r) if r.status == 503 => {
                last = Some(503);
                break;
            }
            Ok(r) => last = Some(r.status),
            Err(e) => panic!("admin API gone while draining: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last, Some(503), "/readyz while draining");
    assert!(
        gw.is_running(),
        "gateway exited although a connection is open"
    );
    // Liveness is not readiness: a draining gateway is alive (a liveness
    // probe failing here would get it killed mid-drain).  Checked at the end
    // so the rest of the drain is verified too.
    // Sampled for one second (workers with nothing left to drain may
    // stop meanwhile): every answer must be 200.
    let mut healthz_draining = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        healthz_draining.push(http_get(admin, "/healthz").status);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The held connection still works, then the gateway exits.
    let (got, out) = echo_roundtrip(&mut s, b"still here", &PumpOpts::default());
    assert!(out.error.is_none() && got == b"still here", "{out:?}");
    let _ = close_and_drain(&mut s);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit after its last connection closed");
    assert!(status.success(), "{status}");
    assert!(
        healthz_draining.iter().all(|&c| c == 200),
        "/healthz while draining (one connection still served): {healthz_draining:?}; log:\n{}",
        gw.log()
    );
}

fn run_gateway_expect_failure(config: &Path) -> String {
    let out = run_with_timeout(
        Command::new(gateway_bin()).arg("--config").arg(config),
        None,
        false,
        Duration::from_secs(15),
    );
    assert!(
        !out.status.success(),
        "the gateway started (exit {}) but should have refused",
        out.status
    );
    out.stderr_str()
}

fn write_plain_config(pki: &Pki, dir: &TempDir, name: &str, admin: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
[admin]
{admin}

[[listener]]
listen = "127.0.0.1:{}"
cert = {}
key = {}
backend = "127.0.0.1:9"
"#,
            free_port(),
            toml_str(&pki.chain),
            toml_str(&pki.key)
        ),
    )
    .unwrap();
    path
}

#[test]
fn admin_non_loopback_requires_a_token_file() {
    let (pki, dir) = (Pki::new(), TempDir::new("gw-admin"));
    let p = write_plain_config(
        &pki,
        &dir,
        "open.toml",
        &format!("listen = \"0.0.0.0:{}\"", free_port()),
    );
    let err = run_gateway_expect_failure(&p);
    assert!(
        err.contains("mcp-tls-gateway: error:") && err.contains("token"),
        "the refusal must mention the token: {err}"
    );

    // A token shorter than 16 characters is refused too, naming the file.
    let short = dir.join("short.token");
    std::fs::write(&short, "tooshort\n").unwrap();
    let p = write_plain_config(
        &pki,
        &dir,
        "short.toml",
        &format!(
            "listen = \"0.0.0.0:{}\"\ntoken_file = {}",
            free_port(),
            toml_str(&short)
        ),
    );
    let err = run_gateway_expect_failure(&p);
    assert!(
        err.contains("short.token"),
        "error must name the token file: {err}"
    );
}

/// This host's first non-loopback IPv4 address; creates a dummy interface
/// with 10.213.0.1 if there is none (removed on drop).
struct HostAddr {
    ip: Ipv4Addr,
    dummy: bool,
}

impl HostAddr {
    fn find() -> HostAddr {
        let out = Command::new("ip")
            .args(["-o", "-4", "addr", "show", "scope", "global"])
            .output()
            .expect("run `ip` (iproute2 is required by this test)");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let mut it = line.split_whitespace();
            while let Some(w) = it.next() {
                if w == "inet" {
                    if let Some(ip) = it
                        .next()
                        .and_then(|a| a.split('/').next())
                        .and_then(|a| a.parse::<Ipv4Addr>().ok())
                    {
                        if !ip.is_loopback() {
                            return HostAddr { ip, dummy: false };
                        }
                    }
                }
            }
        }
        for args in [
            &["link", "add", "gwtest0", "type", "dummy"][..],
            &["addr", "add", "10.213.0.1/32", "dev", "gwtest0"],
            &["link", "set", "gwtest0", "up"],
        ] {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(
                st.success(),
                "ip {args:?} failed (root needed to add a test address)"
            );
        }
        HostAddr {
            ip: Ipv4Addr::new(10, 213, 0, 1),
            dummy: true,
        }
    }
}

impl Drop for HostAddr {
    fn drop(&mut self) {
        if self.dummy {
            let _ = Command::new("ip").args(["link", "del", "gwtest0"]).status();
        }
    }
}

#[test]
fn admin_token_is_required_off_loopback() {
    let host = HostAddr::find();
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-admin"), Backend::echo());
    let token = "s3cr3t-token-0123456789abcdef";
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let tf = toml_str(&token_file);
    let (mut gw, aport) = admin_gateway(&pki, &dir, &backend, "5s", |p| {
        format!("listen = \"0.0.0.0:{p}\"\ntoken_file = {tf}")
    });
    let remote = SocketAddr::new(IpAddr::V4(host.ip), aport);
    let local = SocketAddr::from(([127, 0, 0, 1], aport));
    let probe = wait_http(remote, "/healthz", Duration::from_secs(10));
    assert_eq!(probe.status, 200, "/healthz needs no token: {probe:?}");
    assert_eq!(
        http_get(remote, "/readyz").status,
        200,
        "/readyz needs no token"
    );

    let get = |addr: SocketAddr, path: &str, auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        http_request(addr, "GET", path, &h, b"")
            .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
    };
    for path in ["/metrics", "/sessions", "/certs", "/"] {
        let r = get(remote, path, None);
        assert_eq!(
            r.status, 401,
            "{path} from {} without a token: {r:?}",
            host.ip
        );
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "401 without WWW-Authenticate: Bearer: {r:?}"
        );
        let r = get(remote, path, Some("Bearer wrong-token-0123456789abcdef"));
        assert_eq!(r.status, 401, "{path} with a wrong token: {r:?}");
        let r = get(remote, path, Some(&format!("Bearer {token}")));
        assert_eq!(r.status, 200, "{path} with the token: {r:?}");
    }
    let r = get(remote, "/metrics", Some(&format!("Bearer {token}")));
    assert!(
        r.text().contains("mcp_gateway_handshakes_total"),
        "{}",
        r.text()
    );
    // With a token configured, loopback needs it too.
    assert_eq!(get(local, "/metrics", None).status, 401);
    assert_eq!(
        get(local, "/metrics", Some(&format!("Bearer {token}"))).status,
        200
    );
    let _ = stop_gateway(&mut gw, Duration::from_secs(20));
}

#[test]
fn admin_unix_socket_is_private_and_serves() {
    let (pki, dir, backend) = (Pki::new(), TempDir::new("gw-admin"), Backend::echo());
    let sock = dir.join("admin.sock");
    let sp = sock.display().to_string();
    let (mut gw, _) = admin_gateway(&pki, &dir, &backend, "5s", |_| {
        format!("listen = \"unix:{sp}\"")
    });
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "admin socket {} not created",
        sock.display()
    );
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket",
        sock.display()
    );
    assert_eq!(
        md.permissions().mode() & 0o777,
        0o600,
        "admin socket mode {:o}",
        md.permissions().mode() & 0o777
    );

    let req = |path: &str| {
        let s = UnixStream::connect(&sock).expect("connect admin socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        http_on(s, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };
    let mut s = connect_tls(gw.addr(), &pki, Tls::V12);
    let (got, _) = echo_roundtrip(&mut s, b"unix", &PumpOpts::default());
    assert_eq!(got, b"unix");
    assert_eq!(req("/healthz").status, 200);
    let m = req("/metrics");
    assert_eq!(m.status, 200, "{m:?}");
    assert!(
        prom_value(&m.text(), "mcp_gateway_handshakes_total").is_some_and(|v| v >= 1.0),
        "{}",
        m.text()
    );
    let sessions = req("/sessions").json();
    assert_eq!(
        sessions.as_array().map(|a| a.len()),
        Some(1),
        "{sessions:#}"
    );
    assert_eq!(sessions[0]["tls_version"], "TLSv1.2");
    let _ = close_and_drain(&mut s);

    let _ = stop_gateway(&mut gw, Duration::from_secs(20));
    assert!(!sock.exists(), "admin socket left behind after exit");
}
