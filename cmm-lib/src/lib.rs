//! cmm: intentional networking for applications.
//!
//! Traffic says what it intends with [`Labels`] (ONDEMAND, BACKGROUND, SMALL, LARGE, network
//! restrictions) and cmm matches it to the network that serves that intent, deferring it while
//! no suitable network is up.
//!
//! - [`target`]: [`Target`], a destination as a client names it.
//! - [`net`]: interface-bound connects (`SO_BINDTODEVICE`) and resolution, with timeouts.
//! - [`connector`]: [`Connector`], labels to a physical connection to a plain TCP server, now
//!   or deferred until a matching network comes up. The proxy's upstreams go through it.
//!
//! The vocabulary comes from `cmm-policy` and the network view from `cmm-scout`; both are
//! re-exported here so an application needs only this crate.

pub mod connector;
pub mod frame;
pub mod net;
pub mod session;
pub mod target;

pub use cmm_policy::{Labels, Network, NetworkKind, Policy};
pub use cmm_scout::{Scout, Snapshot};
pub use connector::{ConnectError, Connected, Connector, Deferred, ErrorKind, Opening, Route};
pub use target::{Host, Target};
