//! `lab-delay`: one-way delay lines on TUN devices, for the lab's router namespace.
//!
//! `lab-delay --tun dl-wifi=20ms --tun dl-cell=60ms` creates each TUN device, and every packet
//! the kernel routes into one is written back into it after the delay — so a packet routed
//! through the device twice a round trip (once each way) gains the delay each way. The routes
//! and rules that send traffic through the devices are the lab's business
//! ([`cmm_lab::Lab::add_delay`]). Prints `ready` once the devices exist.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use cmm_lab::delay::DelayLine;
use tokio::sync::Notify;
use tokio_tun::Tun;

#[derive(Parser)]
struct Args {
    /// A delay line: DEVICE=DELAY (e.g. dl-wifi=20ms). Repeatable.
    #[arg(long, required = true)]
    tun: Vec<String>,
}

/// Packets a line may hold: far more than a lab link keeps in flight.
const MAX_PACKETS: usize = 65_536;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut tasks = Vec::new();
    for spec in &args.tun {
        let Some((name, delay)) = spec.split_once('=') else {
            eprintln!("lab-delay: --tun {spec:?}: write DEVICE=DELAY");
            std::process::exit(2);
        };
        let delay = match cmm_policy::units::parse_duration(delay) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("lab-delay: --tun {spec:?}: {e}");
                std::process::exit(2);
            }
        };
        let tun = match Tun::builder().name(name).up().build() {
            Ok(mut t) if !t.is_empty() => Arc::new(t.remove(0)),
            Ok(_) => unreachable!("one queue asked, one given"),
            Err(e) => {
                eprintln!("lab-delay: cannot create {name}: {e}");
                std::process::exit(1);
            }
        };
        tasks.push(tokio::spawn(run(tun, delay)));
    }
    println!("ready");
    for t in tasks {
        let _ = t.await;
    }
}

async fn run(tun: Arc<Tun>, delay: Duration) {
    let line = Arc::new(Mutex::new(DelayLine::new(delay, MAX_PACKETS)));
    let arrived = Arc::new(Notify::new());
    let writer = {
        let (tun, line, arrived) = (tun.clone(), line.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let (packet, next) = {
                    let mut l = line.lock().unwrap_or_else(|e| e.into_inner());
                    (l.pop_due(Instant::now()), l.next_due())
                };
                match (packet, next) {
                    (Some(p), _) => {
                        let _ = tun.send(&p).await;
                    }
                    (None, Some(due)) => tokio::time::sleep_until(due.into()).await,
                    (None, None) => arrived.notified().await,
                }
            }
        })
    };
    // Packets are at most the MTU; a copy of each into a shared region keeps allocation rare.
    let mut buf = vec![0u8; 65_536];
    let mut region = BytesMut::with_capacity(1 << 20);
    loop {
        match tun.recv(&mut buf).await {
            Ok(n) => {
                if region.capacity() < n {
                    region.reserve(1 << 20);
                }
                region.extend_from_slice(&buf[..n]);
                let packet = region.split().freeze();
                line.lock().unwrap_or_else(|e| e.into_inner()).push(packet, Instant::now());
                arrived.notify_one();
            }
            Err(e) => {
                eprintln!("lab-delay: {}: {e}", tun.name());
                break;
            }
        }
    }
    writer.abort();
}
