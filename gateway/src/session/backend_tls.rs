//! TLS from the gateway to the backend ("double TLS"), in user space.
//!
//! [`BackendTls`] sits between the session's plaintext buffers (`up`,
//! `down`) and the backend socket: it encrypts `up` into records for the
//! backend and decrypts the backend's records into `down`. Like the client
//! side it uses rustls' unbuffered API and performs no I/O; the session
//! asks the driver to move its record buffers.

use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncryptError};

use crate::buf::Buf;

/// Record buffer capacity each way (two maximum-size records).
pub const BACKEND_TLS_CAP: usize = 34 * 1024;
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
const RECORD_OVERHEAD: usize = 64;

/// What a listener needs to open TLS connections to its backend.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// The plaintext side, borrowed from the session.
pub(super) struct Plain<'a> {
    pub up: &'a mut Buf,
    pub down: &'a mut Buf,
    /// No more plaintext will come from the client.
    pub up_done: bool,
    /// Plaintext bytes encrypted for the backend (added to).
    pub bytes_up: &'a mut u64,
    /// Plaintext bytes decrypted from the backend (added to).
    pub bytes_down: &'a mut u64,
    /// The first plaintext byte from the backend arrived (for 502 logic).
    pub first_down: &'a mut bool,
}

/// One backend TLS connection.
pub(super) struct BackendTls {
    conn: UnbufferedClientConnection,
    /// Records from the backend.
    pub tls_in: Buf,
    /// Records to the backend.
    pub tls_out: Buf,
    /// Handshake messages that did not fit `tls_out`.
    overflow: Vec<u8>,
    pub handshake_done: bool,
    /// The backend's TCP stream reached EOF.
    pub tcp_eof: bool,
    /// The backend ended its stream (close_notify or EOF).
    pub peer_closed: bool,
    pub close_notify_queued: bool,
}

impl BackendTls {
    pub fn new(u: &UpstreamTls) -> Result<Self, rustls::Error> {
        Ok(Self {
            conn: UnbufferedClientConnection::new(u.config.clone(), u.server_name.clone())?,
            tls_in: Buf::new(BACKEND_TLS_CAP),
            tls_out: Buf::new(BACKEND_TLS_CAP),
            overflow: Vec::new(),
            handshake_done: false,
            tcp_eof: false,
            peer_closed: false,
            close_notify_queued: false,
        })
    }

    /// The rustls connection, for the kernel offload.
    pub fn into_conn(self) -> UnbufferedClientConnection {
        self.conn
    }

    /// Negotiated version and suite, once known.
    pub fn negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        Some((
            self.conn.protocol_version()?,
            self.conn.negotiated_cipher_suite()?.suite(),
        ))
    }

    /// Moves parked handshake bytes into `tls_out` (when no send reads it).
    pub fn flush_overflow(&mut self, out_idle: bool) {
        if self.overflow.is_empty() {
            return;
        }
        if out_idle {
            self.tls_out.compact();
        }
        let n = self.overflow.len().min(self.tls_out.spare_len());
        self.tls_out.spare_mut()[..n].copy_from_slice(&self.overflow[..n]);
        self.tls_out.commit(n);
        self.overflow.drain(..n);
    }

    pub fn overflow_empty(&self) -> bool {
        self.overflow.is_empty()
    }

    /// Drives rustls until it needs I/O. `out_idle`: no send reads
    /// `tls_out`; `down_may_compact`: nothing writes `down` concurrently.
    pub fn pump(&mut self, p: Plain<'_>, out_idle: bool) -> Result<(), rustls::Error> {
        for _ in 0..10_000 {
            let down_room = p.down.free_len();
            let read_allowed =
                !self.peer_closed && (!self.handshake_done || down_room >= MAX_RECORD_PLAINTEXT);
            let input: &mut [u8] = if read_allowed {
                self.tls_in.filled_mut()
            } else {
                &mut []
            };
            let status = self.conn.process_tls_records(input);
            let discard = status.discard;
            let state = match status.state {
                Ok(s) => s,
                Err(e) => {
                    self.tls_in.consume(discard);
                    return Err(e);
                }
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut rt) => {
                    let mut progressed = false;
                    while let Some(len) = rt.peek_len() {
                        if p.down.free_len() < len.get() {
                            break;
                        }
                        match rt.next_record() {
                            Some(Ok(rec)) => {
                                if !rec.payload.is_empty() {
                                    *p.first_down = true;
                                }
                                p.down.push_compacting(rec.payload);
                                *p.bytes_down += rec.payload.len() as u64;
                                progressed = true;
                            }
                            Some(Err(e)) => {
                                self.tls_in.consume(discard);
                                return Err(e);
                            }
                            None => break,
                        }
                    }
                    // Out of room for the next record: go on without reading
                    // (the next round passes no input), so pending client
                    // plaintext is still encrypted this round.
                    stop = !progressed && p.down.free_len() >= MAX_RECORD_PLAINTEXT;
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    let r = super::encode_or_park(
                        &mut enc,
                        &mut self.tls_out,
                        &mut self.overflow,
                        out_idle,
                    );
                    if let Err(e) = r {
                        self.tls_in.consume(discard);
                        return Err(e);
                    }
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => {
                    stop = true;
                    if self.tcp_eof {
                        self.tls_in.consume(discard);
                        return Err(rustls::Error::General(
                            "backend closed the connection during the TLS handshake".into(),
                        ));
                    }
                }
                ConnectionState::WriteTraffic(mut wt) => {
                    self.handshake_done = true;
                    if self.overflow.is_empty() {
                        let consumed = encrypt_moved(&mut wt, &mut self.tls_out, p.up, out_idle);
                        *p.bytes_up += consumed?;
                        if p.up_done && p.up.is_empty() && !self.close_notify_queued {
                            if out_idle {
                                self.tls_out.compact();
                            }
                            match wt.queue_close_notify(self.tls_out.spare_mut()) {
                                Ok(n) => {
                                    self.tls_out.commit(n);
                                    self.close_notify_queued = true;
                                }
                                Err(EncryptError::InsufficientSize(_)) => {}
                                Err(EncryptError::EncryptExhausted) => {
                                    return Err(rustls::Error::EncryptError)
                                }
                            }
                        }
                    }
                    stop = true;
                    if read_allowed && self.tcp_eof {
                        // EOF without close_notify: the stream is over.
                        self.peer_closed = true;
                    }
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.peer_closed = true;
                    stop = matches!(state, ConnectionState::Closed);
                }
                _ => {
                    self.tls_in.consume(discard);
                    return Err(rustls::Error::General(
                        "unexpected rustls state on the backend connection".into(),
                    ));
                }
            }
            // No compaction here: a receive may be in flight into
            // `tls_in`'s free space (the session compacts before posting
            // the next one).
            self.tls_in.consume(discard);
            if stop {
                break;
            }
        }
        Ok(())
    }
}

/// Encrypts as much of `up` as fits into `out`; returns the plaintext
/// bytes consumed.
fn encrypt_moved(
    wt: &mut rustls::unbuffered::WriteTraffic<'_, rustls::client::ClientConnectionData>,
    out: &mut Buf,
    up: &mut Buf,
    out_idle: bool,
) -> Result<u64, rustls::Error> {
    let mut total = 0u64;
    while !up.is_empty() {
        if out_idle && out.spare_len() < MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD {
            out.compact();
        }
        let spare = out.spare_len();
        if spare <= RECORD_OVERHEAD {
            break;
        }
        let n = up
            .len()
            .min(MAX_RECORD_PLAINTEXT)
            .min(spare - RECORD_OVERHEAD);
        match wt.encrypt(&up.filled()[..n], out.spare_mut()) {
            Ok(written) => {
                out.commit(written);
                up.consume(n);
                total += n as u64;
            }
            Err(EncryptError::InsufficientSize(_)) => break,
            Err(EncryptError::EncryptExhausted) => return Err(rustls::Error::EncryptError),
        }
    }
    if up.is_empty() {
        up.compact();
    }
    Ok(total)
}
