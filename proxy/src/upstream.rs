//! Upstreams: how the proxy reaches a destination for a client.
//!
//! [`Upstream`] is the one interface the front ends (SOCKS5, HTTP) talk to. It decides the
//! labels (username first, then the destination rules of `proxy.toml`, then the default), and
//! opens a connection: ready now, or deferred until a matching network is up. Today's
//! implementation, [`DirectUpstream`], connects from this machine through the chosen network's
//! interface with cmm's plain mode (`cmm::plain::open`), the same code a label-aware
//! application's plain multi-socket uses. A relay upstream (one multi-socket to a cmm peer carrying
//! many app connections) will implement the same trait.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cmm::{ConnectError, Connected, Connector, Opening, Target};
use cmm_policy::{Destination, Labels, RuleSet};
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
    /// Takes measurements of the connection for its network's estimates, if it has one.
    pub measure: Option<Measure>,
}

/// Where measurements of an upstream connection go (the scout, for its network).
pub type Measure = Arc<dyn Fn(cmm_scout::ipc::Sample) + Send + Sync>;

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
        if let Some(l) = req.labels {
            return (l, LabelSource::Username);
        }
        let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
        let dest = Destination {
            host: req.target.host_name(),
            addrs: &ips,
            port: req.target.port,
            user: req.user.as_deref(),
        };
        match self.rules.find(&dest) {
            Some(rule) => (rule.labels, LabelSource::Rule(rule.line)),
            None => (self.connector.policy().default_labels, LabelSource::Default),
        }
    }
}

/// An upstream connection from a connected socket; `lost` follows its network in the scout.
fn upstream_conn(connector: &Connector, c: Connected) -> UpstreamConn {
    let local = c.stream.local_addr().ok();
    let network = c.network.as_ref().map(|n| n.interface.clone());
    let measure: Option<Measure> = c.network.as_ref().map(|n| {
        let scout = connector.scout().clone();
        let iface = n.interface.clone();
        Arc::new(move |sample| scout.report(&iface, sample)) as Measure
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
    UpstreamConn { io: UpstreamIo::Tcp(c.stream), network, local, lost, measure }
}

struct DeferredDirect {
    inner: cmm::Deferred,
    connector: Connector,
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
            Ok(upstream_conn(&self.connector, connected))
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
            match cmm::plain::open(&self.connector, &req.target, addrs, labels).await {
                Ok(Opening::Ready(c)) => {
                    Ok(Opened { labels, source, state: OpenState::Ready(upstream_conn(&self.connector, c)) })
                }
                Ok(Opening::Deferred(d)) => Ok(Opened {
                    labels,
                    source,
                    state: OpenState::Deferred(Box::new(DeferredDirect {
                        inner: d,
                        connector: self.connector.clone(),
                    })),
                }),
                Err(error) => Err(OpenError { labels: Some((labels, source)), error }),
            }
        })
    }
}
