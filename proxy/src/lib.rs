//! cmm-proxy: a local SOCKS5 + HTTP proxy that gives unmodified applications intentional
//! networking. Each connection gets labels (from the proxy username, the destination rules of
//! `proxy.toml`, or the default), and goes out through the network those labels choose —
//! or waits, with nothing lost, until such a network is up.
//!
//! Map of the crate, in the order a connection meets it:
//!
//! - [`server`]: listeners (mixed SOCKS5/HTTP by first byte), connection limit, shutdown.
//! - [`socks5`] and [`http`]: the two front ends (handshake, CONNECT, forwarding, replies).
//! - [`auth`]: identity and labels from the proxy username.
//! - [`upstream`]: the [`upstream::Upstream`] interface and the direct implementation
//!   (interface-bound sockets through `cmm::Connector`).
//! - [`relay`]: connections as streams of one session with a cmm-relay (`[relay]`), the rest
//!   direct.
//! - [`tunnel`]: holding bytes while deferred, then the byte path, closing when the network
//!   goes down.
//! - [`splice`]: the byte path itself (splice(2), half-close).
//! - [`log`]: the one log line per connection.

pub mod auth;
pub mod http;
pub mod log;
pub mod relay;
pub mod server;
pub mod socks5;
pub mod splice;
pub mod tunnel;
pub mod upstream;

use std::io;
use std::sync::Arc;

use cmm::Connector;
use cmm_policy::Config;
use cmm_scout::Scout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A proxy ready to serve: listeners bound, scout running.
pub struct Proxy {
    listeners: Vec<server::Listener>,
    ctx: Arc<server::Context>,
}

impl Proxy {
    /// Binds the config's listeners and connects the upstream to `scout`.
    pub async fn new(config: Config, scout: Scout) -> io::Result<Proxy> {
        let config = Arc::new(config);
        let connector = Connector::new(scout, Arc::new(config.policy.clone()), config.proxy.connect_timeout);
        let direct = upstream::DirectUpstream::new(connector.clone(), Arc::new(config.rules.clone()));
        let upstream: Arc<dyn upstream::Upstream> = match &config.relay {
            Some(settings) => {
                let relay = Arc::new(relay::RelayUpstream::new(direct, connector, settings.clone())?);
                // The session opens now, not with the first connection, which then needs no
                // handshake over the uplink (a failure here is retried by that connection).
                let warm = relay.clone();
                tokio::spawn(async move { warm.warm_up().await });
                relay
            }
            None => Arc::new(direct),
        };
        let listeners = server::bind(&config).await?;
        let ctx = Arc::new(server::Context {
            config,
            upstream,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        Ok(Proxy { listeners, ctx })
    }

    /// The addresses it listens on.
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown` resolves, then drains within the grace period.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        server::serve(self.listeners, self.ctx, shutdown).await
    }
}
