//! [`SendBuffer`]: the sending half of a byte stream — what the application handed over, cut
//! into chunks, and the account of what the peer has not acknowledged yet.
//!
//! The account (`unacked`: offset → length of every chunk still owed) is the one authority on
//! what must still reach the peer; copies of chunks sit in path queues, in flight on paths, or
//! waiting for a path, and any copy whose offset left the account is stale and dropped. Its
//! bytes count against the buffer's capacity until acknowledged.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use cmm_policy::Labels;

/// A piece of the stream with a fixed offset and length, and the labels it was sent with.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Stream offset of its first byte.
    pub offset: u64,
    /// Its labels.
    pub labels: Labels,
    /// Its bytes (shared, never copied between transmissions).
    pub data: Bytes,
    /// Whether it was sent before (its acknowledgement is then no RTT sample).
    pub retransmit: bool,
}

impl Chunk {
    /// The offset just past it.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// A stream's sending side.
#[derive(Debug)]
pub struct SendBuffer {
    capacity: usize,
    next_offset: u64,
    unacked: BTreeMap<u64, usize>,
    /// Copies from the application go here; reused once its chunks are acknowledged.
    region: BytesMut,
    acked_chunks: usize,
    buffered: usize,
    /// The first offset the peer's window does not allow yet.
    peer_window: u64,
    fin: Option<u64>,
    fin_acked: bool,
}

impl SendBuffer {
    /// Empty, holding at most `capacity` unacknowledged bytes; the peer's window starts at
    /// `initial_window`.
    pub fn new(capacity: usize, initial_window: u64) -> SendBuffer {
        SendBuffer {
            capacity,
            next_offset: 0,
            unacked: BTreeMap::new(),
            region: BytesMut::new(),
            acked_chunks: 0,
            buffered: 0,
            peer_window: initial_window,
            fin: None,
            fin_acked: false,
        }
    }

    /// Free bytes.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.buffered)
    }

    /// Copies as much of `data` as there is room for into the buffer's own region (no
    /// allocation per call on the hot path) and returns it.
    pub fn copy_in(&mut self, data: &[u8]) -> Bytes {
        let n = data.len().min(self.room());
        self.region.reserve(n.max(1 << 20));
        self.region.extend_from_slice(&data[..n]);
        self.region.split().freeze()
    }

    /// Takes `data` (within the room) as chunks of at most `chunk` bytes, appended to the
    /// stream; returns how many bytes were taken.
    pub fn push(
        &mut self,
        mut data: Bytes,
        labels: Labels,
        chunk: usize,
        mut out: impl FnMut(Chunk),
    ) -> usize {
        data.truncate(self.room());
        let n = data.len();
        while !data.is_empty() {
            let piece = data.split_to(chunk.min(data.len()));
            let offset = self.next_offset;
            self.next_offset += piece.len() as u64;
            self.unacked.insert(offset, piece.len());
            out(Chunk { offset, labels, data: piece, retransmit: false });
        }
        self.buffered += n;
        n
    }

    /// Whether the chunk at `offset` is still owed to the peer.
    pub fn owed(&self, offset: u64) -> bool {
        self.unacked.contains_key(&offset)
    }

    /// Whether the peer's window lets a chunk ending at `end` go.
    pub fn window_allows(&self, end: u64) -> bool {
        end <= self.peer_window
    }

    /// The peer's window, for debugging.
    pub fn peer_window(&self) -> u64 {
        self.peer_window
    }

    /// Takes an acknowledgement: every byte below `cumulative` (which counts the FIN as one
    /// more byte) and every chunk inside one of `ranges`. Calls `acked` with the offset of each
    /// chunk newly acknowledged.
    pub fn on_ack(
        &mut self,
        cumulative: u64,
        window: u64,
        ranges: &[(u64, u64)],
        mut acked: impl FnMut(u64),
    ) {
        self.peer_window = self.peer_window.max(window);
        if let Some(fin) = self.fin
            && cumulative > fin
        {
            self.fin_acked = true;
        }
        let data_end = cumulative.min(self.next_offset);
        let mut newly: Vec<u64> = self
            .unacked
            .range(..data_end)
            .filter(|(o, l)| covered(cumulative, ranges, **o, **l))
            .map(|(&o, _)| o)
            .collect();
        for &(s, e) in ranges {
            newly.extend(
                self.unacked
                    .range(s..e)
                    .filter(|(o, l)| covered(cumulative, ranges, **o, **l))
                    .map(|(&o, _)| o),
            );
        }
        for o in newly {
            if let Some(len) = self.unacked.remove(&o) {
                self.buffered -= len;
                self.acked_chunks += 1;
                acked(o);
            }
        }
    }

    /// Ends the stream after what was sent. Returns whether it was not ended before.
    pub fn shutdown(&mut self) -> bool {
        if self.fin.is_some() {
            return false;
        }
        self.fin = Some(self.next_offset);
        true
    }

    /// Where the stream ends, once shut down.
    pub fn fin(&self) -> Option<u64> {
        self.fin
    }

    /// Whether the FIN still has to reach the peer.
    pub fn fin_owed(&self) -> bool {
        self.fin.is_some() && !self.fin_acked
    }

    /// Whether everything (and the end of stream, if shut down) is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.unacked.is_empty() && (self.fin.is_none() || self.fin_acked)
    }

    /// Bytes accepted and not yet acknowledged.
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

    /// Bytes handed over so far.
    pub fn sent(&self) -> u64 {
        self.next_offset
    }
}

/// Whether an ACK of `cumulative` and `ranges` covers the chunk at `offset` of `len` bytes.
pub fn covered(cumulative: u64, ranges: &[(u64, u64)], offset: u64, len: usize) -> bool {
    let end = offset + len as u64;
    end <= cumulative || ranges.iter().any(|&(s, e)| s <= offset && end <= e)
}
