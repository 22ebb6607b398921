//! A 100 MB download through proxy → relay while Wi-Fi goes away and comes back five times by
//! each of admin down, carrier loss and a silent blackhole: does curl end well with every byte
//! identical, and how long does the download stand still after each cut? Measured in the lab
//! (needs root), with the evaluation's link delays (Wi-Fi 20 ms, cellular 60 ms one way).
//!
//! Run: `cargo bench -p cmm-lab --bench relay_outages` (`-- --quick`: one cut of each kind and
//! 30 MB; `-- --no-delay`: links without added delay; `-- --logs DIR`: keep what the proxy and
//! the relay logged, with `RUST_LOG` as set). The server sends a steady 0.9 MB/s (7 Mbit/s, more
//! than cellular carries) so that the download outlives the fifteen cuts; each cut lasts 3 s
//! and Wi-Fi is back for 4 s after it.

use std::time::{Duration, Instant};

use cmm_lab::download::Download;
use cmm_lab::{Cut, Lab, Uplink};

fn main() {
    let Some(lab) = Lab::new("relay outages bench") else { return };
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, bytes) = if quick { (1, 30_000_000) } else { (5, 100_000_000) };
    let _servers = lab.start_servers();
    if !args.iter().any(|a| a == "--no-delay") {
        lab.add_delay(Duration::from_millis(20), Duration::from_millis(60));
    }
    let settings = "[proxy]\nlisten = [\"127.0.0.1:1080\"]\nconnect_timeout = \"3s\"\n";
    let rp = cmm_lab::relay::start(&lab, settings, "");
    let d = Download::start(&lab, "body", "background", bytes, Some(900_000), &[]);
    d.wait_for(2_000_000, Duration::from_secs(60));
    let t0 = Instant::now();
    let mut worst = [Duration::ZERO; 3];
    for round in 0..rounds {
        for (k, how) in [Cut::Admin, Cut::Carrier, Cut::Blackhole].into_iter().enumerate() {
            let cut_at = Instant::now();
            lab.cut(Uplink::Wifi, how);
            let during = d.longest_stall(cut_at + Duration::from_secs(3));
            lab.restore(Uplink::Wifi, how);
            let after = d.longest_stall(Instant::now() + Duration::from_secs(4));
            println!(
                "round {}: {how:?}: longest stall {during:.2?} while Wi-Fi was away, {after:.2?} after it came back ({} MB so far)",
                round + 1,
                d.size() / 1_000_000
            );
            worst[k] = worst[k].max(during).max(after);
        }
    }
    let outcome = d.finish(Duration::from_secs(600));
    println!(
        "{bytes} bytes, {} cuts in {:.0?}: {}",
        rounds * 3,
        t0.elapsed(),
        match &outcome {
            Ok(()) => "curl exited 0, every byte identical".to_string(),
            Err(e) => format!("FAILED: {e}\nproxy:\n{}", rp.proxy.output()),
        }
    );
    println!(
        "longest stall: admin {:.2?}, carrier {:.2?}, blackhole {:.2?} (goals 500 ms, 500 ms, 1.5 s)",
        worst[0], worst[1], worst[2]
    );
    if let Some(dir) = args.iter().position(|a| a == "--logs").and_then(|i| args.get(i + 1)) {
        std::fs::create_dir_all(dir).expect("--logs DIR");
        std::fs::write(format!("{dir}/proxy.log"), rp.proxy.output()).expect("write proxy.log");
        std::fs::write(format!("{dir}/relay.log"), rp.relay.output()).expect("write relay.log");
    }
    drop(rp);
    if outcome.is_err() {
        std::process::exit(1);
    }
}
