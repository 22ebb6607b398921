//! A label-aware server: accepts multi-sockets and answers every message with what it got and
//! the labels the sender used.
//!
//! ```sh
//! cargo run -p cmm --example label_server -- 0.0.0.0:7000
//! ```

use std::sync::Arc;
use std::time::Duration;

use cmm::{Connector, Listener, Policy, Scout};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7000".into());
    // The accepting side never dials, so it needs no view of its own networks.
    let connector =
        Connector::new(Scout::manual(vec![]), Arc::new(Policy::default()), Duration::from_secs(5));
    let listener = Listener::bind(addr.parse().map_err(std::io::Error::other)?, connector).await?;
    println!("listening on {}", listener.local_addr());
    loop {
        let sock = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sock.recv(&mut buf).await {
                    Ok((0, _)) => break,
                    Ok((n, labels)) => {
                        let text = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
                        println!("{n} bytes labelled {labels}: {text}");
                        let reply = format!("got {n} bytes labelled {labels}\n");
                        // Answer with the sender's labels: they choose our path back too.
                        if sock.send(reply.as_bytes(), labels).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        eprintln!("session ended: {e}");
                        break;
                    }
                }
            }
        });
    }
}
