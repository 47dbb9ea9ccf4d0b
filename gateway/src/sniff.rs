//! Classifying the first bytes a client sends on the TLS port, and the
//! plaintext answers the gateway gives instead of TLS (`400` to plaintext
//! HTTP, `502` to an HTTP request when the backend is unreachable).

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes to decide yet.
    NeedMore,
    /// A TLS handshake record (content type 22, major version 3).
    Tls,
    /// The start of an HTTP/1.x request line (`METHOD SP`).
    Http,
    /// Anything else.
    Garbage,
}

/// HTTP methods we recognise at the start of a plaintext request.
const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
];

/// TLS record content type `handshake`.
const TLS_HANDSHAKE: u8 = 0x16;

/// Classifies the first bytes received from a client.
pub fn sniff(bytes: &[u8]) -> Sniff {
    match bytes.first() {
        None => Sniff::NeedMore,
        Some(&TLS_HANDSHAKE) => match bytes.get(1) {
            None => Sniff::NeedMore,
            Some(3) => Sniff::Tls,
            Some(_) => Sniff::Garbage,
        },
        Some(_) => http_method_prefix(bytes),
    }
}

fn http_method_prefix(bytes: &[u8]) -> Sniff {
    let mut could_be = false;
    for m in METHODS {
        if bytes.len() > m.len() {
            if bytes.starts_with(m) && bytes[m.len()] == b' ' {
                return Sniff::Http;
            }
        } else if m.starts_with(bytes) {
            could_be = true;
        }
    }
    if could_be {
        Sniff::NeedMore
    } else {
        Sniff::Garbage
    }
}

/// Whether `bytes` (the first plaintext of a TLS session) look like an HTTP
/// request: used to decide between a `502` answer and a bare close.
pub fn looks_like_http(bytes: &[u8]) -> bool {
    http_method_prefix(bytes) == Sniff::Http
}

/// The request line target and `Host` header of a plaintext request head.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestHead {
    pub target: Option<String>,
    pub host: Option<String>,
}

/// Whether the request head is complete (`\r\n\r\n` or `\n\n` seen).
pub fn head_complete(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(2).any(|w| w == b"\n\n")
}

/// Parses what it can of a plaintext HTTP request head. Never fails: the
/// fields are `None` when absent or unusable.
pub fn parse_head(bytes: &[u8]) -> RequestHead {
    let mut lines = bytes.split(|&b| b == b'\n').map(|l| match l.last() {
        Some(b'\r') => &l[..l.len() - 1],
        _ => l,
    });
    let mut head = RequestHead::default();
    if let Some(first) = lines.next() {
        let mut parts = first.split(|&b| b == b' ');
        let _method = parts.next();
        head.target = parts.next().and_then(clean_token);
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"host") {
                head.host = clean_token(value.trim_ascii());
            }
        }
    }
    head
}

/// Accepts a token of visible ASCII (no spaces, quotes or angle brackets),
/// at most 512 bytes, so it can be echoed back safely.
fn clean_token(t: &[u8]) -> Option<String> {
    if t.is_empty() || t.len() > 512 {
        return None;
    }
    if t.iter()
        .all(|&b| b.is_ascii_graphic() && !matches!(b, b'"' | b'<' | b'>' | b'\\'))
    {
        std::str::from_utf8(t).ok().map(str::to_owned)
    } else {
        None
    }
}

/// The `400` answer to plaintext HTTP on the TLS port. `fallback_host` is
/// the listener's address, used when the request has no usable `Host`.
pub fn plaintext_http_response(head: &RequestHead, fallback_host: &str) -> Vec<u8> {
    let host = head.host.as_deref().unwrap_or(fallback_host);
    let target = match head.target.as_deref() {
        Some(t) if t.starts_with('/') => t,
        _ => "/",
    };
    let body = format!(
        "This port requires TLS: plaintext HTTP is not accepted here.\n\
         Use https://{host}{target} instead.\n"
    );
    http_response("400 Bad Request", &body)
}

/// The `502` answer sent (inside TLS) when the backend cannot be reached.
pub fn bad_gateway_response() -> Vec<u8> {
    http_response(
        "502 Bad Gateway",
        "The MCP backend behind this gateway is unreachable; try again later.\n",
    )
}

fn http_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The server name (SNI) in a ClientHello, given the payload of the first
/// handshake record. `None` when absent or malformed (rustls decides what
/// a malformed hello gets; this is only for logs and audit records).
pub fn client_hello_sni(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let body_len = r.u24()?;
    let mut r = Reader(r.take(body_len.min(r.0.len()))?);
    r.take(2 + 32)?; // legacy_version, random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let comp = r.u8()? as usize;
    r.take(comp)?;
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let len = exts.u16()? as usize;
        let body = exts.take(len)?;
        if typ != 0 {
            continue;
        }
        let mut list = Reader(body);
        let list_len = list.u16()? as usize;
        let mut list = Reader(list.take(list_len)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let n = list.u16()? as usize;
            let name = list.take(n)?;
            if name_type == 0 {
                let s = std::str::from_utf8(name).ok()?;
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                return Some(s.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_client_hello_is_tls() {
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Sniff::Tls);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x02]), Sniff::Garbage);
        assert_eq!(sniff(&[]), Sniff::NeedMore);
    }

    #[test]
    fn http_methods() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http);
        assert_eq!(sniff(b"POST /mcp HTTP/1.1"), Sniff::Http);
        assert_eq!(sniff(b"PO"), Sniff::NeedMore);
        assert_eq!(sniff(b"POST"), Sniff::NeedMore);
        assert_eq!(sniff(b"POSTX"), Sniff::Garbage);
        assert_eq!(sniff(b"\x00\x01garbage"), Sniff::Garbage);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniff::Garbage);
        assert!(looks_like_http(b"POST /mcp HTTP/1.1\r\n"));
        assert!(!looks_like_http(b"{\"jsonrpc\":\"2.0\"}"));
    }

    #[test]
    fn parses_host_and_target() {
        let h =
            parse_head(b"GET /mcp?x=1 HTTP/1.1\r\nAccept: */*\r\nhost: gw.example:8443\r\n\r\n");
        assert_eq!(h.target.as_deref(), Some("/mcp?x=1"));
        assert_eq!(h.host.as_deref(), Some("gw.example:8443"));
        assert!(head_complete(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn hostile_host_is_not_echoed() {
        let h = parse_head(b"GET / HTTP/1.1\r\nHost: <script>\r\n\r\n");
        assert_eq!(h.host, None);
        let resp = String::from_utf8(plaintext_http_response(&h, "127.0.0.1:8443")).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(resp.contains("https://127.0.0.1:8443/"));
        assert!(!resp.contains("<script>"));
    }

    #[test]
    fn response_length_matches_body() {
        let resp = bad_gateway_response();
        let text = String::from_utf8(resp).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }

    #[test]
    fn reads_sni_from_a_real_client_hello() {
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("API.Example.com").unwrap();
        let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        let len = u16::from_be_bytes([out[3], out[4]]) as usize;
        let rec = &out[5..5 + len];
        assert_eq!(client_hello_sni(rec).as_deref(), Some("api.example.com"));
        // Truncations never panic and give no name.
        for cut in 0..rec.len() {
            let _ = client_hello_sni(&rec[..cut]);
        }
        assert_eq!(client_hello_sni(&rec[..40]), None);
        assert_eq!(client_hello_sni(b"\x02\x00\x00\x00"), None);
    }
}
