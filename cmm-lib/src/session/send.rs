//! The sending side: [`Chunk`]s in the session's sequence space, the [`SendBuffer`] account of
//! what the peer has not acknowledged yet, and each stream's [`SendStream`] state.
//!
//! The account (`unacked`: sequence number → length of every chunk still owed) is the one
//! authority on what must still reach the peer; copies of chunks sit in path queues, in flight
//! on paths, or waiting for a path, and any copy whose sequence number left the account is
//! stale and dropped. Data counts against the buffer's capacity until acknowledged.
//!
//! Flow control is applied when bytes are accepted, not when they are written: a stream takes
//! only what its peer window and the session window allow, so every chunk in a path queue can
//! go at once, and a stream whose reader stopped never holds up another stream's chunks.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use cmm_policy::Labels;

use crate::frame::{Frame, StreamId};
use crate::recycle::Recycler;

/// What a chunk carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Stream bytes (and the end of the stream after them, with `fin`).
    Data {
        /// The stream.
        stream: StreamId,
        /// Stream offset of the first byte.
        offset: u64,
        /// Whether the stream ends after these bytes.
        fin: bool,
        /// The bytes (shared, never copied between transmissions).
        data: Bytes,
    },
    /// More credit for a stream the peer sends on.
    MaxStreamData {
        /// The stream.
        stream: StreamId,
        /// The first offset the peer may not send.
        max: u64,
    },
    /// Our half of a stream is abandoned.
    Reset {
        /// The stream.
        stream: StreamId,
        /// Why.
        code: u32,
        /// Its final length.
        final_size: u64,
    },
    /// We will not read a stream any more.
    StopSending {
        /// The stream.
        stream: StreamId,
        /// Why.
        code: u32,
    },
}

/// One reliable frame with a fixed place in the sequence space, the labels that choose its
/// path, and whether it was sent before.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Sequence number of its first unit.
    pub seq: u64,
    /// Its labels (control chunks: ONDEMAND, they are small and urgent).
    pub labels: Labels,
    /// What it carries.
    pub body: Body,
    /// Whether it was sent before (its acknowledgement is then no RTT sample).
    pub retransmit: bool,
    /// Whether this is the redundant copy of a chunk sent on another network too.
    pub redundant: bool,
}

impl Chunk {
    /// How much of the sequence space it takes: its bytes, or one for an empty frame.
    pub fn len(&self) -> u64 {
        match &self.body {
            Body::Data { data, .. } => data.len().max(1) as u64,
            _ => 1,
        }
    }

    /// Whether it takes no sequence space (never: every chunk takes at least one).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The sequence number just past it.
    pub fn end(&self) -> u64 {
        self.seq + self.len()
    }

    /// Whether it is background data (paced by the trickler).
    pub fn background(&self) -> bool {
        self.labels.contains(Labels::BACKGROUND)
    }

    /// Payload bytes (stream data) it carries.
    pub fn payload_len(&self) -> usize {
        match &self.body {
            Body::Data { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The frame that carries it, for control chunks (data goes out as a header and the
    /// shared payload instead).
    pub fn control_frame(&self) -> Option<Frame> {
        let seq = self.seq;
        match self.body {
            Body::Data { .. } => None,
            Body::MaxStreamData { stream, max } => Some(Frame::MaxStreamData { seq, stream, max }),
            Body::Reset { stream, code, final_size } => {
                Some(Frame::ResetStream { seq, stream, code, final_size })
            }
            Body::StopSending { stream, code } => Some(Frame::StopSending { seq, stream, code }),
        }
    }
}

/// Size of the regions the application's bytes are copied into.
const REGION: usize = 1 << 20;

/// What an acknowledged chunk was, for the stream it belonged to.
#[derive(Clone, Copy, Debug)]
struct Owed {
    len: u64,
    /// Data bytes (counted against the buffer).
    bytes: usize,
    /// The stream whose FIN or RESET this chunk carried, if any.
    ends: Option<StreamId>,
}

/// The session's account of chunks sent and not yet acknowledged.
#[derive(Debug)]
pub struct SendBuffer {
    capacity: usize,
    next_seq: u64,
    unacked: BTreeMap<u64, Owed>,
    /// Copies from the application go here; reused once its chunks are acknowledged.
    region: BytesMut,
    /// Earlier regions, written again once their chunks are acknowledged.
    regions: Recycler,
    acked_chunks: usize,
    buffered: usize,
    /// The first sequence number the peer's session window does not allow yet.
    peer_window: u64,
}

impl SendBuffer {
    /// Empty, holding at most `capacity` unacknowledged data bytes; the peer's session window
    /// starts at `initial_window`.
    pub fn new(capacity: usize, initial_window: u64) -> SendBuffer {
        SendBuffer {
            capacity,
            next_seq: 0,
            unacked: BTreeMap::new(),
            region: BytesMut::new(),
            regions: Recycler::new(REGION, capacity / REGION + 2),
            acked_chunks: 0,
            buffered: 0,
            peer_window: initial_window,
        }
    }

    /// Data bytes the buffer and the session window take now.
    pub fn room(&self) -> usize {
        let window = self.peer_window.saturating_sub(self.next_seq);
        self.capacity.saturating_sub(self.buffered).min(usize::try_from(window).unwrap_or(usize::MAX))
    }

    /// Copies up to `max` bytes of `data` into the buffer's own region (no allocation per call
    /// on the hot path) and returns them.
    pub fn copy_in(&mut self, data: &[u8], max: usize) -> Bytes {
        let n = data.len().min(max);
        self.regions.ensure(&mut self.region, n);
        self.region.extend_from_slice(&data[..n]);
        self.region.split().freeze()
    }

    /// Gives `body` the next sequence numbers and records it as owed.
    pub fn push(&mut self, labels: Labels, body: Body) -> Chunk {
        let (bytes, ends) = match &body {
            Body::Data { stream, fin, data, .. } => (data.len(), fin.then_some(*stream)),
            Body::Reset { stream, .. } => (0, Some(*stream)),
            _ => (0, None),
        };
        let chunk = Chunk { seq: self.next_seq, labels, body, retransmit: false, redundant: false };
        self.next_seq = chunk.end();
        self.unacked.insert(chunk.seq, Owed { len: chunk.len(), bytes, ends });
        self.buffered += bytes;
        chunk
    }

    /// Whether the chunk at `seq` is still owed to the peer.
    pub fn owed(&self, seq: u64) -> bool {
        self.unacked.contains_key(&seq)
    }

    /// Cuts a data chunk that is to be sent again into pieces of at most `piece` bytes, each
    /// owed on its own from now on, and returns the pieces still owed (a copy of the whole
    /// chunk elsewhere stays valid: the receiver keeps what it lacks of it). A chunk cut
    /// before is returned as the pieces of it still owed; anything else as it is.
    pub fn recut(&mut self, c: Chunk, piece: usize) -> Vec<Chunk> {
        let Body::Data { stream, offset, fin, data } = &c.body else { return vec![c] };
        if data.is_empty() {
            return vec![c];
        }
        let piece = piece.max(1);
        if let Some(owed) = self.unacked.get(&c.seq).copied()
            && owed.len == c.len()
        {
            if data.len() <= piece {
                return vec![c];
            }
            self.unacked.remove(&c.seq);
            for at in (0..data.len()).step_by(piece) {
                let n = piece.min(data.len() - at);
                let last = at + n == data.len();
                let ends = if last { owed.ends } else { None };
                self.unacked.insert(c.seq + at as u64, Owed { len: n as u64, bytes: n, ends });
            }
        }
        self.unacked
            .range(c.seq..c.end())
            .filter(|&(&q, o)| q + o.len <= c.end())
            .map(|(&q, o)| {
                let at = (q - c.seq) as usize;
                let n = o.len as usize;
                let last = at + n == data.len();
                Chunk {
                    seq: q,
                    labels: c.labels,
                    body: Body::Data {
                        stream: *stream,
                        offset: offset + at as u64,
                        fin: *fin && last,
                        data: data.slice(at..at + n),
                    },
                    retransmit: c.retransmit,
                    redundant: c.redundant,
                }
            })
            .collect()
    }

    /// The peer's session window, for debugging.
    pub fn peer_window(&self) -> u64 {
        self.peer_window
    }

    /// Takes an acknowledgement: every sequence number below `cumulative` and every chunk
    /// inside one of `ranges`. Calls `acked` with the sequence number of each chunk newly
    /// acknowledged and the stream whose end it carried, if any.
    pub fn on_ack(
        &mut self,
        cumulative: u64,
        window: u64,
        ranges: &[(u64, u64)],
        mut acked: impl FnMut(u64, Option<StreamId>),
    ) {
        self.peer_window = self.peer_window.max(window);
        let mut newly: Vec<u64> = self.unacked.range(..cumulative).map(|(&s, _)| s).collect();
        for &(s, e) in ranges {
            newly.extend(self.unacked.range(s..e).filter(|(q, o)| **q + o.len <= e).map(|(&q, _)| q));
        }
        for s in newly {
            if let Some(o) = self.unacked.get(&s).copied()
                && covered(cumulative, ranges, s, o.len)
            {
                self.unacked.remove(&s);
                self.buffered -= o.bytes;
                self.acked_chunks += 1;
                acked(s, o.ends);
            }
        }
        if self.unacked.is_empty() {
            // Idle: every region is free again; one is enough for what comes next.
            self.regions.trim(1);
        }
    }

    /// Whether every chunk is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Data bytes accepted and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.buffered
    }

    /// Chunks not yet acknowledged.
    pub fn unacked_chunks(&self) -> usize {
        self.unacked.len()
    }

    /// Chunks acknowledged so far.
    pub fn acked_chunks(&self) -> usize {
        self.acked_chunks
    }

    /// The next sequence number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Whether an ACK of `cumulative` and `ranges` covers the chunk at `seq` of `len` units.
pub fn covered(cumulative: u64, ranges: &[(u64, u64)], seq: u64, len: u64) -> bool {
    let end = seq + len;
    end <= cumulative || ranges.iter().any(|&(s, e)| s <= seq && end <= e)
}

/// Our half of one stream.
#[derive(Debug)]
pub struct SendStream {
    /// Stream bytes handed over so far.
    pub next_offset: u64,
    /// The first offset the peer lets us send (its MAX_STREAM_DATA).
    pub max: u64,
    /// Set once the application shut it down (FIN queued at this offset).
    pub fin: Option<u64>,
    /// Set once reset (by us, or because the peer asked with STOP_SENDING).
    pub reset: Option<u32>,
    /// The code the peer gave with STOP_SENDING.
    pub stopped: Option<u32>,
    /// Whether the FIN or RESET reached the peer.
    pub end_acked: bool,
    /// The labels of the latest bytes sent: the FIN carries them, so the end of a background
    /// stream is background too.
    pub labels: Labels,
}

impl SendStream {
    /// A stream the peer lets send `initial` bytes before crediting more.
    pub fn new(initial: u64) -> SendStream {
        SendStream {
            next_offset: 0,
            max: initial,
            fin: None,
            reset: None,
            stopped: None,
            end_acked: false,
            labels: Labels::NONE,
        }
    }

    /// Stream bytes its window takes now.
    pub fn room(&self) -> usize {
        usize::try_from(self.max.saturating_sub(self.next_offset)).unwrap_or(usize::MAX)
    }

    /// Whether this half is over and the peer knows it.
    pub fn done(&self) -> bool {
        self.end_acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_chunk(buf: &mut SendBuffer, len: usize, fin: bool) -> Chunk {
        let data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
        buf.push(Labels::BACKGROUND, Body::Data { stream: 0, offset: 100, fin, data })
    }

    #[test]
    fn a_recut_chunk_is_owed_piece_by_piece_and_ends_its_stream_once() {
        let mut buf = SendBuffer::new(1 << 20, 1 << 20);
        let c = data_chunk(&mut buf, 40_000, true);
        let pieces = buf.recut(c.clone(), 16_384);
        let lens: Vec<usize> = pieces.iter().map(Chunk::payload_len).collect();
        assert_eq!(lens, vec![16_384, 16_384, 7_232]);
        for (p, at) in pieces.iter().zip([0u64, 16_384, 32_768]) {
            assert_eq!(p.seq, c.seq + at);
            let Body::Data { offset, fin, data, .. } = &p.body else { panic!("{p:?}") };
            assert_eq!(*offset, 100 + at);
            assert_eq!(*fin, at == 32_768, "only the last piece carries the FIN");
            assert_eq!(data[0], at as u8);
        }
        // The first piece is acknowledged: cut again, the whole chunk yields what is owed.
        let mut ended = Vec::new();
        buf.on_ack(c.seq + 16_384, 1 << 20, &[], |_, e| ended.extend(e));
        let rest = buf.recut(c.clone(), 16_384);
        assert_eq!(rest.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![c.seq + 16_384, c.seq + 32_768]);
        assert_eq!(buf.unacked_bytes(), 40_000 - 16_384);
        // The peer acknowledges the old whole copy's range: everything, and the end once.
        buf.on_ack(c.end(), 1 << 20, &[], |_, e| ended.extend(e));
        assert!(buf.all_acked());
        assert_eq!(buf.unacked_bytes(), 0);
        assert_eq!(ended, vec![0]);
    }

    #[test]
    fn small_and_control_chunks_are_not_cut() {
        let mut buf = SendBuffer::new(1 << 20, 1 << 20);
        let c = data_chunk(&mut buf, 1000, false);
        assert_eq!(buf.recut(c.clone(), 16_384).len(), 1);
        let fin = data_chunk(&mut buf, 0, true);
        assert_eq!(buf.recut(fin, 1).len(), 1);
        let credit = buf.push(Labels::ONDEMAND, Body::MaxStreamData { stream: 0, max: 5 });
        assert_eq!(buf.recut(credit, 1).len(), 1);
    }
}
