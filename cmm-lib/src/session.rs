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
//! Driving it: after any call, write what [`Session::poll_transmit`] gives for each path, arm
//! a timer for [`Session::poll_timeout`] and call [`Session::handle_timeout`] when it fires,
//! and act on [`Session::poll_event`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cmm_policy::{Decision, Figures, Labels, Network, Policy};

use crate::frame::{self, Frame, FrameDecoder, FrameError, NetworkInfo, PathId, SessionId};
use crate::trickle::{Direction, Trickler};

/// DATA frames received on a path before an acknowledgement goes out at once.
const ACK_EVERY: u32 = 8;

/// Received pieces shorter than this are copied out of the read buffer they came in (a small
/// slice must not keep a large buffer alive), and in-order ones of the same labels are joined,
/// so the memory that received bytes hold stays close to their number however a peer cuts
/// them (quinn's `Assembler` counts allocated against buffered bytes for the same reason).
const COPY_BELOW: usize = 32 * 1024;
/// Largest joined run of small in-order pieces.
const JOIN_MAX: usize = 64 * 1024;
/// Most out-of-order pieces held; more are dropped unacknowledged (the sender resends them),
/// so a peer sending tiny pieces with gaps cannot grow the reassembly map without bound.
const MAX_OUT_OF_ORDER: usize = 4096;

/// The receive window every session starts with, before the peer's first ACK widens it.
pub const INITIAL_WINDOW: u64 = 1 << 20;

/// Tunables of a session. The defaults suit links from 1 Mbit/s to loopback.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most bytes accepted from the application and not yet acknowledged.
    pub send_buffer: usize,
    /// Most bytes received and not yet read by the application.
    pub recv_window: u64,
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

/// Why `send` took nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No live path's network fits the labels.
    #[error("no network matches the labels")]
    NoNetwork,
    /// The send buffer is full; wait for acknowledgements.
    #[error("send buffer full")]
    Full,
    /// The stream was shut down for writing.
    #[error("the stream is shut down for writing")]
    Shutdown,
    /// The session is closed.
    #[error("the session is closed: {0}")]
    Closed(String),
    /// The peer is gone for good (see [`Session::abort`]).
    #[error("{0}")]
    Reset(String),
}

/// Why `recv` gave nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing to read yet.
    WouldBlock,
    /// The session closed before the end of the stream.
    Closed(String),
    /// The peer is gone for good (see [`Session::abort`]).
    Reset(String),
}

/// A protocol violation on one path; the driver closes that path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// A valid frame that makes no sense here.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Per-path figures for applications and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct PathStats {
    /// The path.
    pub path: PathId,
    /// Its network.
    pub network: Network,
    /// Whether it has completed its handshake.
    pub established: bool,
    /// Whether it is troubled now.
    pub troubled: bool,
    /// DATA payload bytes written on it (retransmissions included).
    pub bytes_sent: u64,
    /// DATA payload bytes received on it (duplicates included).
    pub bytes_received: u64,
    /// Smoothed round-trip time of acknowledgements on it.
    pub srtt: Option<Duration>,
}

#[derive(Clone, Debug)]
struct Chunk {
    offset: u64,
    labels: Labels,
    data: Bytes,
    retransmit: bool,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

#[derive(Debug)]
struct Sent {
    chunk: Chunk,
    at: Instant,
}

struct PathState {
    network: Network,
    established: bool,
    decoder: FrameDecoder,
    control: BytesMut,
    ack_now: bool,
    ack_due: Option<Instant>,
    data_since_ack: u32,
    queue: VecDeque<Chunk>,
    inflight: BTreeMap<u64, Sent>,
    progress_at: Instant,
    ping_at: Option<Instant>,
    last_rx: Instant,
    srtt: Option<Duration>,
    troubled: bool,
    fin_sent: bool,
    bytes_sent: u64,
    bytes_received: u64,
    /// Background chunks wait for the trickler until then.
    paced_until: Option<Instant>,
}

impl PathState {
    fn new(network: Network, established: bool, now: Instant) -> PathState {
        PathState {
            network,
            established,
            decoder: FrameDecoder::new(),
            control: BytesMut::new(),
            ack_now: false,
            ack_due: None,
            data_since_ack: 0,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            progress_at: now,
            ping_at: None,
            last_rx: now,
            srtt: None,
            troubled: false,
            fin_sent: false,
            bytes_sent: 0,
            bytes_received: 0,
            paced_until: None,
        }
    }

    fn usable(&self) -> bool {
        self.established && !self.troubled
    }

    fn busy(&self) -> bool {
        !self.inflight.is_empty() || self.ping_at.is_some()
    }

    fn trouble_timeout(&self, cfg: &SessionConfig) -> Duration {
        let rtt = self.srtt.unwrap_or_else(|| self.network.rtt());
        (rtt * 3 + cfg.ack_delay).max(cfg.min_trouble)
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
    /// The connecting side's network for the path.
    pub network: NetworkInfo,
}

/// A network as the accepting side knows it: described by the peer in HELLO.
pub fn network_from_info(info: &NetworkInfo, path: PathId) -> Network {
    let mut n = Network::new(&info.name, &format!("{}#{path}", info.name), info.kind);
    n.metered = info.metered;
    let opt = |v: u64| (v != 0).then_some(v);
    n.declared = Figures {
        // The peer's down is our up, and the other way round.
        bandwidth_down: opt(info.bandwidth_up),
        bandwidth_up: opt(info.bandwidth_down),
        rtt: (info.rtt_us != 0).then(|| Duration::from_micros(u64::from(info.rtt_us))),
    };
    n
}

/// How the connecting side describes one of its networks in HELLO.
pub fn info_from_network(n: &Network) -> NetworkInfo {
    let (down, up, rtt) = n.figures();
    NetworkInfo {
        name: n.name.clone(),
        kind: n.kind,
        metered: n.metered,
        bandwidth_down: down,
        bandwidth_up: up,
        rtt_us: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
    }
}

/// One multi-socket's protocol state.
pub struct Session {
    role: Role,
    id: SessionId,
    cfg: SessionConfig,
    policy: Arc<Policy>,
    paths: BTreeMap<PathId, PathState>,
    events: VecDeque<Event>,
    // Sending.
    next_offset: u64,
    /// Every chunk not yet acknowledged: offset → length. The authority on what is still owed.
    unacked: BTreeMap<u64, usize>,
    send_region: BytesMut,
    acked_chunks: usize,
    buffered: usize,
    /// Chunks that no usable path may carry now, by offset.
    waiting: BTreeMap<u64, Chunk>,
    peer_window: u64,
    fin: Option<u64>,
    fin_acked: bool,
    // Receiving.
    rx_cumulative: u64,
    rx_ooo: BTreeMap<u64, (Bytes, Labels)>,
    ready: VecDeque<(Bytes, Labels)>,
    /// Small in-order pieces being joined; read after `ready`.
    ready_tail: Option<(BytesMut, Labels)>,
    consumed: u64,
    advertised: u64,
    last_window_update: u64,
    peer_fin: Option<u64>,
    closed: Option<String>,
    /// Closed because the peer is gone (not by either side's close).
    aborted: bool,
    /// Whether a path ever completed its handshake (later paths join, rather than open).
    ever_established: bool,
    trickler: Arc<Trickler>,
}

impl Session {
    /// A new session. The connecting side names it; the accepting side takes the name from
    /// the first HELLO.
    pub fn new(role: Role, id: SessionId, cfg: SessionConfig, policy: Arc<Policy>) -> Session {
        // The peer may send up to the initial window before our first ACK widens it.
        let advertised = INITIAL_WINDOW;
        Session {
            role,
            id,
            cfg,
            policy,
            paths: BTreeMap::new(),
            events: VecDeque::new(),
            next_offset: 0,
            unacked: BTreeMap::new(),
            send_region: BytesMut::new(),
            acked_chunks: 0,
            buffered: 0,
            waiting: BTreeMap::new(),
            peer_window: INITIAL_WINDOW,
            fin: None,
            fin_acked: false,
            rx_cumulative: 0,
            rx_ooo: BTreeMap::new(),
            ready: VecDeque::new(),
            ready_tail: None,
            consumed: 0,
            advertised,
            last_window_update: 0,
            peer_fin: None,
            closed: None,
            aborted: false,
            ever_established: false,
            trickler: Arc::new(Trickler::new()),
        }
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
        let established = self.role == Role::Accepting;
        let mut p = PathState::new(network, established, now);
        match self.role {
            Role::Connecting => Frame::Hello {
                version: frame::VERSION,
                session: self.id,
                path: id,
                join: self.ever_established,
                network: info_from_network(&p.network),
            }
            .encode(&mut p.control),
            Role::Accepting => {
                Frame::Welcome { version: frame::VERSION, session: self.id, path: id }.encode(&mut p.control);
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
        if let Some(p) = self.paths.get_mut(&id) {
            p.fin_sent = false;
        }
        self.rechoose_queued();
    }

    /// Chooses again for every chunk not yet written anywhere: the waiting ones, and those
    /// queued on a path that may no longer be the best for their labels (a faster network came
    /// back while a slow one held a backlog). Written chunks stay where they are.
    fn rechoose_queued(&mut self) {
        let mut chunks: Vec<Chunk> = std::mem::take(&mut self.waiting).into_values().collect();
        for p in self.paths.values_mut() {
            chunks.extend(p.queue.drain(..));
        }
        // Keep a chunk's first transmission marked as such (its RTT sample is valid).
        let fresh: std::collections::HashSet<u64> =
            chunks.iter().filter(|c| !c.retransmit).map(|c| c.offset).collect();
        self.reassign(chunks);
        for p in self.paths.values_mut() {
            for c in p.queue.iter_mut() {
                if fresh.contains(&c.offset) {
                    c.retransmit = false;
                }
            }
        }
    }

    /// Removes a path whose connection closed or failed (or whose network went down): its data
    /// goes to other paths at once, and the peer is told on another path.
    pub fn remove_path(&mut self, id: PathId, reason: &str, _now: Instant) {
        let Some(mut p) = self.paths.remove(&id) else { return };
        let mut chunks: Vec<Chunk> = p.queue.drain(..).collect();
        chunks.extend(std::mem::take(&mut p.inflight).into_values().map(|s| s.chunk));
        let had_ack = p.ack_now || p.ack_due.is_some();
        for (_, other) in self.paths.iter_mut().filter(|(_, o)| o.established) {
            Frame::PathDown { path: id }.encode(&mut other.control);
            other.fin_sent = false;
        }
        if had_ack && let Some((_, other)) = self.paths.iter_mut().find(|(_, o)| o.established) {
            other.ack_now = true;
        }
        self.events.push_back(Event::PathDown {
            path: id,
            network: p.network,
            reason: reason.to_string(),
            sent: p.bytes_sent,
            received: p.bytes_received,
        });
        self.reassign(chunks);
    }

    /// Paths and their figures.
    pub fn path_stats(&self) -> Vec<PathStats> {
        self.paths
            .iter()
            .map(|(&id, p)| PathStats {
                path: id,
                network: p.network.clone(),
                established: p.established,
                troubled: p.troubled,
                bytes_sent: p.bytes_sent,
                bytes_received: p.bytes_received,
                srtt: p.srtt,
            })
            .collect()
    }

    /// The paths, by id.
    pub fn path_ids(&self) -> Vec<PathId> {
        self.paths.keys().copied().collect()
    }

    /// The path that `labels` would use now, if any.
    pub fn path_for(&self, labels: Labels) -> Option<PathId> {
        let usable: Vec<(PathId, Network)> =
            self.paths.iter().filter(|(_, p)| p.usable()).map(|(&id, p)| (id, p.network.clone())).collect();
        let networks: Vec<Network> = usable.iter().map(|(_, n)| n.clone()).collect();
        match self.policy.choose(labels, &networks) {
            Decision::Use { candidates, .. } => candidates.first().map(|&i| usable[i].0),
            _ => None,
        }
    }

    /// Moves chunks to the paths their labels choose now (before any new data there, since
    /// the receiver may be waiting for them), or to the waiting list.
    fn reassign(&mut self, mut chunks: Vec<Chunk>) {
        chunks.sort_by_key(|c| c.offset);
        let mut per_path: BTreeMap<PathId, Vec<Chunk>> = BTreeMap::new();
        for mut c in chunks {
            if !self.unacked.contains_key(&c.offset) {
                continue;
            }
            c.retransmit = true;
            match self.path_for(c.labels) {
                Some(p) => per_path.entry(p).or_default().push(c),
                None => {
                    self.waiting.insert(c.offset, c);
                }
            }
        }
        for (id, list) in per_path {
            if let Some(p) = self.paths.get_mut(&id) {
                for c in list.into_iter().rev() {
                    p.queue.push_front(c);
                }
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Application side

    /// Accepts up to the free send buffer from `data` for a path the labels choose. Returns
    /// how many bytes were taken.
    pub fn send(&mut self, data: &[u8], labels: Labels) -> Result<usize, SendError> {
        // Check first, so nothing is copied for a call that takes nothing.
        self.check_send(labels)?;
        let n = data.len().min(self.send_room());
        // Copied into one region that is reused once its chunks are acknowledged: no
        // allocation per chunk on the hot path.
        self.send_region.reserve(n.max(1 << 20));
        self.send_region.extend_from_slice(&data[..n]);
        let bytes = self.send_region.split().freeze();
        self.send_bytes(bytes, labels)
    }

    fn check_send(&self, labels: Labels) -> Result<PathId, SendError> {
        if let Some(r) = &self.closed {
            return Err(if self.aborted {
                SendError::Reset(r.clone())
            } else {
                SendError::Closed(r.clone())
            });
        }
        if self.fin.is_some() {
            return Err(SendError::Shutdown);
        }
        let path = self.path_for(labels).ok_or(SendError::NoNetwork)?;
        if self.send_room() == 0 {
            return Err(SendError::Full);
        }
        Ok(path)
    }

    /// Like [`Session::send`], without copying `data`.
    pub fn send_bytes(&mut self, mut data: Bytes, labels: Labels) -> Result<usize, SendError> {
        let path = self.check_send(labels)?;
        let room = self.send_room();
        if data.len() > room {
            data.truncate(room);
        }
        let n = data.len();
        let p = self.paths.get_mut(&path).ok_or(SendError::NoNetwork)?;
        while !data.is_empty() {
            let piece = data.split_to(self.cfg.chunk.min(data.len()));
            let offset = self.next_offset;
            self.next_offset += piece.len() as u64;
            self.unacked.insert(offset, piece.len());
            p.queue.push_back(Chunk { offset, labels, data: piece, retransmit: false });
        }
        self.buffered += n;
        Ok(n)
    }

    /// Free bytes in the send buffer.
    pub fn send_room(&self) -> usize {
        self.cfg.send_buffer.saturating_sub(self.buffered)
    }

    /// Bytes accepted and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.buffered
    }

    /// Stream bytes received in order so far (grows as data arrives, not as it is read).
    pub fn received_bytes(&self) -> u64 {
        self.rx_cumulative
    }

    /// How many chunks the peer has acknowledged so far (grows with every acknowledgement
    /// that frees send buffer).
    pub fn acked_count(&self) -> usize {
        self.acked_chunks
    }

    /// Whether everything sent (and the end of stream, if shut down) is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.unacked.is_empty() && (self.fin.is_none() || self.fin_acked)
    }

    /// Reads the next bytes, all with the same labels (a read never mixes two senders' labels).
    /// `Ok((0, _))` is the end of the stream.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, Labels), RecvError> {
        self.flush_tail();
        let Some((_, labels)) = self.ready.front() else {
            if self.peer_fin == Some(self.rx_cumulative) {
                return Ok((0, Labels::NONE));
            }
            return Err(self.recv_error());
        };
        let labels = *labels;
        let mut n = 0;
        while n < buf.len() {
            let Some((data, l)) = self.ready.front_mut() else { break };
            if *l != labels {
                break;
            }
            let k = data.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&data[..k]);
            n += k;
            if k == data.len() {
                self.ready.pop_front();
            } else {
                let _ = data.split_to(k);
            }
        }
        self.consumed += n as u64;
        self.maybe_window_update();
        Ok((n, labels))
    }

    /// Like [`Session::recv`] without copying: the next received bytes (at most `max`), all
    /// with the same labels, shared with the receive buffer. An empty result is the end of the
    /// stream.
    pub fn recv_bytes(&mut self, max: usize) -> Result<(Bytes, Labels), RecvError> {
        self.flush_tail();
        let Some((data, labels)) = self.ready.front_mut() else {
            if self.peer_fin == Some(self.rx_cumulative) {
                return Ok((Bytes::new(), Labels::NONE));
            }
            return Err(self.recv_error());
        };
        let labels = *labels;
        let out = if data.len() <= max {
            self.ready.pop_front().map(|(d, _)| d).unwrap_or_default()
        } else {
            data.split_to(max)
        };
        self.consumed += out.len() as u64;
        self.maybe_window_update();
        Ok((out, labels))
    }

    /// Whether `recv` would give something (data, or the end of the stream).
    pub fn readable(&self) -> bool {
        !self.ready.is_empty()
            || self.ready_tail.is_some()
            || self.peer_fin == Some(self.rx_cumulative)
            || self.closed.is_some()
    }

    /// Whether the peer ended its stream and everything before the end was read.
    pub fn read_closed(&self) -> bool {
        self.ready.is_empty() && self.ready_tail.is_none() && self.peer_fin == Some(self.rx_cumulative)
    }

    /// Ends our stream after what was sent (half-close). Idempotent.
    pub fn shutdown(&mut self) {
        if self.fin.is_none() {
            self.fin = Some(self.next_offset);
            for p in self.paths.values_mut() {
                p.fin_sent = false;
            }
        }
    }

    fn recv_error(&self) -> RecvError {
        match &self.closed {
            Some(r) if self.aborted => RecvError::Reset(r.clone()),
            Some(r) => RecvError::Closed(r.clone()),
            None => RecvError::WouldBlock,
        }
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
        // Widen the peer's window once a quarter of it has been read.
        if self.consumed - self.last_window_update >= self.cfg.recv_window / 4 {
            self.last_window_update = self.consumed;
            if let Some(p) = self.paths.values_mut().filter(|p| p.usable()).max_by_key(|p| p.last_rx) {
                p.ack_now = true;
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Network side

    /// Handles bytes read from path `id`. On error the path must be closed (and removed).
    pub fn handle_input(&mut self, id: PathId, data: &[u8], now: Instant) -> Result<(), SessionError> {
        self.handle_input_owned(id, BytesMut::from(data), now)
    }

    /// Like [`Session::handle_input`], taking the read buffer itself: received data is then
    /// kept without copying it.
    pub fn handle_input_owned(
        &mut self,
        id: PathId,
        data: BytesMut,
        now: Instant,
    ) -> Result<(), SessionError> {
        let Some(p) = self.paths.get_mut(&id) else { return Ok(()) };
        p.last_rx = now;
        p.decoder.push_owned(data);
        let mut decoder = std::mem::take(&mut p.decoder);
        let result = loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    if let Err(e) = self.on_frame(id, f, now) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(SessionError::Frame(e)),
            }
        };
        if let Some(p) = self.paths.get_mut(&id) {
            p.decoder = decoder;
        }
        result
    }

    /// Handles one frame already decoded from path `id` (drivers that decode in their reader
    /// use this; [`Session::handle_input`] decodes itself). On error the path must be closed.
    pub fn handle_frame(&mut self, id: PathId, f: Frame, now: Instant) -> Result<(), SessionError> {
        match self.paths.get_mut(&id) {
            Some(p) => p.last_rx = now,
            None => return Ok(()),
        }
        self.on_frame(id, f, now)
    }

    fn on_frame(&mut self, id: PathId, f: Frame, now: Instant) -> Result<(), SessionError> {
        let established = self.paths.get(&id).is_some_and(|p| p.established);
        match f {
            Frame::Hello { .. } => return Err(SessionError::Protocol("HELLO on an open path".into())),
            Frame::Welcome { version, session, path } => {
                if self.role != Role::Connecting || established {
                    return Err(SessionError::Protocol("unexpected WELCOME".into()));
                }
                if version != frame::VERSION || session != self.id || path != id {
                    return Err(SessionError::Protocol(format!(
                        "WELCOME for version {version}, session {session:?}, path {path} does not match"
                    )));
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
            Frame::Close { reason, .. } if !established && self.role == Role::Connecting => {
                // The acceptor refused the path: it does not know this session any more (it
                // restarted, and what it had received is gone) or will not have it. No later
                // path can fare better.
                self.abort(&format!("the peer refused the session: {reason}"));
            }
            _ if !established => {
                return Err(SessionError::Protocol(format!("{} before the handshake", f.name())));
            }
            Frame::Data { offset, labels, data } => self.on_data(id, offset, labels, data, now)?,
            Frame::Ack { cumulative, window, ranges } => self.on_ack(id, cumulative, window, &ranges, now),
            Frame::Ping => {
                if let Some(p) = self.paths.get_mut(&id) {
                    p.ack_now = true;
                }
            }
            Frame::Fin { offset } => {
                if let Some(old) = self.peer_fin
                    && old != offset
                {
                    return Err(SessionError::Protocol(format!("FIN moved from {old} to {offset}")));
                }
                if offset < self.rx_cumulative
                    || self.rx_ooo.last_key_value().is_some_and(|(k, v)| k + v.0.len() as u64 > offset)
                {
                    return Err(SessionError::Protocol(format!(
                        "FIN at {offset} is below data already received"
                    )));
                }
                self.peer_fin = Some(offset);
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

    fn on_data(
        &mut self,
        id: PathId,
        offset: u64,
        labels: Labels,
        data: Bytes,
        now: Instant,
    ) -> Result<(), SessionError> {
        let end = offset + data.len() as u64;
        if end > self.advertised {
            return Err(SessionError::Protocol(format!(
                "DATA up to {end} is beyond the window ({})",
                self.advertised
            )));
        }
        if let Some(fin) = self.peer_fin
            && end > fin
        {
            return Err(SessionError::Protocol(format!("DATA up to {end} is beyond the FIN at {fin}")));
        }
        if let Some(p) = self.paths.get_mut(&id) {
            if !labels.contains(Labels::BACKGROUND) {
                self.trickler.foreground(&p.network.interface, now);
            }
            p.bytes_received += data.len() as u64;
            p.data_since_ack += 1;
            // Every few chunks at once; otherwise within `ack_delay`: enough acknowledgements
            // to keep the sender's window open without a wakeup per chunk.
            if p.data_since_ack >= ACK_EVERY {
                p.ack_now = true;
            } else if p.ack_due.is_none() {
                p.ack_due = Some(now + self.cfg.ack_delay);
            }
        }
        self.insert_received(offset, labels, data);
        Ok(())
    }

    /// Stores received bytes, keeping only what is new, and moves what is now contiguous to
    /// the ready queue.
    fn insert_received(&mut self, offset: u64, labels: Labels, mut data: Bytes) {
        let mut start = offset;
        if start < self.rx_cumulative {
            let skip = (self.rx_cumulative - start).min(data.len() as u64) as usize;
            let _ = data.split_to(skip);
            start = self.rx_cumulative;
        }
        let end = start + data.len() as u64;
        if data.is_empty() {
            return;
        }
        // Pieces of [start, end) not already held.
        let mut cursor = start;
        let mut pieces = Vec::new();
        let first = self.rx_ooo.range(..start).next_back().map(|(&k, _)| k).unwrap_or(start);
        for (&k, (v, _)) in self.rx_ooo.range(first..end) {
            let k_end = k + v.len() as u64;
            if k_end <= cursor {
                continue;
            }
            if k > cursor {
                pieces.push((cursor, k));
            }
            cursor = cursor.max(k_end);
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        for (s, e) in pieces {
            if s != self.rx_cumulative && self.rx_ooo.len() >= MAX_OUT_OF_ORDER {
                // Not acknowledged, so the sender resends it.
                continue;
            }
            let slice = data.slice((s - start) as usize..(e - start) as usize);
            let slice = if slice.len() < COPY_BELOW { Bytes::copy_from_slice(&slice) } else { slice };
            self.rx_ooo.insert(s, (slice, labels));
        }
        while let Some(entry) = self.rx_ooo.first_entry() {
            if *entry.key() != self.rx_cumulative {
                break;
            }
            let (bytes, l) = entry.remove();
            self.rx_cumulative += bytes.len() as u64;
            self.push_ready(bytes, l);
        }
    }

    /// Queues in-order bytes for the application, joining small pieces of the same labels.
    fn push_ready(&mut self, bytes: Bytes, labels: Labels) {
        if bytes.len() >= COPY_BELOW {
            self.flush_tail();
            self.ready.push_back((bytes, labels));
            return;
        }
        if let Some((tail, l)) = &mut self.ready_tail
            && *l == labels
            && tail.len() + bytes.len() <= JOIN_MAX
        {
            tail.extend_from_slice(&bytes);
            return;
        }
        self.flush_tail();
        let mut tail = BytesMut::with_capacity(bytes.len().max(4096));
        tail.extend_from_slice(&bytes);
        self.ready_tail = Some((tail, labels));
    }

    fn flush_tail(&mut self) {
        if let Some((tail, labels)) = self.ready_tail.take() {
            self.ready.push_back((tail.freeze(), labels));
        }
    }

    /// Pieces of received data held now (in order and out of order): what a peer cutting its
    /// data small could try to multiply.
    pub fn held_pieces(&self) -> usize {
        self.ready.len() + usize::from(self.ready_tail.is_some()) + self.rx_ooo.len()
    }

    fn on_ack(&mut self, on: PathId, cumulative: u64, window: u64, ranges: &[(u64, u64)], now: Instant) {
        self.peer_window = self.peer_window.max(window);
        if let Some(fin) = self.fin
            && cumulative > fin
        {
            self.fin_acked = true;
        }
        let covered = |offset: u64, len: usize| {
            let end = offset + len as u64;
            end <= cumulative || ranges.iter().any(|&(s, e)| s <= offset && end <= e)
        };
        // The authority: what is still owed. (`cumulative` counts the FIN as one more byte.)
        let data_end = cumulative.min(self.next_offset);
        let mut newly: Vec<u64> =
            self.unacked.range(..data_end).filter(|(o, l)| covered(**o, **l)).map(|(&o, _)| o).collect();
        for &(s, e) in ranges {
            newly.extend(self.unacked.range(s..e).filter(|(o, l)| covered(**o, **l)).map(|(&o, _)| o));
        }
        for o in newly {
            if let Some(len) = self.unacked.remove(&o) {
                self.buffered -= len;
                self.acked_chunks += 1;
                self.waiting.remove(&o);
            }
        }
        // Per path: progress, RTT, recovery.
        let mut recovered = Vec::new();
        for (&id, p) in self.paths.iter_mut() {
            let done: Vec<u64> = p
                .inflight
                .iter()
                .filter(|(o, s)| covered(**o, s.chunk.data.len()))
                .map(|(&o, _)| o)
                .collect();
            // Progress: its own data was acknowledged, or (idle) it answered at all. An ACK
            // arriving on a path whose data is not getting through proves nothing about it.
            if !done.is_empty() || (id == on && p.inflight.is_empty()) {
                p.progress_at = now;
            }
            for o in done {
                if let Some(sent) = p.inflight.remove(&o)
                    && !sent.chunk.retransmit
                {
                    let sample = now.saturating_duration_since(sent.at);
                    p.srtt = Some(match p.srtt {
                        None => sample,
                        Some(s) => (s * 7 + sample) / 8,
                    });
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

    fn ack_frame(&mut self) -> Frame {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (&k, (v, _)) in &self.rx_ooo {
            let e = k + v.len() as u64;
            if let Some(last) = ranges.last_mut()
                && last.1 == k
            {
                last.1 = e;
            } else if ranges.len() == frame::MAX_RANGES {
                break;
            } else {
                ranges.push((k, e));
            }
        }
        let fin_extra = u64::from(self.peer_fin == Some(self.rx_cumulative));
        self.advertised = self.advertised.max(self.consumed + self.cfg.recv_window);
        Frame::Ack { cumulative: self.rx_cumulative + fin_extra, window: self.advertised, ranges }
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
                    p.queue.front().map(|c| (c.offset, c.end())),
                    p.inflight.len(),
                    p.control.len()
                )
            })
            .collect();
        format!(
            "next={} unacked={} buffered={} waiting={} peer_window={} paths=[{}]",
            self.next_offset,
            self.unacked.len(),
            self.buffered,
            self.waiting.len(),
            self.peer_window,
            paths.join("; ")
        )
    }

    /// The network of path `id`, if it exists.
    pub fn path_network(&self, id: PathId) -> Option<&Network> {
        self.paths.get(&id).map(|p| &p.network)
    }

    /// Whether [`Session::poll_transmit`] would give something for path `id` now (so a driver
    /// wakes a path's writer only when there is work).
    pub fn wants_transmit(&self, id: PathId) -> bool {
        let Some(p) = self.paths.get(&id) else { return false };
        if p.ack_now || !p.control.is_empty() {
            return true;
        }
        if !p.usable() || self.closed.is_some() {
            return false;
        }
        let Some(front) = p.queue.front() else {
            return self.fin.is_some() && !self.fin_acked && !p.fin_sent;
        };
        if !self.unacked.contains_key(&front.offset) {
            return true;
        }
        front.end() <= self.peer_window
            && (p.paced_until.is_none() || !front.labels.contains(Labels::BACKGROUND))
    }

    /// The next bytes to write on path `id`, or `None` when it has nothing to send now.
    pub fn poll_transmit(&mut self, id: PathId, now: Instant) -> Option<Transmit> {
        let needs_ack = self.paths.get(&id).is_some_and(|p| p.ack_now);
        if needs_ack {
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
        if !p.usable() || self.closed.is_some() {
            return None;
        }
        while p.queue.front().is_some_and(|c| !self.unacked.contains_key(&c.offset)) {
            p.queue.pop_front();
        }
        if let Some(front) = p.queue.front() {
            if front.end() > self.peer_window {
                return None;
            }
            if front.labels.contains(Labels::BACKGROUND) {
                let wait = match p.paced_until {
                    Some(t) if t > now => Some(t - now),
                    _ => self.trickler.background_whole(&p.network, Direction::Up, front.data.len(), now),
                };
                p.paced_until = wait.map(|w| now + w);
                if p.paced_until.is_some() {
                    return None;
                }
            }
            let c = p.queue.pop_front()?;
            if !c.labels.contains(Labels::BACKGROUND) {
                self.trickler.foreground(&p.network.interface, now);
            }
            let header = frame::encode_data_header(c.offset, c.labels, c.data.len());
            let payload = c.data.clone();
            if p.inflight.is_empty() {
                p.progress_at = now;
            }
            p.bytes_sent += payload.len() as u64;
            p.inflight.insert(c.offset, Sent { chunk: c, at: now });
            return Some(Transmit { header: Bytes::copy_from_slice(&header), payload });
        }
        if let Some(offset) = self.fin
            && !self.fin_acked
            && !p.fin_sent
        {
            p.fin_sent = true;
            let mut out = BytesMut::new();
            Frame::Fin { offset }.encode(&mut out);
            return Some(Transmit { header: out.freeze(), payload: Bytes::new() });
        }
        None
    }

    /// When [`Session::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for p in self.paths.values() {
            if let Some(t) = p.ack_due {
                at(t);
            }
            if let Some(t) = p.paced_until {
                at(t);
            }
            if !p.established {
                continue;
            }
            if p.troubled {
                at(p.ping_at.map_or(p.progress_at, |t| t) + Duration::from_secs(1));
            } else if p.busy() {
                at(p.progress_at + p.trouble_timeout(&self.cfg));
            } else {
                at(p.last_rx.max(p.progress_at) + self.cfg.ping_idle);
            }
        }
        next
    }

    /// Runs what is due at `now`: delayed acknowledgements, trouble detection, probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut moved = Vec::new();
        let cfg = self.cfg.clone();
        for (&id, p) in self.paths.iter_mut() {
            if p.ack_due.is_some_and(|t| t <= now) {
                // Due now: it goes out with the path's next write. (Kept armed, the timer would
                // fire again and again while the path's writer waits for the socket.)
                p.ack_now = true;
                p.ack_due = None;
            }
            if p.paced_until.is_some_and(|t| t <= now) {
                p.paced_until = None;
            }
            if !p.established {
                continue;
            }
            if p.troubled {
                // Keep probing: an acknowledgement on it brings it back.
                if p.ping_at.is_none_or(|t| now >= t + Duration::from_secs(1)) {
                    Frame::Ping.encode(&mut p.control);
                    p.ping_at = Some(now);
                }
            } else if p.busy() {
                if now >= p.progress_at + p.trouble_timeout(&cfg) {
                    p.troubled = true;
                    moved.extend(p.queue.drain(..));
                    moved.extend(std::mem::take(&mut p.inflight).into_values().map(|s| s.chunk));
                    Frame::Ping.encode(&mut p.control);
                    p.ping_at = Some(now);
                    self.events.push_back(Event::PathTroubled { path: id });
                }
            } else if now >= p.last_rx.max(p.progress_at) + cfg.ping_idle {
                Frame::Ping.encode(&mut p.control);
                p.ping_at = Some(now);
                p.progress_at = now;
            }
        }
        if !moved.is_empty() {
            for p in self.paths.values_mut() {
                p.fin_sent = false;
            }
            self.reassign(moved);
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
        Some(Frame::Hello { version, session, path, join, network }) => {
            if version != frame::VERSION {
                return Err(SessionError::Protocol(format!(
                    "protocol version {version} is not supported (this side speaks {})",
                    frame::VERSION
                )));
            }
            Ok(Some(Hello { session, path, join, network }))
        }
        Some(other) => Err(SessionError::Protocol(format!("expected HELLO, got {}", other.name()))),
    }
}

#[cfg(test)]
mod tests;
