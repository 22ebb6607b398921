//! Physical connections: a TCP connect that really leaves through one network's interface
//! (`SO_BINDTODEVICE`), with a timeout, and name resolution with a timeout.
//!
//! Binding a source address alone is not enough on Linux: the main routing table still picks
//! the interface. Binding the device restricts the route lookup to routes through it, so a
//! connection for the cellular network leaves through the cellular link even though Wi-Fi holds
//! the better default route.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use cmm_policy::Network;
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::target::{Host, Target};

/// Connects to `addr` through `network`'s interface (or unbound when `network` is `None`),
/// giving up after `timeout`.
pub async fn connect(
    addr: SocketAddr,
    network: Option<&Network>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(n) = network {
        SockRef::from(&socket).bind_device(Some(n.interface.as_bytes()))?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

/// Resolves a target to socket addresses, in the resolver's order (RFC 6724: usually IPv6
/// first when it is usable). An IP target resolves to itself.
pub async fn resolve(target: &Target, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
                Ok(r) => r?.collect(),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("resolving {name} took longer than {timeout:?}"),
                    ));
                }
            };
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address")));
            }
            Ok(addrs)
        }
    }
}

/// Sets TCP keepalive so that a peer that vanished is noticed within a few minutes even when
/// no data flows.
pub fn keepalive(stream: &TcpStream) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    SockRef::from(stream).set_tcp_keepalive(&ka)
}
