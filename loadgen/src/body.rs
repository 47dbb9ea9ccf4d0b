//! Deterministic MCP-shaped bodies, shared by the client and the sample
//! backend, so that `--verify` can check every received byte without the
//! server sending a checksum.
//!
//! A body of `size` bytes for JSON-RPC id `id` is
//! `{"jsonrpc":"2.0","id":ID,"result":{"p":"PPPP…"}}` where the padding byte at
//! absolute body offset `o` is `PAD[o % 64]`. Bodies smaller than the fixed
//! JSON around the padding are just that JSON (no padding).

/// The 64-byte padding alphabet (JSON-safe).
pub const PAD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Tail of every response body.
pub const TAIL: &[u8] = b"\"}}";

/// Head of a response body (everything before the padding).
pub fn response_head(id: u64) -> Vec<u8> {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"p\":\"").into_bytes()
}

/// Head of a request body (everything before the padding).
pub fn request_head(id: u64, method: &str) -> Vec<u8> {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"p\":\""
    )
    .into_bytes()
}

/// Tail of every request body.
pub const REQUEST_TAIL: &[u8] = b"\"}}}";

/// The actual length of a body with `head` that was asked to be `size` bytes.
pub fn body_len(head_len: usize, tail_len: usize, size: usize) -> usize {
    size.max(head_len + tail_len)
}

/// Fills `out` with the padding bytes for absolute body offsets
/// `start..start + out.len()`.
pub fn fill_pad(start: usize, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = PAD[(start + i) % 64];
    }
}

/// A whole body in memory (for small bodies and tests).
pub fn build(head: &[u8], tail: &[u8], size: usize) -> Vec<u8> {
    let len = body_len(head.len(), tail.len(), size);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(head);
    let pad = len - head.len() - tail.len();
    let start = v.len();
    v.resize(start + pad, 0);
    fill_pad(start, &mut v[start..]);
    v.extend_from_slice(tail);
    v
}

/// A response body in memory.
pub fn response(id: u64, size: usize) -> Vec<u8> {
    build(&response_head(id), TAIL, size)
}

/// Checks a byte stream incrementally against an expected layout:
/// `prefix ++ head ++ padding ++ tail ++ suffix`, where padding offsets are
/// counted from the start of `head` (the body).
#[derive(Debug, Clone)]
pub struct Verifier {
    prefix: Vec<u8>,
    head: Vec<u8>,
    pad_len: usize,
    tail: Vec<u8>,
    pos: usize,
    ok: bool,
}

impl Verifier {
    /// Expects a plain response body of `size` bytes for `id`.
    pub fn response(id: u64, size: usize) -> Self {
        Self::framed(Vec::new(), id, size, Vec::new())
    }

    /// Expects `prefix`, then the response body, then `suffix` (SSE framing).
    pub fn framed(prefix: Vec<u8>, id: u64, size: usize, suffix: Vec<u8>) -> Self {
        let head = response_head(id);
        let len = body_len(head.len(), TAIL.len(), size);
        let pad_len = len - head.len() - TAIL.len();
        let mut tail = TAIL.to_vec();
        tail.extend_from_slice(&suffix);
        Self {
            prefix,
            head,
            pad_len,
            tail,
            pos: 0,
            ok: true,
        }
    }

    /// Total number of bytes expected.
    pub fn expected_len(&self) -> usize {
        self.prefix.len() + self.head.len() + self.pad_len + self.tail.len()
    }

    fn expected_at(&self, pos: usize) -> Option<u8> {
        let p = self.prefix.len();
        let h = p + self.head.len();
        let d = h + self.pad_len;
        if pos < p {
            Some(self.prefix[pos])
        } else if pos < h {
            Some(self.head[pos - p])
        } else if pos < d {
            Some(PAD[(pos - p) % 64])
        } else {
            self.tail.get(pos - d).copied()
        }
    }

    /// Feeds the next received bytes; returns false once anything differs.
    pub fn feed(&mut self, data: &[u8]) -> bool {
        if !self.ok {
            return false;
        }
        for &b in data {
            if self.expected_at(self.pos) != Some(b) {
                self.ok = false;
                return false;
            }
            self.pos += 1;
        }
        true
    }

    /// True if everything fed so far matched and the stream is complete.
    pub fn finish(&self) -> bool {
        self.ok && self.pos == self.expected_len()
    }
}

/// Extracts the JSON-RPC id from the start of a request body, if it is a
/// plain integer (`"id":123`).
pub fn find_id(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"id\":";
    let window = &body[..body.len().min(256)];
    let at = window.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let mut id: u64 = 0;
    let mut any = false;
    for &b in &window[at..] {
        if b.is_ascii_digit() {
            id = id.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_has_requested_size_and_is_json() {
        for size in [0, 10, 47, 48, 100, 4096] {
            let b = response(7, size);
            let min = response_head(7).len() + TAIL.len();
            assert_eq!(b.len(), size.max(min));
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["id"], 7);
        }
    }

    #[test]
    fn verifier_accepts_exact_and_rejects_corruption() {
        let b = response(42, 1000);
        let mut v = Verifier::response(42, 1000);
        for chunk in b.chunks(7) {
            assert!(v.feed(chunk));
        }
        assert!(v.finish());

        for at in [0, 30, 500, 999] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            let mut v = Verifier::response(42, 1000);
            v.feed(&bad);
            assert!(!v.finish(), "corruption at {at} not caught");
        }
        let mut short = Verifier::response(42, 1000);
        short.feed(&b[..999]);
        assert!(!short.finish());
    }

    #[test]
    fn framed_verifier() {
        let mut want = b"data: ".to_vec();
        want.extend_from_slice(&response(3, 200));
        want.extend_from_slice(b"\n\n");
        let mut v = Verifier::framed(b"data: ".to_vec(), 3, 200, b"\n\n".to_vec());
        assert!(v.feed(&want));
        assert!(v.finish());
    }

    #[test]
    fn id_extraction() {
        let req = build(&request_head(991, "tools/call"), REQUEST_TAIL, 300);
        assert_eq!(find_id(&req), Some(991));
        assert_eq!(find_id(b"{\"id\":\"x\"}"), None);
        let v: serde_json::Value = serde_json::from_slice(&req).unwrap();
        assert_eq!(v["method"], "tools/call");
    }
}
