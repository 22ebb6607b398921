//! `lab-delay`: one-way delay lines on TUN devices, for the lab's router namespace.
//!
//! `lab-delay --tun dl-wifi=20ms --tun dl-cell=60ms` creates each TUN device, and every packet
//! the kernel routes into one is written back into it after the delay — so a packet routed
//! through the device twice a round trip (once each way) gains the delay each way. The routes
//! and rules that send traffic through the devices are the lab's business
//! ([`cmm_lab::Lab::add_delay`]). Prints `ready` once the devices exist.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use cmm_lab::delay::DelayLine;
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

/// A delay line's queue, shared by the reader (a tokio task) and the writer (a thread).
struct Shared {
    line: Mutex<DelayLine>,
    arrived: Condvar,
}

async fn run(tun: Arc<Tun>, delay: Duration) {
    let shared =
        Arc::new(Shared { line: Mutex::new(DelayLine::new(delay, MAX_PACKETS)), arrived: Condvar::new() });
    {
        let (tun, shared) = (tun.clone(), shared.clone());
        // A thread of its own: the kernel's timers wake it within tens of microseconds of a
        // packet's due time, where tokio's timer wheel rounds up to the next millisecond (a
        // millisecond more on every packet of a 20 ms line).
        std::thread::spawn(move || write_when_due(&tun, &shared));
    }
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
                shared.line.lock().unwrap_or_else(|e| e.into_inner()).push(packet, Instant::now());
                shared.arrived.notify_one();
            }
            Err(e) => {
                eprintln!("lab-delay: {}: {e}", tun.name());
                std::process::exit(1);
            }
        }
    }
}

/// Writes each packet back to the TUN device when it is due.
fn write_when_due(tun: &Tun, shared: &Shared) {
    let mut line = shared.line.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        if let Some(packet) = line.pop_due(now) {
            drop(line);
            // A TUN write does not block unless the kernel is out of memory; then the packet
            // is lost, as on a real link.
            let _ = tun.try_send(&packet);
            line = shared.line.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        line = match line.next_due() {
            Some(due) => {
                shared
                    .arrived
                    .wait_timeout(line, due.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => shared.arrived.wait(line).unwrap_or_else(|e| e.into_inner()),
        };
    }
}
