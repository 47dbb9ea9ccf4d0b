//! `mcp-tls-gateway`: the command-line front end.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gateway::config::{parse_duration, Config, LogFormat, Overrides};
use gateway::server::Gateway;
use tracing::{info, warn};

mod demo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// TLS gateway for MCP servers: thread-per-core io_uring, rustls.
///
/// Common case:
///   mcp-tls-gateway --listen 127.0.0.1:8443 --cert chain.pem --key key.pem --backend 127.0.0.1:9100
#[derive(Parser, Debug)]
#[command(
    name = "mcp-tls-gateway",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file (and the certificates it names), then exit.
    CheckConfig {
        /// Path to gateway.toml.
        file: PathBuf,
    },
    /// Self-contained demo: throwaway certificate, sample MCP backend, the
    /// gateway, and a few seconds of traffic through it.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// TOML configuration file (flags below override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on for TLS, e.g. 127.0.0.1:8443.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// PEM certificate chain, leaf first.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Plaintext backend: HOST:PORT or unix:/path.
    #[arg(long, value_name = "ADDR")]
    backend: Option<String>,
    /// Worker threads (default: one per online core).
    #[arg(long)]
    workers: Option<usize>,
    /// Maximum open connections per worker.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Time allowed from accept to a finished handshake (default 10s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    handshake_timeout: Option<Duration>,
    /// Close connections idle this long (default 10m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    idle_timeout: Option<Duration>,
    /// After SIGTERM, time live connections get to finish (default 30s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    drain_timeout: Option<Duration>,
    /// Backend connect timeout (default 5s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    backend_connect_timeout: Option<Duration>,
    /// TLS versions to accept, e.g. 1.2,1.3 or 1.3.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    tls_versions: Option<Vec<String>>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log filter: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Kernel TLS offload: auto (when the kernel supports it), require
    /// (refuse to start without it), off (records in user space).
    #[arg(long, value_name = "MODE")]
    ktls: Option<gateway::offload::KtlsMode>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormatArg {
    Text,
    Json,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            backend: self.backend.clone(),
            workers: self.workers,
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
            backend_connect_timeout: self.backend_connect_timeout,
            tls_versions: self.tls_versions.clone(),
            log_format: self.log_format.map(|f| match f {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            }),
            log_level: self.log_level.clone(),
            ktls: self.ktls,
        }
    }

    fn config(&self) -> Result<Config> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        cfg.apply(self.overrides())?;
        Ok(cfg)
    }
}

fn init_logs(format: LogFormat, level: &str) {
    // rustls logs some client mistakes (e.g. an IP address as SNI) at warn
    // for every handshake: any client could flood our log with them, so
    // they are kept to errors unless RUST_LOG says otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(format!("{level},rustls=error")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Demo(args)) => demo::run(args),
        None => serve(&cli.run),
    };
    if let Err(e) = result {
        eprintln!("mcp-tls-gateway: error: {e:#}");
        std::process::exit(1);
    }
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let cfg = Config::from_file(file)?;
    let listeners = cfg.validate()?;
    // Loads and validates every certificate, CRL, client CA and ticket key
    // exactly as start-up does.
    gateway::reload::TlsState::load(&cfg.tls, &listeners, false)?;
    for l in &listeners {
        gateway::server::upstream_tls(&cfg.tls, l)?;
    }
    if let Some(path) = &cfg.admin.token_file {
        std::fs::read_to_string(path)
            .with_context(|| format!("admin.token_file {}", path.display()))?;
    }
    println!(
        "{}: OK ({} listener{}, {} worker{})",
        file.display(),
        listeners.len(),
        if listeners.len() == 1 { "" } else { "s" },
        cfg.worker_count(),
        if cfg.worker_count() == 1 { "" } else { "s" },
    );
    Ok(())
}

fn serve(args: &RunArgs) -> Result<()> {
    let cfg = args.config()?;
    init_logs(cfg.log.format, &cfg.log.level);
    let gw = Gateway::start(&cfg)?;
    gateway::notify::notify("READY=1");
    wait_for_signals(&gw, cfg.timeouts.drain)?;
    let snap = gw.join().context("worker failed")?;
    let counters: Vec<String> = snap
        .pairs()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info!(counters = %counters.join(" "), "stopped");
    Ok(())
}

/// Blocks until the workers exit. The first SIGTERM/SIGINT starts a drain;
/// a second one closes everything at once.
pub(crate) fn wait_for_signals(gw: &Gateway, drain: Duration) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .context("installing signal handlers")?;
    let mut draining = false;
    loop {
        for sig in signals.pending() {
            if sig == SIGHUP {
                gateway::notify::notify("RELOADING=1");
                // Errors are logged (and counted) by the reload itself; the
                // previous certificates keep serving.
                let _ = gw.reload();
                gateway::notify::notify("READY=1");
                continue;
            }
            if sig == SIGUSR1 {
                gw.reopen_audit();
                continue;
            }
            if !draining {
                draining = true;
                info!(signal = sig, drain = ?drain, "draining: no new connections; open ones may finish");
                gateway::notify::notify("STOPPING=1");
                gw.begin_drain();
            } else {
                warn!(signal = sig, "second signal: closing all connections now");
                gw.force_close();
            }
        }
        if gw.finished() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
