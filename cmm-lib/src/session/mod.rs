//! [`Session`]: one multi-socket's protocol state, with no I/O — fed bytes and time, it returns
//! frames to write per path, a deadline for its timer, and events.
//!
//! The application's byte stream is cut into chunks, each with a stream offset and the labels
//! it was sent with. Each chunk goes on a path (one physical connection) whose network its
//! labels choose, by the same [`Policy`] the rest of cmm uses. The receiver reassembles by
//! offset, so bytes come out once and in order whichever paths carried them, and acknowledges
//! with a cumulative offset plus selective ranges on the path the data came in on.
//!
//! A path is *troubled* when it has data out and no acknowledgement has made progress for
//! `max(min_trouble, 3 × srtt + ack_delay)` (libcmm's rule, with a floor that tolerates a loaded machine):
//! its unacknowledged data is then resent on another path its labels allow. A path that is
//! closed (its network went down) has its data resent at once, and the peer is told with
//! PATH_DOWN on another path so it fails over at once too. Data whose labels allow no
//! remaining path waits — nothing is dropped — until such a path comes up.
//!
//! Background never delays foreground: while foreground chunks are sent or received on a path's
//! network, background chunks there are paced by a [`Trickler`] below the network's bottleneck
//! rate. (A foreground chunk queued behind them still waits: the stream is delivered in order,
//! so sending it early would not deliver it sooner. Pacing protects foreground traffic of other
//! connections on the network, and this one's foreground data sent on another path.)
//!
//! Driving it: feed every frame read from a path to [`Session::handle_frame`] (the one input
//! entry point); after any call, write what [`Session::poll_transmit`] gives for each path, arm
//! a timer for [`Session::poll_timeout`] and call [`Session::handle_timeout`] when it fires,
//! and act on [`Session::poll_event`].
//!
//! Its parts, one mechanism each: [`send`] (the send buffer and the account of what is owed),
//! [`recv`] (the reassembler, with bounded memory), [`path`] (a path's state and figures),
//! [`timer`] (the named timers), [`error`] (what a peer or an application can get wrong). This
//! module is the glue: which chunk goes on which path, acknowledgements, failover.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cmm_policy::{Decision, Labels, Network, Policy};

use crate::frame::{self, Frame, FrameDecoder, NetworkInfo, PathId, SessionId, StreamId};
use crate::trickle::{Direction, Trickler};

mod error;
mod path;
mod recv;
mod send;
mod stream;
mod timer;

pub use error::{ProtocolError, RecvError, SendError, SessionError};
pub use path::{PathStats, info_from_network, network_from_info};
pub use recv::{Assembler, COPY_BELOW, JOIN_MAX, MAX_HELD, MAX_OUT_OF_ORDER, Received};
pub use send::{Body, Chunk, SendBuffer, SendStream};
pub use stream::{INITIAL_STREAM_WINDOW, MAX_STREAMS, RecvStream, StreamState};
pub use timer::Timer;

use path::PathState;

/// DATA frames received on a path before an acknowledgement goes out at once.
const ACK_EVERY: u32 = 8;
/// How long a network counts as unsure after it lost a path (libcmm's "flapped recently"):
/// meanwhile ONDEMAND chunks sent on it also go out on a second network.
pub const FLAP_MEMORY: Duration = Duration::from_secs(10);
/// Networks whose losses are remembered at most (the peer names its networks).
const MAX_REMEMBERED_LOSSES: usize = 64;

/// The receive window every session starts with, before the peer's first ACK widens it.
pub const INITIAL_WINDOW: u64 = 1 << 20;

/// Room in the send buffer and the session window that background streams leave to the
/// others (see `Session::session_room`).
pub const FOREGROUND_RESERVE: usize = 256 * 1024;

/// Tunables of a session. The defaults suit links from 1 Mbit/s to loopback.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most bytes accepted from the application and not yet acknowledged.
    pub send_buffer: usize,
    /// Most bytes received and not yet read by the application, all streams together (and
    /// stream 0's own window).
    pub recv_window: u64,
    /// Each other stream's window: most of its bytes received and not yet read.
    pub stream_window: u64,
    /// Largest data chunk.
    pub chunk: usize,
    /// How long an acknowledgement may wait for more data to cover.
    pub ack_delay: Duration,
    /// Floor of the trouble timeout.
    pub min_trouble: Duration,
    /// Idle paths are probed this often, so a silently dead one is known before it is needed.
    pub ping_idle: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            send_buffer: 8 << 20,
            recv_window: 8 << 20,
            stream_window: 1 << 20,
            chunk: frame::MAX_CHUNK,
            ack_delay: Duration::from_millis(5),
            min_trouble: Duration::from_millis(300),
            ping_idle: Duration::from_secs(3),
        }
    }
}

/// Which side of the session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that dials paths and names the session.
    Connecting,
    /// The side that accepts paths; it never dials.
    Accepting,
}

impl Role {
    /// The other side.
    pub fn peer(self) -> Role {
        match self {
            Role::Connecting => Role::Accepting,
            Role::Accepting => Role::Connecting,
        }
    }
}

/// Something the driver (or the application) should know.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A path can carry data.
    PathUp {
        /// The path.
        path: PathId,
        /// Its network.
        network: Network,
    },
    /// A path is gone; its data was moved to others.
    PathDown {
        /// The path.
        path: PathId,
        /// Its network.
        network: Network,
        /// Why.
        reason: String,
        /// DATA payload bytes it carried out and in, over its life.
        sent: u64,
        /// See `sent`.
        received: u64,
        /// The peer refused this one path (CLOSE code 2) for an order of events that has
        /// passed: dial it again at once, as a join.
        rejoin: bool,
    },
    /// A path stopped acknowledging; its data was moved to others.
    PathTroubled {
        /// The path.
        path: PathId,
    },
    /// A troubled path acknowledged again.
    PathRecovered {
        /// The path.
        path: PathId,
    },
    /// The peer closed the session.
    Closed {
        /// Its reason.
        reason: String,
    },
}

/// Bytes to write on one path: `header` (control frames, or a DATA header) then `payload`.
#[derive(Debug)]
pub struct Transmit {
    /// Written first.
    pub header: Bytes,
    /// Written second (a data chunk, shared with the retransmission buffer: never copied).
    pub payload: Bytes,
}

impl Transmit {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a HELLO says, as the accepting side needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The session the path belongs to.
    pub session: SessionId,
    /// The path's number.
    pub path: PathId,
    /// Whether the session has worked before (a session the acceptor does not know must then
    /// be refused, not started afresh).
    pub join: bool,
    /// Its join proof (TLS paths that join; zeros otherwise).
    pub proof: [u8; 32],
    /// The connecting side's network for the path.
    pub network: NetworkInfo,
}

/// One multi-socket's protocol state.
pub struct Session {
    role: Role,
    id: SessionId,
    cfg: SessionConfig,
    policy: Arc<Policy>,
    paths: BTreeMap<PathId, PathState>,
    events: VecDeque<Event>,
    tx: SendBuffer,
    /// Chunks that no usable path may carry now, by sequence number.
    waiting: BTreeMap<u64, Chunk>,
    /// Which of the peer's sequence numbers arrived (what ACKs say).
    received: Received,
    /// Reliable chunks that arrived new, in order or not.
    arrivals: u64,
    /// The session window last advertised (the first sequence number the peer may not use).
    advertised: u64,
    /// Stream bytes the application has read, all streams, and when the session window was
    /// last widened for them.
    consumed: u64,
    last_window_update: u64,
    streams: BTreeMap<StreamId, StreamState>,
    /// The next stream this side opens.
    next_stream: StreamId,
    /// The highest stream the peer opened; streams it opened below that and not in `streams`
    /// are over.
    peer_max_stream: Option<StreamId>,
    /// Streams the peer opened, not yet accepted.
    incoming: VecDeque<StreamId>,
    /// Credit the peer granted (MAX_STREAM_DATA received): progress for blocked senders.
    credits: usize,
    /// Streams whose reads or writes may go further now (see [`Session::take_wakeups`]).
    wake_read: BTreeSet<StreamId>,
    wake_write: BTreeSet<StreamId>,
    /// Streams whose last send found the session's buffer or window full, in the order they
    /// found it (woken in that order, only as many as the room freed can take).
    blocked: VecDeque<StreamId>,
    closed: Option<String>,
    /// Closed because the peer is gone (not by either side's close).
    aborted: bool,
    /// The secret later paths of a TLS session prove they know: made by the accepting side,
    /// told in WELCOME (see [`Session::join_secret`]).
    join_secret: Option<[u8; 32]>,
    /// When each network last lost a path (by name): selective redundancy.
    lost_at: HashMap<String, Instant>,
    /// Payload bytes sent a second time, on another network, for redundancy.
    redundant_bytes: u64,
    /// Whether a path ever completed its handshake (later paths join, rather than open).
    ever_established: bool,
    trickler: Arc<Trickler>,
}

impl Session {
    /// A new session. The connecting side names it; the accepting side takes the name from
    /// the first HELLO.
    pub fn new(role: Role, id: SessionId, cfg: SessionConfig, policy: Arc<Policy>) -> Session {
        let mut streams = BTreeMap::new();
        // Stream 0, open on both sides: the peer may send up to the initial window on it before
        // our first credit.
        streams.insert(0, StreamState::new(INITIAL_WINDOW, INITIAL_WINDOW, cfg.recv_window));
        Session {
            role,
            id,
            tx: SendBuffer::new(cfg.send_buffer, INITIAL_WINDOW),
            waiting: BTreeMap::new(),
            received: Received::default(),
            arrivals: 0,
            advertised: INITIAL_WINDOW,
            consumed: 0,
            last_window_update: 0,
            streams,
            next_stream: if role == Role::Connecting { 2 } else { 1 },
            peer_max_stream: None,
            incoming: VecDeque::new(),
            credits: 0,
            wake_read: BTreeSet::new(),
            wake_write: BTreeSet::new(),
            blocked: VecDeque::new(),
            cfg,
            policy,
            paths: BTreeMap::new(),
            events: VecDeque::new(),
            closed: None,
            aborted: false,
            ever_established: false,
            join_secret: None,
            lost_at: HashMap::new(),
            redundant_bytes: 0,
            trickler: Arc::new(Trickler::new()),
        }
    }

    /// Sets the join secret the accepting side tells in WELCOME (a TLS listener's sessions).
    pub fn set_join_secret(&mut self, secret: [u8; 32]) {
        self.join_secret = Some(secret);
    }

    /// The session's join secret: on the connecting side, what WELCOME told (None before, and
    /// for sessions without TLS).
    pub fn join_secret(&self) -> Option<[u8; 32]> {
        self.join_secret
    }

    /// Whether a path ever completed its handshake (a new path then joins).
    pub fn ever_established(&self) -> bool {
        self.ever_established
    }

    /// Paces background chunks with `trickler` (shared with the rest of the process, so
    /// foreground traffic anywhere on a network slows background traffic there); by default
    /// the session has its own.
    pub fn set_trickler(&mut self, trickler: Arc<Trickler>) {
        self.trickler = trickler;
    }

    /// The session's name.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.role
    }

    // ----------------------------------------------------------------------------------------
    // Paths

    /// Adds a physical connection. On the connecting side it starts with HELLO and carries data
    /// once WELCOME comes back; on the accepting side (whose listener already read HELLO) it
    /// answers WELCOME and is usable at once.
    pub fn add_path(&mut self, id: PathId, network: Network, now: Instant) {
        self.add_path_with_proof(id, network, now, [0; 32]);
    }

    /// [`Session::add_path`] for a path whose HELLO carries `proof` (a TLS path that joins:
    /// see [`Session::join_secret`]).
    pub fn add_path_with_proof(&mut self, id: PathId, network: Network, now: Instant, proof: [u8; 32]) {
        let established = self.role == Role::Accepting;
        let mut p = PathState::new(network, established, now);
        match self.role {
            Role::Connecting => Frame::Hello {
                version: frame::VERSION,
                session: self.id,
                path: id,
                join: self.ever_established,
                proof,
                network: info_from_network(&p.network, &self.policy),
            }
            .encode(&mut p.control),
            Role::Accepting => {
                let secret = self.join_secret.unwrap_or([0; 32]);
                Frame::Welcome { version: frame::VERSION, session: self.id, path: id, secret }
                    .encode(&mut p.control);
                // Tell the new path what we hold, so a peer retransmitting after a lost path
                // is not left waiting.
                p.ack_now = true;
            }
        }
        let network = p.network.clone();
        self.paths.insert(id, p);
        if established {
            self.path_usable(id, network);
        }
    }

    fn path_usable(&mut self, id: PathId, network: Network) {
        self.events.push_back(Event::PathUp { path: id, network });
        self.copy_inflight_to(id);
        self.rechoose_queued();
    }

    /// A path came up: chunks in flight on other paths whose labels prefer it now are sent
    /// on it too, first. The receiver waits for the oldest bytes in order, and a backlog
    /// written on a slow network (a few hundred ms of it on cellular) would otherwise hold up
    /// everything the returning fast one carries; the cost is one copy of that backlog on the
    /// preferred network, never on the slow one.
    fn copy_inflight_to(&mut self, id: PathId) {
        let mut copies: Vec<Chunk> = Vec::new();
        for (&q, p) in &self.paths {
            if q == id {
                continue;
            }
            for sent in p.inflight.values() {
                let c = &sent.chunk;
                if c.payload_len() > 0 && self.best_path(c.labels, None, false) == Some(id) {
                    copies.push(Chunk { retransmit: true, redundant: true, ..c.clone() });
                }
            }
        }
        copies.sort_by_key(|c| c.seq);
        if let Some(p) = self.paths.get_mut(&id) {
            for c in copies.into_iter().rev() {
                p.queue.push_front(c);
            }
        }
    }

    /// Chooses again for every chunk not yet written anywhere: the waiting ones, and those
    /// queued on a path that may no longer be the best for their labels (a faster network came
    /// back while a slow one held a backlog). Written chunks stay where they are.
    fn rechoose_queued(&mut self) {
        let troubled: Vec<PathId> =
            self.paths.iter().filter(|(_, p)| p.troubled).map(|(&id, _)| id).collect();
        for id in troubled {
            self.move_off(id);
        }
        let mut chunks: Vec<Chunk> = std::mem::take(&mut self.waiting).into_values().collect();
        for p in self.paths.values_mut() {
            chunks.extend(p.queue.drain(..));
        }
        // Keep a chunk's first transmission marked as such (its RTT sample is valid).
        let fresh: HashSet<u64> = chunks.iter().filter(|c| !c.retransmit).map(|c| c.seq).collect();
        self.reassign(chunks);
        for p in self.paths.values_mut() {
            for c in p.queue.iter_mut() {
                if fresh.contains(&c.seq) {
                    c.retransmit = false;
                }
            }
        }
    }

    /// Removes a path whose connection closed or failed (or whose network went down): its data
    /// goes to other paths at once, and the peer is told on another path.
    pub fn remove_path(&mut self, id: PathId, reason: &str, now: Instant) {
        self.remove_path_with(id, reason, now, false);
    }

    fn remove_path_with(&mut self, id: PathId, reason: &str, now: Instant, rejoin: bool) {
        let Some(mut p) = self.paths.remove(&id) else { return };
        if self.closed.is_none() {
            self.lost_at.retain(|_, t| now.saturating_duration_since(*t) < FLAP_MEMORY);
            if self.lost_at.len() < MAX_REMEMBERED_LOSSES || self.lost_at.contains_key(&p.network.name) {
                self.lost_at.insert(p.network.name.clone(), now);
            }
        }
        let chunks = p.take_chunks();
        // The peer learns on every other path, with what we received first: a sender that
        // moves the lost path's data resends only what we lack.
        let ack = (!self.paths.is_empty()).then(|| self.ack_frame());
        for (_, other) in self.paths.iter_mut().filter(|(_, o)| o.established) {
            if let Some(ack) = &ack {
                ack.encode(&mut other.control);
            }
            Frame::PathDown { path: id }.encode(&mut other.control);
        }
        self.events.push_back(Event::PathDown {
            path: id,
            network: p.network,
            reason: reason.to_string(),
            sent: p.bytes_sent,
            received: p.bytes_received,
            rejoin,
        });
        self.reassign(chunks);
    }

    /// Paths and their figures.
    pub fn path_stats(&self) -> Vec<PathStats> {
        self.paths.iter().map(|(&id, p)| p.stats(id)).collect()
    }

    /// The paths, by id.
    pub fn path_ids(&self) -> Vec<PathId> {
        self.paths.keys().copied().collect()
    }

    /// The network of path `id`, if it exists.
    pub fn path_network(&self, id: PathId) -> Option<&Network> {
        self.paths.get(&id).map(|p| &p.network)
    }

    /// The path that `labels` would use now, if any.
    pub fn path_for(&self, labels: Labels) -> Option<PathId> {
        self.best_path(labels, None, false)
    }

    /// The path the policy prefers for `labels` among the usable ones, leaving out `except`;
    /// with `troubled_too`, when no usable path takes them, the preferred established one
    /// that is troubled (a chunk already accepted loses nothing by waiting in a connection
    /// that may come back, and gains nothing by waiting outside it).
    fn best_path(&self, labels: Labels, except: Option<PathId>, troubled_too: bool) -> Option<PathId> {
        let choose = |pick: &dyn Fn(&PathState) -> bool| {
            let usable: Vec<(PathId, Network)> = self
                .paths
                .iter()
                .filter(|&(&id, p)| Some(id) != except && pick(p))
                .map(|(&id, p)| (id, p.network.clone()))
                .collect();
            let networks: Vec<Network> = usable.iter().map(|(_, n)| n.clone()).collect();
            match self.policy.choose(labels, &networks) {
                Decision::Use { candidates, .. } => candidates.first().map(|&i| usable[i].0),
                _ => None,
            }
        };
        choose(&|p: &PathState| p.usable())
            .or_else(|| if troubled_too { choose(&|p: &PathState| p.established) } else { None })
    }

    /// Where an accepted chunk with `labels` goes: a usable path, else a troubled one.
    fn place_on(&self, labels: Labels) -> Option<PathId> {
        self.best_path(labels, None, true)
    }

    /// Moves the chunks of troubled path `id` that a usable path would take there (resent
    /// in pieces); the rest stay, in flight or queued, since nothing better exists for them.
    fn move_off(&mut self, id: PathId) {
        let Some(p) = self.paths.get(&id) else { return };
        let mut labels: Vec<Labels> =
            p.queue.iter().chain(p.inflight.values().map(|s| &s.chunk)).map(|c| c.labels).collect();
        labels.sort_unstable_by_key(|l| l.bits());
        labels.dedup();
        let elsewhere: Vec<Labels> =
            labels.into_iter().filter(|&l| self.best_path(l, Some(id), false).is_some()).collect();
        if elsewhere.is_empty() {
            return;
        }
        let Some(p) = self.paths.get_mut(&id) else { return };
        let moved = p.take_chunks_where(|c| elsewhere.contains(&c.labels));
        self.reassign(moved);
    }

    /// Moves chunks to the paths their labels choose now (before any new data there, since
    /// the receiver may be waiting for them), or to the waiting list.
    fn reassign(&mut self, mut chunks: Vec<Chunk>) {
        chunks.sort_by_key(|c| c.seq);
        let mut per_path: BTreeMap<PathId, Vec<Chunk>> = BTreeMap::new();
        for mut c in chunks {
            if !self.tx.owed(c.seq) {
                continue;
            }
            c.retransmit = true;
            match self.place_on(c.labels) {
                Some(id) => {
                    let piece =
                        self.paths.get(&id).map_or(self.cfg.chunk, |p| p.resend_piece(self.cfg.chunk));
                    per_path.entry(id).or_default().extend(self.tx.recut(c, piece));
                }
                None => {
                    self.waiting.insert(c.seq, c);
                }
            }
        }
        for (id, list) in per_path {
            if let Some(p) = self.paths.get_mut(&id) {
                // Foreground resends first; background ones ahead of queued background, but
                // behind queued foreground (other streams' people are waiting there).
                let (bg, fg): (Vec<Chunk>, Vec<Chunk>) = list.into_iter().partition(|c| c.background());
                let at = p.queue.iter().position(|q| q.background()).unwrap_or(p.queue.len());
                for c in bg.into_iter().rev() {
                    p.queue.insert(at, c);
                }
                for c in fg.into_iter().rev() {
                    p.queue.push_front(c);
                }
            }
        }
    }

    /// Puts a new chunk on the path its labels choose, ahead of queued background chunks
    /// unless it is background itself (ONDEMAND never waits behind a queued bulk transfer),
    /// or on the waiting list.
    fn place(&mut self, c: Chunk) {
        match self.place_on(c.labels).and_then(|id| self.paths.get_mut(&id)) {
            Some(p) => p.enqueue(c),
            None => {
                self.waiting.insert(c.seq, c);
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Streams

    /// Opens a stream of ours; the peer learns of it with its first bytes (or its FIN).
    pub fn open_stream(&mut self) -> Result<StreamId, SendError> {
        self.check_open()?;
        let id = self.next_stream;
        self.next_stream = id.checked_add(2).ok_or(SendError::TooManyStreams)?;
        self.streams.insert(
            id,
            StreamState::new(INITIAL_STREAM_WINDOW, INITIAL_STREAM_WINDOW, self.cfg.stream_window),
        );
        Ok(id)
    }

    /// The next stream the peer opened, if any.
    pub fn accept_stream(&mut self) -> Option<StreamId> {
        self.incoming.pop_front()
    }

    /// Streams open now (0 included).
    pub fn stream_ids(&self) -> Vec<StreamId> {
        self.streams.keys().copied().collect()
    }

    /// The stream `id` for a frame from the peer: opened by it now if new. `None` for a stream
    /// that is over (its late frames are acknowledged and dropped).
    fn peer_stream(&mut self, id: StreamId) -> Result<Option<&mut StreamState>, ProtocolError> {
        if !self.streams.contains_key(&id) {
            let theirs = stream::opened_by(id, self.role.peer());
            if !theirs {
                if id >= self.next_stream {
                    return Err(ProtocolError::UnopenedStream { stream: id });
                }
                return Ok(None);
            }
            if self.peer_max_stream.is_some_and(|m| id <= m) {
                return Ok(None);
            }
            // Opening a stream opens every lower one of the peer's not seen yet: their first
            // frames may come later, over another path.
            let first =
                self.peer_max_stream.map_or(if self.role == Role::Accepting { 2 } else { 1 }, |m| m + 2);
            let new = ((id - first) / 2 + 1) as usize;
            let open = self.streams.keys().filter(|&&s| stream::opened_by(s, self.role.peer())).count();
            if open + new > MAX_STREAMS {
                return Err(ProtocolError::TooManyStreams { limit: MAX_STREAMS });
            }
            self.peer_max_stream = Some(id);
            for k in (first..=id).step_by(2) {
                self.streams.insert(
                    k,
                    StreamState::new(INITIAL_STREAM_WINDOW, INITIAL_STREAM_WINDOW, self.cfg.stream_window),
                );
                self.incoming.push_back(k);
            }
        }
        Ok(self.streams.get_mut(&id))
    }

    /// Whether stream `id` existed and was retired (both halves over): its reads give the
    /// end of stream, its writes `Shutdown`.
    fn retired(&self, id: StreamId) -> bool {
        if id == 0 || self.streams.contains_key(&id) {
            return false;
        }
        if stream::opened_by(id, self.role) {
            id < self.next_stream
        } else {
            self.peer_max_stream.is_some_and(|m| id <= m)
        }
    }

    /// Drops a stream (not 0) whose both halves are over.
    fn maybe_retire(&mut self, id: StreamId) {
        if id != 0 && self.streams.get(&id).is_some_and(|s| s.send.done() && s.recv.done()) {
            self.streams.remove(&id);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Application side

    fn check_open(&self) -> Result<(), SendError> {
        match &self.closed {
            Some(r) if self.aborted => Err(SendError::Reset(r.clone())),
            Some(r) => Err(SendError::Closed(r.clone())),
            None => Ok(()),
        }
    }

    /// Accepts up to the free send buffer from `data` on stream 0 for a path the labels choose.
    /// Returns how many bytes were taken.
    pub fn send(&mut self, data: &[u8], labels: Labels) -> Result<usize, SendError> {
        self.send_on(0, data, labels)
    }

    /// Like [`Session::send`], without copying `data`.
    pub fn send_bytes(&mut self, data: Bytes, labels: Labels) -> Result<usize, SendError> {
        self.send_bytes_on(0, data, labels)
    }

    /// [`Session::send`] on stream `id`.
    pub fn send_on(&mut self, id: StreamId, data: &[u8], labels: Labels) -> Result<usize, SendError> {
        // Check first, so nothing is copied for a call that takes nothing.
        let room = self.room_or_block(id, labels)?;
        let bytes = self.tx.copy_in(data, room);
        self.send_bytes_on(id, bytes, labels)
    }

    /// [`Session::send_room_on`], remembering a stream that found no room so that it is woken
    /// when there is some ([`Session::take_wakeups`]).
    fn room_or_block(&mut self, id: StreamId, labels: Labels) -> Result<usize, SendError> {
        let r = self.send_room_on(id, labels);
        // Blocked by the session (its own window's MAX_STREAM_DATA wakes a stream otherwise).
        if r == Err(SendError::Full) && self.session_room(labels) == 0 && !self.blocked.contains(&id) {
            self.blocked.push_back(id);
        }
        r
    }

    /// How much stream `id` takes now with `labels`, or why nothing.
    /// What the send buffer and the session window take now from a stream with `labels`:
    /// background leaves [`FOREGROUND_RESERVE`] of both to everything else, so bytes that
    /// wait for a network background may use (Wi-Fi, while it is away) never leave a
    /// person's request without room.
    fn session_room(&self, labels: Labels) -> usize {
        let room = self.tx.room();
        if labels.is_background() {
            room.saturating_sub(FOREGROUND_RESERVE.min(self.cfg.send_buffer / 4))
        } else {
            room
        }
    }

    fn send_room_on(&self, id: StreamId, labels: Labels) -> Result<usize, SendError> {
        self.check_open()?;
        if self.retired(id) {
            return Err(SendError::Shutdown);
        }
        let s = self.streams.get(&id).ok_or(SendError::NoStream(id))?;
        if let Some(code) = s.send.stopped {
            return Err(SendError::Stopped(code));
        }
        if s.send.fin.is_some() || s.send.reset.is_some() {
            return Err(SendError::Shutdown);
        }
        self.path_for(labels).ok_or(SendError::NoNetwork)?;
        let room = self.session_room(labels).min(s.send.room());
        if room == 0 {
            return Err(SendError::Full);
        }
        Ok(room)
    }

    /// [`Session::send_bytes`] on stream `id`.
    pub fn send_bytes_on(
        &mut self,
        id: StreamId,
        mut data: Bytes,
        labels: Labels,
    ) -> Result<usize, SendError> {
        let room = self.room_or_block(id, labels)?;
        data.truncate(room);
        let n = data.len();
        let mut offset = match self.streams.get(&id) {
            Some(s) => s.send.next_offset,
            None => return Err(SendError::NoStream(id)),
        };
        while !data.is_empty() {
            let piece = data.split_to(self.cfg.chunk.min(data.len()));
            let len = piece.len() as u64;
            let c = self.tx.push(labels, Body::Data { stream: id, offset, fin: false, data: piece });
            offset += len;
            self.place(c);
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.send.next_offset = offset;
            s.send.labels = labels;
        }
        Ok(n)
    }

    /// The streams whose reads, and those whose writes, may go further since the last call:
    /// a driver wakes only their waiters (all of them when paths change or the session ends).
    pub fn take_wakeups(&mut self) -> (Vec<StreamId>, Vec<StreamId>) {
        (
            std::mem::take(&mut self.wake_read).into_iter().collect(),
            std::mem::take(&mut self.wake_write).into_iter().collect(),
        )
    }

    /// Free bytes in the send buffer (and the session window).
    pub fn send_room(&self) -> usize {
        self.tx.room()
    }

    /// Bytes accepted and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.tx.unacked_bytes()
    }

    /// Grows whenever a chunk arrives that was not here before, in order or not (not as it
    /// is read): a new stream or new bytes of one may be readable. (Streams are independent,
    /// so bytes above a gap in the session's sequence, which only a slower path may fill, can
    /// be readable at once.)
    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }

    /// Grows whenever sending may go further: a chunk acknowledged, or credit granted.
    pub fn acked_count(&self) -> usize {
        self.tx.acked_chunks() + self.credits
    }

    /// Whether everything sent (and every end of stream) is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.tx.all_acked()
    }

    /// Reads the next bytes of stream 0, all with the same labels (a read never mixes two
    /// senders' labels). `Ok((0, _))` is the end of the stream.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, Labels), RecvError> {
        self.recv_on(0, buf)
    }

    /// Like [`Session::recv`] without copying: the next received bytes (at most `max`), all
    /// with the same labels, shared with the receive buffer. An empty result is the end of the
    /// stream.
    pub fn recv_bytes(&mut self, max: usize) -> Result<(Bytes, Labels), RecvError> {
        self.recv_bytes_on(0, max)
    }

    /// [`Session::recv`] on stream `id`.
    pub fn recv_on(&mut self, id: StreamId, buf: &mut [u8]) -> Result<(usize, Labels), RecvError> {
        if self.retired(id) {
            return Ok((0, Labels::NONE));
        }
        let got = self.streams.get_mut(&id).ok_or(RecvError::NoStream(id))?.recv.asm.read(buf);
        match got {
            Some((n, labels)) => {
                self.consumed_on(id, n);
                Ok((n, labels))
            }
            None => self.recv_end(id).map(|()| (0, Labels::NONE)),
        }
    }

    /// [`Session::recv_bytes`] on stream `id`.
    pub fn recv_bytes_on(&mut self, id: StreamId, max: usize) -> Result<(Bytes, Labels), RecvError> {
        if self.retired(id) {
            return Ok((Bytes::new(), Labels::NONE));
        }
        let got = self.streams.get_mut(&id).ok_or(RecvError::NoStream(id))?.recv.asm.read_bytes(max);
        match got {
            Some((b, labels)) => {
                self.consumed_on(id, b.len());
                Ok((b, labels))
            }
            None => self.recv_end(id).map(|()| (Bytes::new(), Labels::NONE)),
        }
    }

    /// Nothing to read on stream `id`: the end of it (`Ok`), or why not.
    fn recv_end(&mut self, id: StreamId) -> Result<(), RecvError> {
        let Some(s) = self.streams.get(&id) else { return Err(RecvError::NoStream(id)) };
        if s.recv.asm.at_fin() {
            self.maybe_retire(id);
            return Ok(());
        }
        if let Some(code) = s.recv.reset {
            if let Some(s) = self.streams.get_mut(&id) {
                s.recv.reset_seen = true;
            }
            self.maybe_retire(id);
            return Err(RecvError::StreamReset(code));
        }
        Err(self.recv_error())
    }

    /// The application read `n` bytes of stream `id`: credit the peer when enough was read.
    fn consumed_on(&mut self, id: StreamId, n: usize) {
        self.consumed += n as u64;
        self.maybe_credit(id);
        self.maybe_window_update();
    }

    /// Sends the peer more credit on stream `id` once a quarter of its window can be added.
    fn maybe_credit(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.recv.stopped || s.recv.reset.is_some() || !s.recv.asm.credit_due() {
            return;
        }
        let max = s.recv.asm.advertise();
        let c = self.tx.push(Labels::ONDEMAND, Body::MaxStreamData { stream: id, max });
        self.place(c);
    }

    fn recv_error(&self) -> RecvError {
        match &self.closed {
            Some(r) if self.aborted => RecvError::Reset(r.clone()),
            Some(r) => RecvError::Closed(r.clone()),
            None => RecvError::WouldBlock,
        }
    }

    /// Whether `recv` would give something on stream 0 (data, its end, or an error).
    pub fn readable(&self) -> bool {
        self.stream_readable(0)
    }

    /// Whether `recv_on(id)` would give something now (data, the end, a reset, or an error).
    pub fn stream_readable(&self, id: StreamId) -> bool {
        match self.streams.get(&id) {
            Some(s) => {
                s.recv.asm.has_data()
                    || s.recv.asm.at_fin()
                    || s.recv.reset.is_some()
                    || self.closed.is_some()
            }
            None => true,
        }
    }

    /// Whether the peer's half of stream `id` is over: read to its end, reset, or stopped (a
    /// stream that no longer exists is over).
    pub fn stream_finished(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_none_or(|s| s.recv.done())
    }

    /// Whether the peer ended stream 0 and everything before the end was read.
    pub fn read_closed(&self) -> bool {
        self.streams.get(&0).is_some_and(|s| s.recv.asm.finished())
    }

    /// Pieces of received data held now, all streams (what a peer cutting its data small could
    /// try to multiply).
    pub fn held_pieces(&self) -> usize {
        self.streams.values().map(|s| s.recv.asm.held_pieces()).sum()
    }

    /// Ends stream 0 after what was sent (half-close). Idempotent.
    pub fn shutdown(&mut self) {
        let _ = self.shutdown_stream(0);
    }

    /// Ends our half of stream `id` after what was sent (FIN). Idempotent.
    pub fn shutdown_stream(&mut self, id: StreamId) -> Result<(), SendError> {
        let s = self.streams.get_mut(&id).ok_or(SendError::NoStream(id))?;
        if s.send.fin.is_some() || s.send.reset.is_some() {
            return Ok(());
        }
        let (offset, labels) = (s.send.next_offset, s.send.labels);
        s.send.fin = Some(offset);
        let c = self.tx.push(labels, Body::Data { stream: id, offset, fin: true, data: Bytes::new() });
        self.place(c);
        Ok(())
    }

    /// Abandons our half of stream `id` with `code`: the peer's reads fail with it; bytes not
    /// yet delivered may never be.
    pub fn reset_stream(&mut self, id: StreamId, code: u32) -> Result<(), SendError> {
        let s = self.streams.get_mut(&id).ok_or(SendError::NoStream(id))?;
        if s.send.reset.is_some() || s.send.end_acked {
            return Ok(());
        }
        s.send.reset = Some(code);
        let final_size = s.send.next_offset;
        let c = self.tx.push(Labels::ONDEMAND, Body::Reset { stream: id, code, final_size });
        self.place(c);
        Ok(())
    }

    /// Stops reading stream `id`: what arrived is dropped, and the peer is asked to reset its
    /// half with `code`.
    pub fn stop_sending(&mut self, id: StreamId, code: u32) -> Result<(), SendError> {
        let s = self.streams.get_mut(&id).ok_or(SendError::NoStream(id))?;
        if s.recv.stopped || s.recv.asm.finished() {
            return Ok(());
        }
        s.recv.stopped = true;
        let unread = s.recv.asm.unread();
        s.recv.asm.discard();
        self.consumed += unread as u64;
        let c = self.tx.push(Labels::ONDEMAND, Body::StopSending { stream: id, code });
        self.place(c);
        self.maybe_retire(id);
        Ok(())
    }

    /// Ends the session without a word to the peer, which is gone for good (every path reset,
    /// every redial refused): what was received can still be read, then reads and sends fail
    /// with [`RecvError::Reset`] / [`SendError::Reset`]. Unacknowledged data is dropped.
    pub fn abort(&mut self, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason.to_string());
        self.aborted = true;
        self.events.push_back(Event::Closed { reason: reason.to_string() });
    }

    /// Closes the session: a CLOSE goes out on every path.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        for p in self.paths.values_mut() {
            Frame::Close { code: 0, reason: reason.to_string() }.encode(&mut p.control);
        }
        self.closed = Some(format!("closed here: {reason}"));
    }

    /// Why the session is closed, if it is.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    fn maybe_window_update(&mut self) {
        // Widen the peer's session window once a quarter of it has been read.
        if self.consumed - self.last_window_update >= self.cfg.recv_window / 4 {
            self.last_window_update = self.consumed;
            if let Some(p) = self.paths.values_mut().filter(|p| p.usable()).max_by_key(|p| p.last_rx) {
                p.ack_now = true;
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Network side

    /// Handles one frame read from path `id`: the one input entry point (the driver decodes
    /// in its reader with a [`FrameDecoder`]; tests and fuzz targets do the same). On error the
    /// path must be closed (and removed); the session goes on.
    pub fn handle_frame(&mut self, id: PathId, f: Frame, now: Instant) -> Result<(), SessionError> {
        let Some(p) = self.paths.get_mut(&id) else { return Ok(()) };
        p.last_rx = now;
        let established = p.established;
        match f {
            Frame::Hello { .. } => return Err(ProtocolError::HelloOnOpenPath.into()),
            Frame::Welcome { version, session, path, secret } => {
                if self.role != Role::Connecting || established {
                    return Err(ProtocolError::UnexpectedWelcome.into());
                }
                if secret != [0; 32] {
                    self.join_secret = Some(secret);
                }
                if version != frame::VERSION || session != self.id || path != id {
                    return Err(ProtocolError::WelcomeMismatch { version, path }.into());
                }
                let network = match self.paths.get_mut(&id) {
                    Some(p) => {
                        p.established = true;
                        p.network.clone()
                    }
                    None => return Ok(()),
                };
                self.ever_established = true;
                self.path_usable(id, network);
            }
            Frame::Close { code: frame::CLOSE_PATH_REFUSED, reason }
                if !established && self.role == Role::Connecting =>
            {
                // This path only (a TLS path that must join with a proof): it is dialled
                // again, as a join once the session is established.
                self.remove_path_with(id, &format!("the peer refused the path: {reason}"), now, true);
            }
            Frame::Close { reason, .. } if !established && self.role == Role::Connecting => {
                // The acceptor refused the session: it does not know it any more (it
                // restarted, and what it had received is gone) or will not have it. No later
                // path can fare better.
                self.abort(&format!("the peer refused the session: {reason}"));
            }
            _ if !established => return Err(ProtocolError::BeforeHandshake { frame: f.name() }.into()),
            Frame::Data { seq, stream, offset, labels, fin, data } => {
                self.on_data(id, seq, stream, offset, labels, fin, data, now)?
            }
            Frame::MaxStreamData { seq, stream, max } => {
                if let Some(s) = self.peer_stream(stream)? {
                    if max > s.send.max {
                        s.send.max = max;
                        self.credits += 1;
                        self.wake_write.insert(stream);
                    }
                }
                self.on_reliable(id, seq, 1, now)?;
            }
            Frame::ResetStream { seq, stream, code, final_size } => {
                if let Some(s) = self.peer_stream(stream)? {
                    if s.recv.reset.is_none() && !s.recv.asm.finished() {
                        s.recv.reset = Some(code);
                        let unread = s.recv.asm.unread();
                        s.recv.asm.discard();
                        self.consumed += unread as u64;
                    }
                    let _ = final_size;
                    self.wake_read.insert(stream);
                    self.maybe_retire(stream);
                }
                self.on_reliable(id, seq, 1, now)?;
            }
            Frame::StopSending { seq, stream, code } => {
                if let Some(s) = self.peer_stream(stream)? {
                    if s.send.stopped.is_none() {
                        s.send.stopped = Some(code);
                    }
                    // The peer reads no more: our half ends with a reset.
                    let _ = self.reset_stream(stream, code);
                    self.wake_write.insert(stream);
                }
                self.on_reliable(id, seq, 1, now)?;
            }
            Frame::Ack { cumulative, window, ranges } => self.on_ack(id, cumulative, window, &ranges, now),
            Frame::Ping => {
                if let Some(p) = self.paths.get_mut(&id) {
                    p.ack_now = true;
                }
            }
            Frame::PathDown { path } => {
                if path != id && self.paths.contains_key(&path) {
                    self.remove_path(path, "the peer reports it down", now);
                }
            }
            Frame::Close { reason, .. } => {
                if self.closed.is_none() {
                    self.closed = Some(format!("closed by the peer: {reason}"));
                    self.events.push_back(Event::Closed { reason });
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_data(
        &mut self,
        id: PathId,
        seq: u64,
        stream: StreamId,
        offset: u64,
        labels: Labels,
        fin: bool,
        data: Bytes,
        now: Instant,
    ) -> Result<(), SessionError> {
        let len = data.len();
        if offset.checked_add(len as u64).is_none() {
            return Err(ProtocolError::RangeOverflow { start: offset, len: len as u64 }.into());
        }
        if seq.checked_add(len.max(1) as u64).is_none() {
            return Err(ProtocolError::RangeOverflow { start: seq, len: len as u64 }.into());
        }
        let kept = match self.peer_stream(stream)? {
            // Over, reset or stopped: acknowledged and dropped.
            None => true,
            Some(s) if s.recv.stopped || s.recv.reset.is_some() => true,
            Some(s) => {
                let end = offset + len as u64;
                let kept = s.recv.asm.insert(offset, labels, data)?;
                if fin {
                    s.recv.asm.set_fin(end)?;
                }
                kept
            }
        };
        if let Some(p) = self.paths.get_mut(&id) {
            if len > 0 && !labels.contains(Labels::BACKGROUND) {
                self.trickler.foreground(&p.network.interface, now);
            }
            p.bytes_received += len as u64;
        }
        if kept {
            self.on_reliable(id, seq, len.max(1) as u64, now)?;
        }
        self.wake_read.insert(stream);
        self.maybe_credit(stream);
        Ok(())
    }

    /// A reliable frame at `[seq, seq + len)` arrived on path `id`: it is acknowledged there,
    /// every few frames at once, otherwise within `ack_delay` (enough acknowledgements to keep
    /// the sender's window open without a wakeup per chunk).
    fn on_reliable(&mut self, id: PathId, seq: u64, len: u64, now: Instant) -> Result<(), ProtocolError> {
        let end = seq.checked_add(len).ok_or(ProtocolError::RangeOverflow { start: seq, len })?;
        if !self.received.insert(seq, end) {
            return Ok(());
        }
        self.arrivals += 1;
        if let Some(p) = self.paths.get_mut(&id) {
            p.data_since_ack += 1;
            if p.data_since_ack >= ACK_EVERY {
                p.ack_now = true;
            } else if p.ack_due.is_none() {
                p.ack_due = Some(now + self.cfg.ack_delay);
            }
        }
        Ok(())
    }

    /// Room freed: wakes the streams that found none, oldest first, as many as the room can
    /// take (each at most its own window) — not a hundred writers for one chunk's worth. With
    /// nothing left unacknowledged no acknowledgement will come to wake the rest, so all go.
    fn wake_blocked(&mut self) {
        if self.tx.all_acked() {
            self.wake_write.extend(self.blocked.drain(..));
            return;
        }
        let mut budget = self.tx.room();
        while budget > 0 {
            let Some(id) = self.blocked.pop_front() else { break };
            let wants = self.streams.get(&id).map_or(0, |s| s.send.room());
            budget = budget.saturating_sub(wants.max(1));
            self.wake_write.insert(id);
        }
    }

    fn on_ack(&mut self, on: PathId, cumulative: u64, window: u64, ranges: &[(u64, u64)], now: Instant) {
        let waiting = &mut self.waiting;
        let mut ended = Vec::new();
        let before = (self.tx.acked_chunks(), self.tx.peer_window());
        self.tx.on_ack(cumulative, window, ranges, |seq, ends| {
            waiting.remove(&seq);
            ended.extend(ends);
        });
        if (self.tx.acked_chunks(), self.tx.peer_window()) != before {
            self.wake_blocked();
        }
        for s in ended {
            if let Some(st) = self.streams.get_mut(&s) {
                st.send.end_acked = true;
            }
            self.maybe_retire(s);
        }
        // Per path: progress, RTT, recovery.
        let mut recovered = Vec::new();
        for (&id, p) in self.paths.iter_mut() {
            let done: Vec<u64> = p
                .inflight
                .iter()
                .filter(|(q, s)| send::covered(cumulative, ranges, **q, s.chunk.len()))
                .map(|(&q, _)| q)
                .collect();
            // Progress: its own data was acknowledged, or (idle) it answered at all. An ACK
            // arriving on a path whose data is not getting through proves nothing about it.
            if !done.is_empty() || (id == on && p.inflight.is_empty()) {
                p.progress_at = now;
            }
            for q in done {
                if let Some(sent) = p.acked(q)
                    && !sent.chunk.retransmit
                {
                    p.sample_rtt(now.saturating_duration_since(sent.at));
                }
            }
            if id == on {
                p.ping_at = None;
                if p.troubled {
                    p.troubled = false;
                    recovered.push(id);
                }
            }
        }
        let any_recovered = !recovered.is_empty();
        for id in recovered {
            self.events.push_back(Event::PathRecovered { path: id });
        }
        if any_recovered {
            self.rechoose_queued();
        }
    }

    /// The ACK to send now: what arrived, and the session window — widened to what arrived
    /// plus the window, less what is held unread.
    fn ack_frame(&mut self) -> Frame {
        let unread: u64 = self.streams.values().map(|s| s.recv.asm.unread() as u64).sum();
        let cumulative = self.received.cumulative();
        self.advertised = self.advertised.max((cumulative + self.cfg.recv_window).saturating_sub(unread));
        Frame::Ack { cumulative, window: self.advertised, ranges: self.received.ranges() }
    }

    /// A one-line summary of the sending state, for debugging.
    pub fn debug_summary(&self) -> String {
        let paths: Vec<String> = self
            .paths
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id}:{} est={} trb={} q={} qfront={:?} infl={} ctl={}",
                    p.network.name,
                    p.established,
                    p.troubled,
                    p.queue.len(),
                    p.queue.front().map(|c| (c.seq, c.end())),
                    p.inflight.len(),
                    p.control.len()
                )
            })
            .collect();
        format!(
            "next={} unacked={} buffered={} waiting={} peer_window={} streams={} paths=[{}]",
            self.tx.next_seq(),
            self.tx.unacked_chunks(),
            self.tx.unacked_bytes(),
            self.waiting.len(),
            self.tx.peer_window(),
            self.streams.len(),
            paths.join("; ")
        )
    }

    /// Whether [`Session::poll_transmit`] would give something for path `id` now (so a driver
    /// wakes a path's writer only when there is work).
    pub fn wants_transmit(&self, id: PathId) -> bool {
        let Some(p) = self.paths.get(&id) else { return false };
        if p.ack_now || !p.control.is_empty() {
            return true;
        }
        if !p.established || self.closed.is_some() {
            return false;
        }
        let Some(front) = p.queue.front() else { return false };
        !self.tx.owed(front.seq) || p.paced_until.is_none() || !front.background()
    }

    /// The next bytes to write on path `id`, or `None` when it has nothing to send now.
    pub fn poll_transmit(&mut self, id: PathId, now: Instant) -> Option<Transmit> {
        if self.paths.get(&id).is_some_and(|p| p.ack_now) {
            let ack = self.ack_frame();
            let p = self.paths.get_mut(&id)?;
            ack.encode(&mut p.control);
            p.ack_now = false;
            p.ack_due = None;
            p.data_since_ack = 0;
        }
        let p = self.paths.get_mut(&id)?;
        if !p.control.is_empty() {
            return Some(Transmit { header: p.control.split().freeze(), payload: Bytes::new() });
        }
        // Troubled paths too: what is queued there has nowhere better to go.
        if !p.established || self.closed.is_some() {
            return None;
        }
        while p.queue.front().is_some_and(|c| !self.tx.owed(c.seq)) {
            p.queue.pop_front();
        }
        let front = p.queue.front()?;
        if front.background() {
            let wait = match p.paced_until {
                Some(t) if t > now => Some(t - now),
                _ => self.trickler.background_whole(&p.network, Direction::Up, front.payload_len(), now),
            };
            p.paced_until = wait.map(|w| now + w);
            if p.paced_until.is_some() {
                return None;
            }
        }
        let c = p.queue.pop_front()?;
        // Foreground data starts pacing background traffic there; control chunks and a bare
        // FIN do not.
        if !c.background() && c.payload_len() > 0 {
            self.trickler.foreground(&p.network.interface, now);
        }
        let (header, payload) = match &c.body {
            Body::Data { stream, offset, fin, data } => {
                // Headers are cut from one buffer a path reuses: no allocation per chunk.
                if p.headers.capacity() - p.headers.len() < frame::DATA_HEADER {
                    p.headers.reserve(256 * frame::DATA_HEADER);
                }
                p.headers.extend_from_slice(&frame::encode_data_header(
                    c.seq,
                    *stream,
                    *offset,
                    c.labels,
                    *fin,
                    data.len(),
                ));
                (p.headers.split().freeze(), data.clone())
            }
            _ => {
                let mut out = BytesMut::new();
                if let Some(f) = c.control_frame() {
                    f.encode(&mut out);
                }
                (out.freeze(), Bytes::new())
            }
        };
        if p.inflight.is_empty() {
            p.progress_at = now;
        }
        p.bytes_sent += payload.len() as u64;
        // Selective redundancy (libcmm's "redundant when unsure"): an ONDEMAND chunk on a
        // network that lost a path lately also goes out on a second network; the receiver keeps
        // whichever copy comes first. Background traffic never pays for it.
        let unsure = !c.redundant
            && c.labels.contains(Labels::ONDEMAND)
            && c.payload_len() > 0
            && self
                .lost_at
                .get(&p.network.name)
                .is_some_and(|t| now.saturating_duration_since(*t) < FLAP_MEMORY);
        let copy = unsure.then(|| Chunk { redundant: true, retransmit: true, ..c.clone() });
        p.sent(c, now);
        if let Some(copy) = copy
            && let Some(q) = self.best_path(copy.labels, Some(id), false)
            && let Some(other) = self.paths.get_mut(&q)
        {
            self.redundant_bytes += copy.payload_len() as u64;
            other.enqueue(copy);
        }
        Some(Transmit { header, payload })
    }

    /// Payload bytes sent a second time on another network for redundancy (ONDEMAND chunks
    /// on a network that lost a path in the last [`FLAP_MEMORY`]).
    pub fn redundant_bytes(&self) -> u64 {
        self.redundant_bytes
    }

    /// When [`Session::handle_timeout`] should run next: the earliest of every path's timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.paths.values().flat_map(|p| Timer::ALL.iter().filter_map(|t| t.deadline(p, &self.cfg))).min()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<(PathId, Timer)> = self
            .paths
            .iter()
            .flat_map(|(&id, p)| {
                Timer::ALL
                    .iter()
                    .filter(|t| t.deadline(p, &self.cfg).is_some_and(|d| d <= now))
                    .map(move |&t| (id, t))
            })
            .collect();
        let mut troubled = Vec::new();
        for (id, timer) in due {
            self.on_timer(id, timer, now, &mut troubled);
        }
        for id in troubled {
            self.move_off(id);
        }
    }

    /// What each timer does; `troubled` collects the paths that became troubled, whose chunks
    /// move once every timer ran.
    fn on_timer(&mut self, id: PathId, timer: Timer, now: Instant, troubled: &mut Vec<PathId>) {
        let Some(p) = self.paths.get_mut(&id) else { return };
        match timer {
            Timer::Ack => {
                // Due now: it goes out with the path's next write.
                p.ack_now = true;
                p.ack_due = None;
            }
            Timer::Pace => p.paced_until = None,
            Timer::Trouble => {
                p.troubled = true;
                troubled.push(id);
                Frame::Ping.encode(&mut p.control);
                p.ping_at = Some(now);
                self.events.push_back(Event::PathTroubled { path: id });
            }
            Timer::Probe => {
                // Keep probing: an acknowledgement on it brings it back.
                Frame::Ping.encode(&mut p.control);
                p.ping_at = Some(now);
            }
            Timer::IdlePing => {
                Frame::Ping.encode(&mut p.control);
                p.ping_at = Some(now);
                p.progress_at = now;
            }
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Reads the HELLO that opens a path on the accepting side. Returns the session, path and
/// network it names and whether it joins a session that worked before; the decoder keeps
/// whatever followed it.
pub fn read_hello(decoder: &mut FrameDecoder) -> Result<Option<Hello>, SessionError> {
    match decoder.next_frame()? {
        None => Ok(None),
        Some(Frame::Hello { version, session, path, join, proof, network }) => {
            if version != frame::VERSION {
                return Err(ProtocolError::UnsupportedVersion { version }.into());
            }
            Ok(Some(Hello { session, path, join, proof, network }))
        }
        Some(other) => Err(ProtocolError::ExpectedHello { got: other.name() }.into()),
    }
}

#[cfg(test)]
mod tests;
