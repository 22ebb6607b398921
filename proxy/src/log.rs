//! The per-connection log line: one `info` event when a connection ends, with who, where,
//! which labels from where, which network, bytes each way, duration and outcome.
//!
//! ```text
//! INFO conn: id=7 proto=socks5 client=127.0.0.1:51234 dest=server.lab:8080 user=- labels=background
//!      labels_from=username network=wifi0 up=78 down=1048576 ms=212 outcome=ok
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cmm_policy::Labels;

use crate::upstream::LabelSource;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What is known about a connection so far; logged once when it ends.
#[derive(Debug)]
pub struct ConnLog {
    /// Process-unique id, also on the debug lines of this connection.
    pub id: u64,
    /// `socks5`, `http-connect` or `http`.
    pub proto: &'static str,
    /// The client's address.
    pub client: SocketAddr,
    /// Where it goes.
    pub dest: String,
    /// The authenticated user.
    pub user: Option<String>,
    /// The labels used.
    pub labels: Option<(Labels, LabelSource)>,
    /// The network it went through (`direct` for this machine).
    pub network: Option<String>,
    /// Whether it waited for a network first, and why.
    pub deferred: Option<String>,
    /// Bytes client → upstream.
    pub up: u64,
    /// Bytes upstream → client.
    pub down: u64,
    started: Instant,
}

impl ConnLog {
    /// Starts a record.
    pub fn new(proto: &'static str, client: SocketAddr) -> ConnLog {
        ConnLog {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            proto,
            client,
            dest: String::from("-"),
            user: None,
            labels: None,
            network: None,
            deferred: None,
            up: 0,
            down: 0,
            started: Instant::now(),
        }
    }

    /// Emits the line with `outcome` (`ok`, or what went wrong).
    pub fn finish(&self, outcome: &dyn fmt::Display) {
        let (labels, from) = match &self.labels {
            Some((l, s)) => (l.to_string(), s.to_string()),
            None => ("-".into(), "-".into()),
        };
        tracing::info!(
            target: "cmm_proxy::conn",
            id = self.id,
            proto = %self.proto,
            client = %self.client,
            dest = %self.dest,
            user = %self.user.as_deref().unwrap_or("-"),
            labels = %labels,
            labels_from = %from,
            network = %self.network.as_deref().unwrap_or("-"),
            deferred = %self.deferred.as_deref().unwrap_or("no"),
            up = self.up,
            down = self.down,
            ms = self.started.elapsed().as_millis() as u64,
            outcome = %outcome,
            "conn"
        );
    }
}
