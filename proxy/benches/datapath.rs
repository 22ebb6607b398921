//! Data-path benchmark on loopback: one stream's throughput through the proxy against direct,
//! and new connections per second at 1 and 32 concurrent clients.
//!
//! Run: `cargo bench -p cmm-proxy --bench datapath` (add `-- --quick` for a short run, and
//! `-- --compare NAME=ADDR` to measure another SOCKS5 server, e.g. dante, with the same
//! clients, or `-- --relay` for proxy → relay: throughput, CPU per Gbit and memory per idle
//! relayed connection, each side's own). The proxy runs in this process on its own 2-thread
//! runtime (the relay, with `--relay`, in a process of its own); clients are plain blocking
//! threads, as curl or a browser would be.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cmm_policy::Config;
use cmm_proxy::Proxy;
use cmm_scout::Scout;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-relay") {
        serve_relay(Path::new(&args[i + 1]));
        return;
    }
    let secs = if quick { 1.0 } else { 4.0 };

    let source = start_source();
    let hello = start_hello();
    let mut servers: Vec<(String, SocketAddr)> = vec![("cmm-proxy".into(), start_proxy())];
    for (i, a) in args.iter().enumerate() {
        if a == "--compare"
            && let Some((name, addr)) = args.get(i + 1).and_then(|v| v.split_once('='))
        {
            servers.push((name.to_string(), addr.parse().expect("--compare NAME=ADDR")));
        }
    }

    println!("SOCKS5 data path on loopback ({secs} s per figure)");
    let direct = throughput(|| TcpStream::connect(source).unwrap(), secs);
    println!("one stream, direct: {direct:.1} Gbit/s");
    if args.iter().any(|a| a == "--relay") {
        relayed(source, secs);
        return;
    }
    for (name, addr) in &servers {
        let addr = *addr;
        let t = throughput(|| socks_connect(addr, source), secs);
        println!("one stream, {name}: {t:.1} Gbit/s ({:.0}% of direct)", 100.0 * t / direct);
    }
    for workers in [1, 32] {
        let d = conn_rate(workers, secs, move || {
            let mut s = TcpStream::connect(hello).unwrap();
            drain(&mut s);
        });
        println!("new connections/s at {workers:>2} concurrent, direct: {d:.0}/s");
        for (name, addr) in &servers {
            let addr = *addr;
            let p = conn_rate(workers, secs, move || {
                let mut s = socks_connect(addr, hello);
                drain(&mut s);
            });
            println!("new connections/s at {workers:>2} concurrent, {name}: {p:.0}/s");
        }
    }
}

/// A server that sends an endless stream.
fn start_source() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 256 * 1024];
                while s.write_all(&buf).is_ok() {}
            });
        }
    });
    addr
}

/// A server that says one line and closes.
fn start_hello() -> SocketAddr {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let l = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"ok\n").await;
                });
            }
        })
    });
    addr
}

fn start_proxy() -> SocketAddr {
    let mut config = Config::default();
    config.proxy.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.proxy.max_connections = 100_000;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            // Loopback destinations never need a network: an empty manual scout is enough.
            let proxy = Proxy::new(config, Scout::manual(vec![])).await.unwrap();
            tx.send(proxy.local_addrs()[0]).unwrap();
            proxy.serve(std::future::pending()).await;
        })
    });
    rx.recv().unwrap()
}

fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_nodelay(true).unwrap();
    let SocketAddr::V4(v4) = target else { panic!("v4 only") };
    // As curl does: greeting, wait for the method, then the request.
    s.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    s.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 0], "SOCKS5 method refused");
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!((reply[0], reply[1]), (5, 0), "SOCKS5 failed: {reply:?}");
    s
}

fn drain(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Gbit/s read by one client for `secs`.
fn throughput(connect: impl Fn() -> TcpStream, secs: f64) -> f64 {
    let mut s = connect();
    let mut buf = vec![0u8; 256 * 1024];
    // Warm up.
    let mut warm = 0;
    while warm < 64 << 20 {
        warm += s.read(&mut buf).unwrap();
    }
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        total += n as u64;
    }
    total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Connections completed per second by `workers` threads.
fn conn_rate(workers: usize, secs: f64, one: impl Fn() + Send + Sync + Copy + 'static) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    one();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / elapsed
}

/// The `--relay` figures: one stream's throughput through proxy → relay and CPU per Gbit,
/// then memory per idle relayed connection, on each side. The relay runs in a process of its
/// own (this program again, with `--serve-relay`), so each side's memory and CPU are its own.
fn relayed(source: SocketAddr, secs: f64) {
    let (via, relay) = start_relayed_proxy();
    let relay_pid = relay.id();
    let _kill = KillOnDrop(relay);
    let (cpu0, rcpu0) = (cpu_seconds(std::process::id()), cpu_seconds(relay_pid));
    let t0 = Instant::now();
    let t = throughput(|| socks_connect(via, source), secs);
    let (cpu, rcpu) = (cpu_seconds(std::process::id()) - cpu0, cpu_seconds(relay_pid) - rcpu0);
    let gbits = t * t0.elapsed().as_secs_f64();
    println!(
        "one stream, cmm-proxy -> cmm-relay (TLS 1.3, one session over two loopback paths): {t:.2} Gbit/s; \
         CPU-seconds per Gbit: relay {:.2}, proxy with client and source {:.2}",
        rcpu / gbits,
        cpu / gbits
    );
    let idle = 1000;
    let held = start_idle_sink();
    let (rss0, rrss0) = (rss_kib(std::process::id()), rss_kib(relay_pid));
    let conns: Vec<TcpStream> = (0..idle).map(|_| socks_connect(via, held)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let per = (rss_kib(std::process::id()) - rss0) as f64 / idle as f64;
    let rper = (rss_kib(relay_pid) - rrss0) as f64 / idle as f64;
    println!(
        "{idle} idle relayed connections, memory each: relay {rper:.1} KiB, proxy {per:.1} KiB \
         (the proxy's process also holds the clients' and the destination's sockets)"
    );
    drop(conns);
}

/// Kills the relay's process when the benchmark ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--serve-relay DIR`: the relay's process. Serves with `DIR/relay.key`, allowing the key in
/// `DIR/proxy.pub`; prints its address, then serves until killed.
fn serve_relay(dir: &Path) {
    use cmm::tls::{Identity, PublicKey};
    let identity = Identity::from_text(&std::fs::read_to_string(dir.join("relay.key")).unwrap()).unwrap();
    let allowed: PublicKey = std::fs::read_to_string(dir.join("proxy.pub")).unwrap().trim().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let relay = cmm_relay::Relay::bind(cmm_relay::RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            identity,
            allowed: vec![allowed],
            destinations: cmm_relay::Destinations::default(),
            connect_timeout: Duration::from_secs(5),
            half_close_timeout: Duration::from_secs(600),
        })
        .await
        .unwrap();
        println!("{}", relay.local_addr());
        relay.run().await.unwrap();
    })
}

/// A relay (its own process) and a proxy (on a 2-thread runtime in this one) whose loopback
/// traffic rides it, the proxy's two "networks" both bound to `lo`.
fn start_relayed_proxy() -> (SocketAddr, Child) {
    use cmm::tls::Identity;
    use cmm::{Network, NetworkKind};
    let (relay_id, proxy_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let dir = std::env::temp_dir().join(format!("cmm-bench-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("proxy.key"), proxy_id.to_text()).unwrap();
    std::fs::write(dir.join("relay.key"), relay_id.to_text()).unwrap();
    std::fs::write(dir.join("proxy.pub"), proxy_id.public_key().to_string()).unwrap();
    let mut relay = Command::new(std::env::current_exe().unwrap())
        .arg("--serve-relay")
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the relay's process");
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let relay_addr: SocketAddr = line.trim().parse().expect("the relay's address");
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 100000\n\n[relay]\naddress = \"{relay_addr}\"\n\
         public_key = \"{}\"\nkey = \"proxy.key\"\n\n[[rule]]\ncidr = \"127.0.0.0/8\"\nlabels = \"background\"\nvia = \"relay\"\n",
        relay_id.public_key()
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let net = |name: &str, kind| {
                let mut n = Network::new(name, "lo", kind);
                n.addresses = vec!["127.0.0.1".parse().unwrap()];
                n
            };
            let scout =
                Scout::manual(vec![net("wifi", NetworkKind::Wifi), net("cell", NetworkKind::Cellular)]);
            let proxy = Proxy::new(config, scout).await.unwrap();
            tx.send(proxy.local_addrs()[0]).unwrap();
            proxy.serve(std::future::pending()).await;
        })
    });
    (rx.recv().unwrap(), relay)
}

/// A server that accepts connections and keeps them, silent.
fn start_idle_sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in l.incoming().flatten() {
            kept.push(s);
        }
    });
    addr
}

/// Process `pid`'s CPU time (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Process `pid`'s resident memory in KiB.
fn rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
