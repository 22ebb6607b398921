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
        let mut lo = Network::new("lo", "lo", NetworkKind::Ethernet);
        lo.addresses = vec!["127.0.0.1".parse().unwrap()];
        let connector = Connector::new(Scout::manual(vec![lo]), policy, Duration::from_secs(5));
        let s = MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap();
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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let bytes: u64 = if quick { 512 << 20 } else { 4 << 30 };
    println!("one stream on loopback, {} MiB each, best of 3", bytes >> 20);
    let best = |f: fn(u64) -> f64| (0..3).map(|_| f(bytes)).fold(0.0, f64::max);
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
}
