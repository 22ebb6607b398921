//! [`Relay`]: accepts proxies' multi-socket sessions over TLS and serves their streams.
//!
//! Every stream of a session is one connection of the proxy's: it opens with an
//! [`OpenRequest`]; the relay checks the destination against its [`Destinations`], resolves a
//! name itself (so a client's DNS never depends on which of its networks is up), dials, answers
//! with an [`OpenReply`] saying how that went, and then bridges the stream and the connection
//! ([`crate::bridge`]). One log line per stream: the client's key, the destination, bytes each
//! way and how it ended.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cmm::relay::{MAX_REQUEST, OpenReply, OpenRequest, OpenStatus};
use cmm::tls::{Identity, PublicKey};
use cmm::{Connector, Host, Listener, MultiSocket, Policy, Scout, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::bridge::{Report, bridge};
use crate::rules::Destinations;

/// How long a new stream may take to say where it goes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a relay serves with.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its own key pair (proxies pin its public half).
    pub identity: Identity,
    /// The proxies' keys it lets in.
    pub allowed: Vec<PublicKey>,
    /// Where it may connect for them.
    pub destinations: Destinations,
    /// Longest a connect to a destination (all its addresses) may take.
    pub connect_timeout: Duration,
    /// Longest a half-closed connection may stay silent.
    pub half_close_timeout: Duration,
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// No key is allowed: no proxy could ever connect.
    #[error("no client key is allowed (give --allow KEY or --allow-file FILE)")]
    NoClients,
    /// The TLS setup failed.
    #[error(transparent)]
    Key(#[from] cmm::tls::KeyError),
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// A running relay's listener.
pub struct Relay {
    listener: Listener,
    cfg: Arc<RelayConfig>,
}

impl Relay {
    /// Listens as `cfg` says.
    pub async fn bind(cfg: RelayConfig) -> Result<Relay, RelayError> {
        if cfg.allowed.is_empty() {
            return Err(RelayError::NoClients);
        }
        let tls = cfg.identity.server_config(&cfg.allowed)?;
        // The relay's own side of each session: it never dials paths (the proxy does), it
        // only answers on the paths the proxy opened.
        let connector =
            Connector::new(Scout::manual(vec![]), Arc::new(Policy::default()), cfg.connect_timeout);
        let listener = Listener::bind_tls(cfg.listen, connector, tls)
            .await
            .map_err(|source| RelayError::Listen { addr: cfg.listen, source })?;
        Ok(Relay { listener, cfg: Arc::new(cfg) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves sessions until the listener fails.
    pub async fn run(self) -> io::Result<()> {
        loop {
            let session = self.listener.accept().await?;
            let cfg = self.cfg.clone();
            tokio::spawn(serve_session(session, cfg));
        }
    }
}

fn client_name(key: Option<PublicKey>) -> String {
    key.map_or_else(|| "?".to_string(), |k| k.to_string())
}

async fn serve_session(session: MultiSocket, cfg: Arc<RelayConfig>) {
    let client = client_name(session.peer_key());
    tracing::info!(%client, "session opened");
    loop {
        match session.accept_stream().await {
            Ok(stream) => {
                let (cfg, client) = (cfg.clone(), client.clone());
                tokio::spawn(async move { serve_stream(stream, &client, &cfg).await });
            }
            Err(e) => {
                tracing::info!(%client, redundant_bytes = session.redundant_bytes(), "session ended: {e}");
                return;
            }
        }
    }
}

/// Reads the open request: the request and whatever the client sent after it (the start of
/// the connection's bytes).
async fn read_request(stream: &mut Stream) -> Result<(OpenRequest, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0u8; 4096];
    loop {
        match OpenRequest::decode(&buf) {
            Ok(Some((req, used))) => return Ok((req, buf.split_off(used))),
            Ok(None) if buf.len() >= MAX_REQUEST => return Err("open request too long".into()),
            Ok(None) => {}
            Err(e) => return Err(format!("bad open request: {e}")),
        }
        let (n, labels) =
            stream.recv(&mut chunk).await.map_err(|e| format!("reading the open request: {e}"))?;
        if n == 0 {
            return Err("the stream ended before its open request".into());
        }
        // The answer travels with the labels the client's bytes came with: its chunks take
        // the network those labels choose, as the client's own do.
        stream.set_labels(labels);
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Resolves and dials `req`'s destination as the rules allow.
async fn dial(req: &OpenRequest, cfg: &RelayConfig) -> Result<TcpStream, (OpenStatus, String)> {
    let port = req.target.port;
    let addrs: Vec<SocketAddr> = match &req.target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Name(name) => {
            if !cfg.destinations.allows_port(port) {
                return Err((OpenStatus::NotAllowed, format!("port {port} is not allowed")));
            }
            match tokio::time::timeout(cfg.connect_timeout, tokio::net::lookup_host((name.as_str(), port)))
                .await
            {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err((OpenStatus::NameNotResolved, format!("{name}: {e}"))),
                Err(_) => return Err((OpenStatus::NameNotResolved, format!("{name}: no answer in time"))),
            }
        }
    };
    let allowed: Vec<SocketAddr> =
        addrs.iter().copied().filter(|a| cfg.destinations.allows(a.ip(), a.port())).collect();
    if allowed.is_empty() {
        let shown = addrs.first().map_or_else(|| req.target.to_string(), |a| a.to_string());
        return Err((OpenStatus::NotAllowed, format!("{shown} is not an allowed destination")));
    }
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut last = (OpenStatus::Failed, "no address".to_string());
    for addr in allowed {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = (OpenStatus::of_error(&e), format!("{addr}: {e}")),
            Err(_) => {
                return Err((
                    OpenStatus::TimedOut,
                    format!("{addr}: no answer in {:?}", cfg.connect_timeout),
                ));
            }
        }
    }
    Err(last)
}

async fn reply(stream: &mut Stream, status: OpenStatus, bound: SocketAddr, reason: &str) -> io::Result<()> {
    let mut out = Vec::new();
    OpenReply { status, bound, reason: reason.to_string() }.encode(&mut out);
    stream.write_all(&out).await
}

async fn serve_stream(mut stream: Stream, client: &str, cfg: &RelayConfig) {
    let id = stream.id();
    let (req, early) = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            tracing::info!(%client, stream = id, "stream refused: {why}");
            let _ = stream.reset(crate::bridge::RESET_CODE);
            return;
        }
        Err(_) => {
            tracing::info!(%client, stream = id, "stream refused: no open request in {REQUEST_TIMEOUT:?}");
            let _ = stream.reset(crate::bridge::RESET_CODE);
            return;
        }
    };
    let dest = req.target.to_string();
    let mut tcp = match dial(&req, cfg).await {
        Ok(t) => t,
        Err((status, why)) => {
            tracing::info!(%client, stream = id, %dest, ?status, "not connected: {why}");
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            if reply(&mut stream, status, unspecified, &why).await.is_ok() {
                let _ = stream.finish();
            }
            return;
        }
    };
    let bound = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    if reply(&mut stream, OpenStatus::Connected, bound, "").await.is_err()
        || (!early.is_empty() && tcp.write_all(&early).await.is_err())
    {
        tracing::info!(%client, stream = id, %dest, "ended before it began");
        return;
    }
    let started = tokio::time::Instant::now();
    let Report { up, down, outcome } = bridge(stream, tcp, cfg.half_close_timeout).await;
    tracing::info!(
        %client,
        stream = id,
        %dest,
        up = up + early.len() as u64,
        down,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        ?outcome,
        "stream done"
    );
}
