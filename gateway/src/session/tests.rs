//! Drives [`Session`] with an in-memory rustls client and an in-memory
//! backend: no sockets, no io_uring.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;
use crate::session::Dir;

struct Pki {
    server: Arc<rustls::ServerConfig>,
    roots: RootCertStore,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    Pki {
        server: Arc::new(server),
        roots,
    }
}

fn config(pki: &Pki) -> SessionConfig {
    SessionConfig {
        tls: pki.server.clone(),
        public_addr: "127.0.0.1:8443".into(),
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(600),
        backend_connect_timeout: Duration::from_secs(5),
        ktls: None,
        upstream: None,
        expected_suites: None,
    }
}

fn client(pki: &Pki, version: &'static rustls::SupportedProtocolVersion) -> ClientConnection {
    let cfg = ClientConfig::builder_with_protocol_versions(&[version])
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    let mut c =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    c.set_buffer_limit(None);
    c
}

/// The fake world around a session: a client's TCP stream and a backend.
struct World {
    s: Session,
    now: Instant,
    pending: Vec<Io>,
    /// Bytes on the wire client → gateway, not yet received.
    c2g: Vec<u8>,
    c_fin: bool,
    /// Bytes on the wire gateway → client.
    g2c: Vec<u8>,
    g_fin_to_client: bool,
    /// What the backend received, and whether it saw EOF.
    backend_got: Vec<u8>,
    backend_eof: bool,
    /// What the backend will still send, and whether it then closes.
    backend_out: Vec<u8>,
    backend_close: bool,
    backend_refuses: bool,
    backend_reads: bool,
    connects: usize,
    /// Plaintext the client has read so far.
    client_plain: Vec<u8>,
    /// Simulated kernel TLS: after `Io::Offload`, `c2g`/`g2c` carry
    /// plaintext (the kernel's job is assumed done).
    offloaded: bool,
    pipe_up: Vec<u8>,
    pipe_down: Vec<u8>,
    /// A non-data record waits at the head of the client stream; what
    /// reading it yields.
    control: Option<ControlEvent>,
    close_notify_sent: bool,
    /// Double TLS: the backend leg was offloaded too; a non-data record
    /// waits at the head of the backend stream.
    backend_offloaded: bool,
    backend_control: Option<ControlEvent>,
    /// TLS records already on the wire to the client when the offload
    /// happened (the client still reads them as records).
    g2c_tls_tail: Vec<u8>,
    /// Backend connects complete only while this is set.
    connect_ready: bool,
    /// Sends to the client complete only while this is set.
    client_accepts: bool,
}

impl World {
    fn new(cfg: SessionConfig) -> Self {
        let now = Instant::now();
        Self {
            s: Session::new(cfg, now),
            now,
            pending: Vec::new(),
            c2g: Vec::new(),
            c_fin: false,
            g2c: Vec::new(),
            g_fin_to_client: false,
            backend_got: Vec::new(),
            backend_eof: false,
            backend_out: Vec::new(),
            backend_close: false,
            backend_refuses: false,
            backend_reads: true,
            connects: 0,
            client_plain: Vec::new(),
            offloaded: false,
            pipe_up: Vec::new(),
            pipe_down: Vec::new(),
            control: None,
            close_notify_sent: false,
            backend_offloaded: false,
            backend_control: None,
            g2c_tls_tail: Vec::new(),
            connect_ready: true,
            client_accepts: true,
        }
    }

    /// Runs operations until nothing can make progress.
    fn run(&mut self) {
        for _ in 0..100_000 {
            while let Some(io) = self.s.poll_io() {
                self.pending.push(io);
            }
            let mut progressed = false;
            let pending = std::mem::take(&mut self.pending);
            for io in pending {
                if io == Io::ClientControl {
                    let ev = self.control.take().unwrap_or(ControlEvent::WouldBlock);
                    self.s.on_control(ev, self.now);
                    progressed = true;
                    continue;
                }
                if io == Io::BackendControl {
                    let ev = self
                        .backend_control
                        .take()
                        .unwrap_or(ControlEvent::WouldBlock);
                    if let ControlEvent::Data(n) = ev {
                        let data: Vec<u8> = self.backend_out.drain(..n).collect();
                        self.s.backend_control_buf()[..n].copy_from_slice(&data);
                    }
                    self.s.on_backend_control(ev, self.now);
                    progressed = true;
                    continue;
                }
                match self.try_complete(io) {
                    Some(res) => {
                        self.s.complete(io.kind(), res, self.now);
                        progressed = true;
                    }
                    None => self.pending.push(io),
                }
            }
            if !progressed {
                return;
            }
        }
        panic!("session did not settle");
    }

    fn try_complete(&mut self, io: Io) -> Option<i32> {
        match io {
            Io::ClientRecv { ptr, len } => {
                if !self.c2g.is_empty() {
                    let n = len.min(self.c2g.len());
                    // SAFETY: the session guarantees `ptr..ptr+len` is
                    // writable and unused until completion.
                    unsafe { std::ptr::copy_nonoverlapping(self.c2g.as_ptr(), ptr, n) };
                    self.c2g.drain(..n);
                    Some(n as i32)
                } else if self.c_fin {
                    Some(0)
                } else {
                    None
                }
            }
            Io::ClientSend { ptr, len } => {
                if !self.client_accepts {
                    return None;
                }
                // SAFETY: the session guarantees `ptr..ptr+len` is readable.
                let data = unsafe { std::slice::from_raw_parts(ptr, len) };
                self.g2c.extend_from_slice(data);
                Some(len as i32)
            }
            Io::ClientShutdown => {
                self.g_fin_to_client = true;
                Some(0)
            }
            Io::BackendConnect => {
                if !self.connect_ready {
                    return None;
                }
                self.connects += 1;
                Some(if self.backend_refuses {
                    -libc::ECONNREFUSED
                } else {
                    0
                })
            }
            Io::BackendSend { ptr, len } => {
                if !self.backend_reads {
                    return None;
                }
                // SAFETY: as above.
                let data = unsafe { std::slice::from_raw_parts(ptr, len) };
                self.backend_got.extend_from_slice(data);
                Some(len as i32)
            }
            Io::BackendShutdown => {
                self.backend_eof = true;
                Some(0)
            }
            Io::Offload => {
                assert!(self.s.take_tls_for_offload().is_some());
                self.backend_offloaded = self.s.take_backend_tls_for_offload().is_some();
                self.offloaded = true;
                self.g2c_tls_tail = std::mem::take(&mut self.g2c);
                if self.backend_offloaded && !self.backend_out.is_empty() {
                    // What the backend sent after its handshake (TLS 1.3
                    // session tickets) is a control record for the kernel.
                    self.backend_out.clear();
                    self.backend_control = Some(ControlEvent::Handled);
                }
                Some(0)
            }
            Io::ClientPollIn => {
                (!self.c2g.is_empty() || self.c_fin || self.control.is_some()).then_some(1)
            }
            Io::BackendPollIn => (!self.backend_out.is_empty() || self.backend_close).then_some(1),
            Io::ClientPollOut => Some(4),
            Io::BackendPollOut => self.backend_reads.then_some(4),
            Io::SpliceIn { dir: Dir::Up, len } => Some(if self.control.is_some() {
                -libc::EINVAL
            } else {
                move_bytes(&mut self.c2g, &mut self.pipe_up, len, self.c_fin)
            }),
            Io::SpliceIn {
                dir: Dir::Down,
                len,
            } => Some(if self.backend_control.is_some() {
                -libc::EINVAL
            } else {
                move_bytes(
                    &mut self.backend_out,
                    &mut self.pipe_down,
                    len,
                    self.backend_close,
                )
            }),
            Io::SpliceOut { dir: Dir::Up, len } => Some(if self.backend_reads {
                move_bytes(&mut self.pipe_up, &mut self.backend_got, len, false)
            } else {
                -libc::EAGAIN
            }),
            Io::SpliceOut {
                dir: Dir::Down,
                len,
            } => Some(move_bytes(&mut self.pipe_down, &mut self.g2c, len, false)),
            Io::CloseNotify => {
                self.close_notify_sent = true;
                Some(0)
            }
            Io::ClientControl | Io::BackendControl => unreachable!("handled in run"),
            Io::BackendRecv { ptr, len } => {
                if !self.backend_out.is_empty() {
                    let n = len.min(self.backend_out.len());
                    // SAFETY: as above.
                    unsafe { std::ptr::copy_nonoverlapping(self.backend_out.as_ptr(), ptr, n) };
                    self.backend_out.drain(..n);
                    Some(n as i32)
                } else if self.backend_close {
                    Some(0)
                } else {
                    None
                }
            }
        }
    }

    /// Moves bytes between the rustls client and the wire, both ways.
    fn pump_client(&mut self, c: &mut ClientConnection) {
        for _ in 0..1000 {
            if self.offloaded {
                // The wire carries plaintext now (the simulated kernel's
                // records): the rustls client only reads what was sent
                // before the offload.
                if !self.g2c_tls_tail.is_empty() {
                    let mut slice = &self.g2c_tls_tail[..];
                    let n = c.read_tls(&mut slice).unwrap();
                    self.g2c_tls_tail.drain(..n);
                    c.process_new_packets().unwrap();
                    self.client_plain.extend(read_plain(c));
                    continue;
                }
                self.run();
                return;
            }
            let mut moved = false;
            while c.wants_write() {
                c.write_tls(&mut self.c2g).unwrap();
                moved = true;
            }
            self.run();
            if !self.g2c.is_empty() {
                let mut slice = &self.g2c[..];
                let n = c.read_tls(&mut slice).unwrap();
                self.g2c.drain(..n);
                c.process_new_packets().unwrap();
                self.client_plain.extend(read_plain(c));
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Cancels what is left in flight, as the driver does once a session is done.
    fn cancel_all(&mut self) {
        for io in std::mem::take(&mut self.pending) {
            self.s.complete(io.kind(), -libc::ECANCELED, self.now);
        }
    }
}

impl World {
    /// ClientHello, the server's flight, then the client's Finished with
    /// `data` right behind it in one write, before the gateway runs again.
    fn handshake_with_pipelined_data(&mut self, c: &mut ClientConnection, data: &[u8]) {
        while c.wants_write() {
            c.write_tls(&mut self.c2g).unwrap();
        }
        self.run();
        let mut slice = &self.g2c[..];
        let n = c.read_tls(&mut slice).unwrap();
        self.g2c.drain(..n);
        c.process_new_packets().unwrap();
        c.writer().write_all(data).unwrap();
        while c.wants_write() {
            c.write_tls(&mut self.c2g).unwrap();
        }
        self.run();
    }

    /// Everything the client has read so far (taken).
    fn take_plain(&mut self, c: &mut ClientConnection) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.client_plain);
        out.extend(read_plain(c));
        out
    }
}

/// A splice in the fake world: up to `len` bytes from `from` to `to`; 0 at
/// EOF, `-EAGAIN` when nothing is there yet.
fn move_bytes(from: &mut Vec<u8>, to: &mut Vec<u8>, len: usize, eof: bool) -> i32 {
    if from.is_empty() {
        return if eof { 0 } else { -libc::EAGAIN };
    }
    let n = len.min(from.len());
    to.extend(from.drain(..n));
    n as i32
}

fn read_plain(c: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match c.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("client read: {e}"),
        }
    }
    out
}

fn handshake(w: &mut World, c: &mut ClientConnection) {
    w.pump_client(c);
    assert!(!c.is_handshaking(), "client handshake did not finish");
    assert!(w.s.stats().handshake_done);
}

#[test]
fn relays_both_directions_tls13_and_tls12() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let pki = pki();
        let mut w = World::new(config(&pki));
        let mut c = client(&pki, version);
        handshake(&mut w, &mut c);
        assert_eq!(w.connects, 1, "backend connect after the handshake");
        c.writer()
            .write_all(b"POST /mcp HTTP/1.1\r\n\r\nhello")
            .unwrap();
        w.backend_out.extend_from_slice(b"world");
        w.pump_client(&mut c);
        assert_eq!(w.backend_got, b"POST /mcp HTTP/1.1\r\n\r\nhello");
        assert_eq!(w.take_plain(&mut c), b"world");
        let (v, _) = w.s.negotiated().unwrap();
        assert_eq!(v, version.version);
    }
}

#[test]
fn large_random_transfer_is_byte_exact() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    let up: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let down: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    w.backend_out = down.clone();
    let mut got_down = Vec::new();
    for chunk in up.chunks(100_000) {
        c.writer().write_all(chunk).unwrap();
        w.pump_client(&mut c);
        got_down.extend(w.take_plain(&mut c));
    }
    for _ in 0..100 {
        w.pump_client(&mut c);
        got_down.extend(w.take_plain(&mut c));
    }
    assert_eq!(w.backend_got.len(), up.len());
    assert!(w.backend_got == up, "upstream bytes differ");
    assert_eq!(got_down.len(), down.len());
    assert!(got_down == down, "downstream bytes differ");
    assert_eq!(w.s.stats().bytes_up, up.len() as u64);
    assert_eq!(w.s.stats().bytes_down, down.len() as u64);
}

#[test]
fn slow_backend_applies_backpressure() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    w.backend_reads = false;
    let payload = vec![7u8; 4 << 20];
    c.writer().write_all(&payload).unwrap();
    w.pump_client(&mut c);
    let wire_total = w.c2g.len();
    // Everything beyond the session's fixed buffers must still be on the wire.
    let buffered = 4 * 1024 * 1024 + 4 * 1024 * 1024 / 16384 * 22 - wire_total;
    assert!(
        buffered <= TLS_IN_CAP + PLAIN_CAP + 16 * 1024,
        "session took {buffered} bytes while the backend was not reading"
    );
    w.backend_reads = true;
    for _ in 0..200 {
        w.pump_client(&mut c);
    }
    assert_eq!(w.backend_got.len(), payload.len());
}

#[test]
fn plaintext_http_gets_400_and_no_backend() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    w.c2g
        .extend_from_slice(b"GET /mcp HTTP/1.1\r\nHost: gw.example:8443\r\n\r\n");
    w.run();
    let text = String::from_utf8(w.g2c.clone()).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("https://gw.example:8443/mcp"), "{text}");
    assert!(w.g_fin_to_client, "answer is followed by a FIN");
    assert_eq!(w.connects, 0);
    w.c_fin = true;
    w.run();
    assert!(w.s.is_finished());
    assert_eq!(w.s.close_reason(), Some(&CloseReason::PlaintextHttp));
}

#[test]
fn garbage_is_closed_without_answer() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    w.c2g.extend_from_slice(b"\x00\x01\x02garbage");
    w.run();
    w.cancel_all();
    assert!(w.s.is_finished());
    assert!(w.g2c.is_empty());
    assert_eq!(w.connects, 0);
    assert_eq!(w.s.close_reason(), Some(&CloseReason::NotTls));
}

#[test]
fn refused_backend_answers_502_to_http() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    w.backend_refuses = true;
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    c.writer()
        .write_all(b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    w.pump_client(&mut c);
    let text = String::from_utf8(w.take_plain(&mut c)).unwrap();
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text:?}");
    // close_notify followed the answer: the client sees a clean EOF.
    let mut buf = [0u8; 16];
    assert_eq!(c.reader().read(&mut buf).unwrap(), 0);
    w.cancel_all();
    assert!(w.s.is_finished());
    assert!(matches!(
        w.s.close_reason(),
        Some(CloseReason::BackendConnectFailed(_))
    ));
}

#[test]
fn refused_backend_closes_non_http_cleanly() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    w.backend_refuses = true;
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    c.writer().write_all(b"\x01\x02binary").unwrap();
    w.pump_client(&mut c);
    assert!(w.take_plain(&mut c).is_empty());
    let mut buf = [0u8; 16];
    assert_eq!(c.reader().read(&mut buf).unwrap(), 0, "clean close_notify");
}

#[test]
fn half_close_client_first() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    c.writer().write_all(b"request").unwrap();
    c.send_close_notify();
    w.pump_client(&mut c);
    assert_eq!(w.backend_got, b"request");
    assert!(
        w.backend_eof,
        "backend write side shut after the client's close_notify"
    );
    assert!(!w.s.is_finished(), "still waiting for the backend's answer");
    w.backend_out.extend_from_slice(b"answer");
    w.backend_close = true;
    w.pump_client(&mut c);
    assert_eq!(w.take_plain(&mut c), b"answer");
    let mut buf = [0u8; 4];
    assert_eq!(c.reader().read(&mut buf).unwrap(), 0);
    assert!(w.g_fin_to_client);
    w.c_fin = true;
    w.run();
    assert!(w.s.is_finished());
    assert_eq!(w.s.close_reason(), Some(&CloseReason::Normal));
    assert!(w.s.stats().client_close_notify);
}

#[test]
fn half_close_backend_first_client_keeps_sending() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    w.backend_out.extend_from_slice(b"event: done\n\n");
    w.backend_close = true;
    w.pump_client(&mut c);
    assert_eq!(w.take_plain(&mut c), b"event: done\n\n");
    let mut buf = [0u8; 4];
    assert_eq!(
        c.reader().read(&mut buf).unwrap(),
        0,
        "close_notify from gateway"
    );
    assert!(!w.s.is_finished());
    c.writer().write_all(b"late upload").unwrap();
    w.pump_client(&mut c);
    assert_eq!(w.backend_got, b"late upload");
    c.send_close_notify();
    w.pump_client(&mut c);
    w.c_fin = true;
    w.run();
    assert!(w.backend_eof);
    assert!(w.s.is_finished());
}

#[test]
fn client_fin_without_close_notify_ends_upstream() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS12);
    handshake(&mut w, &mut c);
    c.writer().write_all(b"abc").unwrap();
    w.pump_client(&mut c);
    w.c_fin = true;
    w.run();
    assert_eq!(w.backend_got, b"abc");
    assert!(w.backend_eof);
    assert!(!w.s.stats().client_close_notify);
}

#[test]
fn handshake_timeout_fires() {
    let pki = pki();
    let mut cfg = config(&pki);
    cfg.handshake_timeout = Duration::from_secs(1);
    let mut w = World::new(cfg);
    w.run();
    w.s.tick(w.now + Duration::from_millis(900));
    assert!(!w.s.wants_cancel() && !w.s.is_finished());
    w.s.tick(w.now + Duration::from_millis(1100));
    assert!(w.s.wants_cancel(), "recv still in flight must be cancelled");
    w.cancel_all();
    assert!(w.s.is_finished());
    assert_eq!(w.s.close_reason(), Some(&CloseReason::HandshakeTimeout));
}

#[test]
fn idle_timeout_sends_close_notify() {
    let pki = pki();
    let mut cfg = config(&pki);
    cfg.idle_timeout = Duration::from_secs(5);
    let mut w = World::new(cfg);
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    w.s.tick(w.now + Duration::from_secs(6));
    w.pump_client(&mut c);
    let mut buf = [0u8; 4];
    assert_eq!(
        c.reader().read(&mut buf).unwrap(),
        0,
        "close_notify on idle timeout"
    );
    w.cancel_all();
    assert!(w.s.is_finished());
    assert_eq!(w.s.close_reason(), Some(&CloseReason::IdleTimeout));
}

#[test]
fn bad_client_hello_gets_alert() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    // A handshake record whose body is not a ClientHello.
    w.c2g
        .extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x0f, 0x00, 0x00, 0x00]);
    w.run();
    // An alert record (content type 21) went to the client.
    assert_eq!(w.g2c.first(), Some(&0x15), "{:?}", w.g2c);
    w.cancel_all();
    assert!(w.s.is_finished());
    assert!(matches!(
        w.s.close_reason(),
        Some(CloseReason::HandshakeFailed(_))
    ));
    assert_eq!(w.connects, 0);
}

#[test]
fn pipelined_data_behind_finished_is_relayed() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    w.handshake_with_pipelined_data(&mut c, b"pipelined");
    assert_eq!(w.backend_got, b"pipelined");
}

// ---------------------------------------------------------------------
// Kernel TLS mode, with a simulated kernel: the session's splice relay,
// half-closes and control records, without a kTLS-capable kernel.

fn ktls_config(pki: &Pki) -> SessionConfig {
    let mut cfg = config(pki);
    cfg.ktls = Some(Arc::new(crate::offload::KtlsSupport::assume_all()));
    cfg
}

/// Handshake, then the session offloads once the backend is connected.
fn offloaded_world(
    version: &'static rustls::SupportedProtocolVersion,
) -> (World, ClientConnection) {
    let pki = pki();
    let mut w = World::new(ktls_config(&pki));
    let mut c = client(&pki, version);
    handshake(&mut w, &mut c);
    w.run();
    assert!(
        w.offloaded,
        "session asked for the offload after the handshake"
    );
    assert!(w.s.stats().ktls);
    assert!(
        w.g2c.is_empty(),
        "everything rustls had to send went out before the offload"
    );
    (w, c)
}

#[test]
fn ktls_splices_both_ways() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (mut w, _c) = offloaded_world(version);
        let up: Vec<u8> = (0..700_000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..900_000u32).map(|i| (i * 13) as u8).collect();
        w.c2g.extend_from_slice(&up);
        w.backend_out.extend_from_slice(&down);
        w.run();
        assert!(
            w.backend_got == up,
            "client bytes reach the backend in order"
        );
        assert!(w.g2c == down, "backend bytes reach the client in order");
        let st = w.s.stats();
        assert_eq!(st.spliced_up, up.len() as u64);
        assert_eq!(st.spliced_down, down.len() as u64);
        assert!(w.pipe_up.is_empty() && w.pipe_down.is_empty());
        assert!(!w.s.needs_pipe(Dir::Up) || !w.s.in_flight() & (OpKind::SpliceUpIn.bit()) == 0);
    }
}

#[test]
fn ktls_backpressure_bounds_the_pipe() {
    let (mut w, _c) = offloaded_world(&rustls::version::TLS13);
    w.backend_reads = false;
    w.c2g.extend(std::iter::repeat_n(5u8, 3 * PIPE_CAP));
    w.run();
    assert_eq!(w.pipe_up.len(), PIPE_CAP, "one pipe's worth taken, no more");
    assert_eq!(
        w.c2g.len(),
        2 * PIPE_CAP,
        "the rest stays in the client's socket"
    );
    w.backend_reads = true;
    w.run();
    assert_eq!(w.backend_got.len(), 3 * PIPE_CAP);
}

#[test]
fn ktls_client_close_notify_then_backend_close() {
    let (mut w, _c) = offloaded_world(&rustls::version::TLS13);
    w.c2g.extend_from_slice(b"request");
    w.run();
    w.control = Some(ControlEvent::CloseNotify);
    w.run();
    assert_eq!(w.backend_got, b"request");
    assert!(w.backend_eof, "client close_notify half-closes the backend");
    assert!(!w.s.is_finished());
    w.backend_out.extend_from_slice(b"answer");
    w.backend_close = true;
    w.run();
    assert_eq!(w.g2c, b"answer");
    assert!(w.close_notify_sent && w.g_fin_to_client);
    assert!(w.s.is_finished() || w.s.wants_cancel());
    w.cancel_all();
    assert!(w.s.is_finished());
    assert_eq!(w.s.close_reason(), Some(&CloseReason::Normal));
}

#[test]
fn ktls_backend_closes_first_client_keeps_sending() {
    let (mut w, _c) = offloaded_world(&rustls::version::TLS13);
    w.backend_out.extend_from_slice(b"done");
    w.backend_close = true;
    w.run();
    assert_eq!(w.g2c, b"done");
    assert!(w.close_notify_sent, "close_notify after the backend's EOF");
    w.c2g.extend_from_slice(b"late");
    w.run();
    assert_eq!(w.backend_got, b"late");
    w.c_fin = true;
    w.run();
    assert!(w.backend_eof);
    w.cancel_all();
    assert!(w.s.is_finished());
}

#[test]
fn ktls_unsupported_key_update_closes_cleanly() {
    let (mut w, _c) = offloaded_world(&rustls::version::TLS13);
    w.backend_out.extend_from_slice(b"partial");
    w.run();
    w.control = Some(ControlEvent::CloseCleanly("no rekey".into()));
    w.run();
    assert_eq!(
        w.g2c, b"partial",
        "what the backend sent is still delivered"
    );
    assert!(w.close_notify_sent && w.g_fin_to_client);
    w.cancel_all();
    assert!(w.s.is_finished());
    assert!(matches!(
        w.s.close_reason(),
        Some(CloseReason::KtlsClosed(_))
    ));
}

#[test]
fn ktls_handshake_reads_stop_at_record_boundaries() {
    let pki = pki();
    let mut w = World::new(ktls_config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    w.handshake_with_pipelined_data(&mut c, b"pipelined");
    assert!(w.s.stats().handshake_done);
    assert!(w.offloaded);
    // The app-data record behind Finished was left in the socket for the
    // kernel (which our fake kernel passes through undecrypted): rustls in
    // user space never saw it.
    let via_kernel: Vec<u8> = [w.backend_got.clone(), w.pipe_up.clone()].concat();
    assert_eq!(
        via_kernel.first(),
        Some(&0x17),
        "{:?}",
        &via_kernel[..via_kernel.len().min(8)]
    );
    assert!(!via_kernel.windows(9).any(|x| x == b"pipelined"));
}

#[test]
fn ktls_refused_backend_still_answers_502_in_user_space() {
    let pki = pki();
    let mut w = World::new(ktls_config(&pki));
    w.backend_refuses = true;
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    c.writer().write_all(b"POST /mcp HTTP/1.1\r\n\r\n").unwrap();
    w.pump_client(&mut c);
    assert!(!w.offloaded, "no offload without a backend");
    let text = String::from_utf8(w.take_plain(&mut c)).unwrap();
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
}

// ----------------------------------------------------------------------
// TLS to the backend ("double TLS")

fn upstream_config(pki: &Pki, name: &str) -> SessionConfig {
    let mut cfg = config(pki);
    let client = ClientConfig::builder()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    cfg.upstream = Some(UpstreamTls {
        config: Arc::new(client),
        server_name: ServerName::try_from(name.to_string()).unwrap(),
    });
    cfg
}

/// The backend is a rustls server: moves records between it and the
/// session until nothing moves. Returns what the backend decrypted.
fn run_tls_backend(
    w: &mut World,
    c: &mut ClientConnection,
    b: &mut rustls::ServerConnection,
    got: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    for _ in 0..10_000 {
        w.pump_client(c);
        let mut moved = false;
        if !w.backend_got.is_empty() {
            let mut slice = &w.backend_got[..];
            let n = b.read_tls(&mut slice).unwrap();
            w.backend_got.drain(..n);
            b.process_new_packets()?;
            let mut buf = [0u8; 65536];
            loop {
                match b.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            moved = n > 0;
        }
        if w.backend_offloaded {
            // From here the backend wire carries plaintext (simulated
            // kernel). Records the backend still sends now (TLS 1.3 session
            // tickets after our Finished) are control records for the kernel.
            let mut records = Vec::new();
            while b.wants_write() {
                b.write_tls(&mut records).unwrap();
            }
            if !records.is_empty() {
                w.backend_control = Some(ControlEvent::Handled);
            }
            return Ok(());
        }
        while b.wants_write() {
            b.write_tls(&mut w.backend_out).unwrap();
            moved = true;
        }
        if !moved {
            return Ok(());
        }
    }
    panic!("backend did not settle");
}

#[test]
fn backend_tls_relays_both_ways_byte_exact() {
    let pki = pki();
    let mut w = World::new(upstream_config(&pki, "localhost"));
    w.s.set_backend_prefix(b"PREFIX".to_vec());
    let mut c = client(&pki, &rustls::version::TLS13);
    let mut b = rustls::ServerConnection::new(pki.server.clone()).unwrap();
    let mut got = Vec::new();
    handshake(&mut w, &mut c);
    // The prefix goes in clear before the backend's ClientHello.
    w.run();
    assert!(
        w.backend_got.starts_with(b"PREFIX\x16\x03"),
        "{:?}",
        &w.backend_got[..8]
    );
    w.backend_got.drain(..6);
    let up: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let down: Vec<u8> = (0..500_000u32).map(|i| (i * 13 + i / 97) as u8).collect();
    b.set_buffer_limit(None);
    let mut plain = Vec::new();
    let (ups, downs): (Vec<_>, Vec<_>) =
        (up.chunks(50_000).collect(), down.chunks(40_000).collect());
    for i in 0..ups.len().max(downs.len()) {
        if let Some(u) = ups.get(i) {
            c.writer().write_all(u).unwrap();
        }
        if let Some(d) = downs.get(i) {
            b.writer().write_all(d).unwrap();
        }
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        plain.extend(w.take_plain(&mut c));
    }
    for _ in 0..50 {
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        plain.extend(w.take_plain(&mut c));
    }
    assert_eq!(got.len(), up.len());
    assert!(got == up, "backend plaintext differs");
    assert_eq!(plain.len(), down.len());
    assert!(plain == down, "client plaintext differs");
    assert_eq!(w.s.stats().bytes_up, up.len() as u64);
    assert_eq!(w.s.stats().bytes_down, down.len() as u64);
    assert!(w.s.backend_negotiated().is_some());
    // Client closes: close_notify reaches the backend through TLS, then the
    // backend closes and the client gets close_notify.
    c.send_close_notify();
    run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
    assert!(w.backend_eof, "backend write side shut after close_notify");
    b.send_close_notify();
    run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(
        c.reader().read(&mut buf).unwrap(),
        0,
        "client got close_notify"
    );
    assert!(w.g_fin_to_client);
    w.c_fin = true;
    w.run();
    assert!(w.s.is_finished(), "session finished");
    assert_eq!(w.s.close_reason(), Some(&CloseReason::Normal));
}

#[test]
fn backend_tls_wrong_name_is_refused_with_502() {
    let pki = pki();
    let mut w = World::new(upstream_config(&pki, "not-the-backend.example"));
    let mut c = client(&pki, &rustls::version::TLS13);
    let mut b = rustls::ServerConnection::new(pki.server.clone()).unwrap();
    let mut got = Vec::new();
    handshake(&mut w, &mut c);
    c.writer()
        .write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n\r\n{}")
        .unwrap();
    let _ = run_tls_backend(&mut w, &mut c, &mut b, &mut got);
    assert!(
        got.is_empty(),
        "no plaintext may reach an unverified backend"
    );
    let plain = w.take_plain(&mut c);
    assert!(
        plain.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    assert!(
        matches!(w.s.close_reason(), Some(CloseReason::BackendTlsFailed(_))),
        "{:?}",
        w.s.close_reason()
    );
}

#[test]
fn backend_tls_untrusted_ca_is_refused() {
    let pki = pki();
    let other = self::pki();
    // The gateway trusts `other`'s root; the backend shows `pki`'s chain.
    let mut w = World::new(upstream_config(&other, "localhost"));
    w.s.cfg.tls = pki.server.clone();
    let mut c = client(&pki, &rustls::version::TLS12);
    let mut b = rustls::ServerConnection::new(pki.server.clone()).unwrap();
    let mut got = Vec::new();
    handshake(&mut w, &mut c);
    c.writer().write_all(b"\x01\x02binary").unwrap();
    let _ = run_tls_backend(&mut w, &mut c, &mut b, &mut got);
    assert!(got.is_empty());
    assert!(matches!(
        w.s.close_reason(),
        Some(CloseReason::BackendTlsFailed(
            rustls::Error::InvalidCertificate(_)
        ))
    ));
}

#[test]
fn handshake_info_and_policy_deviation() {
    let pki = pki();
    let mut cfg = config(&pki);
    cfg.expected_suites = Some(Arc::from(vec![
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ]));
    let mut w = World::new(cfg);
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    let hs = w.s.handshake_info().expect("info after the handshake");
    assert_eq!(hs.sni.as_deref(), Some("localhost"));
    assert_eq!(hs.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(hs.suite.is_some() && hs.group.is_some());
    assert!(!hs.resumed);
    assert!(hs.client_cert.is_none());
    assert_eq!(
        hs.policy_deviation,
        hs.suite != Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
    );
    assert!(
        hs.policy_deviation,
        "AES-GCM is preferred by default: a deviation here"
    );
}

#[test]
fn double_tls_offloads_both_legs_and_splices() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let pki = pki();
        let mut cfg = upstream_config(&pki, "localhost");
        cfg.ktls = Some(Arc::new(crate::offload::KtlsSupport::assume_all()));
        let mut w = World::new(cfg);
        let mut c = client(&pki, version);
        let mut b = rustls::ServerConnection::new(pki.server.clone()).unwrap();
        let mut got = Vec::new();
        handshake(&mut w, &mut c);
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        w.run();
        assert!(w.offloaded, "client leg offloaded");
        assert!(w.backend_offloaded, "backend leg offloaded");
        assert!(w.s.backend_is_ktls() && w.s.stats().ktls);
        assert!(
            got.is_empty() && w.backend_got.is_empty(),
            "no data before the offload"
        );
        assert!(w.backend_out.is_empty());
        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..400_000u32).map(|i| (i * 13) as u8).collect();
        w.c2g.extend_from_slice(&up);
        w.backend_out.extend_from_slice(&down);
        w.run();
        assert!(
            w.backend_got == up,
            "client bytes reach the backend in order"
        );
        assert!(
            w.g2c == down,
            "backend bytes reach the client in order: got {} of {}, first {:?}, backend_out {}, pending {:?}",
            w.g2c.len(),
            down.len(),
            &w.g2c[..w.g2c.len().min(8)],
            w.backend_out.len(),
            w.pending
        );
        // A data record read together with a backend control record is
        // delivered in order, through the client's kTLS socket.
        w.g2c.clear();
        w.backend_out.extend_from_slice(b"tail");
        w.backend_control = Some(ControlEvent::Data(4));
        w.run();
        assert_eq!(w.g2c, b"tail");
        // The backend's close_notify ends the down direction: close_notify
        // to the client, then FIN.
        w.backend_control = Some(ControlEvent::CloseNotify);
        w.backend_out.push(0); // makes the splice ask for the control record
        w.run();
        assert!(w.close_notify_sent && w.g_fin_to_client);
        let st = w.s.stats();
        assert_eq!(st.bytes_down, down.len() as u64 + 4);
    }
}

#[test]
fn double_tls_stays_in_user_space_when_the_backend_suite_cannot_offload() {
    let pki = pki();
    let mut cfg = upstream_config(&pki, "localhost");
    cfg.ktls = Some(Arc::new(crate::offload::KtlsSupport::only(
        rustls::ProtocolVersion::TLSv1_3,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    )));
    // The backend negotiates AES-256: not offloadable here.
    let backend_cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384],
            ..rustls::crypto::aws_lc_rs::default_provider()
        }))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(pki.server.cert_resolver.clone());
    let mut w = World::new(cfg);
    let mut c = client(&pki, &rustls::version::TLS13);
    let mut b = rustls::ServerConnection::new(Arc::new(backend_cfg)).unwrap();
    let mut got = Vec::new();
    handshake(&mut w, &mut c);
    c.writer().write_all(b"ping").unwrap();
    run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
    b.writer().write_all(b"pong").unwrap();
    run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
    assert!(!w.offloaded, "neither leg offloaded");
    assert_eq!(got, b"ping");
    assert_eq!(w.take_plain(&mut c), b"pong");
}

#[test]
fn refused_client_certificate_gets_an_alert_not_a_panic() {
    // TLS 1.3: the client's Certificate and Finished arrive together; the
    // error is raised at Certificate while Finished is still buffered.
    let pki = pki();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(pki.roots.clone()))
        .build()
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(pki.server.cert_resolver.clone());
    let mut cfg = config(&pki);
    cfg.tls = Arc::new(server);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut w = World::new(cfg.clone());
        let mut c = client(&pki, version);
        for _ in 0..20 {
            while c.wants_write() {
                c.write_tls(&mut w.c2g).unwrap();
            }
            w.run();
            if w.g2c.is_empty() {
                break;
            }
            let mut slice = &w.g2c[..];
            let n = c.read_tls(&mut slice).unwrap();
            w.g2c.drain(..n);
            if c.process_new_packets().is_err() {
                break;
            }
        }
        w.c_fin = true;
        w.run();
        assert!(
            matches!(w.s.close_reason(), Some(CloseReason::HandshakeFailed(_))),
            "{:?}",
            w.s.close_reason()
        );
        assert_eq!(w.connects, 0, "no backend for a refused client");
    }
}

#[test]
fn proxy_prefix_goes_first_even_when_the_client_filled_the_buffer() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    w.connect_ready = false;
    let mut c = client(&pki, &rustls::version::TLS13);
    handshake(&mut w, &mut c);
    w.s.set_backend_prefix(b"PROXY-HEADER".to_vec());
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    c.writer().write_all(&data).unwrap();
    w.pump_client(&mut c);
    w.connect_ready = true;
    for _ in 0..20 {
        w.pump_client(&mut c);
    }
    assert!(w.backend_got.starts_with(b"PROXY-HEADER"));
    assert!(
        w.backend_got[12..] == data[..],
        "client bytes follow the prefix, exact"
    );
    assert_eq!(
        w.s.stats().bytes_up,
        data.len() as u64,
        "the prefix is not client data"
    );
}

#[test]
fn quiet_connections_hold_small_buffers_and_bulk_grows_them() {
    let pki = pki();
    let mut w = World::new(config(&pki));
    let mut c = client(&pki, &rustls::version::TLS13);
    let caps = |s: &Session| {
        [
            s.tls_in.capacity(),
            s.tls_out.capacity(),
            s.up.capacity(),
            s.down.capacity(),
        ]
    };
    handshake(&mut w, &mut c);
    c.writer().write_all(b"small request").unwrap();
    w.backend_out.extend_from_slice(b"small answer");
    w.pump_client(&mut c);
    assert_eq!(w.take_plain(&mut c), b"small answer");
    assert_eq!(
        caps(&w.s),
        [SMALL_CAP; 4],
        "a quiet connection keeps only small buffers"
    );
    // Bulk both ways: the buffers grow (full-size records, big reads)...
    let up: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
    let down: Vec<u8> = (0..400_000u32).map(|i| (i % 241) as u8).collect();
    w.backend_out.extend_from_slice(&down);
    let mut got = Vec::new();
    for chunk in up.chunks(50_000) {
        c.writer().write_all(chunk).unwrap();
        w.pump_client(&mut c);
        got.extend(w.take_plain(&mut c));
        assert!(
            caps(&w.s).iter().any(|&c| c > SMALL_CAP),
            "bulk uses full-size buffers"
        );
    }
    for _ in 0..20 {
        w.pump_client(&mut c);
        got.extend(w.take_plain(&mut c));
    }
    assert!(w.backend_got[b"small request".len()..] == up[..]);
    assert!(got == down);
    // ... and shrink back once traffic is small again.
    for _ in 0..3 {
        c.writer().write_all(b"ping").unwrap();
        w.backend_out.extend_from_slice(b"pong");
        w.pump_client(&mut c);
        assert_eq!(w.take_plain(&mut c), b"pong");
    }
    assert_eq!(
        caps(&w.s),
        [SMALL_CAP; 4],
        "back to small buffers after bulk"
    );
}

#[test]
fn backend_tls_records_held_back_by_a_slow_client_stay_intact() {
    // The client stops reading: backend records pile up behind a full
    // plaintext buffer while a backend receive is in flight. Draining them
    // later must not move that receive's buffer under it.
    let pki = pki();
    let mut w = World::new(upstream_config(&pki, "localhost"));
    let mut c = client(&pki, &rustls::version::TLS12);
    let mut b = rustls::ServerConnection::new(pki.server.clone()).unwrap();
    b.set_buffer_limit(None);
    let mut got = Vec::new();
    handshake(&mut w, &mut c);
    c.writer().write_all(b"go").unwrap();
    run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
    assert_eq!(got, b"go");
    let down: Vec<u8> = (0..600_000u32).map(|i| (i % 239) as u8).collect();
    let mut plain = Vec::new();
    for chunk in down.chunks(30_000) {
        w.client_accepts = false;
        b.writer().write_all(chunk).unwrap();
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        w.client_accepts = true;
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        plain.extend(w.take_plain(&mut c));
        assert!(w.s.close_reason().is_none(), "{:?}", w.s.close_reason());
    }
    for _ in 0..20 {
        run_tls_backend(&mut w, &mut c, &mut b, &mut got).unwrap();
        plain.extend(w.take_plain(&mut c));
    }
    assert_eq!(plain.len(), down.len());
    assert!(plain == down, "backend bytes reach the client intact");
}
