//! The byte path between a client and its upstream.
//!
//! Two TCP sockets are joined with splice(2) through a pipe per direction: bytes move inside
//! the kernel, never copied to user space, and no buffer is allocated per packet. Other streams
//! fall back to a copy with 64 KiB buffers.
//!
//! Each direction ends on its own: end of stream from one side becomes a half-close
//! (`shutdown(SHUT_WR)`) towards the other, and the connection ends when both directions have
//! ended or one side fails. Bytes are never reordered, duplicated or dropped.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

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

/// Which end of a direction an error came from.
enum End {
    Source(io::Error),
    Sink(io::Error),
}

/// Moves bytes from `src` to `dst` until end of stream, then half-closes `dst`.
async fn splice_one_way(src: &TcpStream, dst: &TcpStream, moved: &mut u64) -> Result<(), End> {
    let mut pipe = Pipe::new().map_err(End::Source)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        if pipe.held == 0 {
            src.readable().await.map_err(End::Source)?;
            let n = match src.try_io(Interest::READABLE, || {
                nix::fcntl::splice(src.as_fd(), None, &pipe.write, None, PIPE_SIZE, flags)
                    .map_err(io::Error::from)
            }) {
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

/// Joins two TCP sockets with splice(2) until both directions end (`Ok`) or one side fails.
pub async fn splice_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    counts: &mut Counts,
) -> Result<(), TransferError> {
    let Counts { up, down } = counts;
    let to_upstream = async {
        splice_one_way(client, upstream, up).await.map_err(|e| match e {
            End::Source(e) => TransferError::Client(e),
            End::Sink(e) => TransferError::Upstream(e),
        })
    };
    let to_client = async {
        splice_one_way(upstream, client, down).await.map_err(|e| match e {
            End::Source(e) => TransferError::Upstream(e),
            End::Sink(e) => TransferError::Client(e),
        })
    };
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}

/// Copies from `src` to `dst` through one 64 KiB buffer until end of stream, then half-closes.
async fn copy_one_way<R, W>(src: &mut R, dst: &mut W, moved: &mut u64) -> Result<(), End>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = src.read(&mut buf).await.map_err(End::Source)?;
        if n == 0 {
            let _ = dst.shutdown().await;
            return Ok(());
        }
        dst.write_all(&buf[..n]).await.map_err(End::Sink)?;
        *moved += n as u64;
    }
}

/// Joins a client socket with any stream, copying through 64 KiB buffers.
pub async fn copy_bidirectional<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    client: &mut TcpStream,
    upstream: &mut S,
    counts: &mut Counts,
) -> Result<(), TransferError> {
    let Counts { up, down } = counts;
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = async {
        copy_one_way(&mut client_read, &mut up_write, up).await.map_err(|e| match e {
            End::Source(e) => TransferError::Client(e),
            End::Sink(e) => TransferError::Upstream(e),
        })
    };
    let to_client = async {
        copy_one_way(&mut up_read, &mut client_write, down).await.map_err(|e| match e {
            End::Source(e) => TransferError::Upstream(e),
            End::Sink(e) => TransferError::Client(e),
        })
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

    #[tokio::test]
    async fn splice_moves_everything_and_passes_half_closes() {
        // app <-> (client, upstream) <-> server
        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut counts = Counts::default();
            let r = splice_bidirectional(&client, &upstream, &mut counts).await;
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
        let relay =
            tokio::spawn(
                async move { splice_bidirectional(&client, &upstream, &mut Counts::default()).await },
            );
        SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(app); // RST
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.unwrap().unwrap();
        drop(server);
        assert!(matches!(result, Err(TransferError::Client(_))), "{result:?}");
    }
}
