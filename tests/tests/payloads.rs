//! Random payloads (seeded, SHA-256 checked) through a sink+source backend,
//! both directions at the same time, for TLS 1.2 and 1.3.
//!
//! Protocol (see `Backend::sink_source`): the client sends a 24-byte header
//! (upload_len, download_len, download_seed) followed by `upload_len` seeded
//! bytes, while the backend concurrently sends `download_len` seeded bytes;
//! the backend then appends the SHA-256 of what it received.  The client
//! checks the download against the expected stream and the trailer against
//! the SHA-256 of its upload: both directions are verified byte-for-byte.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use gateway_tests::client::{PeerEnd, PumpOpts};
use gateway_tests::{
    close_and_drain, connect_tls, hex, pump, stream_sha256, Backend, Gateway, Pki, SeededStream,
    Tls,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn transfer(gw: &Gateway, pki: &Pki, tls: Tls, up: u64, down: u64, seed: u64) {
    let up_seed = seed.wrapping_mul(2).wrapping_add(1);
    let down_seed = seed.wrapping_mul(2).wrapping_add(2);
    let started = Instant::now();
    let mut s = connect_tls(gw.addr(), pki, tls);

    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(&up.to_le_bytes());
    header.extend_from_slice(&down.to_le_bytes());
    header.extend_from_slice(&down_seed.to_le_bytes());
    let mut header_pos = 0;
    let mut up_stream = SeededStream::new(up_seed, up);
    let mut source = |buf: &mut [u8]| {
        if header_pos < header.len() {
            let n = buf.len().min(header.len() - header_pos);
            buf[..n].copy_from_slice(&header[header_pos..header_pos + n]);
            header_pos += n;
            return n;
        }
        up_stream.fill(buf)
    };

    let mut down_hash = Sha256::new();
    let mut got_down = 0u64;
    let mut trailer = Vec::new();
    let mut sink = |d: &[u8]| {
        let take = (down - got_down).min(d.len() as u64) as usize;
        down_hash.update(&d[..take]);
        got_down += take as u64;
        trailer.extend_from_slice(&d[take..]);
    };

    let opts = PumpOpts {
        timeout: Duration::from_secs(120),
        stop_after_recv: Some(down + 32),
        ..Default::default()
    };
    let out = pump(&mut s, &mut source, &mut sink, &opts);
    let ctx = format!("{tls:?} up={up} down={down}");
    assert!(out.error.is_none(), "{ctx}: {out:?}");
    assert!(!out.timed_out, "{ctx}: timed out: {out:?}");
    assert_eq!(out.sent, 24 + up, "{ctx}: not everything was sent: {out:?}");
    assert_eq!(got_down, down, "{ctx}: download truncated: {out:?}");
    assert_eq!(
        trailer.len(),
        32,
        "{ctx}: expected exactly the 32-byte trailer after the download: {out:?}"
    );
    let down_digest: [u8; 32] = down_hash.finalize().into();
    assert_eq!(
        hex(&down_digest),
        hex(&stream_sha256(down_seed, down)),
        "{ctx}: backend->client bytes corrupted"
    );
    assert_eq!(
        hex(&trailer),
        hex(&stream_sha256(up_seed, up)),
        "{ctx}: client->backend bytes corrupted (backend's SHA-256 differs)"
    );
    let (rest, end) = close_and_drain(&mut s);
    assert!(rest.is_empty(), "{ctx}: trailing bytes");
    assert_eq!(end, PeerEnd::CloseNotify, "{ctx}: expected clean close");
    eprintln!("{ctx}: ok in {:?}", started.elapsed());
}

fn sizes(tls: Tls) {
    let pki = Pki::new();
    let backend = Backend::sink_source();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let sizes = [1, KIB, 16 * KIB - 1, 16 * KIB, 16 * KIB + 1, MIB];
    for (i, &n) in sizes.iter().enumerate() {
        transfer(&gw, &pki, tls, n, n, 100 + i as u64);
    }
    // Asymmetric: upload only / download only.
    transfer(&gw, &pki, tls, 0, 200 * KIB + 3, 200);
    transfer(&gw, &pki, tls, 200 * KIB + 3, 0, 201);
    for r in backend.stats().records() {
        assert!(r.note.is_empty(), "backend reported: {}", r.note);
    }
}

#[test]
fn payload_sizes_tls12() {
    sizes(Tls::V12);
}

#[test]
fn payload_sizes_tls13() {
    sizes(Tls::V13);
}

#[test]
fn payload_one_direction_16mib() {
    let pki = Pki::new();
    let backend = Backend::sink_source();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    for tls in [Tls::V13, Tls::V12] {
        transfer(&gw, &pki, tls, 16 * MIB, 0, 1600);
        transfer(&gw, &pki, tls, 0, 16 * MIB, 1601);
    }
}

#[test]
fn payload_64mib_tls12() {
    let pki = Pki::new();
    let backend = Backend::sink_source();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    transfer(&gw, &pki, Tls::V12, 64 * MIB, 64 * MIB, 6412);
}

#[test]
fn payload_64mib_tls13() {
    let pki = Pki::new();
    let backend = Backend::sink_source();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    transfer(&gw, &pki, Tls::V13, 64 * MIB, 64 * MIB, 6413);
}
