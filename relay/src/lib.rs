//! cmm-relay: a cmm peer on a server that proxies reach over all their networks at once.
//!
//! A proxy holds one multi-socket session with the relay (every path TLS 1.3, both ends pinned
//! to keys: [`cmm::tls`]); each of its connections is one stream of that session, so when a
//! network goes the stream's bytes move to another with nothing lost and the application never
//! notices. The relay dials the destination each stream names and bridges the two.
//!
//! - [`server`]: [`Relay`], the listener and the per-stream service (open request, rules,
//!   resolve, dial, reply, bridge, one log line per stream).
//! - [`bridge`]: the bytes of one relayed connection, half-close by half-close, resets passed
//!   on, silent half-closed connections reaped.
//! - [`rules`]: [`Destinations`], where the relay may connect.
//! - [`keys`]: key files (`cmm-relay keygen`).
//! - [`config`]: `serve --config FILE`, the flags' settings in TOML.

pub mod bridge;
pub mod config;
pub mod keys;
pub mod rules;
pub mod server;

pub use rules::Destinations;
pub use server::{Relay, RelayConfig, RelayError};
