//! cmm: intentional networking for applications.
//!
//! Traffic says what it intends with [`Labels`] (ONDEMAND, BACKGROUND, SMALL, LARGE, network
//! restrictions) and cmm matches it to the network that serves that intent, deferring it while
//! no suitable network is up.
//!
//! - [`multisocket`]: [`MultiSocket`], the cmm API: labelled send/recv across every network,
//!   thunks, `check_label`, `reset`, `thunk_cancel`; towards a cmm peer, or (plain mode) an
//!   ordinary TCP server.
//! - [`stream`]: [`Stream`], one of a cmm-mode multi-socket's independent byte streams
//!   ([`MultiSocket::open_stream`], [`MultiSocket::accept_stream`]): `AsyncRead` +
//!   `AsyncWrite`, FIN on shutdown, reset and stop with codes.
//! - [`listener`]: [`Listener`], the accepting side.
//! - `api` (a private leaf, re-exported here and from [`multisocket`]): what both modes speak —
//!   [`Callbacks`] told a [`PathEvent`], and [`TrySend`]/[`Check`], what the non-blocking calls
//!   did.
//! - [`session`]: the multi-socket protocol as a sans-IO state machine; [`frame`]: its wire
//!   format (see `PROTOCOL.md`); a private driver runs it on tokio.
//! - [`plain`]: plain mode, a multi-socket towards an ordinary server.
//! - [`connector`]: [`Connector`], the network choice and interface-bound connects under all of
//!   the above; [`Connector::connect_or_defer`] makes one connection on the network the labels
//!   choose, now or deferred — plain mode's and the proxy's upstreams; [`net`]: the socket calls; [`thunk`]: deferred operations; [`target`]: names.
//! - [`trickle`]: [`Trickler`], background traffic paced while foreground traffic is active on
//!   a network, and the queueing delays that choices by latency take into account.
//!
//! - [`relay`]: what a proxy asks a relay at the start of each stream, and the answer.
//! - [`tls`]: TLS 1.3 for a multi-socket's paths ([`MultiSocket::connect_tls`],
//!   [`Listener::bind_tls`]), both ends authenticated by pinned Ed25519 keys.
//! - [`ffi`]: the C ABI of `include/libcmm.h` (`libcmm.so`, `libcmm.a`).
//!
//! The vocabulary comes from `cmm-policy` and the network view from `cmm-scout`; both are
//! re-exported here so an application needs only this crate.

mod api;
pub mod connector;
mod driver;
pub mod ffi;
pub mod frame;
pub mod growbuf;
pub mod listener;
pub mod multisocket;
pub mod net;
pub mod path_manager;
pub mod plain;
mod recycle;
pub mod relay;
pub mod session;
pub mod stream;
pub mod target;
pub mod thunk;
pub mod tls;
pub mod trickle;

pub use cmm_policy::{Labels, Network, NetworkKind, Policy};
pub use cmm_scout::{Scout, Snapshot};
pub use connector::{ConnectError, Connected, Connector, Deferred, ErrorKind, Opening, Route};
pub use listener::Listener;
pub use multisocket::{Callback, Callbacks, Check, MultiSocket, PathEvent, TrySend};
pub use session::PathStats;
pub use stream::Stream;
pub use target::{Host, Target};
pub use thunk::{Handler, Thunk};
pub use trickle::{Direction, Grant, Trickler};
