//! PROXY protocol version 2 headers, with the TLS TLVs, for backends that
//! want the client's address and TLS details (HAProxy's proxy-protocol.txt,
//! section 2.2).
//!
//! [`encode`] builds the header the gateway sends first on a backend
//! connection; [`encode_local`] builds the LOCAL header for health checks;
//! [`parse`] decodes a header (tests and the test backend use it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Length of the fixed part: signature, ver/cmd, family, length.
pub const FIXED_LEN: usize = 16;

const VER_CMD_LOCAL: u8 = 0x20;
const VER_CMD_PROXY: u8 = 0x21;

const FAM_UNSPEC: u8 = 0x00;
const FAM_TCP4: u8 = 0x11;
const FAM_UDP4: u8 = 0x12;
const FAM_TCP6: u8 = 0x21;
const FAM_UDP6: u8 = 0x22;
const FAM_UNIX_STREAM: u8 = 0x31;
const FAM_UNIX_DGRAM: u8 = 0x32;

const ADDR_LEN_INET: usize = 12;
const ADDR_LEN_INET6: usize = 36;
const ADDR_LEN_UNIX: usize = 216;

/// TLV: application-layer protocol negotiated.
pub const PP2_TYPE_ALPN: u8 = 0x01;
/// TLV: authority (the TLS server name the client sent).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLV: TLS details, with sub-TLVs.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// SSL sub-TLV: protocol version, e.g. "TLSv1.3".
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// SSL sub-TLV: the client certificate's subject common name.
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
/// SSL sub-TLV: cipher suite name.
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// SSL client flag: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// SSL client flag: a client certificate was presented on this connection.
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// SSL client flag: a client certificate was presented in this TLS session.
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The TLS details carried in the `PP2_TYPE_SSL`, ALPN and authority TLVs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsTlvs<'a> {
    /// Protocol version name, e.g. "TLSv1.3".
    pub version: &'a str,
    /// Cipher suite name, e.g. "TLS13_AES_128_GCM_SHA256".
    pub cipher: &'a str,
    /// Server name the client asked for (sent as `PP2_TYPE_AUTHORITY`).
    pub sni: Option<&'a str>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<&'a [u8]>,
    /// Client certificate subject CN, if any.
    pub client_cn: Option<&'a str>,
    /// The client presented a certificate (sets both `CERT_CONN` and
    /// `CERT_SESS`: on a resumed session rustls reports the session's
    /// certificate).
    pub client_cert_presented: bool,
    /// The presented certificate was verified (`verify` field = 0).
    pub client_cert_verified: bool,
}

/// The command of a v2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Connection made by the proxy itself (health check); no addresses.
    Local,
    /// Connection relayed on behalf of a client.
    Proxy,
}

/// The decoded `PP2_TYPE_SSL` TLV.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslInfo {
    /// `PP2_CLIENT_*` flags.
    pub client: u8,
    /// 0 when a client certificate was presented and verified.
    pub verify: u32,
    /// `PP2_SUBTYPE_SSL_VERSION`.
    pub version: Option<String>,
    /// `PP2_SUBTYPE_SSL_CN`.
    pub cn: Option<String>,
    /// `PP2_SUBTYPE_SSL_CIPHER`.
    pub cipher: Option<String>,
}

/// A decoded v2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// LOCAL or PROXY.
    pub command: Command,
    /// (source, destination) for the INET families; None for UNSPEC/UNIX.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// `PP2_TYPE_ALPN`.
    pub alpn: Option<Vec<u8>>,
    /// `PP2_TYPE_AUTHORITY`.
    pub authority: Option<String>,
    /// `PP2_TYPE_SSL`.
    pub ssl: Option<SslInfo>,
    /// Every top-level TLV in order, as (type, value), known or not.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// Why a byte string is not a (complete) v2 header.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// More bytes are needed; `need` is the total header length known so far.
    #[error("PROXY v2 header truncated: have {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed (at least).
        need: usize,
    },
    /// The input does not start with the v2 signature.
    #[error("not a PROXY v2 header: bad signature")]
    BadSignature,
    /// The version nibble is not 2.
    #[error("PROXY header version {0} is not 2")]
    BadVersion(u8),
    /// The command nibble is neither LOCAL nor PROXY.
    #[error("PROXY v2 command {0:#x} is unknown")]
    BadCommand(u8),
    /// The address family / transport byte is unknown.
    #[error("PROXY v2 address family {0:#04x} is unknown")]
    BadFamily(u8),
    /// The length field is smaller than the family's address block.
    #[error("PROXY v2 length {len} is shorter than the {need}-byte address block")]
    ShortAddressBlock {
        /// The header's length field.
        len: usize,
        /// The address block size for its family.
        need: usize,
    },
    /// A TLV runs past the end of the header (or of its parent TLV).
    #[error("PROXY v2 TLV {kind:#04x} runs past the end of the header")]
    TlvOverrun {
        /// The TLV type.
        kind: u8,
    },
    /// A known TLV has an invalid value.
    #[error("PROXY v2 TLV {kind:#04x} has an invalid value")]
    BadTlv {
        /// The TLV type.
        kind: u8,
    },
}

/// The LOCAL header (for health checks): no addresses, no TLVs.
pub fn encode_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(VER_CMD_LOCAL);
    out.push(FAM_UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// The PROXY header for a TCP connection from `src` (client) to `dst` (the
/// gateway's listening address), with the TLS TLVs when `tls` is given.
/// Mixed families are sent as IPv6 with the IPv4 side v4-mapped. A TLV that
/// would push the header past the 64 KiB length field is left out.
pub fn encode(src: SocketAddr, dst: SocketAddr, tls: Option<&TlsTlvs>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&SIGNATURE);
    out.push(VER_CMD_PROXY);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(FAM_TCP4);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(FAM_TCP6);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());

    if let Some(tls) = tls {
        if let Some(alpn) = tls.alpn {
            push_tlv(&mut out, PP2_TYPE_ALPN, alpn);
        }
        if let Some(sni) = tls.sni {
            push_tlv(&mut out, PP2_TYPE_AUTHORITY, sni.as_bytes());
        }
        let mut client = PP2_CLIENT_SSL;
        if tls.client_cert_presented {
            client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
        }
        let verified = tls.client_cert_presented && tls.client_cert_verified;
        let verify: u32 = if verified { 0 } else { 1 };
        let mut ssl = Vec::with_capacity(64);
        ssl.push(client);
        ssl.extend_from_slice(&verify.to_be_bytes());
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
        if let Some(cn) = tls.client_cn {
            push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
        }
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, tls.cipher.as_bytes());
        push_tlv(&mut out, PP2_TYPE_SSL, &ssl);
    }

    // Every push_tlv keeps out.len() - FIXED_LEN within u16.
    let len = u16::try_from(out.len() - FIXED_LEN).unwrap_or(u16::MAX);
    out[14..16].copy_from_slice(&len.to_be_bytes());
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends type, length and value, unless that would make either this TLV
/// or (for top-level TLVs, checked by the caller's buffer) the header
/// exceed the 16-bit length field.
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let Ok(len) = u16::try_from(value.len()) else {
        return;
    };
    // `out` is either the header (whose length counts from FIXED_LEN) or an
    // SSL TLV body (which later becomes a TLV value itself); in both cases
    // the result must stay below 64 KiB.
    if out.len() + 3 + value.len() > usize::from(u16::MAX) {
        return;
    }
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}

/// Decodes a v2 header at the start of `input`. Returns the header and its
/// total length in bytes (the backend's payload starts there).
/// [`ProxyError::Truncated`] means "read more and call again".
pub fn parse(input: &[u8]) -> Result<(Parsed, usize), ProxyError> {
    let sig_have = input.len().min(SIGNATURE.len());
    if input[..sig_have] != SIGNATURE[..sig_have] {
        return Err(ProxyError::BadSignature);
    }
    if input.len() < FIXED_LEN {
        return Err(ProxyError::Truncated {
            have: input.len(),
            need: FIXED_LEN,
        });
    }
    let ver_cmd = input[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadVersion(ver_cmd >> 4));
    }
    let command = match ver_cmd & 0x0F {
        0x0 => Command::Local,
        0x1 => Command::Proxy,
        other => return Err(ProxyError::BadCommand(other)),
    };
    let family = input[13];
    let len = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let total = FIXED_LEN + len;
    if input.len() < total {
        return Err(ProxyError::Truncated {
            have: input.len(),
            need: total,
        });
    }
    let body = &input[FIXED_LEN..total];
    let addr_len = match family {
        FAM_UNSPEC => 0,
        FAM_TCP4 | FAM_UDP4 => ADDR_LEN_INET,
        FAM_TCP6 | FAM_UDP6 => ADDR_LEN_INET6,
        FAM_UNIX_STREAM | FAM_UNIX_DGRAM => ADDR_LEN_UNIX,
        other => return Err(ProxyError::BadFamily(other)),
    };
    if body.len() < addr_len {
        return Err(ProxyError::ShortAddressBlock {
            len,
            need: addr_len,
        });
    }
    let (addr, tlv_bytes) = body.split_at(addr_len);
    let addrs = match family {
        FAM_TCP4 | FAM_UDP4 => {
            let ip = |o: usize| Ipv4Addr::new(addr[o], addr[o + 1], addr[o + 2], addr[o + 3]);
            let port = |o: usize| u16::from_be_bytes([addr[o], addr[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
            ))
        }
        FAM_TCP6 | FAM_UDP6 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addr[o..o + 16]);
                Ipv6Addr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([addr[o], addr[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
            ))
        }
        _ => None,
    };

    let mut parsed = Parsed {
        command,
        addrs,
        alpn: None,
        authority: None,
        ssl: None,
        tlvs: Vec::new(),
    };
    for (kind, value) in tlvs(tlv_bytes)? {
        match kind {
            PP2_TYPE_ALPN => parsed.alpn = Some(value.to_vec()),
            PP2_TYPE_AUTHORITY => parsed.authority = Some(utf8(kind, value)?),
            PP2_TYPE_SSL => parsed.ssl = Some(parse_ssl(value)?),
            _ => {}
        }
        parsed.tlvs.push((kind, value.to_vec()));
    }
    Ok((parsed, total))
}

fn parse_ssl(value: &[u8]) -> Result<SslInfo, ProxyError> {
    if value.len() < 5 {
        return Err(ProxyError::BadTlv { kind: PP2_TYPE_SSL });
    }
    let mut info = SslInfo {
        client: value[0],
        verify: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
        ..SslInfo::default()
    };
    for (kind, sub) in tlvs(&value[5..])? {
        match kind {
            PP2_SUBTYPE_SSL_VERSION => info.version = Some(utf8(kind, sub)?),
            PP2_SUBTYPE_SSL_CN => info.cn = Some(utf8(kind, sub)?),
            PP2_SUBTYPE_SSL_CIPHER => info.cipher = Some(utf8(kind, sub)?),
            _ => {}
        }
    }
    Ok(info)
}

fn utf8(kind: u8, v: &[u8]) -> Result<String, ProxyError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProxyError::BadTlv { kind })
}

/// Splits a run of TLVs into (type, value) pairs.
fn tlvs(mut bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, ProxyError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let kind = bytes[0];
        if bytes.len() < 3 {
            return Err(ProxyError::TlvOverrun { kind });
        }
        let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
        if bytes.len() < 3 + len {
            return Err(ProxyError::TlvOverrun { kind });
        }
        out.push((kind, &bytes[3..3 + len]));
        bytes = &bytes[3 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_header_is_byte_exact() {
        let got = encode(sa("192.0.2.1:56324"), sa("198.51.100.2:443"), None);
        let want = hex("0d0a0d0a000d0a515549540a 21 11 000c c0000201 c6336402 dc04 01bb");
        assert_eq!(got, want);
    }

    #[test]
    fn v4_header_with_tls_tlvs_is_byte_exact() {
        let tls = TlsTlvs {
            version: "TLSv1.3",
            cipher: "X",
            sni: Some("ex"),
            alpn: Some(b"h2"),
            client_cn: None,
            client_cert_presented: false,
            client_cert_verified: false,
        };
        let got = encode(sa("192.0.2.1:56324"), sa("198.51.100.2:443"), Some(&tls));
        let want = hex(
            "0d0a0d0a000d0a515549540a 21 11 002c c0000201 c6336402 dc04 01bb
             01 0002 6832
             02 0002 6578
             20 0013 01 00000001 21 0007 544c5376312e33 23 0001 58",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn v6_header_is_byte_exact() {
        let got = encode(sa("[2001:db8::1]:1000"), sa("[2001:db8::2]:443"), None);
        let want = hex("0d0a0d0a000d0a515549540a 21 21 0024
             20010db8000000000000000000000001
             20010db8000000000000000000000002
             03e8 01bb");
        assert_eq!(got, want);
    }

    #[test]
    fn mixed_families_use_v4_mapped_v6() {
        let got = encode(sa("192.0.2.1:1000"), sa("[2001:db8::2]:443"), None);
        assert_eq!(got[13], FAM_TCP6);
        assert_eq!(
            &got[16..32],
            &hex("00000000000000000000ffffc0000201")[..],
            "source should be ::ffff:192.0.2.1"
        );
        let (p, n) = parse(&got).unwrap();
        assert_eq!(n, got.len());
        assert_eq!(
            p.addrs,
            Some((sa("[::ffff:192.0.2.1]:1000"), sa("[2001:db8::2]:443")))
        );
    }

    #[test]
    fn local_header() {
        let got = encode_local();
        assert_eq!(got, hex("0d0a0d0a000d0a515549540a 20 00 0000"));
        let (p, n) = parse(&got).unwrap();
        assert_eq!(n, 16);
        assert_eq!(p.command, Command::Local);
        assert_eq!(p.addrs, None);
        assert!(p.tlvs.is_empty());
    }

    #[test]
    fn round_trip_with_all_tlvs() {
        let tls = TlsTlvs {
            version: "TLSv1.3",
            cipher: "TLS13_AES_256_GCM_SHA384",
            sni: Some("mcp.example.com"),
            alpn: Some(b"http/1.1"),
            client_cn: Some("agent-7"),
            client_cert_presented: true,
            client_cert_verified: true,
        };
        let mut bytes = encode(
            sa("[2001:db8::1]:5000"),
            sa("[2001:db8::2]:8443"),
            Some(&tls),
        );
        let header_len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (p, n) = parse(&bytes).unwrap();
        assert_eq!(n, header_len);
        assert_eq!(&bytes[n..], b"GET / HTTP/1.1\r\n");
        assert_eq!(p.command, Command::Proxy);
        assert_eq!(
            p.addrs,
            Some((sa("[2001:db8::1]:5000"), sa("[2001:db8::2]:8443")))
        );
        assert_eq!(p.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(p.authority.as_deref(), Some("mcp.example.com"));
        let ssl = p.ssl.unwrap();
        assert_eq!(
            ssl.client,
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        );
        assert_eq!(ssl.verify, 0);
        assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
        assert_eq!(ssl.cn.as_deref(), Some("agent-7"));
        assert_eq!(ssl.cipher.as_deref(), Some("TLS13_AES_256_GCM_SHA384"));
        let kinds: Vec<u8> = p.tlvs.iter().map(|t| t.0).collect();
        assert_eq!(kinds, vec![PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_SSL]);
    }

    #[test]
    fn unverified_certificate_sets_nonzero_verify() {
        let tls = TlsTlvs {
            version: "TLSv1.2",
            cipher: "C",
            sni: None,
            alpn: None,
            client_cn: Some("x"),
            client_cert_presented: true,
            client_cert_verified: false,
        };
        let (p, _) = parse(&encode(sa("10.0.0.1:1"), sa("10.0.0.2:2"), Some(&tls))).unwrap();
        let ssl = p.ssl.unwrap();
        assert_ne!(ssl.verify, 0);
        assert_eq!(p.alpn, None);
        assert_eq!(p.authority, None);
        // verified without a certificate is not "verified"
        let tls = TlsTlvs {
            client_cert_presented: false,
            client_cert_verified: true,
            ..tls
        };
        let (p, _) = parse(&encode(sa("10.0.0.1:1"), sa("10.0.0.2:2"), Some(&tls))).unwrap();
        let ssl = p.ssl.unwrap();
        assert_eq!(ssl.client, PP2_CLIENT_SSL);
        assert_ne!(ssl.verify, 0);
    }

    #[test]
    fn oversized_tlv_is_left_out() {
        let huge = "a".repeat(70_000);
        let tls = TlsTlvs {
            version: "TLSv1.3",
            cipher: "C",
            sni: Some(&huge),
            alpn: None,
            client_cn: None,
            client_cert_presented: false,
            client_cert_verified: false,
        };
        let bytes = encode(sa("10.0.0.1:1"), sa("10.0.0.2:2"), Some(&tls));
        let (p, n) = parse(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(p.authority, None);
        assert!(p.ssl.is_some());
    }

    #[test]
    fn truncated_input_errors_at_every_length() {
        let tls = TlsTlvs {
            version: "TLSv1.3",
            cipher: "C",
            sni: Some("s"),
            alpn: Some(b"a"),
            client_cn: None,
            client_cert_presented: false,
            client_cert_verified: false,
        };
        let bytes = encode(sa("10.0.0.1:1"), sa("10.0.0.2:2"), Some(&tls));
        for len in 0..bytes.len() {
            match parse(&bytes[..len]) {
                Err(ProxyError::Truncated { have, need }) => {
                    assert_eq!(have, len);
                    assert!(need > len);
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_headers_are_rejected() {
        assert_eq!(parse(b"PROXY TCP4 "), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"\r\n\r\nX"), Err(ProxyError::BadSignature));

        let good = encode(sa("10.0.0.1:1"), sa("10.0.0.2:2"), None);
        let mut bad = good.clone();
        bad[12] = 0x11;
        assert_eq!(parse(&bad), Err(ProxyError::BadVersion(1)));
        let mut bad = good.clone();
        bad[12] = 0x2F;
        assert_eq!(parse(&bad), Err(ProxyError::BadCommand(0xF)));
        let mut bad = good.clone();
        bad[13] = 0x41;
        assert_eq!(parse(&bad), Err(ProxyError::BadFamily(0x41)));
        // TCP6 family with only a 12-byte address block.
        let mut bad = good.clone();
        bad[13] = FAM_TCP6;
        assert_eq!(
            parse(&bad),
            Err(ProxyError::ShortAddressBlock { len: 12, need: 36 })
        );
        // A TLV whose length runs past the header.
        let mut bad = good.clone();
        bad.extend_from_slice(&[PP2_TYPE_AUTHORITY, 0x00, 0x05, b'a']);
        let len = (bad.len() - FIXED_LEN) as u16;
        bad[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            parse(&bad),
            Err(ProxyError::TlvOverrun {
                kind: PP2_TYPE_AUTHORITY
            })
        );
        // An SSL TLV too short for client+verify.
        let mut bad = good;
        bad.extend_from_slice(&[PP2_TYPE_SSL, 0x00, 0x02, 0x01, 0x00]);
        let len = (bad.len() - FIXED_LEN) as u16;
        bad[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse(&bad), Err(ProxyError::BadTlv { kind: PP2_TYPE_SSL }));
    }
}
