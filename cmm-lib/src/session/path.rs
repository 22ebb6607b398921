//! [`PathState`]: one physical connection as the session sees it — its handshake, what is
//! queued for it and in flight on it, its round-trip time and whether it is troubled — and the
//! figures applications see ([`PathStats`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cmm_policy::{Decision, Figures, Labels, Network, Policy};

use super::SessionConfig;
use super::send::Chunk;
use crate::frame::{NetworkInfo, PathId};

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

/// A chunk written on a path, and when.
#[derive(Debug)]
pub(super) struct Sent {
    pub chunk: Chunk,
    pub at: Instant,
}

/// One path's state.
pub(super) struct PathState {
    pub network: Network,
    pub established: bool,
    /// Control frames to write before any data.
    pub control: BytesMut,
    /// Where DATA headers are written, a few hundred per allocation.
    pub headers: BytesMut,
    /// An ACK goes out with the next write.
    pub ack_now: bool,
    /// An ACK is due by then (the Ack timer).
    pub ack_due: Option<Instant>,
    pub data_since_ack: u32,
    /// Chunks chosen for this path, not written yet.
    pub queue: VecDeque<Chunk>,
    /// Chunks written, not acknowledged, by sequence number (change it through
    /// [`PathState::sent`], [`PathState::acked`] and [`PathState::take_chunks`], which keep
    /// `inflight_bytes`).
    pub inflight: BTreeMap<u64, Sent>,
    /// Payload bytes of the chunks in `inflight`.
    pub inflight_bytes: usize,
    /// When its own data (or, idle, a probe) was last acknowledged.
    pub progress_at: Instant,
    /// When the unanswered PING went out.
    pub ping_at: Option<Instant>,
    pub last_rx: Instant,
    pub srtt: Option<Duration>,
    pub troubled: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Background chunks wait for the trickler until then (the Pace timer).
    pub paced_until: Option<Instant>,
}

impl PathState {
    pub fn new(network: Network, established: bool, now: Instant) -> PathState {
        PathState {
            network,
            established,
            control: BytesMut::new(),
            headers: BytesMut::new(),
            ack_now: false,
            ack_due: None,
            data_since_ack: 0,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            inflight_bytes: 0,
            progress_at: now,
            ping_at: None,
            last_rx: now,
            srtt: None,
            troubled: false,
            bytes_sent: 0,
            bytes_received: 0,
            paced_until: None,
        }
    }

    /// Whether new data may be put on it.
    pub fn usable(&self) -> bool {
        self.established && !self.troubled
    }

    /// Whether it waits for an answer: data in flight or an unanswered probe.
    pub fn busy(&self) -> bool {
        !self.inflight.is_empty() || self.ping_at.is_some()
    }

    /// How long it may go without acknowledging progress before it is troubled: libcmm's
    /// three round trips (at least `min_trouble`), plus the time the network's rate needs for
    /// what is in flight on it — on a slow link a backlog moved there is not a dead link.
    pub fn trouble_timeout(&self, cfg: &SessionConfig) -> Duration {
        let rtt = self.srtt.unwrap_or_else(|| self.network.rtt());
        (rtt * 3 + cfg.ack_delay).max(cfg.min_trouble) + self.time_to_send(self.inflight_bytes)
    }

    /// How long `bytes` take at the network's upstream rate, if it is known.
    pub fn time_to_send(&self, bytes: usize) -> Duration {
        match self.network.bandwidth_up() {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(bytes as f64 * 8.0 / rate as f64),
        }
    }

    /// The largest piece a resent chunk is cut into here: about 25 ms of the network's
    /// upstream rate (at least 8 KiB; 16 KiB when the rate is unknown), so that the first bytes
    /// a receiver waits for after a failover arrive after one piece rather than a whole chunk.
    pub fn resend_piece(&self, chunk: usize) -> usize {
        match self.network.bandwidth_up() {
            0 => 16 * 1024,
            rate => usize::try_from(rate / 8 / 40).unwrap_or(usize::MAX).clamp(8 * 1024, chunk.max(8 * 1024)),
        }
    }

    /// Records chunk `c` as written at `now`.
    pub fn sent(&mut self, c: Chunk, now: Instant) {
        self.inflight_bytes += c.payload_len();
        if let Some(old) = self.inflight.insert(c.seq, Sent { chunk: c, at: now }) {
            self.inflight_bytes -= old.chunk.payload_len();
        }
    }

    /// Takes the chunk written at `seq` off the in-flight list (it was acknowledged).
    pub fn acked(&mut self, seq: u64) -> Option<Sent> {
        let sent = self.inflight.remove(&seq)?;
        self.inflight_bytes -= sent.chunk.payload_len();
        Some(sent)
    }

    /// Queues a new chunk: background at the back, anything else ahead of the first queued
    /// background chunk — resends of background too: a backlog moved here from a lost
    /// network (seconds of it on cellular) must not hold up a person waiting on another
    /// stream.
    pub fn enqueue(&mut self, c: Chunk) {
        if c.background() {
            self.queue.push_back(c);
            return;
        }
        let at = self.queue.iter().position(|q| q.background()).unwrap_or(self.queue.len());
        self.queue.insert(at, c);
    }

    /// Takes every chunk off it (queued and in flight), to be placed elsewhere.
    pub fn take_chunks(&mut self) -> Vec<Chunk> {
        let mut chunks: Vec<Chunk> = self.queue.drain(..).collect();
        chunks.extend(std::mem::take(&mut self.inflight).into_values().map(|s| s.chunk));
        self.inflight_bytes = 0;
        chunks
    }

    /// Takes the chunks (queued and in flight) whose labels `moves` says go elsewhere.
    pub fn take_chunks_where(&mut self, mut moves: impl FnMut(&Chunk) -> bool) -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for c in self.queue.drain(..) {
            if moves(&c) { out.push(c) } else { kept.push_back(c) }
        }
        self.queue = kept;
        let seqs: Vec<u64> = self.inflight.iter().filter(|(_, s)| moves(&s.chunk)).map(|(&q, _)| q).collect();
        for q in seqs {
            if let Some(s) = self.acked(q) {
                out.push(s.chunk);
            }
        }
        out
    }

    /// Counts an RTT sample from a chunk acknowledged `sample` after it was written.
    pub fn sample_rtt(&mut self, sample: Duration) {
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        });
    }

    pub fn stats(&self, path: PathId) -> PathStats {
        PathStats {
            path,
            network: self.network.clone(),
            established: self.established,
            troubled: self.troubled,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            srtt: self.srtt,
        }
    }
}

/// A network as the accepting side knows it: described by the peer in HELLO.
pub fn network_from_info(info: &NetworkInfo, path: PathId) -> Network {
    let mut n = Network::new(&info.name, &format!("{}#{path}", info.name), info.kind);
    n.metered = info.metered;
    let opt = |v: u64| (v != 0).then_some(v);
    n.refused = refused_from_bits(info.refused);
    n.declared = Figures {
        // The peer's down is our up, and the other way round.
        bandwidth_down: opt(info.bandwidth_up),
        bandwidth_up: opt(info.bandwidth_down),
        rtt: (info.rtt_us != 0).then(|| Duration::from_micros(u64::from(info.rtt_us))),
    };
    n
}

/// The labels whose policy a peer applies across the session: the four traffic labels
/// (the network restrictions follow from each network's kind on both sides alike).
const POLICY_LABELS: [Labels; 4] = [Labels::ONDEMAND, Labels::BACKGROUND, Labels::SMALL, Labels::LARGE];

/// The refused labels a HELLO names, keeping the known ones only.
fn refused_from_bits(bits: u32) -> Labels {
    POLICY_LABELS
        .iter()
        .filter(|l| bits & l.bits() != 0)
        .fold(Labels::NONE, |acc, &l| acc.union(l).unwrap_or(acc))
}

/// How the connecting side describes one of its networks in HELLO, with the labels its
/// `policy` keeps off that network (so the accepting side sends none of them there).
pub fn info_from_network(n: &Network, policy: &Policy) -> NetworkInfo {
    let (down, up, rtt) = n.figures();
    let mut alone = n.clone();
    alone.up = true;
    let refused = POLICY_LABELS
        .iter()
        .filter(|&&l| !matches!(policy.choose(l, std::slice::from_ref(&alone)), Decision::Use { .. }))
        .fold(0, |acc, l| acc | l.bits());
    NetworkInfo {
        refused,
        name: n.name.clone(),
        kind: n.kind,
        metered: n.metered,
        bandwidth_down: down,
        bandwidth_up: up,
        rtt_us: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
    }
}
