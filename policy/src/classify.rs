//! [`Classifier`]: which interfaces are networks, and what they are called and worth.
//!
//! Declared networks (`[[network]]` in proxy.toml) match interfaces by name or glob, first
//! declaration first. With `auto_networks` (the default), every other interface becomes a
//! network named after itself, its kind guessed from its name. Whether a network is *up* is the
//! scout's business, not this module's.

use crate::glob::Glob;
use crate::network::{Figures, Network, NetworkKind, Trickle};

/// A `[[network]]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkDef {
    /// The network's name, used by label policies.
    pub name: String,
    /// Interface name or pattern (`wlan0`, `wlan*`).
    pub interface: Glob,
    /// Its kind.
    pub kind: NetworkKind,
    /// Declared bandwidth and RTT.
    pub declared: Figures,
    /// Whether traffic on it costs money.
    pub metered: bool,
    /// Whether the scout's measurements replace the declared figures.
    pub use_estimates: bool,
    /// How background traffic is paced on it.
    pub trickle: Trickle,
    /// Preference rank (its position in the file).
    pub rank: u32,
}

/// Turns interface names into (not yet up or down) networks.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    defs: Vec<NetworkDef>,
    auto: bool,
}

/// Ranks of automatic networks start here, after every declared one.
const AUTO_RANK: u32 = 1000;

impl Classifier {
    /// A classifier over declared networks; `auto` makes other interfaces networks too.
    pub fn new(defs: Vec<NetworkDef>, auto: bool) -> Classifier {
        Classifier { defs, auto }
    }

    /// The declared networks.
    pub fn defs(&self) -> &[NetworkDef] {
        &self.defs
    }

    /// The network an interface belongs to, or `None` when it is not one. The result is
    /// marked up; the caller decides whether it really is.
    pub fn classify(&self, interface: &str, index: u32) -> Option<Network> {
        if let Some(def) = self.defs.iter().find(|d| d.interface.matches(interface)) {
            let mut n = Network::new(&def.name, interface, def.kind);
            n.index = index;
            n.declared = def.declared;
            n.metered = def.metered;
            n.use_estimates = def.use_estimates;
            n.trickle = def.trickle;
            n.rank = def.rank;
            return Some(n);
        }
        if !self.auto || interface == "lo" {
            return None;
        }
        let kind = NetworkKind::guess(interface);
        let mut n = Network::new(interface, interface, kind);
        n.index = index;
        n.metered = kind == NetworkKind::Cellular;
        n.rank = AUTO_RANK
            + match kind {
                NetworkKind::Ethernet => 0,
                NetworkKind::Wifi => 1,
                NetworkKind::Cellular => 2,
                NetworkKind::Other => 3,
            };
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_first_then_auto() {
        let c = Classifier::new(
            vec![NetworkDef {
                name: "wifi".into(),
                interface: Glob::new("wlan*"),
                kind: NetworkKind::Wifi,
                declared: Figures::default(),
                metered: false,
                use_estimates: true,
                trickle: Trickle::default(),
                rank: 0,
            }],
            true,
        );
        let w = c.classify("wlan1", 3).unwrap();
        assert_eq!((w.name.as_str(), w.interface.as_str(), w.index), ("wifi", "wlan1", 3));
        let e = c.classify("eth0", 2).unwrap();
        assert_eq!((e.name.as_str(), e.kind), ("eth0", NetworkKind::Ethernet));
        assert!(e.rank > w.rank);
        let m = c.classify("wwan0", 4).unwrap();
        assert!(m.metered);
        assert!(c.classify("lo", 1).is_none());
        let strict = Classifier::new(c.defs().to_vec(), false);
        assert!(strict.classify("eth0", 2).is_none());
    }
}
