//! [`Snapshot`]: the networks at one moment, and the [`Change`]s between two moments.

use std::fmt;
use std::net::IpAddr;

use cmm_policy::Network;
use serde::{Deserialize, Serialize};

/// Every known network at one moment, sorted by interface name, plus this machine's own
/// addresses (destinations that never leave through a network).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Increases with every published change.
    pub generation: u64,
    /// The networks, sorted by interface.
    pub networks: Vec<Network>,
    /// Every address configured on this machine, loopback included.
    pub local_addresses: Vec<IpAddr>,
}

impl Snapshot {
    /// The network on `interface`, if any.
    pub fn by_interface(&self, interface: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.interface == interface)
    }

    /// The networks that are up.
    pub fn up(&self) -> impl Iterator<Item = &Network> {
        self.networks.iter().filter(|n| n.up)
    }

    /// Whether `interface` carries an up network.
    pub fn is_up(&self, interface: &str) -> bool {
        self.by_interface(interface).is_some_and(|n| n.up)
    }

    /// Whether `addr` belongs to this machine (loopback, or configured on any interface).
    pub fn is_local(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        addr.is_loopback() || addr.is_unspecified() || self.local_addresses.contains(&addr)
    }

    /// What changed from `old` to `self`, by interface.
    pub fn changes_since(&self, old: &Snapshot) -> Vec<Change> {
        let mut out = Vec::new();
        for n in &self.networks {
            match old.by_interface(&n.interface) {
                None if n.up => out.push(Change::Up(n.clone())),
                None => out.push(Change::Appeared(n.clone())),
                Some(o) if !o.up && n.up => out.push(Change::Up(n.clone())),
                Some(o) if o.up && !n.up => out.push(Change::Down(n.clone())),
                Some(o) if o != n => out.push(Change::Changed(n.clone())),
                Some(_) => {}
            }
        }
        for o in &old.networks {
            if self.by_interface(&o.interface).is_none() {
                out.push(Change::Removed(o.clone()));
            }
        }
        out
    }
}

/// How one network changed between two snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", content = "network", rename_all = "lowercase")]
pub enum Change {
    /// It came up (or appeared up).
    Up(Network),
    /// It went down; `down_reason` says why.
    Down(Network),
    /// Still up or still down, but its figures, addresses or reason changed.
    Changed(Network),
    /// It appeared, down.
    Appeared(Network),
    /// It is gone (its interface was deleted).
    Removed(Network),
}

impl Change {
    /// The network as it is after the change (before it, for `Removed`).
    pub fn network(&self) -> &Network {
        match self {
            Change::Up(n)
            | Change::Down(n)
            | Change::Changed(n)
            | Change::Appeared(n)
            | Change::Removed(n) => n,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.network();
        let what = match self {
            Change::Up(_) => "up",
            Change::Down(_) => "down",
            Change::Changed(_) => "changed",
            Change::Appeared(_) => "appeared",
            Change::Removed(_) => "removed",
        };
        write!(f, "{} ({}) {what}", n.name, n.interface)?;
        if let Some(r) = &n.down_reason {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::NetworkKind;

    #[test]
    fn changes_are_reported_per_interface() {
        let wifi = Network::new("wifi", "wifi0", NetworkKind::Wifi);
        let cell = Network::new("cell", "cell0", NetworkKind::Cellular);
        let old =
            Snapshot { generation: 1, networks: vec![cell.clone(), wifi.clone()], local_addresses: vec![] };
        let mut down = wifi.clone();
        down.up = false;
        down.down_reason = Some("no carrier".into());
        let new = Snapshot { generation: 2, networks: vec![down.clone()], local_addresses: vec![] };
        let changes = new.changes_since(&old);
        assert_eq!(changes, vec![Change::Down(down.clone()), Change::Removed(cell.clone())]);
        assert_eq!(changes[0].to_string(), "wifi (wifi0) down: no carrier");
        assert!(new.changes_since(&new).is_empty());
        let back = Snapshot { generation: 3, networks: vec![wifi.clone()], local_addresses: vec![] };
        assert_eq!(back.changes_since(&new), vec![Change::Up(wifi)]);
    }

    #[test]
    fn local_addresses() {
        let s = Snapshot { local_addresses: vec!["10.0.0.5".parse().unwrap()], ..Snapshot::default() };
        assert!(s.is_local("127.0.0.1".parse().unwrap()));
        assert!(s.is_local("::1".parse().unwrap()));
        assert!(s.is_local("10.0.0.5".parse().unwrap()));
        assert!(s.is_local("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!s.is_local("10.0.0.6".parse().unwrap()));
    }
}
