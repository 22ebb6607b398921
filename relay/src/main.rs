//! `cmm-relay`: keygen, pubkey, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cmm::tls::PublicKey;
use cmm_policy::units::ConfigDuration;
use cmm_relay::config::RelayFile;
use cmm_relay::{Destinations, Relay, RelayConfig, keys};

/// A cmm peer on a server: proxies reach it over all their networks at once, and their
/// connections survive the loss of a network.
#[derive(Parser)]
#[command(name = "cmm-relay", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a new private key to FILE (never over an existing one) and prints its public key.
    Keygen {
        /// Where to write the key (mode 0600).
        file: PathBuf,
    },
    /// Prints the public key of the private key in FILE.
    Pubkey {
        /// The key file.
        file: PathBuf,
    },
    /// Serves the proxies whose keys are allowed.
    Serve {
        /// A TOML file with the same settings (flags given here win; `--allow` adds).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address and port to listen on (every path of every session is TLS 1.3 with pinned
        /// keys, so the relay may listen on a public address).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The relay's private key (from `cmm-relay keygen`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// A proxy's public key to let in (repeatable).
        #[arg(long = "allow", value_name = "PUBKEY")]
        allow: Vec<PublicKey>,
        /// A file of public keys to let in, one per line (`#` comments).
        #[arg(long, value_name = "FILE")]
        allow_file: Option<PathBuf>,
        /// Only connect to destinations in this network (CIDR, repeatable; default: any).
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_net: Vec<ipnet::IpNet>,
        /// Only connect to this destination port (repeatable; default: any).
        #[arg(long = "allow-port", value_name = "PORT")]
        allow_port: Vec<u16>,
        /// Longest a connect to a destination may take, in seconds (default 10).
        #[arg(long)]
        connect_timeout: Option<u64>,
        /// Longest a half-closed connection may stay silent before it is closed, in seconds
        /// (default 60).
        #[arg(long)]
        half_close_timeout: Option<u64>,
    },
}

fn main() -> ExitCode {
    cmm_scout::logging::init();
    match Cli::parse().command {
        Command::Keygen { file } => match keys::generate(&file) {
            Ok(public) => {
                println!("{public}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Pubkey { file } => match keys::load(&file) {
            Ok(id) => {
                println!("{}", id.public_key());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Serve {
            config,
            listen,
            key,
            mut allow,
            allow_file,
            mut allow_net,
            mut allow_port,
            connect_timeout,
            half_close_timeout,
        } => {
            let file = match config.as_deref().map(RelayFile::load).transpose() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => return fail(e),
            };
            let Some(listen) = listen.or(file.listen) else {
                return fail("--listen ADDR:PORT (or listen in the --config file) is required");
            };
            let Some(key) = key.or(file.key) else {
                return fail("--key FILE (or key in the --config file) is required");
            };
            let identity = match keys::load(&key) {
                Ok(i) => i,
                Err(e) => return fail(e),
            };
            for text in &file.allow {
                match text.parse() {
                    Ok(k) => allow.push(k),
                    Err(e) => return fail(format!("allow in the config: {e}")),
                }
            }
            for f in [allow_file, file.allow_file].into_iter().flatten() {
                match keys::load_allowed(&f) {
                    Ok(k) => allow.extend(k),
                    Err(e) => return fail(e),
                }
            }
            if allow_net.is_empty() {
                allow_net = file.allow_net;
            }
            if allow_port.is_empty() {
                allow_port = file.allow_port;
            }
            let secs = |flag: Option<u64>, file: Option<ConfigDuration>, default: u64| {
                flag.map(Duration::from_secs).or(file.map(|d| d.0)).unwrap_or(Duration::from_secs(default))
            };
            let cfg = RelayConfig {
                listen,
                identity,
                allowed: allow,
                destinations: Destinations { nets: allow_net, ports: allow_port },
                connect_timeout: secs(connect_timeout, file.connect_timeout, 10),
                half_close_timeout: secs(half_close_timeout, file.half_close_timeout, 60),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            rt.block_on(async move {
                let public = cfg.identity.public_key();
                let clients = cfg.allowed.len();
                let relay = match Relay::bind(cfg).await {
                    Ok(r) => r,
                    Err(e) => return fail(e),
                };
                tracing::info!(listen = %relay.local_addr(), key = %public, clients, "relay serving");
                match relay.run().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e),
                }
            })
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cmm-relay: {e}");
    ExitCode::from(2)
}
