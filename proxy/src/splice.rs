//! The byte path between a client and its upstream.
//!
//! Two TCP sockets are joined with splice(2) through a pipe per direction: bytes move inside
//! the kernel, never copied to user space, and no buffer is allocated per packet. Other streams
//! fall back to a copy with 64 KiB buffers.
//!
//! Each direction ends on its own: end of stream from one side becomes a half-close
//! (`shutdown(SHUT_WR)`) towards the other, and the connection ends when both directions have
//! ended or one side fails. Bytes are never reordered, duplicated or dropped.
//!
//! A [`Pace`] may limit how much each direction moves at a time (background traffic trickled
//! while foreground traffic is active): it is asked before each read, so bytes not allowed yet
//! stay in the kernel's buffers and TCP's flow control slows the sender.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use cmm::Direction;

use nix::fcntl::{OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Most bytes moved by one splice call, and the pipe size asked for.
const PIPE_SIZE: usize = 1 << 20;

/// Which side failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading from or writing to the client failed.
    #[error("client: {0}")]
    Client(io::Error),
    /// Reading from or writing to the upstream failed.
    #[error("upstream: {0}")]
    Upstream(io::Error),
}

/// Bytes moved each way so far; kept by the caller so they are known however the transfer
/// ends (even when it is cancelled because the network went down).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe, not yet written out.
    held: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // A larger pipe moves more per call; the kernel caps it (pipe-max-size), which is fine.
        let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write, held: 0 })
    }
}

/// How much a connection's byte path may move; the upstream decides (see
/// `upstream::NetworkPath`). Directions are seen from this machine: `Up` is towards the
/// destination, `Down` towards the client.
pub trait Pace: Send + Sync {
    /// How many of `want` bytes may move in `dir` now, or how long to wait before asking again.
    fn allow(&self, dir: Direction, want: usize) -> Result<usize, Duration>;
    /// Of `allowed` bytes, `moved` did move.
    fn moved(&self, dir: Direction, allowed: usize, moved: usize);
    /// The largest receive window the source socket of `dir` should advertise now (`None`: the
    /// kernel's own), so a paced sender cannot burst into the bottleneck queue meanwhile.
    fn receive_window(&self, _dir: Direction) -> Option<u32> {
        None
    }
}

/// Applies a [`Pace`]'s receive window to a source socket, and lifts it when pacing ends.
/// The kernel's receive buffer autotuning raises the clamp whenever it grows the buffer, so
/// while paced the clamp is checked before every read and set again when it moved.
#[derive(Default)]
struct WindowClamp {
    /// The socket's clamp before the first change.
    original: Option<u32>,
    applied: Option<u32>,
}

impl WindowClamp {
    fn follow(&mut self, src: &TcpStream, want: Option<u32>) {
        let result = match want {
            Some(w) => cmm::net::window_clamp(src).and_then(|now| {
                self.original.get_or_insert(now);
                if now != w { cmm::net::set_window_clamp(src, w) } else { Ok(()) }
            }),
            None if self.applied.is_some() => {
                // What autotuning would allow: at least the buffer it has grown to.
                let buffer = SockRef::from(src).recv_buffer_size().unwrap_or(0);
                let lifted = self.original.unwrap_or(0).max(u32::try_from(buffer).unwrap_or(u32::MAX));
                cmm::net::set_window_clamp(src, lifted)
            }
            None => return,
        };
        match result {
            Ok(()) => self.applied = want,
            Err(e) => tracing::debug!("TCP_WINDOW_CLAMP: {e}"),
        }
    }
}

/// Waits until `pace` allows some bytes in `dir`; at most `max`.
async fn allowance(pace: Option<(&dyn Pace, Direction)>, max: usize) -> usize {
    let Some((p, dir)) = pace else { return max };
    loop {
        match p.allow(dir, max) {
            Ok(n) => return n.clamp(1, max),
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
}

/// Which end of a direction an error came from.
enum End {
    Source(io::Error),
    Sink(io::Error),
}

/// Moves bytes from `src` to `dst` until end of stream, then half-closes `dst`.
async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &mut u64,
    pace: Option<(&dyn Pace, Direction)>,
) -> Result<(), End> {
    let mut pipe = Pipe::new().map_err(End::Source)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut clamp = WindowClamp::default();
    loop {
        if pipe.held == 0 {
            src.readable().await.map_err(End::Source)?;
            if let Some((p, dir)) = pace {
                clamp.follow(src, p.receive_window(dir));
            }
            // Asked once there is something to read, so a grant is never held while idle.
            let allowed = allowance(pace, PIPE_SIZE).await;
            let result = src.try_io(Interest::READABLE, || {
                nix::fcntl::splice(src.as_fd(), None, &pipe.write, None, allowed, flags)
                    .map_err(io::Error::from)
            });
            if let Some((p, dir)) = pace {
                p.moved(dir, allowed, *result.as_ref().unwrap_or(&0));
            }
            let n = match result {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(End::Source(e)),
            };
            if n == 0 {
                // End of stream: pass the half-close on. The peer may be gone already, which
                // is not an error of this direction.
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            pipe.held = n;
        }
        while pipe.held > 0 {
            dst.writable().await.map_err(End::Sink)?;
            match dst.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&pipe.read, None, dst.as_fd(), None, pipe.held, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    pipe.held -= n;
                    *moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(End::Sink(e)),
            }
        }
    }
}

/// Joins two TCP sockets with splice(2) until both directions end (`Ok`) or one side fails,
/// each direction paced by `pace` if given.
pub async fn splice_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    counts: &mut Counts,
    pace: Option<&dyn Pace>,
) -> Result<(), TransferError> {
    let Counts { up, down } = counts;
    let to_upstream = async {
        splice_one_way(client, upstream, up, pace.map(|p| (p, Direction::Up))).await.map_err(|e| match e {
            End::Source(e) => TransferError::Client(e),
            End::Sink(e) => TransferError::Upstream(e),
        })
    };
    let to_client = async {
        splice_one_way(upstream, client, down, pace.map(|p| (p, Direction::Down))).await.map_err(
            |e| match e {
                End::Source(e) => TransferError::Upstream(e),
                End::Sink(e) => TransferError::Client(e),
            },
        )
    };
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}

/// Copies from `src` to `dst` through one buffer (4 KiB, growing to 64 KiB while reads fill
/// it) until end of stream, then half-closes.
async fn copy_one_way<R, W>(
    src: &mut R,
    dst: &mut W,
    moved: &mut u64,
    pace: Option<(&dyn Pace, Direction)>,
) -> Result<(), End>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = cmm::growbuf::GrowBuf::new(64 * 1024);
    loop {
        let allowed = allowance(pace, buf.len()).await;
        let read = src.read(&mut buf.space()[..allowed]).await;
        if let Some((p, dir)) = pace {
            p.moved(dir, allowed, *read.as_ref().unwrap_or(&0));
        }
        let n = read.map_err(End::Source)?;
        if n == 0 {
            let _ = dst.shutdown().await;
            return Ok(());
        }
        dst.write_all(buf.filled(n)).await.map_err(End::Sink)?;
        buf.took(n);
        *moved += n as u64;
    }
}

/// Joins a client socket with any stream, copying through 64 KiB buffers, each direction
/// paced by `pace` if given.
pub async fn copy_bidirectional<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    client: &mut TcpStream,
    upstream: &mut S,
    counts: &mut Counts,
    pace: Option<&dyn Pace>,
) -> Result<(), TransferError> {
    let Counts { up, down } = counts;
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = async {
        copy_one_way(&mut client_read, &mut up_write, up, pace.map(|p| (p, Direction::Up))).await.map_err(
            |e| match e {
                End::Source(e) => TransferError::Client(e),
                End::Sink(e) => TransferError::Upstream(e),
            },
        )
    };
    let to_client = async {
        copy_one_way(&mut up_read, &mut client_write, down, pace.map(|p| (p, Direction::Down))).await.map_err(
            |e| match e {
                End::Source(e) => TransferError::Upstream(e),
                End::Sink(e) => TransferError::Client(e),
            },
        )
    };
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}

/// Writes bytes held for a deferred connection (or read ahead by the HTTP parser) to the
/// upstream before the byte path starts.
pub async fn write_held<S: AsyncWrite + Unpin + ?Sized>(upstream: &mut S, held: &[u8]) -> io::Result<()> {
    if !held.is_empty() {
        upstream.write_all(held).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Writes `payload` from `app` and half-closes, and returns what reaches `server`.
    async fn through(mut app: TcpStream, server: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
        let sent = payload.to_vec();
        tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = app.read_to_end(&mut rest).await;
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn splice_moves_everything_and_passes_half_closes() {
        // app <-> (client, upstream) <-> server
        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut counts = Counts::default();
            let r = splice_bidirectional(&client, &upstream, &mut counts, None).await;
            (r, counts)
        });

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap(); // half-close: still reads the answer
            let mut answer = Vec::new();
            app.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "upload intact");
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
        let (result, counts) = relay.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(counts, Counts { up: 3_000_000, down: 6 });
    }

    #[tokio::test]
    async fn a_reset_ends_both_directions() {
        let (app, client) = pair().await;
        let (upstream, server) = pair().await;
        let relay = tokio::spawn(async move {
            splice_bidirectional(&client, &upstream, &mut Counts::default(), None).await
        });
        SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(app); // RST
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.unwrap().unwrap();
        drop(server);
        assert!(matches!(result, Err(TransferError::Client(_))), "{result:?}");
    }

    /// Allows 10 kB per read, after a wait every other time; records what moved.
    #[derive(Default)]
    struct Stingy {
        calls: std::sync::Mutex<(u32, usize, u64)>, // (asks, largest move, total moved)
    }

    impl Pace for Stingy {
        fn allow(&self, _dir: Direction, want: usize) -> Result<usize, Duration> {
            let mut c = self.calls.lock().unwrap();
            c.0 += 1;
            if c.0 % 2 == 1 { Err(Duration::from_millis(1)) } else { Ok(want.min(10_000)) }
        }

        fn moved(&self, _dir: Direction, allowed: usize, moved: usize) {
            assert!(moved <= allowed);
            let mut c = self.calls.lock().unwrap();
            c.1 = c.1.max(moved);
            c.2 += moved as u64;
        }
    }

    #[tokio::test]
    async fn a_pace_limits_every_read_and_loses_nothing() {
        let (app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let pace = std::sync::Arc::new(Stingy::default());
        let p = pace.clone();
        let relay = tokio::spawn(async move {
            splice_bidirectional(&client, &upstream, &mut Counts::default(), Some(&*p)).await
        });
        let payload: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(through(app, &mut server, &payload).await, payload);
        drop(server);
        let _ = relay.await.unwrap();
        let (asks, largest, total) = *pace.calls.lock().unwrap();
        assert_eq!(total, 500_000);
        assert!(largest <= 10_000, "{largest}");
        assert!(asks >= 100, "{asks}");
    }

    #[tokio::test]
    async fn the_copy_path_is_paced_too() {
        let (app, mut client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        let pace = std::sync::Arc::new(Stingy::default());
        let p = pace.clone();
        let relay = tokio::spawn(async move {
            copy_bidirectional(&mut client, &mut upstream, &mut Counts::default(), Some(&*p)).await
        });
        let payload = vec![7u8; 200_000];
        assert_eq!(through(app, &mut server, &payload).await, payload);
        drop(server);
        let _ = relay.await.unwrap();
        let (_, largest, total) = *pace.calls.lock().unwrap();
        assert_eq!(total, 200_000);
        assert!(largest <= 10_000, "{largest}");
    }

    #[tokio::test]
    async fn a_paced_window_is_applied_kept_and_lifted() {
        let (socket, _peer) = pair().await;
        let original = cmm::net::window_clamp(&socket).unwrap();
        let mut clamp = WindowClamp::default();
        clamp.follow(&socket, Some(40_000));
        assert_eq!(cmm::net::window_clamp(&socket).unwrap(), 40_000);
        // Something else (autotuning) raised it: set again on the next read.
        cmm::net::set_window_clamp(&socket, 900_000).unwrap();
        clamp.follow(&socket, Some(40_000));
        assert_eq!(cmm::net::window_clamp(&socket).unwrap(), 40_000);
        // Pacing over: at least what it was before, and as large as the receive buffer.
        clamp.follow(&socket, None);
        let lifted = cmm::net::window_clamp(&socket).unwrap();
        let buffer = SockRef::from(&socket).recv_buffer_size().unwrap() as u32;
        assert!(lifted >= original && lifted >= buffer, "{lifted} < {original} or {buffer}");
    }
}
