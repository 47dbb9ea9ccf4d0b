//! The sample MCP backend used by the benchmarks: HTTP/1.1 keep-alive on
//! epoll (one single-threaded tokio runtime per thread, each with its own
//! `SO_REUSEPORT` listener, nothing shared).
//!
//! Routes (any path; the method and headers choose):
//! - `POST` with `Accept: text/event-stream` (and no `application/json`):
//!   the JSON-RPC result as one SSE `message` event, chunked;
//! - other `POST`: a JSON-RPC result body (`Content-Length`); the size is
//!   `X-Resp-Bytes` (default 64), the id is copied from the request;
//! - `GET` with `Accept: text/event-stream`: a long-lived SSE stream sending
//!   `: keep-alive` comments every `X-Sse-Interval-Ms` (default 1000),
//!   `X-Sse-Events` of them (default: until the client goes away);
//! - `GET` otherwise: a body of `X-Resp-Bytes` (bulk download).
//!
//! Bodies follow [`crate::body`], so clients can verify every byte.

use crate::body;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Backend start-up errors.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start thread: {0}")]
    Thread(io::Error),
}

/// A running backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub threads: Vec<JoinHandle<()>>,
}

const PATTERN_LEN: usize = 1 << 20;

/// 1 MiB of padding plus 64 bytes, so any body offset can be served as one
/// contiguous slice of up to 1 MiB.
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v = vec![0u8; PATTERN_LEN + 64];
        body::fill_pad(0, &mut v);
        v
    })
}

fn listener(addr: SocketAddr) -> io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Starts `threads` serving threads on `addr` (port 0 picks a free port).
pub fn spawn(addr: SocketAddr, threads: usize) -> Result<Backend, BackendError> {
    let threads = threads.max(1);
    let first = listener(addr).map_err(|source| BackendError::Listen { addr, source })?;
    let bound = first
        .local_addr()
        .map_err(|source| BackendError::Listen { addr, source })?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(listener(bound).map_err(|source| BackendError::Listen {
            addr: bound,
            source,
        })?);
    }
    let _ = pattern();
    let mut handles = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let h = std::thread::Builder::new()
            .name(format!("backend-{i}"))
            .spawn(move || serve_thread(l))
            .map_err(BackendError::Thread)?;
        handles.push(h);
    }
    Ok(Backend {
        addr: bound,
        threads: handles,
    })
}

fn serve_thread(l: StdListener) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backend: cannot build runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let l = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("backend: {e}");
                return;
            }
        };
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::task::spawn_local(async move {
                        let _ = serve_conn(s).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("backend: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

struct Req {
    get: bool,
    sse: bool,
    content_length: usize,
    resp_bytes: usize,
    sse_interval: Duration,
    sse_events: Option<u64>,
    keep_alive: bool,
    head_len: usize,
}

fn header_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn parse_req(buf: &[u8]) -> Result<Option<Req>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let mut req = Req {
                get: r.method == Some("GET"),
                sse: false,
                content_length: 0,
                resp_bytes: 64,
                sse_interval: Duration::from_millis(1000),
                sse_events: None,
                keep_alive: r.version == Some(1),
                head_len,
            };
            for h in r.headers.iter() {
                let n = h.name;
                if n.eq_ignore_ascii_case("content-length") {
                    req.content_length = header_num(h.value).ok_or(())? as usize;
                } else if n.eq_ignore_ascii_case("x-resp-bytes") {
                    req.resp_bytes = header_num(h.value).ok_or(())? as usize;
                } else if n.eq_ignore_ascii_case("x-sse-interval-ms") {
                    req.sse_interval = Duration::from_millis(header_num(h.value).ok_or(())?.max(1));
                } else if n.eq_ignore_ascii_case("x-sse-events") {
                    req.sse_events = Some(header_num(h.value).ok_or(())?);
                } else if n.eq_ignore_ascii_case("accept") {
                    let v = h.value;
                    let has = |needle: &[u8]| v.windows(needle.len()).any(|w| w == needle);
                    req.sse = has(b"text/event-stream") && !has(b"application/json");
                } else if n.eq_ignore_ascii_case("connection") {
                    if h.value.eq_ignore_ascii_case(b"close") {
                        req.keep_alive = false;
                    } else if h.value.eq_ignore_ascii_case(b"keep-alive") {
                        req.keep_alive = true;
                    }
                }
            }
            Ok(Some(req))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

async fn serve_conn(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut start = 0;
    let mut end = 0;
    loop {
        // Read a request head.
        let req = loop {
            match parse_req(&buf[start..end]) {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(()) => {
                    s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await?;
                    return Ok(());
                }
            }
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            if end == buf.len() {
                return Ok(()); // head too large
            }
            let n = s.read(&mut buf[end..]).await?;
            if n == 0 {
                return Ok(());
            }
            end += n;
        };
        start += req.head_len;
        // Read (and mostly discard) the body; keep its start for the id.
        let mut idbuf = [0u8; 256];
        let mut idlen = 0;
        let mut left = req.content_length;
        loop {
            let take = left.min(end - start);
            let keep = take.min(idbuf.len() - idlen);
            idbuf[idlen..idlen + keep].copy_from_slice(&buf[start..start + keep]);
            idlen += keep;
            start += take;
            left -= take;
            if left == 0 {
                break;
            }
            start = 0;
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            end = n;
        }
        if start == end {
            start = 0;
            end = 0;
        }
        let id = body::find_id(&idbuf[..idlen]).unwrap_or(0);
        if req.get && req.sse {
            return sse_stream(&mut s, &req).await;
        }
        respond(&mut s, &req, id).await?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

async fn sse_stream(s: &mut TcpStream, req: &Req) -> io::Result<()> {
    s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await?;
    const EVENT: &[u8] = b"e\r\n: keep-alive\n\n\r\n";
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(req.sse_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut probe = [0u8; 64];
    loop {
        if req.sse_events.is_some_and(|n| sent >= n) {
            s.write_all(b"0\r\n\r\n").await?;
            return Ok(());
        }
        tokio::select! {
            _ = tick.tick() => {
                s.write_all(EVENT).await?;
                sent += 1;
            }
            r = s.read(&mut probe) => {
                // The client closed (or sent something we do not expect
                // on an SSE stream): stop.
                if r? == 0 { return Ok(()); }
            }
        }
    }
}

async fn respond(s: &mut TcpStream, req: &Req, id: u64) -> io::Result<()> {
    let head = body::response_head(id);
    let len = body::body_len(head.len(), body::TAIL.len(), req.resp_bytes);
    if req.sse && !req.get {
        // One SSE event carrying the JSON-RPC result, chunked.
        let mut out = Vec::with_capacity(len + 160);
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let ev_len = SSE_PREFIX.len() + len + SSE_SUFFIX.len();
        out.extend_from_slice(crate::http::chunk_head(ev_len).as_bytes());
        out.extend_from_slice(SSE_PREFIX);
        out.extend_from_slice(&body::response(id, req.resp_bytes));
        out.extend_from_slice(SSE_SUFFIX);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
        return s.write_all(&out).await;
    }
    let ctype = if req.get {
        "application/octet-stream"
    } else {
        "application/json"
    };
    let hdr = format!("HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n\r\n");
    if len <= 64 * 1024 {
        let mut out = Vec::with_capacity(hdr.len() + len);
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(&body::response(id, req.resp_bytes));
        return s.write_all(&out).await;
    }
    let mut first = hdr.into_bytes();
    first.extend_from_slice(&head);
    s.write_all(&first).await?;
    write_pad(s, head.len(), len - head.len() - body::TAIL.len()).await?;
    s.write_all(body::TAIL).await
}

/// Writes `n` padding bytes starting at body offset `offset`.
pub(crate) async fn write_pad<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    mut offset: usize,
    mut n: usize,
) -> io::Result<()> {
    let p = pattern();
    while n > 0 {
        let at = offset % 64;
        let take = n.min(PATTERN_LEN);
        w.write_all(&p[at..at + take]).await?;
        offset += take;
        n -= take;
    }
    Ok(())
}

/// SSE framing around a JSON-RPC result.
pub const SSE_PREFIX: &[u8] = b"event: message\ndata: ";
/// SSE framing after a JSON-RPC result.
pub const SSE_SUFFIX: &[u8] = b"\n\n";

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn roundtrip(req: &[u8]) -> Vec<u8> {
        let b = spawn("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let mut c = std::net::TcpStream::connect(b.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(req).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_json_rpc_with_requested_size_and_id() {
        let body = body::build(
            &body::request_head(77, "tools/call"),
            body::REQUEST_TAIL,
            200,
        );
        let mut req = format!(
            "POST /mcp HTTP/1.1\r\nHost: x\r\nX-Resp-Bytes: 500\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let out = roundtrip(&req);
        let head = crate::http::parse_response_head(&out).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, crate::http::Framing::Length(500));
        assert_eq!(&out[head.head_len..], &body::response(77, 500)[..]);
    }

    #[test]
    fn bulk_body_is_the_pattern() {
        let n = 3 * PATTERN_LEN + 123;
        let req = format!("GET /bulk HTTP/1.1\r\nX-Resp-Bytes: {n}\r\nConnection: close\r\n\r\n");
        let out = roundtrip(req.as_bytes());
        let head = crate::http::parse_response_head(&out).unwrap().unwrap();
        let mut v = body::Verifier::response(0, n);
        v.feed(&out[head.head_len..]);
        assert!(v.finish());
    }

    #[test]
    fn sse_stream_ends_after_requested_events() {
        let req = b"GET /sse HTTP/1.1\r\nAccept: text/event-stream\r\nX-Sse-Interval-Ms: 1\r\nX-Sse-Events: 3\r\n\r\n";
        let out = roundtrip(req);
        let head = crate::http::parse_response_head(&out).unwrap().unwrap();
        assert!(head.event_stream);
        let mut d = crate::http::ChunkedDecoder::new();
        let mut got = Vec::new();
        d.feed(&out[head.head_len..], |b| got.extend_from_slice(b))
            .unwrap();
        assert!(d.done());
        assert_eq!(got, b": keep-alive\n\n".repeat(3));
    }
}
