//! The workloads, as blocking clients on threads in the client namespace: a small foreground
//! request every second, and background downloads and uploads in loops.
//!
//! Each foreground request is a new connection to the lab's echo server — 4 KiB up, the same
//! 4 KiB back — timed from before the connect to the last byte, with a deadline (a request not
//! done in time is a failure). Background downloads fetch `GET /bytes/N` from the lab's HTTP
//! server; uploads send N bytes to its sink; bytes are counted as they arrive (downloads) or
//! when the sink confirms them (uploads). A transfer that makes no progress for the stall time
//! is abandoned and started again.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cmm_lab::{ECHO_PORT, HTTP_PORT, SINK_PORT};

/// IPPROTO_MPTCP.
const MPTCP: i32 = 262;

/// How the clients reach the server.
#[derive(Clone, Debug)]
pub enum Access {
    /// Through the SOCKS5 proxy at `proxy`, with these usernames (labels) for foreground and
    /// background connections.
    Proxy {
        /// The proxy.
        proxy: SocketAddr,
        /// Username of foreground connections.
        fg_user: Option<String>,
        /// Username of background connections.
        bg_user: Option<String>,
    },
    /// Directly, as the routing table says.
    Direct,
    /// Directly, with MPTCP sockets.
    Mptcp,
}

/// What the clients do.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How they reach the server.
    pub access: Access,
    /// The server.
    pub server: Ipv4Addr,
    /// Bytes of each foreground request (and of its answer).
    pub fg_bytes: usize,
    /// Bytes of each background download.
    pub bg_download: usize,
    /// Bytes of each background upload.
    pub bg_upload: usize,
    /// A foreground request not done in this long is a failure.
    pub fg_timeout: Duration,
    /// A background transfer with no progress for this long is started again.
    pub stall: Duration,
}

/// Background progress, shared with the threads that make it.
#[derive(Default)]
pub struct Progress {
    /// Bytes downloaded.
    pub down: AtomicU64,
    /// Bytes uploaded (confirmed by the sink).
    pub up: AtomicU64,
    /// Transfers abandoned after a stall or an error.
    pub restarts: AtomicU64,
}

/// Time left before `deadline`, or a timeout error.
fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(d)
}

fn connect_direct(addr: SocketAddrV4, mptcp: bool, deadline: Instant) -> io::Result<TcpStream> {
    let protocol = mptcp.then(|| socket2::Protocol::from(MPTCP));
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, protocol)?;
    s.connect_timeout(&SocketAddr::V4(addr).into(), left(deadline)?)?;
    Ok(s.into())
}

/// Reads exactly `buf.len()` bytes, each read bounded by `deadline`.
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed early")),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// SOCKS5 CONNECT through `proxy` to `addr`, as `user` (with an empty password) if given.
fn connect_socks(
    proxy: SocketAddr,
    user: Option<&str>,
    addr: SocketAddrV4,
    deadline: Instant,
) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&proxy, left(deadline)?)?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, if user.is_some() { 2 } else { 0 }])?;
    let mut method = [0u8; 2];
    read_exact_by(&mut s, &mut method, deadline)?;
    if method[1] == 0xff {
        return Err(io::Error::other("the proxy accepts no offered method"));
    }
    if let Some(u) = user {
        let mut auth = vec![1, u.len() as u8];
        auth.extend_from_slice(u.as_bytes());
        auth.push(0); // an empty password, as curl sends
        s.write_all(&auth)?;
        let mut status = [0u8; 2];
        read_exact_by(&mut s, &mut status, deadline)?;
        if status[1] != 0 {
            return Err(io::Error::other("the proxy refused the username"));
        }
    }
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&addr.ip().octets());
    request.extend_from_slice(&addr.port().to_be_bytes());
    s.write_all(&request)?;
    let mut head = [0u8; 4];
    read_exact_by(&mut s, &mut head, deadline)?;
    if head[1] != 0 {
        return Err(io::Error::other(format!("SOCKS reply {}", head[1])));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        t => return Err(io::Error::other(format!("SOCKS reply address type {t}"))),
    };
    let mut bound = [0u8; 18];
    read_exact_by(&mut s, &mut bound[..rest], deadline)?;
    Ok(s)
}

impl Workload {
    /// Opens a connection to the server's `port` (foreground or background).
    fn open(&self, port: u16, background: bool, deadline: Instant) -> io::Result<TcpStream> {
        let addr = SocketAddrV4::new(self.server, port);
        let s = match &self.access {
            Access::Proxy { proxy, fg_user, bg_user } => {
                let user = if background { bg_user } else { fg_user };
                connect_socks(*proxy, user.as_deref(), addr, deadline)?
            }
            Access::Direct => connect_direct(addr, false, deadline)?,
            Access::Mptcp => connect_direct(addr, true, deadline)?,
        };
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// One foreground request: its latency, or why it failed.
    pub fn foreground(&self) -> Result<Duration, String> {
        let start = Instant::now();
        let deadline = start + self.fg_timeout;
        let run = || -> io::Result<()> {
            let mut s = self.open(ECHO_PORT, false, deadline)?;
            let request = vec![b'q'; self.fg_bytes];
            s.set_write_timeout(Some(left(deadline)?))?;
            s.write_all(&request)?;
            let mut answer = vec![0u8; self.fg_bytes];
            read_exact_by(&mut s, &mut answer, deadline)?;
            Ok(())
        };
        run().map(|()| start.elapsed()).map_err(|e| e.to_string())
    }

    /// Downloads in a loop until `stop`.
    pub fn download_loop(&self, stop: &AtomicBool, progress: &Progress) {
        let mut buf = vec![0u8; 256 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let mut run = || -> io::Result<()> {
                let mut s = self.open(HTTP_PORT, true, Instant::now() + self.stall)?;
                let req = format!(
                    "GET /bytes/{} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n",
                    self.bg_download
                );
                s.write_all(req.as_bytes())?;
                // Polled every second for the stop flag; a stall is no progress for `stall`.
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut last_progress = Instant::now();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    match s.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            progress.down.fetch_add(n as u64, Ordering::Relaxed);
                            last_progress = Instant::now();
                        }
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                            if last_progress.elapsed() >= self.stall {
                                return Err(io::Error::new(io::ErrorKind::TimedOut, "stalled"));
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if run().is_err() {
                progress.restarts.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Uploads in a loop until `stop`.
    pub fn upload_loop(&self, stop: &AtomicBool, progress: &Progress) {
        let chunk = vec![b'u'; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let run = || -> io::Result<()> {
                let mut s = self.open(SINK_PORT, true, Instant::now() + self.stall)?;
                s.set_write_timeout(Some(Duration::from_secs(1)))?;
                let mut sent = 0;
                let mut last_progress = Instant::now();
                while sent < self.bg_upload {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let n = chunk.len().min(self.bg_upload - sent);
                    match s.write(&chunk[..n]) {
                        Ok(n) => {
                            sent += n;
                            last_progress = Instant::now();
                        }
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                            if last_progress.elapsed() >= self.stall {
                                return Err(io::Error::new(io::ErrorKind::TimedOut, "stalled"));
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                s.shutdown(Shutdown::Write)?;
                // The sink answers `<bytes> <sha256>` once it has everything.
                let mut answer = String::new();
                s.set_read_timeout(Some(self.stall))?;
                s.read_to_string(&mut answer)?;
                let got: u64 = answer.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
                if got != self.bg_upload as u64 {
                    return Err(io::Error::other(format!("the sink got {got} bytes")));
                }
                progress.up.fetch_add(got, Ordering::Relaxed);
                Ok(())
            };
            if run().is_err() {
                progress.restarts.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Runs the background loops on two threads (in the calling thread's namespace) until `stop`.
pub fn start_background(
    w: Arc<Workload>,
    which: Background,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    if matches!(which, Background::Both | Background::Down) {
        let (w, stop, progress) = (w.clone(), stop.clone(), progress.clone());
        threads.push(std::thread::spawn(move || w.download_loop(&stop, &progress)));
    }
    if matches!(which, Background::Both | Background::Up) {
        threads.push(std::thread::spawn(move || w.upload_loop(&stop, &progress)));
    }
    threads
}

/// Which background loops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Background {
    /// Downloads and uploads (the experiment).
    Both,
    /// Downloads only.
    Down,
    /// Uploads only.
    Up,
    /// None: the latency floor of the links.
    None,
}
