//! The scout daemon in the lab: a trace replay drives the uplinks while the proxy, subscribed to
//! the daemon, carries a download across a Wi-Fi outage; `status` and `set` act on the daemon.

use std::time::Duration;

use cmm_lab::{HTTP_PORT, Lab, Uplink, pattern, workspace_bin};

/// Wi-Fi fast but far, cellular slow, close and metered (as in the proxy tests): background may
/// not use cell, so it waits while the trace has Wi-Fi down.
const SETTINGS: &str = r#"
default_labels = "ondemand"

[proxy]
listen = ["127.0.0.1:1080"]
connect_timeout = "3s"

[scout]
socket = "SOCKET"

[label.background]
metered = false
"#;

/// Wi-Fi goes down 4 s in and is back 6 s later; the figures differ from the declared ones.
const TRACE: &str = "\
time, network, state, bandwidth_down, bandwidth_up, rtt
0, wifi, up, 40mbit, 20mbit, 25ms
0, cell, up, 3mbit, 1mbit, 90ms
4, wifi, down
10, wifi, up, 40mbit, 20mbit, 25ms
";

fn status_json(lab: &Lab, scout: &str, config: &str) -> serde_json::Value {
    let out = lab.run(&lab.client(), scout, &["--config", config, "status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

fn network<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{status}"))
}

#[test]
fn a_replayed_outage_defers_a_proxied_download_until_wifi_returns() {
    let Some(lab) = Lab::new("a_replayed_outage_defers_a_proxied_download_until_wifi_returns") else {
        return;
    };
    let _servers = lab.start_servers();
    let socket = lab.dir().join("scout.sock");
    let config =
        lab.write_file("proxy.toml", &cmm_lab::config(SETTINGS).replace("SOCKET", socket.to_str().unwrap()));
    let config = config.to_str().unwrap();
    let trace = lab.write_file("trace.csv", TRACE);
    let scout = workspace_bin("cmm-scout");
    let scout = scout.to_str().unwrap();

    // The replay is the daemon; it drives wifi0 (and shapes its download at the router).
    let peer = format!("wifi={}:{}", lab.router(), Uplink::Wifi.router_if());
    let daemon = lab.spawn(
        &lab.client(),
        scout,
        &["--config", config, "replay", trace.to_str().unwrap(), "--drive", "wifi=wifi0", "--peer", &peer],
    );
    daemon.wait_for_line("as the scout daemon on", Duration::from_secs(20));
    let proxy = lab.spawn(&lab.client(), workspace_bin("cmm-proxy"), &["--config", config]);
    let line = proxy.wait_for_line("scout: ", Duration::from_secs(20));
    assert!(line.contains(&format!("daemon at {}", socket.display())), "{line}");
    proxy.wait_for_line("listening on ", Duration::from_secs(20));

    // The daemon's snapshot carries the trace's figures as estimates.
    let status = status_json(&lab, scout, config);
    let wifi = network(&status, "wifi");
    assert_eq!(wifi["up"], true, "{status}");
    assert_eq!(wifi["estimated"]["bandwidth_down"], 40_000_000, "{status}");
    assert_eq!(wifi["estimated"]["rtt"].as_f64(), Some(25.0), "{status}");

    // The trace takes Wi-Fi down; a background download now waits for it.
    daemon.wait_for_line("wifi down (driving wifi0)", Duration::from_secs(20));
    let body = lab.dir().join("body");
    let bytes = 4_000_000u64;
    let curl = lab.spawn(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "90",
            "-o",
            body.to_str().unwrap(),
            "-x",
            "socks5h://background@127.0.0.1:1080",
            &format!("http://server4.lab:{HTTP_PORT}/bytes/{bytes}"),
        ],
    );
    let line = proxy.wait_for_line("deferred:", Duration::from_secs(20));
    assert!(line.contains("metered"), "{line}");
    let status = status_json(&lab, scout, config);
    assert_eq!(network(&status, "wifi")["up"], false, "{status}");
    assert!(curl.exited().is_none(), "curl should wait for Wi-Fi:\n{}", proxy.output());

    // The trace brings it back: the download completes, whole, over Wi-Fi.
    daemon.wait_for_line("wifi up (driving wifi0)", Duration::from_secs(30));
    let status = curl.wait_exit(Duration::from_secs(60)).expect("curl finished");
    assert!(status.success(), "curl failed: {}\nproxy:\n{}", curl.output(), proxy.output());
    let got = std::fs::read(&body).unwrap();
    assert_eq!(got.len() as u64, bytes);
    assert_eq!(pattern::sha256_hex(&got), pattern::pattern_sha256(bytes), "body differs");
    let done = proxy.wait_for_line("outcome=", Duration::from_secs(10));
    assert!(done.contains("network=wifi0") && done.contains("outcome=ok"), "{done}");
    daemon.wait_for_line("trace done", Duration::from_secs(10));

    // `set` forces a network for every subscriber, and `auto` gives it back to the kernel.
    let set = |state: &str| {
        let out = lab.run(&lab.client(), scout, &["--config", config, "set", "wifi", state]);
        assert!(out.status.success(), "set wifi {state}: {}", String::from_utf8_lossy(&out.stderr));
    };
    set("down");
    let status = status_json(&lab, scout, config);
    assert_eq!(network(&status, "wifi")["down_reason"], "forced down", "{status}");
    let out = lab.run(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "3",
            "-x",
            "socks5h://background@127.0.0.1:1080",
            &format!("http://server4.lab:{HTTP_PORT}/bytes/10"),
        ],
    );
    assert!(!out.status.success(), "background must wait while wifi is forced down");
    set("auto");
    let status = status_json(&lab, scout, config);
    assert_eq!(network(&status, "wifi")["up"], true, "{status}");
    let out = lab.run(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "30",
            "-x",
            "socks5h://background@127.0.0.1:1080",
            &format!("http://server4.lab:{HTTP_PORT}/bytes/10"),
        ],
    );
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), proxy.output());

    // Errors a person can act on.
    let out = lab.run(&lab.client(), scout, &["--config", config, "set", "wlan9", "down"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no network is named \"wlan9\""));
}
