//! `bench`: the gateway and its peers (nginx `stream`, HAProxy, hitch,
//! stunnel) side by side, same machine, same traffic, same run.
//!
//! `bench compare [--quick]` starts the sample backend, the gateway and
//! every peer (installing missing peers from Debian), configured alike
//! (same ECDSA P-256 or RSA-2048 certificate, TLS 1.3 only,
//! TLS_AES_128_GCM_SHA256, X25519, one worker per core, same backend), then
//! runs each scenario in rounds that rotate the target order, and prints
//! medians, spread and gateway/best-peer ratios — for throughput and for the
//! target's CPU time per request or connection (from `/proc`).

mod procfs;
mod splice;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    version,
    about = "Gateway vs nginx/HAProxy/hitch/stunnel, side by side"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run every scenario against every target and print the ratio table.
    Compare(CompareArgs),
    /// (internal) plaintext splice(2) proxy used as a ceiling.
    SpliceProxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        backend: SocketAddr,
    },
}

#[derive(Args, Debug, Clone)]
struct CompareArgs {
    /// Short form (under 2 minutes): fewer scenarios, 1 s runs, 3 rounds.
    #[arg(long)]
    quick: bool,
    /// Label for the results file names (default: quick or full).
    #[arg(long)]
    label: Option<String>,
    /// Rounds per scenario (at least 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Measured seconds per run (default 1 quick, 5 full).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Comma-separated targets (gateway,nginx,haproxy,hitch,stunnel).
    #[arg(long, default_value = "gateway,nginx,haproxy,hitch,stunnel")]
    targets: String,
    /// Idle connections per target (default 10000 full, 1000 quick).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Redo a run whose CPU steal (from /proc/stat) exceeds this fraction.
    #[arg(long, default_value_t = 0.05)]
    max_steal: f64,
    /// Where to write <date>-<label>.json and .md.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Do not run `cargo build` for the gateway and loadgen first.
    #[arg(long)]
    no_build: bool,
    /// Only these scenarios (comma-separated: small-closed, small-open,
    /// bulk, handshake-ecdsa, handshake-rsa, handshake-resumed, idle).
    #[arg(long)]
    only: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SpliceProxy { listen, backend } => splice::serve(listen, backend),
        Cmd::Compare(a) => compare(a),
    }
}

// ---------------------------------------------------------------- helpers

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd} {args:?} failed: {s}");
    }
    Ok(s)
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn wait_port(port: u16, child: &mut Child, name: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{name} exited at start-up ({st})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{name} did not listen on {port} within 10 s")
}

/// SIGTERM, then after 1 s SIGKILL to the child and every descendant
/// (nginx and hitch workers included).
fn stop(child: &mut Child) {
    let pid = child.id();
    let tree = procfs::tree(pid);
    // SAFETY: signalling our own child by its pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for p in tree {
        // SAFETY: these are our child and its descendants, collected above;
        // a pid that already exited may at worst be gone (ESRCH).
        unsafe {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// The current soft open-files limit (what the targets inherit).
fn nofile_limit() -> u64 {
    // SAFETY: getrlimit on a struct we own.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            return rl.rlim_cur;
        }
    }
    1024
}

/// Lifts the open-files limit (root may raise the hard limit) so the
/// targets, inheriting it, can hold 10k idle connections plus their backend
/// sides.
fn raise_nofile_hard() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let want: libc::rlim_t = 262_144;
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_max < want {
            let up = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &up);
        }
    }
    loadgen::run::raise_nofile();
}

fn render(template: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

// ------------------------------------------------------------ preparation

struct Pkg {
    target: &'static str,
    probe: &'static str,
    package: &'static str,
}

const PKGS: &[Pkg] = &[
    Pkg {
        target: "nginx",
        probe: "/usr/sbin/nginx",
        package: "nginx",
    },
    Pkg {
        target: "nginx",
        probe: "/usr/lib/nginx/modules/ngx_stream_module.so",
        package: "libnginx-mod-stream",
    },
    Pkg {
        target: "haproxy",
        probe: "/usr/sbin/haproxy",
        package: "haproxy",
    },
    Pkg {
        target: "hitch",
        probe: "/usr/sbin/hitch",
        package: "hitch",
    },
    Pkg {
        target: "stunnel",
        probe: "/usr/bin/stunnel4",
        package: "stunnel4",
    },
    Pkg {
        target: "tools",
        probe: "/usr/bin/openssl",
        package: "openssl",
    },
];

/// Installs missing peers from Debian (as root); returns targets that
/// remain unavailable.
fn ensure_packages(wanted: &[String]) -> Vec<String> {
    let missing: Vec<&Pkg> = PKGS
        .iter()
        .filter(|p| {
            (p.target == "tools" || wanted.iter().any(|w| w == p.target))
                && !Path::new(p.probe).exists()
        })
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|p| p.package).collect();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("bench: installing {} (apt-get)", names.join(" "));
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&names)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
            // Debian starts the packaged services; the bench runs its own.
            for svc in ["nginx", "haproxy", "hitch", "stunnel4"] {
                let _ = Command::new("systemctl")
                    .args(["stop", svc])
                    .stderr(Stdio::null())
                    .stdout(Stdio::null())
                    .status();
            }
        } else {
            eprintln!(
                "bench: missing {} and not root; skipping those targets",
                names.join(" ")
            );
        }
    }
    PKGS.iter()
        .filter(|p| p.target != "tools" && !Path::new(p.probe).exists())
        .map(|p| p.target.to_string())
        .collect()
}

struct Certs {
    ca: PathBuf,
    ecdsa: (PathBuf, PathBuf, PathBuf),
    rsa: (PathBuf, PathBuf, PathBuf),
}

/// A throwaway CA, and ECDSA P-256 and RSA-2048 leaves for localhost and
/// 127.0.0.1 (chain, key, chain+key for hitch and HAProxy).
fn make_certs(dir: &Path) -> Result<Certs> {
    let p = |n: &str| dir.join(n);
    let s = |x: &PathBuf| x.to_string_lossy().into_owned();
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            &s(&p("ca.key")),
            "-out",
            &s(&p("ca.pem")),
            "-days",
            "30",
            "-subj",
            "/CN=bench CA",
        ],
    )?;
    let ext = p("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")?;
    let leaf = |name: &str, newkey: &[&str]| -> Result<(PathBuf, PathBuf, PathBuf)> {
        let key = p(&format!("{name}.key"));
        let csr = p(&format!("{name}.csr"));
        let crt = p(&format!("{name}.pem"));
        let mut a = vec!["req", "-new", "-nodes"];
        a.extend_from_slice(newkey);
        let (ks, cs) = (s(&key), s(&csr));
        a.extend_from_slice(&["-keyout", &ks, "-out", &cs, "-subj", "/CN=localhost"]);
        sh("openssl", &a)?;
        sh(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &cs,
                "-CA",
                &s(&p("ca.pem")),
                "-CAkey",
                &s(&p("ca.key")),
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &s(&crt),
                "-extfile",
                &s(&ext),
            ],
        )?;
        let combined = p(&format!("{name}-combined.pem"));
        let mut both = std::fs::read(&crt)?;
        both.extend_from_slice(&std::fs::read(&key)?);
        std::fs::write(&combined, both)?;
        Ok((crt, key, combined))
    };
    let ecdsa = leaf(
        "ecdsa",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    )?;
    let rsa = leaf("rsa", &["-newkey", "rsa:2048"])?;
    Ok(Certs {
        ca: p("ca.pem"),
        ecdsa,
        rsa,
    })
}

// ---------------------------------------------------------------- targets

#[derive(Debug, Clone, Copy, PartialEq)]
struct TargetCfg {
    rsa: bool,
    /// Session tickets and caches on (resumed-handshake row) or off.
    resumption: bool,
}

struct Running {
    name: String,
    /// Our child (None for ceilings run by someone else).
    child: Option<Child>,
    /// Root of the process tree whose CPU and memory are the target's.
    pid: u32,
    url: String,
}

struct Ctx {
    dir: PathBuf,
    bin: PathBuf,
    certs: Certs,
    backend_port: u16,
    workers: usize,
}

/// New idle connections per second (below the targets' full-handshake rate
/// on 2 cores, which the client shares).
const IDLE_RAMP_RATE: f64 = 1000.0;

const T_NGINX: &str = include_str!("../templates/nginx.conf");
const T_HAPROXY: &str = include_str!("../templates/haproxy.cfg");
const T_HITCH: &str = include_str!("../templates/hitch.conf");
const T_STUNNEL: &str = include_str!("../templates/stunnel.conf");
const T_GATEWAY: &str = include_str!("../templates/gateway.toml");

fn start_target(ctx: &Ctx, name: &str, cfg: TargetCfg) -> Result<Running> {
    let port = free_port()?;
    let dir = ctx.dir.join(format!("{name}-{port}"));
    std::fs::create_dir_all(&dir)?;
    let (chain, key, combined) = if cfg.rsa {
        &ctx.certs.rsa
    } else {
        &ctx.certs.ecdsa
    };
    let mut v: BTreeMap<&str, String> = BTreeMap::new();
    v.insert("dir", dir.display().to_string());
    v.insert("port", port.to_string());
    v.insert("backend_port", ctx.backend_port.to_string());
    v.insert("workers", ctx.workers.to_string());
    v.insert(
        "maxconn",
        ((nofile_limit().saturating_sub(200)) / 2)
            .max(1000)
            .to_string(),
    );
    v.insert("chain", chain.display().to_string());
    v.insert("key", key.display().to_string());
    v.insert("combined", combined.display().to_string());
    let on = cfg.resumption;
    v.insert("tickets_on_off", if on { "on" } else { "off" }.into());
    v.insert(
        "nginx_cache",
        if on { "shared:SSL:20m" } else { "off" }.into(),
    );
    v.insert(
        "haproxy_tickets",
        if on { "" } else { "no-tls-tickets" }.into(),
    );
    v.insert("haproxy_cachesize", if on { "20000" } else { "0" }.into());
    v.insert("gateway_tickets", if on { "true" } else { "false" }.into());
    v.insert("gateway_cache", if on { "20000" } else { "0" }.into());
    v.insert(
        "stunnel_tickets",
        if on {
            ""
        } else {
            "options = NO_TICKET\nsessionCacheSize = 1\nsessionCacheTimeout = 1"
        }
        .into(),
    );
    let (cmd, args, conf): (PathBuf, Vec<String>, (String, &str)) = match name {
        "gateway" => (
            ctx.bin.join("mcp-tls-gateway"),
            vec![
                "--config".into(),
                dir.join("gateway.toml").display().to_string(),
            ],
            ("gateway.toml".into(), T_GATEWAY),
        ),
        "nginx" => (
            "nginx".into(),
            vec![
                "-c".into(),
                dir.join("nginx.conf").display().to_string(),
                "-p".into(),
                dir.display().to_string(),
            ],
            ("nginx.conf".into(), T_NGINX),
        ),
        "haproxy" => (
            "haproxy".into(),
            vec![
                "-db".into(),
                "-f".into(),
                dir.join("haproxy.cfg").display().to_string(),
            ],
            ("haproxy.cfg".into(), T_HAPROXY),
        ),
        "hitch" => (
            "hitch".into(),
            // Session cache off is hitch's default; it has no ticket switch.
            vec![
                format!("--config={}", dir.join("hitch.conf").display()),
                "--user=nobody".into(),
            ],
            ("hitch.conf".into(), T_HITCH),
        ),
        "stunnel" => (
            "stunnel4".into(),
            vec![dir.join("stunnel.conf").display().to_string()],
            ("stunnel.conf".into(), T_STUNNEL),
        ),
        other => bail!("unknown target {other}"),
    };
    std::fs::write(dir.join(&conf.0), render(conf.1, &v))?;
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let mut child = Command::new(&cmd)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    if let Err(e) = wait_port(port, &mut child, name) {
        stop(&mut child);
        let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        bail!("{e}\n{log}");
    }
    Ok(Running {
        name: name.into(),
        pid: child.id(),
        child: Some(child),
        url: format!("https://127.0.0.1:{port}/mcp"),
    })
}

// -------------------------------------------------------------- scenarios

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Scenario {
    SmallClosed,
    SmallOpen,
    Bulk,
    HandshakeFullEcdsa,
    HandshakeFullRsa,
    HandshakeResumed,
    Idle,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::SmallClosed,
        Scenario::SmallOpen,
        Scenario::Bulk,
        Scenario::HandshakeFullEcdsa,
        Scenario::HandshakeFullRsa,
        Scenario::HandshakeResumed,
        Scenario::Idle,
    ];

    /// The name `--only` takes.
    fn key(self) -> &'static str {
        match self {
            Scenario::SmallClosed => "small-closed",
            Scenario::SmallOpen => "small-open",
            Scenario::Bulk => "bulk",
            Scenario::HandshakeFullEcdsa => "handshake-ecdsa",
            Scenario::HandshakeFullRsa => "handshake-rsa",
            Scenario::HandshakeResumed => "handshake-resumed",
            Scenario::Idle => "idle",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::SmallClosed => "small requests, closed loop (32 conns, 256 B/256 B)",
            Scenario::SmallOpen => "small requests, open loop (32 conns, fixed rate)",
            Scenario::Bulk => "bulk (4 conns, 8 MiB (quick: 4 MiB) up + down per request)",
            Scenario::HandshakeFullEcdsa => "full handshakes, ECDSA P-256 (16 conn loops)",
            Scenario::HandshakeFullRsa => "full handshakes, RSA-2048 (16 conn loops)",
            Scenario::HandshakeResumed => "resumed handshakes, tickets on (16 conn loops)",
            Scenario::Idle => "idle SSE connections",
        }
    }
    fn cfg(self) -> TargetCfg {
        TargetCfg {
            rsa: self == Scenario::HandshakeFullRsa,
            resumption: self == Scenario::HandshakeResumed,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct RunResult {
    target: String,
    round: usize,
    /// Main throughput: req/s, handshakes/s or MiB/s.
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    requests: u64,
    errors: u64,
    resumed: u64,
    target_cpu_s: f64,
    backend_cpu_s: f64,
    client_cpu_s: f64,
    /// Target CPU µs per request/connection (bulk: per MiB).
    target_cpu_us_per_unit: f64,
    steal: f64,
    redone: u32,
    /// Idle: proportional set size added per connection, bytes.
    pss_per_conn_b: f64,
    established: u64,
}

struct Plan {
    quick: bool,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    idle_conns: usize,
    max_steal: f64,
    threads: usize,
}

fn loadgen_args(
    plan: &Plan,
    s: Scenario,
    url: &str,
    ca: &Path,
    rate: Option<f64>,
    ready: &Path,
) -> Vec<String> {
    let d = format!("{}ms", plan.duration.as_millis());
    let w = format!("{}ms", plan.warmup.as_millis());
    let mut a: Vec<String> = match s {
        Scenario::SmallClosed | Scenario::SmallOpen => {
            let mut a = vec![
                "rr".into(),
                url.into(),
                "-c".into(),
                "32".into(),
                "--req-bytes".into(),
                "256".into(),
                "--resp-bytes".into(),
                "256".into(),
            ];
            if let Some(r) = rate {
                a.extend(["-R".into(), format!("{r:.0}")]);
            }
            a
        }
        Scenario::Bulk => vec![
            "bulk".into(),
            url.into(),
            "-c".into(),
            "4".into(),
            "--bytes".into(),
            (8 * 1024 * 1024).to_string(),
            "--direction".into(),
            "both".into(),
        ],
        Scenario::HandshakeFullEcdsa | Scenario::HandshakeFullRsa => {
            vec!["handshake".into(), url.into(), "-c".into(), "16".into()]
        }
        Scenario::HandshakeResumed => vec![
            "handshake".into(),
            url.into(),
            "-c".into(),
            "16".into(),
            "--resume".into(),
        ],
        Scenario::Idle => {
            // Below the targets' full-handshake rate on 2 cores (which the
            // client shares), so the ramp itself does not overload them.
            let ramp = IDLE_RAMP_RATE;
            let hold = plan.idle_conns as f64 / ramp * 1.5 + if plan.quick { 1.5 } else { 3.0 };
            return vec![
                "idle".into(),
                url.into(),
                "-c".into(),
                plan.idle_conns.to_string(),
                "--ramp-rate".into(),
                ramp.to_string(),
                "--sse-interval".into(),
                "1s".into(),
                "--ready-file".into(),
                ready.display().to_string(),
                "-d".into(),
                format!("{}ms", (hold * 1000.0) as u64),
                "-q".into(),
                "--ca".into(),
                ca.display().to_string(),
                "-t".into(),
                plan.threads.to_string(),
                "--timeout".into(),
                "30s".into(),
            ];
        }
    };
    a.extend([
        "-d".into(),
        d,
        "--warmup".into(),
        w,
        "-q".into(),
        "--ca".into(),
        ca.display().to_string(),
        "-t".into(),
        plan.threads.to_string(),
    ]);
    a
}

fn run_once(
    ctx: &Ctx,
    plan: &Plan,
    backend_pid: u32,
    t: &Running,
    s: Scenario,
    rate: Option<f64>,
) -> Result<RunResult> {
    let json = ctx.dir.join("last.json");
    let ready = ctx.dir.join("ready");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&ready);
    let mut args = loadgen_args(plan, s, &t.url, &ctx.certs.ca, rate, &ready);
    args.extend(["--json".into(), json.display().to_string()]);
    let pid = t.pid;
    let pss0 = if s == Scenario::Idle {
        procfs::tree_pss_kib(pid)
    } else {
        0
    };
    let (st0, tot0) = procfs::steal_total();
    let c0 = procfs::tree_cpu(pid);
    let b0 = procfs::tree_cpu(backend_pid);
    let mut lg = Command::new(ctx.bin.join("loadgen"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting loadgen")?;
    let limit = Instant::now() + plan.duration + plan.warmup + Duration::from_secs(60);
    // Idle: sample memory once every connection is up (loadgen's ready
    // file), or, if a few never come up, once the ramp is over anyway.
    let sample_by =
        Instant::now() + Duration::from_secs_f64(plan.idle_conns as f64 / IDLE_RAMP_RATE + 3.0);
    let mut pss1 = pss0;
    let mut sampled = false;
    loop {
        if let Some(st) = lg.try_wait()? {
            if !st.success() {
                let mut e = String::new();
                if let Some(mut se) = lg.stderr.take() {
                    use std::io::Read;
                    let _ = se.read_to_string(&mut e);
                }
                bail!("loadgen failed against {}: {e}", t.name);
            }
            break;
        }
        if s == Scenario::Idle && !sampled && (ready.exists() || Instant::now() >= sample_by) {
            std::thread::sleep(Duration::from_millis(500));
            pss1 = procfs::tree_pss_kib(pid);
            sampled = true;
        }
        if Instant::now() > limit {
            let _ = lg.kill();
            let _ = lg.wait();
            bail!("loadgen overran its time bound against {}", t.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let c1 = procfs::tree_cpu(pid);
    let b1 = procfs::tree_cpu(backend_pid);
    let (st1, tot1) = procfs::steal_total();
    let r: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let lat = |k: &str| r["latency_us"][k].as_f64().unwrap_or(0.0);
    let all_requests = u("requests") + u("warmup_requests");
    let target_cpu = c1 - c0;
    let (throughput, per_unit) = match s {
        Scenario::Bulk => {
            let mib = (u("bytes_in") + u("bytes_out")) as f64 / (1024.0 * 1024.0);
            let frac = f("duration_s") / (f("duration_s") + f("warmup_s")).max(1e-9);
            (
                f("mib_per_s"),
                target_cpu * 1e6 / (mib / frac.max(1e-9)).max(1e-9),
            )
        }
        Scenario::Idle => (
            u("established") as f64,
            target_cpu * 1e6 / (u("established").max(1) as f64),
        ),
        _ => (
            f("requests_per_s"),
            target_cpu * 1e6 / all_requests.max(1) as f64,
        ),
    };
    let est = u("established");
    Ok(RunResult {
        target: t.name.clone(),
        round: 0,
        throughput,
        p50_us: lat("p50"),
        p99_us: lat("p99"),
        p999_us: lat("p999"),
        max_us: lat("max"),
        requests: u("requests"),
        errors: u("errors_total"),
        resumed: u("resumed"),
        target_cpu_s: target_cpu,
        backend_cpu_s: b1 - b0,
        client_cpu_s: f("client_cpu_s"),
        target_cpu_us_per_unit: per_unit,
        steal: (st1 - st0) as f64 / (tot1.saturating_sub(tot0)).max(1) as f64,
        redone: 0,
        pss_per_conn_b: if est > 0 && sampled {
            (pss1.saturating_sub(pss0)) as f64 * 1024.0 / est as f64
        } else {
            f64::NAN
        },
        established: est,
    })
}

// ---------------------------------------------------------------- summary

#[derive(Debug, Clone, Default, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    /// (max - min) / median.
    spread: f64,
}

fn stat(v: &[f64]) -> Stat {
    if v.is_empty() {
        return Stat::default();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stat {
        median,
        min: s[0],
        max: s[n - 1],
        spread: if median != 0.0 {
            (s[n - 1] - s[0]) / median
        } else {
            0.0
        },
    }
}

#[derive(Debug, Clone, Serialize)]
struct Metric {
    name: String,
    unit: String,
    higher_is_better: bool,
    per_target: BTreeMap<String, Stat>,
    best_peer: Option<String>,
    /// gateway median / best peer median.
    ratio: Option<f64>,
    /// The issue's goal for the ratio (or absolute value), if any.
    goal: Option<String>,
    met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct ScenarioResult {
    scenario: Scenario,
    title: String,
    rate: Option<f64>,
    runs: Vec<RunResult>,
    metrics: Vec<Metric>,
    notes: Vec<String>,
}

fn metric(
    runs: &[RunResult],
    ceilings: &[String],
    name: &str,
    unit: &str,
    higher: bool,
    get: impl Fn(&RunResult) -> f64,
    goal: Option<(f64, bool)>, // (threshold on ratio, ratio must be >=)
) -> Metric {
    let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        let v = get(r);
        // NaN marks a value the run could not measure.
        if !v.is_nan() {
            per.entry(r.target.clone()).or_default().push(v);
        }
    }
    let per_target: BTreeMap<String, Stat> =
        per.iter().map(|(k, v)| (k.clone(), stat(v))).collect();
    let peers: Vec<(&String, &Stat)> = per_target
        .iter()
        .filter(|(k, _)| k.as_str() != "gateway" && !ceilings.contains(k))
        .collect();
    let best = peers
        .iter()
        .copied()
        .reduce(|a, b| {
            let better = if higher {
                b.1.median > a.1.median
            } else {
                b.1.median < a.1.median
            };
            if better {
                b
            } else {
                a
            }
        })
        .map(|(k, v)| (k.clone(), v.median));
    let ratio = match (per_target.get("gateway"), &best) {
        (Some(g), Some((_, b))) if *b != 0.0 => Some(g.median / b),
        _ => None,
    };
    let (goal_s, met) = match (goal, ratio) {
        (Some((th, ge)), Some(r)) => (
            Some(format!("{} {th}×", if ge { "≥" } else { "≤" })),
            Some(if ge { r >= th } else { r <= th }),
        ),
        (Some((th, ge)), None) => (Some(format!("{} {th}×", if ge { "≥" } else { "≤" })), None),
        _ => (None, None),
    };
    Metric {
        name: name.into(),
        unit: unit.into(),
        higher_is_better: higher,
        per_target,
        best_peer: best.map(|(k, _)| k),
        ratio,
        goal: goal_s,
        met,
    }
}

fn summarize(s: Scenario, runs: &[RunResult], ceilings: &[String]) -> Vec<Metric> {
    let m = |n: &str, u: &str, h: bool, g: fn(&RunResult) -> f64, goal| {
        metric(runs, ceilings, n, u, h, g, goal)
    };
    match s {
        Scenario::SmallClosed => vec![
            m(
                "throughput",
                "req/s",
                true,
                |r| r.throughput,
                Some((1.5, true)),
            ),
            m("p99 latency", "µs", false, |r| r.p99_us, Some((0.7, false))),
            m(
                "target CPU per request",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                Some((0.5, false)),
            ),
        ],
        Scenario::SmallOpen => vec![
            m("p50 latency", "µs", false, |r| r.p50_us, None),
            m(
                "p99 latency (CO-corrected)",
                "µs",
                false,
                |r| r.p99_us,
                Some((0.7, false)),
            ),
            m("p99.9 latency", "µs", false, |r| r.p999_us, None),
            m(
                "target CPU per request",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                Some((0.5, false)),
            ),
        ],
        Scenario::Bulk => vec![
            m(
                "throughput",
                "MiB/s",
                true,
                |r| r.throughput,
                Some((1.3, true)),
            ),
            m(
                "target CPU per MiB",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                None,
            ),
        ],
        Scenario::HandshakeFullEcdsa => vec![
            m(
                "handshakes/s",
                "1/s",
                true,
                |r| r.throughput,
                Some((1.5, true)),
            ),
            m(
                "target CPU per handshake",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                Some((0.4, false)),
            ),
            m("p99 connect+request", "µs", false, |r| r.p99_us, None),
        ],
        Scenario::HandshakeFullRsa => vec![
            m("handshakes/s", "1/s", true, |r| r.throughput, None),
            m(
                "target CPU per handshake",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                None,
            ),
        ],
        Scenario::HandshakeResumed => vec![
            m("handshakes/s", "1/s", true, |r| r.throughput, None),
            m(
                "resumed fraction",
                "",
                true,
                |r| {
                    if r.requests > 0 {
                        r.resumed as f64 / r.requests as f64
                    } else {
                        0.0
                    }
                },
                None,
            ),
            m(
                "target CPU per handshake",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                None,
            ),
        ],
        Scenario::Idle => vec![
            m(
                "memory per idle connection (PSS)",
                "B",
                false,
                |r| r.pss_per_conn_b,
                None,
            ),
            m(
                "target CPU per connection (setup + SSE)",
                "µs",
                false,
                |r| r.target_cpu_us_per_unit,
                None,
            ),
            m(
                "connections established",
                "",
                true,
                |r| r.established as f64,
                None,
            ),
        ],
    }
}

// ---------------------------------------------------------------- compare

struct Ceilings {
    aes_gcm_seal_mib_s: Option<f64>,
    aes_line: String,
}

fn openssl_aes() -> Ceilings {
    // One core, 16 KiB records (the TLS maximum), EVP AES-128-GCM.
    match sh(
        "openssl",
        &[
            "speed",
            "-seconds",
            "1",
            "-bytes",
            "16384",
            "-evp",
            "aes-128-gcm",
        ],
    ) {
        Ok(out) => {
            let line = out
                .lines()
                .rev()
                .find(|l| l.starts_with("AES-128-GCM") || l.starts_with("aes-128-gcm"));
            let v = line
                .and_then(|l| l.split_whitespace().last())
                .and_then(|x| x.trim_end_matches('k').parse::<f64>().ok())
                .map(|kb| kb * 1000.0 / (1024.0 * 1024.0));
            Ceilings {
                aes_gcm_seal_mib_s: v,
                aes_line: line.unwrap_or("").trim().to_string(),
            }
        }
        Err(e) => Ceilings {
            aes_gcm_seal_mib_s: None,
            aes_line: format!("openssl speed failed: {e}"),
        },
    }
}

fn fmt_val(v: f64, unit: &str) -> String {
    if unit.is_empty() && v <= 1.0 {
        format!("{v:.2}")
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table(results: &[ScenarioResult], targets: &[String]) -> String {
    let mut s = String::new();
    let cols: Vec<&String> = targets.iter().collect();
    let _ = write!(s, "| scenario | metric |");
    for c in &cols {
        let _ = write!(s, " {c} |");
    }
    let _ = writeln!(s, " best peer | gateway/best | goal |");
    let _ = write!(s, "|---|---|");
    for _ in &cols {
        let _ = write!(s, "---:|");
    }
    let _ = writeln!(s, "---|---:|---|");
    for r in results {
        for m in &r.metrics {
            let unit = if m.unit.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.unit)
            };
            let _ = write!(s, "| {} | {}{} |", r.title, m.name, unit);
            for c in &cols {
                match m.per_target.get(c.as_str()) {
                    Some(st) => {
                        let _ = write!(
                            s,
                            " {} ±{:.0}% |",
                            fmt_val(st.median, &m.unit),
                            st.spread * 50.0
                        );
                    }
                    None => {
                        let _ = write!(s, " – |");
                    }
                }
            }
            let ratio = m
                .ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "–".into());
            let goal = match (&m.goal, m.met) {
                (Some(g), Some(true)) => format!("{g} met"),
                (Some(g), Some(false)) => format!("{g} **missed**"),
                (Some(g), None) => format!("{g} n/a"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                " {} | {ratio} | {goal} |",
                m.best_peer.clone().unwrap_or_else(|| "–".into())
            );
        }
    }
    s
}

fn compare(a: CompareArgs) -> Result<()> {
    let t_start = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let wanted: Vec<String> = a
        .targets
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    let unavailable = ensure_packages(&wanted);
    let targets: Vec<String> = wanted
        .iter()
        .filter(|t| !unavailable.contains(t))
        .cloned()
        .collect();
    for u in &unavailable {
        if wanted.contains(u) {
            eprintln!("bench: {u} unavailable; left out");
        }
    }
    if !a.no_build {
        eprintln!("bench: cargo build --release -p mcp-tls-gateway -p loadgen");
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "mcp-tls-gateway",
                "-p",
                "loadgen",
            ])
            .current_dir(workspace())
            .status()
            .context("running cargo build")?;
        if !st.success() {
            bail!("cargo build failed");
        }
    }
    let bin = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("no executable directory")?;
    for b in ["mcp-tls-gateway", "loadgen"] {
        if !bin.join(b).exists() {
            bail!(
                "{} not found next to bench (build it with cargo build --release)",
                bin.join(b).display()
            );
        }
    }
    raise_nofile_hard();
    let dir = std::env::temp_dir().join(format!("mcp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let certs = make_certs(&dir)?;
    let workers = cores();
    let plan = Plan {
        quick: a.quick,
        rounds: a.rounds.unwrap_or(3).max(3),
        duration: a.duration.unwrap_or(if a.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }),
        warmup: if a.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(1)
        },
        idle_conns: a
            .idle_connections
            .unwrap_or(if a.quick { 1000 } else { 10_000 }),
        max_steal: a.max_steal,
        threads: workers,
    };

    // The backend, alone on its port, shared by every target.
    let backend_port = free_port()?;
    let mut backend = Command::new(bin.join("loadgen"))
        .args([
            "backend",
            "--listen",
            &format!("127.0.0.1:{backend_port}"),
            "--threads",
            &workers.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the backend")?;
    wait_port(backend_port, &mut backend, "backend")?;
    let backend_pid = backend.id();
    let ctx = Ctx {
        dir: dir.clone(),
        bin: bin.clone(),
        certs,
        backend_port,
        workers,
    };

    let aes = openssl_aes();
    eprintln!(
        "bench: one-core AES-128-GCM (openssl speed, 16 KiB): {}",
        aes.aes_line
    );
    let aes_text = match aes.aes_gcm_seal_mib_s {
        Some(v) => format!("{v:.0} MiB/s ({})", aes.aes_line),
        None => aes.aes_line.clone(),
    };

    let scenarios: Vec<Scenario> = if a.quick {
        vec![
            Scenario::SmallClosed,
            Scenario::HandshakeFullEcdsa,
            Scenario::Bulk,
            Scenario::Idle,
        ]
    } else {
        vec![
            Scenario::SmallClosed,
            Scenario::SmallOpen,
            Scenario::Bulk,
            Scenario::HandshakeFullEcdsa,
            Scenario::HandshakeFullRsa,
            Scenario::HandshakeResumed,
            Scenario::Idle,
        ]
    };
    let scenarios: Vec<Scenario> = match &a.only {
        None => scenarios,
        Some(list) => {
            let want: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &want {
                if !Scenario::ALL.iter().any(|s| s.key() == *w) {
                    bail!(
                        "--only: unknown scenario \"{w}\" (known: {})",
                        Scenario::ALL.map(|s| s.key()).join(", ")
                    );
                }
            }
            scenarios
                .into_iter()
                .filter(|s| want.contains(&s.key()))
                .collect()
        }
    };
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut small_closed_rates: BTreeMap<String, f64> = BTreeMap::new();
    let outcome = (|| -> Result<()> {
        for &s in &scenarios {
            let rounds = if s == Scenario::Idle && plan.quick {
                1
            } else {
                plan.rounds
            };
            eprintln!("bench: {} — {} rounds", s.name(), rounds);
            let mut running: Vec<Running> = Vec::new();
            let mut notes = Vec::new();
            for t in &targets {
                match start_target(&ctx, t, s.cfg()) {
                    Ok(r) => running.push(r),
                    Err(e) => {
                        eprintln!("bench: {t} failed to start: {e:#}");
                        notes.push(format!(
                            "{t} failed to start: {}",
                            first_line(&format!("{e:#}"))
                        ));
                    }
                }
            }
            let mut ceilings = Vec::new();
            let mut ceiling_runs: Vec<Running> = Vec::new();
            let mut splice_child = None;
            if s == Scenario::SmallClosed {
                // Ceilings measured in the same rounds: the backend alone and
                // a plaintext splice proxy in front of it.
                let p = free_port()?;
                let mut c = Command::new(std::env::current_exe()?)
                    .args([
                        "splice-proxy",
                        "--listen",
                        &format!("127.0.0.1:{p}"),
                        "--backend",
                        &format!("127.0.0.1:{backend_port}"),
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                wait_port(p, &mut c, "splice-proxy")?;
                ceilings = vec!["backend-alone".to_string(), "splice-proxy".to_string()];
                ceiling_runs = vec![
                    Running {
                        name: "backend-alone".into(),
                        child: None,
                        pid: backend_pid,
                        url: format!("http://127.0.0.1:{backend_port}/mcp"),
                    },
                    Running {
                        name: "splice-proxy".into(),
                        child: None,
                        pid: c.id(),
                        url: format!("http://127.0.0.1:{p}/mcp"),
                    },
                ];
                splice_child = Some(c);
            }
            let rate = (s == Scenario::SmallOpen).then(|| {
                // The same offered load for every target: 60 % of the
                // slowest TLS target's closed-loop median.
                let slowest = small_closed_rates
                    .values()
                    .copied()
                    .fold(f64::INFINITY, f64::min);
                if slowest.is_finite() {
                    (slowest * 0.6).max(100.0)
                } else {
                    5000.0
                }
            });
            let mut runs = Vec::new();
            for round in 0..rounds {
                // Rotate the order each round so drift hits all targets alike.
                let n = running.len() + ceilings.len();
                for k in 0..n {
                    let i = (k + round) % n;
                    if s == Scenario::Idle && round > 0 && i < running.len() {
                        // Memory per idle connection is only meaningful on a
                        // fresh process: allocators keep what an earlier
                        // round's connections freed, and the next round's
                        // would reuse it for free.
                        let name = running[i].name.clone();
                        if let Some(c) = running[i].child.as_mut() {
                            stop(c);
                        }
                        match start_target(&ctx, &name, s.cfg()) {
                            Ok(r) => running[i] = r,
                            Err(e) => {
                                eprintln!("bench: {name} failed to restart: {e:#}");
                                notes.push(format!(
                                    "{name} failed to restart: {}",
                                    first_line(&format!("{e:#}"))
                                ));
                                continue;
                            }
                        }
                    }
                    let t: &Running = if i < running.len() {
                        &running[i]
                    } else {
                        &ceiling_runs[i - running.len()]
                    };
                    let mut attempt = 0;
                    loop {
                        match run_once(&ctx, &plan, backend_pid, t, s, rate) {
                            Ok(mut r) => {
                                if r.steal > plan.max_steal && attempt < 2 {
                                    attempt += 1;
                                    eprintln!(
                                        "bench:   {} round {}: steal {:.1}%, redoing",
                                        t.name,
                                        round + 1,
                                        r.steal * 100.0
                                    );
                                    continue;
                                }
                                r.round = round + 1;
                                r.redone = attempt;
                                eprintln!(
                                    "bench:   round {} {:<14} {:>10.1}  p99 {:>9.1}µs  cpu/unit {:>8.1}µs  errors {}  steal {:.1}%{}",
                                    round + 1, t.name, r.throughput, r.p99_us, r.target_cpu_us_per_unit, r.errors,
                                    r.steal * 100.0,
                                    if s == Scenario::Idle { format!("  {:.0} B/conn", r.pss_per_conn_b) } else { String::new() }
                                );
                                runs.push(r);
                            }
                            Err(e) => {
                                eprintln!("bench:   {} round {}: {e:#}", t.name, round + 1);
                                notes.push(format!(
                                    "{} round {}: {}",
                                    t.name,
                                    round + 1,
                                    first_line(&format!("{e:#}"))
                                ));
                            }
                        }
                        break;
                    }
                }
            }
            for r in running.iter_mut() {
                if let Some(c) = r.child.as_mut() {
                    stop(c);
                }
            }
            if let Some(mut c) = splice_child {
                stop(&mut c);
            }
            let metrics = summarize(s, &runs, &ceilings);
            if s == Scenario::SmallClosed {
                if let Some(m) = metrics.first() {
                    for (k, v) in &m.per_target {
                        if !ceilings.contains(k) {
                            small_closed_rates.insert(k.clone(), v.median);
                        }
                    }
                }
            }
            let total_err: u64 = runs.iter().map(|r| r.errors).sum();
            if total_err > 0 {
                let mut by: BTreeMap<&str, u64> = BTreeMap::new();
                for r in &runs {
                    *by.entry(&r.target).or_default() += r.errors;
                }
                notes.push(format!("errors by target: {by:?}"));
            }
            results.push(ScenarioResult {
                scenario: s,
                title: s.name().into(),
                rate,
                runs,
                metrics,
                notes,
            });
        }
        Ok(())
    })();
    stop(&mut backend);
    outcome?;

    let mut cols = targets.clone();
    if results
        .iter()
        .any(|r| r.runs.iter().any(|x| x.target == "backend-alone"))
    {
        cols.push("backend-alone".into());
        cols.push("splice-proxy".into());
    }
    let tbl = table(&results, &cols);
    let date = sh("date", &["-u", "+%Y-%m-%d"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "undated".into());
    let label = a.label.clone().unwrap_or_else(|| {
        if a.quick {
            "quick".into()
        } else {
            "full".into()
        }
    });
    let versions: BTreeMap<&str, String> = [
        (
            "nginx",
            sh("nginx", &["-v"])
                .map(|s| first_line(&s))
                .unwrap_or_default(),
        ),
        (
            "haproxy",
            sh("haproxy", &["-v"])
                .map(|s| first_line(&s))
                .unwrap_or_default(),
        ),
        (
            "hitch",
            sh("hitch", &["--version"])
                .map(|s| first_line(&s))
                .unwrap_or_default(),
        ),
        (
            "stunnel",
            sh("stunnel4", &["-version"])
                .map(|s| {
                    s.lines()
                        .find(|l| l.starts_with("stunnel"))
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default(),
        ),
        (
            "openssl",
            sh("openssl", &["version"])
                .map(|s| first_line(&s))
                .unwrap_or_default(),
        ),
        (
            "gateway_git",
            sh(
                "git",
                &[
                    "-C",
                    &workspace().display().to_string(),
                    "rev-parse",
                    "--short",
                    "HEAD",
                ],
            )
            .map(|s| first_line(&s))
            .unwrap_or_default(),
        ),
        (
            "kernel",
            sh("uname", &["-r"])
                .map(|s| first_line(&s))
                .unwrap_or_default(),
        ),
    ]
    .into_iter()
    .collect();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let placement = format!(
        "no pinning: every process (targets with {workers} workers/threads, backend with {workers} threads, loadgen with {workers} threads) floats over all {workers} cores; the gateway's own pinning is switched off (pin_workers = false) so it runs like the peers"
    );
    let elapsed = t_start.elapsed().as_secs_f64();
    let mut md = String::new();
    let _ = writeln!(md, "# bench compare — {date} — {label}\n");
    let _ = writeln!(md, "Command: `{command}`  ");
    let _ = writeln!(
        md,
        "Machine: {workers} cores ({cpu_model}), kernel {}; elapsed {elapsed:.0} s  ",
        versions["kernel"]
    );
    let _ = writeln!(
        md,
        "Peers: {}, {}, {}, {}; {}  ",
        versions["nginx"],
        versions["haproxy"],
        versions["hitch"],
        versions["stunnel"],
        versions["openssl"]
    );
    let _ = writeln!(md, "Placement: {placement}.  ");
    let _ = writeln!(md, "Each cell: median over rounds ± half the (max − min) spread, in % of the median. Ratios are gateway/best peer medians; CPU is the target's user+system time from /proc (whole process tree) divided by every request or connection the run made, warm-up included. Rounds rotate the target order; a run whose CPU steal exceeds {:.0}% is redone (up to twice).\n", plan.max_steal * 100.0);
    md.push_str(&tbl);
    let _ = writeln!(md, "\nCeilings: backend alone and a plaintext splice(2) proxy (columns above, small requests, no TLS); one-core AES-128-GCM seal (openssl speed, 16 KiB): {aes_text}.");
    for r in &results {
        if let Some(rate) = r.rate {
            let _ = writeln!(md, "\n{}: offered {rate:.0} req/s to every target (60 % of the slowest target's closed-loop median).", r.title);
        }
        for n in &r.notes {
            let _ = writeln!(md, "\nNote ({}): {n}", r.title);
        }
    }
    let _ = writeln!(md, "\nConfiguration notes: TLS 1.3 only, TLS_AES_128_GCM_SHA256, X25519 (loadgen offers only X25519), one worker per core; for the full-handshake rows tickets and session caches are off on nginx, HAProxy and stunnel and loadgen never offers resumption; the gateway runs with `session_tickets = false` and `session_cache = 0` there; hitch has no ticket switch (its session cache is off by default), so it still issues tickets. stunnel has no worker count (a thread per connection).");
    println!("\n{md}");
    let out_dir = a
        .out_dir
        .clone()
        .unwrap_or_else(|| workspace().join("bench/results"));
    std::fs::create_dir_all(&out_dir)?;
    let base = out_dir.join(format!("{date}-{label}"));
    let doc = serde_json::json!({
        "date": date,
        "label": label,
        "command": command,
        "elapsed_s": elapsed,
        "machine": { "cores": workers, "cpu": cpu_model },
        "versions": versions,
        "placement": placement,
        "plan": { "quick": plan.quick, "rounds": plan.rounds, "duration_s": plan.duration.as_secs_f64(),
                  "warmup_s": plan.warmup.as_secs_f64(), "idle_connections": plan.idle_conns, "max_steal": plan.max_steal },
        "ceilings": { "aes_128_gcm_one_core_mib_s": aes.aes_gcm_seal_mib_s, "openssl_speed": aes.aes_line },
        "scenarios": results,
    });
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    std::fs::write(base.with_extension("md"), md)?;
    eprintln!(
        "bench: wrote {}.json and .md ({elapsed:.0} s)",
        base.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
