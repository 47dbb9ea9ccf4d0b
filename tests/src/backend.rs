//! Plain-TCP (and unix-socket) backends run on std threads inside the test
//! process.  Every accepted socket gets read/write timeouts, every accept loop
//! stops when its [`Backend`] is dropped (or after 10 minutes at most).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::util::{hex, seeded_bytes, SeededStream, TempDir};

/// Socket timeout applied to every backend connection.
pub const BACKEND_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on how long an accept loop runs.
const ACCEPT_LIFETIME: Duration = Duration::from_secs(600);

/// What a backend handler gets: a TCP or unix stream.
pub trait BackendStream: Read + Write + Send {
    fn shutdown_write(&self) -> io::Result<()>;
    fn try_clone_box(&self) -> io::Result<Box<dyn BackendStream>>;
    fn raw_fd(&self) -> RawFd;
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl BackendStream for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn BackendStream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl BackendStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn BackendStream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// What one backend connection observed (pushed by some handlers when the
/// connection ends).
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Bytes received on this connection (handler-specific: some record all,
    /// some only what came after a greeting).
    pub received: Vec<u8>,
    /// Whether the handler read a clean EOF at the end.
    pub saw_eof: bool,
    /// Free-form note (errors etc.).
    pub note: String,
}

/// Counters shared between a backend and the test.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections ever accepted.
    pub connections: AtomicUsize,
    /// Bytes ever read from clients (i.e. from the gateway).
    pub bytes_in: AtomicU64,
    /// Bytes ever written.
    pub bytes_out: AtomicU64,
    /// Connections deliberately reset.
    pub resets: AtomicUsize,
    /// Complete HTTP requests answered.
    pub requests: AtomicUsize,
    pub records: Mutex<Vec<Record>>,
}

impl Stats {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::SeqCst)
    }
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }
    fn push(&self, r: Record) {
        self.records.lock().unwrap().push(r);
    }
    fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
    }
    fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::SeqCst);
    }
}

type Handler = Arc<dyn Fn(Box<dyn BackendStream>, &Stats) + Send + Sync>;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A running backend.  Dropping it stops the accept loop (already accepted
/// connections finish on their own, bounded by socket timeouts).
pub struct Backend {
    arg: String,
    tcp_addr: Option<SocketAddr>,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl Backend {
    /// The `--backend` argument for the gateway (`127.0.0.1:P` or `unix:/path`).
    pub fn arg(&self) -> String {
        self.arg.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.tcp_addr.expect("not a TCP backend")
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn spawn_tcp(handler: Handler) -> Backend {
        let l = tcp_listener_with_backlog(4096);
        let addr = l.local_addr().unwrap();
        Backend::spawn(
            Listener::Tcp(l),
            addr.to_string(),
            Some(addr),
            None,
            handler,
        )
    }

    fn spawn_unix(handler: Handler) -> Backend {
        let dir = TempDir::new("gw-unix");
        let path: PathBuf = dir.join("backend.sock");
        let l = UnixListener::bind(&path).expect("backend unix bind");
        Backend::spawn(
            Listener::Unix(l),
            format!("unix:{}", path.display()),
            None,
            Some(dir),
            handler,
        )
    }

    fn spawn(
        listener: Listener,
        arg: String,
        tcp_addr: Option<SocketAddr>,
        dir: Option<TempDir>,
        handler: Handler,
    ) -> Backend {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&stats), Arc::clone(&stop));
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true).unwrap(),
            Listener::Unix(l) => l.set_nonblocking(true).unwrap(),
        }
        let accept_thread = thread::Builder::new()
            .name("backend-accept".into())
            .spawn(move || {
                let started = Instant::now();
                while !sp.load(Ordering::SeqCst) && started.elapsed() < ACCEPT_LIFETIME {
                    let accepted: io::Result<Box<dyn BackendStream>> = match &listener {
                        Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                            s.set_nonblocking(false)?;
                            let _ = s.set_nodelay(true);
                            Ok(Box::new(s) as Box<dyn BackendStream>)
                        }),
                        Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                            s.set_nonblocking(false)?;
                            Ok(Box::new(s) as Box<dyn BackendStream>)
                        }),
                    };
                    match accepted {
                        Ok(s) => {
                            st.connections.fetch_add(1, Ordering::SeqCst);
                            let _ = s.set_timeouts(BACKEND_IO_TIMEOUT);
                            let (h, st2) = (Arc::clone(&handler), Arc::clone(&st));
                            let spawned = thread::Builder::new()
                                .name("backend-conn".into())
                                .stack_size(256 * 1024)
                                .spawn(move || h(s, &st2));
                            if let Err(e) = spawned {
                                eprintln!("backend: cannot spawn connection thread: {e}");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            eprintln!("backend accept error: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .expect("spawn accept thread");
        Backend {
            arg,
            tcp_addr,
            stats,
            stop,
            accept_thread: Some(accept_thread),
            _dir: dir,
        }
    }

    /// (a) Echo every byte; after EOF from the client, shut down the write side.
    pub fn echo() -> Backend {
        Backend::spawn_tcp(Arc::new(|s, st| echo_loop(s, st, Vec::new())))
    }

    /// Echo backend on a unix socket (`unix:/path`).
    pub fn echo_unix() -> Backend {
        Backend::spawn_unix(Arc::new(|s, st| echo_loop(s, st, Vec::new())))
    }

    /// (b) HTTP/1.1 MCP-like responder: reads requests with Content-Length,
    /// answers `200` with the JSON body from [`mcp_response_body`], keep-alive
    /// (closes after a request with `Connection: close`).
    pub fn http() -> Backend {
        Backend::spawn_tcp(Arc::new(http_loop))
    }

    /// (c) Counts connections and bytes; never answers; reads until EOF.
    pub fn counting() -> Backend {
        Backend::spawn_tcp(Arc::new(|mut s, st| {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                st.add_in(n);
            }
        }))
    }

    /// (d) Reads `after` bytes then resets the connection (SO_LINGER 0 +
    /// close).  With `prefix = Some(p)`, only connections whose first bytes
    /// are `p` are reset; the others are echoed.
    pub fn reset(prefix: Option<Vec<u8>>, after: usize) -> Backend {
        Backend::spawn_tcp(Arc::new(move |s, st| {
            reset_handler(s, st, prefix.as_deref(), after)
        }))
    }

    /// (e) Reads `greeting_len` bytes, writes `response`, shuts down its
    /// write side, then keeps reading until EOF and pushes a [`Record`] with
    /// everything received after the greeting.
    pub fn write_then_half_close(greeting_len: usize, response: Vec<u8>) -> Backend {
        let response = Arc::new(response);
        Backend::spawn_tcp(Arc::new(move |mut s, st| {
            let mut greeting = vec![0u8; greeting_len];
            if let Err(e) = s.read_exact(&mut greeting) {
                st.push(Record {
                    note: format!("greeting read failed: {e}"),
                    ..Default::default()
                });
                return;
            }
            st.add_in(greeting_len);
            if let Err(e) = s.write_all(&response).and_then(|_| s.flush()) {
                st.push(Record {
                    note: format!("response write failed: {e}"),
                    ..Default::default()
                });
                return;
            }
            st.add_out(response.len());
            let _ = s.shutdown_write();
            let (received, saw_eof, note) = read_to_eof(&mut *s, st);
            st.push(Record {
                received,
                saw_eof,
                note,
            });
        }))
    }

    /// Reads everything until EOF, then answers
    /// `GOT <len> <sha256-hex>\n` followed by `reply_len` bytes of
    /// `seeded_bytes(reply_seed, reply_len)`, then shuts down its write side.
    /// Proves that the backend sees EOF after the exact bytes and can still
    /// answer.  Pushes a [`Record`] with what it received.
    pub fn collect_then_reply(reply_seed: u64, reply_len: usize) -> Backend {
        Backend::spawn_tcp(Arc::new(move |mut s, st| {
            let (received, saw_eof, note) = read_to_eof(&mut *s, st);
            if saw_eof {
                let mut reply = format!(
                    "GOT {} {}\n",
                    received.len(),
                    hex(&crate::util::sha256(&received))
                )
                .into_bytes();
                reply.extend_from_slice(&seeded_bytes(reply_seed, reply_len));
                if s.write_all(&reply).is_ok() {
                    st.add_out(reply.len());
                }
                let _ = s.shutdown_write();
            }
            st.push(Record {
                received,
                saw_eof,
                note,
            });
        }))
    }

    /// Sink + source.  Protocol: the client first sends a 24-byte header
    /// `upload_len: u64 LE, download_len: u64 LE, download_seed: u64 LE`.
    /// The backend then concurrently (a) reads exactly `upload_len` bytes,
    /// hashing them, and (b) sends `SeededStream(download_seed, download_len)`.
    /// When both are done it sends the 32-byte SHA-256 of what it received,
    /// shuts down its write side and reads until EOF.
    pub fn sink_source() -> Backend {
        Backend::spawn_tcp(Arc::new(sink_source_handler))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

/// The body the HTTP responder returns for a request.
pub fn mcp_response_body(method: &str, path: &str, request_body: &[u8]) -> String {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{\"backend\":\"gateway-tests\",\"method\":\"{method}\",\"path\":\"{path}\",\"received_bytes\":{},\"sha256\":\"{}\"}}}}",
        request_body.len(),
        hex(&crate::util::sha256(request_body))
    )
}

fn read_to_eof(s: &mut dyn BackendStream, st: &Stats) -> (Vec<u8>, bool, String) {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (received, true, String::new()),
            Ok(n) => {
                st.add_in(n);
                received.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (received, false, format!("read error: {e}")),
        }
    }
}

fn echo_loop(mut s: Box<dyn BackendStream>, st: &Stats, already: Vec<u8>) {
    if !already.is_empty() {
        if s.write_all(&already).is_err() {
            return;
        }
        st.add_out(already.len());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.flush();
                let _ = s.shutdown_write();
                return;
            }
            Ok(n) => {
                st.add_in(n);
                if let Err(e) = s.write_all(&buf[..n]) {
                    st.push(Record {
                        note: format!("echo write error: {e}"),
                        ..Default::default()
                    });
                    return;
                }
                st.add_out(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                st.push(Record {
                    note: format!("echo read error: {e}"),
                    ..Default::default()
                });
                return;
            }
        }
    }
}

fn set_linger_zero(fd: RawFd) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &lg as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn reset_handler(mut s: Box<dyn BackendStream>, st: &Stats, prefix: Option<&[u8]>, after: usize) {
    let need = prefix.map_or(0, <[u8]>::len);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Read enough to decide.
    while got.len() < need.max(1) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                st.add_in(n);
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    let reset = match prefix {
        Some(p) => got.starts_with(p),
        None => true,
    };
    if !reset {
        echo_loop(s, st, got);
        return;
    }
    while got.len() < after {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                st.add_in(n);
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    set_linger_zero(s.raw_fd());
    st.resets.fetch_add(1, Ordering::SeqCst);
    drop(s); // close with SO_LINGER 0 => RST
}

fn http_loop(mut s: Box<dyn BackendStream>, st: &Stats) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Read the header block.
        let header_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match s.read(&mut chunk) {
                Ok(0) => {
                    let _ = s.shutdown_write();
                    return;
                }
                Ok(n) => {
                    st.add_in(n);
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(_) => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut content_length = 0usize;
        let mut close = false;
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        while buf.len() < header_end + content_length {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    st.add_in(n);
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        let body = buf[header_end..header_end + content_length].to_vec();
        buf.drain(..header_end + content_length);
        let resp_body = mcp_response_body(&method, &path, &body);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{}",
            resp_body.len(),
            if close { "Connection: close\r\n" } else { "" },
            resp_body
        );
        // Count before answering, so a client that has the answer can rely
        // on the counter.
        st.requests.fetch_add(1, Ordering::SeqCst);
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
        st.add_out(resp.len());
        if close {
            let _ = s.shutdown_write();
            // Drain until the peer closes (bounded by the socket timeout).
            let _ = read_to_eof(&mut *s, st);
            return;
        }
    }
}

fn sink_source_handler(mut s: Box<dyn BackendStream>, st: &Stats) {
    let mut header = [0u8; 24];
    if let Err(e) = s.read_exact(&mut header) {
        st.push(Record {
            note: format!("header read failed: {e}"),
            ..Default::default()
        });
        return;
    }
    st.add_in(24);
    let up_len = u64::from_le_bytes(header[0..8].try_into().unwrap());
    let down_len = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let down_seed = u64::from_le_bytes(header[16..24].try_into().unwrap());

    let mut w = match s.try_clone_box() {
        Ok(w) => w,
        Err(e) => {
            st.push(Record {
                note: format!("clone failed: {e}"),
                ..Default::default()
            });
            return;
        }
    };
    let sender = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || -> io::Result<u64> {
            let mut src = SeededStream::new(down_seed, down_len);
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            loop {
                let n = src.fill(&mut buf);
                if n == 0 {
                    return Ok(sent);
                }
                w.write_all(&buf[..n])?;
                sent += n as u64;
            }
        })
        .expect("spawn sender");

    let mut h = Sha256::new();
    let mut left = up_len;
    let mut buf = vec![0u8; 64 * 1024];
    let mut note = String::new();
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match s.read(&mut buf[..want]) {
            Ok(0) => {
                note = format!("EOF with {left} upload bytes missing");
                break;
            }
            Ok(n) => {
                st.add_in(n);
                h.update(&buf[..n]);
                left -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                note = format!("read error with {left} upload bytes missing: {e}");
                break;
            }
        }
    }
    let sent = sender.join();
    match sent {
        Ok(Ok(n)) => st.add_out(n as usize),
        Ok(Err(e)) => note.push_str(&format!("; send error: {e}")),
        Err(_) => note.push_str("; sender panicked"),
    }
    if left == 0 && note.is_empty() {
        let digest: [u8; 32] = h.finalize().into();
        if s.write_all(&digest).is_ok() {
            st.add_out(32);
        }
        let _ = s.shutdown_write();
        let (_, saw_eof, n2) = read_to_eof(&mut *s, st);
        st.push(Record {
            received: Vec::new(),
            saw_eof,
            note: n2,
        });
    } else {
        st.push(Record {
            note,
            ..Default::default()
        });
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// 127.0.0.1:0 listener with a large accept backlog (std uses 128, which
/// overflows when a gateway opens hundreds of backend connections at once).
fn tcp_listener_with_backlog(backlog: libc::c_int) -> TcpListener {
    let fd = bound_loopback_socket();
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
    TcpListener::from(fd)
}

/// A TCP socket bound to 127.0.0.1:0 (not listening).
fn bound_loopback_socket() -> OwnedFd {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = 0;
        sin.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let rc = libc::bind(
            fd.as_raw_fd(),
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        fd
    }
}

/// A loopback address where nothing listens: a TCP socket bound to
/// 127.0.0.1:0 but never `listen()`ed, kept open so that no one else can take
/// the port while the test runs.  Connecting to it gets ECONNREFUSED.
pub struct RefusedAddr {
    _fd: OwnedFd,
    addr: SocketAddr,
}

impl RefusedAddr {
    pub fn new() -> RefusedAddr {
        let fd = bound_loopback_socket();
        unsafe {
            let mut out: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockname(
                fd.as_raw_fd(),
                &mut out as *mut libc::sockaddr_in as *mut libc::sockaddr,
                &mut len,
            );
            assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
            let port = u16::from_be(out.sin_port);
            RefusedAddr {
                _fd: fd,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn arg(&self) -> String {
        self.addr.to_string()
    }
}

impl Default for RefusedAddr {
    fn default() -> Self {
        RefusedAddr::new()
    }
}
