//! rustls client helpers and a bounded full-duplex pump.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::ServerName;

use crate::pki::Pki;

/// A blocking rustls client stream.  `s.sock` is the TCP socket, `s.conn`
/// the rustls connection.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Socket read/write timeout for every client socket.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    /// TLS 1.2 only.
    V12,
    /// TLS 1.3 only.
    V13,
    /// Both (rustls prefers 1.3).
    Any,
}

impl Tls {
    pub fn expected(self) -> Option<rustls::ProtocolVersion> {
        match self {
            Tls::V12 => Some(rustls::ProtocolVersion::TLSv1_2),
            Tls::V13 => Some(rustls::ProtocolVersion::TLSv1_3),
            Tls::Any => None,
        }
    }
}

/// A client config trusting only the test CA, restricted to `tls`, with the
/// given ALPN protocols.  Uses the aws-lc-rs provider explicitly.
pub fn client_config(pki: &Pki, tls: Tls, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("add CA");
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls {
        Tls::V12 => &[&rustls::version::TLS12],
        Tls::V13 => &[&rustls::version::TLS13],
        Tls::Any => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// TCP connect (bounded), set timeouts, and complete the TLS handshake with
/// SNI `localhost`.  Returns a descriptive error instead of panicking.
pub fn try_connect_tls(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<TlsStream, String> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
    sock.set_read_timeout(Some(CLIENT_IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(CLIENT_IO_TIMEOUT)).unwrap();
    let _ = sock.set_nodelay(true);
    let name = ServerName::try_from("localhost").unwrap().to_owned();
    let mut conn = ClientConnection::new(cfg, name).map_err(|e| format!("client conn: {e}"))?;
    let deadline = Instant::now() + CLIENT_IO_TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err("TLS handshake did not complete in time".into());
        }
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err("TLS handshake: connection closed by peer".into())
            }
            Ok(_) => {}
            Err(e) => return Err(format!("TLS handshake: {e}")),
        }
    }
    // Flush anything still queued (e.g. the client Finished in TLS 1.2/1.3).
    while conn.wants_write() {
        conn.write_tls(&mut sock)
            .map_err(|e| format!("TLS handshake flush: {e}"))?;
    }
    Ok(StreamOwned::new(conn, sock))
}

/// [`try_connect_tls`] with a config from [`client_config`]; panics on error.
pub fn connect_tls(addr: SocketAddr, pki: &Pki, tls: Tls) -> TlsStream {
    let s = try_connect_tls(addr, client_config(pki, tls, &[]))
        .unwrap_or_else(|e| panic!("TLS connect ({tls:?}) to {addr}: {e}"));
    if let Some(v) = tls.expected() {
        assert_eq!(s.conn.protocol_version(), Some(v), "negotiated version");
    }
    s
}

/// How the peer ended the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEnd {
    /// Still open (the pump stopped for another reason).
    Open,
    /// TLS close_notify received (clean close).
    CloseNotify,
    /// TCP EOF without close_notify.
    Eof,
    /// Read error (reset, TLS alert, decrypt error, ...).
    Error(String),
    /// Our read timed out / deadline hit.
    Timeout,
}

impl PeerEnd {
    /// Closed (cleanly or not), i.e. not hanging.
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            PeerEnd::CloseNotify | PeerEnd::Eof | PeerEnd::Error(_)
        )
    }
}

fn classify(e: &io::Error) -> PeerEnd {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => PeerEnd::Eof,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PeerEnd::Timeout,
        _ => PeerEnd::Error(format!("{:?}: {e}", e.kind())),
    }
}

/// Blocking read until the peer ends the stream (bounded by the socket
/// timeout and a 30 s overall deadline).
pub fn read_to_close(s: &mut TlsStream) -> (Vec<u8>, PeerEnd) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() >= deadline {
            return (out, PeerEnd::Timeout);
        }
        match s.read(&mut buf) {
            Ok(0) => return (out, PeerEnd::CloseNotify),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (out, classify(&e)),
        }
    }
}

/// Options for [`pump`].
#[derive(Clone, Debug)]
pub struct PumpOpts {
    /// Overall bound.
    pub timeout: Duration,
    /// Send at most `n` bytes per `interval`.
    pub pace: Option<(usize, Duration)>,
    /// Send close_notify (TLS half-close) once the source is exhausted.
    pub close_after_send: bool,
    /// Also `shutdown(Write)` the TCP socket after close_notify was flushed.
    pub tcp_shutdown_after_close: bool,
    /// Stop once this many bytes were received (and the upload is done).
    /// `None`: run until the peer ends the stream.
    pub stop_after_recv: Option<u64>,
    /// Live count of bytes handed to rustls.
    pub progress: Option<Arc<AtomicU64>>,
}

impl Default for PumpOpts {
    fn default() -> Self {
        PumpOpts {
            timeout: Duration::from_secs(60),
            pace: None,
            close_after_send: false,
            tcp_shutdown_after_close: false,
            stop_after_recv: None,
            progress: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PumpOutcome {
    pub sent: u64,
    pub received: u64,
    pub peer_end: PeerEnd,
    /// Write-side or fatal error, if any.
    pub error: Option<String>,
    pub timed_out: bool,
}

/// Full-duplex transfer on one TLS connection from a single thread: the
/// socket is switched to non-blocking and driven with `poll(2)`; plaintext is
/// pulled from `source` (returns 0 at the end) and received plaintext is fed
/// to `sink`.  Never blocks beyond `opts.timeout`.  The socket is switched
/// back to blocking mode before returning.
pub fn pump(
    s: &mut TlsStream,
    source: &mut dyn FnMut(&mut [u8]) -> usize,
    sink: &mut dyn FnMut(&[u8]),
    opts: &PumpOpts,
) -> PumpOutcome {
    s.sock.set_nonblocking(true).expect("set_nonblocking");
    let out = pump_inner(&mut s.conn, &mut s.sock, source, sink, opts);
    s.sock.set_nonblocking(false).expect("set_blocking");
    out
}

fn pump_inner(
    conn: &mut ClientConnection,
    sock: &mut TcpStream,
    source: &mut dyn FnMut(&mut [u8]) -> usize,
    sink: &mut dyn FnMut(&[u8]),
    opts: &PumpOpts,
) -> PumpOutcome {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut out_buf = vec![0u8; 64 * 1024];
    let (mut out_pos, mut out_len) = (0usize, 0usize);
    let mut source_done = false;
    let mut close_sent = false;
    let mut tcp_shut = false;
    let mut next_send = start;
    let mut in_buf = vec![0u8; 64 * 1024];
    let mut o = PumpOutcome {
        sent: 0,
        received: 0,
        peer_end: PeerEnd::Open,
        error: None,
        timed_out: false,
    };

    loop {
        // 1. Feed plaintext into rustls (bounded by its buffer limit).
        loop {
            if out_pos == out_len && !source_done && !close_sent {
                let mut allowed = out_buf.len();
                if let Some((n, _)) = opts.pace {
                    if Instant::now() < next_send {
                        break;
                    }
                    allowed = allowed.min(n);
                }
                let n = source(&mut out_buf[..allowed]);
                if n == 0 {
                    source_done = true;
                } else if let Some((_, interval)) = opts.pace {
                    next_send = Instant::now() + interval;
                }
                out_pos = 0;
                out_len = n;
            }
            if out_pos < out_len {
                match conn.writer().write(&out_buf[out_pos..out_len]) {
                    Ok(0) => break,
                    Ok(n) => {
                        out_pos += n;
                        o.sent += n as u64;
                        if let Some(p) = &opts.progress {
                            p.store(o.sent, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        o.error = Some(format!("rustls write: {e}"));
                        return o;
                    }
                }
            } else {
                break;
            }
        }
        let all_sent = source_done && out_pos == out_len;
        if all_sent && opts.close_after_send && !close_sent {
            conn.send_close_notify();
            close_sent = true;
        }

        // 2. Flush TLS records.
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    o.error = Some(format!("socket write: {:?}: {e}", e.kind()));
                    return o;
                }
            }
        }
        if close_sent && opts.tcp_shutdown_after_close && !tcp_shut && !conn.wants_write() {
            let _ = sock.shutdown(Shutdown::Write);
            tcp_shut = true;
        }

        // 3. Read TLS records and drain plaintext.
        if o.peer_end == PeerEnd::Open && conn.wants_read() {
            loop {
                match conn.read_tls(sock) {
                    Ok(0) => {
                        // TCP EOF; the reader below reports close_notify vs EOF.
                        if let Err(e) = conn.process_new_packets() {
                            o.peer_end = PeerEnd::Error(format!("TLS: {e}"));
                        }
                        break;
                    }
                    Ok(_) => {
                        if let Err(e) = conn.process_new_packets() {
                            o.peer_end = PeerEnd::Error(format!("TLS: {e}"));
                            break;
                        }
                        if !conn.wants_read() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        o.peer_end = classify(&e);
                        break;
                    }
                }
            }
        }
        loop {
            match conn.reader().read(&mut in_buf) {
                Ok(0) => {
                    if o.peer_end == PeerEnd::Open {
                        o.peer_end = PeerEnd::CloseNotify;
                    }
                    break;
                }
                Ok(n) => {
                    o.received += n as u64;
                    sink(&in_buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if o.peer_end == PeerEnd::Open {
                        o.peer_end = classify(&e);
                    }
                    break;
                }
            }
        }

        // 4. Done?
        let upload_done = all_sent && (!opts.close_after_send || close_sent) && !conn.wants_write();
        match opts.stop_after_recv {
            Some(n) if upload_done && o.received >= n => return o,
            None if upload_done && o.peer_end != PeerEnd::Open => return o,
            _ => {}
        }
        if matches!(o.peer_end, PeerEnd::Error(_) | PeerEnd::Timeout) {
            return o;
        }
        if o.peer_end != PeerEnd::Open && opts.stop_after_recv.is_some_and(|n| o.received < n) {
            // The peer ended before sending everything we expect.
            return o;
        }
        let now = Instant::now();
        if now >= deadline {
            o.timed_out = true;
            return o;
        }

        // 5. Wait for readiness (or the pacing timer).  If rustls flushed
        // everything to the socket and there is more to send right now, loop
        // immediately instead of waiting for input that may never come.
        let more_to_send = !close_sent && (out_pos < out_len || !source_done);
        let pace_ready = out_pos < out_len || opts.pace.is_none() || now >= next_send;
        if more_to_send && pace_ready && !conn.wants_write() {
            continue;
        }
        let mut events: libc::c_short = 0;
        if o.peer_end == PeerEnd::Open && conn.wants_read() {
            events |= libc::POLLIN;
        }
        if conn.wants_write() {
            events |= libc::POLLOUT;
        }
        let mut wait = Duration::from_millis(50);
        if opts.pace.is_some() && !source_done && out_pos == out_len {
            wait = wait.min(next_send.saturating_duration_since(now));
        }
        if events == 0 && wait.is_zero() {
            continue;
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, 50) as libc::c_int;
        unsafe {
            libc::poll(&mut pfd, 1, ms);
        }
    }
}

/// Send `payload` and read back exactly `payload.len()` bytes (echo backend),
/// full duplex.  Returns what was received and the outcome.
pub fn echo_roundtrip(
    s: &mut TlsStream,
    payload: &[u8],
    opts: &PumpOpts,
) -> (Vec<u8>, PumpOutcome) {
    let mut pos = 0usize;
    let mut source = |buf: &mut [u8]| {
        let n = buf.len().min(payload.len() - pos);
        buf[..n].copy_from_slice(&payload[pos..pos + n]);
        pos += n;
        n
    };
    let mut got = Vec::with_capacity(payload.len());
    let mut sink = |d: &[u8]| got.extend_from_slice(d);
    let mut o = opts.clone();
    o.stop_after_recv = Some(payload.len() as u64);
    let outcome = pump(s, &mut source, &mut sink, &o);
    (got, outcome)
}

/// Send close_notify and read until the peer ends the stream (bounded).
pub fn close_and_drain(s: &mut TlsStream) -> (Vec<u8>, PeerEnd) {
    s.conn.send_close_notify();
    let _ = s.flush();
    while s.conn.wants_write() {
        if s.conn.write_tls(&mut s.sock).is_err() {
            break;
        }
    }
    read_to_close(s)
}
