//! `loadgen`: TLS load generator for MCP Streamable-HTTP servers.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use loadgen::client::Workload;
use loadgen::run::{run, RunConfig};
use std::path::PathBuf;
use std::time::Duration;

/// TLS load generator for MCP Streamable-HTTP servers (JSON-RPC POSTs, SSE).
///
/// Every mode drives HTTP/1.1 over rustls (TLS 1.3, one cipher suite,
/// X25519) or plain TCP (`http://` URLs), from `--threads` single-threaded
/// event loops. Latencies go into HdrHistograms (1 ns .. 1 h, 3 significant
/// digits); the report gives p50/p90/p99/p99.9/p99.99/max, throughput and
/// errors by kind, as text, `--json`, an interval log (`--hdr-log`) and a
/// percentile plot (`--plot out.svg`). Runs are bounded by `--duration`
/// and/or `--requests`, after an unmeasured `--warmup`.
///
/// Bodies are deterministic (see `--verify`), and the matching server is
/// `loadgen backend`.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Request/response over keep-alive connections: closed loop (each of
    /// `--connections` sends its next request when the previous response is
    /// in) or open loop (`--rate R` requests/s in total, latency counted
    /// from each request's intended start when the target falls behind:
    /// coordinated-omission correction as in wrk2; the uncorrected
    /// latencies are reported too).
    Rr(RrArgs),
    /// Upload and/or download throughput with large bodies over keep-alive
    /// connections (reports MiB/s).
    Bulk(BulkArgs),
    /// A new TCP connection and full TLS handshake per request (session
    /// resumption off), or resumed handshakes with `--resume` (TLS 1.3
    /// tickets; the report counts how many really resumed).
    Handshake(HandshakeArgs),
    /// Hold `--connections` (thousands) open, each on a long-lived SSE
    /// stream with keep-alive events, for `--duration` — to measure the
    /// target's memory per idle connection.
    Idle(IdleArgs),
    /// The sample MCP backend: HTTP/1.1 keep-alive, `POST` → JSON-RPC
    /// result of `X-Resp-Bytes` bytes (or one SSE event with
    /// `Accept: text/event-stream`), `GET` + `Accept: text/event-stream` →
    /// keep-alive SSE stream, `GET` → bulk body.
    Backend(BackendArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Target URL: https://host:port/path (TLS) or http://host:port/path.
    url: String,
    /// PEM file with the root(s) to trust for https:// targets.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name (default: the URL's host).
    #[arg(long)]
    server_name: Option<String>,
    /// TLS 1.3 cipher suite (rustls name).
    #[arg(long, default_value = "TLS13_AES_128_GCM_SHA256")]
    cipher: String,
    /// Client threads, each an event loop (default: one per core).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Measured duration (after warm-up).
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many measured requests (whichever bound comes first).
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Unmeasured warm-up before the measured window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Per-request timeout (connect + exchange).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Check every received body byte against the expected content
    /// (mismatches count as `verify_mismatch` errors).
    #[arg(long)]
    verify: bool,
    /// Write the report as JSON to FILE (`-` for stdout; the text report
    /// then goes to stderr).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an HdrHistogram interval log (1 s intervals) to FILE.
    #[arg(long, value_name = "FILE")]
    hdr_log: Option<PathBuf>,
    /// Write the percentile plot (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args, Debug)]
struct RrArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// Open loop: total requests per second (omit for closed loop).
    #[arg(long, short = 'R')]
    rate: Option<f64>,
    /// JSON-RPC request body size in bytes.
    #[arg(long, default_value_t = 256)]
    req_bytes: usize,
    /// JSON-RPC response body size in bytes.
    #[arg(long, default_value_t = 256)]
    resp_bytes: usize,
    /// Ask for the response as an SSE event stream (MCP Streamable HTTP).
    #[arg(long)]
    sse: bool,
}

#[derive(Args, Debug)]
struct BulkArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 4)]
    connections: usize,
    /// Body size per transfer.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    bytes: usize,
    /// `down` (server → client), `up` (client → server) or `both`.
    #[arg(long, default_value = "down")]
    direction: String,
}

#[derive(Args, Debug)]
struct HandshakeArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent connection loops.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Resume sessions (TLS 1.3 tickets) instead of full handshakes.
    #[arg(long)]
    resume: bool,
    /// Request body size.
    #[arg(long, default_value_t = 256)]
    req_bytes: usize,
    /// Response body size.
    #[arg(long, default_value_t = 256)]
    resp_bytes: usize,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to hold open.
    #[arg(long, short = 'c', default_value_t = 10_000)]
    connections: usize,
    /// Interval between SSE keep-alive events the backend sends.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    sse_interval: Duration,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    ramp_rate: f64,
    /// Write FILE once all connections are established.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BackendArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: std::net::SocketAddr,
    /// Serving threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn base(mode: &str, c: &Common) -> RunConfig {
    let mut cfg = RunConfig::new(mode, &c.url);
    cfg.ca = c.ca.clone();
    cfg.server_name = c.server_name.clone();
    cfg.cipher = c.cipher.clone();
    cfg.threads = c.threads.unwrap_or_else(cores);
    cfg.duration = c.duration;
    cfg.requests = c.requests;
    cfg.warmup = c.warmup;
    cfg.timeout = c.timeout;
    cfg.verify = c.verify;
    cfg.progress = !c.quiet;
    cfg
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (cfg, common) = match cli.mode {
        Mode::Backend(a) => {
            loadgen::run::raise_nofile();
            let b = loadgen::backend::spawn(a.listen, a.threads.unwrap_or_else(cores))?;
            eprintln!("loadgen backend listening on {}", b.addr);
            for t in b.threads {
                let _ = t.join();
            }
            return Ok(());
        }
        Mode::Rr(a) => {
            let mut cfg = base("rr", &a.common);
            cfg.connections = a.connections;
            cfg.rate = a.rate;
            cfg.req_bytes = a.req_bytes;
            cfg.resp_bytes = a.resp_bytes;
            cfg.sse = a.sse;
            (cfg, a.common)
        }
        Mode::Bulk(a) => {
            let mut cfg = base("bulk", &a.common);
            cfg.connections = a.connections;
            let (up, down) = match a.direction.as_str() {
                "down" => (256, a.bytes),
                "up" => (a.bytes, 256),
                "both" => (a.bytes, a.bytes),
                other => bail!("--direction must be up, down or both, not {other:?}"),
            };
            cfg.req_bytes = up;
            cfg.resp_bytes = down;
            (cfg, a.common)
        }
        Mode::Handshake(a) => {
            let mut cfg = base("handshake", &a.common);
            cfg.workload = Workload::Handshake;
            cfg.connections = a.connections;
            cfg.resume = a.resume;
            cfg.req_bytes = a.req_bytes;
            cfg.resp_bytes = a.resp_bytes;
            (cfg, a.common)
        }
        Mode::Idle(a) => {
            let mut cfg = base("idle", &a.common);
            cfg.workload = Workload::Idle {
                sse_interval: a.sse_interval,
            };
            cfg.connections = a.connections;
            cfg.ramp_rate = a.ramp_rate;
            cfg.ready_file = a.ready_file;
            cfg.warmup = Duration::ZERO;
            (cfg, a.common)
        }
    };
    let out = run(&cfg)?;
    let text = loadgen::report::text(&out.report);
    let json_to_stdout = common.json.as_deref() == Some(std::path::Path::new("-"));
    if json_to_stdout {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    if let Some(p) = &common.json {
        let j = serde_json::to_string_pretty(&out.report)?;
        if json_to_stdout {
            println!("{j}");
        } else {
            std::fs::write(p, j + "\n").with_context(|| format!("writing {}", p.display()))?;
        }
    }
    if let Some(p) = &common.plot {
        let title = format!(
            "{} {} — latency by percentile",
            out.report.mode, out.report.target
        );
        let mut series = vec![("latency", &out.hist)];
        if cfg.rate.is_some() {
            series = vec![("corrected", &out.hist), ("uncorrected", &out.uncorrected)];
        }
        std::fs::write(p, loadgen::report::svg(&title, &series))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &common.hdr_log {
        let bytes = out
            .interval_log
            .render(&format!(
                "loadgen {} {}",
                out.report.mode, out.report.target
            ))
            .map_err(anyhow::Error::msg)?;
        std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
