//! [`Destinations`]: which destinations the relay dials for its clients.
//!
//! By default any: a relay is reachable only by the keys it allows, and it is their way out.
//! An operator can narrow it to networks (CIDR) and ports; a name is checked after it is
//! resolved, address by address, so a name cannot smuggle a forbidden address past the rules.

use std::net::IpAddr;

use ipnet::IpNet;

/// The destinations allowed: every address in `nets` (all when empty) on every port in
/// `ports` (all when empty).
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    /// Allowed networks; empty: every address.
    pub nets: Vec<IpNet>,
    /// Allowed ports; empty: every port.
    pub ports: Vec<u16>,
}

impl Destinations {
    /// Whether the relay may connect to `ip` port `port`.
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        (self.nets.is_empty() || self.nets.iter().any(|n| n.contains(&ip)))
            && (self.ports.is_empty() || self.ports.contains(&port))
    }

    /// Whether any address may be dialled on `port` (checked before resolving a name).
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_by_default_and_only_what_is_listed_otherwise() {
        let any = Destinations::default();
        assert!(any.allows("192.0.2.1".parse().unwrap(), 1));
        let narrow = Destinations { nets: vec!["10.0.0.0/8".parse().unwrap()], ports: vec![443] };
        assert!(narrow.allows("10.1.2.3".parse().unwrap(), 443));
        assert!(!narrow.allows("10.1.2.3".parse().unwrap(), 80));
        assert!(!narrow.allows("192.0.2.1".parse().unwrap(), 443));
        assert!(!narrow.allows_port(22));
    }
}
