//! Network traces: what each network did over time, replayed for emulation.
//!
//! A trace is CSV, one event per line: `time, network, state[, bandwidth_down, bandwidth_up,
//! rtt]` — `30, wifi, down` or `35, wifi, up, 50mbit, 20mbit, 40ms`. Time is seconds from the
//! start (or `1500ms`); `#` starts a comment; a line `T, end` ends the trace at T (for looping).
//!
//! Replaying reports each network's state and figures to subscribers. For networks told to
//! drive a real interface (a lab namespace), it also takes the link down and up — saving and
//! restoring its default routes, which the kernel deletes when a link goes down — and applies
//! the upstream rate with a TBF qdisc. Parsing and timing ([`Trace`], [`Player`]) do no I/O.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cmm_policy::units::{parse_duration, parse_rate};
use cmm_policy::{Figures, Network, NetworkKind};

use crate::scout::Scout;

/// One event of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEvent {
    /// When, from the start.
    pub at: Duration,
    /// Which network (its name).
    pub network: String,
    /// Up or down.
    pub up: bool,
    /// Its figures from then on (when up).
    pub figures: Figures,
    /// Line in the trace file.
    pub line: usize,
}

/// A parsed trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Events, in time order.
    pub events: Vec<TraceEvent>,
    /// When the trace ends (for looping): an `end` line, else the last event.
    pub end: Duration,
}

/// A line of a trace that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct TraceError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl Trace {
    /// Parses trace text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Trace, TraceError> {
        let err = |line: usize, message: String| TraceError { file: file.to_string(), line, message };
        let mut events = Vec::new();
        let mut end: Option<Duration> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split(',').map(str::trim).collect();
            if fields[0].eq_ignore_ascii_case("time") {
                continue; // a header line
            }
            if fields.len() < 2 {
                return Err(err(line, "expected time, network, state[, down, up, rtt]".into()));
            }
            let at = parse_duration(fields[0]).map_err(|e| err(line, format!("time: {e}")))?;
            if fields[1].eq_ignore_ascii_case("end") {
                end = Some(at);
                continue;
            }
            let network = fields[1].to_string();
            if network.is_empty() {
                return Err(err(line, "empty network name".into()));
            }
            let up = match fields.get(2).map(|s| s.to_ascii_lowercase()).as_deref() {
                Some("up") => true,
                Some("down") => false,
                other => return Err(err(line, format!("state {:?} is not up or down", other.unwrap_or("")))),
            };
            let opt = |k: usize| fields.get(k).copied().filter(|s| !s.is_empty());
            let rate = |k: usize, what: &str| -> Result<Option<u64>, TraceError> {
                opt(k).map(|s| parse_rate(s).map_err(|e| err(line, format!("{what}: {e}")))).transpose()
            };
            let figures = Figures {
                bandwidth_down: rate(3, "bandwidth_down")?,
                bandwidth_up: rate(4, "bandwidth_up")?,
                rtt: opt(5)
                    .map(|s| parse_duration(s).map_err(|e| err(line, format!("rtt: {e}"))))
                    .transpose()?,
            };
            if fields.len() > 6 {
                return Err(err(line, format!("{} fields; at most 6", fields.len())));
            }
            if events.last().is_some_and(|e: &TraceEvent| e.at > at) {
                return Err(err(line, "events must be in time order".into()));
            }
            events.push(TraceEvent { at, network, up, figures, line });
        }
        if events.is_empty() {
            return Err(err(0, "the trace has no events".into()));
        }
        let last = events.last().map_or(Duration::ZERO, |e| e.at);
        let end = end.unwrap_or(last).max(last);
        Ok(Trace { events, end })
    }

    /// The networks the trace names, in order of first appearance.
    pub fn networks(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in &self.events {
            if !out.contains(&e.network) {
                out.push(e.network.clone());
            }
        }
        out
    }
}

/// Walks a trace in time, once or in a loop.
pub struct Player {
    trace: Trace,
    looped: bool,
    next: usize,
    /// Start of the current pass, from the start of the replay.
    pass_start: Duration,
}

impl Player {
    /// A player at the start of `trace`.
    pub fn new(trace: Trace, looped: bool) -> Player {
        Player { trace, looped, next: 0, pass_start: Duration::ZERO }
    }

    /// When the next event is due (from the start of the replay); `None` when done.
    pub fn next_at(&self) -> Option<Duration> {
        if let Some(e) = self.trace.events.get(self.next) {
            return Some(self.pass_start + e.at);
        }
        if self.looped && !self.trace.end.is_zero() {
            return Some(self.pass_start + self.trace.end + self.trace.events[0].at);
        }
        None
    }

    /// The events due by `elapsed`, in order.
    pub fn due(&mut self, elapsed: Duration) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        loop {
            if self.next == self.trace.events.len() {
                if !self.looped || self.trace.end.is_zero() || elapsed < self.pass_start + self.trace.end {
                    return out;
                }
                self.pass_start += self.trace.end;
                self.next = 0;
            }
            let e = &self.trace.events[self.next];
            if self.pass_start + e.at > elapsed {
                return out;
            }
            out.push(e.clone());
            self.next += 1;
        }
    }
}

/// A network made up from a trace (no real interface behind it).
pub fn emulated_network(name: &str) -> Network {
    let kind = NetworkKind::guess(name);
    let kind = if kind == NetworkKind::Other && name.to_ascii_lowercase().contains("cell") {
        NetworkKind::Cellular
    } else {
        kind
    };
    let mut n = Network::new(name, name, kind);
    n.metered = kind == NetworkKind::Cellular;
    n
}

/// A real interface that a replay acts on for one network of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The interface, in this namespace: taken down and up, its upload shaped.
    pub interface: String,
    /// The far end of the link, as (network namespace, interface): its egress, the download,
    /// is shaped too. Without it the download rate is only reported.
    pub peer: Option<(String, String)>,
}

/// Plays `trace` onto `scout` until it ends (or forever, looped). `drive` maps network names
/// to interfaces to act on. Other networks are forced in the scout only: up and down for a
/// manual scout (the trace is their only source); for one that watches the kernel, down, and
/// back to the kernel's word when the trace says up — a trace cannot conjure a route.
pub async fn play(scout: Scout, trace: Trace, drive: BTreeMap<String, Drive>, looped: bool) {
    let mut player = Player::new(trace, looped);
    let start = Instant::now();
    let mut routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let emulated = scout.source() == "manual";
    while let Some(at) = player.next_at() {
        tokio::time::sleep_until((start + at).into()).await;
        for e in player.due(start.elapsed()) {
            let driven = drive.get(&e.network).cloned();
            tracing::info!(
                "trace line {}: {} {}{}",
                e.line,
                e.network,
                if e.up { "up" } else { "down" },
                driven.as_ref().map(|d| format!(" (driving {})", d.interface)).unwrap_or_default()
            );
            let target = driven.as_ref().map_or(e.network.as_str(), |d| d.interface.as_str());
            scout.set_estimate(target, e.figures);
            match driven {
                Some(d) if e.up => {
                    let saved = routes.remove(&d.interface).unwrap_or_default();
                    if let Err(msg) = link_up(&d, saved, e.figures) {
                        tracing::warn!("trace line {}: {msg}", e.line);
                    }
                }
                Some(d) => match link_down(&d.interface) {
                    Ok(saved) => {
                        routes.insert(d.interface, saved);
                    }
                    Err(msg) => tracing::warn!("trace line {}: {msg}", e.line),
                },
                None if e.up => scout.set_override(&e.network, emulated.then_some(true)),
                None => scout.set_override(&e.network, Some(false)),
            }
        }
    }
    tracing::info!("trace done");
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Takes `iface` down, returning the default routes the kernel is about to delete, as `ip`
/// arguments to restore them.
fn link_down(iface: &str) -> Result<Vec<String>, String> {
    let mut saved = Vec::new();
    for family in ["-4", "-6"] {
        let json = run(&["ip", family, "-j", "route", "show", "default", "dev", iface])?;
        let routes: serde_json::Value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
        for r in routes.as_array().into_iter().flatten() {
            let mut spec = format!("{family} route replace default");
            if let Some(gw) = r.get("gateway").and_then(|g| g.as_str()) {
                spec.push_str(&format!(" via {gw}"));
            }
            spec.push_str(&format!(" dev {iface}"));
            if let Some(m) = r.get("metric").and_then(|m| m.as_u64()) {
                spec.push_str(&format!(" metric {m}"));
            }
            saved.push(spec);
        }
    }
    // Keep IPv6 addresses across the down (the kernel drops them by default).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{iface}/keep_addr_on_down"), "1");
    run(&["ip", "link", "set", iface, "down"])?;
    Ok(saved)
}

/// Brings the driven interface up, restores its default routes, and shapes the link: upload
/// on the interface, download on the peer when there is one.
fn link_up(d: &Drive, routes: Vec<String>, figures: Figures) -> Result<(), String> {
    run(&["ip", "link", "set", &d.interface, "up"])?;
    for r in routes {
        let mut args = vec!["ip"];
        args.extend(r.split_whitespace());
        run(&args)?;
    }
    if let Some(bits) = figures.bandwidth_up.filter(|r| *r > 0) {
        run(&tbf(&[], &d.interface, bits).iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    if let (Some((ns, iface)), Some(bits)) = (&d.peer, figures.bandwidth_down.filter(|r| *r > 0)) {
        let args = tbf(&["ip", "netns", "exec", ns], iface, bits);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// The `tc` command (after `prefix`) that shapes `iface`'s egress to `bits` per second.
fn tbf(prefix: &[&str], iface: &str, bits: u64) -> Vec<String> {
    let rate = format!("{bits}bit");
    // A burst of at least a few full-size packets, and 10 ms worth at this rate.
    let burst = format!("{}b", (bits / 8 / 100).max(16 * 1024));
    let tc = [
        "tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "100ms",
    ];
    prefix.iter().chain(tc.iter()).map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
# time, network, state, down, up, rtt
time, network, state, bandwidth_down, bandwidth_up, rtt
0, wifi, up, 50mbit, 20mbit, 40ms
0, cell, up, 2mbit, 1mbit, 120ms
30, wifi, down
35, wifi, up, 50mbit, 20mbit, 40ms
40, end
";

    #[test]
    fn traces_parse_with_figures_and_an_end() {
        let t = Trace::parse(TRACE, "t.csv").unwrap();
        assert_eq!(t.events.len(), 4);
        assert_eq!(t.end, Duration::from_secs(40));
        assert_eq!(t.networks(), vec!["wifi", "cell"]);
        assert_eq!(t.events[0].figures.rtt, Some(Duration::from_millis(40)));
        assert_eq!(t.events[1].figures.bandwidth_down, Some(2_000_000));
        assert!(!t.events[2].up);
        assert_eq!(t.events[2].line, 5);
    }

    #[test]
    fn errors_name_the_line() {
        let e = Trace::parse("0, wifi, up\n5, wifi, sideways\n", "x.csv").unwrap_err();
        assert_eq!((e.line, e.to_string().contains("sideways")), (2, true));
        let e = Trace::parse("5, wifi, up\n1, wifi, down\n", "x.csv").unwrap_err();
        assert!(e.message.contains("time order"));
        let e = Trace::parse("0, wifi, up, fast\n", "x.csv").unwrap_err();
        assert!(e.message.contains("bandwidth_down"));
        assert!(Trace::parse("# nothing\n", "x.csv").is_err());
    }

    #[test]
    fn the_player_walks_once_or_in_a_loop() {
        let t = Trace::parse(TRACE, "t.csv").unwrap();
        let mut p = Player::new(t.clone(), false);
        assert_eq!(p.due(Duration::ZERO).len(), 2);
        assert_eq!(p.next_at(), Some(Duration::from_secs(30)));
        assert_eq!(p.due(Duration::from_secs(36)).len(), 2);
        assert_eq!(p.next_at(), None);
        let mut p = Player::new(t, true);
        p.due(Duration::from_secs(39));
        assert_eq!(p.next_at(), Some(Duration::from_secs(40)));
        let second = p.due(Duration::from_secs(70));
        assert_eq!(second.iter().map(|e| e.at.as_secs()).collect::<Vec<_>>(), vec![0, 0, 30]);
        assert_eq!(p.next_at(), Some(Duration::from_secs(75)));
    }

    #[test]
    fn the_shipped_traces_parse() {
        for (name, text) in [
            ("drive.csv", include_str!("../traces/drive.csv")),
            ("office.csv", include_str!("../traces/office.csv")),
        ] {
            let t = Trace::parse(text, name).unwrap_or_else(|e| panic!("{e}"));
            assert!(t.networks().contains(&"wifi".to_string()), "{name}");
        }
    }
}
