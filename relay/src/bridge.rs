//! [`bridge`]: one relayed connection's bytes, between its stream and its TCP connection.
//!
//! Each direction is copied on its own and ends on its own: the client's FIN (the stream's end)
//! becomes a FIN to the destination and the destination's FIN ends the stream, so an upload
//! that ends with SHUT_WR still gets its answer. A reset on either side resets the other (a
//! stream reset with [`RESET_CODE`], a TCP reset by closing with linger 0). Once one direction
//! is over, the other has `half_close_timeout` without moving a byte before both are closed,
//! so a half-closed connection whose other side stays silent is not kept forever.

use std::io;
use std::time::Duration;

use cmm::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The code a stream is reset with when its destination connection failed or was reset.
pub const RESET_CODE: u32 = 1;
/// Most bytes copied at a time, each way (buffers start at 4 KiB and grow while full).
const BUF: usize = 64 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended with FIN.
    Closed,
    /// One direction ended and the other moved nothing for the half-close timeout.
    HalfCloseTimeout,
    /// Either side reset or failed: the other was reset.
    Reset(String),
}

/// Bytes moved each way and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// From the client (the stream) to the destination.
    pub up: u64,
    /// From the destination to the client.
    pub down: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down: FIN), counting bytes.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    moved: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let mut buf = cmm::growbuf::GrowBuf::new(BUF);
    loop {
        let n = from.read(buf.space()).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(buf.filled(n)).await?;
        buf.took(n);
        moved.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Moves bytes between `stream` and `tcp` until both directions are over (see the module).
pub async fn bridge(stream: Stream, tcp: TcpStream, half_close_timeout: Duration) -> Report {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut st_rd, mut st_wr) = tokio::io::split(stream);
    let outcome = {
        let upward = pump(&mut st_rd, &mut tcp_wr, &up);
        let downward = pump(&mut tcp_rd, &mut st_wr, &down);
        tokio::pin!(upward, downward);
        // The first direction to end, and how.
        let (first, upward_first) = tokio::select! {
            r = &mut upward => (r, true),
            r = &mut downward => (r, false),
        };
        match first {
            Err(e) => {
                Outcome::Reset(format!("{}: {e}", if upward_first { "client side" } else { "destination" }))
            }
            Ok(()) => {
                // Half-closed: the other direction may go on, but not silently for ever.
                let moved = || up.load(Ordering::Relaxed) + down.load(Ordering::Relaxed);
                let mut seen = moved();
                loop {
                    let rest =
                        async { if upward_first { (&mut downward).await } else { (&mut upward).await } };
                    match tokio::time::timeout(half_close_timeout, rest).await {
                        Ok(Ok(())) => break Outcome::Closed,
                        Ok(Err(e)) => break Outcome::Reset(e.to_string()),
                        Err(_) if moved() != seen => seen = moved(),
                        Err(_) => break Outcome::HalfCloseTimeout,
                    }
                }
            }
        }
    };
    if outcome != Outcome::Closed {
        // Neither side is left believing the connection ended cleanly: the client's stream is
        // reset, the destination gets a TCP reset.
        let stream = st_rd.unsplit(st_wr);
        let _ = stream.reset(RESET_CODE);
        // Whole again (a dropped write half would send FIN first), closed with linger 0.
        if let Ok(tcp) = tcp_rd.reunite(tcp_wr) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        }
    }
    Report { up: up.load(Ordering::Relaxed), down: down.load(Ordering::Relaxed), outcome }
}
