//! [`NetState`]: the kernel's links, addresses and default routes, fed [`KernelEvent`]s, and
//! the networks they make. No I/O: the rtnetlink driver in `monitor` feeds it, tests feed it
//! by hand.
//!
//! A network is up when its interface is administratively up, has carrier (`LOWER_UP`), holds a
//! usable address of some family, and has a default route of that family through it in any
//! routing table (the main one, or a policy-routing table of its own). Each of these facts
//! matters on Linux: taking a link down deletes its default routes, and a link that lost
//! carrier keeps them although nothing gets through.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cmm_policy::{Classifier, Network};

/// One fact the kernel told us, in our own words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// A link exists with these properties (new or changed).
    Link {
        /// Interface index.
        index: u32,
        /// Interface name.
        name: String,
        /// `IFF_UP`: administratively up.
        admin_up: bool,
        /// `IFF_LOWER_UP`: the driver reports carrier.
        lower_up: bool,
        /// `IFF_LOOPBACK`.
        loopback: bool,
    },
    /// A link is gone.
    LinkGone {
        /// Interface index.
        index: u32,
    },
    /// An address is on a link.
    Address {
        /// Interface index.
        index: u32,
        /// The address.
        addr: IpAddr,
        /// Whether it can source traffic out: global scope, not tentative, DAD not failed.
        usable: bool,
    },
    /// An address left a link.
    AddressGone {
        /// Interface index.
        index: u32,
        /// The address.
        addr: IpAddr,
    },
    /// A default route through `oif` exists.
    DefaultRoute(RouteKey),
    /// That default route is gone.
    DefaultRouteGone(RouteKey),
}

/// Identity of one default route next hop, as the kernel reports it in add and delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    /// True for IPv6.
    pub v6: bool,
    /// Routing table.
    pub table: u32,
    /// Route metric.
    pub metric: u32,
    /// Output interface index.
    pub oif: u32,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
}

#[derive(Clone, Debug)]
struct Link {
    name: String,
    admin_up: bool,
    lower_up: bool,
    loopback: bool,
}

/// What the kernel has told us so far.
#[derive(Clone, Debug, Default)]
pub struct NetState {
    links: BTreeMap<u32, Link>,
    addrs: BTreeMap<u32, BTreeMap<IpAddr, bool>>,
    routes: BTreeSet<RouteKey>,
    /// Links that had a default route at some point: an automatic network stays listed (as
    /// down) after its routes go, until the link itself goes.
    led_out: BTreeSet<u32>,
}

impl NetState {
    /// An empty state.
    pub fn new() -> NetState {
        NetState::default()
    }

    /// Applies one event. Events are idempotent upserts and deletes, so replaying events that
    /// raced with a dump converges on the kernel's state.
    pub fn apply(&mut self, event: KernelEvent) {
        match event {
            KernelEvent::Link { index, name, admin_up, lower_up, loopback } => {
                self.links.insert(index, Link { name, admin_up, lower_up, loopback });
            }
            KernelEvent::LinkGone { index } => {
                self.links.remove(&index);
                self.addrs.remove(&index);
                self.routes.retain(|r| r.oif != index);
                self.led_out.remove(&index);
            }
            KernelEvent::Address { index, addr, usable } => {
                self.addrs.entry(index).or_default().insert(addr, usable);
            }
            KernelEvent::AddressGone { index, addr } => {
                if let Some(a) = self.addrs.get_mut(&index) {
                    a.remove(&addr);
                }
            }
            KernelEvent::DefaultRoute(key) => {
                self.led_out.insert(key.oif);
                self.routes.insert(key);
            }
            KernelEvent::DefaultRouteGone(key) => {
                self.routes.remove(&key);
            }
        }
    }

    /// The networks the links make, classified, sorted by interface name, each up or down with
    /// the reason.
    pub fn networks(&self, classifier: &Classifier) -> Vec<Network> {
        let mut out = Vec::new();
        for (&index, link) in &self.links {
            if link.loopback {
                continue;
            }
            let Some(mut n) = classifier.classify(&link.name, index) else { continue };
            let usable: Vec<IpAddr> = self
                .addrs
                .get(&index)
                .map(|a| a.iter().filter(|(_, u)| **u).map(|(a, _)| *a).collect())
                .unwrap_or_default();
            let has_route = |v6: bool| self.routes.iter().any(|r| r.oif == index && r.v6 == v6);
            let routed = usable.iter().any(|a| has_route(a.is_ipv6()));
            let any_route = has_route(false) || has_route(true);
            let reason = if !link.admin_up {
                Some("admin down")
            } else if !link.lower_up {
                Some("no carrier")
            } else if usable.is_empty() {
                Some("no usable address")
            } else if !routed {
                Some(if any_route { "no default route for its addresses" } else { "no default route" })
            } else {
                None
            };
            // Interfaces that never led out (no default route through them, ever seen) are not
            // networks unless declared: a bridge or a container veth is not a way out.
            if !self.led_out.contains(&index)
                && !classifier.defs().iter().any(|d| d.interface.matches(&link.name))
            {
                continue;
            }
            n.up = reason.is_none();
            n.down_reason = reason.map(str::to_string);
            n.addresses = usable;
            out.push(n);
        }
        out.sort_by(|a, b| a.interface.cmp(&b.interface));
        out
    }

    /// Every address on every link, loopback included: destinations on this machine.
    pub fn local_addresses(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.addrs.values().flat_map(|a| a.keys().copied()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// The name of the interface with this index, if known.
    pub fn link_name(&self, index: u32) -> Option<&str> {
        self.links.get(&index).map(|l| l.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::{Figures, Glob, NetworkDef, NetworkKind};

    fn classifier() -> Classifier {
        Classifier::new(
            vec![NetworkDef {
                name: "wifi".into(),
                interface: Glob::new("wifi*"),
                kind: NetworkKind::Wifi,
                declared: Figures::default(),
                metered: false,
                use_estimates: true,
                trickle: Default::default(),
                rank: 0,
            }],
            true,
        )
    }

    fn link(index: u32, name: &str, admin_up: bool, lower_up: bool) -> KernelEvent {
        KernelEvent::Link { index, name: name.into(), admin_up, lower_up, loopback: false }
    }

    fn route(oif: u32) -> RouteKey {
        RouteKey { v6: false, table: 254, metric: 100, oif, gateway: Some("10.1.0.1".parse().unwrap()) }
    }

    fn up_state() -> NetState {
        let mut s = NetState::new();
        s.apply(KernelEvent::Link {
            index: 1,
            name: "lo".into(),
            admin_up: true,
            lower_up: true,
            loopback: true,
        });
        s.apply(KernelEvent::Address { index: 1, addr: "127.0.0.1".parse().unwrap(), usable: false });
        s.apply(link(2, "wifi0", true, true));
        s.apply(KernelEvent::Address { index: 2, addr: "10.1.0.2".parse().unwrap(), usable: true });
        s.apply(KernelEvent::DefaultRoute(route(2)));
        s
    }

    fn only(s: &NetState) -> Network {
        let nets = s.networks(&classifier());
        assert_eq!(nets.len(), 1, "{nets:?}");
        nets.into_iter().next().unwrap()
    }

    #[test]
    fn a_routed_link_with_carrier_and_address_is_up() {
        let s = up_state();
        let n = only(&s);
        assert!(n.up);
        assert_eq!(n.name, "wifi");
        assert_eq!(n.addresses, vec!["10.1.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.local_addresses().len(), 2);
    }

    #[test]
    fn each_missing_fact_takes_it_down_with_a_reason() {
        let mut s = up_state();
        s.apply(link(2, "wifi0", true, false));
        assert_eq!(only(&s).down_reason.as_deref(), Some("no carrier"));
        s.apply(link(2, "wifi0", false, false));
        assert_eq!(only(&s).down_reason.as_deref(), Some("admin down"));

        let mut s = up_state();
        s.apply(KernelEvent::DefaultRouteGone(route(2)));
        // It led out once but has no route now: still listed, as down.
        let nets = s.networks(&classifier());
        assert_eq!(nets[0].down_reason.as_deref(), Some("no default route"));

        let mut s = up_state();
        s.apply(KernelEvent::AddressGone { index: 2, addr: "10.1.0.2".parse().unwrap() });
        assert_eq!(only(&s).down_reason.as_deref(), Some("no usable address"));

        let mut s = up_state();
        s.apply(KernelEvent::Address { index: 2, addr: "10.1.0.2".parse().unwrap(), usable: false });
        assert!(!only(&s).up, "a tentative address is not usable");
    }

    #[test]
    fn a_v6_route_needs_a_v6_address() {
        let mut s = up_state();
        s.apply(KernelEvent::DefaultRouteGone(route(2)));
        s.apply(KernelEvent::DefaultRoute(RouteKey { v6: true, gateway: None, ..route(2) }));
        assert_eq!(only(&s).down_reason.as_deref(), Some("no default route for its addresses"));
        s.apply(KernelEvent::Address { index: 2, addr: "fd01::2".parse().unwrap(), usable: true });
        assert!(only(&s).up);
    }

    #[test]
    fn policy_routing_tables_count() {
        let mut s = up_state();
        s.apply(KernelEvent::DefaultRouteGone(route(2)));
        s.apply(KernelEvent::DefaultRoute(RouteKey { table: 100, ..route(2) }));
        assert!(only(&s).up);
    }

    #[test]
    fn undeclared_links_without_routes_are_not_networks() {
        let mut s = up_state();
        s.apply(link(3, "br0", true, true));
        s.apply(KernelEvent::Address { index: 3, addr: "172.17.0.1".parse().unwrap(), usable: true });
        assert_eq!(s.networks(&classifier()).len(), 1);
        s.apply(KernelEvent::DefaultRoute(RouteKey { oif: 3, metric: 500, ..route(3) }));
        let nets = s.networks(&classifier());
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[0].interface, "br0");
        // Admin down deletes its routes; it stays listed, as down.
        s.apply(link(3, "br0", false, false));
        s.apply(KernelEvent::DefaultRouteGone(RouteKey { oif: 3, metric: 500, ..route(3) }));
        let nets = s.networks(&classifier());
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[0].down_reason.as_deref(), Some("admin down"));
        s.apply(KernelEvent::LinkGone { index: 3 });
        assert_eq!(s.networks(&classifier()).len(), 1);
    }
}
