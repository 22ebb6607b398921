//! Plain mode: a multi-socket towards an ordinary TCP server, and the connection logic every
//! plain connection in cmm goes through — the proxy's upstreams included.
//!
//! [`open`] connects on the network the labels choose now, or returns a [`Deferred`] that
//! completes when one comes up. A plain server speaks no cmm protocol, so there is one
//! physical connection at a time; when its network goes down the connection is dropped
//! (`label_down` runs) and the next send dials again on whatever the labels choose then
//! (`label_up` runs). A failure in the middle of a call is passed back to the caller, as in
//! libcmm: part of the buffer may have gone out.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cmm_policy::{Labels, Network};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::api::{Callbacks, Check, PathEvent, TrySend};
use crate::connector::{ConnectError, Connected, Connector, ErrorKind, Route};
use crate::session::PathStats;
use crate::target::Target;
use crate::thunk::{Thunk, Thunks};

/// The result of [`open`]: connected now, or deferred until a network fits.
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

/// Opens a connection to `target` for `labels`. `addrs` is what resolving gave (an error when
/// it failed, perhaps because no network is up): local destinations connect directly, others
/// on the chosen network, or the connection is deferred. When every chosen network fails to
/// carry the connection and the scout meanwhile says it is down, the choice is made again:
/// deferral, or the networks that are up now.
pub async fn open(
    connector: &Connector,
    target: &Target,
    addrs: Result<Vec<SocketAddr>, ConnectError>,
    labels: Labels,
) -> Result<Opening, ConnectError> {
    if let Ok(a) = &addrs
        && connector.is_local(a)
    {
        return connector.connect_via(a, &[]).await.map(Opening::Ready);
    }
    // The kernel reports a lost carrier up to a second late, so a network may die under a
    // connect. After a path failure (no answer, no route), ask the scout again: defer, or use
    // what is up now, rather than fail. A few rounds at most, while the choice changes.
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<ConnectError> = None;
    let mut addrs = addrs;
    for _ in 0..3 {
        let networks = match connector.route(labels) {
            Route::Reject { why } => return Err(ConnectError::Rejected { why }),
            Route::Networks { networks, .. } => networks,
            Route::Defer { max_wait, why } => {
                return Ok(Opening::Deferred(Deferred {
                    connector: connector.clone(),
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
        match connector.connect_via(&resolved, &networks).await {
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
                crate::connector::settle_timeout(networks.first(), c.connect_timeout())
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

/// One connection of a plain-mode multi-socket.
struct Conn {
    generation: u64,
    stream: TcpStream,
    network: Option<Network>,
    sent: AtomicU64,
    received: AtomicU64,
}

struct PlainState {
    current: Option<Arc<Conn>>,
    generation: u64,
    thunks: Thunks,
    watcher: Option<tokio::task::AbortHandle>,
}

/// A plain-mode multi-socket: one physical connection at a time to an ordinary server.
pub(crate) struct PlainSocket {
    connector: Connector,
    target: Target,
    callbacks: Callbacks,
    runtime: tokio::runtime::Handle,
    state: Mutex<PlainState>,
    connect_lock: tokio::sync::Mutex<()>,
    write_lock: tokio::sync::Mutex<()>,
    read_lock: tokio::sync::Mutex<()>,
    changed: Notify,
}

impl PlainSocket {
    /// Connects to `target` for `labels`, waiting for a network up to the policy's wait.
    pub(crate) async fn connect(
        connector: Connector,
        target: Target,
        labels: Labels,
        callbacks: Callbacks,
    ) -> io::Result<Arc<PlainSocket>> {
        let sock = Arc::new(PlainSocket {
            connector,
            target,
            callbacks,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(PlainState {
                current: None,
                generation: 0,
                thunks: Thunks::default(),
                watcher: None,
            }),
            connect_lock: tokio::sync::Mutex::new(()),
            write_lock: tokio::sync::Mutex::new(()),
            read_lock: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
        });
        sock.establish(labels).await?;
        Ok(sock)
    }

    fn lock(&self) -> MutexGuard<'_, PlainState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Option<Arc<Conn>> {
        self.lock().current.clone()
    }

    /// The current connection, or a new one on the network `labels` choose (waiting for one).
    async fn establish(self: &Arc<Self>, labels: Labels) -> io::Result<Arc<Conn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connect_lock.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let addrs = self.connector.resolve(&self.target).await;
        let connected = match open(&self.connector, &self.target, addrs, labels).await.map_err(to_io)? {
            Opening::Ready(c) => c,
            Opening::Deferred(d) => d.complete().await.map_err(to_io)?,
        };
        Ok(self.install(connected, labels))
    }

    fn install(self: &Arc<Self>, c: Connected, labels: Labels) -> Arc<Conn> {
        let conn = {
            let mut st = self.lock();
            st.generation += 1;
            let conn = Arc::new(Conn {
                generation: st.generation,
                stream: c.stream,
                network: c.network.clone(),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
            });
            st.current = Some(conn.clone());
            if let Some(n) = &c.network {
                let me = self.clone();
                let (iface, generation) = (n.interface.clone(), conn.generation);
                let watcher = self.runtime.spawn(async move {
                    me.connector.until_down(&iface).await;
                    me.drop_conn(generation, "its network went down");
                });
                if let Some(old) = st.watcher.replace(watcher.abort_handle()) {
                    old.abort();
                }
            }
            conn
        };
        tracing::debug!(target = %self.target, network = ?c.network.as_ref().map(|n| &n.interface), "plain connection up");
        if let Some(cb) = self.callbacks.label_up.clone() {
            let e =
                PathEvent { path: conn.generation as u32, network: network_or_direct(&c.network), labels };
            self.runtime.spawn_blocking(move || cb(&e));
        }
        self.changed.notify_waiters();
        conn
    }

    /// Drops connection `generation` if it is still the current one.
    fn drop_conn(&self, generation: u64, reason: &str) {
        let dropped = {
            let mut st = self.lock();
            match &st.current {
                Some(c) if c.generation == generation => {
                    if let Some(w) = st.watcher.take() {
                        w.abort();
                    }
                    st.current.take()
                }
                _ => None,
            }
        };
        if let Some(c) = dropped {
            // Wakes any read or write blocked on it.
            let _ = SockRef::from(&c.stream).shutdown(std::net::Shutdown::Both);
            tracing::debug!(target = %self.target, "plain connection dropped: {reason}");
            if let Some(cb) = self.callbacks.label_down.clone() {
                let e = PathEvent {
                    path: c.generation as u32,
                    network: network_or_direct(&c.network),
                    labels: Labels::NONE,
                };
                self.runtime.spawn_blocking(move || cb(&e));
            }
            self.changed.notify_waiters();
        }
    }

    pub(crate) async fn send(self: &Arc<Self>, buf: &[u8], labels: Labels) -> io::Result<usize> {
        let conn = self.establish(labels).await?;
        let _w = self.write_lock.lock().await;
        let mut off = 0;
        while off < buf.len() {
            conn.stream.writable().await?;
            match conn.stream.try_write(&buf[off..]) {
                Ok(n) => {
                    off += n;
                    conn.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.drop_conn(conn.generation, &e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(off)
    }

    pub(crate) fn try_send(self: &Arc<Self>, buf: &[u8], labels: Labels, thunk: Option<Thunk>) -> TrySend {
        if let Some(conn) = self.current() {
            let Ok(_w) = self.write_lock.try_lock() else {
                return TrySend::Failed(io::ErrorKind::WouldBlock.into());
            };
            return match conn.stream.try_write(buf) {
                Ok(n) => {
                    conn.sent.fetch_add(n as u64, Ordering::Relaxed);
                    TrySend::Sent(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => TrySend::Failed(e),
                Err(e) => {
                    self.drop_conn(conn.generation, &e.to_string());
                    TrySend::Failed(e)
                }
            };
        }
        // No connection: dial in the background; the thunk runs once it is up.
        match thunk {
            Some(t) => {
                self.lock().thunks.push(labels, t);
                self.spawn_resume(labels, true);
                TrySend::Deferred
            }
            None => {
                self.spawn_resume(labels, true);
                TrySend::Failed(io::Error::new(io::ErrorKind::WouldBlock, "not connected yet"))
            }
        }
    }

    pub(crate) fn check_label(self: &Arc<Self>, labels: Labels, thunk: Option<Thunk>) -> Check {
        if matches!(self.connector.route(labels), Route::Networks { .. }) {
            return Check::Ready;
        }
        match thunk {
            Some(t) => {
                self.lock().thunks.push(labels, t);
                self.spawn_resume(labels, false);
                Check::Deferred
            }
            None => Check::Failed,
        }
    }

    /// Waits until `labels` have a network (and, with `dial`, connects), then runs the thunks
    /// stored for them.
    fn spawn_resume(self: &Arc<Self>, labels: Labels, dial: bool) {
        let me = self.clone();
        self.runtime.spawn(async move {
            let far = Instant::now() + Duration::from_secs(365 * 86400);
            if me.connector.wait_route(labels, far).await.is_err() {
                return;
            }
            if dial && let Err(e) = me.establish(labels).await {
                tracing::debug!("deferred dial failed: {e}");
                return;
            }
            let ready = me.lock().thunks.take_ready(|l| l == labels);
            for t in ready {
                me.runtime.spawn_blocking(move || t.run());
            }
        });
    }

    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Labels)> {
        let Some(conn) = self.current() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no connection: send to reconnect"));
        };
        let _r = self.read_lock.lock().await;
        loop {
            conn.stream.readable().await?;
            match conn.stream.try_read(buf) {
                Ok(n) => {
                    conn.received.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok((n, Labels::NONE));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.drop_conn(conn.generation, &e.to_string());
                    return Err(e);
                }
            }
        }
    }

    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> io::Result<(usize, Labels)> {
        let Some(conn) = self.current() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no connection"));
        };
        let n = conn.stream.try_read(buf)?;
        conn.received.fetch_add(n as u64, Ordering::Relaxed);
        Ok((n, Labels::NONE))
    }

    pub(crate) fn thunk_cancel(
        &self,
        labels: Labels,
        matches: impl FnMut(&Thunk) -> bool,
        deleter: impl FnMut(Box<dyn std::any::Any + Send>),
    ) -> usize {
        self.lock().thunks.cancel(labels, matches, deleter)
    }

    pub(crate) fn reset(&self) {
        if let Some(c) = self.current() {
            self.drop_conn(c.generation, "reset");
        }
    }

    pub(crate) fn shutdown(&self) -> io::Result<()> {
        match self.current() {
            Some(c) => SockRef::from(&c.stream).shutdown(std::net::Shutdown::Write),
            None => Ok(()),
        }
    }

    pub(crate) fn close(&self) {
        self.reset();
    }

    pub(crate) fn paths(&self) -> Vec<PathStats> {
        self.current()
            .map(|c| PathStats {
                path: c.generation as u32,
                network: network_or_direct(&c.network),
                established: true,
                troubled: false,
                bytes_sent: c.sent.load(Ordering::Relaxed),
                bytes_received: c.received.load(Ordering::Relaxed),
                srtt: None,
            })
            .into_iter()
            .collect()
    }

    /// The current socket's addresses (local, peer).
    pub(crate) fn addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        let c = self.current()?;
        Some((c.stream.local_addr().ok()?, c.stream.peer_addr().ok()?))
    }

    /// Wakes when a connection comes or goes.
    pub(crate) fn changed(&self) -> &Notify {
        &self.changed
    }
}

fn network_or_direct(n: &Option<Network>) -> Network {
    n.clone().unwrap_or_else(|| Network::new("direct", "-", cmm_policy::NetworkKind::Other))
}

fn to_io(e: ConnectError) -> io::Error {
    let kind = match e.kind() {
        ErrorKind::Refused => io::ErrorKind::ConnectionRefused,
        ErrorKind::Timeout | ErrorKind::DeferTimeout => io::ErrorKind::TimedOut,
        ErrorKind::NetworkUnreachable => io::ErrorKind::NetworkUnreachable,
        ErrorKind::HostUnreachable => io::ErrorKind::HostUnreachable,
        ErrorKind::Rejected => io::ErrorKind::PermissionDenied,
        ErrorKind::Other => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::{NetworkKind, Policy};
    use cmm_scout::Scout;
    use tokio::net::TcpListener;

    fn policy() -> Arc<Policy> {
        Arc::new(Policy::default())
    }

    #[tokio::test]
    async fn local_destinations_connect_directly_whatever_the_labels() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // No network is up at all, yet loopback works.
        let c = Connector::new(Scout::manual(vec![]), policy(), Duration::from_secs(2));
        let opening = open(&c, &Target::ip(addr), Ok(vec![addr]), Labels::BACKGROUND).await.unwrap();
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
        let Opening::Deferred(d) = open(&c, &target, Ok(addrs), Labels::NONE).await.unwrap() else {
            panic!("expected deferral")
        };
        assert!(d.why().contains("no networks"), "{}", d.why());
        let err = d.complete().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DeferTimeout);
        assert!(err.to_string().contains("no matching network within"), "{err}");

        // A network coming up ends the wait (the connect itself then fails: no such device).
        let opening =
            open(&c, &target, Ok(vec!["192.0.2.1:80".parse().unwrap()]), Labels::NONE).await.unwrap();
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
