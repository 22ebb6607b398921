//! Physical connections: a TCP connect that really leaves through one network's interface
//! (`SO_BINDTODEVICE`), with a timeout, and name resolution with a timeout.
//!
//! Binding a source address alone is not enough on Linux: the main routing table still picks
//! the interface. Binding the device restricts the route lookup to routes through it, so a
//! connection for the cellular network leaves through the cellular link even though Wi-Fi holds
//! the better default route.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use cmm_policy::Network;
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::target::{Host, Target};

/// Connects to `addr` through `network`'s interface (or unbound when `network` is `None`),
/// giving up after `timeout`.
pub async fn connect(
    addr: SocketAddr,
    network: Option<&Network>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(n) = network {
        SockRef::from(&socket).bind_device(Some(n.interface.as_bytes()))?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

/// Resolves a target to socket addresses, in the resolver's order (RFC 6724: usually IPv6
/// first when it is usable). An IP target resolves to itself.
pub async fn resolve(target: &Target, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
                Ok(r) => r?.collect(),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("resolving {name} took longer than {timeout:?}"),
                    ));
                }
            };
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address")));
            }
            Ok(addrs)
        }
    }
}

/// Sets TCP keepalive so that a peer that vanished is noticed within a few minutes even when
/// no data flows.
pub fn keepalive(stream: &TcpStream) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// What TCP_INFO says of a connection, for the scout's estimates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStats {
    /// The smallest round-trip time the connection saw.
    pub min_rtt: Option<Duration>,
    /// The sender's recent delivery rate in bits/s, when it was not application-limited (so
    /// it reflects the path, not how much there was to send).
    pub delivery_rate: Option<u64>,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// Bytes sent and acknowledged so far.
    pub bytes_acked: u64,
    /// The sender's smoothed RTT now (queueing on the way out included).
    pub srtt: Option<Duration>,
    /// The receiver's RTT estimate now (queueing on the way in included).
    pub rcv_rtt: Option<Duration>,
}

impl TcpStats {
    /// How much longer than its minimum a round trip takes now: the queue this connection
    /// sees (and, mostly, builds) at the bottleneck.
    pub fn queueing(&self) -> Option<Duration> {
        let now = self.srtt.into_iter().chain(self.rcv_rtt).max()?;
        Some(now.saturating_sub(self.min_rtt?))
    }
}

/// The largest receive window a TCP socket advertises (TCP_WINDOW_CLAMP), in bytes.
#[allow(unsafe_code)]
pub fn window_clamp(socket: impl std::os::fd::AsFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a live descriptor (borrowed for the call) writes at most `len`
    // bytes, the size of `value`, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(value).unwrap_or(0))
}

/// Bounds the receive window a connected TCP socket advertises (TCP_WINDOW_CLAMP): the sender
/// then never has more than `bytes` in flight. Can be raised again later; receive buffer
/// autotuning stays on (unlike SO_RCVBUF).
#[allow(unsafe_code)]
pub fn set_window_clamp(socket: impl std::os::fd::AsFd, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt(2) on a live descriptor (borrowed for the call) reads exactly
    // `size_of::<c_int>()` bytes from `value`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads TCP_INFO of a connected socket.
#[allow(unsafe_code)]
pub fn tcp_stats(stream: &TcpStream) -> Option<TcpStats> {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain old data, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a live socket descriptor writes at most `len` bytes into `info`,
    // which is that large, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // The byte after the window scales holds `tcpi_delivery_rate_app_limited` in its lowest
    // bit (a bitfield libc does not name).
    // SAFETY: `info` is at least 8 bytes; byte 7 is within it.
    let flags = unsafe { *(&info as *const libc::tcp_info as *const u8).add(7) };
    let app_limited = flags & 1 != 0;
    // An older kernel fills less: the fields it leaves out stay zero, and read as unknown.
    Some(TcpStats {
        min_rtt: (info.tcpi_min_rtt != 0).then(|| Duration::from_micros(u64::from(info.tcpi_min_rtt))),
        delivery_rate: (!app_limited && info.tcpi_delivery_rate > 0).then_some(info.tcpi_delivery_rate * 8),
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        srtt: (info.tcpi_rtt != 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt))),
        rcv_rtt: (info.tcpi_rcv_rtt != 0).then(|| Duration::from_micros(u64::from(info.tcpi_rcv_rtt))),
    })
}

/// Fewest bytes moved in an interval for its rate to say something about the link: a trickle
/// or a single request measures the application, not the path.
const BUSY_BYTES: u64 = 256 * 1024;

/// A sample for the scout from two readings of the same connection `elapsed` apart: its
/// minimum RTT; its delivery rate, when it sent at least [`BUSY_BYTES`] in the interval and
/// was not application-limited; and its receive rate, when it received at least that much.
pub fn sample_between(
    before: Option<&TcpStats>,
    now: &TcpStats,
    elapsed: Duration,
) -> cmm_scout::ipc::Sample {
    let received = before.map_or(0, |b| now.bytes_received.saturating_sub(b.bytes_received));
    let acked = before.map_or(0, |b| now.bytes_acked.saturating_sub(b.bytes_acked));
    let rate_down = (received >= BUSY_BYTES && elapsed >= Duration::from_millis(200))
        .then(|| (received as f64 * 8.0 / elapsed.as_secs_f64()) as u64);
    let rate_up = now.delivery_rate.filter(|_| acked >= BUSY_BYTES);
    cmm_scout::ipc::Sample { rtt: now.min_rtt, rate_up, rate_down }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(received: u64, acked: u64, rate: Option<u64>) -> TcpStats {
        TcpStats {
            min_rtt: Some(Duration::from_millis(20)),
            delivery_rate: rate,
            bytes_received: received,
            bytes_acked: acked,
            srtt: Some(Duration::from_millis(30)),
            rcv_rtt: Some(Duration::from_millis(120)),
        }
    }

    #[test]
    fn only_busy_intervals_give_rates() {
        let second = Duration::from_secs(1);
        // A request and a small answer: RTT only.
        let s = sample_between(Some(&stats(0, 0, None)), &stats(2_000, 300, Some(60_000_000)), second);
        assert_eq!((s.rtt, s.rate_up, s.rate_down), (Some(Duration::from_millis(20)), None, None));
        // 1 MB down in a second: 8 Mbit/s. 1 MB up, not app-limited: the kernel's rate.
        let s =
            sample_between(Some(&stats(0, 0, None)), &stats(1_000_000, 1_000_000, Some(9_000_000)), second);
        assert_eq!((s.rate_up, s.rate_down), (Some(9_000_000), Some(8_000_000)));
        // The first reading has nothing to compare with.
        let s = sample_between(None, &stats(1_000_000, 1_000_000, Some(9_000_000)), second);
        assert_eq!((s.rate_up, s.rate_down), (None, None));
        // Queueing: the larger of the two current RTTs, above the minimum.
        assert_eq!(stats(0, 0, None).queueing(), Some(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod clamp_tests {
    use super::*;

    #[tokio::test]
    async fn the_window_clamp_can_be_lowered_and_raised_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, _server) = (client.unwrap(), accepted.unwrap().0);
        let original = window_clamp(&client).unwrap();
        set_window_clamp(&client, 65_536).unwrap();
        assert_eq!(window_clamp(&client).unwrap(), 65_536);
        set_window_clamp(&client, original).unwrap();
        assert_eq!(window_clamp(&client).unwrap(), original);
        eprintln!("original clamp {original}");
    }
}

/// Writes as many of `bufs` as the socket takes now, like `writev(2)` but with `MSG_NOSIGNAL`:
/// a peer that has gone away gives `EPIPE`, never a `SIGPIPE` that would kill a C program
/// that links the library (Rust's runtime ignores SIGPIPE; C's default is to die of it).
/// std's `write_vectored` on a socket is a plain `writev` and raises it.
pub async fn send_vectored(stream: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            SockRef::from(stream).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
        })
        .await
}

#[cfg(test)]
mod sigpipe_tests {
    use super::*;
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    /// Writing to a connection the peer has reset raises no SIGPIPE. The signal is blocked on
    /// this thread (a test runtime's only thread), so a raised one stays pending where a
    /// signalfd sees it, even though Rust's runtime ignores it.
    #[tokio::test]
    async fn a_vanished_peer_gives_epipe_not_sigpipe() {
        let pipe = SigSet::from(Signal::SIGPIPE);
        pipe.thread_block().unwrap();
        let fd = SignalFd::with_flags(&pipe, SfdFlags::SFD_NONBLOCK).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, server) = (client.unwrap(), accepted.unwrap().0);
        // The peer goes with a reset (linger 0), then its error is read, as a path's reader
        // does, so the next writes meet a dead socket: EPIPE.
        SockRef::from(&server).set_linger(Some(Duration::ZERO)).unwrap();
        drop(server);
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), client.readable()).await;
        let _ = client.try_read(&mut buf);
        let data = [7u8; 1000];
        let mut errors = Vec::new();
        for _ in 0..5 {
            match send_vectored(&client, &[io::IoSlice::new(&data), io::IoSlice::new(&data)]).await {
                Ok(_) => {}
                Err(e) => errors.push(e.kind()),
            }
        }
        assert!(errors.contains(&io::ErrorKind::BrokenPipe), "{errors:?}");
        assert_eq!(fd.read_signal().unwrap().map(|s| s.ssi_signo), None, "SIGPIPE raised");
    }
}
