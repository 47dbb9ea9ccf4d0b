//! `ktls-setup selftest`: rustls handshakes on loopback, both ends offloaded
//! to the kernel with [`KtlsConn::offload`], then data, close_notify,
//! session tickets, resumption and KeyUpdate through the kernel.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ktls_setup::probe::{self, version_label};
use ktls_setup::sock::{self, CONTENT_APPLICATION_DATA};
use ktls_setup::{Cipher, ControlOutcome, KtlsConn, KtlsError};
use rustls::client::{
    ClientConnectionData, ClientSessionMemoryCache, ClientSessionStore, Resumption,
    Tls12ClientSessionValue, Tls13ClientSessionValue, UnbufferedClientConnection,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, UnbufferedConnectionCommon, UnbufferedStatus};
use rustls::{
    ClientConfig, HandshakeKind, NamedGroup, ProtocolVersion, RootCertStore, ServerConfig,
};

/// Socket timeouts: generous, the VM emulates the CPU.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Sizes sent each way, byte-exact.
pub const SIZES: [usize; 12] = [
    1,
    2,
    100,
    1_000,
    16_383,
    16_384,
    16_385,
    65_536,
    262_157,
    1 << 20,
    (1 << 20) + 4097,
    4 << 20,
];
const MAX_RECORD_WIRE: usize = 16 * 1024 + 256 + 5;

// ---------------------------------------------------------------------------
// Certificates and configs

pub struct Pki {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

pub fn pki() -> Result<Pki> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ktls-setup selftest CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
        .signed_by(&leaf_key, &issuer)?;
    Ok(Pki {
        ca: ca_cert.der().clone(),
        chain: vec![leaf.der().clone()],
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
    })
}

fn provider_for(cipher: Cipher, version: ProtocolVersion) -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| {
        ktls_setup::crypto::cipher_for_suite(s.suite()) == Some(cipher)
            && s.version().version == version
    });
    p
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];

fn versions(v: ProtocolVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if v == ProtocolVersion::TLSv1_3 {
        &TLS13_ONLY
    } else {
        &TLS12_ONLY
    }
}

/// Counts the TLS 1.3 tickets rustls stores (from `handle_new_session_ticket`).
#[derive(Debug)]
pub struct CountingStore {
    inner: ClientSessionMemoryCache,
    pub tls13_tickets: AtomicUsize,
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, n: ServerName<'static>, g: NamedGroup) {
        self.inner.set_kx_hint(n, g)
    }
    fn kx_hint(&self, n: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(n)
    }
    fn set_tls12_session(&self, n: ServerName<'static>, v: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(n, v)
    }
    fn tls12_session(&self, n: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(n)
    }
    fn remove_tls12_session(&self, n: &ServerName<'static>) {
        self.inner.remove_tls12_session(n)
    }
    fn insert_tls13_ticket(&self, n: ServerName<'static>, v: Tls13ClientSessionValue) {
        self.tls13_tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(n, v)
    }
    fn take_tls13_ticket(&self, n: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(n)
    }
}

pub struct Configs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub store: Arc<CountingStore>,
}

pub fn configs(pki: &Pki, cipher: Cipher, version: ProtocolVersion) -> Result<Configs> {
    let provider = Arc::new(provider_for(cipher, version));
    ensure!(
        !provider.cipher_suites.is_empty(),
        "rustls has no {cipher} suite for TLS {}",
        version_label(version)
    );
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(version))?
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), PrivateKeyDer::Pkcs8(pki.key.clone_key()))?;
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 2;
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let store = Arc::new(CountingStore {
        inner: ClientSessionMemoryCache::new(8),
        tls13_tickets: AtomicUsize::new(0),
    });
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(version))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    client.resumption = Resumption::store(store.clone());
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
        store,
    })
}

// ---------------------------------------------------------------------------
// Handshake with the unbuffered API, reading exactly one record at a time so
// nothing the kernel should decrypt is ever left in user space.

/// Reads one whole TLS record (header + body) and appends it to `buf`.
fn read_record(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut hdr = [0u8; 5];
    sock.read_exact(&mut hdr)
        .context("reading a record header")?;
    let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
    ensure!(len <= MAX_RECORD_WIRE, "record of {len} bytes is too long");
    buf.extend_from_slice(&hdr);
    let start = buf.len();
    buf.resize(start + len, 0);
    sock.read_exact(&mut buf[start..])
        .context("reading a record body")?;
    Ok(())
}

type Process<D> = for<'c, 'i> fn(
    &'c mut UnbufferedConnectionCommon<D>,
    &'i mut [u8],
) -> UnbufferedStatus<'c, 'i, D>;

fn drive_handshake<D>(
    conn: &mut UnbufferedConnectionCommon<D>,
    process: Process<D>,
    sock: &mut TcpStream,
) -> Result<()> {
    let mut incoming: Vec<u8> = Vec::with_capacity(MAX_RECORD_WIRE);
    let mut out = vec![0u8; 64 * 1024];
    let mut out_len = 0usize;
    for _ in 0..1_000 {
        let UnbufferedStatus { discard, state } = process(conn, &mut incoming);
        let state = state.map_err(|e| anyhow!("rustls: {e}"))?;
        let (mut done, mut need_read) = (false, false);
        match state {
            ConnectionState::EncodeTlsData(mut e) => {
                let n = e
                    .encode(&mut out[out_len..])
                    .map_err(|e| anyhow!("encoding a handshake record: {e:?}"))?;
                out_len += n;
            }
            ConnectionState::TransmitTlsData(t) => {
                sock.write_all(&out[..out_len])
                    .context("sending handshake records")?;
                out_len = 0;
                t.done();
            }
            ConnectionState::BlockedHandshake => need_read = true,
            ConnectionState::WriteTraffic(_) => done = true,
            ConnectionState::ReadTraffic(_) | ConnectionState::ReadEarlyData(_) => {
                bail!("application data arrived during the handshake")
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                bail!("peer closed during the handshake")
            }
            _ => bail!("unexpected rustls state during the handshake"),
        }
        incoming.drain(..discard.min(incoming.len()));
        if done {
            ensure!(out_len == 0, "handshake bytes left unsent");
            ensure!(
                incoming.is_empty(),
                "{} received bytes left in user space at offload",
                incoming.len()
            );
            return Ok(());
        }
        if need_read {
            read_record(sock, &mut incoming)?;
        }
    }
    bail!("handshake did not finish in 1000 steps")
}

fn process_client<'c, 'i>(
    c: &'c mut UnbufferedConnectionCommon<ClientConnectionData>,
    i: &'i mut [u8],
) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
    c.process_tls_records(i)
}

fn process_server<'c, 'i>(
    c: &'c mut UnbufferedConnectionCommon<ServerConnectionData>,
    i: &'i mut [u8],
) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
    c.process_tls_records(i)
}

/// Client handshake, then offload. Returns whether it was a resumption.
pub fn client_offload(
    cfg: Arc<ClientConfig>,
    mut sock: TcpStream,
) -> Result<(Peer<ClientConnectionData>, bool)> {
    let name = ServerName::try_from("localhost")?;
    let mut conn = UnbufferedClientConnection::new(cfg, name)?;
    drive_handshake(&mut conn, process_client, &mut sock)?;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
    let k = KtlsConn::offload(sock.as_fd(), secrets, kernel).context("client offload")?;
    Ok((Peer::new(sock, k), resumed))
}

/// Server handshake, then offload.
pub fn server_offload(
    cfg: Arc<ServerConfig>,
    mut sock: TcpStream,
) -> Result<Peer<ServerConnectionData>> {
    let mut conn = UnbufferedServerConnection::new(cfg)?;
    drive_handshake(&mut conn, process_server, &mut sock)?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
    let k = KtlsConn::offload(sock.as_fd(), secrets, kernel).context("server offload")?;
    Ok(Peer::new(sock, k))
}

// ---------------------------------------------------------------------------
// An offloaded end.

/// `handle_record` exists per side; this lets [`Peer`] be generic.
pub trait HandleRecord {
    fn handle(
        &mut self,
        sock: &TcpStream,
        ct: u8,
        payload: &[u8],
    ) -> Result<ControlOutcome, KtlsError>;
}

impl HandleRecord for KtlsConn<ServerConnectionData> {
    fn handle(
        &mut self,
        sock: &TcpStream,
        ct: u8,
        payload: &[u8],
    ) -> Result<ControlOutcome, KtlsError> {
        self.handle_record(sock.as_fd(), ct, payload)
    }
}

impl HandleRecord for KtlsConn<ClientConnectionData> {
    fn handle(
        &mut self,
        sock: &TcpStream,
        ct: u8,
        payload: &[u8],
    ) -> Result<ControlOutcome, KtlsError> {
        self.handle_record(sock.as_fd(), ct, payload)
    }
}

pub struct Peer<D> {
    pub sock: TcpStream,
    pub k: KtlsConn<D>,
    pub tickets: usize,
    pub key_updates: usize,
    buf: Vec<u8>,
}

/// What [`Peer::next`] got.
pub enum Got {
    Data(usize),
    Control(ControlOutcome),
    Eof,
}

impl<D> Peer<D>
where
    KtlsConn<D>: HandleRecord,
{
    fn new(sock: TcpStream, k: KtlsConn<D>) -> Self {
        let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
        let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
        Peer {
            sock,
            k,
            tickets: 0,
            key_updates: 0,
            buf: vec![0u8; 64 * 1024],
        }
    }

    /// Next record: data lands in `self.buf[..n]`; control records are
    /// handled (tickets and key updates counted).
    fn next(&mut self) -> Result<Got, KtlsError> {
        let (ct, n) = sock::recv_record(self.sock.as_fd(), &mut self.buf)?;
        if ct == CONTENT_APPLICATION_DATA {
            return Ok(if n == 0 { Got::Eof } else { Got::Data(n) });
        }
        let out = self.k.handle(&self.sock, ct, &self.buf[..n])?;
        match out {
            ControlOutcome::SessionTicket => self.tickets += 1,
            ControlOutcome::KeyUpdated { .. } => self.key_updates += 1,
            _ => {}
        }
        Ok(Got::Control(out))
    }

    pub fn send(&mut self, data: &[u8]) -> Result<()> {
        self.sock.write_all(data).context("send")?;
        self.k.note_sent(data.len() as u64);
        Ok(())
    }

    /// Receives exactly `want` bytes of data; tickets and key updates on
    /// the way are handled; anything else is an error.
    pub fn recv_exact(&mut self, want: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(want);
        let deadline = Instant::now() + IO_TIMEOUT * 3;
        while out.len() < want {
            ensure!(
                Instant::now() < deadline,
                "timed out after {} of {want} bytes",
                out.len()
            );
            match self.next()? {
                Got::Data(n) => out.extend_from_slice(&self.buf[..n]),
                Got::Control(ControlOutcome::SessionTicket | ControlOutcome::KeyUpdated { .. }) => {
                }
                Got::Control(other) => bail!("{other:?} after {} of {want} bytes", out.len()),
                Got::Eof => bail!("EOF after {} of {want} bytes", out.len()),
            }
        }
        Ok(out)
    }

    /// The next non-ticket control record.
    pub fn recv_control(&mut self) -> Result<ControlOutcome, KtlsError> {
        for _ in 0..16 {
            match self.next()? {
                Got::Control(ControlOutcome::SessionTicket) => {}
                Got::Control(o) => return Ok(o),
                Got::Data(n) => {
                    return Err(KtlsError::Protocol(if n > 0 {
                        "data instead of a control record"
                    } else {
                        "?"
                    }))
                }
                Got::Eof => return Err(KtlsError::Protocol("EOF instead of a control record")),
            }
        }
        Err(KtlsError::Protocol("no control record in 16 records"))
    }

    /// Waits for EOF, handling tickets; bounded.
    pub fn expect_eof(&mut self) -> Result<()> {
        for _ in 0..16 {
            match self.next()? {
                Got::Eof => return Ok(()),
                Got::Control(ControlOutcome::SessionTicket) => {}
                Got::Control(o) => bail!("{o:?} instead of EOF"),
                Got::Data(n) => bail!("{n} bytes of data instead of EOF"),
            }
        }
        bail!("no EOF in 16 records")
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("lengths {} vs {}", a.len(), b.len()),
    }
}

fn check_bytes(got: &[u8], want: &[u8], what: &str) -> Result<()> {
    ensure!(
        got == want,
        "{what}: received bytes differ ({})",
        first_diff(got, want)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Cases

/// One printed result.
pub struct CaseResult {
    pub name: String,
    pub result: Result<String, String>,
}

fn accept_bounded(l: &TcpListener) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Runs `server` on a thread and `client` here, on one loopback connection.
fn pair<S, C, RS, RC>(server: S, client: C) -> (Result<RS>, Result<RC>)
where
    S: FnOnce(TcpStream) -> Result<RS> + Send + 'static,
    RS: Send + 'static,
    C: FnOnce(TcpStream) -> Result<RC>,
{
    let l = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
        Ok(l) => l,
        Err(e) => return (Err(anyhow!("bind: {e}")), Err(anyhow!("bind: {e}"))),
    };
    let addr = match l.local_addr() {
        Ok(a) => a,
        Err(e) => return (Err(anyhow!("{e}")), Err(anyhow!("{e}"))),
    };
    let t = std::thread::spawn(move || accept_bounded(&l).and_then(server));
    let c = connect(addr).and_then(client);
    let s = match t.join() {
        Ok(r) => r,
        Err(_) => Err(anyhow!("server thread panicked")),
    };
    (s, c)
}

fn both<A, B>(s: Result<A>, c: Result<B>) -> Result<(A, B), String> {
    match (s, c) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(s), Ok(_)) => Err(format!("server: {s:#}")),
        (Ok(_), Err(c)) => Err(format!("client: {c:#}")),
        (Err(s), Err(c)) => Err(format!("client: {c:#}; server: {s:#}")),
    }
}

struct Conn1Server {
    bytes: usize,
    saw_close: bool,
}

struct Conn1Client {
    bytes: usize,
    saw_close: bool,
    tickets: usize,
    ms: u128,
}

/// Connection 1: handshake, offload, data both ways for every size,
/// close_notify both ways, tickets on the client.
fn conn1(cfg: &Configs, sizes: &'static [usize]) -> (Result<Conn1Server>, Result<Conn1Client>) {
    let scfg = cfg.server.clone();
    pair(
        move |sock| {
            let mut p = server_offload(scfg, sock)?;
            let mut bytes = 0;
            for (i, &n) in sizes.iter().enumerate() {
                let got = p
                    .recv_exact(n)
                    .with_context(|| format!("receiving {n} B"))?;
                check_bytes(
                    &got,
                    &pattern(n, i as u64 * 2),
                    &format!("{n} B client→server"),
                )?;
                p.send(&pattern(n, i as u64 * 2 + 1))
                    .with_context(|| format!("sending {n} B"))?;
                bytes += n;
            }
            let c = p.recv_control().context("waiting for close_notify")?;
            ensure!(
                c == ControlOutcome::CloseNotify,
                "expected CloseNotify, got {c:?}"
            );
            p.k.send_close_notify(p.sock.as_fd())
                .context("sending close_notify")?;
            Ok(Conn1Server {
                bytes,
                saw_close: true,
            })
        },
        |sock| {
            let t0 = Instant::now();
            let (mut p, _) = client_offload(cfg.client.clone(), sock)?;
            let mut bytes = 0;
            for (i, &n) in sizes.iter().enumerate() {
                p.send(&pattern(n, i as u64 * 2))
                    .with_context(|| format!("sending {n} B"))?;
                let got = p
                    .recv_exact(n)
                    .with_context(|| format!("receiving {n} B"))?;
                check_bytes(
                    &got,
                    &pattern(n, i as u64 * 2 + 1),
                    &format!("{n} B server→client"),
                )?;
                bytes += n;
            }
            let ms = t0.elapsed().as_millis();
            p.k.send_close_notify(p.sock.as_fd())
                .context("sending close_notify")?;
            let c = p.recv_control().context("waiting for close_notify")?;
            ensure!(
                c == ControlOutcome::CloseNotify,
                "expected CloseNotify, got {c:?}"
            );
            Ok(Conn1Client {
                bytes,
                saw_close: true,
                tickets: p.tickets,
                ms,
            })
        },
    )
}

/// How the KeyUpdate case went.
#[derive(Debug, PartialEq, Eq)]
enum Rekey {
    /// Both ends installed new keys; data flowed after.
    Done {
        server_answered: bool,
        client_saw_update: bool,
    },
    /// The kernel refused; RekeyUnsupported on this side.
    Unsupported,
}

const AFTER_REKEY: usize = 100_000;

/// Connection 2 (TLS 1.3): resumption, then the client sends a KeyUpdate
/// asking the server to update too.
fn conn2(cfg: &Configs) -> (Result<Rekey>, Result<(bool, Rekey)>) {
    let scfg = cfg.server.clone();
    pair(
        move |sock| {
            let mut p = server_offload(scfg, sock)?;
            match p.recv_control() {
                Err(KtlsError::RekeyUnsupported) => Ok(Rekey::Unsupported),
                Ok(ControlOutcome::KeyUpdated { answered }) => {
                    let got = p.recv_exact(AFTER_REKEY).context("data after KeyUpdate")?;
                    check_bytes(
                        &got,
                        &pattern(AFTER_REKEY, 77),
                        "client→server after KeyUpdate",
                    )?;
                    p.send(&pattern(AFTER_REKEY, 78))?;
                    let c = p.recv_control().context("waiting for close_notify")?;
                    ensure!(
                        c == ControlOutcome::CloseNotify,
                        "expected CloseNotify, got {c:?}"
                    );
                    Ok(Rekey::Done {
                        server_answered: answered,
                        client_saw_update: false,
                    })
                }
                Ok(other) => bail!("expected a KeyUpdate, got {other:?}"),
                Err(e) => bail!("handling the KeyUpdate: {e}"),
            }
        },
        |sock| {
            let (mut p, resumed) = client_offload(cfg.client.clone(), sock)?;
            match p.k.update_tx_keys(p.sock.as_fd(), true) {
                Err(KtlsError::RekeyUnsupported) => {
                    // The server reports its side and closes; we must see a
                    // clean EOF, not garbage.
                    p.expect_eof().context("after RekeyUnsupported")?;
                    Ok((resumed, Rekey::Unsupported))
                }
                Ok(()) => {
                    p.send(&pattern(AFTER_REKEY, 77))?;
                    let got = p.recv_exact(AFTER_REKEY).context("data after KeyUpdate")?;
                    check_bytes(
                        &got,
                        &pattern(AFTER_REKEY, 78),
                        "server→client after KeyUpdate",
                    )?;
                    p.k.send_close_notify(p.sock.as_fd())?;
                    Ok((
                        resumed,
                        Rekey::Done {
                            server_answered: true,
                            client_saw_update: p.key_updates == 1,
                        },
                    ))
                }
                Err(e) => bail!("update_tx_keys: {e}"),
            }
        },
    )
}

/// Cumulative counters from /proc/net/tls_stat.
pub fn tls_stat() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/net/tls_stat").ok()?;
    let get = |k: &str| {
        s.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(k)).then(|| it.next().and_then(|v| v.parse::<u64>().ok()))?
        })
    };
    Some((get("TlsTxSw")?, get("TlsRxSw")?))
}

fn human(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Runs everything; prints as it goes. Returns (passed, failed).
pub fn run(quick: bool) -> Result<(usize, usize)> {
    if let Err(why) = ktls_setup::ulp_available() {
        bail!("{why}");
    }
    let report = probe::probe();
    let working = report.working();
    if working.is_empty() {
        bail!(
            "the probe found no cipher that works: {}",
            report.can_offload().err().unwrap_or_default()
        );
    }
    println!(
        "selftest: kernel {}; probe: {} cipher×version pairs work, rekey {}",
        report.kernel.release,
        working.len(),
        report.rekey.word()
    );
    let sizes: &'static [usize] = if quick { &SIZES[..8] } else { &SIZES[..] };
    let pki = pki()?;
    let stat_before = tls_stat();
    let mut results: Vec<CaseResult> = Vec::new();
    let mut conns = 0u64;
    let print = |r: CaseResult, results: &mut Vec<CaseResult>| {
        match &r.result {
            Ok(note) => println!(
                "PASS  {}{}",
                r.name,
                if note.is_empty() {
                    String::new()
                } else {
                    format!(": {note}")
                }
            ),
            Err(why) => println!("FAIL  {}: {why}", r.name),
        }
        results.push(r);
    };
    for (v, c) in working {
        let label = format!("TLS {} {}", version_label(v), c);
        let cfg = match configs(&pki, c, v) {
            Ok(cfg) => cfg,
            Err(e) => {
                print(
                    CaseResult {
                        name: format!("{label} config"),
                        result: Err(format!("{e:#}")),
                    },
                    &mut results,
                );
                continue;
            }
        };
        conns += 1;
        let (s, cl) = conn1(&cfg, sizes);
        match both(s, cl) {
            Err(e) => print(
                CaseResult {
                    name: format!("{label} handshake, offload, data, close_notify"),
                    result: Err(e),
                },
                &mut results,
            ),
            Ok((s, cl)) => {
                print(
                    CaseResult {
                        name: format!(
                            "{label} data both ways, {} sizes {}..{}",
                            sizes.len(),
                            human(sizes[0]),
                            human(sizes[sizes.len() - 1])
                        ),
                        result: if s.bytes == cl.bytes {
                            let total = 2 * cl.bytes;
                            let mbps = total as f64 / 1e6 / (cl.ms.max(1) as f64 / 1e3);
                            Ok(format!(
                                "{:.1} MiB byte-exact in {} ms ({mbps:.0} MB/s)",
                                total as f64 / (1 << 20) as f64,
                                cl.ms
                            ))
                        } else {
                            Err(format!("server saw {} B, client {} B", s.bytes, cl.bytes))
                        },
                    },
                    &mut results,
                );
                print(
                    CaseResult {
                        name: format!("{label} close_notify both ways"),
                        result: if s.saw_close && cl.saw_close {
                            Ok("ControlOutcome::CloseNotify on each side".into())
                        } else {
                            Err("not seen".into())
                        },
                    },
                    &mut results,
                );
                if v == ProtocolVersion::TLSv1_3 {
                    let stored = cfg.store.tls13_tickets.load(Ordering::SeqCst);
                    print(
                        CaseResult {
                            name: format!("{label} NewSessionTicket after offload"),
                            result: if cl.tickets >= 1 && stored >= 1 {
                                Ok(format!(
                                    "{} handshake record(s) handled as ControlOutcome::SessionTicket, {stored} tickets stored",
                                    cl.tickets
                                ))
                            } else {
                                Err(format!(
                                    "{} ticket records handled, {stored} tickets stored",
                                    cl.tickets
                                ))
                            },
                        },
                        &mut results,
                    );
                }
            }
        }
        if v != ProtocolVersion::TLSv1_3 {
            continue;
        }
        conns += 1;
        let (s, cl) = conn2(&cfg);
        match both(s, cl) {
            Err(e) => print(
                CaseResult {
                    name: format!("{label} resumption + KeyUpdate"),
                    result: Err(e),
                },
                &mut results,
            ),
            Ok((s, (resumed, cl))) => {
                print(
                    CaseResult {
                        name: format!("{label} resumption with a ticket received through kTLS"),
                        result: if resumed {
                            Ok("handshake kind Resumed".into())
                        } else {
                            Err("full handshake: the ticket was not usable".into())
                        },
                    },
                    &mut results,
                );
                let result = match (&s, &cl) {
                    (Rekey::Unsupported, Rekey::Unsupported) => Ok(
                        "kernel cannot rekey: KtlsError::RekeyUnsupported on both sides, clean EOF, no corruption"
                            .to_string(),
                    ),
                    (
                        Rekey::Done {
                            server_answered: true, ..
                        },
                        Rekey::Done {
                            client_saw_update: true,
                            ..
                        },
                    ) => Ok("rekeyed both directions (update_requested answered); data flowed after".to_string()),
                    other => Err(format!("inconsistent outcome {other:?}")),
                };
                print(
                    CaseResult {
                        name: format!("{label} KeyUpdate (update_tx_keys(fd, true))"),
                        result,
                    },
                    &mut results,
                );
            }
        }
    }
    let stat_after = tls_stat();
    let stat = match (stat_before, stat_after) {
        (Some((tx0, rx0)), Some((tx1, rx1))) => {
            // Each connection offloads two sockets, each with TX and RX.
            let want = 2 * conns;
            if tx1 - tx0 >= want && rx1 - rx0 >= want {
                Ok(format!(
                    "TlsTxSw +{}, TlsRxSw +{} ({conns} connections)",
                    tx1 - tx0,
                    rx1 - rx0
                ))
            } else {
                Err(format!(
                    "TlsTxSw +{}, TlsRxSw +{}: expected at least +{want} each",
                    tx1 - tx0,
                    rx1 - rx0
                ))
            }
        }
        _ => Err("/proc/net/tls_stat unreadable".to_string()),
    };
    print(
        CaseResult {
            name: "/proc/net/tls_stat counters".into(),
            result: stat,
        },
        &mut results,
    );
    let passed = results.iter().filter(|r| r.result.is_ok()).count();
    Ok((passed, results.len() - passed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part that needs no kernel TLS: both unbuffered handshakes finish
    /// with nothing left in user space and rustls hands out kernel
    /// connections for every suite.
    #[test]
    fn handshake_reaches_kernel_connection() {
        let pki = pki().unwrap();
        for v in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
            for c in Cipher::ALL {
                let cfg = configs(&pki, c, v).unwrap();
                let scfg = cfg.server.clone();
                let (s, cl) = pair(
                    move |mut sock| {
                        let mut conn = UnbufferedServerConnection::new(scfg)?;
                        drive_handshake(&mut conn, process_server, &mut sock)?;
                        let (secrets, k) = conn.dangerous_into_kernel_connection()?;
                        ensure!(k.protocol_version() == v);
                        Ok(secrets.tx.0)
                    },
                    |mut sock| {
                        let mut conn = UnbufferedClientConnection::new(
                            cfg.client.clone(),
                            ServerName::try_from("localhost")?,
                        )?;
                        drive_handshake(&mut conn, process_client, &mut sock)?;
                        let (secrets, k) = conn.dangerous_into_kernel_connection()?;
                        ensure!(
                            ktls_setup::crypto::cipher_for_suite(
                                k.negotiated_cipher_suite().suite()
                            ) == Some(c)
                        );
                        Ok(secrets.rx.0)
                    },
                );
                let (server_tx_seq, client_rx_seq) = both(s, cl).unwrap();
                if v == ProtocolVersion::TLSv1_3 {
                    // The server sent its tickets (both in one record)
                    // before offload under user-space keys; the client has
                    // read none of them.
                    assert_eq!(server_tx_seq, 1);
                    assert_eq!(client_rx_seq, 0);
                }
            }
        }
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(100, 3), pattern(100, 3));
        assert_ne!(pattern(100, 3), pattern(100, 4));
        assert_eq!(pattern(4097, 1).len(), 4097);
    }
}
