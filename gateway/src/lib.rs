//! mcp-tls-gateway: a thread-per-core io_uring TLS gateway for MCP servers.
//!
//! Modules, by responsibility:
//! - [`config`]: the TOML format, defaults, flag overrides, validation.
//! - [`tls`]: rustls server configurations from PEM files and policy.
//! - [`certs`]: validated certificate sets, the SNI resolver, mTLS verifier.
//! - [`sniff`]: telling TLS from plaintext, and the plaintext answers.
//! - [`buf`]: fixed-address byte buffers shared with the kernel.
//! - [`session`]: the per-connection protocol state machine (no I/O).
//! - [`uring`]: ring creation and the opcode probe.
//! - [`worker`]: the io_uring event loop of one pinned worker.
//! - [`server`]: binding, starting workers, draining.
//! - [`metrics`]: lock-free per-worker counters.
//! - [`notify`]: systemd readiness notification.
//! - [`offload`]: kernel TLS support detection and the `ktls` setting.

pub mod buf;
pub mod certs;
pub mod config;
pub mod metrics;
pub mod notify;
pub mod offload;
pub mod server;
pub mod session;
pub mod sniff;
pub mod tls;
pub mod uring;
pub mod worker;
