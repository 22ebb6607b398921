//! One multi-socket's throughput on loopback against a plain TCP socket.
//!
//! Run: `cargo bench -p cmm --bench throughput` (`-- --quick` for a short run).
//! Both sides run in this process, each on its own 2-thread runtime, like two programs would;
//! both move the same bytes with the same 256 KiB application buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmm::{Callbacks, Connector, Labels, Listener, MultiSocket, Network, NetworkKind, Policy, Scout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUF: usize = 256 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A multi-socket to `addr` over one network on loopback.
async fn connect_over_lo(policy: Arc<Policy>, addr: std::net::SocketAddr) -> MultiSocket {
    let mut lo = Network::new("lo", "lo", NetworkKind::Ethernet);
    lo.addresses = vec!["127.0.0.1".parse().unwrap()];
    let connector = Connector::new(Scout::manual(vec![lo]), policy, Duration::from_secs(5));
    MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap()
}

fn tcp(bytes: u64) -> f64 {
    let server_rt = runtime();
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server_rt.spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; BUF];
        let mut n = 0u64;
        while n < bytes {
            n += s.read(&mut buf).await.unwrap() as u64;
        }
    });
    let client_rt = runtime();
    let start = Instant::now();
    client_rt.block_on(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let buf = vec![0x5au8; BUF];
        let mut n = 0;
        while n < bytes {
            s.write_all(&buf).await.unwrap();
            n += BUF as u64;
        }
    });
    server_rt.block_on(server).unwrap();
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

fn multisocket(bytes: u64) -> f64 {
    multisocket_with(bytes, false)
}

fn multisocket_zero_copy(bytes: u64) -> f64 {
    multisocket_with(bytes, true)
}

fn multisocket_with(bytes: u64, zero_copy: bool) -> f64 {
    let server_rt = runtime();
    let policy = Arc::new(Policy::default());
    let server_connector = Connector::new(Scout::manual(vec![]), policy.clone(), Duration::from_secs(5));
    let listener =
        server_rt.block_on(Listener::bind("127.0.0.1:0".parse().unwrap(), server_connector)).unwrap();
    let addr = listener.local_addr();
    let server = server_rt.spawn(async move {
        let s = listener.accept().await.unwrap();
        let mut buf = vec![0u8; BUF];
        let mut n = 0u64;
        while n < bytes {
            n += if zero_copy {
                s.recv_bytes(BUF).await.unwrap().0.len() as u64
            } else {
                s.recv(&mut buf).await.unwrap().0 as u64
            };
        }
    });
    let client_rt = runtime();
    let start = Instant::now();
    let sock = client_rt.block_on(async move {
        let s = connect_over_lo(policy, addr).await;
        let buf = vec![0x5au8; BUF];
        let shared = bytes::Bytes::from(buf.clone());
        let mut n = 0;
        while n < bytes {
            if zero_copy {
                s.send_bytes(shared.clone(), Labels::BACKGROUND).await.unwrap();
            } else {
                s.send(&buf, Labels::BACKGROUND).await.unwrap();
            }
            n += BUF as u64;
        }
        s
    });
    // The socket stays open until the server has everything.
    server_rt.block_on(server).unwrap();
    let gbps = bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    drop(sock);
    gbps
}

/// Aggregate goodput of `n` streams of one session, each moving `bytes / n`, with (when
/// `stopped`) one more stream whose reader never reads, its writer blocked on its window.
fn streams(bytes: u64, n: usize, stopped: bool) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server_rt = runtime();
    let policy = Arc::new(Policy::default());
    let server_connector = Connector::new(Scout::manual(vec![]), policy.clone(), Duration::from_secs(5));
    let listener =
        server_rt.block_on(Listener::bind("127.0.0.1:0".parse().unwrap(), server_connector)).unwrap();
    let addr = listener.local_addr();
    let per = bytes / n as u64;
    let server = server_rt.spawn(async move {
        let s = listener.accept().await.unwrap();
        let mut readers = Vec::new();
        let mut held = None;
        for i in 0..n + usize::from(stopped) {
            let mut st = s.accept_stream().await.unwrap();
            if stopped && i == 0 {
                held = Some(st);
                continue;
            }
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; BUF];
                while st.read(&mut buf).await.unwrap() > 0 {}
            }));
        }
        for r in readers {
            r.await.unwrap();
        }
        drop(held);
        s
    });
    let client_rt = runtime();
    let start = Instant::now();
    let sock = client_rt.block_on(async move {
        let s = connect_over_lo(policy, addr).await;
        if stopped {
            let mut st = s.open_stream(Labels::BACKGROUND).unwrap();
            tokio::spawn(async move {
                let filler = vec![1u8; BUF];
                // Blocks once the stream's window is full, for good.
                while st.write_all(&filler).await.is_ok() {}
            });
        }
        let mut writers = Vec::new();
        for _ in 0..n {
            let mut st = s.open_stream(Labels::BACKGROUND).unwrap();
            writers.push(tokio::spawn(async move {
                let buf = vec![0x5au8; BUF];
                let mut left = per as usize;
                while left > 0 {
                    let k = left.min(BUF);
                    st.write_all(&buf[..k]).await.unwrap();
                    left -= k;
                }
                st.shutdown().await.unwrap();
                st
            }));
        }
        let mut keep = Vec::new();
        for w in writers {
            keep.push(w.await.unwrap());
        }
        (s, keep)
    });
    let _ = server_rt.block_on(server).unwrap();
    let gbps = (per * n as u64) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    drop(sock);
    gbps
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let bytes: u64 = if quick { 512 << 20 } else { 4 << 30 };
    println!("one stream on loopback, {} MiB each, best of 3", bytes >> 20);
    let best = |f: fn(u64) -> f64| (0..3).map(|_| f(bytes)).fold(0.0, f64::max);
    if std::env::args().any(|a| a == "--streams-only") {
        for (n, stopped) in [(1, false), (100, false), (100, true)] {
            let g = (0..3).map(|_| streams(bytes, n, stopped)).fold(0.0, f64::max);
            println!("{n} streams, stopped={stopped}: {g:.2} Gbit/s");
        }
        return;
    }
    if std::env::args().any(|a| a == "--tcp-only") {
        println!("plain TCP (tokio):  {:.2} Gbit/s", best(tcp));
        return;
    }
    if std::env::args().any(|a| a == "--zero-copy-only") {
        println!("cmm send_bytes/recv_bytes:  {:.2} Gbit/s", best(multisocket_zero_copy));
        return;
    }
    if std::env::args().any(|a| a == "--cmm-only") {
        println!("cmm multi-socket:   {:.2} Gbit/s", best(multisocket));
        return;
    }
    let t = best(tcp);
    let m = best(multisocket);
    let z = best(multisocket_zero_copy);
    println!("plain TCP (tokio):                     {t:.2} Gbit/s");
    println!("cmm multi-socket, send/recv (copies):  {m:.2} Gbit/s ({:.0}% of TCP)", 100.0 * m / t);
    println!("cmm multi-socket, send_bytes/recv_bytes: {z:.2} Gbit/s ({:.0}% of TCP)", 100.0 * z / t);
    let one = (0..3).map(|_| streams(bytes, 1, false)).fold(0.0, f64::max);
    let hundred = (0..3).map(|_| streams(bytes, 100, false)).fold(0.0, f64::max);
    let stopped = (0..3).map(|_| streams(bytes, 100, true)).fold(0.0, f64::max);
    println!("streams (AsyncRead/AsyncWrite), 1 stream: {one:.2} Gbit/s");
    println!("100 streams at once: {hundred:.2} Gbit/s ({:.0}% of one)", 100.0 * hundred / one);
    println!(
        "100 streams, one more whose reader stopped: {stopped:.2} Gbit/s ({:.0}% of 100 without)",
        100.0 * stopped / hundred
    );
}
