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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cmm_policy::{Decision, Labels, Network, Policy};

use crate::frame::{self, Frame, FrameDecoder, NetworkInfo, PathId, SessionId};
use crate::trickle::{Direction, Trickler};

mod error;
mod path;
mod recv;
mod send;
mod timer;

pub use error::{ProtocolError, RecvError, SendError, SessionError};
pub use path::{PathStats, info_from_network, network_from_info};
pub use recv::{Assembler, COPY_BELOW, JOIN_MAX, MAX_HELD, MAX_OUT_OF_ORDER};
pub use send::{Chunk, SendBuffer};
pub use timer::Timer;

use path::{PathState, Sent};

/// DATA frames received on a path before an acknowledgement goes out at once.
const ACK_EVERY: u32 = 8;

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

/// One multi-socket's protocol state.
pub struct Session {
    role: Role,
    id: SessionId,
    cfg: SessionConfig,
    policy: Arc<Policy>,
    paths: BTreeMap<PathId, PathState>,
    events: VecDeque<Event>,
    tx: SendBuffer,
    /// Chunks that no usable path may carry now, by offset.
    waiting: BTreeMap<u64, Chunk>,
    rx: Assembler,
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
        Session {
            role,
            id,
            tx: SendBuffer::new(cfg.send_buffer, INITIAL_WINDOW),
            // The peer may send up to the initial window before our first ACK widens it.
            rx: Assembler::new(INITIAL_WINDOW, cfg.recv_window),
            cfg,
            policy,
            paths: BTreeMap::new(),
            events: VecDeque::new(),
            waiting: BTreeMap::new(),
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
        let fresh: HashSet<u64> = chunks.iter().filter(|c| !c.retransmit).map(|c| c.offset).collect();
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
        let chunks = p.take_chunks();
        let had_ack = p.ack_now || p.ack_due.is_some();
        for (_, other) in self.paths.iter_mut().filter(|(_, o)| o.established) {
            Frame::PathDown { path: id }.encode(&mut other.control);
            other.fin_sent = false;
        }
        if had_ack && let Some((_, other)) = self.paths.iter_mut().find(|(_, o)| o.usable()) {
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
            if !self.tx.owed(c.offset) {
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
        let bytes = self.tx.copy_in(data);
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
        if self.tx.fin().is_some() {
            return Err(SendError::Shutdown);
        }
        let path = self.path_for(labels).ok_or(SendError::NoNetwork)?;
        if self.tx.room() == 0 {
            return Err(SendError::Full);
        }
        Ok(path)
    }

    /// Like [`Session::send`], without copying `data`.
    pub fn send_bytes(&mut self, data: Bytes, labels: Labels) -> Result<usize, SendError> {
        let path = self.check_send(labels)?;
        let p = self.paths.get_mut(&path).ok_or(SendError::NoNetwork)?;
        Ok(self.tx.push(data, labels, self.cfg.chunk, |c| p.queue.push_back(c)))
    }

    /// Free bytes in the send buffer.
    pub fn send_room(&self) -> usize {
        self.tx.room()
    }

    /// Bytes accepted and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.tx.unacked_bytes()
    }

    /// Stream bytes received in order so far (grows as data arrives, not as it is read).
    pub fn received_bytes(&self) -> u64 {
        self.rx.received()
    }

    /// How many chunks the peer has acknowledged so far (grows with every acknowledgement
    /// that frees send buffer).
    pub fn acked_count(&self) -> usize {
        self.tx.acked_chunks()
    }

    /// Whether everything sent (and the end of stream, if shut down) is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.tx.all_acked()
    }

    /// Reads the next bytes, all with the same labels (a read never mixes two senders' labels).
    /// `Ok((0, _))` is the end of the stream.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, Labels), RecvError> {
        match self.rx.read(buf) {
            Some(r) => {
                self.maybe_window_update();
                Ok(r)
            }
            None if self.rx.at_fin() => Ok((0, Labels::NONE)),
            None => Err(self.recv_error()),
        }
    }

    /// Like [`Session::recv`] without copying: the next received bytes (at most `max`), all
    /// with the same labels, shared with the receive buffer. An empty result is the end of the
    /// stream.
    pub fn recv_bytes(&mut self, max: usize) -> Result<(Bytes, Labels), RecvError> {
        match self.rx.read_bytes(max) {
            Some(r) => {
                self.maybe_window_update();
                Ok(r)
            }
            None if self.rx.at_fin() => Ok((Bytes::new(), Labels::NONE)),
            None => Err(self.recv_error()),
        }
    }

    fn recv_error(&self) -> RecvError {
        match &self.closed {
            Some(r) if self.aborted => RecvError::Reset(r.clone()),
            Some(r) => RecvError::Closed(r.clone()),
            None => RecvError::WouldBlock,
        }
    }

    /// Whether `recv` would give something (data, the end of the stream, or an error).
    pub fn readable(&self) -> bool {
        self.rx.has_data() || self.rx.at_fin() || self.closed.is_some()
    }

    /// Whether the peer ended its stream and everything before the end was read.
    pub fn read_closed(&self) -> bool {
        self.rx.finished()
    }

    /// Pieces of received data held now (in order and out of order): what a peer cutting its
    /// data small could try to multiply.
    pub fn held_pieces(&self) -> usize {
        self.rx.held_pieces()
    }

    /// Ends our stream after what was sent (half-close). Idempotent.
    pub fn shutdown(&mut self) {
        if self.tx.shutdown() {
            for p in self.paths.values_mut() {
                p.fin_sent = false;
            }
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
        if self.rx.window_update_due()
            && let Some(p) = self.paths.values_mut().filter(|p| p.usable()).max_by_key(|p| p.last_rx)
        {
            p.ack_now = true;
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
            Frame::Welcome { version, session, path } => {
                if self.role != Role::Connecting || established {
                    return Err(ProtocolError::UnexpectedWelcome.into());
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
            Frame::Close { reason, .. } if !established && self.role == Role::Connecting => {
                // The acceptor refused the path: it does not know this session any more (it
                // restarted, and what it had received is gone) or will not have it. No later
                // path can fare better.
                self.abort(&format!("the peer refused the session: {reason}"));
            }
            _ if !established => return Err(ProtocolError::BeforeHandshake { frame: f.name() }.into()),
            Frame::Data { offset, labels, data } => self.on_data(id, offset, labels, data, now)?,
            Frame::Ack { cumulative, window, ranges } => self.on_ack(id, cumulative, window, &ranges, now),
            Frame::Ping => {
                if let Some(p) = self.paths.get_mut(&id) {
                    p.ack_now = true;
                }
            }
            Frame::Fin { offset } => {
                self.rx.set_fin(offset)?;
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
        let len = data.len() as u64;
        self.rx.insert(offset, labels, data)?;
        if let Some(p) = self.paths.get_mut(&id) {
            if !labels.contains(Labels::BACKGROUND) {
                self.trickler.foreground(&p.network.interface, now);
            }
            p.bytes_received += len;
            p.data_since_ack += 1;
            // Every few chunks at once; otherwise within `ack_delay`: enough acknowledgements
            // to keep the sender's window open without a wakeup per chunk.
            if p.data_since_ack >= ACK_EVERY {
                p.ack_now = true;
            } else if p.ack_due.is_none() {
                p.ack_due = Some(now + self.cfg.ack_delay);
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, on: PathId, cumulative: u64, window: u64, ranges: &[(u64, u64)], now: Instant) {
        let waiting = &mut self.waiting;
        self.tx.on_ack(cumulative, window, ranges, |o| {
            waiting.remove(&o);
        });
        // Per path: progress, RTT, recovery.
        let mut recovered = Vec::new();
        for (&id, p) in self.paths.iter_mut() {
            let done: Vec<u64> = p
                .inflight
                .iter()
                .filter(|(o, s)| send::covered(cumulative, ranges, **o, s.chunk.data.len()))
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
            self.tx.sent(),
            self.tx.unacked_chunks(),
            self.tx.unacked_bytes(),
            self.waiting.len(),
            self.tx.peer_window(),
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
        if !p.usable() || self.closed.is_some() {
            return false;
        }
        let Some(front) = p.queue.front() else {
            return self.tx.fin_owed() && !p.fin_sent;
        };
        if !self.tx.owed(front.offset) {
            return true;
        }
        self.tx.window_allows(front.end())
            && (p.paced_until.is_none() || !front.labels.contains(Labels::BACKGROUND))
    }

    /// The next bytes to write on path `id`, or `None` when it has nothing to send now.
    pub fn poll_transmit(&mut self, id: PathId, now: Instant) -> Option<Transmit> {
        if self.paths.get(&id).is_some_and(|p| p.ack_now) {
            let (cumulative, window, ranges) = self.rx.ack();
            let p = self.paths.get_mut(&id)?;
            Frame::Ack { cumulative, window, ranges }.encode(&mut p.control);
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
        while p.queue.front().is_some_and(|c| !self.tx.owed(c.offset)) {
            p.queue.pop_front();
        }
        if let Some(front) = p.queue.front() {
            if !self.tx.window_allows(front.end()) {
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
            // Headers are cut from one buffer a path reuses: no allocation per chunk.
            if p.headers.capacity() - p.headers.len() < frame::DATA_HEADER {
                p.headers.reserve(256 * frame::DATA_HEADER);
            }
            p.headers.extend_from_slice(&frame::encode_data_header(c.offset, c.labels, c.data.len()));
            let header = p.headers.split().freeze();
            let payload = c.data.clone();
            if p.inflight.is_empty() {
                p.progress_at = now;
            }
            p.bytes_sent += payload.len() as u64;
            p.inflight.insert(c.offset, Sent { chunk: c, at: now });
            return Some(Transmit { header, payload });
        }
        if let Some(offset) = self.tx.fin()
            && self.tx.fin_owed()
            && !p.fin_sent
        {
            p.fin_sent = true;
            let mut out = BytesMut::new();
            Frame::Fin { offset }.encode(&mut out);
            return Some(Transmit { header: out.freeze(), payload: Bytes::new() });
        }
        None
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
        let mut moved = Vec::new();
        for (id, timer) in due {
            self.on_timer(id, timer, now, &mut moved);
        }
        if !moved.is_empty() {
            for p in self.paths.values_mut() {
                p.fin_sent = false;
            }
            self.reassign(moved);
        }
    }

    /// What each timer does; `moved` collects chunks taken off a path that became troubled.
    fn on_timer(&mut self, id: PathId, timer: Timer, now: Instant, moved: &mut Vec<Chunk>) {
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
                moved.extend(p.take_chunks());
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
        Some(Frame::Hello { version, session, path, join, network }) => {
            if version != frame::VERSION {
                return Err(ProtocolError::UnsupportedVersion { version }.into());
            }
            Ok(Some(Hello { session, path, join, network }))
        }
        Some(other) => Err(ProtocolError::ExpectedHello { got: other.name() }.into()),
    }
}

#[cfg(test)]
mod tests;
