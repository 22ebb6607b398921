//! `cmm-scout`: show the networks cmm sees, or follow their changes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmm_policy::Config;
use cmm_policy::units::format_rate;
use cmm_scout::{Scout, Snapshot};

#[derive(Parser)]
#[command(name = "cmm-scout", version, about = "Which networks are up, as cmm sees them")]
struct Cli {
    /// Config file (default: $CMM_CONFIG, then /etc/cmm/proxy.toml, then built-in defaults).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the networks once, as a table or as JSON.
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match Config::discover(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cmm-scout: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cmm-scout: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let scout = match Scout::embedded(config.classifier()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cmm-scout: cannot watch networks through rtnetlink: {e}");
                return ExitCode::FAILURE;
            }
        };
        match cli.command {
            Command::Status { json } => {
                print_snapshot(&scout.snapshot(), json);
                ExitCode::SUCCESS
            }
            Command::Watch { json } => {
                let mut sub = scout.subscribe();
                print_snapshot(&sub.snapshot(), json);
                loop {
                    tokio::select! {
                        next = sub.next() => {
                            let Some((snap, changes)) = next else { return ExitCode::FAILURE };
                            for c in changes {
                                if json {
                                    println!("{}", serde_json::json!({"generation": snap.generation, "change": c}));
                                } else {
                                    println!("{} {c}", timestamp());
                                }
                            }
                        }
                        _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                    }
                }
            }
        }
    })
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
