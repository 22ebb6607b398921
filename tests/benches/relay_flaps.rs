//! 20 live connections through proxy → relay, both labels, while Wi-Fi flaps 100 times: does
//! every connection survive with its bytes intact? Measured in the lab (needs root).
//!
//! Run: `cargo bench -p cmm-lab --bench relay_flaps` (`-- --quick`: 20 flaps). Each of 20 curl
//! downloads (10 background, 10 ondemand) is rate-limited so that it stays live through all
//! the flaps; Wi-Fi goes down for 300 ms and comes back for 700 ms, alternately by admin down
//! and by carrier loss. Prints how many connections ended whole and identical.

use std::time::{Duration, Instant};

use cmm_lab::{Cut, HTTP_PORT, Lab, SERVER, Uplink, pattern};

fn main() {
    let Some(lab) = Lab::new("relay flaps bench") else { return };
    let flaps = if std::env::args().any(|a| a == "--quick") { 20 } else { 100 };
    let _servers = lab.start_servers();
    let settings =
        "[proxy]\nlisten = [\"127.0.0.1:1080\"]\nconnect_timeout = \"3s\"\nmax_connections = 1000\n";
    let rp = cmm_lab::relay::start(&lab, settings, "grace = \"120s\"");
    // Long enough to outlive the flaps at the rate limit: 60 KB/s for (flaps + 20) seconds.
    let bytes = 60_000 * (flaps as u64 + 20);
    let curls: Vec<_> = (0..20)
        .map(|i| {
            let labels = if i % 2 == 0 { "background" } else { "ondemand" };
            let out = lab.dir().join(format!("body{i}"));
            let curl = lab.spawn(
                &lab.client(),
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "900",
                    "--limit-rate",
                    "60k",
                    "-o",
                    out.to_str().unwrap(),
                    "-x",
                    &format!("socks5h://{labels}@127.0.0.1:1080"),
                    &format!("http://{SERVER}:{HTTP_PORT}/bytes/{bytes}"),
                ],
            );
            (labels, out, curl)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    for i in 0..flaps {
        let how = if i % 2 == 0 { Cut::Admin } else { Cut::Carrier };
        lab.cut(Uplink::Wifi, how);
        std::thread::sleep(Duration::from_millis(300));
        lab.restore(Uplink::Wifi, how);
        std::thread::sleep(Duration::from_millis(700));
    }
    println!("{flaps} Wi-Fi flaps (300 ms down, 700 ms up) in {:.0?}", t0.elapsed());
    let mut whole = 0;
    for (labels, out, curl) in &curls {
        let ok = curl.wait_exit(Duration::from_secs(900)).is_some_and(|s| s.success());
        let body = std::fs::read(out).unwrap_or_default();
        let intact =
            body.len() as u64 == bytes && pattern::sha256_hex(&body) == pattern::pattern_sha256(bytes);
        if ok && intact {
            whole += 1;
        } else {
            println!(
                "{labels}: curl ok={ok}, {} of {bytes} bytes, intact={intact}: {}",
                body.len(),
                curl.output()
            );
        }
    }
    println!("{whole} of 20 connections (10 background, 10 ondemand) survived whole and identical");
    drop(rp);
}
