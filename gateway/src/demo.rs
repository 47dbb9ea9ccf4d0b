//! `mcp-tls-gateway demo`: everything needed to see the gateway work, in one
//! process and with no external service: a throwaway PKI, a small MCP-style
//! JSON-RPC backend, the real gateway (same code path as `serve`), a few
//! seconds of TLS traffic through it, and the `curl` line to try by hand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway::config::{parse_duration, Config, ListenerConfig};
use gateway::server::Gateway;
use rustls::pki_types::{CertificateDer, ServerName};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Port for the gateway on 127.0.0.1 (falls back to a free port if taken).
    #[arg(long, default_value_t = 8443)]
    port: u16,
    /// Seconds of generated traffic.
    #[arg(long, default_value_t = 3)]
    traffic_secs: u64,
    /// Client connections generating traffic.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Stop after this long instead of waiting for Ctrl-C (e.g. 0s, 1m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    exit_after: Option<Duration>,
    /// Where to write the throwaway certificates (default: a new temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    crate::init_logs(gateway::config::LogFormat::Text, "warn");
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("mcp-tls-gateway-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pki = write_pki(&dir)?;
    println!(
        "1. Throwaway PKI in {}: ca.pem, chain.pem, key.pem (ECDSA P-256, CN localhost)",
        dir.display()
    );

    let backend = SampleBackend::start()?;
    println!(
        "2. Sample MCP backend (plain HTTP/1.1 JSON-RPC) on {}",
        backend.addr
    );

    let gw = start_gateway(&args, &pki, backend.addr)?;
    let addr = gw.local_addrs[0];
    println!("3. Gateway: TLS on {addr} -> {}", backend.addr);

    println!(
        "4. Traffic: {} TLS connections for {} s ...",
        args.connections, args.traffic_secs
    );
    let traffic = drive_traffic(
        addr,
        &pki.ca,
        args.connections,
        Duration::from_secs(args.traffic_secs),
    )?;
    println!(
        "   {} JSON-RPC requests answered ({:.0} req/s), {} errors, every response id matched its request",
        traffic.ok,
        traffic.ok as f64 / traffic.elapsed.as_secs_f64(),
        traffic.errors
    );
    let plain = plaintext_probe(addr)?;
    println!("5. Plaintext HTTP to the TLS port is refused: \"{plain}\"");
    // Connections are counted when they close; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(200));
    let m = gw.metrics();
    println!(
        "6. Gateway counters: accepted {}, handshakes {}, plaintext rejected {}, bytes up {}, bytes down {}; backend saw {} requests",
        m.accepted,
        m.handshakes,
        m.plaintext_http,
        m.bytes_up,
        m.bytes_down,
        backend.requests.load(Ordering::Relaxed)
    );
    if traffic.errors > 0 || traffic.ok == 0 {
        gw.force_close();
        let _ = gw.join();
        bail!(
            "demo traffic failed ({} errors, {} ok)",
            traffic.errors,
            traffic.ok
        );
    }
    println!();
    println!("Try it by hand:");
    println!(
        "  curl --cacert {} https://localhost:{}/mcp -H 'content-type: application/json' \\\n       -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}}'",
        pki.ca_path.display(),
        addr.port()
    );
    println!(
        "  curl http://localhost:{}/mcp    # plaintext: gets 400",
        addr.port()
    );
    match args.exit_after {
        Some(d) => {
            println!("(stopping in {d:?})");
            std::thread::sleep(d);
        }
        None => {
            println!("Gateway keeps running; Ctrl-C to stop.");
            wait_for_ctrl_c(&gw)?;
        }
    }
    gw.begin_drain();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gw.finished() {
        gw.force_close();
    }
    gw.join().context("gateway worker failed")?;
    backend.stop();
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("Stopped cleanly.");
    Ok(())
}

fn wait_for_ctrl_c(gw: &Gateway) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    loop {
        if signals.pending().next().is_some() || gw.finished() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Pki {
    ca: CertificateDer<'static>,
    ca_path: PathBuf,
    chain_path: PathBuf,
    key_path: PathBuf,
}

fn write_pki(dir: &Path) -> Result<Pki> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mcp-tls-gateway demo CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    leaf_params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let ca_path = dir.join("ca.pem");
    let chain_path = dir.join("chain.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&chain_path, leaf.pem())?;
    write_private(&key_path, leaf_key.serialize_pem().as_bytes())?;
    Ok(Pki {
        ca: ca.der().clone(),
        ca_path,
        chain_path,
        key_path,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

fn start_gateway(args: &DemoArgs, pki: &Pki, backend: SocketAddr) -> Result<Gateway> {
    let make = |port: u16| {
        let mut cfg = Config::default();
        cfg.server.workers = Some(2);
        cfg.listeners = vec![ListenerConfig {
            listen: format!("127.0.0.1:{port}"),
            cert: Some(pki.chain_path.clone()),
            key: Some(pki.key_path.clone()),
            backend: gateway::config::BackendConfig::Addr(backend.to_string()),
            ..Default::default()
        }];
        cfg
    };
    match Gateway::start(&make(args.port)) {
        Ok(gw) => Ok(gw),
        Err(gateway::server::StartError::Listen { addr, source })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            println!("   ({addr} is taken; using a free port instead)");
            Ok(Gateway::start(&make(0))?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A small threaded HTTP/1.1 JSON-RPC server, enough for the demo.
struct SampleBackend {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SampleBackend {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let r = r.clone();
                std::thread::spawn(move || {
                    let _ = serve_backend_conn(stream, &r);
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            stop,
        })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_backend_conn(stream: TcpStream, requests: &AtomicU64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(body) = read_http_message(&mut reader)? else {
            return Ok(());
        };
        requests.fetch_add(1, Ordering::Relaxed);
        let id = json_id(&body).unwrap_or_else(|| "null".into());
        let resp = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"tools\":[{{\"name\":\"echo\",\"description\":\"Echoes its input\"}}]}}}}"
        );
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{resp}",
            resp.len()
        )?;
    }
}

/// Reads one HTTP/1.1 message (head + Content-Length body). `None` at EOF.
fn read_http_message(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut content_length = 0usize;
    let mut first = true;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return if first {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        first = false;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length.min(16 << 20)];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

fn json_id(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = &text[text.find("\"id\":")? + 5..];
    let end = rest.find([',', '}'])?;
    Some(rest[..end].trim().to_string())
}

struct Traffic {
    ok: u64,
    errors: u64,
    elapsed: Duration,
}

fn drive_traffic(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    conns: usize,
    dur: Duration,
) -> Result<Traffic> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..conns.max(1))
        .map(|t| {
            let cfg = cfg.clone();
            std::thread::spawn(move || client_loop(addr, cfg, t as u64, deadline))
        })
        .collect();
    let (mut ok, mut errors) = (0, 0);
    for h in handles {
        match h.join() {
            Ok(Ok(n)) => ok += n,
            Ok(Err(e)) => {
                eprintln!("   client error: {e:#}");
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    Ok(Traffic {
        ok,
        errors,
        elapsed: start.elapsed(),
    })
}

fn client_loop(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    t: u64,
    deadline: Instant,
) -> Result<u64> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut n = 0u64;
    // Bounded by time and by count.
    while Instant::now() < deadline && n < 10_000_000 {
        let id = t * 1_000_000_000 + n;
        let body = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/list\",\"params\":{{}}}}"
        );
        write!(
            tls,
            "POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        tls.flush()?;
        let mut reader = BufReader::new(&mut tls);
        let resp = read_http_message(&mut reader)?.context("gateway closed the connection")?;
        if json_id(&resp).as_deref() != Some(id.to_string().as_str()) {
            bail!("response id mismatch: {}", String::from_utf8_lossy(&resp));
        }
        n += 1;
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(n)
}

fn plaintext_probe(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /mcp HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
        addr.port()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.lines().next().unwrap_or("").to_string();
    let hint = out
        .lines()
        .find(|l| l.contains("https://"))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(format!("{status} / {hint}"))
}
