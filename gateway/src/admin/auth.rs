//! Who may use the admin API: the bearer token check and the loopback rule.

use std::net::IpAddr;

use subtle::ConstantTimeEq;

/// The outcome of [`authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Serve the request.
    Allow,
    /// 401: a token is configured and the request lacks it or has another.
    Unauthorized,
    /// 403: no token is configured and the peer is not on this host.
    Forbidden,
}

/// Decides whether a request for a protected route may be served.
///
/// `peer` is the TCP peer's address, `None` for the Unix socket (whose file
/// permissions are the control). With a token configured, it is required on
/// every transport; without one, only loopback peers and the Unix socket are
/// served (defence in depth behind the bind-time check).
pub(crate) fn authorize(
    peer: Option<IpAddr>,
    token: Option<&str>,
    authorization: Option<&[u8]>,
) -> Decision {
    match token {
        Some(expected) => match authorization.and_then(bearer) {
            Some(given) if bool::from(given.ct_eq(expected.as_bytes())) => Decision::Allow,
            _ => Decision::Unauthorized,
        },
        None => match peer {
            None => Decision::Allow,
            Some(ip) if is_loopback(ip) => Decision::Allow,
            Some(_) => Decision::Forbidden,
        },
    }
}

/// Loopback, including IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`).
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme
/// case-insensitive, RFC 7235).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let space = header.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = header.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn remote() -> Option<IpAddr> {
        Some("192.0.2.10".parse().unwrap())
    }

    #[test]
    fn without_token_only_local_peers_are_served() {
        assert_eq!(authorize(LOCAL, None, None), Decision::Allow);
        assert_eq!(
            authorize(Some("::1".parse().unwrap()), None, None),
            Decision::Allow
        );
        assert_eq!(
            authorize(Some("::ffff:127.0.0.1".parse().unwrap()), None, None),
            Decision::Allow
        );
        assert_eq!(authorize(None, None, None), Decision::Allow, "unix socket");
        assert_eq!(authorize(remote(), None, None), Decision::Forbidden);
        assert_eq!(
            authorize(Some("::ffff:192.0.2.1".parse().unwrap()), None, None),
            Decision::Forbidden
        );
    }

    #[test]
    fn with_token_it_is_required_everywhere() {
        let t = Some("s3cret");
        for peer in [LOCAL, remote(), None] {
            assert_eq!(authorize(peer, t, None), Decision::Unauthorized);
            assert_eq!(
                authorize(peer, t, Some(b"Bearer s3cret")),
                Decision::Allow,
                "{peer:?}"
            );
            assert_eq!(
                authorize(peer, t, Some(b"bearer  s3cret ")),
                Decision::Allow
            );
            assert_eq!(
                authorize(peer, t, Some(b"Bearer s3cre")),
                Decision::Unauthorized
            );
            assert_eq!(
                authorize(peer, t, Some(b"Bearer s3cretX")),
                Decision::Unauthorized
            );
            assert_eq!(
                authorize(peer, t, Some(b"Basic s3cret")),
                Decision::Unauthorized
            );
            assert_eq!(authorize(peer, t, Some(b"Bearer ")), Decision::Unauthorized);
            assert_eq!(authorize(peer, t, Some(b"s3cret")), Decision::Unauthorized);
        }
    }
}
