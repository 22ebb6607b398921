//! `cmm-scout`: the scout daemon, and tools to look at and steer the networks cmm sees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmm_policy::Config;
use cmm_policy::units::format_rate;
use cmm_scout::ipc::{self, ForcedState, FrameReader, Reply, Request};
use cmm_scout::replay::{Drive, Trace, emulated_network};
use cmm_scout::{Scout, Snapshot, daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(name = "cmm-scout", version, about = "Which networks are up, as cmm sees them")]
struct Cli {
    /// Config file (default: $CMM_CONFIG, then /etc/cmm/proxy.toml, then built-in defaults).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The daemon's socket (default: $CMM_SCOUT_SOCKET, [scout] socket, then /run/cmm/scout.sock
    /// for root or $XDG_RUNTIME_DIR/cmm/scout.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scout daemon: one view of the networks for every program on this machine.
    Daemon,
    /// Print the networks once, as a table or as JSON (from the daemon when one runs).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the networks, then one line per change until interrupted.
    Watch {
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Force a network up or down for every program (`auto`: follow the kernel again).
    /// Needs a running daemon.
    Set {
        /// Network name or interface.
        network: String,
        /// up, down or auto.
        state: String,
    },
    /// Replay a network trace (CSV: time, network, state, bandwidth_down, bandwidth_up, rtt) as
    /// a daemon: subscribers see the trace's networks, and networks given with --drive are
    /// acted on for real (link up/down, upstream rate with TBF).
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// Drive a real interface for a network of the trace: NETWORK=INTERFACE (repeatable).
        #[arg(long, value_name = "NETWORK=INTERFACE")]
        drive: Vec<String>,
        /// Also shape a driven network's download, on the far end of its link (e.g. a lab
        /// router's interface): NETWORK=NETNS:INTERFACE (repeatable).
        #[arg(long, value_name = "NETWORK=NETNS:INTERFACE")]
        peer: Vec<String>,
        /// Start again at the end.
        #[arg(long = "loop")]
        looped: bool,
    },
}

fn main() -> ExitCode {
    cmm_scout::logging::init();
    let cli = Cli::parse();
    let config = match Config::discover(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cmm-scout: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = cli.socket.clone().unwrap_or_else(|| daemon::socket_path(&config));
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cmm-scout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Daemon => {
                let scout = Scout::embedded(config.classifier())
                    .await
                    .map_err(|e| format!("cannot watch networks through rtnetlink: {e}"))?;
                if let Some(target) = &config.scout.probe {
                    scout.start_probes(target.clone(), config.scout.probe_interval);
                }
                run_daemon(scout, &socket).await
            }
            Command::Status { json } => {
                let snap = current(&config, &socket).await?;
                print_snapshot(&snap, json);
                Ok(())
            }
            Command::Watch { json } => watch(&config, &socket, json).await,
            Command::Set { network, state } => set(&socket, &network, &state).await,
            Command::Replay { trace, drive, peer, looped } => {
                replay(&config, &socket, &trace, &drive, &peer, looped).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cmm-scout: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run_daemon(scout: Scout, socket: &Path) -> Result<(), String> {
    let listener = daemon::bind(socket).await.map_err(|e| e.to_string())?;
    tracing::info!("scout daemon listening on {}", socket.display());
    for n in &scout.snapshot().networks {
        tracing::info!(
            "network {} ({}, {}) {}",
            n.name,
            n.interface,
            n.kind,
            if n.up { "up" } else { "down" }
        );
    }
    daemon::serve(scout, listener, shutdown_signal()).await;
    tracing::info!("scout daemon stopped");
    Ok(())
}

/// The networks now: from the daemon when one runs, else watched here once.
async fn current(config: &Config, socket: &Path) -> Result<Snapshot, String> {
    match request(socket, Request::GetNetworks).await {
        Ok(Reply::Snapshot { snapshot }) => Ok(snapshot),
        Ok(other) => Err(format!("unexpected answer from the daemon: {other:?}")),
        Err(_) => {
            let scout = Scout::embedded(config.classifier())
                .await
                .map_err(|e| format!("cannot watch networks through rtnetlink: {e}"))?;
            Ok((*scout.snapshot()).clone())
        }
    }
}

/// One request to the daemon and its answer.
async fn request(socket: &Path, req: Request) -> std::io::Result<Reply> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    let mut out = ipc::encode(&Request::Hello { version: ipc::VERSION, client: "cmm-scout".into() });
    out.extend_from_slice(&ipc::encode(&req));
    stream.write_all(&out).await?;
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut replies = 0;
    loop {
        while let Some(r) = reader
            .next_message::<Reply>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            replies += 1;
            if let Reply::Error { message } = &r {
                return Err(std::io::Error::other(message.clone()));
            }
            if replies == 2 {
                return Ok(r);
            }
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer"))??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            ));
        }
        reader.push(&buf[..n]);
    }
}

async fn set(socket: &Path, network: &str, state: &str) -> Result<(), String> {
    let state = match state {
        "up" => ForcedState::Up,
        "down" => ForcedState::Down,
        "auto" => ForcedState::Auto,
        other => return Err(format!("state {other:?} is not up, down or auto")),
    };
    match request(socket, Request::Set { network: network.to_string(), state }).await {
        Ok(Reply::Ok) => Ok(()),
        Ok(other) => Err(format!("unexpected answer from the daemon: {other:?}")),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            Err(format!("no scout daemon at {} (start one with `cmm-scout daemon`)", socket.display()))
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn watch(config: &Config, socket: &Path, json: bool) -> Result<(), String> {
    let scout = match cmm_scout::remote::connect(socket, "cmm-scout watch", config.classifier()).await {
        Ok(s) => s,
        Err(_) => {
            Scout::embedded(config.classifier()).await.map_err(|e| format!("cannot watch networks: {e}"))?
        }
    };
    let mut sub = scout.subscribe();
    print_snapshot(&sub.snapshot(), json);
    loop {
        tokio::select! {
            next = sub.next() => {
                let Some((snap, changes)) = next else { return Ok(()) };
                for c in changes {
                    if json {
                        println!("{}", serde_json::json!({"generation": snap.generation, "change": c}));
                    } else {
                        println!("{} {c}", timestamp());
                    }
                }
            }
            _ = shutdown_signal() => return Ok(()),
        }
    }
}

async fn replay(
    config: &Config,
    socket: &Path,
    trace_path: &Path,
    drive: &[String],
    peers: &[String],
    looped: bool,
) -> Result<(), String> {
    let text = std::fs::read_to_string(trace_path)
        .map_err(|e| format!("cannot read {}: {e}", trace_path.display()))?;
    let trace = Trace::parse(&text, &trace_path.display().to_string()).map_err(|e| e.to_string())?;
    let mut driven = BTreeMap::new();
    for d in drive {
        let (net, iface) =
            d.split_once('=').ok_or_else(|| format!("--drive {d:?}: write NETWORK=INTERFACE"))?;
        if !trace.networks().iter().any(|n| n == net) {
            return Err(format!("--drive {d:?}: the trace has no network {net:?}"));
        }
        driven.insert(net.to_string(), Drive { interface: iface.to_string(), peer: None });
    }
    for p in peers {
        let parsed = p.split_once('=').and_then(|(net, rest)| Some((net, rest.split_once(':')?)));
        let Some((net, (ns, iface))) = parsed else {
            return Err(format!("--peer {p:?}: write NETWORK=NETNS:INTERFACE"));
        };
        let Some(d) = driven.get_mut(net) else {
            return Err(format!("--peer {p:?}: network {net:?} is not driven (add --drive {net}=INTERFACE)"));
        };
        d.peer = Some((ns.to_string(), iface.to_string()));
    }
    // Driving real interfaces: the kernel is the source. Otherwise the trace's networks are.
    let scout = if driven.is_empty() {
        Scout::manual(trace.networks().iter().map(|n| emulated_network(n)).collect())
    } else {
        Scout::embedded(config.classifier()).await.map_err(|e| format!("cannot watch networks: {e}"))?
    };
    let listener = daemon::bind(socket).await.map_err(|e| e.to_string())?;
    tracing::info!("replaying {} as the scout daemon on {}", trace_path.display(), socket.display());
    let player = tokio::spawn(cmm_scout::replay::play(scout.clone(), trace, driven, looped));
    daemon::serve(scout, listener, async {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = player => {
                // Keep serving the final state until stopped.
                shutdown_signal().await
            }
        }
    })
    .await;
    Ok(())
}

fn timestamp() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() % 86400;
    format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, now.subsec_millis())
}

fn print_snapshot(snap: &Snapshot, json: bool) {
    if json {
        match serde_json::to_string_pretty(snap) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cmm-scout: {e}"),
        }
        return;
    }
    println!(
        "{:<12} {:<12} {:<9} {:<5} {:>12} {:>12} {:>8} {:<7} ADDRESSES / WHY DOWN",
        "NETWORK", "INTERFACE", "KIND", "STATE", "DOWN", "UP", "RTT", "METERED"
    );
    for n in &snap.networks {
        let (down, up, rtt) = n.figures();
        let detail = if n.up {
            n.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
        } else {
            n.down_reason.clone().unwrap_or_default()
        };
        println!(
            "{:<12} {:<12} {:<9} {:<5} {:>12} {:>12} {:>6}ms {:<7} {}",
            n.name,
            n.interface,
            n.kind.as_str(),
            if n.up { "up" } else { "down" },
            format_rate(down),
            format_rate(up),
            rtt.as_millis(),
            if n.metered { "yes" } else { "no" },
            detail
        );
    }
}
