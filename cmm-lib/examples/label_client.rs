//! A label-aware client: sends each line of standard input (or its arguments) with labels, and
//! prints the server's answers and which network each connection carried.
//!
//! ```sh
//! cargo run -p cmm --example label_client -- 127.0.0.1:7000 ondemand "hello" "world"
//! ```

use std::sync::Arc;
use std::time::Duration;

use cmm::{Callbacks, Connector, Labels, MultiSocket, PathEvent, Scout};
use cmm_policy::Config;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "127.0.0.1:7000".into());
    let labels: Labels = args.next().unwrap_or_else(|| "ondemand".into()).parse()?;
    let mut messages: Vec<String> = args.collect();
    if messages.is_empty() {
        messages = std::io::stdin().lines().map_while(Result::ok).collect();
    }
    // The same config and network view as the proxy: $CMM_CONFIG, /etc/cmm/proxy.toml, or
    // the built-in defaults.
    let config = Config::discover(None)?;
    // The scout daemon's view when one runs, else watched here.
    let scout = Scout::discover(&config, "label_client").await?;
    let connector = Connector::new(scout, Arc::new(config.policy.clone()), Duration::from_secs(5));
    let callbacks = Callbacks {
        label_up: Some(Arc::new(|e: &PathEvent| {
            eprintln!("up: {} ({}) serves {}", e.network.name, e.network.interface, e.labels)
        })),
        label_down: Some(Arc::new(|e: &PathEvent| {
            eprintln!("down: {} ({})", e.network.name, e.network.interface)
        })),
    };
    let sock = MultiSocket::connect(&connector, server.as_str(), labels, callbacks).await?;
    let mut buf = vec![0u8; 4096];
    for m in &messages {
        sock.send(format!("{m}\n").as_bytes(), labels).await?;
        let (n, l) = sock.recv(&mut buf).await?;
        print!("[{l}] {}", String::from_utf8_lossy(&buf[..n]));
    }
    for (network, sent, received) in sock.traffic() {
        eprintln!("{network}: {sent} bytes sent, {received} received");
    }
    sock.close().await;
    Ok(())
}
