//! The load-generating client: one single-threaded tokio runtime per thread,
//! each driving its share of the connections; TLS by rustls (tokio-rustls).

use crate::backend::{write_pad, SSE_PREFIX, SSE_SUFFIX};
use crate::body::{self, Verifier};
use crate::http::{self, ChunkedDecoder, Framing};
use crate::stats::{ErrorKind, ThreadStats};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What each connection does.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Keep-alive request/response (also used for bulk).
    RequestResponse,
    /// A new connection (and handshake) per request.
    Handshake,
    /// Hold a connection with an SSE keep-alive stream.
    Idle { sse_interval: Duration },
}

/// Everything a connection task needs; shared read-only.
pub struct ConnSpec {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    pub workload: Workload,
    pub req_bytes: usize,
    pub resp_bytes: usize,
    pub sse: bool,
    pub verify: bool,
    pub timeout: Duration,
    /// Per-connection interval between request starts (open loop).
    pub interval: Option<Duration>,
    pub t0: Instant,
    pub measure_start: Instant,
    pub end: Instant,
    pub max_requests: Option<u64>,
    /// Total connections of the run (open-loop start spread).
    pub connections: usize,
}

/// State shared by all threads.
#[derive(Default)]
pub struct Shared {
    pub stop: AtomicBool,
    pub measured: AtomicU64,
    pub established: AtomicUsize,
    pub open: AtomicUsize,
}

/// A plain or TLS client stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A failed operation, classified.
#[derive(Debug)]
pub struct Failure(pub ErrorKind);

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure(match e.kind() {
            io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            io::ErrorKind::InvalidData => ErrorKind::Tls,
            _ => ErrorKind::Io,
        })
    }
}

/// Opens a connection; returns it and whether TLS resumed a session.
pub async fn connect(spec: &ConnSpec) -> Result<(Stream, bool), Failure> {
    let tcp = TcpStream::connect(spec.addr)
        .await
        .map_err(|_| Failure(ErrorKind::Connect))?;
    let _ = tcp.set_nodelay(true);
    match &spec.tls {
        None => Ok((Stream::Plain(tcp), false)),
        Some((cfg, name)) => {
            let c = TlsConnector::from(cfg.clone());
            let s = c
                .connect(name.clone(), tcp)
                .await
                .map_err(|_| Failure(ErrorKind::Tls))?;
            let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            Ok((Stream::Tls(Box::new(s)), resumed))
        }
    }
}

/// Buffered response reader.
pub struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// What a response carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    pub bytes: u64,
    pub status: u16,
    pub verified: bool,
}

impl Reader {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: vec![0; cap.max(1024)],
            start: 0,
            end: 0,
        }
    }

    async fn fill<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Result<usize, Failure> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(Failure(ErrorKind::Parse));
        }
        let n = s.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(Failure(ErrorKind::Eof));
        }
        self.end += n;
        Ok(n)
    }

    /// Reads one response. `verifier`, if given, sees the body bytes
    /// (de-chunked) and must accept them exactly.
    pub async fn response<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
        mut verifier: Option<Verifier>,
    ) -> Result<Received, Failure> {
        let mut bytes = 0u64;
        let head = loop {
            match http::parse_response_head(&self.buf[self.start..self.end]) {
                Ok(Some(h)) => break h,
                Ok(None) => bytes += self.fill(s).await? as u64,
                Err(_) => return Err(Failure(ErrorKind::Parse)),
            }
        };
        if bytes == 0 {
            bytes = (self.end - self.start) as u64;
        }
        self.start += head.head_len;
        let mut feed = |data: &[u8]| {
            if let Some(v) = verifier.as_mut() {
                v.feed(data);
            }
        };
        match head.framing {
            Framing::Length(n) => {
                let mut left = n;
                loop {
                    let take = (left.min((self.end - self.start) as u64)) as usize;
                    feed(&self.buf[self.start..self.start + take]);
                    self.start += take;
                    left -= take as u64;
                    if left == 0 {
                        break;
                    }
                    bytes += self.fill(s).await? as u64;
                }
            }
            Framing::Chunked => {
                let mut dec = ChunkedDecoder::new();
                loop {
                    let used = dec
                        .feed(&self.buf[self.start..self.end], &mut feed)
                        .map_err(|_| Failure(ErrorKind::Parse))?;
                    self.start += used;
                    if dec.done() {
                        break;
                    }
                    bytes += self.fill(s).await? as u64;
                }
            }
        }
        let verified = verifier.map(|v| v.finish()).unwrap_or(true);
        Ok(Received {
            bytes,
            status: head.status,
            verified,
        })
    }
}

/// Sends one request (`id`) and returns the bytes written.
pub async fn send_request<S: AsyncWrite + Unpin>(
    s: &mut S,
    spec: &ConnSpec,
    id: u64,
    close: bool,
) -> Result<u64, Failure> {
    let accept = if spec.sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    let bhead = body::request_head(id, "tools/call");
    let blen = body::body_len(bhead.len(), body::REQUEST_TAIL.len(), spec.req_bytes);
    let conn = if close { "close" } else { "keep-alive" };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: {accept}\r\nConnection: {conn}\r\nX-Resp-Bytes: {}\r\nContent-Length: {blen}\r\n\r\n",
        spec.path, spec.host, spec.resp_bytes
    );
    if blen <= 64 * 1024 {
        let mut out = Vec::with_capacity(head.len() + blen);
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body::build(&bhead, body::REQUEST_TAIL, spec.req_bytes));
        s.write_all(&out).await?;
    } else {
        let mut first = head.clone().into_bytes();
        first.extend_from_slice(&bhead);
        s.write_all(&first).await?;
        write_pad(
            s,
            bhead.len(),
            blen - bhead.len() - body::REQUEST_TAIL.len(),
        )
        .await?;
        s.write_all(body::REQUEST_TAIL).await?;
    }
    s.flush().await?;
    Ok((head.len() + blen) as u64)
}

fn verifier_for(spec: &ConnSpec, id: u64) -> Option<Verifier> {
    if !spec.verify {
        return None;
    }
    Some(if spec.sse {
        Verifier::framed(
            SSE_PREFIX.to_vec(),
            id,
            spec.resp_bytes,
            SSE_SUFFIX.to_vec(),
        )
    } else {
        Verifier::response(id, spec.resp_bytes)
    })
}

type Stats = Rc<RefCell<ThreadStats>>;

fn stopping(spec: &ConnSpec, shared: &Shared) -> bool {
    shared.stop.load(Ordering::Relaxed) || Instant::now() >= spec.end
}

/// Whether a request about to start is measured, or must not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Warmup,
    Measured,
    Stop,
}

/// Claims a request slot (counting `--requests` after the warm-up).
fn claim(spec: &ConnSpec, shared: &Shared, now: Instant) -> Claim {
    if now < spec.measure_start {
        return Claim::Warmup;
    }
    match spec.max_requests {
        None => Claim::Measured,
        Some(max) => {
            let n = shared.measured.fetch_add(1, Ordering::Relaxed);
            if n >= max {
                shared.stop.store(true, Ordering::Relaxed);
                Claim::Stop
            } else {
                Claim::Measured
            }
        }
    }
}

/// Runs one connection's workload until the end of the run.
pub async fn conn_task(index: usize, spec: Arc<ConnSpec>, shared: Arc<Shared>, stats: Stats) {
    match spec.workload {
        Workload::RequestResponse => request_response(index, &spec, &shared, &stats).await,
        Workload::Handshake => handshakes(index, &spec, &shared, &stats).await,
        Workload::Idle { sse_interval } => idle(&spec, &shared, &stats, sse_interval).await,
    }
}

fn deadline(spec: &ConnSpec) -> tokio::time::Instant {
    tokio::time::Instant::from_std(spec.end)
}

async fn backoff(spec: &ConnSpec) {
    let until = (Instant::now() + Duration::from_millis(20)).min(spec.end);
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
}

async fn request_response(index: usize, spec: &ConnSpec, shared: &Shared, stats: &Stats) {
    let mut reader = Reader::new(64 * 1024);
    let mut id = (index as u64) << 40;
    // Open loop schedule: spread connections evenly over one interval.
    let mut next = spec
        .interval
        .map(|iv| spec.t0 + iv.mul_f64(index as f64 / spec.connections.max(1) as f64));
    let mut prev_done = Instant::now();
    'conn: while !stopping(spec, shared) {
        let r = tokio::time::timeout_at(deadline(spec), connect(spec)).await;
        let mut s = match r {
            Err(_) => break,
            Ok(Err(Failure(k))) => {
                stats.borrow_mut().error(k);
                backoff(spec).await;
                continue;
            }
            Ok(Ok((s, _))) => s,
        };
        stats.borrow_mut().connects += 1;
        loop {
            // Open loop: wait for the intended start time.
            let intended = match (next, spec.interval) {
                (Some(t), Some(iv)) => {
                    next = Some(t + iv);
                    if Instant::now() < t {
                        if t >= spec.end {
                            break 'conn;
                        }
                        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
                    }
                    Some(t)
                }
                _ => None,
            };
            if stopping(spec, shared) {
                break 'conn;
            }
            let sent_at = Instant::now();
            let measured = match claim(spec, shared, sent_at) {
                Claim::Stop => break 'conn,
                c => c == Claim::Measured,
            };
            // Coordinated-omission correction: when the previous response
            // arrived after this request's intended start, the delay is
            // the target's and counts from the intended time; a late timer
            // (the client's own slack) does not.
            let lat_start = match intended {
                Some(t) if prev_done > t => t,
                _ => sent_at,
            };
            id += 1;
            let until = tokio::time::Instant::from_std((sent_at + spec.timeout).min(spec.end));
            let one = async {
                let out = send_request(&mut s, spec, id, false).await?;
                let got = reader.response(&mut s, verifier_for(spec, id)).await?;
                Ok::<_, Failure>((out, got))
            };
            match tokio::time::timeout_at(until, one).await {
                Err(_) => {
                    if Instant::now() < spec.end {
                        stats.borrow_mut().error(ErrorKind::Timeout);
                    }
                    continue 'conn;
                }
                Ok(Err(Failure(k))) => {
                    if Instant::now() < spec.end {
                        stats.borrow_mut().error(k);
                    }
                    backoff(spec).await;
                    continue 'conn;
                }
                Ok(Ok((out, got))) => {
                    let done = Instant::now();
                    prev_done = done;
                    let mut st = stats.borrow_mut();
                    if !got.verified {
                        st.error(ErrorKind::Verify);
                    } else if !(200..300).contains(&got.status) {
                        st.error(ErrorKind::Status);
                    }
                    st.record(
                        done,
                        measured,
                        done - lat_start,
                        spec.interval.map(|_| done - sent_at),
                        out,
                        got.bytes,
                    );
                }
            }
        }
    }
}

async fn handshakes(index: usize, spec: &ConnSpec, shared: &Shared, stats: &Stats) {
    let mut reader = Reader::new(16 * 1024);
    let mut id = (index as u64) << 40;
    while !stopping(spec, shared) {
        let start = Instant::now();
        let measured = match claim(spec, shared, start) {
            Claim::Stop => break,
            c => c == Claim::Measured,
        };
        id += 1;
        let until = tokio::time::Instant::from_std((start + spec.timeout).min(spec.end));
        let one = async {
            let (mut s, resumed) = connect(spec).await?;
            let out = send_request(&mut s, spec, id, true).await?;
            let got = reader.response(&mut s, verifier_for(spec, id)).await?;
            // close_notify (TLS) and FIN; the server closes its side too.
            let _ = s.shutdown().await;
            Ok::<_, Failure>((resumed, out, got))
        };
        match tokio::time::timeout_at(until, one).await {
            Err(_) => {
                if Instant::now() < spec.end {
                    stats.borrow_mut().error(ErrorKind::Timeout);
                }
            }
            Ok(Err(Failure(k))) => {
                if Instant::now() < spec.end {
                    stats.borrow_mut().error(k);
                }
                backoff(spec).await;
            }
            Ok(Ok((resumed, out, got))) => {
                let done = Instant::now();
                let mut st = stats.borrow_mut();
                if !got.verified {
                    st.error(ErrorKind::Verify);
                } else if !(200..300).contains(&got.status) {
                    st.error(ErrorKind::Status);
                }
                if measured {
                    st.connects += 1;
                    st.handshakes += 1;
                    st.resumed += u64::from(resumed);
                }
                st.record(done, measured, done - start, None, out, got.bytes);
            }
        }
    }
}

async fn idle(spec: &ConnSpec, shared: &Shared, stats: &Stats, sse_interval: Duration) {
    let until = deadline(spec);
    let start = Instant::now();
    let r = tokio::time::timeout_at(until, async {
        let (mut s, _) = connect(spec).await?;
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nX-Sse-Interval-Ms: {}\r\n\r\n",
            spec.path,
            spec.host,
            sse_interval.as_millis().max(1)
        );
        s.write_all(head.as_bytes()).await?;
        s.flush().await?;
        // First bytes (the response head) mark the connection established.
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(Failure(ErrorKind::Eof));
        }
        let done = Instant::now();
        {
            let mut st = stats.borrow_mut();
            st.connects += 1;
            st.record(done, true, done - start, None, head.len() as u64, n as u64);
        }
        shared.established.fetch_add(1, Ordering::Relaxed);
        shared.open.fetch_add(1, Ordering::Relaxed);
        let r: Result<(), Failure> = async {
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(Failure(ErrorKind::Eof));
                }
                let mut st = stats.borrow_mut();
                st.bytes_in += n as u64;
                st.events += buf[..n].windows(2).filter(|w| w == b"\n\n").count() as u64;
            }
        }
        .await;
        shared.open.fetch_sub(1, Ordering::Relaxed);
        r
    })
    .await;
    if let Ok(Err(Failure(k))) = r {
        if Instant::now() < spec.end {
            stats.borrow_mut().error(k);
        }
    }
}

/// Builds the client TLS configuration: TLS 1.3 only, the given suite,
/// X25519 only (what the OpenSSL-based peers negotiate, so every target
/// does the same key exchange), ALPN http/1.1.
pub fn tls_config(
    roots: rustls::RootCertStore,
    suite: &str,
    resume: bool,
) -> Result<Arc<ClientConfig>, String> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let wanted: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|s| format!("{:?}", s.suite()) == suite)
        .cloned()
        .collect();
    if wanted.is_empty() {
        let names: Vec<String> = provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        return Err(format!(
            "unknown cipher suite {suite}; known: {}",
            names.join(", ")
        ));
    }
    provider.cipher_suites = wanted;
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(1024)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(cfg))
}
