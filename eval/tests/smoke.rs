//! The evaluation harness end to end, briefly: `cmm-eval --smoke`, every mode under both kinds
//! of outage for a few seconds. (The full run is a benchmark, not a test: its figures are in
//! the README.)

use std::process::Command;

use serde_json::Value;

const README: &str = include_str!("../../README.md");
const EVAL_README: &str = include_str!("../README.md");

#[test]
fn the_readmes_show_the_commands_this_test_runs() {
    for command in ["sudo cargo run --release -p cmm-eval", "--smoke"] {
        assert!(README.contains(command), "the README no longer shows `{command}`");
        assert!(EVAL_README.contains(command), "eval/README.md no longer shows `{command}`");
    }
    assert!(README.contains("eval/results/fg-latency.png"), "the README shows the latest plot");
}

#[test]
fn a_smoke_run_measures_every_mode_and_writes_json_table_and_plot() {
    if let Some(why) = cmm_lab::unavailable() {
        assert!(!cmm_lab::under_ci(), "{why}, and CI=true requires lab tests to run");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = Command::new(env!("CARGO_BIN_EXE_cmm-eval"))
        .args(["--smoke", "--out"])
        .arg(dir.path())
        .output()
        .expect("cmm-eval runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cmm-eval --smoke failed:\n{stderr}");

    let json: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    let runs = json["runs"].as_array().expect("runs");
    let modes =
        ["cmm", "cmm-unpaced", "cmm-nolabels", "cmm-relay", "cmm-relay-nolabels", "default-route", "mptcp"];
    for outage in ["admin", "carrier"] {
        for mode in modes {
            let run = runs
                .iter()
                .find(|r| r["mode"] == mode && r["outage"] == outage)
                .unwrap_or_else(|| panic!("no {mode} run with {outage} outages:\n{stderr}"));
            let latency = &run["latency"];
            assert_eq!(latency["requests"], 8, "{mode} {outage}: one request a second");
            assert!(latency["mean"].as_f64().is_some_and(|m| m > 0.0), "{mode} {outage}: {latency}");
            assert!(run["bg_down_mbit"].as_f64().is_some_and(|m| m > 0.0), "{mode} {outage}: no download");
            assert!(run["bg_up_mbit"].as_f64().is_some_and(|m| m > 0.0), "{mode} {outage}: no upload");
            assert_eq!(run["outages"].as_array().map(Vec::len), Some(1), "{mode} {outage}");
        }
        // Labelled cmm never fails a foreground request: it is on cellular during the outage.
        let cmm = runs.iter().find(|r| r["mode"] == "cmm" && r["outage"] == outage).expect("cmm run");
        assert_eq!(cmm["latency"]["failures"], 0, "cmm {outage}: {}", cmm["latency"]);
        // MPTCP really uses both uplinks.
        let mptcp = runs.iter().find(|r| r["mode"] == "mptcp" && r["outage"] == outage).expect("mptcp run");
        for iface in ["wifi0", "cell0"] {
            let bytes = mptcp["interface_bytes"][iface].as_u64().unwrap_or(0);
            assert!(bytes > 20_000, "mptcp {outage}: {iface} moved only {bytes} bytes");
        }
    }
    let table = std::fs::read_to_string(dir.path().join("table.md")).expect("table.md");
    assert!(table.contains("| mode | outage | FG mean"), "{table}");
    let png = std::fs::read(dir.path().join("fg-latency.png")).expect("fg-latency.png");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the plot is a PNG");
}
