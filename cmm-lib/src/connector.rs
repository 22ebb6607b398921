//! [`Connector`]: one physical connection to a plain TCP server, on the network the labels
//! choose — now, or later when such a network comes up.
//!
//! This is the single place where labels become an interface-bound socket: the proxy's
//! upstream connections and the multi-socket's connections to plain servers both come here,
//! so choice, binding, fallback across networks and deferral exist once.
//!
//! - Destinations on this machine (loopback, the host's own addresses) connect directly,
//!   unbound: no network is involved.
//! - Otherwise the [`Policy`] picks networks from the scout's snapshot, best first. Each is tried
//!   in turn, and on each every resolved address in turn, each attempt bounded by the connect
//!   timeout: a dead uplink can swallow SYNs for minutes. A refusal is the server's answer and
//!   ends the search; unreachable and timeout try the next network.
//! - [`Connector::connect_or_defer`] is the entry: connected now ([`Opening::Ready`]) or, when
//!   no network fits, [`Opening::Deferred`]: [`Deferred::complete`] waits for the scout to
//!   report a matching network ([`Connector::wait_route`]), within the policy's maximum wait.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmm_policy::{Decision, Labels, Network, Policy};
use cmm_scout::Scout;
use tokio::net::TcpStream;

use crate::net;
use crate::target::Target;
use crate::trickle::Trickler;

/// Where traffic with some labels goes now.
#[derive(Clone, Debug)]
pub enum Route {
    /// Through these networks, best first (never empty).
    Networks {
        /// The networks.
        networks: Vec<Network>,
        /// Why, for logs.
        why: String,
    },
    /// Nothing fits now; wait at most `max_wait` for a network.
    Defer {
        /// Longest wait.
        max_wait: Duration,
        /// Why nothing fits.
        why: String,
    },
    /// Refused by policy.
    Reject {
        /// Why.
        why: String,
    },
}

/// A connected physical connection.
#[derive(Debug)]
pub struct Connected {
    /// The socket.
    pub stream: TcpStream,
    /// The network it leaves through (`None` for a direct connection to this machine).
    pub network: Option<Network>,
    /// The address it is connected to.
    pub remote: SocketAddr,
}

/// The result of [`Connector::connect_or_defer`]: connected now, or deferred until a network fits.
#[derive(Debug)]
pub enum Opening {
    /// Connected.
    Ready(Connected),
    /// Waiting for a network.
    Deferred(Deferred),
}

/// A connection waiting for a network that its labels allow.
pub struct Deferred {
    connector: Connector,
    target: Target,
    addrs: Option<Vec<SocketAddr>>,
    labels: Labels,
    since: Instant,
    max_wait: Duration,
    why: String,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred").field("target", &self.target).field("labels", &self.labels).finish()
    }
}

/// The broad class of a [`ConnectError`], for protocol replies (SOCKS5 codes, HTTP statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server refused the connection.
    Refused,
    /// No route to the network.
    NetworkUnreachable,
    /// No route to the host, or the name did not resolve.
    HostUnreachable,
    /// No answer in time.
    Timeout,
    /// The policy refuses these labels.
    Rejected,
    /// Deferred, and no matching network came up in time.
    DeferTimeout,
    /// Anything else.
    Other,
}

/// Why a connection could not be made, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// Connecting failed on every network and address tried; this is the most telling failure.
    #[error("connect to {addr}{} failed: {source}", via(.network))]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The network it was tried on.
        network: Option<String>,
        /// The socket error.
        source: io::Error,
    },
    /// The label policy refuses the traffic.
    #[error("refused by policy: {why}")]
    Rejected {
        /// Why.
        why: String,
    },
    /// Deferred, and nothing matched within the maximum wait.
    #[error("no matching network within {waited:?}: {why}")]
    DeferTimeout {
        /// How long it waited.
        waited: Duration,
        /// Why nothing matched.
        why: String,
    },
    /// The scout stopped (the program is shutting down).
    #[error("the scout stopped")]
    ScoutGone,
}

fn via(network: &Option<String>) -> String {
    network.as_ref().map(|n| format!(" via {n}")).unwrap_or_default()
}

impl ConnectError {
    /// The class of error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Resolve { .. } => ErrorKind::HostUnreachable,
            ConnectError::Connect { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
                io::ErrorKind::TimedOut => ErrorKind::Timeout,
                io::ErrorKind::NetworkUnreachable | io::ErrorKind::NetworkDown => {
                    ErrorKind::NetworkUnreachable
                }
                io::ErrorKind::HostUnreachable => ErrorKind::HostUnreachable,
                _ => ErrorKind::Other,
            },
            ConnectError::Rejected { .. } => ErrorKind::Rejected,
            ConnectError::DeferTimeout { .. } => ErrorKind::DeferTimeout,
            ConnectError::ScoutGone => ErrorKind::Other,
        }
    }

    /// Whether the network path failed (no answer, no route) rather than the server answering.
    pub fn is_path_failure(&self) -> bool {
        matches!(self.kind(), ErrorKind::Timeout | ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable)
            && matches!(self, ConnectError::Connect { .. })
    }

    /// Rank for picking the most telling error among several attempts: a server's answer beats
    /// a timeout, which beats a missing route.
    fn rank(&self) -> u8 {
        match self.kind() {
            ErrorKind::Refused => 4,
            ErrorKind::Timeout => 3,
            ErrorKind::HostUnreachable => 2,
            ErrorKind::NetworkUnreachable => 1,
            _ => 0,
        }
    }
}

/// Makes physical connections for labels. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    scout: Scout,
    policy: Arc<Policy>,
    connect_timeout: Duration,
    resolve_timeout: Duration,
    trickler: Arc<Trickler>,
}

impl Connector {
    /// A connector choosing with `policy` from `scout`'s networks.
    pub fn new(scout: Scout, policy: Arc<Policy>, connect_timeout: Duration) -> Connector {
        Connector {
            scout,
            policy,
            connect_timeout,
            resolve_timeout: Duration::from_secs(10),
            trickler: Arc::new(Trickler::new()),
        }
    }

    /// The trickler every connection of this connector shares: foreground activity, background
    /// pacing and queueing per network.
    pub fn trickler(&self) -> &Arc<Trickler> {
        &self.trickler
    }

    /// The network on `interface` as the scout sees it now (its latest figures).
    pub fn network(&self, interface: &str) -> Option<Network> {
        self.scout.snapshot().by_interface(interface).cloned()
    }

    /// The scout it watches.
    pub fn scout(&self) -> &Scout {
        &self.scout
    }

    /// The policy it chooses with.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Longest wait for one TCP connect.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Where `labels` go now.
    pub fn route(&self, labels: Labels) -> Route {
        let snap = self.scout.snapshot();
        let now = Instant::now();
        // Our own queues count only when there are any: no copy of the networks otherwise.
        if self.trickler.any_queueing(now) {
            let networks = self.trickler.with_queueing(&snap.networks, now);
            if !labels.contains(Labels::BACKGROUND) {
                // Foreground traffic avoids a queue of our own background traffic this time,
                // and starts the pacing that empties it for the next request.
                for n in networks.iter().filter(|n| !n.queueing.is_zero() && n.trickle.enabled) {
                    self.trickler.foreground(&n.interface, now);
                }
            }
            return route_in(&self.policy, labels, &networks);
        }
        route_in(&self.policy, labels, &snap.networks)
    }

    /// Resolves a target's name (with a timeout).
    pub async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, ConnectError> {
        net::resolve(target, self.resolve_timeout).await.map_err(|source| ConnectError::Resolve {
            host: target.host_name().unwrap_or("?").to_string(),
            source,
        })
    }

    /// Whether every address is on this machine (so no network is involved).
    pub fn is_local(&self, addrs: &[SocketAddr]) -> bool {
        let snap = self.scout.snapshot();
        !addrs.is_empty() && addrs.iter().all(|a| snap.is_local(a.ip()))
    }

    /// One connection to `target` for `labels`: on the network the labels choose now, or, when
    /// none fits, a [`Deferred`] that connects once one comes up. Every plain connection in cmm
    /// starts here: the proxy's upstreams and plain-mode multi-sockets.
    ///
    /// `addrs` is what resolving gave (an error when it failed, perhaps because no network is
    /// up): local destinations connect directly, others on the chosen network. When every
    /// chosen network fails to carry the connection and the scout meanwhile says it is down,
    /// the choice is made again: deferral, or the networks that are up now.
    pub async fn connect_or_defer(
        &self,
        target: &Target,
        addrs: Result<Vec<SocketAddr>, ConnectError>,
        labels: Labels,
    ) -> Result<Opening, ConnectError> {
        if let Ok(a) = &addrs
            && self.is_local(a)
        {
            return self.connect_via(a, &[]).await.map(Opening::Ready);
        }
        // The kernel reports a lost carrier up to a second late, so a network may die under a
        // connect. After a path failure (no answer, no route), ask the scout again: defer, or use
        // what is up now, rather than fail. A few rounds at most, while the choice changes.
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<ConnectError> = None;
        let mut addrs = addrs;
        for _ in 0..3 {
            let networks = match self.route(labels) {
                Route::Reject { why } => return Err(ConnectError::Rejected { why }),
                Route::Networks { networks, .. } => networks,
                Route::Defer { max_wait, why } => {
                    return Ok(Opening::Deferred(Deferred {
                        connector: self.clone(),
                        target: target.clone(),
                        addrs: addrs.ok(),
                        labels,
                        since: Instant::now(),
                        max_wait,
                        why,
                    }));
                }
            };
            let names: Vec<String> = networks.iter().map(|n| n.interface.clone()).collect();
            if names == tried {
                break;
            }
            let resolved = addrs?;
            match self.connect_via(&resolved, &networks).await {
                Ok(c) => return Ok(Opening::Ready(c)),
                Err(e) if e.is_path_failure() => {
                    tracing::debug!("{e}; choosing again");
                    tried = names;
                    last = Some(e);
                    addrs = Ok(resolved);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ConnectError::ScoutGone))
    }

    /// Connects to the first address that answers, trying each network in order (no network:
    /// directly, unbound). On one network every address is tried; a refusal there ends the
    /// search after that network, since another network would reach the same refusing server.
    pub async fn connect_via(
        &self,
        addrs: &[SocketAddr],
        networks: &[Network],
    ) -> Result<Connected, ConnectError> {
        self.connect_via_within(addrs, networks, self.connect_timeout).await
    }

    /// [`Connector::connect_via`] with `timeout` for each connect.
    pub async fn connect_via_within(
        &self,
        addrs: &[SocketAddr],
        networks: &[Network],
        timeout: Duration,
    ) -> Result<Connected, ConnectError> {
        let direct = [None];
        let bound: Vec<Option<&Network>> = networks.iter().map(Some).collect();
        let tries: &[Option<&Network>] = if networks.is_empty() { &direct } else { &bound };
        let mut best: Option<ConnectError> = None;
        for network in tries {
            for &addr in addrs {
                match net::connect(addr, *network, timeout).await {
                    Ok(stream) => {
                        let _ = net::keepalive(&stream);
                        return Ok(Connected { stream, network: network.cloned(), remote: addr });
                    }
                    Err(source) => {
                        let e = ConnectError::Connect {
                            addr,
                            network: network.map(|n| n.interface.clone()),
                            source,
                        };
                        tracing::debug!("{e}");
                        if best.as_ref().is_none_or(|b| e.rank() >= b.rank()) {
                            best = Some(e);
                        }
                    }
                }
            }
            if best.as_ref().is_some_and(|b| b.kind() == ErrorKind::Refused) {
                break;
            }
        }
        Err(best.unwrap_or_else(|| ConnectError::Resolve {
            host: "?".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address to connect to"),
        }))
    }

    /// Waits until `labels` have a network, up to `deadline`.
    pub async fn wait_route(&self, labels: Labels, deadline: Instant) -> Result<Vec<Network>, ConnectError> {
        let mut sub = self.scout.subscribe();
        let policy = self.policy.clone();
        let mut last_why = String::new();
        let wait = sub.wait_for(|snap| match route_in(&policy, labels, &snap.networks) {
            Route::Networks { networks, .. } => Some(Ok(networks)),
            Route::Reject { why } => Some(Err(ConnectError::Rejected { why })),
            Route::Defer { why, .. } => {
                last_why = why;
                None
            }
        });
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(ConnectError::ScoutGone),
            Err(_) => Err(ConnectError::DeferTimeout { waited: Duration::ZERO, why: last_why }),
        }
    }

    /// Resolves when the network on `interface` is no longer up (down, or gone), or when the
    /// scout stops. Connections use it to close cleanly when their network is lost.
    pub async fn until_down(&self, interface: &str) {
        let mut sub = self.scout.subscribe();
        sub.wait_for(|snap| (!snap.is_up(interface)).then_some(())).await;
    }
}

impl Deferred {
    /// Why the connection waits.
    pub fn why(&self) -> &str {
        &self.why
    }

    /// The longest it may wait.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The labels it waits for.
    pub fn labels(&self) -> Labels {
        self.labels
    }

    /// Waits for a matching network and connects through it. Fails when the maximum wait
    /// passes first, or when the policy comes to refuse the labels.
    pub async fn complete(self) -> Result<Connected, ConnectError> {
        let c = &self.connector;
        let deadline = self.since + self.max_wait;
        let mut first = true;
        loop {
            let networks = c.wait_route(self.labels, deadline).await.map_err(|e| match e {
                ConnectError::DeferTimeout { why, .. } => ConnectError::DeferTimeout {
                    waited: self.since.elapsed(),
                    why: if why.is_empty() { self.why.clone() } else { why },
                },
                other => other,
            })?;
            let addrs = match &self.addrs {
                Some(a) => a.clone(),
                None => c.resolve(&self.target).await?,
            };
            // A network that has just come up may drop the first SYN (seen after an admin up:
            // the kernel reports the link running before it carries packets, and the SYN is
            // not sent again for a second). So the first try gets a few round trips, then a
            // fresh socket tries at once with the full timeout.
            let timeout = if first {
                settle_timeout(networks.first(), c.connect_timeout())
            } else {
                c.connect_timeout()
            };
            match c.connect_via_within(&addrs, &networks, timeout).await {
                Ok(conn) => return Ok(conn),
                Err(e) if e.kind() == ErrorKind::Refused => return Err(e),
                Err(e) if first && timeout < c.connect_timeout() => {
                    tracing::debug!("first connect on a network that just came up failed, trying again: {e}");
                    first = false;
                }
                Err(e) if Instant::now() + Duration::from_secs(1) < deadline => {
                    first = false;
                    // The network is up as far as the scout knows but did not carry us; try
                    // again shortly rather than spinning.
                    tracing::debug!("deferred connect failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How long the first connect on a network that has just come up may take: a few of its round
/// trips, at least half a second, at most `connect_timeout`. Seen after an admin up: the kernel
/// reports the link running a moment before it carries packets, drops the first SYN and sends
/// it again only a second later, so a fresh socket soon is faster than waiting.
pub(crate) fn settle_timeout(network: Option<&Network>, connect_timeout: Duration) -> Duration {
    let rtt = network.map_or(Duration::from_millis(100), Network::rtt);
    (rtt * 5).clamp(Duration::from_millis(500), connect_timeout.max(Duration::from_millis(500)))
}

fn route_in(policy: &Policy, labels: Labels, networks: &[Network]) -> Route {
    match policy.choose(labels, networks) {
        Decision::Use { candidates, why } => {
            Route::Networks { networks: candidates.into_iter().map(|i| networks[i].clone()).collect(), why }
        }
        Decision::Defer { max_wait, why } => Route::Defer { max_wait, why },
        Decision::Reject { why } => Route::Reject { why },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::NetworkKind;
    use tokio::net::TcpListener;

    fn policy() -> Arc<Policy> {
        Arc::new(Policy::default())
    }

    #[tokio::test]
    async fn refused_is_reported_as_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = Connector::new(Scout::manual(vec![]), policy(), Duration::from_secs(2));
        let err = c.connect_via(&[addr], &[]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
        assert!(err.to_string().contains(&addr.to_string()));
    }

    #[tokio::test]
    async fn foreground_avoids_our_own_queue_once_and_starts_draining_it() {
        let net = |name: &str, kind, mbit: u64, rtt_ms: u64| {
            let mut n = Network::new(name, &format!("{name}0"), kind);
            n.declared.bandwidth_down = Some(mbit * 1_000_000);
            n.declared.bandwidth_up = Some(mbit * 1_000_000);
            n.declared.rtt = Some(Duration::from_millis(rtt_ms));
            n
        };
        let wifi = net("wifi", NetworkKind::Wifi, 50, 40);
        let cell = net("cell", NetworkKind::Cellular, 2, 120);
        let c = Connector::new(Scout::manual(vec![wifi.clone(), cell]), policy(), Duration::from_secs(1));
        let first = |r: Route| match r {
            Route::Networks { networks, .. } => networks[0].interface.clone(),
            other => panic!("expected networks, got {other:?}"),
        };
        assert_eq!(first(c.route(Labels::ONDEMAND)), "wifi0");
        // Our background downloads fill Wi-Fi's queue: 40 + 100 ms is slower than 120 ms.
        c.trickler().queueing_seen("wifi0", Duration::from_millis(100), Instant::now());
        assert_eq!(first(c.route(Labels::BACKGROUND)), "wifi0");
        assert!(!c.trickler().pacing(&wifi, Instant::now()), "background choices pace nothing");
        assert_eq!(first(c.route(Labels::ONDEMAND)), "cell0");
        // ... and Wi-Fi's background traffic is paced from now on, which empties the queue
        // (paced connections report none), so the next request has Wi-Fi again.
        assert!(c.trickler().pacing(&wifi, Instant::now()));
        c.trickler().queueing_seen("wifi0", Duration::ZERO, Instant::now());
        assert_eq!(first(c.route(Labels::ONDEMAND)), "wifi0");
    }

    #[test]
    fn a_network_that_just_came_up_gets_a_few_round_trips_for_its_first_connect() {
        let mut n = Network::new("wifi", "wifi0", NetworkKind::Wifi);
        n.declared.rtt = Some(Duration::from_millis(150));
        assert_eq!(settle_timeout(Some(&n), Duration::from_secs(3)), Duration::from_millis(750));
        n.declared.rtt = Some(Duration::from_millis(20));
        assert_eq!(settle_timeout(Some(&n), Duration::from_secs(3)), Duration::from_millis(500));
        n.declared.rtt = Some(Duration::from_secs(2));
        assert_eq!(settle_timeout(Some(&n), Duration::from_secs(3)), Duration::from_secs(3));
        assert_eq!(settle_timeout(None, Duration::from_secs(3)), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn until_down_fires_when_the_network_goes() {
        let scout = Scout::manual(vec![Network::new("wifi", "wifi0", NetworkKind::Wifi)]);
        let c = Connector::new(scout.clone(), policy(), Duration::from_secs(1));
        let down = tokio::spawn({
            let c = c.clone();
            async move { c.until_down("wifi0").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!down.is_finished());
        scout.set_override("wifi", Some(false));
        tokio::time::timeout(Duration::from_secs(2), down).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn local_destinations_connect_directly_whatever_the_labels() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // No network is up at all, yet loopback works.
        let c = Connector::new(Scout::manual(vec![]), policy(), Duration::from_secs(2));
        let opening =
            c.connect_or_defer(&Target::ip(addr), Ok(vec![addr]), Labels::BACKGROUND).await.unwrap();
        match opening {
            Opening::Ready(conn) => {
                assert!(conn.network.is_none());
                assert_eq!(conn.remote, addr);
            }
            Opening::Deferred(_) => panic!("loopback must not be deferred"),
        }
    }

    #[tokio::test]
    async fn no_network_defers_until_one_comes_up_or_the_wait_ends() {
        let scout = Scout::manual(vec![]);
        let p = Arc::new(Policy { default_max_wait: Duration::from_millis(200), ..Policy::default() });
        let c = Connector::new(scout.clone(), p, Duration::from_secs(2));
        let target: Target = "192.0.2.1:80".parse().unwrap();
        let addrs = vec!["192.0.2.1:80".parse().unwrap()];
        let Opening::Deferred(d) = c.connect_or_defer(&target, Ok(addrs), Labels::NONE).await.unwrap() else {
            panic!("expected deferral")
        };
        assert!(d.why().contains("no networks"), "{}", d.why());
        let err = d.complete().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DeferTimeout);
        assert!(err.to_string().contains("no matching network within"), "{err}");

        // A network coming up ends the wait (the connect itself then fails: no such device).
        let opening = c
            .connect_or_defer(&target, Ok(vec!["192.0.2.1:80".parse().unwrap()]), Labels::NONE)
            .await
            .unwrap();
        let Opening::Deferred(d) = opening else { panic!() };
        let handle = tokio::spawn(d.complete());
        tokio::time::sleep(Duration::from_millis(20)).await;
        scout.set_networks(vec![Network::new("ghost", "ghost0", NetworkKind::Wifi)]);
        let err = handle.await.unwrap().unwrap_err();
        assert!(
            matches!(err, ConnectError::Connect { ref network, .. } if network.as_deref() == Some("ghost0")),
            "{err}"
        );
    }
}
