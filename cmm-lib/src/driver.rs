//! The tokio driver of a cmm-mode multi-socket: it feeds a [`Session`] with sockets, time and
//! the scout's view, and wakes the application.
//!
//! Each path has a reader task (bytes in → `handle_input`) and a writer task (`poll_transmit`
//! → bytes out, vectored, the data chunk never copied). One timer task runs `handle_timeout`.
//! On the connecting side a manager task feeds the scout's snapshots to the sans-IO
//! [`PathManager`] and carries out what it says: one path per (up network, remote address),
//! paths whose network goes down ended, redials with backoff, and the session ended when the
//! peer is gone for good. The session sits behind a
//! `std::sync::Mutex` held only for the synchronous calls, never across an await; callbacks and
//! thunks run outside the lock, on blocking threads.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cmm_policy::{Labels, Network, NetworkKind};
use cmm_scout::Snapshot;
use socket2::SockRef;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::api::{Callbacks, PathEvent};
use crate::connector::Connector;
use crate::frame::{FrameDecoder, PathId, SessionId, StreamId};
use crate::net;
use crate::path_manager::{Action, Outcome, PathKey, PathManager, net_key};
use crate::session::{Event, Role, Session, SessionConfig, Transmit};
use crate::thunk::{Thunk, Thunks};
use crate::tls::PublicKey;

/// Longest a path may take from connect to WELCOME.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accepting session lives without any path before it is closed.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(300);
/// Unsent bytes a path socket may hold, at most and at least: the kernel's queue stays short,
/// so acknowledgement times reflect the link, not our own backlog.
const NOTSENT_LOWAT: u32 = 256 * 1024;
const MIN_LOWAT: usize = 16 * 1024;
/// Longest a closing socket waits for its writers to put CLOSE on the wire before it drops
/// the sockets anyway (a path whose kernel buffer is full may never take it).
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

struct PathIo {
    writer: Arc<Notify>,
    tasks: Vec<AbortHandle>,
    local: Option<SocketAddr>,
    /// The writer holds frames taken from the session and not yet handed to the kernel.
    writing: bool,
}

/// What the driver holds under its lock.
pub(crate) struct State {
    pub(crate) session: Session,
    paths: HashMap<PathId, PathIo>,
    pub(crate) thunks: Thunks,
    armed: Option<Instant>,
    next_path: PathId,
    /// Which paths to have (connecting side).
    manager: PathManager,
    closing: bool,
    pub(crate) last_error: Option<String>,
    orphan_since: Option<Instant>,
    background: Vec<AbortHandle>,
    /// Bytes sent and received by paths that have ended, per network name.
    pub(crate) ended: HashMap<String, (u64, u64)>,
    /// Told, under this lock, whenever `session.readable()` changes (the C API's eventfd).
    readable_hook: Option<ReadableHook>,
    last_readable: bool,
    /// The waiters of each stream handle (stream 0 uses the socket's own).
    pub(crate) stream_wakes: HashMap<StreamId, Arc<StreamWake>>,
}

/// Woken when one stream's reads or writes may go further. Each wakeup also bumps a
/// generation, so that a waiter that read the generation before its attempt and registers after
/// it cannot miss a wakeup that came in between (`notify_waiters` keeps no permit).
#[derive(Default)]
pub(crate) struct StreamWake {
    pub(crate) readable: Notify,
    pub(crate) writable: Notify,
    pub(crate) read_gen: std::sync::atomic::AtomicU64,
    pub(crate) write_gen: std::sync::atomic::AtomicU64,
}

impl StreamWake {
    fn wake_read(&self) {
        self.read_gen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.readable.notify_waiters();
    }

    fn wake_write(&self) {
        self.write_gen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.writable.notify_waiters();
    }
}

/// Called with the new readability whenever it changes.
pub(crate) type ReadableHook = Arc<dyn Fn(bool) + Send + Sync>;

/// A cmm-mode multi-socket's shared core.
pub(crate) struct CmmSocket {
    state: Mutex<State>,
    /// Woken when data (or end of stream) may be readable.
    pub(crate) readable: Notify,
    /// Woken when sending may go further (buffer space, a path came or went).
    pub(crate) writable: Notify,
    /// Woken, once the socket is closing, whenever a writer has handed a batch to the kernel.
    written: Notify,
    timer: Notify,
    manager: Notify,
    pub(crate) connector: Connector,
    callbacks: Callbacks,
    role: Role,
    remotes: Vec<SocketAddr>,
    runtime: tokio::runtime::Handle,
    /// TLS for the paths this side dials (connecting side), if they are to be encrypted.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The key the peer presented (accepting side, TLS).
    pub(crate) peer_key: Option<PublicKey>,
    /// How long calls without a thunk wait for a network, per label set, where the
    /// application said (`cmm_set_failure_timeout`); the policy's `max_wait` otherwise.
    failure_timeouts: Mutex<Vec<(Labels, Duration)>>,
}

/// A path's TLS session, shared by its reader (which decrypts) and its writer (which
/// encrypts); locked only for the synchronous rustls calls, never across an await.
pub(crate) type TlsSession = Arc<Mutex<rustls::Connection>>;

fn lock_tls(t: &TlsSession) -> MutexGuard<'_, rustls::Connection> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters that say whether waiting application calls should look again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Grows when chunks (bytes, a new stream, the end of one), or a close arrive.
    received: (u64, bool, bool),
    /// Grows when the peer acknowledges something.
    acked: (usize, bool),
}

impl Progress {
    fn of(s: &Session) -> Progress {
        Progress {
            received: (s.arrivals(), s.read_closed(), s.closed().is_some()),
            acked: (s.acked_count(), s.all_acked()),
        }
    }
}

/// What happened under the lock and must be acted on after it.
#[derive(Default)]
struct After {
    up: Vec<PathEvent>,
    down: Vec<PathEvent>,
    thunks: Vec<Thunk>,
}

fn kind_labels(n: &Network) -> Labels {
    match n.kind {
        NetworkKind::Wifi | NetworkKind::Ethernet => Labels::WIFI_ONLY,
        NetworkKind::Cellular => Labels::CELLULAR_ONLY,
        NetworkKind::Other => Labels::NONE,
    }
}

/// The labels a path serves now: its kind's restriction, and each of ONDEMAND, BACKGROUND,
/// SMALL, LARGE that would choose it.
fn labels_served(session: &Session, path: PathId, network: &Network) -> Labels {
    let mut bits = kind_labels(network).bits();
    for l in [Labels::ONDEMAND, Labels::BACKGROUND, Labels::SMALL, Labels::LARGE] {
        if session.path_for(l) == Some(path) {
            bits |= l.bits();
        }
    }
    // Either of ONDEMAND/BACKGROUND (and SMALL/LARGE) may both choose this path; the set is
    // informational, so keep the first of each pair rather than an invalid combination.
    Labels::from_bits(bits)
        .or_else(|_| Labels::from_bits(bits & !(Labels::BACKGROUND.bits() | Labels::LARGE.bits())))
        .unwrap_or(Labels::NONE)
}

fn random_session_id() -> io::Result<SessionId> {
    use std::io::Read;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(SessionId(id))
}

impl CmmSocket {
    fn new(
        role: Role,
        id: SessionId,
        connector: Connector,
        callbacks: Callbacks,
        remotes: Vec<SocketAddr>,
        cfg: SessionConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<CmmSocket> {
        let policy = Arc::new(connector.policy().clone());
        let mut session = Session::new(role, id, cfg, policy);
        if role == Role::Connecting {
            // Our own networks: paced together with the proxy's and every other multi-socket's
            // traffic on them. An accepting session keys its paths by the peer's networks and
            // keeps its own trickler.
            session.set_trickler(connector.trickler().clone());
        }
        Arc::new(CmmSocket {
            state: Mutex::new(State {
                session,
                paths: HashMap::new(),
                thunks: Thunks::default(),
                armed: None,
                next_path: 1,
                manager: PathManager::new(remotes.clone()),
                closing: false,
                last_error: None,
                orphan_since: None,
                background: Vec::new(),
                ended: HashMap::new(),
                readable_hook: None,
                last_readable: false,
                stream_wakes: HashMap::new(),
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            written: Notify::new(),
            timer: Notify::new(),
            manager: Notify::new(),
            connector,
            callbacks,
            role,
            remotes,
            runtime: tokio::runtime::Handle::current(),
            tls,
            peer_key: None,
            failure_timeouts: Mutex::new(Vec::new()),
        })
    }

    /// How long a call without a thunk waits for a network that fits `labels`.
    pub(crate) fn max_wait(&self, labels: Labels) -> Duration {
        let set = self.failure_timeouts.lock().unwrap_or_else(PoisonError::into_inner);
        set.iter()
            .find(|(l, _)| *l == labels)
            .map_or_else(|| self.connector.policy().max_wait(labels), |&(_, d)| d)
    }

    /// Sets (or, with `None`, forgets) the wait for `labels`.
    pub(crate) fn set_max_wait(&self, labels: Labels, wait: Option<Duration>) {
        let mut set = self.failure_timeouts.lock().unwrap_or_else(PoisonError::into_inner);
        set.retain(|(l, _)| *l != labels);
        if let Some(d) = wait {
            set.push((labels, d));
        }
    }

    /// A connecting multi-socket to `remotes`; paths open as networks come up.
    pub(crate) fn connecting(
        connector: Connector,
        remotes: Vec<SocketAddr>,
        callbacks: Callbacks,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> io::Result<Arc<CmmSocket>> {
        let sock = CmmSocket::new(
            Role::Connecting,
            random_session_id()?,
            connector,
            callbacks,
            remotes,
            SessionConfig::default(),
            tls,
        );
        let timer = sock.runtime.spawn(timer_loop(sock.clone()));
        let manager = sock.runtime.spawn(manage_paths(sock.clone()));
        sock.lock().background = vec![timer.abort_handle(), manager.abort_handle()];
        Ok(sock)
    }

    /// An accepting multi-socket for a session the peer named; `peer` is where its first path
    /// came from.
    pub(crate) fn accepting(
        connector: Connector,
        id: SessionId,
        peer: SocketAddr,
        peer_key: Option<PublicKey>,
        join_secret: Option<[u8; 32]>,
    ) -> Arc<CmmSocket> {
        let mut sock = CmmSocket::new(
            Role::Accepting,
            id,
            connector,
            Callbacks::default(),
            vec![peer],
            SessionConfig::default(),
            None,
        );
        if let Some(s) = Arc::get_mut(&mut sock) {
            s.peer_key = peer_key;
        }
        if let Some(secret) = join_secret {
            sock.lock().session.set_join_secret(secret);
        }
        let timer = sock.runtime.spawn(timer_loop(sock.clone()));
        sock.lock().background = vec![timer.abort_handle()];
        sock
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state, then wakes whoever its changes concern, and runs callbacks and
    /// ready thunks outside the lock.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, after) = {
            let mut st = self.lock();
            let before = Progress::of(&st.session);
            let r = f(&mut st);
            let after = self.collect(&mut st, before);
            (r, after)
        };
        self.dispatch(after);
        r
    }

    fn collect(&self, st: &mut State, before: Progress) -> After {
        let mut after = After::default();
        let now = Progress::of(&st.session);
        let mut paths_changed = false;
        while let Some(e) = st.session.poll_event() {
            paths_changed = true;
            match e {
                Event::PathUp { path, network } => {
                    st.manager.path_established(path);
                    // (Backoffs may have ended: let the manager look again.)
                    self.manager.notify_one();
                    let labels = labels_served(&st.session, path, &network);
                    tracing::debug!(path, network = %network.name, %labels, "path up");
                    after.up.push(PathEvent { path, network, labels });
                }
                Event::PathDown { path, network, reason, sent, received, rejoin } => {
                    tracing::debug!(path, network = %network.name, "path down: {reason}");
                    let e = st.ended.entry(network.name.clone()).or_default();
                    e.0 += sent;
                    e.1 += received;
                    // However the session dropped it (here, or the peer's PATH_DOWN), its
                    // socket goes too.
                    if let Some(io) = st.paths.remove(&path) {
                        for t in io.tasks {
                            t.abort();
                        }
                    }
                    if rejoin {
                        st.manager.path_refused_before_join(path, Instant::now());
                        self.manager.notify_one();
                    } else {
                        st.manager.path_ended(path, Outcome::Failed, Instant::now());
                    }
                    let labels = kind_labels(&network);
                    after.down.push(PathEvent { path, network, labels });
                }
                Event::PathTroubled { path } => tracing::debug!(path, "path troubled: no acknowledgement"),
                Event::PathRecovered { path } => tracing::debug!(path, "path recovered"),
                Event::Closed { reason } => tracing::debug!("session closed: {reason}"),
            }
        }
        // Stream handles: only those whose reads or writes may go on, or all of them when
        // paths came or went (a network to wait for) or the session ended.
        let (reads, writes) = st.session.take_wakeups();
        if paths_changed {
            for w in st.stream_wakes.values() {
                w.wake_read();
                w.wake_write();
            }
        } else {
            for id in reads {
                if let Some(w) = st.stream_wakes.get(&id) {
                    w.wake_read();
                }
            }
            for id in writes {
                if let Some(w) = st.stream_wakes.get(&id) {
                    w.wake_write();
                }
            }
        }
        for (&id, p) in &st.paths {
            if st.session.wants_transmit(id) {
                p.writer.notify_one();
            }
        }
        // Wake application waiters only on progress: a waiter that wakes itself would spin.
        if now.received != before.received {
            self.readable.notify_waiters();
        }
        if now.acked != before.acked || paths_changed {
            self.writable.notify_waiters();
            if paths_changed {
                self.readable.notify_waiters();
            }
        }
        let next = st.session.poll_timeout();
        if let Some(t) = next
            && st.armed.is_none_or(|a| t < a)
        {
            self.timer.notify_one();
        }
        let readable = st.session.readable();
        if readable != st.last_readable {
            st.last_readable = readable;
            if let Some(h) = &st.readable_hook {
                h(readable);
            }
        }
        if st.paths.is_empty() {
            st.orphan_since.get_or_insert_with(Instant::now);
        } else {
            st.orphan_since = None;
        }
        if !st.thunks.is_empty() {
            let session = &st.session;
            after.thunks = st.thunks.take_ready(|l| session.path_for(l).is_some());
        }
        after
    }

    fn dispatch(&self, after: After) {
        for e in after.up {
            if let Some(cb) = self.callbacks.label_up.clone() {
                self.runtime.spawn_blocking(move || cb(&e));
            }
        }
        for e in after.down {
            if let Some(cb) = self.callbacks.label_down.clone() {
                self.runtime.spawn_blocking(move || cb(&e));
            }
        }
        for t in after.thunks {
            self.runtime.spawn_blocking(move || t.run());
        }
    }

    /// Attaches a connected socket as path `id`: `register` adds the path to the session, in
    /// the same critical section that records its socket tasks, so no other task ever sees one
    /// without the other. Returns false (and drops the socket) when the socket is closing.
    fn start_path(
        self: &Arc<Self>,
        id: PathId,
        stream: TcpStream,
        tls: Option<rustls::Connection>,
        initial: BytesMut,
        key: Option<PathKey>,
        register: impl FnOnce(&mut State, Option<&rustls::Connection>) -> bool,
    ) -> bool {
        let _ = stream.set_nodelay(true);
        let _ = net::keepalive(&stream);
        let local = stream.local_addr().ok();
        let (rd, wr) = stream.into_split();
        let writer = Arc::new(Notify::new());
        let tls: Option<TlsSession> = tls.map(|mut c| {
            // Batches are bounded by the writer's low-water mark; the plaintext they become
            // must fit whole.
            c.set_buffer_limit(None);
            Arc::new(Mutex::new(c))
        });
        self.mutate(|st| {
            let registered = !st.closing && {
                let conn = tls.as_ref().map(lock_tls);
                register(st, conn.as_deref())
            };
            if !registered {
                if let Some(k) = &key {
                    st.manager.dial_abandoned(k);
                }
                return false;
            }
            if let Some(k) = &key {
                st.manager.dial_connected(k.clone(), id);
            }
            let w = self.runtime.spawn(write_loop(self.clone(), id, wr, writer.clone(), tls.clone()));
            let interface = key.as_ref().and_then(|(k, _)| k.split_once('/').map(|(_, i)| i.to_string()));
            let r =
                self.runtime.spawn(read_loop(self.clone(), id, rd, initial, interface, tls, writer.clone()));
            st.paths.insert(
                id,
                PathIo { writer, tasks: vec![w.abort_handle(), r.abort_handle()], local, writing: false },
            );
            true
        })
    }

    /// Ends path `id` (its socket failed, its network went down, or it broke the protocol).
    pub(crate) fn end_path(&self, id: PathId, reason: &str) {
        self.end_path_with(id, reason, Outcome::Failed);
    }

    /// Ends path `id`; `outcome` says whether the peer closed or reset it.
    fn end_path_with(&self, id: PathId, reason: &str, outcome: Outcome) {
        self.mutate(|st| {
            if let Some(io) = st.paths.remove(&id) {
                for t in io.tasks {
                    t.abort();
                }
            }
            st.manager.path_ended(id, outcome, Instant::now());
            st.session.remove_path(id, reason, Instant::now());
            Self::check_peer(st);
        });
        self.manager.notify_one();
    }

    /// Ends the session when the path manager says the peer is gone for good.
    fn check_peer(st: &mut State) {
        if st.session.closed().is_none()
            && let Some(why) = st.manager.peer_gone()
        {
            tracing::info!("{why}: the multi-socket is reset");
            st.session.abort(&why);
        }
    }

    /// Adds a path the listener accepted (its HELLO already read).
    pub(crate) fn add_accepted_path(
        self: &Arc<Self>,
        id: PathId,
        network: Network,
        stream: TcpStream,
        tls: Option<rustls::Connection>,
        rest: BytesMut,
    ) -> bool {
        self.start_path(id, stream, tls, rest, None, |st, _| {
            if st.session.path_ids().contains(&id) {
                return false;
            }
            st.session.add_path(id, network, Instant::now());
            true
        })
    }

    /// Opens the paths the scout says should exist, and ends those whose network is down.
    fn reconcile(self: &Arc<Self>, snap: &Snapshot) {
        let actions = {
            let mut st = self.lock();
            if st.closing || st.session.closed().is_some() {
                return;
            }
            st.manager.reconcile(snap, Instant::now())
        };
        for action in actions {
            match action {
                Action::End { path, reason } => self.end_path(path, &reason),
                Action::Dial { network, remote, settle } => {
                    self.runtime.spawn(dial(self.clone(), *network, remote, settle));
                }
            }
        }
    }

    /// Drops every path; the next send dials again (libcmm's `cmm_reset`).
    pub(crate) fn reset(&self) {
        let ids: Vec<PathId> = self.mutate(|st| {
            st.manager.pause();
            st.paths.keys().copied().collect()
        });
        for id in ids {
            self.end_path(id, "reset");
        }
    }

    /// Leaves the reset state (a send or check needs the network again).
    pub(crate) fn resume_after_reset(&self, st: &mut State) {
        if st.manager.resume() {
            self.manager.notify_one();
        }
    }

    /// Closes: FIN, wait (up to `linger`) until the peer has everything, CLOSE, drop paths.
    pub(crate) async fn close(self: &Arc<Self>, linger: Duration) {
        self.mutate(|st| st.session.shutdown());
        let deadline = tokio::time::Instant::now() + linger;
        loop {
            let notified = self.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let done = {
                let st = self.lock();
                st.session.all_acked() || st.session.closed().is_some() || st.paths.is_empty()
            };
            if done || tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.mutate(|st| {
            st.closing = true;
            st.session.close("closed");
        });
        self.flush_close().await;
        self.abort_all();
    }

    /// Waits (up to [`CLOSE_FLUSH`]) until every path's writer has handed the kernel all the
    /// session had for it, CLOSE included: dropping a socket before that would leave the peer
    /// to find out from its paths' ends, and keep the session for its orphan timeout.
    async fn flush_close(&self) {
        let started = tokio::time::Instant::now();
        let deadline = started + CLOSE_FLUSH;
        loop {
            let written = self.written.notified();
            let gone = self.writable.notified();
            tokio::pin!(written, gone);
            written.as_mut().enable();
            gone.as_mut().enable();
            let pending = {
                let st = self.lock();
                st.paths.iter().filter(|(id, p)| p.writing || st.session.wants_transmit(**id)).count()
            };
            if pending == 0 {
                tracing::debug!("CLOSE written on every path in {:?}", started.elapsed());
                return;
            }
            // A batch written, or a path gone (its writer with it): look again.
            let woken = async {
                tokio::select! {
                    _ = written => {}
                    _ = gone => {}
                }
            };
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                tracing::debug!(pending, "CLOSE not written on every path within {CLOSE_FLUSH:?}");
                return;
            }
        }
    }

    /// Stops every task and drops every socket at once.
    pub(crate) fn abort_all(&self) {
        let mut st = self.lock();
        st.closing = true;
        for p in st.session.path_stats() {
            let e = st.ended.entry(p.network.name.clone()).or_default();
            e.0 += p.bytes_sent;
            e.1 += p.bytes_received;
        }
        for id in st.session.path_ids() {
            st.session.remove_path(id, "closed", Instant::now());
        }
        while st.session.poll_event().is_some() {}
        for (_, io) in st.paths.drain() {
            for t in io.tasks {
                t.abort();
            }
        }
        for t in st.background.drain(..) {
            t.abort();
        }
        drop(st);
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    /// Sets the function told (under the lock) whenever readability changes; it is told the
    /// current state at once.
    pub(crate) fn set_readable_hook(&self, hook: ReadableHook) {
        let mut st = self.lock();
        st.last_readable = st.session.readable();
        hook(st.last_readable);
        st.readable_hook = Some(hook);
    }

    /// Paths the session has now.
    pub(crate) fn path_count(&self) -> usize {
        self.lock().session.path_ids().len()
    }

    /// The local address of the first path, if any.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.lock().paths.values().filter_map(|p| p.local).min()
    }

    pub(crate) fn remotes(&self) -> &[SocketAddr] {
        &self.remotes
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Stores a thunk for `labels`.
    pub(crate) fn store_thunk(st: &mut State, labels: Labels, thunk: Thunk) {
        st.thunks.push(labels, thunk);
    }

    /// For the accepting side: whether the session has had no path for too long.
    fn orphaned(&self) -> bool {
        let st = self.lock();
        st.orphan_since.is_some_and(|t| t.elapsed() > ORPHAN_TIMEOUT)
    }
}

async fn dial(sock: Arc<CmmSocket>, network: Network, remote: SocketAddr, settle: bool) {
    let key = (net_key(&network), remote);
    let full = sock.connector.connect_timeout();
    let timeout = if settle { crate::connector::settle_timeout(Some(&network), full) } else { full };
    let connected = match net::connect(remote, Some(&network), timeout).await {
        Ok(stream) => match &sock.tls {
            None => Ok((stream, None)),
            Some(config) => tls_connect(stream, config.clone(), full).await,
        },
        Err(e) => Err(e),
    };
    match connected {
        Ok((stream, tls)) => {
            let id = {
                let mut st = sock.lock();
                let id = st.next_path;
                st.next_path += 1;
                id
            };
            let n = network.clone();
            let started = sock.start_path(id, stream, tls, BytesMut::new(), Some(key), move |st, tls| {
                // A TLS path that joins proves it knows the session's secret, bound to its own
                // TLS session.
                let proof = match (tls, st.session.join_secret()) {
                    (Some(c), Some(secret)) if st.session.ever_established() => {
                        crate::tls::join_proof(c, &secret, &st.session.id().0).unwrap_or([0; 32])
                    }
                    _ => [0; 32],
                };
                st.session.add_path_with_proof(id, n, Instant::now(), proof);
                true
            });
            if !started {
                return;
            }
            tracing::debug!(path = id, network = %network.name, %remote, "path connected, saying HELLO");
            tokio::time::sleep(HANDSHAKE_TIMEOUT).await;
            let pending = sock.lock().session.path_stats().iter().any(|p| p.path == id && !p.established);
            if pending {
                sock.end_path(id, "no WELCOME from the peer");
            }
        }
        Err(e) => {
            tracing::debug!(network = %network.name, %remote, "dial failed: {e}");
            let outcome =
                if e.kind() == io::ErrorKind::ConnectionRefused { Outcome::Refused } else { Outcome::Failed };
            sock.mutate(|st| {
                st.manager.dial_failed(&key, settle && timeout < full, outcome, Instant::now());
                st.last_error = Some(format!("connect to {remote} via {}: {e}", network.interface));
                CmmSocket::check_peer(st);
            });
        }
    }
}

/// The TLS handshake on a dialled path, within `timeout`; the socket and its TLS session
/// after it (no bytes of the peer's are lost: whatever rustls read past the handshake stays
/// in the session, for the path's reader).
async fn tls_connect(
    stream: TcpStream,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> io::Result<(TcpStream, Option<rustls::Connection>)> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = tokio::time::timeout(timeout, connector.connect(crate::tls::server_name(), stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    let (stream, conn) = tls.into_inner();
    Ok((stream, Some(rustls::Connection::Client(conn))))
}

async fn manage_paths(sock: Arc<CmmSocket>) {
    let mut sub = sock.connector.scout().subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        sock.reconcile(&sub.snapshot());
        tokio::select! {
            next = sub.next() => if next.is_none() { return },
            _ = sock.manager.notified() => {}
            _ = tick.tick() => {}
        }
    }
}

async fn timer_loop(sock: Arc<CmmSocket>) {
    let mut orphan_check = tokio::time::interval(Duration::from_secs(5));
    loop {
        let deadline = {
            let mut st = sock.lock();
            let d = st.session.poll_timeout();
            st.armed = d;
            d
        };
        let notified = sock.timer.notified();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => sock.mutate(|st| st.session.handle_timeout(Instant::now())),
            _ = notified => {}
            _ = orphan_check.tick() => {
                if sock.role == Role::Accepting && sock.orphaned() {
                    tracing::info!("closing a session that had no path for {ORPHAN_TIMEOUT:?}");
                    sock.mutate(|st| st.session.close("no path left"));
                    sock.abort_all();
                    return;
                }
            }
        }
    }
}

/// A path's socket error, as evidence about the peer: a reset says its host no longer knows
/// the connection.
fn outcome_of(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

/// A path that has read only a little for this long gives back its spare read buffers.
const QUIET: Duration = Duration::from_secs(1);

/// How often a path's TCP_INFO is read for the scout's estimates.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

async fn read_loop(
    sock: Arc<CmmSocket>,
    id: PathId,
    mut rd: OwnedReadHalf,
    initial: BytesMut,
    interface: Option<String>,
    tls: Option<TlsSession>,
    writer: Arc<Notify>,
) {
    const READ: usize = 256 * 1024;
    let mut last_sample: Option<(Instant, net::TcpStats)> = None;
    // Frames are decoded here, outside the lock, straight from the read buffer: data chunks
    // borrow from it and reach the application without another copy.
    let mut decoder = FrameDecoder::new();
    decoder.push_owned(initial);
    let mut frames = Vec::new();
    let mut last_big_read = Instant::now();
    let mut cipher = if tls.is_some() { vec![0u8; TLS_READ] } else { Vec::new() };
    if let Some(t) = &tls
        && let Err(e) = drain_plaintext(&mut lock_tls(t), &mut decoder)
    {
        sock.end_path(id, &format!("TLS: {e}"));
        return;
    }
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(path = id, "closing a path: malformed frame: {e}");
                    sock.end_path(id, &format!("malformed frame: {e}"));
                    return;
                }
            }
        }
        if !frames.is_empty() {
            let result = sock.mutate(|st| {
                let now = Instant::now();
                frames.drain(..).try_for_each(|f| st.session.handle_frame(id, f, now))
            });
            if let Err(e) = result {
                tracing::info!(path = id, "closing a path: {e}");
                sock.end_path(id, &e.to_string());
                return;
            }
        }
        // Now and then, what this connection says of its network goes to the scout.
        if let Some(iface) = &interface
            && last_sample.as_ref().is_none_or(|(t, _)| t.elapsed() >= SAMPLE_EVERY)
            && let Some(stats) = net::tcp_stats(rd.as_ref())
        {
            let now = Instant::now();
            if let Some((t, before)) = &last_sample {
                let sample = net::sample_between(Some(before), &stats, now - *t);
                sock.connector.scout().report(iface, sample);
            }
            last_sample = Some((now, stats));
        }
        let got = match &tls {
            None => rd.read_buf(decoder.read_buffer(READ)).await,
            Some(t) => read_tls(&mut rd, t, &mut cipher, &mut decoder, &writer).await,
        };
        match got {
            Ok(0) => {
                sock.end_path_with(id, "closed by the peer", Outcome::Refused);
                return;
            }
            // Short reads for a while: the connection is not streaming, so the buffers kept
            // for reuse go back (a quiet session holds one read buffer per path).
            Ok(n) if n < READ / 16 => {
                if last_big_read.elapsed() > QUIET {
                    decoder.release_spare();
                }
            }
            Ok(_) => last_big_read = Instant::now(),
            Err(e) => {
                sock.end_path_with(id, &e.to_string(), outcome_of(&e));
                return;
            }
        }
    }
}

/// Ciphertext read from a TLS path at a time.
const TLS_READ: usize = 64 * 1024;

/// Reads ciphertext once and decrypts it into `decoder`; returns the ciphertext bytes read
/// (0: the peer closed). TLS records that rustls wants to answer (a key update) wake the
/// path's writer.
async fn read_tls(
    rd: &mut OwnedReadHalf,
    tls: &TlsSession,
    cipher: &mut [u8],
    decoder: &mut FrameDecoder,
    writer: &Notify,
) -> io::Result<usize> {
    use tokio::io::AsyncReadExt as _;
    let n = rd.read(cipher).await?;
    if n == 0 {
        return Ok(0);
    }
    let mut conn = lock_tls(tls);
    let mut input = &cipher[..n];
    while !input.is_empty() {
        conn.read_tls(&mut input)?;
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
        if drain_plaintext(&mut conn, decoder)? {
            return Ok(0);
        }
    }
    if conn.wants_write() {
        writer.notify_one();
    }
    Ok(n)
}

/// Moves the plaintext rustls holds into `decoder`; true when the peer closed the TLS session.
fn drain_plaintext(conn: &mut rustls::Connection, decoder: &mut FrameDecoder) -> io::Result<bool> {
    use std::io::Read as _;
    let mut plain = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut plain) {
            Ok(0) => return Ok(true),
            Ok(k) => decoder.push_read(&plain[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Encrypts `batch` (and anything else rustls has to send) and writes it; `out` is the
/// path's reused ciphertext buffer.
async fn write_tls(
    wr: &mut OwnedWriteHalf,
    tls: &TlsSession,
    batch: &[Transmit],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use std::io::Write as _;
    out.clear();
    {
        let mut conn = lock_tls(tls);
        for t in batch {
            conn.writer().write_all(&t.header)?;
            conn.writer().write_all(&t.payload)?;
        }
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
    }
    let mut off = 0;
    while off < out.len() {
        let n = net::send_vectored(wr.as_ref(), &[io::IoSlice::new(&out[off..])]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    Ok(())
}

async fn write_loop(
    sock: Arc<CmmSocket>,
    id: PathId,
    mut wr: OwnedWriteHalf,
    notify: Arc<Notify>,
    tls: Option<TlsSession>,
) {
    // How much to hand the kernel beyond what is in flight: about 10 ms of the link, so that
    // what is written is on its way soon. Anything not written yet stays in the session, where
    // it can still be moved to another path (a resend never queues behind seconds of backlog)
    // and where ONDEMAND goes ahead of BACKGROUND. The kernel sends its unsent bytes at the
    // congestion window's pace, far below the link's while the window is small (after idle,
    // in slow start): 50 ms of the link's rate held a request 2-3 round trips behind the
    // background that started with it.
    let lowat = {
        let st = sock.lock();
        let rate = st.session.path_network(id).map_or(0, |n| n.bandwidth_up());
        ((rate / 8 / 100) as usize).clamp(MIN_LOWAT, NOTSENT_LOWAT as usize)
    };
    let _ = SockRef::from(wr.as_ref()).set_tcp_notsent_lowat(lowat as u32);
    let mut batch: Vec<Transmit> = Vec::with_capacity(16);
    let mut cipher_out = Vec::new();
    loop {
        {
            let mut st = sock.lock();
            let now = Instant::now();
            let mut bytes = 0;
            while bytes < lowat {
                match st.session.poll_transmit(id, now) {
                    Some(t) => {
                        bytes += t.len();
                        batch.push(t);
                    }
                    None => break,
                }
            }
            if !batch.is_empty() {
                if let Some(p) = st.paths.get_mut(&id) {
                    p.writing = true;
                }
                if let Some(d) = st.session.poll_timeout()
                    && st.armed.is_none_or(|a| d < a)
                {
                    sock.timer.notify_one();
                }
            }
        }
        let tls_due = tls.as_ref().is_some_and(|t| lock_tls(t).wants_write());
        if batch.is_empty() && !tls_due {
            notify.notified().await;
            continue;
        }
        let written = match &tls {
            None => write_all_vectored(&mut wr, &batch).await,
            Some(t) => write_tls(&mut wr, t, &batch, &mut cipher_out).await,
        };
        if let Err(e) = written {
            sock.end_path_with(id, &format!("write failed: {e}"), outcome_of(&e));
            return;
        }
        batch.clear();
        let closing = {
            let mut st = sock.lock();
            if let Some(p) = st.paths.get_mut(&id) {
                p.writing = false;
            }
            st.closing
        };
        if closing {
            sock.written.notify_waiters();
        }
        // Writable again only once the kernel's unsent bytes are below the low-water mark.
        if let Err(e) = wr.as_ref().writable().await {
            sock.end_path_with(id, &format!("write failed: {e}"), outcome_of(&e));
            return;
        }
    }
}

/// Writes every transmit (header then payload each) with as few system calls as the kernel
/// allows, and never a SIGPIPE (see [`net::send_vectored`]). No allocation: up to
/// `MAX_IOV` slices go out per call, taken afresh from the batch after each partial write.
async fn write_all_vectored(wr: &mut OwnedWriteHalf, batch: &[Transmit]) -> io::Result<()> {
    const MAX_IOV: usize = 64;
    let parts = || batch.iter().flat_map(|t| [&t.header[..], &t.payload[..]]).filter(|p| !p.is_empty());
    // Whole parts already written, and bytes written of the next one.
    let (mut first, mut offset) = (0, 0);
    let mut iov = [io::IoSlice::new(&[]); MAX_IOV];
    loop {
        let mut count = 0;
        for (slot, part) in iov.iter_mut().zip(parts().skip(first)) {
            *slot = io::IoSlice::new(if count == 0 { &part[offset..] } else { part });
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let mut n = net::send_vectored(wr.as_ref(), &iov[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        for part in parts().skip(first) {
            let left = part.len() - offset;
            if n < left {
                offset += n;
                break;
            }
            n -= left;
            first += 1;
            offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// More parts than one system call takes, some empty, some far larger than the small send
    /// buffer, so writes come back partial, within a part and across parts: the reader gets
    /// every byte, in order.
    #[tokio::test]
    async fn vectored_writes_deliver_every_part_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, mut server) = (client.unwrap(), accepted.unwrap().0);
        SockRef::from(&client).set_send_buffer_size(4096).unwrap();
        let batch: Vec<Transmit> = (0..300u32)
            .map(|i| Transmit {
                header: Bytes::from(if i % 7 == 0 { Vec::new() } else { i.to_be_bytes().to_vec() }),
                payload: Bytes::from(vec![
                    (i % 251) as u8;
                    if i % 50 == 3 { 200_000 } else { (i as usize * 37) % 3000 }
                ]),
            })
            .collect();
        let expected: Vec<u8> =
            batch.iter().flat_map(|t| [t.header.clone(), t.payload.clone()]).flatten().collect();
        let (_rd, mut wr) = client.into_split();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let wait = Duration::from_secs(30);
        tokio::time::timeout(wait, write_all_vectored(&mut wr, &batch))
            .await
            .expect("write stalled")
            .unwrap();
        drop(wr);
        let got = tokio::time::timeout(wait, reader).await.expect("read stalled").unwrap();
        assert!(got == expected, "{} bytes read, {} written", got.len(), expected.len());
    }
}
