//! How long after Wi-Fi goes away is its unacknowledged data resent on cellular? Measured in the
//! lab (needs root): a client streams background data over Wi-Fi to a server; Wi-Fi is cut by
//! admin down, by carrier loss at the router, or silently black-holed; the figure is the time
//! from just before the cut command to the first resent byte written on cellular.
//!
//! Run: `cargo bench -p cmm-lab --bench failover` (as root).

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmm::{Callbacks, Connector, Labels, Listener, MultiSocket, Policy, Scout};
use cmm_lab::{Cut, Lab, Uplink};
use cmm_policy::Config;

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let Some(lab) = Lab::new("failover bench") else { return };
    let rounds = if std::env::args().any(|a| a == "--quick") { 1 } else { 3 };
    // Server: reads and discards.
    let (tx, rx) = mpsc::channel::<SocketAddr>();
    lab.in_namespace(&lab.server(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move {
            let c =
                Connector::new(Scout::manual(vec![]), Arc::new(Policy::default()), Duration::from_secs(3));
            let l = Listener::bind("10.3.0.2:7001".parse().unwrap(), c).await.unwrap();
            tx.send(l.local_addr()).unwrap();
            loop {
                let s = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    while matches!(s.recv(&mut buf).await, Ok((n, _)) if n > 0) {}
                });
            }
        })
    });
    let addr = rx.recv().unwrap();

    // Client: streams background data and exposes its socket for the counters.
    let shared: Arc<Mutex<Option<MultiSocket>>> = Arc::new(Mutex::new(None));
    let slot = shared.clone();
    lab.in_namespace(&lab.client(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let config = Config::parse(&cmm_lab::config(""), "bench").unwrap();
            let scout = Scout::embedded(config.classifier()).await.unwrap();
            let c = Connector::new(scout, Arc::new(config.policy.clone()), Duration::from_secs(3));
            let s = MultiSocket::connect(&c, addr, Labels::BACKGROUND, Callbacks::default()).await.unwrap();
            *slot.lock().unwrap() = Some(s.clone());
            let buf = vec![7u8; 64 * 1024];
            loop {
                if s.send(&buf, Labels::BACKGROUND).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    });
    let sock = loop {
        if let Some(s) = shared.lock().unwrap().clone() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let cell_sent = || sock.traffic().iter().find(|t| t.0 == "cell").map_or(0, |t| t.1);
    let wifi_up = || sock.paths().iter().any(|p| p.network.name == "wifi" && p.established && !p.troubled);

    println!("time from cutting Wi-Fi to its unacknowledged data going out on cellular:");
    for how in [Cut::Admin, Cut::Carrier, Cut::Blackhole] {
        let mut figures = Vec::new();
        for _ in 0..rounds {
            // Steady state: Wi-Fi up and carrying the stream.
            while !wifi_up() {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(1500));
            let before = cell_sent();
            let t0 = Instant::now();
            tracing::info!("cutting wifi: {how:?}");
            lab.cut(Uplink::Wifi, how);
            let resent = loop {
                if cell_sent() > before {
                    break t0.elapsed();
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    break Duration::MAX;
                }
                if t0.elapsed().as_millis() == 100 {
                    tracing::info!("state at 100 ms: {}", sock.debug_summary());
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            figures.push(resent);
            lab.restore(Uplink::Wifi, how);
            // Outside linkwatch's once-a-second window before the next round.
            std::thread::sleep(Duration::from_secs(3));
        }
        figures.sort();
        let median = figures[figures.len() / 2];
        println!(
            "  {how:?}: median {:.0} ms (of {:?})",
            median.as_secs_f64() * 1000.0,
            figures.iter().map(|d| (d.as_secs_f64() * 1000.0).round() as u64).collect::<Vec<_>>()
        );
    }
}
