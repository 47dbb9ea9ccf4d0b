//! Minimal HTTP/1.1 framing for the client and the backend: response heads
//! (via `httparse`) and a chunked-transfer decoder that works on whatever
//! slices the socket hands back.

use thiserror::Error;

/// Framing errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed HTTP head: {0}")]
    Head(String),
    #[error("HTTP head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("malformed chunked body")]
    Chunked,
}

/// How the body of a message is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// What the client needs from a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// Bytes of the head, including the final CRLFCRLF.
    pub head_len: usize,
    pub event_stream: bool,
}

/// Maximum head size accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Parses a response head from the start of `buf`; `Ok(None)` means more
/// bytes are needed.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = resp.code.unwrap_or(0);
            let mut framing = Framing::Length(0);
            let mut event_stream = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let n = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(|| HttpError::Head("bad Content-Length".into()))?;
                    framing = Framing::Length(n);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    if h.value.eq_ignore_ascii_case(b"chunked") {
                        framing = Framing::Chunked;
                    }
                } else if h.name.eq_ignore_ascii_case("content-type") {
                    event_stream = h.value.starts_with(b"text/event-stream");
                }
            }
            Ok(Some(ResponseHead {
                status,
                framing,
                head_len,
                event_stream,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            Err(HttpError::HeadTooLarge(MAX_HEAD))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HttpError::Head(e.to_string())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `any` = at least one digit seen.
    Size {
        size: u64,
        any: bool,
    },
    /// Skipping a chunk extension up to the LF.
    Ext {
        size: u64,
    },
    /// Expecting LF after CR of the size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines; `line_empty` = nothing on this line yet.
    Trailer {
        line_empty: bool,
    },
    TrailerLf {
        line_empty: bool,
    },
    Done,
}

/// Incremental decoder for `Transfer-Encoding: chunked`.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size {
                size: 0,
                any: false,
            },
        }
    }

    /// True once the terminating chunk and trailer were read.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, handing data bytes to `out`. Returns how many
    /// input bytes were consumed (all of them unless the body ended).
    pub fn feed(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Size { size, any } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).ok_or(HttpError::Chunked)?;
                        let size = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or(HttpError::Chunked)?;
                        ChunkState::Size { size, any: true }
                    }
                    b'\r' if any => ChunkState::SizeLf { size },
                    b';' | b' ' | b'\t' if any => ChunkState::Ext { size },
                    _ => return Err(HttpError::Chunked),
                },
                ChunkState::Ext { size } => match b {
                    b'\r' => ChunkState::SizeLf { size },
                    _ => ChunkState::Ext { size },
                },
                ChunkState::SizeLf { size } => match b {
                    b'\n' if size == 0 => ChunkState::Trailer { line_empty: true },
                    b'\n' => ChunkState::Data { left: size },
                    _ => return Err(HttpError::Chunked),
                },
                ChunkState::Data { left } => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(left) as usize;
                    out(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left }
                    };
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => ChunkState::DataLf,
                    _ => return Err(HttpError::Chunked),
                },
                ChunkState::DataLf => match b {
                    b'\n' => ChunkState::Size {
                        size: 0,
                        any: false,
                    },
                    _ => return Err(HttpError::Chunked),
                },
                ChunkState::Trailer { line_empty } => match b {
                    b'\r' => ChunkState::TrailerLf { line_empty },
                    _ => ChunkState::Trailer { line_empty: false },
                },
                ChunkState::TrailerLf { line_empty } => match b {
                    b'\n' if line_empty => ChunkState::Done,
                    b'\n' => ChunkState::Trailer { line_empty: true },
                    _ => return Err(HttpError::Chunked),
                },
            };
            i += 1;
            if self.state == ChunkState::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }
}

/// Writes the chunked framing for one chunk of `len` bytes (head part).
pub fn chunk_head(len: usize) -> String {
    format!("{len:x}\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_with_length_and_chunked() {
        let h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nxx")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(12));
        assert_eq!(h.head_len, 39);
        let h = parse_response_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.event_stream);
        assert_eq!(parse_response_head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(parse_response_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_in_every_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut d = ChunkedDecoder::new();
            let mut got = Vec::new();
            let a = d
                .feed(&wire[..split], |b| got.extend_from_slice(b))
                .unwrap();
            if !d.done() {
                assert_eq!(a, split);
            }
            let b = d
                .feed(&wire[split..], |b| got.extend_from_slice(b))
                .unwrap();
            assert!(d.done(), "split {split}");
            assert_eq!(got, b"hello 0123456789");
            assert_eq!(&wire[a + b..], b"NEXT");
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"zz\r\n", |_| {}), Err(HttpError::Chunked));
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"2\r\nabX", |_| {}), Err(HttpError::Chunked));
    }
}
