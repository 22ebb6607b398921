//! [`Listener`]: the accepting side (libcmm's `cmm_listen`/`cmm_accept`).
//!
//! Every TCP connection must open with HELLO (within a timeout). The session it names decides
//! where it goes: a session seen for the first time becomes a new [`MultiSocket`], which
//! [`Listener::accept`] returns; a known one gets the connection as one more path; a path that
//! joins a session this listener does not know (its process restarted) is refused with CLOSE,
//! so the peer fails at once instead of losing what the old process had received. The
//! accepting side never dials, so the peer may sit behind NAT.
//!
//! A session has at most [`MAX_PATHS_PER_SESSION`] paths at once. Connections still waiting
//! for HELLO are bounded ([`MAX_AWAITING_HELLO`] in all,
//! [`MAX_AWAITING_HELLO_PER_IP`] from one address): one that would pass a bound is closed at
//! once, so silent connections cost a bounded number of tasks and sockets, and one source
//! cannot take every slot from the others.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::connector::Connector;
use crate::driver::CmmSocket;
use crate::frame::{self, Frame, FrameDecoder, SessionId};
use crate::multisocket::MultiSocket;
use crate::session::{Hello, network_from_info, read_hello};
use crate::tls::PublicKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// How long a new connection may take to say HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// New sessions waiting for `accept`; past this the listener stops reading new HELLOs.
const BACKLOG: usize = 128;
/// Most connections waiting for HELLO at once; past it new ones are closed at once.
pub const MAX_AWAITING_HELLO: usize = 256;
/// Most connections from one IP address waiting for HELLO at once (a multi-socket opens one
/// path per network, so a real peer needs a few).
pub const MAX_AWAITING_HELLO_PER_IP: usize = 16;
/// Most paths one session may have at once (one per network and remote address: a real peer
/// has a few); one more is refused with CLOSE code 2.
pub const MAX_PATHS_PER_SESSION: usize = 16;

/// The connections waiting for HELLO, in all and per source address.
#[derive(Default)]
struct AwaitingHello {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One connection's place among those waiting for HELLO; given back when dropped.
struct HelloSlot {
    awaiting: Arc<Mutex<AwaitingHello>>,
    ip: IpAddr,
}

impl AwaitingHello {
    /// A place for a connection from `ip`, or why there is none.
    fn admit(awaiting: &Arc<Mutex<AwaitingHello>>, ip: IpAddr) -> Result<HelloSlot, String> {
        let mut a = awaiting.lock().unwrap_or_else(PoisonError::into_inner);
        let from_ip = a.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= MAX_AWAITING_HELLO_PER_IP {
            return Err(format!("{from_ip} connections from {ip} already wait for HELLO"));
        }
        if a.total >= MAX_AWAITING_HELLO {
            return Err(format!("{} connections already wait for HELLO", a.total));
        }
        a.total += 1;
        *a.per_ip.entry(ip).or_default() += 1;
        Ok(HelloSlot { awaiting: awaiting.clone(), ip })
    }
}

impl Drop for HelloSlot {
    fn drop(&mut self) {
        let mut a = self.awaiting.lock().unwrap_or_else(PoisonError::into_inner);
        a.total = a.total.saturating_sub(1);
        if let Some(n) = a.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A session this listener serves.
struct Entry {
    sock: Weak<CmmSocket>,
    /// The key its first path presented (TLS): a later path must present the same one.
    key: Option<PublicKey>,
    /// Its join secret (TLS): a later path must prove it knows it, bound to its own TLS.
    secret: Option<[u8; 32]>,
}

type Sessions = Arc<Mutex<HashMap<SessionId, Entry>>>;

/// Called with whether a multi-socket waits to be accepted, whenever that changes.
pub type WaitingHook = Arc<dyn Fn(bool) + Send + Sync>;

/// How many new multi-sockets wait to be accepted, and who wants to know when that changes.
#[derive(Default)]
struct Waiting {
    state: Mutex<(usize, Option<WaitingHook>)>,
}

impl Waiting {
    fn add(&self, delta: isize) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let before = st.0 > 0;
        st.0 = st.0.saturating_add_signed(delta);
        let after = st.0 > 0;
        if before != after
            && let Some(h) = &st.1
        {
            h(after);
        }
    }
}

/// Where new multi-sockets go until accepted.
#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<MultiSocket>,
    waiting: Arc<Waiting>,
}

/// Accepts multi-sockets.
pub struct Listener {
    local: SocketAddr,
    incoming: tokio::sync::Mutex<mpsc::Receiver<MultiSocket>>,
    waiting: Arc<Waiting>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Listens on `addr`; sessions choose their paths with `connector`'s policy.
    pub async fn bind(addr: SocketAddr, connector: Connector) -> io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        Listener::from_tcp(listener, connector)
    }

    /// Accepts multi-sockets on an already bound and listening socket.
    pub fn from_tcp(listener: TcpListener, connector: Connector) -> io::Result<Listener> {
        Listener::start(listener, connector, None)
    }

    /// Listens on `addr` for multi-sockets whose every path is TLS 1.3 under `tls` (from
    /// [`crate::tls::Identity::server_config`]: only the keys it allows get in, and every
    /// path of a session must present the key its first path did).
    pub async fn bind_tls(
        addr: SocketAddr,
        connector: Connector,
        tls: Arc<ServerConfig>,
    ) -> io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        Listener::start(listener, connector, Some(tokio_rustls::TlsAcceptor::from(tls)))
    }

    fn start(listener: TcpListener, connector: Connector, tls: Option<TlsAcceptor>) -> io::Result<Listener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
        let waiting = Arc::new(Waiting::default());
        let queue = Queue { tx, waiting: waiting.clone() };
        let task = tokio::spawn(accept_loop(listener, connector, sessions, queue, tls));
        Ok(Listener { local, incoming: tokio::sync::Mutex::new(rx), waiting, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next new multi-socket (a session seen for the first time).
    pub async fn accept(&self) -> io::Result<MultiSocket> {
        let mut rx = self.incoming.lock().await;
        let ms = rx.recv().await.ok_or_else(|| io::Error::other("the listener stopped"))?;
        self.waiting.add(-1);
        Ok(ms)
    }

    /// A new multi-socket if one is waiting, without waiting.
    pub fn try_accept(&self) -> Option<MultiSocket> {
        let ms = self.incoming.try_lock().ok()?.try_recv().ok()?;
        self.waiting.add(-1);
        Some(ms)
    }

    /// Calls `hook(waiting)` whenever whether a new multi-socket waits to be accepted changes,
    /// and at once with the current state (the C API's listening descriptor polls readable
    /// exactly then; paths joining sessions already accepted do not count).
    pub fn set_waiting_hook(&self, hook: WaitingHook) {
        let mut st = self.waiting.state.lock().unwrap_or_else(PoisonError::into_inner);
        hook(st.0 > 0);
        st.1 = Some(hook);
    }
}

async fn accept_loop(
    listener: TcpListener,
    connector: Connector,
    sessions: Sessions,
    tx: Queue,
    tls: Option<TlsAcceptor>,
) {
    let mut backoff = Duration::from_millis(5);
    let awaiting = Arc::new(Mutex::new(AwaitingHello::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let slot = match AwaitingHello::admit(&awaiting, peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::info!(%peer, "closing a new connection at once: {why}");
                drop(stream);
                continue;
            }
        };
        let (connector, sessions, tx, tls) = (connector.clone(), sessions.clone(), tx.clone(), tls.clone());
        tokio::spawn(async move {
            if let Err(e) = attach(stream, peer, slot, connector, sessions, tx, tls).await {
                tracing::info!(%peer, "refused a path: {e}");
            }
        });
    }
}

/// Reads HELLO (after the TLS handshake, on a TLS listener) and hands the connection to its
/// session; `slot` is its place among the connections waiting for HELLO, given back once
/// HELLO is read.
async fn attach(
    stream: TcpStream,
    peer: SocketAddr,
    slot: HelloSlot,
    connector: Connector,
    sessions: Sessions,
    tx: Queue,
    tls: Option<TlsAcceptor>,
) -> io::Result<()> {
    let mut decoder = FrameDecoder::new();
    let (stream, conn, hello, key) = match tls {
        None => {
            let mut stream = stream;
            let hello = read_hello_within(&mut stream, &mut decoder).await?;
            (stream, None, hello, None)
        }
        Some(acceptor) => {
            let mut tls = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))?
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            let key = crate::tls::peer_key(tls.get_ref().1.peer_certificates());
            let hello = read_hello_within(&mut tls, &mut decoder).await?;
            let (stream, conn) = tls.into_inner();
            (stream, Some(rustls::Connection::Server(conn)), hello, key)
        }
    };
    drop(slot);
    let Hello { session: id, path, join, proof, network: info } = hello;
    let rest = decoder.take_buffered();
    let network = network_from_info(&info, path);
    let known = {
        let map = sessions.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&id).and_then(|e| Some((e.sock.upgrade()?, e.key, e.secret)))
    };
    let denied = |why: &str| io::Error::new(io::ErrorKind::PermissionDenied, why.to_string());
    let refusal = match (&known, &conn) {
        (None, _) if join => Some((
            // The peer's session worked before, with a process that is gone: starting it
            // afresh would lose whatever that one had received. Say so, so the peer fails
            // at once.
            frame::CLOSE_UNKNOWN_SESSION,
            "unknown session",
            io::Error::new(io::ErrorKind::NotFound, "a path joins a session this listener does not know"),
        )),
        (Some((s, _, _)), _) if s.path_count() >= MAX_PATHS_PER_SESSION => Some((
            frame::CLOSE_PATH_REFUSED,
            "too many paths",
            denied(&format!("the session has {MAX_PATHS_PER_SESSION} paths already")),
        )),
        (Some((_, first, _)), _) if *first != key => Some((
            frame::CLOSE_PATH_REFUSED,
            "not this session's key",
            denied("a path presents another key than its session's first path"),
        )),
        // TLS: a session id alone never lets a path in.
        (Some(_), Some(_)) if !join => Some((
            frame::CLOSE_PATH_REFUSED,
            "the session exists: join with a proof",
            denied("a path names an existing session without a join proof"),
        )),
        (Some((_, _, secret)), Some(c))
            if !secret.is_some_and(|s| crate::tls::check_join_proof(c, &s, &id.0, &proof)) =>
        {
            Some((
                frame::CLOSE_PATH_REFUSED,
                "bad join proof",
                denied("a join proof that does not match this path's TLS session (forged or replayed)"),
            ))
        }
        _ => None,
    };
    if let Some((code, reason, e)) = refusal {
        let mut out = bytes::BytesMut::new();
        Frame::Close { code, reason: reason.into() }.encode(&mut out);
        let mut stream = stream;
        match conn {
            None => {
                let _ = tokio::time::timeout(HELLO_TIMEOUT, stream.write_all(&out)).await;
            }
            Some(mut c) => {
                use std::io::Write as _;
                let mut cipher = Vec::new();
                let _ = c.writer().write_all(&out);
                while c.wants_write() && c.write_tls(&mut cipher).is_ok() {}
                let _ = tokio::time::timeout(HELLO_TIMEOUT, stream.write_all(&cipher)).await;
            }
        }
        return Err(e);
    }
    let secret = match &conn {
        Some(_) => Some(crate::tls::random_secret().map_err(io::Error::other)?),
        None => None,
    };
    let (sock, new) = {
        let mut map = sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(&id).and_then(|e| e.sock.upgrade()) {
            Some(s) => (s, false),
            None => {
                map.retain(|_, e| e.sock.strong_count() > 0);
                let s = CmmSocket::accepting(connector, id, peer, key, secret);
                map.insert(id, Entry { sock: Arc::downgrade(&s), key, secret });
                (s, true)
            }
        }
    };
    tracing::debug!(%peer, path, network = %info.name, new, "path accepted");
    if !sock.add_accepted_path(path, network, stream, conn, rest) {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("path {path} already open")));
    }
    if new {
        // Counted first, so that an accept taking it at once never counts below zero.
        tx.waiting.add(1);
        if tx.tx.send(MultiSocket::from_cmm(sock)).await.is_err() {
            tx.waiting.add(-1);
            return Err(io::Error::other("the listener is gone"));
        }
    }
    Ok(())
}

/// Reads from `stream` until `decoder` holds HELLO, within the HELLO timeout.
async fn read_hello_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    decoder: &mut FrameDecoder,
) -> io::Result<Hello> {
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match read_hello(decoder) {
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before HELLO"));
            }
            decoder.push(&buf[..n]);
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HELLO in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_waiting_for_hello_are_bounded_per_address_and_in_all_and_given_back() {
        let awaiting = Arc::new(Mutex::new(AwaitingHello::default()));
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let one: Vec<HelloSlot> =
            (0..MAX_AWAITING_HELLO_PER_IP).map(|_| AwaitingHello::admit(&awaiting, ip(0)).unwrap()).collect();
        let why = AwaitingHello::admit(&awaiting, ip(0)).err().unwrap();
        assert!(why.contains("from 10.0.0.0"), "{why}");
        let others: Vec<HelloSlot> = (MAX_AWAITING_HELLO_PER_IP..MAX_AWAITING_HELLO)
            .map(|i| AwaitingHello::admit(&awaiting, ip(i as u32)).unwrap())
            .collect();
        let why = AwaitingHello::admit(&awaiting, ip(100_000)).err().unwrap();
        assert!(why.contains(&format!("{MAX_AWAITING_HELLO} connections already")), "{why}");
        drop(one);
        assert!(AwaitingHello::admit(&awaiting, ip(0)).is_ok());
        drop(others);
        let a = awaiting.lock().unwrap();
        assert_eq!((a.total, a.per_ip.len()), (0, 0), "every place given back");
    }
}
