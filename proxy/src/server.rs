//! Listeners, limits and shutdown.
//!
//! Each configured address gets an accept loop. A mixed listener (the default) tells SOCKS5
//! from HTTP by the first byte: `0x05` is SOCKS5, `0x04` (SOCKS4) is refused with a SOCKS4
//! rejection, anything else is HTTP. A semaphore bounds live connections; past the bound,
//! clients wait in the kernel's backlog rather than being dropped. Accept errors (out of file
//! descriptors, say) back off instead of spinning.
//!
//! Shutdown: stop accepting, let live connections finish within the grace period, then close
//! whatever is left.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cmm_policy::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::upstream::Upstream;
use crate::{http, socks5};

/// What every connection needs.
pub struct Context {
    /// The configuration.
    pub config: Arc<Config>,
    /// How destinations are reached.
    pub upstream: Arc<dyn Upstream>,
    /// Tracks every connection task, for graceful shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when the grace period is over: remaining connections close.
    pub cancel: CancellationToken,
}

/// Which protocols a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocols {
    /// SOCKS5 and HTTP, told apart by the first byte.
    Mixed,
    /// SOCKS5 only.
    Socks,
    /// HTTP only.
    Http,
}

/// A bound listener.
pub struct Listener {
    listener: TcpListener,
    protocols: Protocols,
}

impl Listener {
    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds every listener of the config. Fails, naming the address, if one cannot be bound.
pub async fn bind(config: &Config) -> io::Result<Vec<Listener>> {
    let p = &config.proxy;
    let mut out = Vec::new();
    let sets = [
        (&p.listen, Protocols::Mixed),
        (&p.socks_listen, Protocols::Socks),
        (&p.http_listen, Protocols::Http),
    ];
    for (addrs, protocols) in sets {
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            out.push(Listener { listener, protocols });
        }
    }
    Ok(out)
}

/// Serves until `shutdown` resolves, then drains within the grace period.
pub async fn serve(listeners: Vec<Listener>, ctx: Arc<Context>, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(ctx.config.proxy.max_connections));
    let stop_accepting = CancellationToken::new();
    let mut accept_loops = Vec::new();
    for l in listeners {
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            "listening on {addr} ({})",
            match l.protocols {
                Protocols::Mixed => "SOCKS5 and HTTP",
                Protocols::Socks => "SOCKS5",
                Protocols::Http => "HTTP",
            }
        );
        accept_loops.push(tokio::spawn(accept_loop(l, ctx.clone(), permits.clone(), stop_accepting.clone())));
    }
    shutdown.await;
    stop_accepting.cancel();
    for a in accept_loops {
        let _ = a.await;
    }
    ctx.tasks.close();
    let live = ctx.tasks.len();
    let grace = ctx.config.proxy.shutdown_grace;
    if live > 0 {
        tracing::info!("shutting down: {live} connection(s) left, waiting up to {grace:?}");
    }
    if tokio::time::timeout(grace, ctx.tasks.wait()).await.is_err() {
        tracing::info!("grace period over: closing {} connection(s)", ctx.tasks.len());
        ctx.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), ctx.tasks.wait()).await;
    }
    tracing::info!("stopped");
}

async fn accept_loop(l: Listener, ctx: Arc<Context>, permits: Arc<Semaphore>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = l.listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx2 = ctx.clone();
        let cancel = ctx.cancel.clone();
        let protocols = l.protocols;
        ctx.tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = serve_client(stream, peer, protocols, ctx2) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

async fn serve_client(stream: TcpStream, peer: SocketAddr, protocols: Protocols, ctx: Arc<Context>) {
    let first = match protocols {
        Protocols::Socks => 5,
        Protocols::Http => b'G',
        Protocols::Mixed => {
            let mut b = [0u8; 1];
            match tokio::time::timeout(ctx.config.proxy.handshake_timeout, stream.peek(&mut b)).await {
                Ok(Ok(1)) => b[0],
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, "client failed before its first byte: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(client = %peer, "client sent nothing within the handshake timeout; closed");
                    return;
                }
            }
        }
    };
    match first {
        5 => socks5::serve(stream, peer, &ctx).await,
        4 => {
            // SOCKS4: answer "request rejected" so the client shows an error, not a hang.
            use tokio::io::AsyncWriteExt;
            let mut stream = stream;
            let _ = stream.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await;
            tracing::info!(client = %peer, "SOCKS4 request refused: only SOCKS5 is served");
        }
        _ => http::serve(stream, peer, ctx).await,
    }
}
