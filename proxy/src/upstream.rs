//! Upstreams: how the proxy reaches a destination for a client.
//!
//! [`Upstream`] is the one interface the front ends (SOCKS5, HTTP) talk to. It decides the
//! labels (username first, then the destination rules of `proxy.toml`, then the default), and
//! opens a connection: ready now, or deferred until a matching network is up. Today's
//! implementation, [`DirectUpstream`], connects from this machine through the chosen network's
//! interface with `cmm::Connector::connect_or_defer`, the same code a label-aware
//! application's plain multi-socket uses. A relay upstream (one multi-socket to a cmm peer carrying
//! many app connections) will implement the same trait.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmm::net::TcpStats;
use cmm::{ConnectError, Connected, Connector, Direction, Grant, Opening, Target};
use socket2::SockRef;

use crate::splice::Pace;
use cmm_policy::{Destination, Labels, RuleSet, Via};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client's request for a connection.
#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    /// Where to.
    pub target: Target,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// Labels from the username, if any.
    pub labels: Option<Labels>,
}

/// Where the labels of a connection came from, for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelSource {
    /// The proxy username.
    Username,
    /// A `[[rule]]` at this line of the config.
    Rule(usize),
    /// `default_labels`.
    Default,
}

impl fmt::Display for LabelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelSource::Username => f.write_str("username"),
            LabelSource::Rule(line) => write!(f, "rule@{line}"),
            LabelSource::Default => f.write_str("default"),
        }
    }
}

/// The byte stream to the destination.
pub enum UpstreamIo {
    /// A TCP socket: the byte path can splice(2) it.
    Tcp(TcpStream),
    /// Any other stream (a relay's multiplexed stream, later).
    Stream(Box<dyn AsyncStream>),
}

/// A bidirectional byte stream.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// An open connection to the destination.
pub struct UpstreamConn {
    /// The bytes.
    pub io: UpstreamIo,
    /// Which network carries it (`None`: direct, this machine).
    pub network: Option<String>,
    /// The local address of the upstream socket (the SOCKS5 reply's BND.ADDR).
    pub local: Option<SocketAddr>,
    /// Resolves, with a reason, when the path is lost (its network went down).
    pub lost: BoxFuture<'static, String>,
    /// The network under it, when it has one: pacing, and measurements for the scout.
    pub path: Option<Arc<NetworkPath>>,
}

/// Unsent bytes a background upstream socket may hold: enough to keep the link busy, little
/// enough that a foreground request arriving later is not stuck behind seconds of backlog.
const BACKGROUND_NOTSENT_LOWAT: u32 = 128 * 1024;

/// The network under an upstream connection, as its byte path sees it. Foreground traffic
/// marks the network busy; background traffic is paced there meanwhile (the connector's
/// [`cmm::Trickler`]). Now and then the connection's TCP_INFO feeds the scout's estimates and,
/// for background connections, the queueing delay that choices by latency take into account.
pub struct NetworkPath {
    connector: Connector,
    interface: String,
    background: bool,
}

impl NetworkPath {
    /// The path of a connection with `labels` on `interface`.
    pub fn new(connector: Connector, interface: String, labels: Labels) -> NetworkPath {
        NetworkPath { connector, interface, background: labels.contains(Labels::BACKGROUND) }
    }

    /// Whether the connection is background traffic.
    pub fn background(&self) -> bool {
        self.background
    }

    /// How often to read the connection's TCP_INFO: background queues matter quickly.
    pub fn report_every(&self) -> Duration {
        if self.background { Duration::from_secs(1) } else { Duration::from_secs(5) }
    }

    /// Reports what the connection saw between two readings `elapsed` apart. Rates measured
    /// while it was paced say nothing about the network and are left out.
    pub fn report(&self, before: Option<&TcpStats>, now: &TcpStats, elapsed: Duration) {
        let mut sample = cmm::net::sample_between(before, now, elapsed);
        let at = Instant::now();
        if self.background {
            let snap = self.connector.scout().snapshot();
            let paced =
                snap.by_interface(&self.interface).is_some_and(|n| self.connector.trickler().pacing(n, at));
            if paced {
                sample.rate_up = None;
                sample.rate_down = None;
            }
            // Paced, the queue stays empty by design, and the receiver's RTT estimate measures
            // our slow reads rather than the path.
            let queueing = if paced { Some(Duration::ZERO) } else { now.queueing() };
            if let Some(q) = queueing {
                self.connector.trickler().queueing_seen(&self.interface, q, at);
            }
        }
        self.connector.scout().report(&self.interface, sample);
    }
}

impl Pace for NetworkPath {
    fn allow(&self, dir: Direction, want: usize) -> Result<usize, Duration> {
        let now = Instant::now();
        let trickler = self.connector.trickler();
        if !self.background {
            trickler.foreground(&self.interface, now);
            return Ok(want);
        }
        let snap = self.connector.scout().snapshot();
        let Some(network) = snap.by_interface(&self.interface) else { return Ok(want) };
        match trickler.background(network, dir, want, now) {
            Grant::Unlimited => Ok(want),
            Grant::Bytes(n) => Ok(n),
            Grant::Wait(d) => Err(d),
        }
    }

    fn moved(&self, dir: Direction, allowed: usize, moved: usize) {
        if !self.background {
            if moved > 0 {
                self.connector.trickler().foreground(&self.interface, Instant::now());
            }
            return;
        }
        if moved < allowed {
            let snap = self.connector.scout().snapshot();
            if let Some(network) = snap.by_interface(&self.interface) {
                self.connector.trickler().unused(network, dir, allowed - moved);
            }
        }
    }

    fn receive_window(&self, dir: Direction) -> Option<u32> {
        if !self.background || dir != Direction::Down {
            return None;
        }
        let snap = self.connector.scout().snapshot();
        let network = snap.by_interface(&self.interface)?;
        self.connector.trickler().receive_window(network, Instant::now())
    }
}

/// A connection waiting for a network.
pub trait DeferredConn: Send {
    /// Why it waits.
    fn why(&self) -> &str;
    /// The longest it may wait.
    fn max_wait(&self) -> Duration;
    /// Waits for the network and connects.
    fn complete(self: Box<Self>) -> BoxFuture<'static, Result<UpstreamConn, ConnectError>>;
}

/// What opening gave.
pub enum OpenState {
    /// Connected.
    Ready(UpstreamConn),
    /// Waiting for a network.
    Deferred(Box<dyn DeferredConn>),
}

/// An opened (or deferred) upstream with the labels that chose it.
pub struct Opened {
    /// The labels used.
    pub labels: Labels,
    /// Where they came from.
    pub source: LabelSource,
    /// Connected or deferred.
    pub state: OpenState,
}

/// A failed open, with the labels that were decided before it failed (for the log line).
pub struct OpenError {
    /// The labels, when they were decided.
    pub labels: Option<(Labels, LabelSource)>,
    /// What went wrong.
    pub error: ConnectError,
}

/// How the proxy reaches destinations.
pub trait Upstream: Send + Sync + 'static {
    /// Opens a connection for `req`.
    fn open<'a>(&'a self, req: &'a UpstreamRequest) -> BoxFuture<'a, Result<Opened, OpenError>>;
}

/// Connects from this machine, through the network the labels choose.
pub struct DirectUpstream {
    connector: Connector,
    rules: Arc<RuleSet>,
}

impl DirectUpstream {
    /// An upstream over `connector`, labelling unlabelled traffic with `rules`.
    pub fn new(connector: Connector, rules: Arc<RuleSet>) -> DirectUpstream {
        DirectUpstream { connector, rules }
    }

    /// Labels for a request: the username's, else the first matching rule's, else the default.
    pub fn labels_for(&self, req: &UpstreamRequest, addrs: &[SocketAddr]) -> (Labels, LabelSource) {
        let (labels, source, _) = self.decide(req, addrs);
        (labels, source)
    }

    /// [`DirectUpstream::labels_for`], and the matching rule's `via` if it has one.
    pub fn decide(&self, req: &UpstreamRequest, addrs: &[SocketAddr]) -> (Labels, LabelSource, Option<Via>) {
        let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
        let dest = Destination {
            host: req.target.host_name(),
            addrs: &ips,
            port: req.target.port,
            user: req.user.as_deref(),
        };
        let rule = self.rules.find(&dest);
        let via = rule.and_then(|r| r.via);
        if let Some(l) = req.labels {
            return (l, LabelSource::Username, via);
        }
        match rule {
            Some(rule) => (rule.labels, LabelSource::Rule(rule.line), via),
            None => (self.connector.policy().default_labels, LabelSource::Default, via),
        }
    }
}

/// An upstream connection from a connected socket; `lost` follows its network in the scout.
fn upstream_conn(connector: &Connector, c: Connected, labels: Labels) -> UpstreamConn {
    let local = c.stream.local_addr().ok();
    let network = c.network.as_ref().map(|n| n.interface.clone());
    let path = c.network.as_ref().map(|n| {
        let path = NetworkPath::new(connector.clone(), n.interface.clone(), labels);
        if path.background() {
            let _ = SockRef::from(&c.stream).set_tcp_notsent_lowat(BACKGROUND_NOTSENT_LOWAT);
        } else {
            // A foreground connection marks its network busy from its first moment.
            connector.trickler().foreground(&n.interface, Instant::now());
        }
        Arc::new(path)
    });
    let lost: BoxFuture<'static, String> = match c.network {
        Some(n) => {
            let connector = connector.clone();
            Box::pin(async move {
                connector.until_down(&n.interface).await;
                let why = connector
                    .scout()
                    .snapshot()
                    .by_interface(&n.interface)
                    .and_then(|n| n.down_reason.clone())
                    .unwrap_or_else(|| "gone".into());
                format!("network {} ({}) went down: {why}", n.name, n.interface)
            })
        }
        None => Box::pin(futures::future::pending()),
    };
    UpstreamConn { io: UpstreamIo::Tcp(c.stream), network, local, lost, path }
}

struct DeferredDirect {
    inner: cmm::Deferred,
    connector: Connector,
    labels: Labels,
}

impl DeferredConn for DeferredDirect {
    fn why(&self) -> &str {
        self.inner.why()
    }

    fn max_wait(&self) -> Duration {
        self.inner.max_wait()
    }

    fn complete(self: Box<Self>) -> BoxFuture<'static, Result<UpstreamConn, ConnectError>> {
        Box::pin(async move {
            let connected = self.inner.complete().await?;
            Ok(upstream_conn(&self.connector, connected, self.labels))
        })
    }
}

impl Upstream for DirectUpstream {
    fn open<'a>(&'a self, req: &'a UpstreamRequest) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            // Resolve first: local destinations and CIDR rules depend on the addresses. When no
            // network is up the name may not resolve; that is decided after the route.
            let addrs = self.connector.resolve(&req.target).await;
            let (labels, source) = self.labels_for(req, addrs.as_deref().unwrap_or(&[]));
            match self.connector.connect_or_defer(&req.target, addrs, labels).await {
                Ok(Opening::Ready(c)) => {
                    let conn = upstream_conn(&self.connector, c, labels);
                    Ok(Opened { labels, source, state: OpenState::Ready(conn) })
                }
                Ok(Opening::Deferred(d)) => Ok(Opened {
                    labels,
                    source,
                    state: OpenState::Deferred(Box::new(DeferredDirect {
                        inner: d,
                        connector: self.connector.clone(),
                        labels,
                    })),
                }),
                Err(error) => Err(OpenError { labels: Some((labels, source)), error }),
            }
        })
    }
}
