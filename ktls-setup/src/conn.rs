//! What remains of a TLS connection after its record layer moved into the
//! kernel: key updates, the confidentiality limit, and control records.

use std::os::fd::BorrowedFd;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ExtractedSecrets, ProtocolVersion};

use crate::crypto::{cipher_for_suite, Cipher, CryptoInfo};
#[cfg(test)]
use crate::sock::CONTENT_CHANGE_CIPHER_SPEC;
use crate::sock::{self, Direction, CONTENT_ALERT, CONTENT_HANDSHAKE};
use crate::KtlsError;

const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_LEVEL_FATAL: u8 = 2;
/// Largest plaintext per record: the most bytes one record can carry.
const MAX_RECORD: u64 = 16 * 1024;

/// What a control record meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOutcome {
    /// The peer sent close_notify: it will send no more data.
    CloseNotify,
    /// The peer moved to new keys, which are now installed for receiving;
    /// `answered`: it asked us to update too, and we did.
    KeyUpdated { answered: bool },
    /// A session ticket from the server was stored (client side).
    SessionTicket,
    /// A warning alert that needs no action.
    Ignored,
}

/// A connection whose records the kernel encrypts and decrypts.
pub struct KtlsConn<Data> {
    kernel: KernelConnection<Data>,
    version: ProtocolVersion,
    cipher: Cipher,
    /// Records we may encrypt under one key (the suite's confidentiality
    /// limit), and an upper bound of how many we have.
    limit: u64,
    tx_records: u64,
}

impl<Data> KtlsConn<Data> {
    /// Moves a finished rustls connection's record layer into the kernel:
    /// `TCP_ULP tls`, then `TLS_TX` and `TLS_RX` with rustls' keys and
    /// sequence numbers (and `TLS_RX_EXPECT_NO_PAD` for TLS 1.3 where the
    /// kernel has it). Nothing may be buffered in user space on either side
    /// of the socket when this is called.
    pub fn offload(
        fd: BorrowedFd<'_>,
        secrets: ExtractedSecrets,
        kernel: KernelConnection<Data>,
    ) -> Result<Self, KtlsError> {
        let version = kernel.protocol_version();
        let suite = kernel.negotiated_cipher_suite();
        let cipher =
            cipher_for_suite(suite.suite()).ok_or(KtlsError::UnsupportedSuite(suite.suite()))?;
        let limit = match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let tx = CryptoInfo::new(version, secrets.tx.0, &secrets.tx.1)?;
        let rx = CryptoInfo::new(version, secrets.rx.0, &secrets.rx.1)?;
        sock::enable_ulp(fd)?;
        sock::set_crypto(fd, Direction::Tx, &tx)?;
        sock::set_crypto(fd, Direction::Rx, &rx)?;
        if version == ProtocolVersion::TLSv1_3 {
            // Optional optimisation; the kernel re-decrypts if the peer pads.
            let _ = sock::set_rx_expect_no_pad(fd);
        }
        Ok(Self {
            kernel,
            version,
            cipher,
            limit,
            tx_records: secrets.tx.0,
        })
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Accounts for `bytes` sent in one operation (at most one partial
    /// record per operation plus one per 16 KiB). Returns whether the
    /// connection is within 1/8 of its confidentiality limit and should
    /// update its keys (TLS 1.3) or close (TLS 1.2).
    pub fn note_sent(&mut self, bytes: u64) -> bool {
        self.tx_records = self
            .tx_records
            .saturating_add(bytes.div_ceil(MAX_RECORD) + 1);
        self.tx_records >= self.limit - self.limit / 8
    }

    /// Sends close_notify.
    pub fn send_close_notify(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        sock::send_record(fd, CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY]).map(|_| ())
    }

    /// Updates our sending keys (TLS 1.3 KeyUpdate), e.g. before the
    /// confidentiality limit. `request_peer`: ask the peer to update too.
    pub fn update_tx_keys(
        &mut self,
        fd: BorrowedFd<'_>,
        request_peer: bool,
    ) -> Result<(), KtlsError> {
        if self.version != ProtocolVersion::TLSv1_3 {
            return Err(KtlsError::RekeyUnsupported);
        }
        // The KeyUpdate itself goes out under the old key.
        sock::send_record(
            fd,
            CONTENT_HANDSHAKE,
            &[HS_KEY_UPDATE, 0, 0, 1, u8::from(request_peer)],
        )?;
        let (seq, secrets) = self.kernel.update_tx_secret()?;
        let info = CryptoInfo::new(self.version, seq, &secrets)?;
        sock::set_crypto(fd, Direction::Tx, &info).map_err(rekey_error)?;
        self.tx_records = 0;
        Ok(())
    }

    fn handle_common(
        &mut self,
        fd: BorrowedFd<'_>,
        content_type: u8,
        payload: &[u8],
        mut ticket: impl FnMut(&mut KernelConnection<Data>, &[u8]) -> Result<(), KtlsError>,
    ) -> Result<ControlOutcome, KtlsError> {
        // Parse and validate the whole record before acting on any of it:
        // a malformed record must not leave half-installed keys behind.
        match parse_control(self.version, content_type, payload)? {
            ControlRecord::Alert(outcome) => Ok(outcome),
            ControlRecord::Handshake(msgs) => {
                let mut outcome = ControlOutcome::Ignored;
                for msg in msgs {
                    outcome = match msg {
                        HandshakeMessage::KeyUpdate { update_requested } => {
                            self.peer_key_update(fd, update_requested)?
                        }
                        HandshakeMessage::NewSessionTicket(body) => {
                            ticket(&mut self.kernel, body)?;
                            ControlOutcome::SessionTicket
                        }
                    };
                }
                Ok(outcome)
            }
        }
    }

    fn peer_key_update(
        &mut self,
        fd: BorrowedFd<'_>,
        requested: bool,
    ) -> Result<ControlOutcome, KtlsError> {
        let (seq, secrets) = self.kernel.update_rx_secret()?;
        let info = CryptoInfo::new(self.version, seq, &secrets)?;
        sock::set_crypto(fd, Direction::Rx, &info).map_err(rekey_error)?;
        if requested {
            self.update_tx_keys(fd, false)?;
        }
        Ok(ControlOutcome::KeyUpdated {
            answered: requested,
        })
    }
}

/// A post-handshake message, parsed (see [`parse_control`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMessage<'a> {
    /// TLS 1.3 KeyUpdate; `update_requested`: the peer asks us to update
    /// our sending keys too.
    KeyUpdate { update_requested: bool },
    /// A NewSessionTicket's body (without the 4-byte handshake header), as
    /// `KernelConnection::handle_new_session_ticket` wants it.
    NewSessionTicket(&'a [u8]),
}

/// A non-data record, parsed and validated (see [`parse_control`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRecord<'a> {
    /// An alert that needs no key change: `CloseNotify` or `Ignored`.
    Alert(ControlOutcome),
    /// One or more post-handshake messages, in order.
    Handshake(Vec<HandshakeMessage<'a>>),
}

/// Most handshake messages one record may hold (a 16 KiB record of empty
/// messages would otherwise mean 4096 entries).
const MAX_MESSAGES_PER_RECORD: usize = 64;

/// Parses a non-data record received on a kTLS socket, with no side
/// effects: the pure half of `handle_record`.
///
/// Errors: `PeerAlert` for a fatal alert (in TLS 1.3 every alert except
/// close_notify and user_canceled), `Protocol` for anything malformed or
/// unexpected: a truncated or split handshake message, an empty handshake
/// record, a KeyUpdate in TLS 1.2, a KeyUpdate that is not the last message
/// of its record (RFC 8446 §5.1: handshake messages must not span a key
/// change), any other post-handshake message (renegotiation, …), or a
/// record type other than alert and handshake.
pub fn parse_control(
    version: ProtocolVersion,
    content_type: u8,
    payload: &[u8],
) -> Result<ControlRecord<'_>, KtlsError> {
    match content_type {
        CONTENT_ALERT => match payload {
            [_, ALERT_CLOSE_NOTIFY] => Ok(ControlRecord::Alert(ControlOutcome::CloseNotify)),
            [ALERT_LEVEL_FATAL, desc] => Err(KtlsError::PeerAlert(*desc)),
            // TLS 1.3: every alert but close_notify and user_canceled is fatal.
            [_, desc] if version == ProtocolVersion::TLSv1_3 && *desc != ALERT_USER_CANCELED => {
                Err(KtlsError::PeerAlert(*desc))
            }
            [_, _] => Ok(ControlRecord::Alert(ControlOutcome::Ignored)),
            _ => Err(KtlsError::Protocol("malformed alert record")),
        },
        CONTENT_HANDSHAKE => {
            if payload.is_empty() {
                return Err(KtlsError::Protocol("empty handshake record"));
            }
            let mut rest = payload;
            let mut msgs = Vec::new();
            while !rest.is_empty() {
                if msgs.len() == MAX_MESSAGES_PER_RECORD {
                    return Err(KtlsError::Protocol(
                        "too many handshake messages in one record",
                    ));
                }
                if matches!(msgs.last(), Some(HandshakeMessage::KeyUpdate { .. })) {
                    return Err(KtlsError::Protocol(
                        "KeyUpdate is not the last message of its record",
                    ));
                }
                let [typ, a, b, c, body @ ..] = rest else {
                    return Err(KtlsError::Protocol("truncated handshake message"));
                };
                let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                if body.len() < len {
                    return Err(KtlsError::Protocol(
                        "handshake message split across records",
                    ));
                }
                let (msg, tail) = body.split_at(len);
                rest = tail;
                msgs.push(match *typ {
                    HS_KEY_UPDATE => {
                        if version != ProtocolVersion::TLSv1_3 {
                            return Err(KtlsError::Protocol("KeyUpdate outside TLS 1.3"));
                        }
                        match msg {
                            [0] => HandshakeMessage::KeyUpdate {
                                update_requested: false,
                            },
                            [1] => HandshakeMessage::KeyUpdate {
                                update_requested: true,
                            },
                            _ => return Err(KtlsError::Protocol("malformed KeyUpdate")),
                        }
                    }
                    HS_NEW_SESSION_TICKET => HandshakeMessage::NewSessionTicket(msg),
                    _ => {
                        return Err(KtlsError::Protocol("unexpected post-handshake message"));
                    }
                });
            }
            Ok(ControlRecord::Handshake(msgs))
        }
        _ => Err(KtlsError::Protocol(
            "unexpected record type after the handshake",
        )),
    }
}

/// A kernel without TLS rekey support (before Linux 6.14) refuses a second
/// key install with `EBUSY`.
fn rekey_error(e: KtlsError) -> KtlsError {
    match e {
        KtlsError::CryptoRejected { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::EBUSY) | Some(libc::EEXIST) | Some(libc::EINVAL)
            ) =>
        {
            KtlsError::RekeyUnsupported
        }
        other => other,
    }
}

impl KtlsConn<ServerConnectionData> {
    /// Acts on a non-data record received from the client.
    pub fn handle_record(
        &mut self,
        fd: BorrowedFd<'_>,
        content_type: u8,
        payload: &[u8],
    ) -> Result<ControlOutcome, KtlsError> {
        self.handle_common(fd, content_type, payload, |_, _| {
            Err(KtlsError::Protocol("a client sent a NewSessionTicket"))
        })
    }
}

impl KtlsConn<ClientConnectionData> {
    /// Acts on a non-data record received from the server (session tickets
    /// are stored in the client config's resumption store).
    pub fn handle_record(
        &mut self,
        fd: BorrowedFd<'_>,
        content_type: u8,
        payload: &[u8],
    ) -> Result<ControlOutcome, KtlsError> {
        self.handle_common(fd, content_type, payload, |k, msg| {
            k.handle_new_session_ticket(msg).map_err(KtlsError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V13: ProtocolVersion = ProtocolVersion::TLSv1_3;
    const V12: ProtocolVersion = ProtocolVersion::TLSv1_2;

    fn hs(typ: u8, body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u32).to_be_bytes();
        let mut v = vec![typ, len[1], len[2], len[3]];
        v.extend_from_slice(body);
        v
    }

    fn protocol(r: Result<ControlRecord<'_>, KtlsError>) -> &'static str {
        match r {
            Err(KtlsError::Protocol(m)) => m,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn alerts() {
        for v in [V12, V13] {
            assert_eq!(
                parse_control(v, CONTENT_ALERT, &[1, 0]).unwrap(),
                ControlRecord::Alert(ControlOutcome::CloseNotify)
            );
            assert_eq!(
                parse_control(v, CONTENT_ALERT, &[1, ALERT_USER_CANCELED]).unwrap(),
                ControlRecord::Alert(ControlOutcome::Ignored)
            );
            assert!(matches!(
                parse_control(v, CONTENT_ALERT, &[2, 40]),
                Err(KtlsError::PeerAlert(40))
            ));
            assert_eq!(
                protocol(parse_control(v, CONTENT_ALERT, &[1])),
                "malformed alert record"
            );
            assert_eq!(
                protocol(parse_control(v, CONTENT_ALERT, &[1, 0, 0])),
                "malformed alert record"
            );
        }
        // A warning-level alert other than close_notify/user_canceled: fatal
        // in TLS 1.3, ignorable in TLS 1.2 (e.g. no_renegotiation).
        assert!(matches!(
            parse_control(V13, CONTENT_ALERT, &[1, 100]),
            Err(KtlsError::PeerAlert(100))
        ));
        assert_eq!(
            parse_control(V12, CONTENT_ALERT, &[1, 100]).unwrap(),
            ControlRecord::Alert(ControlOutcome::Ignored)
        );
    }

    #[test]
    fn key_update() {
        for (byte, req) in [(0u8, false), (1, true)] {
            assert_eq!(
                parse_control(V13, CONTENT_HANDSHAKE, &hs(HS_KEY_UPDATE, &[byte])).unwrap(),
                ControlRecord::Handshake(vec![HandshakeMessage::KeyUpdate {
                    update_requested: req
                }])
            );
        }
        assert_eq!(
            protocol(parse_control(
                V13,
                CONTENT_HANDSHAKE,
                &hs(HS_KEY_UPDATE, &[2])
            )),
            "malformed KeyUpdate"
        );
        assert_eq!(
            protocol(parse_control(
                V13,
                CONTENT_HANDSHAKE,
                &hs(HS_KEY_UPDATE, &[])
            )),
            "malformed KeyUpdate"
        );
        assert_eq!(
            protocol(parse_control(
                V12,
                CONTENT_HANDSHAKE,
                &hs(HS_KEY_UPDATE, &[0])
            )),
            "KeyUpdate outside TLS 1.3"
        );
        // Nothing may follow a KeyUpdate in its record.
        let mut two = hs(HS_KEY_UPDATE, &[0]);
        two.extend(hs(HS_NEW_SESSION_TICKET, &[1, 2, 3]));
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &two)),
            "KeyUpdate is not the last message of its record"
        );
    }

    #[test]
    fn session_tickets() {
        let mut rec = hs(HS_NEW_SESSION_TICKET, &[9; 40]);
        rec.extend(hs(HS_NEW_SESSION_TICKET, &[7; 3]));
        rec.extend(hs(HS_KEY_UPDATE, &[1]));
        assert_eq!(
            parse_control(V13, CONTENT_HANDSHAKE, &rec).unwrap(),
            ControlRecord::Handshake(vec![
                HandshakeMessage::NewSessionTicket(&[9; 40]),
                HandshakeMessage::NewSessionTicket(&[7; 3]),
                HandshakeMessage::KeyUpdate {
                    update_requested: true
                },
            ])
        );
    }

    #[test]
    fn malformed_handshake_records() {
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &[])),
            "empty handshake record"
        );
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &[4, 0, 0])),
            "truncated handshake message"
        );
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &[4, 0, 0, 10, 1, 2])),
            "handshake message split across records"
        );
        // HelloRequest (TLS 1.2 renegotiation), ClientHello: refused.
        assert_eq!(
            protocol(parse_control(V12, CONTENT_HANDSHAKE, &hs(0, &[]))),
            "unexpected post-handshake message"
        );
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &hs(1, &[0; 8]))),
            "unexpected post-handshake message"
        );
        let many: Vec<u8> = (0..65)
            .flat_map(|_| hs(HS_NEW_SESSION_TICKET, &[]))
            .collect();
        assert_eq!(
            protocol(parse_control(V13, CONTENT_HANDSHAKE, &many)),
            "too many handshake messages in one record"
        );
        for ct in [CONTENT_CHANGE_CIPHER_SPEC, 23, 24, 0] {
            assert_eq!(
                protocol(parse_control(V13, ct, &[1])),
                "unexpected record type after the handshake"
            );
        }
    }
}
