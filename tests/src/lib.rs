//! Test support for the end-to-end tests of `mcp-tls-gateway`.
//!
//! Everything here is deliberately std-only and bounded in time: every socket
//! has read/write timeouts, every loop has a deadline, and every spawned
//! process is killed on drop.  The modules are:
//!
//! * [`pki`]: a throw-away root CA and a `localhost` / `127.0.0.1` leaf (rcgen).
//! * [`gateway`]: locating, spawning, probing and stopping the gateway binary.
//! * [`backend`]: small std::net backends (echo, HTTP responder, counting,
//!   resetting, half-closing, sink+source, ...).
//! * [`client`]: rustls client helpers, including a non-blocking full-duplex
//!   pump that writes and reads one TLS connection at the same time.
//! * [`util`]: temp dirs, ports, payload generators, process helpers.

pub mod backend;
pub mod client;
pub mod corp_pki;
pub mod gateway;
pub mod pki;
pub mod tls_backend;
pub mod util;

pub use backend::{mcp_response_body, Backend, BackendStream, Record, RefusedAddr, Stats};
pub use client::{
    client_config, close_and_drain, connect_tls, echo_roundtrip, pump, read_to_close,
    try_connect_tls, PeerEnd, PumpOpts, PumpOutcome, Tls, TlsStream,
};
pub use gateway::{gateway_bin, Gateway};
pub use pki::Pki;
pub use util::{
    free_port, hex, loopback, raise_nofile_limit, require_tool, run_with_timeout, seeded_bytes,
    sha256, stream_sha256, wait_until, SeededStream, TempDir,
};
