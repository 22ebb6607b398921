//! The rtnetlink driver: joins the link, address and route multicast groups, dumps the initial
//! state, and feeds every message to a [`NetState`] as [`KernelEvent`]s.
//!
//! Translation of netlink messages is a pure function ([`translate`]), so it is tested without
//! a socket. The driver coalesces bursts (a link going down sends the link change and several
//! route deletions at once) into one published snapshot, and re-dumps every minute in case the
//! kernel dropped multicast messages under load.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use crate::netstate::{KernelEvent, NetState, RouteKey};

/// How long the initial dump may take before the scout gives up.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the whole state is dumped again, in case multicast messages were lost.
const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// Called with each new kernel state; returns false when nobody listens any more.
pub(crate) type Publish = Box<dyn FnMut(&NetState) -> bool + Send>;

/// Starts watching the kernel. Returns once the initial state has been read and published; the
/// returned task then follows changes until `publish` returns false.
pub(crate) async fn spawn(mut publish: Publish) -> io::Result<tokio::task::JoinHandle<()>> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
    let conn_task = tokio::spawn(conn);
    // Subscribed before dumping: anything that changes during the dump arrives afterwards as an
    // event and is applied on top, which converges because events are upserts and deletes.
    let mut state = match tokio::time::timeout(DUMP_TIMEOUT, dump(&handle)).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => {
            conn_task.abort();
            return Err(e);
        }
        Err(_) => {
            conn_task.abort();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "netlink dump timed out"));
        }
    };
    publish(&state);
    Ok(tokio::spawn(async move {
        let _conn = AbortOnDrop(conn_task);
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some((msg, _)) = msg else {
                        tracing::warn!("netlink monitor closed; network changes are no longer seen");
                        return;
                    };
                    apply(&mut state, msg);
                    // Take the rest of the burst before publishing once.
                    while let Some(Some((msg, _))) = messages.next().now_or_never() {
                        apply(&mut state, msg);
                    }
                }
                _ = resync.tick() => {
                    match tokio::time::timeout(DUMP_TIMEOUT, dump(&handle)).await {
                        Ok(Ok(fresh)) => state = fresh,
                        Ok(Err(e)) => tracing::warn!("netlink resync failed: {e}"),
                        Err(_) => tracing::warn!("netlink resync timed out"),
                    }
                }
            }
            if !publish(&state) {
                return;
            }
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn apply(state: &mut NetState, msg: NetlinkMessage<RouteNetlinkMessage>) {
    if let NetlinkPayload::InnerMessage(inner) = msg.payload {
        for event in translate(&inner, state) {
            tracing::trace!(?event, "kernel");
            state.apply(event);
        }
    }
}

/// Reads links, addresses and routes (all tables, both families) into a fresh state.
async fn dump(handle: &Handle) -> io::Result<NetState> {
    let mut state = NetState::new();
    let err = |e: rtnetlink::Error| io::Error::other(format!("netlink: {e}"));
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(err)? {
        for e in translate(&RouteNetlinkMessage::NewLink(link), &state) {
            state.apply(e);
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(addr) = addrs.try_next().await.map_err(err)? {
        for e in translate(&RouteNetlinkMessage::NewAddress(addr), &state) {
            state.apply(e);
        }
    }
    for request in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(request).execute();
        while let Some(route) = routes.try_next().await.map_err(err)? {
            for e in translate(&RouteNetlinkMessage::NewRoute(route), &state) {
                state.apply(e);
            }
        }
    }
    Ok(state)
}

/// The events one netlink message means. Messages we do not need give none.
pub fn translate(msg: &RouteNetlinkMessage, state: &NetState) -> Vec<KernelEvent> {
    match msg {
        RouteNetlinkMessage::NewLink(link) => link_event(link, state).into_iter().collect(),
        RouteNetlinkMessage::DelLink(link) => vec![KernelEvent::LinkGone { index: link.header.index }],
        RouteNetlinkMessage::NewAddress(a) => address_event(a, true).into_iter().collect(),
        RouteNetlinkMessage::DelAddress(a) => address_event(a, false).into_iter().collect(),
        RouteNetlinkMessage::NewRoute(r) => {
            default_routes(r).into_iter().map(KernelEvent::DefaultRoute).collect()
        }
        RouteNetlinkMessage::DelRoute(r) => {
            default_routes(r).into_iter().map(KernelEvent::DefaultRouteGone).collect()
        }
        _ => Vec::new(),
    }
}

fn link_event(link: &LinkMessage, state: &NetState) -> Option<KernelEvent> {
    let index = link.header.index;
    let name = link
        .attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        .or_else(|| state.link_name(index).map(str::to_string))?;
    let flags = link.header.flags;
    Some(KernelEvent::Link {
        index,
        name,
        admin_up: flags.contains(LinkFlags::Up),
        lower_up: flags.contains(LinkFlags::LowerUp),
        loopback: flags.contains(LinkFlags::Loopback),
    })
}

fn address_event(a: &AddressMessage, added: bool) -> Option<KernelEvent> {
    let index = a.header.index;
    let local =
        a.attributes.iter().find_map(|x| if let AddressAttribute::Local(ip) = x { Some(*ip) } else { None });
    let address = a
        .attributes
        .iter()
        .find_map(|x| if let AddressAttribute::Address(ip) = x { Some(*ip) } else { None });
    let addr: IpAddr = local.or(address)?;
    if !added {
        return Some(KernelEvent::AddressGone { index, addr });
    }
    let long_flags =
        a.attributes.iter().find_map(|x| if let AddressAttribute::Flags(f) = x { Some(*f) } else { None });
    let tentative = a.header.flags.contains(AddressHeaderFlags::Tentative)
        || long_flags.is_some_and(|f| f.contains(AddressFlags::Tentative));
    let dad_failed = a.header.flags.contains(AddressHeaderFlags::Dadfailed)
        || long_flags.is_some_and(|f| f.contains(AddressFlags::Dadfailed));
    let scope_ok = matches!(a.header.scope, AddressScope::Universe | AddressScope::Site);
    Some(KernelEvent::Address { index, addr, usable: scope_ok && !tentative && !dad_failed })
}

fn default_routes(r: &RouteMessage) -> Vec<RouteKey> {
    let h = &r.header;
    if h.destination_prefix_length != 0 || h.kind != RouteType::Unicast {
        return Vec::new();
    }
    let v6 = match h.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return Vec::new(),
    };
    let mut table = u32::from(h.table);
    let mut metric = 0;
    let mut oif = None;
    let mut gateway = None;
    let mut nexthops = Vec::new();
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::MultiPath(hops) => {
                for hop in hops {
                    let gw = hop.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => route_ip(g),
                        _ => None,
                    });
                    nexthops.push((hop.interface_index, gw));
                }
            }
            _ => {}
        }
    }
    if let Some(oif) = oif {
        nexthops.push((oif, gateway));
    }
    nexthops.into_iter().map(|(oif, gateway)| RouteKey { v6, table, metric, oif, gateway }).collect()
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteHeader;

    fn link_msg(index: u32, name: Option<&str>, flags: LinkFlags) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = flags;
        if let Some(n) = name {
            m.attributes.push(LinkAttribute::IfName(n.into()));
        }
        RouteNetlinkMessage::NewLink(m)
    }

    #[test]
    fn links_keep_their_name_when_a_message_omits_it() {
        let mut s = NetState::new();
        for e in translate(&link_msg(4, Some("wifi0"), LinkFlags::Up | LinkFlags::LowerUp), &s) {
            s.apply(e);
        }
        let events = translate(&link_msg(4, None, LinkFlags::Up), &s);
        assert_eq!(
            events,
            vec![KernelEvent::Link {
                index: 4,
                name: "wifi0".into(),
                admin_up: true,
                lower_up: false,
                loopback: false
            }]
        );
        // Unknown link without a name: nothing to say.
        assert!(translate(&link_msg(9, None, LinkFlags::Up), &s).is_empty());
    }

    #[test]
    fn addresses_tentative_and_scoped() {
        let mut a = AddressMessage::default();
        a.header.index = 2;
        a.header.scope = AddressScope::Universe;
        a.attributes.push(AddressAttribute::Address("fd01::2".parse().unwrap()));
        let ok = translate(&RouteNetlinkMessage::NewAddress(a.clone()), &NetState::new());
        assert_eq!(
            ok,
            vec![KernelEvent::Address { index: 2, addr: "fd01::2".parse().unwrap(), usable: true }]
        );
        a.attributes.push(AddressAttribute::Flags(AddressFlags::Tentative));
        let tentative = translate(&RouteNetlinkMessage::NewAddress(a.clone()), &NetState::new());
        assert!(matches!(tentative[0], KernelEvent::Address { usable: false, .. }));
        a.header.scope = AddressScope::Link;
        let gone = translate(&RouteNetlinkMessage::DelAddress(a), &NetState::new());
        assert_eq!(gone, vec![KernelEvent::AddressGone { index: 2, addr: "fd01::2".parse().unwrap() }]);
    }

    #[test]
    fn only_unicast_default_routes_count() {
        let mut r = RouteMessage::default();
        r.header = RouteHeader {
            address_family: AddressFamily::Inet,
            table: RouteHeader::RT_TABLE_MAIN,
            kind: RouteType::Unicast,
            ..RouteHeader::default()
        };
        r.attributes.push(RouteAttribute::Oif(3));
        r.attributes.push(RouteAttribute::Priority(100));
        r.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet("10.1.0.1".parse().unwrap())));
        let events = translate(&RouteNetlinkMessage::NewRoute(r.clone()), &NetState::new());
        assert_eq!(
            events,
            vec![KernelEvent::DefaultRoute(RouteKey {
                v6: false,
                table: 254,
                metric: 100,
                oif: 3,
                gateway: Some("10.1.0.1".parse().unwrap())
            })]
        );
        let mut subnet = r.clone();
        subnet.header.destination_prefix_length = 24;
        assert!(translate(&RouteNetlinkMessage::NewRoute(subnet), &NetState::new()).is_empty());
        let mut blackhole = r;
        blackhole.header.kind = RouteType::BlackHole;
        assert!(translate(&RouteNetlinkMessage::NewRoute(blackhole), &NetState::new()).is_empty());
    }
}
