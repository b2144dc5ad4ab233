//! PROXY protocol v1/v2 on both listeners: behind an L4 edge (HAProxy
//! `send-proxy-v2`, a cloud load balancer) the destination the user dialed
//! is only in the header, and routing needs it. Parsing is the `ppp` crate's;
//! this module reads exactly one header off the socket (never a byte of the
//! SSH stream after it) and decides what it means.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::HeaderResult;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Addresses plus TLVs we accept in a v2 header (HAProxy sends a few TLVs;
/// a peer claiming 64 KiB is refused rather than buffered).
const V2_MAX_PAYLOAD: usize = 1024;

/// Peers allowed to send PROXY headers.
#[derive(Clone, Debug, Default)]
pub struct Trusted(Vec<IpNet>);

impl Trusted {
    /// From CIDRs (a bare IP is a /32 or /128).
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("--trusted-proxy-cidrs: {s:?} is not a CIDR or IP"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Trusted)
    }

    /// Whether `ip` may send a header (IPv4-mapped IPv6 peers count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = crate::routes::canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Not a PROXY header at all.
    #[error("a trusted peer sent no PROXY protocol header")]
    Missing,
    /// Too long.
    #[error("PROXY header too long")]
    TooLong,
    /// Malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing in time (a load balancer's TCP health check, a stuck edge).
    #[error("no PROXY header within {0:?}")]
    Late(std::time::Duration),
}

/// What a header says: the client's address and the address it dialed, or
/// nothing (a LOCAL/UNKNOWN header: the edge's own health check; the
/// socket's addresses stand).
pub type Addresses = Option<(SocketAddr, SocketAddr)>;

/// True when `prefix` (the first bytes a peer sent) starts like a PROXY
/// header; used to refuse headers from untrusted peers explicitly.
pub fn looks_like_header(prefix: &[u8]) -> bool {
    let n = prefix.len().min(6);
    n > 0 && (prefix[..n] == b"PROXY "[..n] || prefix[..n] == V2_SIGNATURE[..n])
}

/// Reads one header, giving the edge `limit` (it writes the header as soon
/// as it connects) and never reading past `deadline` (the handshake's).
pub async fn read_by<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: std::time::Duration,
    deadline: tokio::time::Instant,
) -> Result<Addresses, HeaderError> {
    let by = deadline.min(tokio::time::Instant::now() + limit);
    tokio::time::timeout_at(by, read(r))
        .await
        .map_err(|_| HeaderError::Late(limit))?
}

/// Logs why a trusted edge's connection is closed: a silent one (health
/// checks arrive every few seconds) at debug, a bad header as a warning.
pub fn log_refusal(edge: SocketAddr, e: &HeaderError) {
    if matches!(e, HeaderError::Late(_)) {
        tracing::debug!(%edge, "closing: {e}");
    } else {
        tracing::warn!(%edge, "closing: {e}");
    }
}

/// Reads exactly one PROXY header (v1 or v2) from `r`.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Addresses, HeaderError> {
    // 8 bytes tell v1 ("PROXY ") from v2 and are below either's minimum
    // length (15 and 16), so nothing after the header is consumed.
    let mut buf = vec![0u8; 8];
    r.read_exact(&mut buf).await?;
    if buf[..8] == V2_SIGNATURE[..8] {
        buf.resize(16, 0);
        r.read_exact(&mut buf[8..]).await?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(HeaderError::TooLong);
        }
        buf.resize(16 + len, 0);
        r.read_exact(&mut buf[16..]).await?;
    } else if buf.starts_with(b"PROXY ") {
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(HeaderError::TooLong);
            }
            r.read_exact(&mut b).await?;
            buf.push(b[0]);
        }
    } else {
        return Err(HeaderError::Missing);
    }
    parse(&buf)
}

/// Interprets one complete header.
pub fn parse(bytes: &[u8]) -> Result<Addresses, HeaderError> {
    use ppp::v1::Addresses as V1;
    use ppp::v2::{Addresses as V2, Command, Protocol};
    let v4 = |a: &ppp::v1::IPv4| {
        Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ))
    };
    let v6 = |a: &ppp::v1::IPv6| {
        Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ))
    };
    match HeaderResult::parse(bytes) {
        HeaderResult::V1(Ok(h)) => Ok(match &h.addresses {
            V1::Tcp4(a) => v4(a),
            V1::Tcp6(a) => v6(a),
            V1::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => match (h.command, h.protocol, &h.addresses) {
            // LOCAL: the edge's own connection (a health check); the spec
            // says to ignore the family and keep the socket's addresses.
            (Command::Local, _, _) => Ok(None),
            // Keyway routes TCP only: a header that says the client spoke
            // UDP (or anything but a stream) describes a connection this
            // gateway never saw, so it is refused rather than routed
            // (LESSONS: refuse non-TCP families, CVE-2024-35175).
            (Command::Proxy, Protocol::Datagram, _) => Err(HeaderError::Malformed(
                "the transport is DGRAM (UDP); only STREAM (TCP) is accepted".into(),
            )),
            (Command::Proxy, _, V2::Unix(_)) => Err(HeaderError::Malformed(
                "a UNIX-socket address cannot be routed; only TCP over IPv4/IPv6 is accepted"
                    .into(),
            )),
            (Command::Proxy, Protocol::Stream, V2::IPv4(a)) => Ok(v4(a)),
            (Command::Proxy, Protocol::Stream, V2::IPv6(a)) => Ok(v6(a)),
            // AF_UNSPEC: like v1 UNKNOWN, the socket's addresses stand.
            (Command::Proxy, _, V2::Unspecified) => Ok(None),
            (Command::Proxy, Protocol::Unspecified, _) => Err(HeaderError::Malformed(
                "an IP address with an unspecified transport; only TCP (STREAM) is accepted".into(),
            )),
        },
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Version};

    fn v2(src: &str, dst: &str, command: Command) -> Vec<u8> {
        let addrs: ppp::v2::Addresses = (
            src.parse::<SocketAddr>().unwrap(),
            dst.parse::<SocketAddr>().unwrap(),
        )
            .into();
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addrs)
            .write_tlv(ppp::v2::Type::NoOp, &[0; 3])
            .unwrap()
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn v1_and_v2_give_the_dialed_address_and_leave_the_ssh_bytes() {
        let mut input = b"PROXY TCP4 198.51.100.7 203.0.113.9 50000 22\r\nSSH-2.0-x\r\n".to_vec();
        let mut r = &input[..];
        let got = read(&mut r).await.unwrap().unwrap();
        assert_eq!(got.1, "203.0.113.9:22".parse().unwrap());
        assert_eq!(r, b"SSH-2.0-x\r\n");

        input = v2("[2001:db8::1]:4000", "[2001:db8::2]:22", Command::Proxy);
        input.extend_from_slice(b"SSH-2.0-y\r\n");
        let mut r = &input[..];
        let got = read(&mut r).await.unwrap().unwrap();
        assert_eq!(got.0, "[2001:db8::1]:4000".parse().unwrap());
        assert_eq!(got.1, "[2001:db8::2]:22".parse().unwrap());
        assert_eq!(r, b"SSH-2.0-y\r\n");

        let local = v2("127.0.0.1:1", "127.0.0.1:2", Command::Local);
        assert_eq!(read(&mut &local[..]).await.unwrap(), None);
        let unknown = b"PROXY UNKNOWN\r\nSSH-2.0-z\r\n";
        let mut r = &unknown[..];
        assert_eq!(read(&mut r).await.unwrap(), None);
        assert_eq!(r, b"SSH-2.0-z\r\n");
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 nonsense 1 2\r\n".to_vec(),
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120], b"\r\n"].concat(),
            [&V2_SIGNATURE[..], &[0x21, 0x11, 0xff, 0xff]].concat(),
            [&V2_SIGNATURE[..], &[0x21, 0x11, 0x00, 0x02, 1, 2]].concat(),
            b"PROXY".to_vec(),
        ];
        for c in cases {
            assert!(
                read(&mut &c[..]).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[tokio::test]
    async fn headers_for_anything_but_tcp_are_refused() {
        // Raw bytes, so the test does not depend on what the builder allows:
        // signature, version 2 + PROXY, family/transport, length, payload.
        let header = |fam: u8, payload: &[u8]| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, fam]);
            h.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            h.extend_from_slice(payload);
            h
        };
        let v4 = [198, 51, 100, 7, 203, 0, 113, 9, 0xc3, 0x50, 0, 22];
        let v6 = [[0x20u8; 16], [0x20; 16]].concat();
        let v6 = [v6.as_slice(), &[0xc3, 0x50, 0, 22]].concat();
        let unix = [0u8; 216];
        // UDP over IPv4 (0x12) and IPv6 (0x22), UNIX stream (0x31) and
        // datagram (0x32), IPv4 with an unspecified transport (0x10).
        for (fam, payload, why) in [
            (0x12, &v4[..], "DGRAM (UDP)"),
            (0x22, &v6[..], "DGRAM (UDP)"),
            (0x31, &unix[..], "UNIX"),
            (0x32, &unix[..], "DGRAM"),
            (0x10, &v4[..], "unspecified transport"),
        ] {
            let h = header(fam, payload);
            let e = read(&mut &h[..]).await.unwrap_err();
            assert!(
                matches!(e, HeaderError::Malformed(_)) && e.to_string().contains(why),
                "family {fam:#x}: {e}"
            );
        }
        // The same addresses over TCP (0x11, 0x21) route.
        let tcp = header(0x11, &v4);
        let got = read(&mut &tcp[..]).await.unwrap().unwrap();
        assert_eq!(got.1, "203.0.113.9:22".parse().unwrap());
        assert!(read(&mut &header(0x21, &v6)[..]).await.unwrap().is_some());
        // AF_UNSPEC with PROXY, and LOCAL over UDP: the socket's addresses.
        assert_eq!(read(&mut &header(0x00, &[])[..]).await.unwrap(), None);
        let mut local = header(0x12, &v4);
        local[12] = 0x20;
        assert_eq!(read(&mut &local[..]).await.unwrap(), None);
    }

    #[test]
    fn sniffing_and_trust() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(!looks_like_header(b"SSH-2.0-"));
        let t = Trusted::parse(&["10.0.0.0/8".into(), "192.0.2.1".into()]).unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::ffff:192.0.2.1".parse().unwrap()));
        assert!(!t.contains("192.0.2.2".parse().unwrap()));
        assert!(Trusted::parse(&["nope".into()]).is_err());
    }
}
