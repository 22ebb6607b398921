//! Active probes: now and then, a TCP connect to a configured target through every up
//! network; the handshake time is an RTT sample for that network's estimate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpSocket;

use crate::ipc::Sample;
use crate::scout::WeakScout;

/// Longest a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One probe: connect to `addr` through `interface`; the time the handshake took.
pub async fn probe(addr: SocketAddr, interface: &str) -> std::io::Result<Duration> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    SockRef::from(&socket).bind_device(Some(interface.as_bytes()))?;
    let start = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(_stream)) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "probe timed out")),
    }
}

/// Probes every up network every `interval`, until the scout is gone.
pub(crate) async fn run(scout: WeakScout, target: String, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Some(s) = scout.upgrade() else { return };
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(target.as_str()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                tracing::debug!("probe target {target} does not resolve: {e}");
                continue;
            }
        };
        let up: Vec<_> = s.snapshot().up().cloned().collect();
        drop(s);
        for n in up {
            let Some(&addr) = addrs.iter().find(|a| n.addresses.iter().any(|l| l.is_ipv4() == a.is_ipv4()))
            else {
                continue;
            };
            match probe(addr, &n.interface).await {
                Ok(rtt) => {
                    tracing::debug!(network = %n.name, ?rtt, "probe");
                    if let Some(s) = scout.upgrade() {
                        s.report(&n.interface, Sample { rtt: Some(rtt), ..Sample::default() });
                    }
                }
                Err(e) => tracing::debug!(network = %n.name, "probe failed: {e}"),
            }
        }
    }
}
