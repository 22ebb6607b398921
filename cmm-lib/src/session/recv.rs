//! [`Assembler`]: the receiving half of a byte stream — bytes by offset in, one ordered stream
//! out, once, with the labels each byte was sent with.
//!
//! Memory held stays close to the bytes held however the peer cuts them: pieces under
//! [`COPY_BELOW`] are copied out of the read buffer they arrived in (a small slice must not keep
//! a large buffer alive), small in-order pieces of the same labels are joined, and at most
//! [`MAX_OUT_OF_ORDER`] out-of-order pieces (and [`MAX_HELD`] in all) are kept — more are
//! dropped unacknowledged and the sender resends them (quinn's `Assembler` bounds allocated against buffered bytes the same
//! way). The window it advertises is credited as the application reads, not as bytes arrive.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use cmm_policy::Labels;

use super::error::ProtocolError;
use crate::frame::MAX_RANGES;

/// Received pieces shorter than this are copied, and joined when in order.
pub const COPY_BELOW: usize = 32 * 1024;
/// Largest joined run of small in-order pieces.
pub const JOIN_MAX: usize = 64 * 1024;
/// Most out-of-order pieces held.
pub const MAX_OUT_OF_ORDER: usize = 4096;
/// Most pieces held in all (in order, unread, included): small pieces whose labels alternate
/// cannot be joined, so their number is bounded too. A well-behaved sender's data never comes
/// near it (it takes a label change every few bytes and a reader that does not read); beyond it
/// new data is dropped unacknowledged until the application reads.
pub const MAX_HELD: usize = 16384;

/// A stream's receiving side.
#[derive(Debug)]
pub struct Assembler {
    /// Every byte below this has arrived.
    cumulative: u64,
    /// Pieces above `cumulative`, by offset, disjoint.
    out_of_order: BTreeMap<u64, (Bytes, Labels)>,
    /// In order, not yet read.
    ready: VecDeque<(Bytes, Labels)>,
    /// Small in-order pieces being joined; read after `ready`.
    tail: Option<(BytesMut, Labels)>,
    /// Bytes the application has read.
    consumed: u64,
    /// The first offset the peer may not send (flow control).
    advertised: u64,
    /// The window's size above what was read.
    window: u64,
    /// The end of the stream, once the peer said it.
    fin: Option<u64>,
    /// In-order bytes not read yet.
    buffered: usize,
}

impl Assembler {
    /// An empty stream; the peer may send `initial` bytes before the first window update,
    /// and each update lets it send `window` past what was read.
    pub fn new(initial: u64, window: u64) -> Assembler {
        Assembler {
            cumulative: 0,
            out_of_order: BTreeMap::new(),
            ready: VecDeque::new(),
            tail: None,
            consumed: 0,
            advertised: initial,
            window,
            fin: None,
            buffered: 0,
        }
    }

    /// Takes bytes at `offset`, keeping only what is new. Returns whether all of it is held
    /// now (false: some was dropped at a bound, so it must not be acknowledged).
    pub fn insert(&mut self, offset: u64, labels: Labels, mut data: Bytes) -> Result<bool, ProtocolError> {
        let end = offset + data.len() as u64;
        if end > self.advertised {
            return Err(ProtocolError::BeyondWindow { end, window: self.advertised });
        }
        if let Some(fin) = self.fin
            && end > fin
        {
            return Err(ProtocolError::BeyondFin { end, fin });
        }
        let mut start = offset;
        if start < self.cumulative {
            let skip = (self.cumulative - start).min(data.len() as u64) as usize;
            let _ = data.split_to(skip);
            start = self.cumulative;
        }
        if data.is_empty() {
            return Ok(true);
        }
        // Pieces of [start, end) not already held.
        let mut cursor = start;
        let mut pieces = Vec::new();
        let first = self.out_of_order.range(..start).next_back().map(|(&k, _)| k).unwrap_or(start);
        for (&k, (v, _)) in self.out_of_order.range(first..end) {
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
        let mut kept = true;
        for (s, e) in pieces {
            let full = self.held_pieces() >= MAX_HELD
                || (s != self.cumulative && self.out_of_order.len() >= MAX_OUT_OF_ORDER);
            if full {
                // Not acknowledged, so the sender resends it.
                kept = false;
                continue;
            }
            let slice = data.slice((s - start) as usize..(e - start) as usize);
            let slice = if slice.len() < COPY_BELOW { Bytes::copy_from_slice(&slice) } else { slice };
            self.out_of_order.insert(s, (slice, labels));
        }
        while let Some(entry) = self.out_of_order.first_entry() {
            if *entry.key() != self.cumulative {
                break;
            }
            let (bytes, l) = entry.remove();
            self.cumulative += bytes.len() as u64;
            self.buffered += bytes.len();
            self.push_ready(bytes, l);
        }
        Ok(kept)
    }

    /// The peer ends the stream at `offset`.
    pub fn set_fin(&mut self, offset: u64) -> Result<(), ProtocolError> {
        if let Some(old) = self.fin
            && old != offset
        {
            return Err(ProtocolError::FinMoved { from: old, to: offset });
        }
        if offset < self.cumulative
            || self.out_of_order.last_key_value().is_some_and(|(k, v)| k + v.0.len() as u64 > offset)
        {
            return Err(ProtocolError::FinBelowData { offset });
        }
        self.fin = Some(offset);
        Ok(())
    }

    fn push_ready(&mut self, bytes: Bytes, labels: Labels) {
        if bytes.len() >= COPY_BELOW {
            self.flush_tail();
            self.ready.push_back((bytes, labels));
            return;
        }
        if let Some((tail, l)) = &mut self.tail
            && *l == labels
            && tail.len() + bytes.len() <= JOIN_MAX
        {
            tail.extend_from_slice(&bytes);
            return;
        }
        self.flush_tail();
        let mut tail = BytesMut::with_capacity(bytes.len().max(256));
        tail.extend_from_slice(&bytes);
        self.tail = Some((tail, labels));
    }

    fn flush_tail(&mut self) {
        if let Some((tail, labels)) = self.tail.take() {
            self.ready.push_back((tail.freeze(), labels));
        }
    }

    /// Copies the next bytes into `buf`, all with the same labels (a read never mixes two label
    /// sets). `None` when nothing is ready.
    pub fn read(&mut self, buf: &mut [u8]) -> Option<(usize, Labels)> {
        self.flush_tail();
        let labels = self.ready.front()?.1;
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
        self.buffered -= n;
        Some((n, labels))
    }

    /// The next bytes (at most `max`, one label set), shared with the buffer: no copy.
    pub fn read_bytes(&mut self, max: usize) -> Option<(Bytes, Labels)> {
        self.flush_tail();
        let (data, labels) = self.ready.front_mut()?;
        let labels = *labels;
        let out = if data.len() <= max {
            self.ready.pop_front().map(|(d, _)| d).unwrap_or_default()
        } else {
            data.split_to(max)
        };
        self.consumed += out.len() as u64;
        self.buffered -= out.len();
        Some((out, labels))
    }

    /// Whether a read would give bytes.
    pub fn has_data(&self) -> bool {
        !self.ready.is_empty() || self.tail.is_some()
    }

    /// Whether the stream ended and everything before the end was read.
    pub fn finished(&self) -> bool {
        !self.has_data() && self.at_fin()
    }

    /// Whether every byte up to the end of the stream has arrived.
    pub fn at_fin(&self) -> bool {
        self.fin == Some(self.cumulative)
    }

    /// Stream bytes received in order so far.
    pub fn received(&self) -> u64 {
        self.cumulative
    }

    /// Pieces held now, in order and out of order.
    pub fn held_pieces(&self) -> usize {
        self.ready.len() + usize::from(self.tail.is_some()) + self.out_of_order.len()
    }

    /// Whether the credit the reader could grant grew by a quarter of the window since it was
    /// last advertised (then [`Assembler::advertise`] it).
    pub fn credit_due(&self) -> bool {
        self.consumed + self.window >= self.advertised + self.window / 4
    }

    /// Widens the window to what was read plus the window; returns the first offset the
    /// peer may not send.
    pub fn advertise(&mut self) -> u64 {
        self.advertised = self.advertised.max(self.consumed + self.window);
        self.advertised
    }

    /// Bytes held and not read (in order and out of order, roughly: out-of-order pieces are
    /// counted once they come in order).
    pub fn unread(&self) -> usize {
        self.buffered
    }

    /// Drops everything held (the stream was reset or the application stopped reading).
    pub fn discard(&mut self) {
        self.out_of_order.clear();
        self.ready.clear();
        self.tail = None;
        self.buffered = 0;
    }
}

/// Which sequence numbers arrived: everything below `cumulative`, plus ranges above it, at
/// most [`MAX_OUT_OF_ORDER`] of them.
#[derive(Debug, Default)]
pub struct Received {
    cumulative: u64,
    above: BTreeMap<u64, u64>,
}

impl Received {
    /// Records `[seq, end)` as received. False (and nothing recorded) when it would need a range
    /// beyond the bound: the sender resends it.
    pub fn insert(&mut self, seq: u64, end: u64) -> bool {
        if end <= self.cumulative {
            return true;
        }
        let (mut s, mut e) = (seq.max(self.cumulative), end);
        // Merge with every range it touches.
        let touching: Vec<(u64, u64)> =
            self.above.range(..=e).rev().take_while(|(_, re)| **re >= s).map(|(&rs, &re)| (rs, re)).collect();
        if touching.is_empty() && s > self.cumulative && self.above.len() >= MAX_OUT_OF_ORDER {
            return false;
        }
        for (rs, re) in touching {
            self.above.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        if s <= self.cumulative {
            self.cumulative = self.cumulative.max(e);
            while let Some(entry) = self.above.first_entry() {
                if *entry.key() > self.cumulative {
                    break;
                }
                let re = entry.remove();
                self.cumulative = self.cumulative.max(re);
            }
        } else {
            self.above.insert(s, e);
        }
        true
    }

    /// Everything below this arrived.
    pub fn cumulative(&self) -> u64 {
        self.cumulative
    }

    /// The first [`MAX_RANGES`] ranges above the cumulative point.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.above.iter().take(MAX_RANGES).map(|(&s, &e)| (s, e)).collect()
    }
}
