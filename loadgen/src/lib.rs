//! `loadgen`: a TLS load generator for MCP Streamable-HTTP servers (rustls
//! clients, hdrhistogram latencies, coordinated-omission-corrected open
//! loop), and the sample MCP backend the benchmarks put behind every target.

pub mod backend;
pub mod body;
pub mod client;
pub mod http;
pub mod report;
pub mod run;
pub mod stats;
