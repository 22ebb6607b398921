//! The multi-socket wire format, version 2 (see `PROTOCOL.md` for the layouts and rules).
//!
//! Every frame is `type: u8`, `length: u32` (big-endian, payload bytes), then the payload.
//! Decoding is two steps, as for any untrusted input: [`FrameDecoder`] first checks that a
//! whole frame is buffered and that its length is within [`MAX_PAYLOAD`] (so nothing is ever
//! allocated from a length field beyond that bound), then [`decode_payload`] parses it. A
//! malformed frame is a [`FrameError`]; the caller closes that physical connection.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cmm_policy::{Labels, NetworkKind};

use crate::recycle::Recycler;

/// Protocol version spoken by this implementation.
pub const VERSION: u16 = 4;
/// CLOSE code: the accepting side does not know the session a path joins (it lost its state);
/// the connecting side's session ends.
pub const CLOSE_UNKNOWN_SESSION: u8 = 1;
/// CLOSE code: this one path is refused (a TLS join without a valid proof, or a second first
/// path of a TLS session); the session goes on, and the path may be dialled again as a join.
pub const CLOSE_PATH_REFUSED: u8 = 2;
/// Bytes of the frame header.
pub const HEADER: usize = 5;
/// DATA's fixed fields: sequence number, stream, offset, labels, flags.
pub const DATA_FIELDS: usize = 8 + 4 + 8 + 4 + 1;
/// Bytes of a DATA frame before its data.
pub const DATA_HEADER: usize = HEADER + DATA_FIELDS;
/// Largest payload accepted: a full data chunk plus its fields, with room to spare.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Largest data chunk a sender puts in one DATA frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Most SACK ranges in one ACK.
pub const MAX_RANGES: usize = 16;
/// Longest network name in HELLO.
pub const MAX_NAME: usize = 64;
/// Longest close reason.
pub const MAX_REASON: usize = 256;

/// A session: the multi-socket both peers share, named by the connecting side.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// One physical connection within a session, numbered by the connecting side.
pub type PathId = u32;

/// One byte stream within a session. 0 is open from the start on both sides; the connecting
/// side opens even numbers above it, the accepting side odd ones.
pub type StreamId = u32;

/// How the connecting side describes the network a path runs over, so that the accepting side
/// can choose paths by labels too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInfo {
    /// Network name (`wifi`).
    pub name: String,
    /// Its kind.
    pub kind: NetworkKind,
    /// Whether it is metered.
    pub metered: bool,
    /// Downstream bandwidth in bit/s as the connecting side knows it (0: unknown).
    pub bandwidth_down: u64,
    /// Upstream bandwidth in bit/s (0: unknown).
    pub bandwidth_up: u64,
    /// Round-trip time in microseconds (0: unknown).
    pub rtt_us: u32,
    /// Label bits the connecting side's policy keeps off this network (version 4): the
    /// accepting side never sends chunks with any of them on it.
    pub refused: u32,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of the connecting side on every path.
    Hello {
        /// Protocol version.
        version: u16,
        /// The session this path belongs to (new or existing).
        session: SessionId,
        /// This path's number.
        path: PathId,
        /// Whether the path joins a session that has worked before (an accepting side that
        /// does not know it refuses the path rather than start the session afresh: it lost
        /// the session's state, and bytes with it).
        join: bool,
        /// On a TLS path that joins: a MAC with the session's join secret over this path's
        /// TLS exporter (see `PROTOCOL.md`), so that the session id alone never lets a path
        /// in; zeros otherwise. (Version 3.)
        proof: [u8; 32],
        /// The connecting side's network for this path.
        network: NetworkInfo,
    },
    /// The accepting side's answer to HELLO.
    Welcome {
        /// Protocol version.
        version: u16,
        /// The session.
        session: SessionId,
        /// The path.
        path: PathId,
        /// The session's join secret, which later paths prove they know (TLS only; zeros
        /// otherwise). (Version 3.)
        secret: [u8; 32],
    },
    /// Bytes of one stream at an offset, with the labels the sender used; `fin` when the
    /// stream ends after them. `seq` places the frame in the session's sequence space, which
    /// acknowledgements count: every reliable frame takes `max(len, 1)` of it.
    Data {
        /// Sequence number (session-wide, for acknowledgement).
        seq: u64,
        /// The stream.
        stream: StreamId,
        /// Offset of the first byte in the stream.
        offset: u64,
        /// Labels.
        labels: Labels,
        /// Whether the stream ends after these bytes.
        fin: bool,
        /// The bytes (empty only with `fin`).
        data: Bytes,
    },
    /// What the receiver holds of the sequence space: everything below `cumulative`, plus
    /// `ranges`; and how far the sender may go (`window`: the first sequence number it may not
    /// use yet — the session-wide flow-control cap).
    Ack {
        /// Every sequence number below this was received.
        cumulative: u64,
        /// Flow control limit.
        window: u64,
        /// Received ranges above `cumulative`, `[start, end)`, ascending, disjoint.
        ranges: Vec<(u64, u64)>,
    },
    /// The sender may send stream bytes below `max` (per-stream flow control, credited as the
    /// application reads). Reliable: it takes one sequence number.
    MaxStreamData {
        /// Sequence number.
        seq: u64,
        /// The stream.
        stream: StreamId,
        /// The first stream offset the sender may not send.
        max: u64,
    },
    /// The sender abandons its half of a stream: no byte at or beyond `final_size` exists, and
    /// those before it may never come. Reliable.
    ResetStream {
        /// Sequence number.
        seq: u64,
        /// The stream.
        stream: StreamId,
        /// Why, for the application.
        code: u32,
        /// The stream's final length.
        final_size: u64,
    },
    /// The receiver will not read a stream any more: the sender should reset it. Reliable.
    StopSending {
        /// Sequence number.
        seq: u64,
        /// The stream.
        stream: StreamId,
        /// Why, for the application.
        code: u32,
    },
    /// Asks for an ACK on this path now (liveness probe).
    Ping,
    /// A path of this session is gone (sent on another path, so the peer fails over at once).
    PathDown {
        /// The path.
        path: PathId,
    },
    /// The session is closed.
    Close {
        /// Reason code (0: normal close).
        code: u8,
        /// Reason in words.
        reason: String,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const DATA: u8 = 3;
    pub const ACK: u8 = 4;
    pub const PING: u8 = 5;
    /// Version 1's FIN, now a flag of DATA: unknown.
    pub const RETIRED_FIN: u8 = 6;
    pub const PATH_DOWN: u8 = 7;
    pub const CLOSE: u8 = 8;
    pub const MAX_STREAM_DATA: u8 = 9;
    pub const RESET_STREAM: u8 = 10;
    pub const STOP_SENDING: u8 = 11;
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Length field above the maximum.
    #[error("frame of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    TooLong(usize),
    /// Payload shorter or longer than its type requires.
    #[error("{0} frame has a bad length ({1} bytes)")]
    BadLength(&'static str, usize),
    /// A field has a value the protocol does not allow.
    #[error("{0}")]
    BadField(String),
}

fn kind_code(k: NetworkKind) -> u8 {
    match k {
        NetworkKind::Ethernet => 1,
        NetworkKind::Wifi => 2,
        NetworkKind::Cellular => 3,
        NetworkKind::Other => 0,
    }
}

fn code_kind(c: u8) -> NetworkKind {
    match c {
        1 => NetworkKind::Ethernet,
        2 => NetworkKind::Wifi,
        3 => NetworkKind::Cellular,
        _ => NetworkKind::Other,
    }
}

impl Frame {
    /// The frame's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Data { .. } => "DATA",
            Frame::Ack { .. } => "ACK",
            Frame::Ping => "PING",
            Frame::MaxStreamData { .. } => "MAX_STREAM_DATA",
            Frame::ResetStream { .. } => "RESET_STREAM",
            Frame::StopSending { .. } => "STOP_SENDING",
            Frame::PathDown { .. } => "PATH_DOWN",
            Frame::Close { .. } => "CLOSE",
        }
    }

    /// Appends the encoded frame (header and payload) to `out`. DATA's bytes are copied here;
    /// [`encode_data_header`] avoids that copy for the data path.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_bytes(0, HEADER);
        let code = match self {
            Frame::Hello { version, session, path, join, proof, network } => {
                out.put_u16(*version);
                out.put_slice(&session.0);
                out.put_u32(*path);
                if *version >= 2 {
                    out.put_u8(*join as u8);
                }
                if *version >= 3 {
                    out.put_slice(proof);
                }
                out.put_u8(kind_code(network.kind));
                out.put_u8(network.metered as u8);
                out.put_u64(network.bandwidth_down);
                out.put_u64(network.bandwidth_up);
                out.put_u32(network.rtt_us);
                if *version >= 4 {
                    out.put_u32(network.refused);
                }
                let name = truncate(&network.name, MAX_NAME);
                out.put_u8(name.len() as u8);
                out.put_slice(name.as_bytes());
                kind::HELLO
            }
            Frame::Welcome { version, session, path, secret } => {
                out.put_u16(*version);
                out.put_slice(&session.0);
                out.put_u32(*path);
                if *version >= 3 {
                    out.put_slice(secret);
                }
                kind::WELCOME
            }
            Frame::Data { seq, stream, offset, labels, fin, data } => {
                out.put_u64(*seq);
                out.put_u32(*stream);
                out.put_u64(*offset);
                out.put_u32(labels.bits());
                out.put_u8(u8::from(*fin));
                out.put_slice(data);
                kind::DATA
            }
            Frame::MaxStreamData { seq, stream, max } => {
                out.put_u64(*seq);
                out.put_u32(*stream);
                out.put_u64(*max);
                kind::MAX_STREAM_DATA
            }
            Frame::ResetStream { seq, stream, code, final_size } => {
                out.put_u64(*seq);
                out.put_u32(*stream);
                out.put_u32(*code);
                out.put_u64(*final_size);
                kind::RESET_STREAM
            }
            Frame::StopSending { seq, stream, code } => {
                out.put_u64(*seq);
                out.put_u32(*stream);
                out.put_u32(*code);
                kind::STOP_SENDING
            }
            Frame::Ack { cumulative, window, ranges } => {
                out.put_u64(*cumulative);
                out.put_u64(*window);
                let n = ranges.len().min(MAX_RANGES);
                out.put_u8(n as u8);
                for (s, e) in &ranges[..n] {
                    out.put_u64(*s);
                    out.put_u64(*e);
                }
                kind::ACK
            }
            Frame::Ping => kind::PING,
            Frame::PathDown { path } => {
                out.put_u32(*path);
                kind::PATH_DOWN
            }
            Frame::Close { code, reason } => {
                out.put_u8(*code);
                out.put_slice(truncate(reason, MAX_REASON).as_bytes());
                kind::CLOSE
            }
        };
        let len = (out.len() - start - HEADER) as u32;
        out[start] = code;
        out[start + 1..start + HEADER].copy_from_slice(&len.to_be_bytes());
    }
}

/// The header and fixed fields of a DATA frame ([`DATA_HEADER`] bytes); the payload follows
/// separately, so a chunk is written without copying it into a frame.
pub fn encode_data_header(
    seq: u64,
    stream: StreamId,
    offset: u64,
    labels: Labels,
    fin: bool,
    len: usize,
) -> [u8; DATA_HEADER] {
    let mut h = [0u8; DATA_HEADER];
    h[0] = kind::DATA;
    h[1..5].copy_from_slice(&((DATA_FIELDS + len) as u32).to_be_bytes());
    h[5..13].copy_from_slice(&seq.to_be_bytes());
    h[13..17].copy_from_slice(&stream.to_be_bytes());
    h[17..25].copy_from_slice(&offset.to_be_bytes());
    h[25..29].copy_from_slice(&labels.bits().to_be_bytes());
    h[29] = u8::from(fin);
    h
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a payload's fields in order. Every read checks that the bytes are there (`try_get_*`),
/// so a field the length checks forgot is a [`FrameError`], never a panic.
struct Fields {
    p: Bytes,
    frame: &'static str,
    len: usize,
}

impl Fields {
    fn short(&self) -> FrameError {
        FrameError::BadLength(self.frame, self.len)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        self.p.try_get_u8().map_err(|_| FrameError::BadLength(self.frame, self.len))
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        self.p.try_get_u16().map_err(|_| FrameError::BadLength(self.frame, self.len))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        self.p.try_get_u32().map_err(|_| FrameError::BadLength(self.frame, self.len))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.p.try_get_u64().map_err(|_| FrameError::BadLength(self.frame, self.len))
    }

    fn bytes32(&mut self) -> Result<[u8; 32], FrameError> {
        let mut b = [0u8; 32];
        self.p.try_copy_to_slice(&mut b).map_err(|_| self.short())?;
        Ok(b)
    }

    fn session(&mut self) -> Result<SessionId, FrameError> {
        let mut id = [0u8; 16];
        self.p.try_copy_to_slice(&mut id).map_err(|_| self.short())?;
        Ok(SessionId(id))
    }

    fn flag(&mut self, what: &str) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(FrameError::BadField(format!("{} {what} {other}", self.frame))),
        }
    }

    /// Requires exactly `n` bytes left.
    fn exactly(&self, n: usize) -> Result<(), FrameError> {
        if self.p.remaining() == n { Ok(()) } else { Err(self.short()) }
    }

    fn rest(self) -> Bytes {
        self.p
    }
}

/// Parses the payload of a frame of type `code` (its length already checked against
/// [`MAX_PAYLOAD`]).
pub fn decode_payload(code: u8, p: Bytes) -> Result<Frame, FrameError> {
    let len = p.len();
    let need = |name: &'static str, ok: bool| if ok { Ok(()) } else { Err(FrameError::BadLength(name, len)) };
    let fields = |frame: &'static str| Fields { p: p.clone(), frame, len };
    match code {
        kind::HELLO => {
            let mut f = fields("HELLO");
            let version = f.u16()?;
            let session = f.session()?;
            let path = f.u32()?;
            // Version 1 had no join flag; it is still decoded, so that its sender is told
            // which version this side speaks.
            let join = if version >= 2 { f.flag("join flag")? } else { false };
            let proof = if version >= 3 { f.bytes32()? } else { [0; 32] };
            let kind = code_kind(f.u8()?);
            let metered = f.flag("metered flag")?;
            let bandwidth_down = f.u64()?;
            let bandwidth_up = f.u64()?;
            let rtt_us = f.u32()?;
            let refused = if version >= 4 { f.u32()? } else { 0 };
            let name_len = f.u8()? as usize;
            need("HELLO", name_len <= MAX_NAME)?;
            f.exactly(name_len)?;
            let name = String::from_utf8(f.rest().to_vec())
                .map_err(|_| FrameError::BadField("HELLO network name is not UTF-8".into()))?;
            Ok(Frame::Hello {
                version,
                session,
                path,
                join,
                proof,
                network: NetworkInfo { name, kind, metered, bandwidth_down, bandwidth_up, rtt_us, refused },
            })
        }
        kind::WELCOME => {
            let mut f = fields("WELCOME");
            let (version, session, path) = (f.u16()?, f.session()?, f.u32()?);
            let secret = if version >= 3 { f.bytes32()? } else { [0; 32] };
            f.exactly(0)?;
            Ok(Frame::Welcome { version, session, path, secret })
        }
        kind::DATA => {
            need("DATA", len >= DATA_FIELDS && len - DATA_FIELDS <= MAX_CHUNK)?;
            let mut f = fields("DATA");
            let (seq, stream, offset) = (f.u64()?, f.u32()?, f.u64()?);
            let bits = f.u32()?;
            let labels =
                Labels::from_bits(bits).map_err(|e| FrameError::BadField(format!("DATA labels: {e}")))?;
            let fin = f.flag("fin flag")?;
            let data = f.rest();
            if data.is_empty() && !fin {
                return Err(FrameError::BadField("DATA without bytes or FIN".into()));
            }
            if offset.checked_add(data.len() as u64).is_none()
                || seq.checked_add(data.len().max(1) as u64).is_none()
            {
                return Err(FrameError::BadField("DATA offset overflows".into()));
            }
            Ok(Frame::Data { seq, stream, offset, labels, fin, data })
        }
        kind::MAX_STREAM_DATA => {
            let mut f = fields("MAX_STREAM_DATA");
            let (seq, stream, max) = (f.u64()?, f.u32()?, f.u64()?);
            f.exactly(0)?;
            Ok(Frame::MaxStreamData { seq, stream, max })
        }
        kind::RESET_STREAM => {
            let mut f = fields("RESET_STREAM");
            let (seq, stream, code, final_size) = (f.u64()?, f.u32()?, f.u32()?, f.u64()?);
            f.exactly(0)?;
            Ok(Frame::ResetStream { seq, stream, code, final_size })
        }
        kind::STOP_SENDING => {
            let mut f = fields("STOP_SENDING");
            let (seq, stream, code) = (f.u64()?, f.u32()?, f.u32()?);
            f.exactly(0)?;
            Ok(Frame::StopSending { seq, stream, code })
        }
        kind::ACK => {
            let mut f = fields("ACK");
            let cumulative = f.u64()?;
            let window = f.u64()?;
            let n = f.u8()? as usize;
            need("ACK", n <= MAX_RANGES)?;
            f.exactly(n * 16)?;
            let mut ranges = Vec::with_capacity(n);
            let mut floor = cumulative;
            for _ in 0..n {
                let (s, e) = (f.u64()?, f.u64()?);
                if s < floor || e <= s {
                    return Err(FrameError::BadField(format!("ACK range {s}..{e} is empty or out of order")));
                }
                floor = e;
                ranges.push((s, e));
            }
            Ok(Frame::Ack { cumulative, window, ranges })
        }
        kind::PING => {
            need("PING", len == 0)?;
            Ok(Frame::Ping)
        }
        kind::PATH_DOWN => {
            let mut f = fields("PATH_DOWN");
            let path = f.u32()?;
            f.exactly(0)?;
            Ok(Frame::PathDown { path })
        }
        kind::CLOSE => {
            need("CLOSE", len <= 1 + MAX_REASON)?;
            let mut f = fields("CLOSE");
            let code = f.u8()?;
            let reason = String::from_utf8_lossy(&f.rest()).into_owned();
            Ok(Frame::Close { code, reason })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Splits a byte stream from one physical connection into frames.
pub struct FrameDecoder {
    buf: BytesMut,
    /// Earlier read buffers, written again once the frames cut from them are released.
    recycler: Recycler,
}

/// Read buffers a decoder keeps for reuse: enough to cover the reads whose data chunks the
/// application has not taken yet, up to a session window's worth (8 MiB in 512 KiB buffers)
/// — while they hold unread data they cost nothing extra; free ones are given back when the
/// connection goes quiet ([`FrameDecoder::release_spare`]).
const KEEP_READ_BUFFERS: usize = 20;
/// Room a streaming reader keeps ahead of what it buffered.
const STREAM_READ: usize = 256 * 1024;

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { buf: BytesMut::new(), recycler: Recycler::new(0, KEEP_READ_BUFFERS) }
    }
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes read from the connection.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Adds bytes decrypted from a streaming connection: like [`FrameDecoder::push`], into
    /// buffers as large as a read's and recycled like them.
    pub fn push_read(&mut self, data: &[u8]) {
        self.recycler.ensure(&mut self.buf, data.len().max(STREAM_READ));
        self.buf.extend_from_slice(data);
    }

    /// Adds a buffer read from the connection, adopting it without a copy when nothing else
    /// is buffered (the usual case: reads end on frame boundaries more often than not, and
    /// frames then borrow from the read buffer directly).
    pub fn push_owned(&mut self, data: BytesMut) {
        if self.buf.is_empty() {
            self.buf = data;
        } else {
            self.buf.extend_from_slice(&data);
        }
    }

    /// Bytes buffered, not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The buffer to read into (its spare capacity), for drivers that read straight into the
    /// decoder: frames then borrow from what was read, and only a partial frame left at the end
    /// is ever moved. Reserves room for at least `room` more bytes first.
    pub fn read_buffer(&mut self, room: usize) -> &mut BytesMut {
        self.recycler.ensure(&mut self.buf, room);
        &mut self.buf
    }

    /// Gives back the read buffers kept for reuse (the connection went quiet).
    pub fn release_spare(&mut self) {
        self.recycler.trim(0);
    }

    /// Takes whatever is buffered (to hand a path from a listener over to its session).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.buf.split()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or an error (after which
    /// the connection must be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let code = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        if !(kind::HELLO..=kind::STOP_SENDING).contains(&code) || code == kind::RETIRED_FIN {
            return Err(FrameError::UnknownType(code));
        }
        if self.buf.len() < HEADER + len {
            // (`read_buffer` makes the room: any frame fits in what it reserves.)
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let payload = self.buf.split_to(len).freeze();
        decode_payload(code, payload).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        let mut d = FrameDecoder::new();
        // Byte by byte: partial input is never an error.
        for b in out.iter() {
            d.push(&[*b]);
        }
        assert_eq!(d.next_frame().unwrap(), Some(f));
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn every_frame_round_trips() {
        roundtrip(Frame::Hello {
            version: VERSION,
            session: SessionId([7; 16]),
            path: 3,
            join: true,
            proof: [9; 32],
            network: NetworkInfo {
                name: "wifi".into(),
                kind: NetworkKind::Wifi,
                metered: false,
                bandwidth_down: 50_000_000,
                bandwidth_up: 10_000_000,
                rtt_us: 20_000,
                refused: 0x8,
            },
        });
        roundtrip(Frame::Welcome { version: VERSION, session: SessionId([1; 16]), path: 9, secret: [4; 32] });
        roundtrip(Frame::Data {
            seq: 7,
            stream: 4,
            offset: 1 << 40,
            labels: Labels::BACKGROUND,
            fin: false,
            data: Bytes::from_static(b"hello"),
        });
        roundtrip(Frame::Data {
            seq: 8,
            stream: 4,
            offset: 9,
            labels: Labels::NONE,
            fin: true,
            data: Bytes::new(),
        });
        roundtrip(Frame::MaxStreamData { seq: 9, stream: 3, max: 1 << 30 });
        roundtrip(Frame::ResetStream { seq: 10, stream: 3, code: 42, final_size: 1000 });
        roundtrip(Frame::StopSending { seq: 11, stream: 5, code: 7 });
        roundtrip(Frame::Ack { cumulative: 10, window: 1 << 23, ranges: vec![(20, 30), (40, 41)] });
        roundtrip(Frame::Ping);
        roundtrip(Frame::PathDown { path: 2 });
        roundtrip(Frame::Close { code: 0, reason: "bye".into() });
    }

    #[test]
    fn data_header_matches_encode() {
        let mut out = BytesMut::new();
        Frame::Data {
            seq: 2,
            stream: 6,
            offset: 5,
            labels: Labels::SMALL,
            fin: true,
            data: Bytes::from_static(b"xyz"),
        }
        .encode(&mut out);
        assert_eq!(&out[..DATA_HEADER], &encode_data_header(2, 6, 5, Labels::SMALL, true, 3));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.push(&[99, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownType(99)));
        let mut d = FrameDecoder::new();
        d.push(&[kind::DATA, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong(_))));
        let mut d = FrameDecoder::new();
        d.push(&[kind::PING, 0, 0, 0, 1, 0]);
        assert!(matches!(d.next_frame(), Err(FrameError::BadLength("PING", 1))));
        // Conflicting labels in DATA.
        let mut out = BytesMut::new();
        out.put_u8(kind::DATA);
        out.put_u32(DATA_FIELDS as u32 + 1);
        out.put_u64(0);
        out.put_u32(0);
        out.put_u64(0);
        out.put_u32(0x4 | 0x8);
        out.put_u8(0);
        out.put_u8(1);
        let mut d = FrameDecoder::new();
        d.push(&out);
        assert!(matches!(d.next_frame(), Err(FrameError::BadField(_))));
        // ACK ranges out of order.
        let mut out = BytesMut::new();
        Frame::Ack { cumulative: 0, window: 0, ranges: vec![] }.encode(&mut out);
        out[4] = 17 + 16;
        out[5 + 16] = 1;
        out.put_u64(5);
        out.put_u64(5);
        let mut d = FrameDecoder::new();
        d.push(&out);
        assert!(matches!(d.next_frame(), Err(FrameError::BadField(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new();
            'outer: for c in chunks {
                d.push(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
            prop_assert!(d.buffered() <= HEADER + MAX_PAYLOAD + 64 * 16);
        }

        #[test]
        fn data_frames_round_trip(offset in 0u64..u64::MAX / 2, data in proptest::collection::vec(any::<u8>(), 1..2000)) {
            let f = Frame::Data { seq: offset / 2, stream: 2, offset, labels: Labels::ONDEMAND, fin: false, data: Bytes::from(data) };
            let mut out = BytesMut::new();
            f.encode(&mut out);
            let mut d = FrameDecoder::new();
            d.push(&out);
            prop_assert_eq!(d.next_frame().unwrap(), Some(f));
        }
    }
}
