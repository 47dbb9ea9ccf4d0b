//! End-to-end tests of the admin API over real sockets, with a fake backend
//! and a raw HTTP/1.1 client.

use super::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Default)]
struct Fake {
    unhealthy: AtomicBool,
    unready: AtomicBool,
    sessions: Mutex<Value>,
    puts: Mutex<Vec<(String, Vec<u8>)>>,
}

impl AdminBackend for Fake {
    fn metrics_text(&self) -> String {
        "# TYPE gw_up gauge\ngw_up 1\n".into()
    }
    fn sessions(&self) -> Value {
        self.sessions.lock().unwrap().clone()
    }
    fn certs(&self) -> Value {
        json!([{"name": "default", "not_after": "2030-01-01T00:00:00Z"}])
    }
    fn put_cert(&self, name: &str, pem: &[u8]) -> Result<Value, PutCertError> {
        if name != "default" {
            return Err(PutCertError::UnknownName(name.into()));
        }
        if !pem.starts_with(b"-----BEGIN") {
            return Err(PutCertError::Invalid("no PEM block".into()));
        }
        self.puts.lock().unwrap().push((name.into(), pem.to_vec()));
        Ok(json!({"name": name, "bytes": pem.len()}))
    }
    fn healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }
    fn ready(&self) -> bool {
        !self.unready.load(Ordering::Relaxed)
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("no header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn exchange<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> Reply {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{extra}");
    if !body.is_empty() || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse(&out)
}

fn tcp(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn req(h: &AdminHandle, method: &str, path: &str, extra: &str, body: &[u8]) -> Reply {
    exchange(tcp(h.local_addr().unwrap()), method, path, extra, body)
}

fn start(token: Option<&str>) -> (AdminHandle, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    *fake.sessions.lock().unwrap() = json!([{"id": 1, "sni": "a.example"}]);
    let h = spawn(
        AdminConfig {
            listen: AdminListen::Tcp("127.0.0.1:0".parse().unwrap()),
            token: token.map(str::to_owned),
        },
        fake.clone(),
    )
    .unwrap();
    (h, fake)
}

fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "gw-admin-{}-{}-{tag}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

#[test]
fn get_routes_answer_with_their_types() {
    let (h, fake) = start(None);
    let r = req(&h, "GET", "/metrics", "", b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.body, "# TYPE gw_up gauge\ngw_up 1\n");

    let r = req(&h, "GET", "/sessions", "", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!([{"id": 1, "sni": "a.example"}]));

    let r = req(&h, "GET", "/certs", "", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["name"], "default");

    let r = req(&h, "GET", "/", "", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(r.body.contains("<td>a.example</td>"), "{}", r.body);
    assert!(r.body.contains("2030-01-01T00:00:00Z"));

    let r = req(&h, "GET", "/nope", "", b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());

    let r = req(&h, "POST", "/metrics", "", b"x");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = req(&h, "GET", "/certs/default", "", b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("PUT"));
    drop(fake);
    h.shutdown();
}

#[test]
fn health_and_readiness_follow_the_backend() {
    let (h, fake) = start(None);
    let r = req(&h, "GET", "/healthz", "", b"");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = req(&h, "GET", "/readyz", "", b"");
    assert_eq!(r.status, 200);
    fake.unhealthy.store(true, Ordering::Relaxed);
    fake.unready.store(true, Ordering::Relaxed);
    assert_eq!(req(&h, "GET", "/healthz", "", b"").status, 503);
    assert_eq!(req(&h, "GET", "/readyz", "", b"").status, 503);
    h.shutdown();
}

#[test]
fn put_cert_statuses() {
    let (h, fake) = start(None);
    let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let r = req(&h, "PUT", "/certs/default", "", pem);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"name": "default", "bytes": pem.len()}));
    assert_eq!(
        fake.puts.lock().unwrap().as_slice(),
        &[("default".to_owned(), pem.to_vec())]
    );

    let r = req(&h, "PUT", "/certs/other", "", pem);
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("other"));

    let r = req(&h, "PUT", "/certs/default", "", b"garbage");
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("no PEM block"));

    let r = req(&h, "PUT", "/certs", "", pem);
    assert_eq!(r.status, 405);
    assert_eq!(fake.puts.lock().unwrap().len(), 1);
    h.shutdown();
}

#[test]
fn oversize_put_is_refused_with_413() {
    let (h, fake) = start(None);
    // Declared length over the limit: refused before reading the body.
    let mut s = tcp(h.local_addr().unwrap());
    let head = format!(
        "PUT /certs/default HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        routes::MAX_CERT_BODY + 1
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(parse(&out).status, 413);
    assert!(fake.puts.lock().unwrap().is_empty());
    h.shutdown();
}

#[test]
fn token_is_required_except_on_probes() {
    let (h, _fake) = start(Some("s3cret"));
    let r = req(&h, "GET", "/metrics", "", b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = req(
        &h,
        "GET",
        "/sessions",
        "Authorization: Bearer wrong\r\n",
        b"",
    );
    assert_eq!(r.status, 401);
    let r = req(&h, "GET", "/nope", "", b"");
    assert_eq!(
        r.status, 401,
        "unknown paths are not revealed without a token"
    );
    let r = req(
        &h,
        "GET",
        "/metrics",
        "Authorization: Bearer s3cret\r\n",
        b"",
    );
    assert_eq!(r.status, 200);
    let r = req(&h, "GET", "/", "Authorization: Bearer s3cret\r\n", b"");
    assert_eq!(r.status, 200);
    assert_eq!(req(&h, "GET", "/healthz", "", b"").status, 200);
    assert_eq!(req(&h, "GET", "/readyz", "", b"").status, 200);
    h.shutdown();
}

#[test]
fn spawn_refuses_unsafe_settings() {
    let fake: Arc<dyn AdminBackend> = Arc::new(Fake::default());
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let e = spawn(
        AdminConfig {
            listen: AdminListen::Tcp(any),
            token: None,
        },
        fake.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, AdminError::TokenRequired { .. }), "{e}");
    assert!(e.to_string().contains("admin.token"));

    let e = spawn(
        AdminConfig {
            listen: AdminListen::Tcp("127.0.0.1:0".parse().unwrap()),
            token: Some(String::new()),
        },
        fake.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, AdminError::EmptyToken), "{e}");

    // With a token, a wildcard address is accepted.
    let h = spawn(
        AdminConfig {
            listen: AdminListen::Tcp(any),
            token: Some("t".into()),
        },
        fake,
    )
    .unwrap();
    assert_ne!(h.local_addr().unwrap().port(), 0);
    h.shutdown();
}

#[test]
fn unix_socket_is_private_and_replaces_a_stale_one() {
    let path = temp_path("unix");
    // A stale socket left by a previous run.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let fake = Arc::new(Fake::default());
    *fake.sessions.lock().unwrap() = json!([]);
    let cfg = AdminConfig {
        listen: AdminListen::Unix(path.clone()),
        token: None,
    };
    let h = spawn(cfg.clone(), fake.clone()).unwrap();
    assert_eq!(h.local_addr(), None);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = exchange(s, "GET", "/sessions", "", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([]));

    // A live socket is not taken over.
    let e = spawn(cfg, fake).unwrap_err();
    assert!(matches!(e, AdminError::InUse { .. }), "{e}");

    h.shutdown();
    assert!(!path.exists(), "socket removed at shutdown");
}

#[test]
fn unix_socket_path_holding_a_regular_file_is_refused() {
    let path = temp_path("file");
    std::fs::write(&path, b"keep me").unwrap();
    let e = spawn(
        AdminConfig {
            listen: AdminListen::Unix(path.clone()),
            token: None,
        },
        Arc::new(Fake::default()),
    )
    .unwrap_err();
    assert!(matches!(e, AdminError::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn index_page_escapes_session_fields() {
    let (h, fake) = start(None);
    *fake.sessions.lock().unwrap() = json!([{"sni": "<script>alert(1)</script>"}]);
    let r = req(&h, "GET", "/", "", b"");
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("<script>"), "{}", r.body);
    assert!(r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(r.header("content-security-policy").is_some());
    h.shutdown();
}

#[test]
fn shutdown_stops_accepting_and_slow_clients_do_not_block_others() {
    let (h, _fake) = start(None);
    let addr = h.local_addr().unwrap();
    // A client that sends half a request and stalls.
    let mut slow = tcp(addr);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
    assert_eq!(req(&h, "GET", "/healthz", "", b"").status, 200);
    let t = std::time::Instant::now();
    h.shutdown();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(std::net::TcpStream::connect(addr).is_err());
    drop(slow);
}
