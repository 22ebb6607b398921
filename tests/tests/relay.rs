//! Proxy → relay → destination in the lab, with curl as the client: the relay runs in the
//! server's namespace, the proxy in the client's with its two uplinks, and a download through
//! the relay survives Wi-Fi going away mid-transfer — admin down, carrier loss, a silent
//! blackhole — with every byte identical.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cmm_lab::download::Download;
use cmm_lab::relay::RelayProxy;
use cmm_lab::{Cut, HTTP_PORT, Lab, Proc, SERVER, SINK_PORT, Uplink, pattern, socks, workspace_bin};

const README: &str = include_str!("../../README.md");

/// Asserts the README shows `command` verbatim, and returns it.
fn readme(command: &str) -> &str {
    assert!(README.contains(command), "the README no longer shows:\n  {command}");
    command
}

/// PATH with the workspace's binaries first (as after `cargo install`).
fn path_env() -> String {
    let bin_dir = workspace_bin("cmm-relay").parent().unwrap().to_path_buf();
    format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// `sh -c command` in namespace `ns` and folder `cwd`, with the workspace's binaries on PATH
/// (as after `cargo install`); its stdout.
fn sh(lab: &Lab, ns: &str, cwd: &Path, command: &str) -> String {
    let path = path_env();
    let out =
        lab.command(ns, "sh").args(["-c", command]).current_dir(cwd).env("PATH", path).output().expect("sh");
    assert!(
        out.status.success(),
        "`{command}` failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_readme_relay_commands_run_as_written() {
    let Some(lab) = Lab::new("the_readme_relay_commands_run_as_written") else { return };
    let _servers = lab.start_servers();
    let (server_dir, laptop_dir) = (lab.dir().join("server"), lab.dir().join("laptop"));
    std::fs::create_dir_all(&server_dir).unwrap();
    std::fs::create_dir_all(&laptop_dir).unwrap();
    // On the server: a key, whose public half the user copies to the laptop.
    let relay_public = sh(&lab, &lab.server(), &server_dir, readme("cmm-relay keygen relay.key"));
    std::fs::write(laptop_dir.join("relay.pub"), format!("{relay_public}\n")).unwrap();
    // On the laptop: its key (the public half goes to the server), the config, the proxy.
    sh(&lab, &lab.client(), &laptop_dir, readme("cmm-relay keygen proxy.key > proxy.pub"));
    std::fs::copy(laptop_dir.join("proxy.pub"), server_dir.join("proxy.pub")).unwrap();
    let printf = readme(
        r#"printf '[relay]\naddress = "relay.example.net:7443"\npublic_key = "%s"\nkey = "proxy.key"\n' "$(cat relay.pub)" > proxy.toml"#,
    );
    sh(&lab, &lab.client(), &laptop_dir, &printf.replace("relay.example.net", SERVER));
    let serve = readme(r#"cmm-relay serve --listen 0.0.0.0:7443 --key relay.key --allow "$(cat proxy.pub)""#);
    let path = path_env();
    let mut cmd = lab.command(&lab.server(), "sh");
    cmd.args(["-c", &format!("exec {serve}")]).current_dir(&server_dir).env("PATH", &path);
    let relay = lab.spawn_command(cmd);
    relay.wait_for_line("relay serving", Duration::from_secs(20));
    let mut cmd = lab.command(&lab.client(), "sh");
    cmd.args(["-c", &format!("exec {}", readme("cmm-proxy --config proxy.toml"))])
        .current_dir(&laptop_dir)
        .env("PATH", &path);
    let proxy = lab.spawn_command(cmd);
    proxy.wait_for_line("listening on ", Duration::from_secs(20));
    // `curl -x socks5h://background@127.0.0.1:1080 …` rides the relay.
    readme("curl -x socks5h://background@127.0.0.1:1080 …");
    let bytes = 1_000_000u64;
    let out = lab.run(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-x",
            "socks5h://background@127.0.0.1:1080",
            &format!("http://{SERVER}:{HTTP_PORT}/bytes/{bytes}"),
        ],
    );
    assert!(
        out.status.success(),
        "curl: {}\nproxy:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.output()
    );
    assert_eq!(pattern::sha256_hex(&out.stdout), pattern::pattern_sha256(bytes));
    let line = proxy.wait_for_line("outcome=", Duration::from_secs(10));
    assert!(line.contains("network=relay") && line.contains("outcome=ok"), "{line}");
    relay.wait_for_line("stream done", Duration::from_secs(10));
}

struct RelayLab {
    lab: Lab,
    _servers: Proc,
    _relay: Proc,
    proxy: Proc,
}

fn start(test: &str) -> Option<RelayLab> {
    let lab = Lab::new(test)?;
    let servers = lab.start_servers();
    let settings = "default_labels = \"ondemand\"\n\n[proxy]\nlisten = [\"127.0.0.1:1080\"]\nconnect_timeout = \"3s\"\n\n[label.small]\nvia = \"direct\"\n";
    let RelayProxy { relay, proxy } = cmm_lab::relay::start(&lab, settings, "");
    Some(RelayLab { lab, _servers: servers, _relay: relay, proxy })
}

#[test]
fn a_download_through_the_relay_survives_wifi_going_away_mid_transfer() {
    let Some(p) = start("a_download_through_the_relay_survives_wifi_going_away_mid_transfer") else { return };
    let bytes = 24_000_000u64;
    for (i, how) in [Cut::Admin, Cut::Carrier, Cut::Blackhole].into_iter().enumerate() {
        let t0 = Instant::now();
        let d = Download::start(&p.lab, &format!("body{i}"), "background", bytes, None, &[]);
        // Under way on Wi-Fi (50 Mbit/s: about 4 s for all of it), then Wi-Fi goes for 3 s;
        // bytes go on over cellular meanwhile.
        d.wait_for(bytes / 6, Duration::from_secs(60));
        let cut_at = Instant::now();
        p.lab.cut(Uplink::Wifi, how);
        let mut stall = d.longest_stall(cut_at + Duration::from_secs(3));
        assert!(d.curl.exited().is_none(), "{how:?}: curl ended while Wi-Fi was away: {}", d.curl.output());
        p.lab.restore(Uplink::Wifi, how);
        stall = stall.max(d.longest_stall(Instant::now() + Duration::from_secs(150)));
        eprintln!("{how:?}: longest stall {stall:?}");
        if let Err(e) = d.finish(Duration::from_secs(150)) {
            panic!("{how:?}: {e}\nproxy:\n{}", p.proxy.output());
        }
        eprintln!("{how:?}: {bytes} bytes intact in {:?}", t0.elapsed());
    }
    // Every connection rode the relay and ended well.
    let done = p.proxy.wait_for_lines("outcome=", 3, Duration::from_secs(10));
    assert!(done.iter().all(|l| l.contains("network=relay") && l.contains("outcome=ok")), "{done:?}");
    // SMALL traffic goes direct by its label policy (`via = "direct"`): on cellular, the
    // lowest RTT, from this machine.
    let out = p.lab.run(
        &p.lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "30",
            "-x",
            "socks5h://small@127.0.0.1:1080",
            &format!("http://{SERVER}:{HTTP_PORT}/ip"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.2.0.2", "SMALL did not go direct over cell");
    let line = p.proxy.wait_for_lines("outcome=", 4, Duration::from_secs(10)).pop().unwrap();
    assert!(line.contains("network=cell0"), "{line}");
}

/// `curl` through the proxy with `labels` for a few bytes from the lab server; its output.
fn fetch_small(lab: &Lab, labels: &str, max_time: &str) -> std::process::Output {
    lab.run(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            max_time,
            "-x",
            &format!("socks5h://{labels}@127.0.0.1:1080"),
            &format!("http://{SERVER}:{HTTP_PORT}/bytes/1000"),
        ],
    )
}

/// Background kept off the metered cellular link waits for Wi-Fi when Wi-Fi goes; the
/// bytes of it that Wi-Fi lost leave a gap in the session that only Wi-Fi can fill. A
/// connection the user waits for, made meanwhile over cellular, must not wait for that gap
/// (it did: the relay noticed new streams only when the session's bytes arrived in order).
#[test]
fn an_ondemand_connection_is_served_over_cellular_while_background_waits_for_wifi() {
    let test = "an_ondemand_connection_is_served_over_cellular_while_background_waits_for_wifi";
    let Some(lab) = Lab::new(test) else { return };
    let _servers = lab.start_servers();
    let settings = "[proxy]\nlisten = [\"127.0.0.1:1080\"]\nconnect_timeout = \"3s\"\n\n[label.background]\nmetered = false\n";
    let RelayProxy { relay, proxy } = cmm_lab::relay::start(&lab, settings, "");
    let warm = fetch_small(&lab, "ondemand", "30");
    assert!(warm.status.success(), "{}\nproxy:\n{}", String::from_utf8_lossy(&warm.stderr), proxy.output());
    // A background upload to the sink, as fast as Wi-Fi takes it.
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let upload = {
        let (stop, sent) = (stop.clone(), sent.clone());
        lab.in_namespace(&lab.client(), move || {
            let proxy = "127.0.0.1:1080".parse().unwrap();
            let mut s = socks::request(proxy, Some("background"), socks::CONNECT, SERVER, SINK_PORT)
                .expect("socks")
                .expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let buf = vec![0x5au8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match s.write(&buf) {
                    Ok(n) => _ = sent.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        })
    };
    let t0 = Instant::now();
    while sent.load(Ordering::Relaxed) < 8_000_000 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the upload never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.cut(Uplink::Wifi, Cut::Admin);
    std::thread::sleep(Duration::from_millis(500));
    // Wi-Fi stays away for all of this: each request is served over cellular or not at all.
    let outs: Vec<_> = (0..3).map(|_| fetch_small(&lab, "ondemand", "15")).collect();
    lab.restore(Uplink::Wifi, Cut::Admin);
    stop.store(true, Ordering::Relaxed);
    let upload = upload.join().unwrap();
    for out in &outs {
        assert!(
            out.status.success() && out.stdout.len() == 1000,
            "an ONDEMAND request failed while Wi-Fi was down: {}\nproxy:\n{}\nrelay:\n{}",
            String::from_utf8_lossy(&out.stderr),
            proxy.output(),
            relay.output()
        );
    }
    assert_eq!(upload, Ok(()), "the background upload failed");
}
