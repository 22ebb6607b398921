//! [`Target`]: where a connection goes, as a client names it (an address or a host name).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// A destination host: an address, or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address.
    Ip(IpAddr),
    /// A DNS name (without a trailing dot).
    Name(String),
}

/// A destination: host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host.
    pub host: Host,
    /// The TCP port.
    pub port: u16,
}

impl Target {
    /// A target from a socket address.
    pub fn ip(addr: SocketAddr) -> Target {
        Target { host: Host::Ip(addr.ip()), port: addr.port() }
    }

    /// A target from a name and port; a name that is an IP literal becomes [`Host::Ip`].
    pub fn name(name: &str, port: u16) -> Target {
        let trimmed = name.trim_start_matches('[').trim_end_matches(']');
        match trimmed.parse::<IpAddr>() {
            Ok(ip) => Target { host: Host::Ip(ip), port },
            Err(_) => Target { host: Host::Name(name.trim_end_matches('.').to_ascii_lowercase()), port },
        }
    }

    /// The host name, when the client gave one.
    pub fn host_name(&self) -> Option<&str> {
        match &self.host {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`.
    fn from_str(s: &str) -> Result<Target, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target::ip(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?} has a bad port"))?;
        if host.is_empty() || host.contains(':') || host.len() > 253 {
            return Err(format!("{s:?} has a bad host"));
        }
        Ok(Target::name(host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        assert_eq!("example.com:443".parse::<Target>().unwrap().to_string(), "example.com:443");
        assert_eq!("[fd03::2]:80".parse::<Target>().unwrap().to_string(), "[fd03::2]:80");
        assert_eq!(Target::name("[fd03::2]", 80).host, Host::Ip("fd03::2".parse().unwrap()));
        assert_eq!(Target::name("Server.LAB.", 1).host_name(), Some("server.lab"));
        assert!("nohost".parse::<Target>().is_err());
        assert!("a:b:c".parse::<Target>().is_err());
    }
}
