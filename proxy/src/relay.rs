//! [`RelayUpstream`]: connections that ride the relay (`[relay]` in `proxy.toml`).
//!
//! The proxy holds one multi-socket session with the relay, over every network at once, TLS
//! on every path with the relay's key pinned. Each connection whose rule (or the relay's
//! `default_via`) says `via = "relay"` becomes one stream of that session: the stream's labels
//! choose its network, and when that network goes its bytes move to another with nothing lost.
//! The relay dials the destination and answers how that went, which becomes the same SOCKS5
//! reply or HTTP status a direct connect would give. A name is resolved by the relay, never
//! here, so DNS does not depend on which of this machine's networks is up.
//!
//! Everything else goes direct ([`DirectUpstream`]): `via = "direct"`, destinations on this
//! machine or a directly connected subnet (unless a rule says otherwise), and — so that a
//! relay that cannot be reached never blocks new connections — every connection while no path
//! to the relay comes up within `fallback_after` (3 s; with `"strict"` they wait up to `grace`
//! instead and are refused after it, never going direct). Live connections wait for a path,
//! with nothing lost, for `grace` (60 s); then the session ends and they are reset.
//!
//! In relay mode, a rule's `cidr` matches destinations given as addresses (names are not
//! resolved here).
//!
//! With `open_early` (the default), a connection to a destination the relay reached in the
//! last [`REACHED_FOR`] is answered at once: its first bytes follow the open request without
//! waiting a round trip for the relay's answer, which is read ahead of the data
//! ([`EarlyReply`]). Should that dial fail after all, the client's connection is reset.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use cmm::relay::{OpenReply, OpenRequest, OpenStatus};
use cmm::tls::{Identity, PublicKey};
use cmm::{Callbacks, ConnectError, Connector, Host, Labels, MultiSocket, Stream};
use cmm_policy::{RelaySettings, Via};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::upstream::{
    DirectUpstream, OpenError, OpenState, Opened, Upstream, UpstreamConn, UpstreamIo, UpstreamRequest,
};

/// Longest the relay's reply may take, beyond its own connect timeout.
const REPLY_SLACK: Duration = Duration::from_secs(5);

/// How long a destination the relay reached counts as reachable for `open_early`.
pub const REACHED_FOR: Duration = Duration::from_secs(600);

/// Most destinations remembered as reached.
const MAX_REACHED: usize = 1024;

/// Destinations the relay connected to lately, with the address it connected from.
#[derive(Default)]
struct Reached(Mutex<HashMap<String, (Instant, SocketAddr)>>);

impl Reached {
    fn get(&self, target: &str) -> Option<SocketAddr> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(target).filter(|(at, _)| at.elapsed() < REACHED_FOR).map(|&(_, bound)| bound)
    }

    fn insert(&self, target: String, bound: SocketAddr) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REACHED && !map.contains_key(&target) {
            map.retain(|_, (at, _)| at.elapsed() < REACHED_FOR);
            if map.len() >= MAX_REACHED
                && let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(target, (Instant::now(), bound));
    }

    fn forget(&self, target: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(target);
    }
}

/// Sends connections over the relay, or direct (see the module).
pub struct RelayUpstream {
    direct: DirectUpstream,
    connector: Connector,
    settings: RelaySettings,
    tls: Arc<rustls::ClientConfig>,
    session: tokio::sync::Mutex<Option<MultiSocket>>,
    reply_timeout: Duration,
    reached: Arc<Reached>,
}

impl RelayUpstream {
    /// An upstream for `settings`, loading the proxy's key; `direct` serves everything that
    /// does not ride the relay.
    pub fn new(
        direct: DirectUpstream,
        connector: Connector,
        settings: RelaySettings,
    ) -> io::Result<RelayUpstream> {
        let text = std::fs::read_to_string(&settings.key)
            .map_err(|e| io::Error::new(e.kind(), format!("[relay] key {}: {e}", settings.key.display())))?;
        let identity = Identity::from_text(&text).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("[relay] key {}: {e}", settings.key.display()))
        })?;
        let relay_key: PublicKey = settings
            .public_key
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("[relay] public_key: {e}")))?;
        let tls = identity.client_config(relay_key).map_err(io::Error::other)?;
        let reply_timeout = connector.connect_timeout() * 2 + REPLY_SLACK;
        Ok(RelayUpstream {
            direct,
            connector,
            settings,
            tls,
            session: tokio::sync::Mutex::new(None),
            reply_timeout,
            reached: Arc::default(),
        })
    }

    /// The session with the relay, with a path up, within `fallback_after`; opened (again)
    /// when there is none or it ended.
    async fn session(&self) -> Result<MultiSocket, String> {
        // Strict: no going direct; wait as live connections do, then refuse.
        let wait = self.settings.fallback_after.unwrap_or(self.settings.grace);
        let deadline = tokio::time::Instant::now() + wait;
        let mut held = self.session.lock().await;
        let live = held.as_ref().filter(|s| !s.is_closed()).cloned();
        let session = match live {
            Some(s) => s,
            None => {
                let addrs: Vec<SocketAddr> =
                    match tokio::time::timeout_at(deadline, tokio::net::lookup_host(&self.settings.address))
                        .await
                    {
                        Ok(Ok(a)) => a.collect(),
                        Ok(Err(e)) => return Err(format!("relay {}: {e}", self.settings.address)),
                        Err(_) => {
                            return Err(format!(
                                "relay {}: no address within {wait:?}",
                                self.settings.address
                            ));
                        }
                    };
                let connect = MultiSocket::connect_tls(
                    &self.connector,
                    &addrs[..],
                    Labels::NONE,
                    Callbacks::default(),
                    self.tls.clone(),
                );
                let s = match tokio::time::timeout_at(deadline, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(format!("relay {}: {e}", self.settings.address)),
                    Err(_) => {
                        return Err(format!("relay {}: no path within {wait:?}", self.settings.address));
                    }
                };
                tracing::info!(relay = %self.settings.address, "session with the relay opened");
                tokio::spawn(watch_paths(s.clone(), self.settings.grace, self.settings.address.clone()));
                *held = Some(s.clone());
                s
            }
        };
        drop(held);
        // A session whose every path is gone (this machine's networks, or the relay, are
        // unreachable) waits for one; a new connection goes direct instead after the wait.
        while !session.paths().iter().any(|p| p.established) {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no path to the relay {} within {wait:?}", self.settings.address));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(session)
    }

    /// Opens the session ahead of the first connection; why it could not is logged (each
    /// connection tries again).
    pub async fn warm_up(&self) {
        if let Err(why) = self.session().await {
            tracing::info!("relay session not opened yet: {why}");
        }
    }

    /// Whether `req` rides the relay, and its labels.
    fn route(&self, req: &UpstreamRequest) -> (Labels, crate::upstream::LabelSource, Via) {
        let addrs: Vec<SocketAddr> = match &req.target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, req.target.port)],
            Host::Name(_) => Vec::new(),
        };
        let (labels, source, via) = self.direct.decide(req, &addrs);
        let local = match &req.target.host {
            Host::Name(n) => n == "localhost" || n.ends_with(".localhost"),
            Host::Ip(_) => self.connector.is_local(&addrs),
        };
        // A rule's `via` first, then local destinations go direct, then the labels' policy,
        // then the default.
        let by_label = || self.settings.by_label.iter().find(|(l, _)| labels.contains(*l)).map(|(_, v)| *v);
        let via = via.unwrap_or_else(|| {
            if local { Via::Direct } else { by_label().unwrap_or(self.settings.default_via) }
        });
        (labels, source, via)
    }

    /// Opens a stream to `req`'s destination through `session`.
    async fn open_relayed(
        &self,
        session: &MultiSocket,
        req: &UpstreamRequest,
        labels: Labels,
    ) -> Result<UpstreamConn, ConnectError> {
        let failed = |e: io::Error| connect_error(req, OpenStatus::Failed, &e.to_string());
        let mut stream = session.open_stream(labels).map_err(failed)?;
        let mut out = Vec::new();
        OpenRequest { target: req.target.clone() }
            .encode(&mut out)
            .map_err(|e| connect_error(req, OpenStatus::Failed, &e.to_string()))?;
        stream.write_all(&out).await.map_err(failed)?;
        let target = req.target.to_string();
        if self.settings.open_early
            && let Some(bound) = self.reached.get(&target)
        {
            let io =
                EarlyReply { stream, got: Vec::new(), ahead: None, target, reached: self.reached.clone() };
            return Ok(relayed(UpstreamIo::Stream(Box::new(io)), bound));
        }
        let reply = match tokio::time::timeout(self.reply_timeout, read_reply(&mut stream)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                let _ = stream.reset(1);
                return Err(connect_error(req, OpenStatus::TimedOut, "the relay did not answer in time"));
            }
        };
        if reply.status != OpenStatus::Connected {
            self.reached.forget(&target);
            return Err(connect_error(req, reply.status, &reply.reason));
        }
        self.reached.insert(target, reply.bound);
        Ok(relayed(UpstreamIo::Stream(Box::new(stream)), reply.bound))
    }
}

/// A connection that rides the relay.
fn relayed(io: UpstreamIo, bound: SocketAddr) -> UpstreamConn {
    UpstreamConn {
        io,
        network: Some("relay".into()),
        local: Some(bound),
        // A stream outlives the loss of any one network: nothing to follow here.
        lost: Box::pin(futures::future::pending()),
        path: None,
    }
}

/// A stream opened early: the relay's reply comes first on it and is taken off before the
/// destination's bytes; a reply other than connected is an error for the reader (and the
/// destination is no longer counted as reached). Writes go through at once.
struct EarlyReply {
    stream: Stream,
    /// The reply's bytes so far, while it is incomplete.
    got: Vec<u8>,
    /// Bytes read past the reply, not yet handed on (`Some` once the reply is in).
    ahead: Option<(Vec<u8>, usize)>,
    target: String,
    reached: Arc<Reached>,
}

impl AsyncRead for EarlyReply {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some((ahead, at)) = &mut this.ahead {
                if *at < ahead.len() {
                    let n = (ahead.len() - *at).min(buf.remaining());
                    buf.put_slice(&ahead[*at..*at + n]);
                    *at += n;
                    return Poll::Ready(Ok(()));
                }
                return Pin::new(&mut this.stream).poll_read(cx, buf);
            }
            match OpenReply::decode(&this.got) {
                Ok(Some((reply, used))) => {
                    if reply.status != OpenStatus::Connected {
                        this.reached.forget(&this.target);
                        let _ = this.stream.reset(1);
                        let kind = match reply.status {
                            OpenStatus::Refused => io::ErrorKind::ConnectionRefused,
                            OpenStatus::TimedOut => io::ErrorKind::TimedOut,
                            _ => io::ErrorKind::ConnectionAborted,
                        };
                        let why =
                            format!("the relay could not connect ({:?}): {}", reply.status, reply.reason);
                        return Poll::Ready(Err(io::Error::new(kind, why)));
                    }
                    let rest = this.got.split_off(used);
                    this.got = Vec::new();
                    this.ahead = Some((rest, 0));
                    continue;
                }
                Ok(None) if this.got.len() > 512 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "relay reply too long",
                    )));
                }
                Ok(None) => {}
                Err(e) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("relay reply: {e}"),
                    )));
                }
            }
            let mut chunk = [0u8; 512];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the relay ended the stream before replying",
                )));
            }
            this.got.extend_from_slice(rb.filled());
        }
    }
}

impl AsyncWrite for EarlyReply {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Ends `session` once it has had no path for `grace`: its connections have waited long
/// enough for a network, and their clients are told (reset) rather than left hanging.
async fn watch_paths(session: MultiSocket, grace: Duration, relay: String) {
    let mut since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !session.is_closed() {
        tick.tick().await;
        if session.paths().iter().any(|p| p.established) {
            since = None;
            continue;
        }
        let since = *since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= grace {
            let why = format!("no path to the relay {relay} for {grace:?}");
            tracing::info!("{why}: its connections are reset");
            session.abort(&why);
            return;
        }
    }
}

/// Reads the relay's reply, a byte at a time so that nothing after it is taken.
async fn read_reply(stream: &mut Stream) -> io::Result<OpenReply> {
    let mut got = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        match OpenReply::decode(&got) {
            Ok(Some((reply, _))) => return Ok(reply),
            Ok(None) if got.len() > 512 => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "relay reply too long"));
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("relay reply: {e}"))),
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the relay ended the stream before replying",
            ));
        }
        got.push(byte[0]);
    }
}

/// The error a direct connect would have given for what the relay answered.
fn connect_error(req: &UpstreamRequest, status: OpenStatus, reason: &str) -> ConnectError {
    let addr = match &req.target.host {
        Host::Ip(ip) => SocketAddr::new(*ip, req.target.port),
        Host::Name(_) => SocketAddr::from(([0, 0, 0, 0], req.target.port)),
    };
    let io_kind = match status {
        OpenStatus::Refused => io::ErrorKind::ConnectionRefused,
        OpenStatus::HostUnreachable => io::ErrorKind::HostUnreachable,
        OpenStatus::NetworkUnreachable => io::ErrorKind::NetworkUnreachable,
        OpenStatus::TimedOut => io::ErrorKind::TimedOut,
        OpenStatus::NameNotResolved => {
            return ConnectError::Resolve {
                host: req.target.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, format!("via the relay: {reason}")),
            };
        }
        OpenStatus::NotAllowed => {
            return ConnectError::Rejected { why: format!("the relay does not allow it: {reason}") };
        }
        _ => io::ErrorKind::Other,
    };
    ConnectError::Connect {
        addr,
        network: Some("relay".into()),
        source: io::Error::new(io_kind, reason.to_string()),
    }
}

impl Upstream for RelayUpstream {
    fn open<'a>(&'a self, req: &'a UpstreamRequest) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            let (labels, source, via) = self.route(req);
            if via == Via::Direct {
                return self.direct.open(req).await;
            }
            let session = match self.session().await {
                Ok(s) => s,
                Err(why) if self.settings.fallback_after.is_none() => {
                    let error =
                        ConnectError::Rejected { why: format!("{why} (fallback_after = \"strict\")") };
                    return Err(OpenError { labels: Some((labels, source)), error });
                }
                Err(why) => {
                    tracing::info!(target: "cmm_proxy::conn", dest = %req.target, "going direct: {why}");
                    return self.direct.open(req).await;
                }
            };
            match self.open_relayed(&session, req, labels).await {
                Ok(conn) => Ok(Opened { labels, source, state: OpenState::Ready(conn) }),
                Err(error) => Err(OpenError { labels: Some((labels, source)), error }),
            }
        })
    }
}
