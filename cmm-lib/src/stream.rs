//! [`Stream`]: one of a multi-socket's independent byte streams, for the application.
//!
//! A cmm-mode [`MultiSocket`] carries any number of streams besides its own (stream 0, which
//! `MultiSocket::send`/`recv` use): [`MultiSocket::open_stream`] opens one (the peer learns of
//! it with its first bytes, no round trip) and [`MultiSocket::accept_stream`] takes the next the
//! peer opened. Each is ordered and reliable on its own — a chunk of one that is lost or slow
//! never delays another — with its own flow control, credited as it is read. A `Stream` is a
//! tokio [`AsyncRead`] + [`AsyncWrite`]: writes carry the stream's labels (changeable with
//! [`Stream::set_labels`], or per call with [`Stream::send`]), `shutdown` sends FIN (a
//! half-close: the peer still answers), [`Stream::reset`] aborts our half with a code and
//! [`Stream::stop`] asks the peer to abort its half. Dropping a stream ends what is left of it:
//! FIN for our half, STOP_SENDING for the peer's if it was not read to its end.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use cmm_policy::Labels;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::driver::{CmmSocket, StreamWake};
use crate::frame::StreamId;
use crate::multisocket::{MultiSocket, recv_error, send_cmm, send_error};
use crate::session::{RecvError, SendError};

type Wait = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// One stream of a cmm-mode multi-socket.
pub struct Stream {
    sock: Arc<CmmSocket>,
    wake: Arc<StreamWake>,
    id: StreamId,
    labels: Labels,
    read_wait: Option<Wait>,
    write_wait: Option<Wait>,
    /// When the labels' network went missing for the write that waits (for its maximum wait).
    no_network_since: Option<tokio::time::Instant>,
    /// Keeps the multi-socket (and its session) open while the stream lives.
    _socket: MultiSocket,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).field("labels", &self.labels).finish()
    }
}

impl Stream {
    pub(crate) fn new(sock: Arc<CmmSocket>, id: StreamId, labels: Labels, socket: MultiSocket) -> Stream {
        let wake = sock.lock().stream_wakes.entry(id).or_default().clone();
        Stream {
            sock,
            wake,
            id,
            labels,
            read_wait: None,
            write_wait: None,
            no_network_since: None,
            _socket: socket,
        }
    }

    /// The stream's number in its session.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The labels writes carry.
    pub fn labels(&self) -> Labels {
        self.labels
    }

    /// Sets the labels later writes carry.
    pub fn set_labels(&mut self, labels: Labels) {
        self.labels = labels;
    }

    /// Sends all of `buf` with `labels`, as [`MultiSocket::send`] does (room, a network, the
    /// labels' maximum wait, partial sends).
    pub async fn send(&self, buf: &[u8], labels: Labels) -> io::Result<usize> {
        let id = self.id;
        send_cmm(&self.sock, buf.len(), labels, None, |session, off| session.send_on(id, &buf[off..], labels))
            .await
    }

    /// Receives bytes and the labels their sender used (never two label sets in one call).
    /// `Ok((0, _))` is the end of the stream; a reset by the peer is `ConnectionReset` with
    /// its code.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Labels)> {
        loop {
            let notified = self.wake.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.sock.mutate(|st| st.session.recv_on(self.id, buf)) {
                Ok(r) => return Ok(r),
                Err(RecvError::WouldBlock) => notified.await,
                Err(e) => return Err(recv_error(e)),
            }
        }
    }

    /// Ends our half after what was sent (FIN); the peer can still send.
    pub fn finish(&self) -> io::Result<()> {
        self.sock.mutate(|st| st.session.shutdown_stream(self.id)).map_err(send_error)
    }

    /// Abandons our half with `code`: the peer's reads fail with it.
    pub fn reset(&self, code: u32) -> io::Result<()> {
        self.sock.mutate(|st| st.session.reset_stream(self.id, code)).map_err(send_error)
    }

    /// Stops reading: what arrived is dropped, and the peer is asked to reset its half with
    /// `code` (its writes then fail).
    pub fn stop(&self, code: u32) -> io::Result<()> {
        self.sock.mutate(|st| st.session.stop_sending(self.id, code)).map_err(send_error)
    }

    /// The wakeup generation of reads or writes, taken before an attempt.
    fn generation(&self, read: bool) -> u64 {
        let g = if read { &self.wake.read_gen } else { &self.wake.write_gen };
        g.load(Ordering::SeqCst)
    }

    /// Waits for the next wakeup after generation `before` (at once if it already came).
    fn wait(&self, read: bool, before: u64) -> Wait {
        let wake = self.wake.clone();
        Box::pin(async move {
            let n = if read { wake.readable.notified() } else { wake.writable.notified() };
            tokio::pin!(n);
            n.as_mut().enable();
            let g = if read { &wake.read_gen } else { &wake.write_gen };
            if g.load(Ordering::SeqCst) != before {
                return;
            }
            n.await
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(w) = self.read_wait.as_mut() {
                ready!(w.as_mut().poll(cx));
                self.read_wait = None;
            }
            let id = self.id;
            let before = self.generation(true);
            let r = self.sock.mutate(|st| st.session.recv_on(id, buf.initialize_unfilled()));
            match r {
                Ok((n, _)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(RecvError::WouldBlock) => {
                    let w = self.wait(true, before);
                    self.read_wait = Some(w);
                }
                Err(e) => return Poll::Ready(Err(recv_error(e))),
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            if let Some(w) = self.write_wait.as_mut() {
                ready!(w.as_mut().poll(cx));
                self.write_wait = None;
            }
            let (id, labels) = (self.id, self.labels);
            let before = self.generation(false);
            let r = self.sock.mutate(|st| {
                self.sock.resume_after_reset(st);
                st.session.send_on(id, buf, labels)
            });
            match r {
                Ok(n) => {
                    self.no_network_since = None;
                    return Poll::Ready(Ok(n));
                }
                Err(SendError::Full) => {
                    let w = self.wait(false, before);
                    self.write_wait = Some(w);
                }
                Err(SendError::NoNetwork) => {
                    let max_wait = self.sock.max_wait(labels);
                    let since = *self.no_network_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= max_wait {
                        self.no_network_since = None;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no network for {labels} within {max_wait:?}"),
                        )));
                    }
                    let wait = self.wait(false, before);
                    self.write_wait = Some(Box::pin(async move {
                        let _ = tokio::time::timeout_at(since + max_wait, wait).await;
                    }));
                }
                Err(e) => return Poll::Ready(Err(send_error(e))),
            }
        }
    }

    /// Bytes written are in the session already, on their way: nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// FIN: a half-close.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let id = self.id;
        self.sock.mutate(|st| {
            st.stream_wakes.remove(&id);
            let _ = st.session.shutdown_stream(id);
            if !st.session.stream_finished(id) {
                let _ = st.session.stop_sending(id, 0);
            }
        });
    }
}
