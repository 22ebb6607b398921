//! `cmm-relay`: keygen, pubkey, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cmm::tls::PublicKey;
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
        /// Address and port to listen on (every path of every session is TLS 1.3 with pinned
        /// keys, so the relay may listen on a public address).
        #[arg(long)]
        listen: SocketAddr,
        /// The relay's private key (from `cmm-relay keygen`).
        #[arg(long)]
        key: PathBuf,
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
        /// Longest a connect to a destination may take, in seconds.
        #[arg(long, default_value_t = 10)]
        connect_timeout: u64,
        /// Longest a half-closed connection may stay silent before it is closed, in seconds.
        #[arg(long, default_value_t = 60)]
        half_close_timeout: u64,
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
            listen,
            key,
            mut allow,
            allow_file,
            allow_net,
            allow_port,
            connect_timeout,
            half_close_timeout,
        } => {
            let identity = match keys::load(&key) {
                Ok(i) => i,
                Err(e) => return fail(e),
            };
            if let Some(f) = allow_file {
                match keys::load_allowed(&f) {
                    Ok(k) => allow.extend(k),
                    Err(e) => return fail(e),
                }
            }
            let cfg = RelayConfig {
                listen,
                identity,
                allowed: allow,
                destinations: Destinations { nets: allow_net, ports: allow_port },
                connect_timeout: Duration::from_secs(connect_timeout),
                half_close_timeout: Duration::from_secs(half_close_timeout),
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
