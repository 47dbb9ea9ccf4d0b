//! Kernel TLS (kTLS) for rustls connections.
//!
//! After rustls finishes a handshake, the record layer can move into the
//! kernel: the socket gets the `tls` upper-layer protocol (`TCP_ULP`), then
//! the traffic keys for each direction (`TLS_TX`, `TLS_RX`). From then on,
//! plain `send`/`recv`/`splice` on the socket carry application data and the
//! kernel encrypts and decrypts the records.
//!
//! - [`crypto`]: rustls traffic secrets → the kernel's `tls12_crypto_info_*`
//!   structs (from `ktls-sys`).
//! - [`sock`]: the socket options, and sending/receiving non-data records
//!   (alerts, handshake messages) with `TLS_SET_RECORD_TYPE` /
//!   `TLS_GET_RECORD_TYPE` control messages.
//! - [`conn`]: [`conn::KtlsConn`], the state that remains after offload:
//!   rustls' `KernelConnection` for key updates, record accounting against
//!   the AEAD confidentiality limit, and control-record handling
//!   (close_notify, KeyUpdate, NewSessionTicket).
//! - [`probe`]: what this host's kernel supports, tried for real on loopback
//!   sockets ([`probe()`], [`ulp_available`], [`ProbeReport::can_offload`]).
//!
//! Why not the `ktls` crate: it is built around tokio streams (it pulls in
//! tokio and futures and wraps `AsyncRead`/`AsyncWrite`), while our data plane
//! is a thread-per-core io_uring loop on raw descriptors. We use its
//! companion `ktls-sys` for the kernel's struct layouts.

pub mod conn;
pub mod crypto;
pub mod probe;
pub mod sock;

pub use conn::{parse_control, ControlOutcome, ControlRecord, HandshakeMessage, KtlsConn};
pub use crypto::{Cipher, CryptoInfo};
pub use probe::{probe, ulp_available, ProbeReport};
pub use sock::Direction;

/// Errors from kernel TLS set-up and control records.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("kernel TLS is not available: {0}")]
    Unavailable(std::io::Error),
    #[error("the kernel refused the {dir} keys for {cipher}: {source}")]
    CryptoRejected {
        dir: Direction,
        cipher: Cipher,
        source: std::io::Error,
    },
    #[error("cipher suite {0:?} has no kernel TLS equivalent")]
    UnsupportedSuite(rustls::CipherSuite),
    #[error("TLS version {0:?} is not supported by kernel TLS")]
    UnsupportedVersion(rustls::ProtocolVersion),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("this kernel cannot install new TLS 1.3 keys on a socket (KeyUpdate); closing")]
    RekeyUnsupported,
    #[error("peer sent a fatal alert ({0})")]
    PeerAlert(u8),
    #[error("protocol error in a control record: {0}")]
    Protocol(&'static str),
    #[error("confidentiality limit of the cipher suite reached")]
    ConfidentialityLimit,
}
