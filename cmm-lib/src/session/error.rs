//! What can go wrong in a session: for the application ([`SendError`], [`RecvError`]) and on
//! one path ([`SessionError`], with one [`ProtocolError`] variant per rule a peer can break).

use crate::frame::{FrameError, PathId, StreamId};

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
    /// The peer is gone for good (see [`super::Session::abort`]).
    #[error("{0}")]
    Reset(String),
    /// No such stream (never opened, or over).
    #[error("no stream {0}")]
    NoStream(StreamId),
    /// The peer asked us to stop sending on the stream, with this code.
    #[error("the peer stopped reading the stream (code {0})")]
    Stopped(u32),
    /// Stream numbers are used up.
    #[error("no stream number left")]
    TooManyStreams,
}

/// Why `recv` gave nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing to read yet.
    WouldBlock,
    /// The session closed before the end of the stream.
    Closed(String),
    /// The peer is gone for good (see [`super::Session::abort`]).
    Reset(String),
    /// No such stream (never opened, or over).
    NoStream(StreamId),
    /// The peer reset the stream, with this code.
    StreamReset(u32),
}

/// A protocol violation on one path; the driver closes that path (the session goes on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// A valid frame that breaks a rule of the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// One rule of the protocol (PROTOCOL.md) that a peer broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first frame on a connection was not HELLO.
    #[error("expected HELLO, got {got}")]
    ExpectedHello {
        /// The frame that came instead.
        got: &'static str,
    },
    /// HELLO of a version this side does not speak.
    #[error("protocol version {version} is not supported (this side speaks {})", crate::frame::VERSION)]
    UnsupportedVersion {
        /// The peer's version.
        version: u16,
    },
    /// HELLO on a path that already had one.
    #[error("HELLO on an open path")]
    HelloOnOpenPath,
    /// WELCOME to the accepting side, or a second one.
    #[error("unexpected WELCOME")]
    UnexpectedWelcome,
    /// WELCOME naming another version, session or path.
    #[error("WELCOME for version {version}, path {path} does not match this path")]
    WelcomeMismatch {
        /// Its version.
        version: u16,
        /// Its path.
        path: PathId,
    },
    /// Anything but WELCOME (or a refusing CLOSE) before the handshake.
    #[error("{frame} before the handshake")]
    BeforeHandshake {
        /// The frame.
        frame: &'static str,
    },
    /// DATA beyond the window this side advertised.
    #[error("DATA up to {end} is beyond the window ({window})")]
    BeyondWindow {
        /// End of the data.
        end: u64,
        /// The window.
        window: u64,
    },
    /// DATA beyond the end of stream the peer announced.
    #[error("DATA up to {end} is beyond the FIN at {fin}")]
    BeyondFin {
        /// End of the data.
        end: u64,
        /// The FIN's offset.
        fin: u64,
    },
    /// A second FIN at another offset.
    #[error("FIN moved from {from} to {to}")]
    FinMoved {
        /// The first FIN's offset.
        from: u64,
        /// The new one.
        to: u64,
    },
    /// A frame for a stream of ours that we never opened.
    #[error("stream {stream} was never opened")]
    UnopenedStream {
        /// The stream.
        stream: StreamId,
    },
    /// More streams open at once than allowed.
    #[error("more than {limit} streams open at once")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
    /// A sequence number or offset whose range runs past the end of the number space.
    #[error("range at {start} of {len} bytes runs past 2^64")]
    RangeOverflow {
        /// Where it starts.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A FIN below data already received.
    #[error("FIN at {offset} is below data already received")]
    FinBelowData {
        /// The FIN's offset.
        offset: u64,
    },
}
