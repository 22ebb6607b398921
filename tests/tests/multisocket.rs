//! The multi-socket in the lab: a client in the two-uplink namespace and a server in the server
//! namespace exchange 100 MB of labelled messages while Wi-Fi goes down and up five times, by
//! admin down and by silent carrier loss. Nothing may be lost or duplicated, and each label
//! must travel on its network.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cmm::{Callbacks, Connector, Labels, Listener, MultiSocket, Policy, Scout};
use cmm_lab::{Cut, Lab, Uplink, pattern};
use cmm_policy::Config;
use sha2::{Digest, Sha256};

/// Wi-Fi: fast but far; cellular: slow, near and metered. ONDEMAND (lowest RTT) takes cell,
/// BACKGROUND (highest bandwidth) takes Wi-Fi and may not use the metered cell: while Wi-Fi is
/// down, background waits and on-demand goes on.
const CLIENT_SETTINGS: &str = r#"
[label.background]
metered = false
max_wait = "10m"
"#;

const TOTAL: usize = 100_000_000;
const BG_MESSAGE: usize = 256 * 1024;
const FG_MESSAGE: usize = 4096;

/// What the server saw, per label.
#[derive(Debug)]
struct Received {
    bg: (u64, String),
    fg: (u64, String),
    traffic: Vec<(String, u64, u64)>,
}

fn server(lab: &Lab, tx: mpsc::Sender<std::net::SocketAddr>) -> std::thread::JoinHandle<Received> {
    lab.in_namespace(&lab.server(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let connector =
                Connector::new(Scout::manual(vec![]), Arc::new(Policy::default()), Duration::from_secs(3));
            let listener = Listener::bind("10.3.0.2:7000".parse().unwrap(), connector).await.unwrap();
            tx.send(listener.local_addr()).unwrap();
            let sock = listener.accept().await.unwrap();
            let (mut bg, mut fg) = ((0u64, Sha256::new()), (0u64, Sha256::new()));
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let (n, labels) = sock.recv(&mut buf).await.expect("recv");
                if n == 0 {
                    break;
                }
                let side = if labels == Labels::ONDEMAND { &mut fg } else { &mut bg };
                side.0 += n as u64;
                side.1.update(&buf[..n]);
            }
            let traffic = sock.traffic();
            Received {
                bg: (bg.0, pattern::hex(&bg.1.finalize())),
                fg: (fg.0, pattern::hex(&fg.1.finalize())),
                traffic,
            }
        })
    })
}

#[test]
fn hundred_megabytes_across_five_wifi_outages() {
    let Some(lab) = Lab::new("hundred_megabytes_across_five_wifi_outages") else { return };
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = server(&lab, addr_tx);
    let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("server listening");

    let (progress_tx, progress_rx) = mpsc::channel::<u64>();
    let client = lab.in_namespace(&lab.client(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let config = Config::parse(&cmm_lab::config(CLIENT_SETTINGS), "lab").unwrap();
            let scout = Scout::embedded(config.classifier()).await.unwrap();
            let connector = Connector::new(scout, Arc::new(config.policy.clone()), Duration::from_secs(3));
            let sock = MultiSocket::connect(&connector, addr, Labels::BACKGROUND, Callbacks::default())
                .await
                .unwrap();
            // Connect returns once background's network (Wi-Fi) has its path; until cell's is
            // up too, an on-demand message takes the only path there is, by design. The label
            // check below is about the steady state, so both paths come first.
            let deadline = Instant::now() + Duration::from_secs(30);
            while sock.paths().iter().filter(|p| p.established).count() < 2 {
                assert!(Instant::now() < deadline, "both paths up: {:?}", sock.paths());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // On-demand: a small message every 100 ms, while the background stream runs.
            let fg_sock = sock.clone();
            let fg_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let fg_flag = fg_done.clone();
            let fg = tokio::spawn(async move {
                let (mut sent, mut h) = (0u64, Sha256::new());
                let mut msg = vec![0u8; FG_MESSAGE];
                while !fg_flag.load(std::sync::atomic::Ordering::Relaxed) {
                    pattern::fill(&mut msg, 1 << 40 | sent);
                    fg_sock.send(&msg, Labels::ONDEMAND).await.expect("ondemand send");
                    h.update(&msg);
                    sent += msg.len() as u64;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (sent, pattern::hex(&h.finalize()))
            });
            let (mut sent, mut h) = (0u64, Sha256::new());
            let mut msg = vec![0u8; BG_MESSAGE];
            while (sent as usize) < TOTAL {
                pattern::fill(&mut msg, sent);
                sock.send(&msg, Labels::BACKGROUND).await.expect("background send");
                h.update(&msg);
                sent += msg.len() as u64;
                let _ = progress_tx.send(sent);
            }
            fg_done.store(true, std::sync::atomic::Ordering::Relaxed);
            let fg = fg.await.unwrap();
            // Close delivers everything first; the counters are final after it.
            let counters = sock.clone();
            sock.close().await;
            ((sent, pattern::hex(&h.finalize())), fg, counters.traffic())
        })
    });

    // Five outages, alternating admin down and silent carrier loss, each two seconds, spread
    // over the transfer.
    let started = Instant::now();
    let mut sent_at_cut = Vec::new();
    for i in 0..5 {
        let target = (i + 1) * TOTAL as u64 / 7;
        let mut sent = 0;
        while sent < target {
            sent = progress_rx.recv_timeout(Duration::from_secs(120)).expect("the transfer stalled");
        }
        let how = if i % 2 == 0 { Cut::Admin } else { Cut::Carrier };
        lab.cut(Uplink::Wifi, how);
        sent_at_cut.push((how, sent));
        std::thread::sleep(Duration::from_secs(2));
        lab.restore(Uplink::Wifi, how);
    }
    let ((bg_sent, bg_hash), (fg_sent, fg_hash), client_traffic) = client.join().expect("client");
    let got = server.join().expect("server");
    eprintln!(
        "100 MB in {:.1} s; cuts at {:?}; client traffic {client_traffic:?}; server traffic {:?}",
        started.elapsed().as_secs_f64(),
        sent_at_cut,
        got.traffic
    );

    // Every byte, once, in order, per label.
    assert_eq!(got.bg, (bg_sent, bg_hash), "background stream differs");
    assert_eq!(got.fg, (fg_sent, fg_hash), "on-demand stream differs");
    assert!(bg_sent as usize >= TOTAL);
    assert!(fg_sent > 0);

    // ONDEMAND went over cell (lower RTT), BACKGROUND over Wi-Fi (higher bandwidth), as the
    // per-connection counters show.
    let sent = |name: &str| client_traffic.iter().find(|t| t.0 == name).map_or(0, |t| t.1);
    assert!(sent("wifi") >= bg_sent, "wifi carried {} of {bg_sent} background bytes", sent("wifi"));
    assert!(sent("cell") >= fg_sent, "cell carried {} of {fg_sent} on-demand bytes", sent("cell"));
    assert!(
        sent("cell") < fg_sent + 4 * BG_MESSAGE as u64,
        "background leaked onto metered cell: {}",
        sent("cell")
    );
}

#[test]
fn the_examples_run_in_the_lab() {
    let Some(lab) = Lab::new("the_examples_run_in_the_lab") else { return };
    let server = lab.spawn(&lab.server(), cmm_lab::workspace_example("label_server"), &["10.3.0.2:7000"]);
    server.wait_for_line("listening on", Duration::from_secs(20));
    let config = lab.write_file("client.toml", &cmm_lab::config(CLIENT_SETTINGS));
    let out = lab
        .command(&lab.client(), cmm_lab::workspace_example("label_client"))
        .args(["10.3.0.2:7000", "background", "first", "second"])
        .env("CMM_CONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["[background] got 6 bytes labelled background", "[background] got 7 bytes labelled background"]
    );
    assert!(stderr.contains("up: wifi (wifi0) serves"), "{stderr}");
    assert!(stderr.contains("wifi: 13 bytes sent"), "{stderr}");
    server.wait_for_line("7 bytes labelled background: second", Duration::from_secs(5));
}
