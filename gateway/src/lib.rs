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
//! - [`admin`]: the admin HTTP API (metrics, sessions, certificates, health) on its own thread.
//! - [`prom`]: a tiny Prometheus text-format writer.
//! - [`upstream`]: the rustls client configuration for TLS to the backend.
//! - [`audit`]: per-session JSON-lines audit records, written off the data path.
//! - [`proxy_v2`]: PROXY protocol v2 headers (with TLS TLVs) for backends.
//! - [`tickets`]: stateless TLS session tickets with keys from files.
//! - [`reload`]: rotating TLS material (certificates, CRLs, ticket keys) without dropping connections.
//! - [`maintenance`]: expiry warnings, file-change reloads, and the admin API glue.
//! - [`exporter`]: the Prometheus exposition.

pub mod admin;
pub mod audit;
pub mod buf;
pub mod certs;
pub mod config;
pub mod exporter;
pub mod maintenance;
pub mod metrics;
pub mod notify;
pub mod offload;
pub mod prom;
pub mod proxy_v2;
pub mod reload;
pub mod server;
pub mod session;
pub mod sniff;
pub mod tickets;
pub mod tls;
pub mod upstream;
pub mod uring;
pub mod worker;
