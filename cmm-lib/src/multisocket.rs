//! [`MultiSocket`]: the cmm API — one socket spanning every network, with labelled sends,
//! thunks, `check_label`, `reset` and `thunk_cancel`.
//!
//! Two modes share this type:
//! - **cmm** ([`MultiSocket::connect`], [`crate::Listener::accept`]): towards a cmm peer. One
//!   physical connection per (network, remote address); every byte goes on a network its labels
//!   choose; data in flight on a lost network is resent on another; nothing is lost.
//! - **plain** ([`MultiSocket::connect_plain`]): towards an ordinary TCP server. One connection
//!   at a time on the network the labels choose; a lost network drops it and the next send
//!   dials again.
//!
//! Dropping the last handle closes the socket gracefully in the background (everything sent is
//! delivered first, within a linger of 10 s); [`MultiSocket::close`] does the same and waits.

use std::any::Any;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use cmm_policy::Labels;

pub use crate::api::{Callback, Callbacks, Check, PathEvent, TrySend};
use crate::connector::Connector;
use crate::driver::CmmSocket;
use crate::plain::PlainSocket;
use crate::session::{PathStats, RecvError, SendError, Session};
use crate::stream::Stream;
use crate::target::Target;
use crate::thunk::{Handler, Thunk};

/// How long a closing socket waits for the peer to acknowledge everything.
const LINGER: Duration = Duration::from_secs(10);

/// A socket spanning every network.
#[derive(Clone)]
pub struct MultiSocket {
    handle: Arc<Handle>,
}

struct Handle {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Cmm(Arc<CmmSocket>),
    Plain(Arc<PlainSocket>),
}

impl Drop for Handle {
    fn drop(&mut self) {
        match &self.mode {
            Mode::Cmm(s) => {
                let s = s.clone();
                let rt = s.runtime().clone();
                rt.spawn(async move { s.close(LINGER).await });
            }
            Mode::Plain(p) => p.close(),
        }
    }
}

pub(crate) fn send_error(e: SendError) -> io::Error {
    match e {
        SendError::NoNetwork => io::Error::new(io::ErrorKind::WouldBlock, "no network matches the labels"),
        SendError::Full => io::ErrorKind::WouldBlock.into(),
        SendError::Shutdown => io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()),
        SendError::Closed(r) => io::Error::new(io::ErrorKind::ConnectionAborted, r),
        SendError::Reset(r) => io::Error::new(io::ErrorKind::ConnectionReset, r),
        SendError::NoStream(_) => io::Error::new(io::ErrorKind::NotConnected, e.to_string()),
        SendError::Stopped(_) => io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()),
        SendError::TooManyStreams => io::Error::other(e.to_string()),
    }
}

/// A closed session as an I/O error (`WouldBlock` is not one; callers wait on it).
pub(crate) fn recv_error(e: RecvError) -> io::Error {
    match e {
        RecvError::Closed(r) => io::Error::new(io::ErrorKind::ConnectionAborted, r),
        RecvError::Reset(r) => io::Error::new(io::ErrorKind::ConnectionReset, r),
        RecvError::NoStream(id) => io::Error::new(io::ErrorKind::NotConnected, format!("no stream {id}")),
        RecvError::StreamReset(code) => {
            io::Error::new(io::ErrorKind::ConnectionReset, format!("the peer reset the stream (code {code})"))
        }
        RecvError::WouldBlock => io::ErrorKind::WouldBlock.into(),
    }
}

/// The send loop of [`MultiSocket::send`] and [`MultiSocket::send_bytes`] in cmm mode: `take`
/// hands the session the bytes from offset `off` of `len` and says how many it took. Waits for
/// room, and for a network up to the labels' maximum wait since the last byte taken; when that
/// runs out, what was taken is the result (`TimedOut` if nothing was). At `deadline`, if
/// given, likewise: what was taken, or `WouldBlock` if nothing was (a send timeout).
pub(crate) async fn send_cmm(
    s: &CmmSocket,
    len: usize,
    labels: Labels,
    deadline: Option<tokio::time::Instant>,
    mut take: impl FnMut(&mut Session, usize) -> Result<usize, SendError>,
) -> io::Result<usize> {
    let out_of_time = |off: usize| {
        if off > 0 {
            Ok(off)
        } else {
            Err(io::Error::new(io::ErrorKind::WouldBlock, "the send timeout passed with no room"))
        }
    };
    let max_wait = s.max_wait(labels);
    let mut no_network_since: Option<tokio::time::Instant> = None;
    let mut off = 0;
    while off < len {
        let notified = s.writable.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let r = s.mutate(|st| {
            s.resume_after_reset(st);
            take(&mut st.session, off)
        });
        match r {
            Ok(n) => {
                off += n;
                no_network_since = None;
            }
            Err(SendError::Full) => match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return out_of_time(off);
                    }
                }
                None => notified.await,
            },
            Err(SendError::NoNetwork) => {
                let since = *no_network_since.get_or_insert_with(tokio::time::Instant::now);
                let until = deadline.map_or(since + max_wait, |d| d.min(since + max_wait));
                if tokio::time::timeout_at(until, notified).await.is_err() {
                    if until < since + max_wait {
                        // The send timeout came before the wait for a network ran out.
                        return out_of_time(off);
                    }
                    if off > 0 {
                        return Ok(off);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no network for {labels} within {max_wait:?}"),
                    ));
                }
            }
            Err(e) => return Err(send_error(e)),
        }
    }
    Ok(off)
}

impl MultiSocket {
    pub(crate) fn from_cmm(s: Arc<CmmSocket>) -> MultiSocket {
        MultiSocket { handle: Arc::new(Handle { mode: Mode::Cmm(s) }) }
    }

    fn mode(&self) -> &Mode {
        &self.handle.mode
    }

    /// Connects to a cmm peer at `remote` (every address it resolves to is a remote address;
    /// paths open on every up network to each). Returns once a path that `initial_labels`
    /// would use is up, waiting up to the policy's maximum wait for those labels.
    pub async fn connect(
        connector: &Connector,
        remote: impl ToSocketAddrs,
        initial_labels: Labels,
        callbacks: Callbacks,
    ) -> io::Result<MultiSocket> {
        MultiSocket::connect_with(connector, remote, initial_labels, callbacks, None).await
    }

    /// [`MultiSocket::connect`] with every path in TLS 1.3 under `tls` (from
    /// [`crate::tls::Identity::client_config`]: the peer must present its pinned key, and this
    /// side presents its own). The peer listens with [`Listener::bind_tls`].
    ///
    /// [`Listener::bind_tls`]: crate::Listener::bind_tls
    pub async fn connect_tls(
        connector: &Connector,
        remote: impl ToSocketAddrs,
        initial_labels: Labels,
        callbacks: Callbacks,
        tls: Arc<rustls::ClientConfig>,
    ) -> io::Result<MultiSocket> {
        MultiSocket::connect_with(connector, remote, initial_labels, callbacks, Some(tls)).await
    }

    /// Ends the session at once, as if the peer were gone: every stream's reads and writes
    /// fail with `ConnectionReset` and `reason`; nothing more is sent (no linger). For a
    /// session whose paths have all been gone too long to wait for.
    pub fn abort(&self, reason: &str) {
        if let Mode::Cmm(s) = self.mode() {
            s.mutate(|st| st.session.abort(reason));
            s.abort_all();
        }
    }

    /// Payload bytes this side sent twice, on a second network, because the first had lost a
    /// path lately (selective redundancy for ONDEMAND traffic; 0 in plain mode).
    pub fn redundant_bytes(&self) -> u64 {
        match self.mode() {
            Mode::Cmm(s) => s.lock().session.redundant_bytes(),
            _ => 0,
        }
    }

    /// Whether the session ended (closed by either side, or reset because the peer is gone);
    /// a plain-mode socket never says so here.
    pub fn is_closed(&self) -> bool {
        match self.mode() {
            Mode::Cmm(s) => s.lock().session.closed().is_some(),
            _ => false,
        }
    }

    /// The key the peer presented, for a multi-socket a TLS listener accepted.
    pub fn peer_key(&self) -> Option<crate::tls::PublicKey> {
        match self.mode() {
            Mode::Cmm(s) => s.peer_key,
            _ => None,
        }
    }

    async fn connect_with(
        connector: &Connector,
        remote: impl ToSocketAddrs,
        initial_labels: Labels,
        callbacks: Callbacks,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> io::Result<MultiSocket> {
        let remotes: Vec<SocketAddr> = remote.to_socket_addrs()?.collect();
        if remotes.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to"));
        }
        let sock = CmmSocket::connecting(connector.clone(), remotes, callbacks, tls)?;
        let ms = MultiSocket::from_cmm(sock.clone());
        let wait = connector.policy().max_wait(initial_labels).max(connector.connect_timeout() * 2);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = sock.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if sock.lock().session.path_for(initial_labels).is_some() {
                return Ok(ms);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let last =
                    sock.lock().last_error.clone().unwrap_or_else(|| "no network fits the labels".into());
                sock.abort_all();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no path within {wait:?}: {last}"),
                ));
            }
        }
    }

    /// Connects to an ordinary TCP server (plain mode) on the network `labels` choose,
    /// waiting for one up to the policy's maximum wait.
    pub async fn connect_plain(
        connector: &Connector,
        target: Target,
        labels: Labels,
        callbacks: Callbacks,
    ) -> io::Result<MultiSocket> {
        let p = PlainSocket::connect(connector.clone(), target, labels, callbacks).await?;
        Ok(MultiSocket { handle: Arc::new(Handle { mode: Mode::Plain(p) }) })
    }

    /// Opens a new stream (cmm mode only): an independent ordered byte stream in this
    /// multi-socket's session, whose writes carry `labels` until changed. The peer learns of it
    /// with its first bytes. See [`Stream`].
    pub fn open_stream(&self, labels: Labels) -> io::Result<Stream> {
        let Mode::Cmm(s) = self.mode() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "streams need a cmm peer (plain mode has one stream)",
            ));
        };
        let id = s.mutate(|st| st.session.open_stream()).map_err(send_error)?;
        Ok(Stream::new(s.clone(), id, labels, self.clone()))
    }

    /// The next stream the peer opened (cmm mode only), waiting for one; its writes carry no
    /// labels until [`Stream::set_labels`]. Fails once the session is closed.
    pub async fn accept_stream(&self) -> io::Result<Stream> {
        let Mode::Cmm(s) = self.mode() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "streams need a cmm peer (plain mode has one stream)",
            ));
        };
        loop {
            let notified = s.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = s.mutate(|st| match st.session.accept_stream() {
                Some(id) => Ok(Some(id)),
                None => match st.session.closed() {
                    Some(r) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, r.to_string())),
                    None => Ok(None),
                },
            })?;
            match next {
                Some(id) => return Ok(Stream::new(s.clone(), id, Labels::NONE, self.clone())),
                None => notified.await,
            }
        }
    }

    /// Whether this socket speaks cmm to its peer (false: plain mode).
    pub fn is_cmm(&self) -> bool {
        matches!(self.mode(), Mode::Cmm(_))
    }

    /// Sends all of `buf` on networks `labels` choose. Waits for buffer room, and for a
    /// matching network up to the policy's maximum wait for the labels (counted afresh after
    /// every byte taken).
    ///
    /// Returns how many bytes were taken: all of `buf`, or fewer when the wait for a network
    /// ran out after some had been taken (the rest was not; send it again). `TimedOut` only when
    /// it ran out before any byte was. Any other failure (the socket closed or reset) is an
    /// error, even after some bytes were taken, as in libcmm.
    pub async fn send(&self, buf: &[u8], labels: Labels) -> io::Result<usize> {
        match self.mode() {
            Mode::Plain(p) => p.send(buf, labels).await,
            Mode::Cmm(s) => {
                send_cmm(s, buf.len(), labels, None, |session, off| session.send(&buf[off..], labels)).await
            }
        }
    }

    /// [`MultiSocket::send`] that waits at most `timeout` (a socket's send timeout, as
    /// `SO_SNDTIMEO`): then it returns the bytes taken so far, or `WouldBlock` if none were.
    /// In plain mode the timeout is not applied.
    pub async fn send_within(&self, buf: &[u8], labels: Labels, timeout: Duration) -> io::Result<usize> {
        match self.mode() {
            Mode::Plain(p) => p.send(buf, labels).await,
            Mode::Cmm(s) => {
                let deadline = tokio::time::Instant::now() + timeout;
                send_cmm(s, buf.len(), labels, Some(deadline), |session, off| {
                    session.send(&buf[off..], labels)
                })
                .await
            }
        }
    }

    /// Like [`MultiSocket::send`], without copying `data`: the buffer is kept, shared, until
    /// the peer acknowledges it. Partial sends are reported the same way: `Ok` with the bytes
    /// taken when the wait for a network ran out after some, `TimedOut` when before any.
    pub async fn send_bytes(&self, data: bytes::Bytes, labels: Labels) -> io::Result<usize> {
        match self.mode() {
            Mode::Plain(p) => p.send(&data, labels).await,
            Mode::Cmm(s) => {
                send_cmm(s, data.len(), labels, None, |session, off| {
                    session.send_bytes(data.slice(off..), labels)
                })
                .await
            }
        }
    }

    /// Like [`MultiSocket::recv`], without copying: up to `max` bytes, shared with the receive
    /// buffer. Empty is the end of the stream.
    pub async fn recv_bytes(&self, max: usize) -> io::Result<(bytes::Bytes, Labels)> {
        let s = match self.mode() {
            Mode::Plain(p) => {
                let mut buf = vec![0u8; max];
                let (n, l) = p.recv(&mut buf).await?;
                buf.truncate(n);
                return Ok((buf.into(), l));
            }
            Mode::Cmm(s) => s,
        };
        loop {
            let notified = s.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match s.mutate(|st| st.session.recv_bytes(max)) {
                Ok(r) => return Ok(r),
                Err(RecvError::WouldBlock) => notified.await,
                Err(e) => return Err(recv_error(e)),
            }
        }
    }

    /// Sends what fits now. If no network fits `labels`, stores `thunk` (when given) to run
    /// once one does, and returns `Deferred`.
    pub fn try_send(&self, buf: &[u8], labels: Labels, thunk: Option<Thunk>) -> TrySend {
        let s = match self.mode() {
            Mode::Plain(p) => return p.try_send(buf, labels, thunk),
            Mode::Cmm(s) => s,
        };
        s.mutate(|st| {
            s.resume_after_reset(st);
            match st.session.send(buf, labels) {
                Ok(n) => TrySend::Sent(n),
                Err(SendError::NoNetwork) => match thunk {
                    Some(t) => {
                        CmmSocket::store_thunk(st, labels, t);
                        TrySend::Deferred
                    }
                    None => TrySend::Failed(send_error(SendError::NoNetwork)),
                },
                Err(e) => TrySend::Failed(send_error(e)),
            }
        })
    }

    /// Receives bytes and the labels their sender used (never two label sets in one call).
    /// `Ok((0, _))` is the end of the stream.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Labels)> {
        let s = match self.mode() {
            Mode::Plain(p) => return p.recv(buf).await,
            Mode::Cmm(s) => s,
        };
        loop {
            let notified = s.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match s.mutate(|st| st.session.recv(buf)) {
                Ok(r) => return Ok(r),
                Err(RecvError::WouldBlock) => notified.await,
                Err(e) => return Err(recv_error(e)),
            }
        }
    }

    /// Receives without waiting (`WouldBlock` when nothing is there).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<(usize, Labels)> {
        match self.mode() {
            Mode::Plain(p) => p.try_recv(buf),
            Mode::Cmm(s) => s.mutate(|st| st.session.recv(buf)).map_err(recv_error),
        }
    }

    /// `Ready` if a network that fits `labels` is up; otherwise stores `thunk` (`Deferred`),
    /// or `Failed` without one.
    pub fn check_label(&self, labels: Labels, thunk: Option<Thunk>) -> Check {
        let s = match self.mode() {
            Mode::Plain(p) => return p.check_label(labels, thunk),
            Mode::Cmm(s) => s,
        };
        s.mutate(|st| {
            s.resume_after_reset(st);
            if st.session.path_for(labels).is_some() {
                return Check::Ready;
            }
            match thunk {
                Some(t) => {
                    CmmSocket::store_thunk(st, labels, t);
                    Check::Deferred
                }
                None => Check::Failed,
            }
        })
    }

    /// Cancels the thunks stored for exactly `labels` with this handler, giving each argument
    /// to `deleter`; returns how many.
    pub fn thunk_cancel(
        &self,
        labels: Labels,
        handler: Handler,
        deleter: impl FnMut(Box<dyn Any + Send>),
    ) -> usize {
        self.thunk_cancel_matching(labels, |t| t.has_handler(handler), deleter)
    }

    /// Like [`MultiSocket::thunk_cancel`], with any predicate (the C API matches arguments).
    pub fn thunk_cancel_matching(
        &self,
        labels: Labels,
        matches: impl FnMut(&Thunk) -> bool,
        deleter: impl FnMut(Box<dyn Any + Send>),
    ) -> usize {
        match self.mode() {
            Mode::Plain(p) => p.thunk_cancel(labels, matches, deleter),
            Mode::Cmm(s) => s.mutate(|st| st.thunks.cancel(labels, matches, deleter)),
        }
    }

    /// Back to the state right after connect: every physical connection is dropped; the next
    /// send dials again (and `label_up` runs). Nothing sent is lost.
    pub fn reset(&self) {
        match self.mode() {
            Mode::Plain(p) => p.reset(),
            Mode::Cmm(s) => s.reset(),
        }
    }

    /// Ends this side's stream (half-close): the peer reads to the end, then sees end of stream.
    pub fn shutdown(&self) -> io::Result<()> {
        match self.mode() {
            Mode::Plain(p) => p.shutdown(),
            Mode::Cmm(s) => {
                s.mutate(|st| st.session.shutdown());
                Ok(())
            }
        }
    }

    /// Closes: what was sent is delivered first (up to a 10 s linger), then CLOSE is written on
    /// every connection (up to 1 s more), so the peer knows at once, and every connection
    /// closes. Other handles to this socket see it closed.
    pub async fn close(self) {
        match self.mode() {
            Mode::Plain(p) => p.close(),
            Mode::Cmm(s) => s.close(LINGER).await,
        }
    }

    /// Every physical connection, with its network and byte counters.
    pub fn paths(&self) -> Vec<PathStats> {
        match self.mode() {
            Mode::Plain(p) => p.paths(),
            Mode::Cmm(s) => s.lock().session.path_stats(),
        }
    }

    /// Bytes sent and received per network name over this socket's whole life (paths that
    /// ended included), sorted by name.
    pub fn traffic(&self) -> Vec<(String, u64, u64)> {
        let mut totals: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        match self.mode() {
            Mode::Plain(p) => {
                for x in p.paths() {
                    let e = totals.entry(x.network.name).or_default();
                    e.0 += x.bytes_sent;
                    e.1 += x.bytes_received;
                }
            }
            Mode::Cmm(s) => {
                let st = s.lock();
                for (name, (sent, rcvd)) in &st.ended {
                    let e = totals.entry(name.clone()).or_default();
                    e.0 += sent;
                    e.1 += rcvd;
                }
                for x in st.session.path_stats() {
                    let e = totals.entry(x.network.name).or_default();
                    e.0 += x.bytes_sent;
                    e.1 += x.bytes_received;
                }
            }
        }
        totals.into_iter().map(|(n, (s, r))| (n, s, r)).collect()
    }

    /// The peer's address: the first remote address (connecting), where the first path came
    /// from (accepting), or the connected server (plain).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self.mode() {
            Mode::Plain(p) => p.addrs().map(|a| a.1),
            Mode::Cmm(s) => s.remotes().first().copied(),
        }
    }

    /// The local address of a physical connection, if one is open.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.mode() {
            Mode::Plain(p) => p.addrs().map(|a| a.0),
            Mode::Cmm(s) => s.local_addr(),
        }
    }

    /// Whether a `recv` would return at once (data, end of stream, or an error).
    pub fn readable(&self) -> bool {
        match self.mode() {
            Mode::Plain(_) => false,
            Mode::Cmm(s) => s.lock().session.readable(),
        }
    }

    /// How long a send (or check) without a thunk waits for a network that fits `labels`
    /// before it fails: the label policy's `max_wait` unless set here (cmm mode; plain mode
    /// always uses the policy's).
    pub fn failure_timeout(&self, labels: Labels) -> Duration {
        match self.mode() {
            Mode::Cmm(s) => s.max_wait(labels),
            Mode::Plain(p) => p.max_wait(labels),
        }
    }

    /// Sets how long calls without a thunk wait for a network that fits exactly `labels`
    /// (`None`: the policy's again). Ignored in plain mode.
    pub fn set_failure_timeout(&self, labels: Labels, wait: Option<Duration>) {
        if let Mode::Cmm(s) = self.mode() {
            s.set_max_wait(labels, wait);
        }
    }

    /// Calls `hook(readable)` whenever [`MultiSocket::readable`] changes (cmm mode), at once
    /// with the current state, and always under the socket's lock so calls never race: the C
    /// API keeps a file descriptor's readiness exactly in step with it.
    pub fn set_readable_hook(&self, hook: Arc<dyn Fn(bool) + Send + Sync>) {
        if let Mode::Cmm(s) = self.mode() {
            s.set_readable_hook(hook);
        }
    }

    /// A one-line summary of the protocol state, for debugging.
    pub fn debug_summary(&self) -> String {
        match self.mode() {
            Mode::Plain(_) => "plain".into(),
            Mode::Cmm(s) => s.lock().session.debug_summary(),
        }
    }

    /// Bytes sent and not yet acknowledged by the peer (cmm mode).
    pub fn unacked(&self) -> usize {
        match self.mode() {
            Mode::Plain(_) => 0,
            Mode::Cmm(s) => s.lock().session.unacked_bytes(),
        }
    }

    /// Whether the peer has ended its stream and everything was read.
    pub fn read_closed(&self) -> bool {
        match self.mode() {
            Mode::Plain(_) => false,
            Mode::Cmm(s) => s.lock().session.read_closed(),
        }
    }

    /// Waits until something may have changed for readers (for the C API's readiness).
    pub async fn readable_changed(&self) {
        match self.mode() {
            Mode::Plain(p) => p.changed().notified().await,
            Mode::Cmm(s) => s.readable.notified().await,
        }
    }
}
