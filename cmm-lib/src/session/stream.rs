//! A session's streams: independent ordered byte streams, each with our half
//! ([`SendStream`]) and the peer's ([`RecvStream`]), and the rules for opening and retiring
//! them. Stream 0 is open from the start on both sides and never retired (the single stream of
//! the plain multi-socket API); the connecting side opens even numbers above it, the accepting
//! side odd ones; a stream opens by its first frame (data may travel with the open).

use super::Role;
use super::recv::Assembler;
use super::send::SendStream;
use crate::frame::StreamId;

/// The first window of every stream other than 0, before its reader credits more.
pub const INITIAL_STREAM_WINDOW: u64 = 256 * 1024;
/// Most streams open at once that the peer opened; one more is a protocol error.
pub const MAX_STREAMS: usize = 1024;

/// The peer's half of one stream.
#[derive(Debug)]
pub struct RecvStream {
    /// Its bytes, reassembled.
    pub asm: Assembler,
    /// The code the peer reset it with.
    pub reset: Option<u32>,
    /// We asked the peer to stop (and dropped what it sent).
    pub stopped: bool,
    /// The reader was told of the reset (a stream is not retired before: its reader would
    /// find an end of stream instead).
    pub reset_seen: bool,
}

impl RecvStream {
    /// Whether this half is over: the end (or a reset its reader saw, or our stop) and
    /// nothing left to read.
    pub fn done(&self) -> bool {
        self.asm.finished() || ((self.reset_seen || self.stopped) && !self.asm.has_data())
    }
}

/// One stream, both halves.
#[derive(Debug)]
pub struct StreamState {
    /// Ours.
    pub send: SendStream,
    /// The peer's.
    pub recv: RecvStream,
}

impl StreamState {
    /// A stream whose peer lets us send `send_window`, and whose reader starts by letting the
    /// peer send `recv_initial`, crediting `recv_window` past what it read.
    pub fn new(send_window: u64, recv_initial: u64, recv_window: u64) -> StreamState {
        StreamState {
            send: SendStream::new(send_window),
            recv: RecvStream {
                asm: Assembler::new(recv_initial, recv_window),
                reset: None,
                stopped: false,
                reset_seen: false,
            },
        }
    }
}

/// Whether `role`'s side opens stream `id` (0 is both sides').
pub fn opened_by(id: StreamId, role: Role) -> bool {
    id != 0 && (id % 2 == 0) == (role == Role::Connecting)
}
