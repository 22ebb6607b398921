//! What a proxy asks a relay at the start of each stream, and what the relay answers.
//!
//! Through a relay, every application connection is one stream of the proxy's multi-socket
//! session with the relay. The stream's first bytes are an [`OpenRequest`] (where to connect);
//! the relay dials, and the first bytes back are an [`OpenReply`] (connected, or why not —
//! the same outcomes a direct connect has, so SOCKS5 and HTTP clients see the same replies
//! either way). After them the stream carries the connection's bytes both ways; FIN and
//! RESET_STREAM are the connection's half-close and reset.
//!
//! Sans-IO: [`OpenRequest::decode`] and [`OpenReply::decode`] take what arrived so far and say
//! "more" (`Ok(None)`), a value and how many bytes it took, or what is wrong. Nothing is
//! allocated from a length before it is checked (a name is at most 255 bytes, a reason 255).
//!
//! Request: `version u8 = 1`, then an address, then `port u16`.
//! Reply: `version u8 = 1`, `status u8` ([`OpenStatus`]), an address (the relay's side of the
//! outgoing connection; 0.0.0.0:0 when none), `reason_len u8`, `reason [reason_len]` (UTF-8).
//! Address: `kind u8` (1 IPv4 + 4 bytes, 4 IPv6 + 16 bytes, 3 name: `len u8` + `len` bytes).
//! All integers big-endian.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::target::{Host, Target};

/// The version of these messages.
pub const OPEN_VERSION: u8 = 1;
/// Longest request: version, kind, a 255-byte name with its length, port.
pub const MAX_REQUEST: usize = 1 + 1 + 1 + 255 + 2;

const KIND_V4: u8 = 1;
const KIND_NAME: u8 = 3;
const KIND_V6: u8 = 4;

/// Why bytes are not an open request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another version than [`OPEN_VERSION`].
    #[error("relay open version {0} is not supported (this side speaks {OPEN_VERSION})")]
    Version(u8),
    /// An address kind other than IPv4, IPv6 or a name.
    #[error("unknown address kind {0}")]
    AddressKind(u8),
    /// A name that is empty or not UTF-8.
    #[error("the destination name is empty or not UTF-8")]
    BadName,
    /// A status this side does not know.
    #[error("unknown open status {0}")]
    Status(u8),
    /// A name longer than 255 bytes, to encode.
    #[error("the destination name is longer than 255 bytes")]
    NameTooLong,
}

/// Where the relay is to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// The destination: an address, or a name the relay resolves.
    pub target: Target,
}

/// How the relay's connect went; each maps to a SOCKS5 reply and an HTTP status as a direct
/// connect's outcome does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpenStatus {
    /// Connected: the stream carries the connection now.
    Connected = 0,
    /// The destination refused the connection.
    Refused = 1,
    /// No route to the destination host.
    HostUnreachable = 2,
    /// No route to the destination network.
    NetworkUnreachable = 3,
    /// The connect timed out.
    TimedOut = 4,
    /// The name did not resolve.
    NameNotResolved = 5,
    /// The relay's rules do not allow this destination.
    NotAllowed = 6,
    /// Anything else.
    Failed = 7,
}

impl OpenStatus {
    fn from_u8(v: u8) -> Result<OpenStatus, OpenError> {
        Ok(match v {
            0 => OpenStatus::Connected,
            1 => OpenStatus::Refused,
            2 => OpenStatus::HostUnreachable,
            3 => OpenStatus::NetworkUnreachable,
            4 => OpenStatus::TimedOut,
            5 => OpenStatus::NameNotResolved,
            6 => OpenStatus::NotAllowed,
            7 => OpenStatus::Failed,
            other => return Err(OpenError::Status(other)),
        })
    }

    /// The status of a failed connect, from its error.
    pub fn of_error(e: &std::io::Error) -> OpenStatus {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => OpenStatus::Refused,
            K::HostUnreachable => OpenStatus::HostUnreachable,
            K::NetworkUnreachable => OpenStatus::NetworkUnreachable,
            K::TimedOut => OpenStatus::TimedOut,
            _ => OpenStatus::Failed,
        }
    }
}

/// The relay's answer to an [`OpenRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReply {
    /// How the connect went.
    pub status: OpenStatus,
    /// The relay's side of the outgoing connection (unspecified when there is none).
    pub bound: SocketAddr,
    /// Why, for a person (empty when connected); at most 255 bytes are sent.
    pub reason: String,
}

/// Reads values off a buffer that may end early: each read says "more" rather than panic.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// `Ok(None)`: more bytes needed.
fn read_host(r: &mut Reader<'_>) -> Result<Option<Host>, OpenError> {
    let Some(kind) = r.u8() else { return Ok(None) };
    Ok(match kind {
        KIND_V4 => r.take(4).map(|b| Host::Ip(IpAddr::from(Ipv4Addr::new(b[0], b[1], b[2], b[3])))),
        KIND_V6 => r.take(16).map(|b| {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Host::Ip(IpAddr::from(Ipv6Addr::from(a)))
        }),
        KIND_NAME => {
            let Some(len) = r.u8() else { return Ok(None) };
            match r.take(len as usize) {
                None => None,
                Some(b) => {
                    let name = std::str::from_utf8(b).map_err(|_| OpenError::BadName)?;
                    if name.is_empty() {
                        return Err(OpenError::BadName);
                    }
                    Some(Host::Name(name.to_string()))
                }
            }
        }
        other => return Err(OpenError::AddressKind(other)),
    })
}

fn write_host(host: &Host, out: &mut Vec<u8>) -> Result<(), OpenError> {
    match host {
        Host::Ip(IpAddr::V4(a)) => {
            out.push(KIND_V4);
            out.extend_from_slice(&a.octets());
        }
        Host::Ip(IpAddr::V6(a)) => {
            out.push(KIND_V6);
            out.extend_from_slice(&a.octets());
        }
        Host::Name(n) => {
            let len = u8::try_from(n.len()).map_err(|_| OpenError::NameTooLong)?;
            if len == 0 {
                return Err(OpenError::BadName);
            }
            out.push(KIND_NAME);
            out.push(len);
            out.extend_from_slice(n.as_bytes());
        }
    }
    Ok(())
}

impl OpenRequest {
    /// Appends the encoded request to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), OpenError> {
        out.push(OPEN_VERSION);
        write_host(&self.target.host, out)?;
        out.extend_from_slice(&self.target.port.to_be_bytes());
        Ok(())
    }

    /// The request at the start of `buf` and its length, `Ok(None)` if `buf` ends before it
    /// does, or what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenRequest, usize)>, OpenError> {
        let mut r = Reader { buf, at: 0 };
        let Some(version) = r.u8() else { return Ok(None) };
        if version != OPEN_VERSION {
            return Err(OpenError::Version(version));
        }
        let Some(host) = read_host(&mut r)? else { return Ok(None) };
        let Some(port) = r.u16() else { return Ok(None) };
        Ok(Some((OpenRequest { target: Target { host, port } }, r.at)))
    }
}

impl OpenReply {
    /// Appends the encoded reply to `out` (a reason past 255 bytes is cut at a character
    /// boundary).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(OPEN_VERSION);
        out.push(self.status as u8);
        let host = Host::Ip(self.bound.ip());
        // An address never fails to encode.
        let _ = write_host(&host, out);
        out.extend_from_slice(&self.bound.port().to_be_bytes());
        let mut end = self.reason.len().min(255);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        out.push(end as u8);
        out.extend_from_slice(&self.reason.as_bytes()[..end]);
    }

    /// The reply at the start of `buf` and its length, `Ok(None)` if `buf` ends before it
    /// does, or what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenReply, usize)>, OpenError> {
        let mut r = Reader { buf, at: 0 };
        let Some(version) = r.u8() else { return Ok(None) };
        if version != OPEN_VERSION {
            return Err(OpenError::Version(version));
        }
        let Some(status) = r.u8() else { return Ok(None) };
        let status = OpenStatus::from_u8(status)?;
        let Some(host) = read_host(&mut r)? else { return Ok(None) };
        let ip = match host {
            Host::Ip(ip) => ip,
            Host::Name(_) => return Err(OpenError::AddressKind(KIND_NAME)),
        };
        let Some(port) = r.u16() else { return Ok(None) };
        let Some(len) = r.u8() else { return Ok(None) };
        let Some(reason) = r.take(len as usize) else { return Ok(None) };
        let reason = String::from_utf8_lossy(reason).into_owned();
        Ok(Some((OpenReply { status, bound: SocketAddr::new(ip, port), reason }, r.at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target(host: Host, port: u16) -> Target {
        Target { host, port }
    }

    #[test]
    fn requests_and_replies_round_trip_and_partial_input_asks_for_more() {
        let requests = [
            OpenRequest { target: target(Host::Ip("192.0.2.7".parse().unwrap()), 443) },
            OpenRequest { target: target(Host::Ip("2001:db8::1".parse().unwrap()), 22) },
            OpenRequest { target: target(Host::Name("example.com".into()), 80) },
        ];
        for req in requests {
            let mut out = Vec::new();
            req.encode(&mut out).unwrap();
            out.extend_from_slice(b"GET / HTTP/1.1\r\n");
            for cut in 0..out.len() - 16 {
                assert_eq!(OpenRequest::decode(&out[..cut]), Ok(None), "cut at {cut}");
            }
            let (got, used) = OpenRequest::decode(&out).unwrap().unwrap();
            assert_eq!(got, req);
            assert_eq!(&out[used..], b"GET / HTTP/1.1\r\n", "the connection's bytes follow untouched");
        }
        let reply = OpenReply {
            status: OpenStatus::Refused,
            bound: "0.0.0.0:0".parse().unwrap(),
            reason: "connection refused by 192.0.2.7:443".into(),
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(OpenReply::decode(&out[..cut]), Ok(None));
        }
        assert_eq!(OpenReply::decode(&out), Ok(Some((reply, out.len()))));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert_eq!(OpenRequest::decode(&[2, 1]), Err(OpenError::Version(2)));
        assert_eq!(OpenRequest::decode(&[1, 9]), Err(OpenError::AddressKind(9)));
        assert_eq!(OpenRequest::decode(&[1, 3, 0, 0, 80]), Err(OpenError::BadName));
        assert_eq!(OpenRequest::decode(&[1, 3, 2, 0xff, 0xfe, 0, 80]), Err(OpenError::BadName));
        assert_eq!(OpenReply::decode(&[1, 42]), Err(OpenError::Status(42)));
        let long = OpenRequest { target: target(Host::Name("a".repeat(256)), 1) };
        assert_eq!(long.encode(&mut Vec::new()), Err(OpenError::NameTooLong));
        // A reason past 255 bytes is cut, on a character boundary.
        let reply = OpenReply {
            status: OpenStatus::Failed,
            bound: "0.0.0.0:0".parse().unwrap(),
            reason: "é".repeat(200),
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        let (got, _) = OpenReply::decode(&out).unwrap().unwrap();
        assert_eq!(got.reason, "é".repeat(127));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = OpenRequest::decode(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_REQUEST);
            }
            if let Ok(Some((_, used))) = OpenReply::decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
