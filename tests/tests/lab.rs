//! The lab itself: both uplinks carry traffic, are shaped, and can be cut and restored three
//! ways. Everything else stands on this.

use std::time::{Duration, Instant};

use cmm_lab::{Cut, HTTP_PORT, Lab, SERVER, Uplink};

fn curl_ip(lab: &Lab, interface: Option<&str>) -> Result<String, String> {
    let url = format!("http://{SERVER}:{HTTP_PORT}/ip");
    let mut args = vec!["-sS", "--max-time", "5"];
    if let Some(i) = interface {
        args.extend(["--interface", i]);
    }
    args.push(&url);
    let out = lab.run(&lab.client(), "curl", &args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One figure curl writes out (`-w`, e.g. `%{speed_download}`) for a GET of `path` on the lab
/// server through `interface`.
fn curl_figure(lab: &Lab, interface: &str, path: &str, figure: &str, max_time: &str) -> f64 {
    let url = format!("http://{SERVER}:{HTTP_PORT}{path}");
    let args =
        ["-sS", "-o", "/dev/null", "--max-time", max_time, "--interface", interface, "-w", figure, &url];
    let out = lab.run(&lab.client(), "curl", &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().unwrap()
}

#[test]
fn uplinks_carry_traffic_and_cut_three_ways() {
    let Some(lab) = Lab::new("uplinks_carry_traffic_and_cut_three_ways") else { return };
    let _servers = lab.start_servers();

    // The default route prefers wifi; each uplink can be used on its own.
    assert_eq!(curl_ip(&lab, None).unwrap(), "10.1.0.2");
    assert_eq!(curl_ip(&lab, Some("wifi0")).unwrap(), "10.1.0.2");
    assert_eq!(curl_ip(&lab, Some("cell0")).unwrap(), "10.2.0.2");

    for how in [Cut::Admin, Cut::Carrier, Cut::Blackhole] {
        lab.cut(Uplink::Wifi, how);
        assert!(curl_ip(&lab, Some("wifi0")).is_err(), "{how:?}: wifi still carries traffic");
        assert_eq!(curl_ip(&lab, Some("cell0")).unwrap(), "10.2.0.2", "{how:?}: cell must be unaffected");
        lab.restore(Uplink::Wifi, how);
        // Give neighbour discovery a moment after a link comes back.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match curl_ip(&lab, Some("wifi0")) {
                Ok(ip) => {
                    assert_eq!(ip, "10.1.0.2");
                    break;
                }
                Err(e) if Instant::now() > deadline => panic!("{how:?}: wifi not restored: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        assert_eq!(curl_ip(&lab, None).unwrap(), "10.1.0.2", "{how:?}: default route not restored");
    }
}

#[test]
fn uplinks_are_shaped() {
    let Some(lab) = Lab::new("uplinks_are_shaped") else { return };
    let _servers = lab.start_servers();
    // 1 MB over cell (2 Mbit/s) takes about 4 s; over wifi (50 Mbit/s) a fraction of that.
    let speed = |iface: &str| -> f64 {
        curl_figure(&lab, iface, "/bytes/1000000", "%{speed_download}", "30") * 8.0 / 1e6
    };
    let cell = speed("cell0");
    let wifi = speed("wifi0");
    eprintln!("measured: cell {cell:.2} Mbit/s, wifi {wifi:.2} Mbit/s");
    assert!(cell < 3.0, "cell should be shaped to 2 Mbit/s, got {cell:.2}");
    assert!(wifi > 2.0 * cell, "wifi ({wifi:.2}) should be much faster than cell ({cell:.2})");
}

#[test]
fn labs_are_removed_on_drop() {
    let Some(lab) = Lab::new("labs_are_removed_on_drop") else { return };
    let names = [lab.client(), lab.router(), lab.server()];
    let listed = || {
        String::from_utf8_lossy(
            &std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout,
        )
        .to_string()
    };
    for n in &names {
        assert!(listed().contains(n.as_str()));
    }
    drop(lab);
    let after = listed();
    for n in &names {
        assert!(!after.contains(n.as_str()), "{n} left behind");
    }
}

#[test]
fn delay_lines_add_round_trip_time_both_ways() {
    let Some(lab) = Lab::new("delay_lines_add_round_trip_time_both_ways") else { return };
    let _servers = lab.start_servers();
    // The TCP handshake takes one round trip; curl times it.
    let handshake =
        |iface: &str| -> f64 { curl_figure(&lab, iface, "/ip", "%{time_connect}", "10") * 1000.0 };
    let before = (handshake("wifi0"), handshake("cell0"));
    lab.add_delay(Duration::from_millis(20), Duration::from_millis(60));
    let after = (handshake("wifi0"), handshake("cell0"));
    eprintln!("handshake ms before {before:?}, after {after:?}");
    // At least the added delay (both ways); generous above, for a loaded machine.
    assert!(after.0 >= 40.0 && after.0 < 40.0 + 500.0, "wifi {after:?}");
    assert!(after.1 >= 120.0 && after.1 < 120.0 + 500.0, "cell {after:?}");
    // Traffic still flows, and uplinks can still be cut and restored through the delay.
    assert_eq!(curl_ip(&lab, None).unwrap(), "10.1.0.2");
    lab.cut(Uplink::Wifi, Cut::Blackhole);
    assert!(curl_ip(&lab, Some("wifi0")).is_err());
    lab.restore(Uplink::Wifi, Cut::Blackhole);
    assert_eq!(curl_ip(&lab, Some("wifi0")).unwrap(), "10.1.0.2");
}
