//! `cmm-eval`: does background traffic delay a person waiting? The experiment of the
//! Intentional Networking paper, in the project's lab.
//!
//! Two uplinks — Wi-Fi 50 Mbit/s with 20 ms one-way delay, up 30 s and down 5 s in turn;
//! cellular 2 Mbit/s with 60 ms — a 4 KiB foreground request every second, and background
//! downloads (4 MB) and uploads (1 MB) in loops. Each mode runs once with Wi-Fi taken down at
//! the client (admin) and once with its carrier lost silently. The report: foreground latency
//! (mean, p50, p95, p99, max, failures), background throughput each way, ratios between modes;
//! as JSON, a Markdown table and a PNG plot.

mod mode;
mod plot;
mod stats;
mod workload;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use clap::Parser;
use cmm_lab::{Cut, Lab, Uplink};
use serde::{Deserialize, Serialize};

use crate::mode::Mode;
use crate::stats::{FgSample, Latency, mbit_per_s, ratio};
use crate::workload::{Background, Progress, Workload};

#[derive(Parser)]
#[command(
    name = "cmm-eval",
    about = "Foreground latency and background throughput: cmm against the default route and MPTCP"
)]
struct Cli {
    /// Length of each run.
    #[arg(long, default_value = "60s", value_parser = duration)]
    duration: Duration,
    /// How long Wi-Fi stays up between outages.
    #[arg(long, default_value = "30s", value_parser = duration)]
    up: Duration,
    /// How long each Wi-Fi outage lasts.
    #[arg(long, default_value = "5s", value_parser = duration)]
    down: Duration,
    /// Modes to run (comma-separated): cmm, cmm-unpaced, cmm-nolabels, cmm-relay,
    /// cmm-relay-nolabels, default-route, mptcp.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Outage kinds to run (comma-separated): admin, carrier.
    #[arg(long, value_delimiter = ',', default_value = "admin,carrier")]
    outages: Vec<String>,
    /// TCP congestion control in the client and server namespaces: cubic (Linux's default, and
    /// phones'), bbr, or reno.
    #[arg(long, default_value = "cubic")]
    cc: String,
    /// Where to write results.json, table.md and fg-latency.png.
    #[arg(long, default_value = "eval/results")]
    out: PathBuf,
    /// A short run of every mode that proves the harness works (what CI runs): 8 s, one
    /// outage from 3 s to 5 s.
    #[arg(long)]
    smoke: bool,
    /// Which background loops run: both (the experiment), down, up, or none (the latency
    /// floor of the links).
    #[arg(long, value_enum, default_value = "both")]
    background: Background,
    /// Also write what the proxy logged in each run to `<mode>-<outage>-proxy.log` in the
    /// output folder, and the relay `<mode>-<outage>-relay.log` (set RUST_LOG for more).
    #[arg(long)]
    proxy_logs: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    cmm_policy::units::parse_duration(s).map_err(|e| e.to_string())
}

/// One run: a mode under one kind of outage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// The mode.
    pub mode: Mode,
    /// `admin` or `carrier`.
    pub outage: String,
    /// Length, s.
    pub duration_s: f64,
    /// Wi-Fi outages, as (from, to) in s.
    pub outages: Vec<(f64, f64)>,
    /// Foreground latency summary.
    pub latency: Latency,
    /// Background download throughput, Mbit/s.
    pub bg_down_mbit: f64,
    /// Background upload throughput, Mbit/s.
    pub bg_up_mbit: f64,
    /// Background transfers abandoned (stalled or failed) and started again.
    pub bg_restarts: u64,
    /// Background bytes moved in each second of the run, [down, up].
    #[serde(default)]
    pub bg_per_second: Vec<[u64; 2]>,
    /// Bytes each client interface moved (received + sent) during the run.
    pub interface_bytes: BTreeMap<String, u64>,
    /// Every foreground request.
    pub fg: Vec<FgSample>,
}

/// Where outages fall between foreground requests (which start on whole seconds): half way,
/// so that a request is not always starting at the very moment Wi-Fi goes.
const OUTAGE_PHASE: Duration = Duration::from_millis(500);

/// The Wi-Fi outages of a run: up `up`, down `down`, in turn, within `duration`.
fn outage_plan(duration: Duration, up: Duration, down: Duration) -> Vec<(Duration, Duration)> {
    let mut plan = Vec::new();
    let mut t = up + OUTAGE_PHASE;
    while t < duration && !down.is_zero() {
        plan.push((t, (t + down).min(duration)));
        t += down + up;
    }
    plan
}

/// Bytes received plus sent by each of the client's uplink interfaces.
fn interface_bytes(lab: &Lab) -> BTreeMap<String, u64> {
    let out = lab.run(&lab.client(), "ip", &["-s", "-j", "link", "show"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut map = BTreeMap::new();
    for l in v.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or("").to_string();
        if name == "wifi0" || name == "cell0" {
            let s = &l["stats64"];
            map.insert(name, s["rx"]["bytes"].as_u64().unwrap_or(0) + s["tx"]["bytes"].as_u64().unwrap_or(0));
        }
    }
    map
}

fn run_one(mode: Mode, how: Cut, cli: &Cli) -> Result<Run, String> {
    let outage = match how {
        Cut::Admin => "admin",
        Cut::Carrier => "carrier",
        Cut::Blackhole => "blackhole",
    };
    let lab = Lab::new(&format!("eval {mode} {outage}"))
        .ok_or("the lab cannot run here (root and iproute2 needed)")?;
    lab.add_delay(Duration::from_millis(20), Duration::from_millis(60));
    for ns in [lab.client(), lab.server()] {
        let out = lab.run(&ns, "sysctl", &["-qw", &format!("net.ipv4.tcp_congestion_control={}", cli.cc)]);
        if !out.status.success() {
            return Err(format!(
                "cannot use congestion control {:?}: {}",
                cli.cc,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let servers = {
        let mut args = vec!["--http", "[::]:8080", "--echo", "[::]:7007", "--sink", "[::]:9000"];
        if mode == Mode::Mptcp {
            args.push("--mptcp");
        }
        let p = lab.spawn(&lab.server(), cmm_lab::lab_server_bin(), &args);
        p.wait_for_line("ready", Duration::from_secs(30));
        p
    };
    let setup = mode::setup(&lab, mode)?;
    let workload = Arc::new(Workload {
        access: setup.access.clone(),
        server: Ipv4Addr::new(10, 3, 0, 2),
        fg_bytes: 4096,
        bg_download: 4_000_000,
        bg_upload: 1_000_000,
        fg_timeout: Duration::from_secs(30),
        stall: Duration::from_secs(30),
    });
    let before = interface_bytes(&lab);
    let plan = outage_plan(cli.duration, cli.up, cli.down);
    let duration = cli.duration;
    let which_background = cli.background;
    let start = Instant::now();

    // The clients, in the client namespace.
    let clients = {
        let workload = workload.clone();
        lab.in_namespace(&lab.client(), move || {
            let stop = Arc::new(AtomicBool::new(false));
            let progress = Arc::new(Progress::default());
            let background = workload::start_background(
                workload.clone(),
                which_background,
                stop.clone(),
                progress.clone(),
            );
            let (tx, rx) = mpsc::channel();
            let mut requests = Vec::new();
            let mut k = 0u32;
            let mut series = Vec::new();
            let mut last = [0u64; 2];
            while Duration::from_secs(u64::from(k)) < duration {
                let at = start + Duration::from_secs(u64::from(k));
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                if k > 0 {
                    let now = [progress.down.load(Ordering::Relaxed), progress.up.load(Ordering::Relaxed)];
                    series.push([now[0] - last[0], now[1] - last[1]]);
                    last = now;
                }
                let (w, tx) = (workload.clone(), tx.clone());
                requests.push(std::thread::spawn(move || {
                    let r = w.foreground();
                    let _ = tx.send((at, r));
                }));
                k += 1;
            }
            std::thread::sleep((start + duration).saturating_duration_since(Instant::now()));
            let totals = (progress.down.load(Ordering::Relaxed), progress.up.load(Ordering::Relaxed));
            series.push([totals.0 - last[0], totals.1 - last[1]]);
            stop.store(true, Ordering::Relaxed);
            for r in requests {
                let _ = r.join();
            }
            drop(tx);
            for b in background {
                let _ = b.join();
            }
            let mut fg: Vec<FgSample> = rx
                .iter()
                .map(|(at, r)| FgSample {
                    at: (at - start).as_secs_f64(),
                    latency_ms: r.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
                    error: r.err(),
                })
                .collect();
            fg.sort_by(|a, b| a.at.total_cmp(&b.at));
            (fg, totals, progress.restarts.load(Ordering::Relaxed), series)
        })
    };

    // The outages, from here.
    for &(cut, restore) in &plan {
        std::thread::sleep((start + cut).saturating_duration_since(Instant::now()));
        lab.cut(Uplink::Wifi, how);
        std::thread::sleep((start + restore).saturating_duration_since(Instant::now()));
        lab.restore(Uplink::Wifi, how);
    }
    let (fg, (down, up), restarts, series) =
        clients.join().map_err(|_| "the client threads panicked".to_string())?;
    let after = interface_bytes(&lab);
    if cli.proxy_logs {
        if let Some(log) = setup.proxy_log() {
            write(&cli.out.join(format!("{mode}-{outage}-proxy.log")), log.as_bytes())?;
        }
        if let Some(log) = setup.relay_log() {
            write(&cli.out.join(format!("{mode}-{outage}-relay.log")), log.as_bytes())?;
        }
    }
    drop(setup);
    drop(servers);
    let secs = duration.as_secs_f64();
    Ok(Run {
        mode,
        outage: outage.to_string(),
        duration_s: secs,
        outages: plan.iter().map(|(a, b)| (a.as_secs_f64(), b.as_secs_f64())).collect(),
        latency: Latency::of(&fg, workload.fg_timeout.as_secs_f64() * 1000.0),
        bg_down_mbit: mbit_per_s(down, secs),
        bg_up_mbit: mbit_per_s(up, secs),
        bg_restarts: restarts,
        bg_per_second: series,
        interface_bytes: after
            .iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0))))
            .collect(),
        fg,
    })
}

/// The Markdown tables: the summary, as in the paper, then every figure.
fn table(runs: &[Run]) -> String {
    let mut out = String::new();
    let find = |m: Mode, o: &str| runs.iter().find(|r| r.mode == m && r.outage == o);
    let outages: Vec<&str> =
        ["admin", "carrier"].into_iter().filter(|o| runs.iter().any(|r| r.outage == *o)).collect();
    let modes: Vec<Mode> = Mode::ALL.into_iter().filter(|m| runs.iter().any(|r| r.mode == *m)).collect();
    let cell = |r: Option<&Run>| match r {
        Some(r) if r.latency.failures > 0 => {
            format!("{:.0} ms, {} of {} failed", r.latency.mean, r.latency.failures, r.latency.requests)
        }
        Some(r) => format!("{:.0} ms", r.latency.mean),
        None => "—".into(),
    };
    out.push_str("| approach |");
    for o in &outages {
        out.push_str(&format!(" FG mean, Wi-Fi lost ({o}) |"));
    }
    out.push_str(&format!(" BG down / up, Mbit/s ({}) |\n|---|", outages.join("; ")));
    for _ in &outages {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    for m in &modes {
        out.push_str(&format!("| {} (`{}`) |", m.describe(), m.name()));
        for o in &outages {
            out.push_str(&format!(" {} |", cell(find(*m, o))));
        }
        let bg: Vec<String> = outages
            .iter()
            .filter_map(|o| find(*m, o))
            .map(|r| format!("{:.1} / {:.1}", r.bg_down_mbit, r.bg_up_mbit))
            .collect();
        out.push_str(&format!(" {} |\n", bg.join("; ")));
    }
    out.push_str("\n| mode | outage | FG mean | p50 | p95 | p99 | max | failed | BG down | BG up | BG restarts | wifi0 / cell0 MB |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let l = &r.latency;
        let mb = |k: &str| r.interface_bytes.get(k).copied().unwrap_or(0) as f64 / 1e6;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {}/{} | {:.1} | {:.1} | {} | {:.0} / {:.0} |\n",
            r.mode,
            r.outage,
            l.mean,
            l.p50,
            l.p95,
            l.p99,
            l.max,
            l.failures,
            l.requests,
            r.bg_down_mbit,
            r.bg_up_mbit,
            r.bg_restarts,
            mb("wifi0"),
            mb("cell0")
        ));
    }
    // Ratios against cmm.
    let mut ratios = Vec::new();
    for o in &outages {
        let Some(c) = find(Mode::Cmm, o) else { continue };
        for m in &modes {
            if *m == Mode::Cmm {
                continue;
            }
            let Some(r) = find(*m, o) else { continue };
            let fg = ratio(r.latency.mean, c.latency.mean).map_or("—".into(), |x| format!("{x:.1}x"));
            let bg =
                ratio(c.bg_down_mbit, r.bg_down_mbit).map_or("—".into(), |x| format!("{:.0}%", x * 100.0));
            ratios.push(format!("| {o} | {m} | {fg} | {bg} |"));
        }
    }
    if !ratios.is_empty() {
        out.push_str(
            "\n| outage | against | its FG mean / cmm's | cmm's BG down / its |\n|---|---|---|---|\n",
        );
        out.push_str(&ratios.join("\n"));
        out.push('\n');
    }
    out
}

const ALLOWED_CC: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Lets namespaces use congestion control `cc`: a namespace other than the first may only
/// default to an algorithm on the machine's allowed list, so `cc` is added to it for the run
/// and the list put back afterwards (on drop).
struct AllowCc(Option<String>);

impl AllowCc {
    fn new(cc: &str) -> Result<AllowCc, String> {
        let list = std::fs::read_to_string(ALLOWED_CC).map_err(|e| format!("{ALLOWED_CC}: {e}"))?;
        let list = list.trim().to_string();
        if list.split_whitespace().any(|a| a == cc) {
            return Ok(AllowCc(None));
        }
        std::fs::write(ALLOWED_CC, format!("{list} {cc}")).map_err(|e| format!("{ALLOWED_CC}: {e}"))?;
        Ok(AllowCc(Some(list)))
    }
}

impl Drop for AllowCc {
    fn drop(&mut self) {
        if let Some(list) = &self.0 {
            let _ = std::fs::write(ALLOWED_CC, list);
        }
    }
}

fn write(path: &Path, contents: &[u8]) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.smoke {
        cli.duration = Duration::from_secs(8);
        cli.up = Duration::from_secs(3);
        cli.down = Duration::from_secs(2);
    }
    let modes: Result<Vec<Mode>, String> = if cli.modes.is_empty() {
        Ok(Mode::ALL.to_vec())
    } else {
        cli.modes.iter().map(|m| Mode::parse(m)).collect()
    };
    let outages: Result<Vec<Cut>, String> = cli
        .outages
        .iter()
        .map(|o| match o.as_str() {
            "admin" => Ok(Cut::Admin),
            "carrier" => Ok(Cut::Carrier),
            other => Err(format!("unknown outage {other:?} (expected admin or carrier)")),
        })
        .collect();
    let (modes, outages) = match (modes, outages) {
        (Ok(m), Ok(o)) => (m, o),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("cmm-eval: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&cli.out) {
        eprintln!("cmm-eval: cannot create {}: {e}", cli.out.display());
        return ExitCode::FAILURE;
    }
    let _allowed = match AllowCc::new(&cli.cc) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cmm-eval: congestion control {}: {e}", cli.cc);
            return ExitCode::FAILURE;
        }
    };
    let mut runs = Vec::new();
    for &how in &outages {
        for &mode in &modes {
            eprintln!("cmm-eval: {mode}, Wi-Fi outages {how:?}, {:?}", cli.duration);
            match run_one(mode, how, &cli) {
                Ok(r) => {
                    eprintln!(
                        "  FG mean {:.0} ms p99 {:.0} ms, {} of {} failed; BG down {:.1} up {:.1} Mbit/s; {:?}",
                        r.latency.mean,
                        r.latency.p99,
                        r.latency.failures,
                        r.latency.requests,
                        r.bg_down_mbit,
                        r.bg_up_mbit,
                        r.interface_bytes
                    );
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("cmm-eval: {mode} {how:?}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let report = serde_json::json!({
        "setup": {
            "wifi": "50 Mbit/s, 20 ms one-way delay",
            "cell": "2 Mbit/s, 60 ms one-way delay",
            "wifi_up_s": cli.up.as_secs_f64(),
            "wifi_down_s": cli.down.as_secs_f64(),
            "foreground": "4 KiB request and 4 KiB answer on a new connection every second, 30 s timeout",
            "background": "4 MB downloads and 1 MB uploads in loops",
            "congestion_control": cli.cc,
        },
        "runs": runs,
    });
    let table = table(&runs);
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    let results = [
        write(&cli.out.join("results.json"), &json),
        write(&cli.out.join("table.md"), table.as_bytes()),
        plot::draw(&runs, &cli.out.join("fg-latency.png")),
    ];
    println!("{table}");
    for r in results {
        if let Err(e) = r {
            eprintln!("cmm-eval: {e}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!("cmm-eval: wrote {}/results.json, table.md, fg-latency.png", cli.out.display());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_alternate_within_the_run() {
        let s = Duration::from_secs;
        let h = |x: u64| Duration::from_millis(x * 1000 + 500);
        assert_eq!(outage_plan(s(60), s(30), s(5)), vec![(h(30), h(35))]);
        assert_eq!(outage_plan(s(80), s(30), s(5)), vec![(h(30), h(35)), (h(65), h(70))]);
        assert_eq!(outage_plan(s(8), s(3), s(2)), vec![(h(3), h(5))]);
        assert_eq!(outage_plan(s(32), s(30), s(5)), vec![(h(30), s(32))]);
        assert!(outage_plan(s(10), s(30), s(5)).is_empty());
    }
}
