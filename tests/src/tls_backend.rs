//! Backends and helpers for the issue-#4 tests (upstream TLS, mTLS, audit,
//! PROXY v2, admin API, tickets):
//!
//! * [`TestBackend`]: a std-thread echo backend, plain or TLS (rustls
//!   `ServerConfig` from a leaf/key PEM pair, optionally requiring or
//!   accepting client certificates), optionally parsing a PROXY v2 header
//!   first (with `gw_lib::proxy_v2::parse`).  Every connection leaves a
//!   [`ConnRecord`]: the PROXY header, the raw bytes seen on the socket, the
//!   handshake outcome, the client certificate and what was received.
//! * Config-file gateways: [`start_config`], [`stop_gateway`],
//!   [`stopped_counter`].
//! * A tiny HTTP/1.1 client for the admin API: [`http_request`].
//! * rustls client configs with explicit suites / client certificates:
//!   [`ClientOpts`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::gateway::Gateway;
use crate::util::TempDir;

/// Socket timeout of every backend connection.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on how long an accept loop runs.
const ACCEPT_LIFETIME: Duration = Duration::from_secs(600);
/// How many raw / plaintext bytes a record keeps (the rest is only hashed).
pub const KEEP_BYTES: usize = 256 * 1024;

/// The aws-lc-rs provider, as an `Arc`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!v.is_empty(), "{}: no certificate", path.display());
    v
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// TLS settings of a [`TestBackend`].
#[derive(Clone, Debug)]
pub struct BackendTls {
    /// PEM chain (leaf first) the backend serves.
    pub chain: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// Verify client certificates against this PEM CA bundle.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a certificate.
    pub client_cert_required: bool,
}

impl BackendTls {
    pub fn new(chain: &Path, key: &Path) -> BackendTls {
        BackendTls {
            chain: chain.to_owned(),
            key: key.to_owned(),
            client_ca: None,
            client_cert_required: false,
        }
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca) {
                    roots.add(c).expect("client CA");
                }
                let mut v =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                if !self.client_cert_required {
                    v = v.allow_unauthenticated();
                }
                builder.with_client_cert_verifier(v.build().expect("client verifier"))
            }
        };
        let cfg = builder
            .with_single_cert(load_certs(&self.chain), load_key(&self.key))
            .expect("backend server cert");
        Arc::new(cfg)
    }
}

/// What one backend connection observed.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    /// Peer address of the TCP connection (the gateway's side).
    pub peer: Option<SocketAddr>,
    /// The PROXY v2 header (only when the backend expects one).
    pub proxy: Option<Result<gw_lib::proxy_v2::Parsed, String>>,
    /// The first [`KEEP_BYTES`] raw bytes read from the socket after the
    /// PROXY header (TLS records for a TLS backend).
    pub raw: Vec<u8>,
    /// TLS backends: the handshake outcome (`Err` = rustls error text).
    pub handshake: Option<Result<(), String>>,
    /// The SNI the client (the gateway) sent.
    pub sni: Option<String>,
    /// DER of the client certificate chain's leaf, if one was presented.
    pub client_cert: Option<Vec<u8>>,
    /// Plaintext bytes received (and echoed).
    pub received_len: u64,
    pub received_sha256: [u8; 32],
    /// The first [`KEEP_BYTES`] plaintext bytes received.
    pub received_head: Vec<u8>,
    /// Ended by a clean EOF (TCP FIN, or close_notify for TLS).
    pub saw_eof: bool,
    /// Errors and notes.
    pub note: String,
}

/// A socket wrapper that keeps a copy of the first bytes read.
struct Recording {
    sock: TcpStream,
    raw: Vec<u8>,
}

impl Read for Recording {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        let room = KEEP_BYTES.saturating_sub(self.raw.len()).min(n);
        self.raw.extend_from_slice(&buf[..room]);
        Ok(n)
    }
}

impl Write for Recording {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// A running echo backend (plain or TLS, with or without PROXY v2).
/// Dropping it stops the accept loop.
pub struct TestBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    records: Arc<Mutex<Vec<ConnRecord>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TestBackend {
    /// TLS echo backend.
    pub fn tls_echo(tls: BackendTls) -> TestBackend {
        TestBackend::start(Some(tls), false)
    }

    /// Plain echo backend that expects a PROXY v2 header first.
    pub fn proxy_v2_echo() -> TestBackend {
        TestBackend::start(None, true)
    }

    /// General form: `tls = None` is a plain echo backend.
    pub fn start(tls: Option<BackendTls>, proxy_v2: bool) -> TestBackend {
        let server_config = tls.map(|t| t.server_config());
        let l = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, r2, s2) = (
            Arc::clone(&connections),
            Arc::clone(&records),
            Arc::clone(&stop),
        );
        let accept_thread = thread::Builder::new()
            .name("tls-backend-accept".into())
            .spawn(move || {
                let started = Instant::now();
                while !s2.load(Ordering::SeqCst) && started.elapsed() < ACCEPT_LIFETIME {
                    match l.accept() {
                        Ok((s, peer)) => {
                            c2.fetch_add(1, Ordering::SeqCst);
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_nodelay(true);
                            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                            let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                            let (cfg, recs) = (server_config.clone(), Arc::clone(&r2));
                            let spawned = thread::Builder::new()
                                .name("tls-backend-conn".into())
                                .spawn(move || {
                                    let rec = handle(s, peer, cfg, proxy_v2);
                                    recs.lock().unwrap().push(rec);
                                });
                            if let Err(e) = spawned {
                                eprintln!("tls backend: cannot spawn: {e}");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            eprintln!("tls backend accept error: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .expect("spawn accept thread");
        TestBackend {
            addr,
            connections,
            records,
            stop,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Records of the connections that ended so far.
    pub fn records(&self) -> Vec<ConnRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Wait (bounded) until `n` connections have ended; returns the records.
    pub fn wait_records(&self, n: usize, timeout: Duration) -> Vec<ConnRecord> {
        let ok = crate::util::wait_until(timeout, || self.records.lock().unwrap().len() >= n);
        let recs = self.records();
        assert!(
            ok,
            "backend: expected {n} finished connections within {timeout:?}, have {} ({} accepted): {recs:#?}",
            recs.len(),
            self.connections()
        );
        recs
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a PROXY v2 header (exactly its bytes) from `s`.
fn read_proxy_header(s: &mut TcpStream) -> Result<gw_lib::proxy_v2::Parsed, String> {
    let mut hdr = vec![0u8; gw_lib::proxy_v2::FIXED_LEN];
    s.read_exact(&mut hdr)
        .map_err(|e| format!("reading the PROXY v2 fixed part: {e}"))?;
    if hdr[..12] != gw_lib::proxy_v2::SIGNATURE {
        return Err(format!("no PROXY v2 signature; first bytes {hdr:02x?}"));
    }
    let len = u16::from_be_bytes([hdr[14], hdr[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest)
        .map_err(|e| format!("reading {len} PROXY v2 header bytes: {e}"))?;
    hdr.extend_from_slice(&rest);
    match gw_lib::proxy_v2::parse(&hdr) {
        Ok((p, used)) if used == hdr.len() => Ok(p),
        Ok((_, used)) => Err(format!("parse used {used} of {} header bytes", hdr.len())),
        Err(e) => Err(format!("parse: {e}")),
    }
}

fn handle(
    mut s: TcpStream,
    peer: SocketAddr,
    cfg: Option<Arc<ServerConfig>>,
    proxy_v2: bool,
) -> ConnRecord {
    let mut rec = ConnRecord {
        peer: Some(peer),
        ..Default::default()
    };
    if proxy_v2 {
        let p = read_proxy_header(&mut s);
        let bad = p.is_err();
        rec.proxy = Some(p);
        if bad {
            return rec;
        }
    }
    let mut hasher = Sha256::new();
    let sock = Recording {
        sock: s,
        raw: Vec::new(),
    };
    match cfg {
        None => {
            let mut sock = sock;
            echo(&mut sock, &mut rec, &mut hasher);
            let _ = sock.sock.shutdown(Shutdown::Write);
            drain_until_eof(&mut sock.sock);
            rec.raw = std::mem::take(&mut sock.raw);
        }
        Some(cfg) => {
            let conn = match ServerConnection::new(cfg) {
                Ok(c) => c,
                Err(e) => {
                    rec.note = format!("ServerConnection::new: {e}");
                    return rec;
                }
            };
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let deadline = Instant::now() + IO_TIMEOUT;
            let mut hs = Ok(());
            while tls.conn.is_handshaking() {
                if Instant::now() >= deadline {
                    hs = Err("handshake deadline".to_string());
                    break;
                }
                match tls.conn.complete_io(&mut tls.sock) {
                    Ok((0, 0)) if tls.conn.is_handshaking() => {
                        hs = Err("peer closed during the handshake".to_string());
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        hs = Err(e.to_string());
                        break;
                    }
                }
            }
            rec.sni = tls.conn.server_name().map(str::to_owned);
            rec.client_cert = tls
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let ok = hs.is_ok();
            rec.handshake = Some(hs);
            if ok {
                echo(&mut tls, &mut rec, &mut hasher);
                tls.conn.send_close_notify();
                let _ = tls.flush();
                while tls.conn.wants_write() {
                    if tls.conn.write_tls(&mut tls.sock).is_err() {
                        break;
                    }
                }
                let _ = tls.sock.sock.shutdown(Shutdown::Write);
                drain_until_eof(&mut tls.sock.sock);
            }
            rec.raw = std::mem::take(&mut tls.sock.raw);
        }
    }
    rec.received_sha256 = hasher.finalize().into();
    rec
}

fn echo(s: &mut dyn ReadWrite, rec: &mut ConnRecord, hasher: &mut Sha256) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                rec.saw_eof = true;
                return;
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                rec.received_len += n as u64;
                let room = KEEP_BYTES.saturating_sub(rec.received_head.len()).min(n);
                rec.received_head.extend_from_slice(&buf[..room]);
                if let Err(e) = s.write_all(&buf[..n]).and_then(|_| s.flush()) {
                    rec.note = format!("echo write: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                rec.note = format!("read: {:?}: {e}", e.kind());
                return;
            }
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn drain_until_eof(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Config-file gateways

/// Start the gateway with a TOML config built for a free listener port:
/// `make(port)` returns the file's text; it is written into `dir` and the
/// gateway is started with `--config FILE` plus `extra` flags.  Retries with
/// a new port on a bind race (so `make` may be called more than once: pick
/// other free ports inside it).
pub fn start_config(dir: &TempDir, extra: &[&str], mut make: impl FnMut(u16) -> String) -> Gateway {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let dir = dir.path().to_owned();
    Gateway::start_with(move |port| {
        let path = dir.join(format!("gateway-{port}.toml"));
        std::fs::write(&path, make(port)).expect("write config");
        let mut v = vec!["--config".to_string(), path.display().to_string()];
        v.extend(extra.iter().cloned());
        v
    })
}

/// A TOML basic string for a path.
pub fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// SIGTERM, wait (bounded) for exit 0, return the full log.
pub fn stop_gateway(gw: &mut Gateway, timeout: Duration) -> String {
    gw.sigterm();
    let status = gw
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("gateway did not exit within {timeout:?} after SIGTERM"));
    let log = gw.log();
    assert!(
        status.success(),
        "gateway exit status {status}; log:\n{log}"
    );
    log
}

/// `name=<u64>` from the "stopped" log line's counters, if present.
pub fn stopped_counter(log: &str, name: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped") && l.contains("counters="))?;
    let start = line.find("counters=")? + "counters=".len();
    let rest = line[start..].trim_start_matches('"');
    for tok in rest.split(|c: char| c.is_whitespace() || c == '"') {
        if let Some(v) = tok.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return v.parse().ok();
        }
    }
    None
}

/// The value of a Prometheus sample line `name{labels} value` (exact
/// `series` match, e.g. `mcp_gateway_handshakes_total` or
/// `mcp_gateway_connection_failures_total{reason="backend_tls"}`).
pub fn prom_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k.trim() == series).then(|| v.trim().parse().ok())?
    })
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client

/// An HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Raw header block (without the status line), lower-cased names kept as sent.
    pub headers: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// One request with `Connection: close` on any stream; reads to EOF.
pub fn http_on<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, String> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "PUT" || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).map_err(|e| format!("write: {e}"))?;
    s.flush().map_err(|e| format!("flush: {e}"))?;
    let mut raw = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err("response not complete within 20 s".into());
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !raw.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("read: {e} (have {} bytes)", raw.len())),
        }
    }
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut r = HttpResponse {
        status,
        headers: headers.replace("\r\n", "\n"),
        body: Vec::new(),
    };
    let body = &raw[end + 4..];
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut rest = body;
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunk size")?;
            let size_txt = String::from_utf8_lossy(&rest[..nl]);
            let size = usize::from_str_radix(size_txt.split(';').next().unwrap().trim(), 16)
                .map_err(|e| format!("chunk size {size_txt:?}: {e}"))?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err("truncated chunk".into());
            }
            r.body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else if let Some(len) = r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if body.len() < len {
            return Err(format!("body truncated: {} of {len} bytes", body.len()));
        }
        r.body = body[..len].to_vec();
    } else {
        r.body = body.to_vec();
    }
    Ok(r)
}

/// One request over TCP to `addr`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    http_on(s, method, path, headers, body)
}

/// `GET path` over TCP; panics on transport errors.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], b"")
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// Poll `GET path` until it answers (any status), bounded.
pub fn wait_http(addr: SocketAddr, path: &str, timeout: Duration) -> HttpResponse {
    let deadline = Instant::now() + timeout;
    loop {
        match http_request(addr, "GET", path, &[], b"") {
            Ok(r) => return r,
            Err(e) if Instant::now() >= deadline => {
                panic!("GET {path} on {addr} did not answer within {timeout:?}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// Client configs

/// How to build a rustls client config.
#[derive(Clone, Default)]
pub struct ClientOpts {
    /// Trusted roots (DER).
    pub roots: Vec<CertificateDer<'static>>,
    /// Restrict the offered cipher suites (None = provider defaults).
    pub suites: Option<Vec<SupportedCipherSuite>>,
    /// Only TLS 1.3 (otherwise 1.3 and 1.2).
    pub tls13_only: bool,
    /// Only TLS 1.2.
    pub tls12_only: bool,
    /// Client certificate chain and key.
    pub client_cert: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    pub alpn: Vec<Vec<u8>>,
    /// Session store (None = rustls default in-memory store).
    pub session_store: Option<Arc<dyn rustls::client::ClientSessionStore>>,
}

impl ClientOpts {
    pub fn trusting(ca: &CertificateDer<'static>) -> ClientOpts {
        ClientOpts {
            roots: vec![ca.clone()],
            ..Default::default()
        }
    }

    pub fn build(&self) -> Arc<ClientConfig> {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        if let Some(s) = &self.suites {
            p.cipher_suites = s.clone();
        }
        let mut roots = RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone()).expect("root");
        }
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let b = ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots);
        let mut cfg = match &self.client_cert {
            None => b.with_no_client_auth(),
            Some((chain, key)) => b
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .expect("client cert"),
        };
        cfg.alpn_protocols = self.alpn.clone();
        if let Some(store) = &self.session_store {
            cfg.resumption = rustls::client::Resumption::store(Arc::clone(store));
        }
        Arc::new(cfg)
    }
}

/// The rustls suite with this name (e.g. "TLS13_AES_128_GCM_SHA256").
pub fn suite(name: &str) -> SupportedCipherSuite {
    rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        .find(|s| format!("{:?}", s.suite()) == name)
        .unwrap_or_else(|| panic!("no cipher suite named {name}"))
}
