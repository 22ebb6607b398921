//! Plain mode: a multi-socket towards an ordinary TCP server.
//!
//! Each connection comes from [`Connector::connect_or_defer`], as the proxy's upstreams do: on
//! the network the labels choose now, or once one comes up. A plain server speaks no cmm
//! protocol, so there is one physical connection at a time; when its network goes down the
//! connection is dropped (`label_down` runs) and the next send dials again on whatever the
//! labels choose then (`label_up` runs). A failure in the middle of a call is passed back to the caller, as in
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
use crate::connector::{ConnectError, Connected, Connector, ErrorKind, Opening, Route};
use crate::session::PathStats;
use crate::target::Target;
use crate::thunk::{Thunk, Thunks};

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
    /// The policy's wait for a network that fits `labels`.
    pub(crate) fn max_wait(&self, labels: Labels) -> std::time::Duration {
        self.connector.policy().max_wait(labels)
    }

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
        let connected =
            match self.connector.connect_or_defer(&self.target, addrs, labels).await.map_err(to_io)? {
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
