//! `cmm-proxy`: run the proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cmm_policy::Config;
use cmm_proxy::Proxy;
use cmm_scout::Scout;

#[derive(Parser)]
#[command(
    name = "cmm-proxy",
    version,
    about = "A SOCKS5 + HTTP proxy that sends each connection over the network its labels choose",
    after_help = "Label a connection through the proxy username, e.g.\n  \
                  curl -x socks5h://background@127.0.0.1:1080 https://example.com/\n\
                  Logs: RUST_LOG=debug for details; one info line per connection by default."
)]
struct Cli {
    /// Config file (default: $CMM_CONFIG, then /etc/cmm/proxy.toml, then built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen on this address (SOCKS5 and HTTP) instead of the config's; repeat for several.
    #[arg(long, short)]
    listen: Vec<SocketAddr>,
    /// Check the config, print what it means, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    cmm_scout::logging::init();
    let cli = Cli::parse();
    let mut config = match Config::discover(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cmm-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if !cli.listen.is_empty() {
        if let Some(open) = cli.listen.iter().find(|a| !a.ip().is_loopback())
            && !config.auth_required()
        {
            eprintln!(
                "cmm-proxy: --listen {open} would make an open proxy: add [[user]] entries to the \
                 config so that clients must authenticate, or listen on a loopback address"
            );
            return ExitCode::from(2);
        }
        config.proxy.listen = cli.listen.clone();
        config.proxy.socks_listen.clear();
        config.proxy.http_listen.clear();
    }
    if cli.check {
        print_check(&config);
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cmm-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    match &config.source {
        Some(p) => tracing::info!("config {}", p.display()),
        None => tracing::info!("no config file: built-in defaults"),
    }
    let scout = match Scout::discover(&config, "cmm-proxy").await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cmm-proxy: cannot watch networks through rtnetlink: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("scout: {}", scout.source());
    for n in &scout.snapshot().networks {
        match &n.down_reason {
            None => tracing::info!("network {} ({}, {}) up", n.name, n.interface, n.kind),
            Some(why) => tracing::info!("network {} ({}, {}) down: {why}", n.name, n.interface, n.kind),
        }
    }
    let proxy = match Proxy::new(config, scout).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cmm-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    proxy.serve(shutdown_signal()).await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot install signal handlers; stop the proxy with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn print_check(config: &Config) {
    println!(
        "config: {}",
        config.source.as_ref().map_or("built-in defaults".into(), |p| p.display().to_string())
    );
    for a in &config.proxy.listen {
        println!("listen: {a} (SOCKS5 and HTTP)");
    }
    for a in &config.proxy.socks_listen {
        println!("listen: {a} (SOCKS5)");
    }
    for a in &config.proxy.http_listen {
        println!("listen: {a} (HTTP)");
    }
    println!("authentication: {}", if config.auth_required() { "required" } else { "none (loopback only)" });
    println!("default labels: {}", config.policy.default_labels);
    for n in &config.networks {
        println!(
            "network {}: interface {}, {}{}",
            n.name,
            n.interface,
            n.kind,
            if n.metered { ", metered" } else { "" }
        );
    }
    println!("automatic networks: {}", if config.scout.auto_networks { "yes" } else { "no" });
    for lp in &config.policy.label_policies {
        println!(
            "label policy {}: networks {}, metered {}, when none: {} (max wait {:?})",
            lp.labels,
            lp.networks.as_ref().map_or("any".to_string(), |l| {
                l.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }),
            if lp.metered { "allowed" } else { "avoided" },
            lp.on_no_match,
            lp.max_wait
        );
    }
    println!("rules: {}", config.rules.rules.len());
    println!("ok");
}
