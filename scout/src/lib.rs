//! cmm-scout: which networks are up, now and from now on.
//!
//! - [`netstate`]: a sans-IO model of the kernel's links, addresses and default routes, and the
//!   rule that makes a network up (admin up, carrier, usable address, a route out).
//! - [`monitor`]: the rtnetlink driver that feeds it from the kernel.
//! - [`snapshot`]: [`Snapshot`], the networks at one moment, and [`Change`].
//! - [`scout`]: [`Scout`], the handle that the library and the proxy subscribe to, with
//!   overrides and measured figures layered on top.
//! - [`estimate`]: RTT and bandwidth from connection measurements; [`probe`]: active probes.
//! - [`daemon`] and [`remote`]: one scout for the whole machine over a Unix socket, and the
//!   client side that mirrors it; [`ipc`]: their protocol (`IPC.md`).
//! - [`replay`]: network traces, played to subscribers and, in a lab, onto real interfaces.
//!
//! Classification (which interface is which network) comes from `cmm-policy`; this crate
//! decides only up or down and publishes.

pub mod daemon;
pub mod estimate;
pub mod ipc;
pub mod logging;
pub mod monitor;
pub mod netstate;
pub mod probe;
pub mod remote;
pub mod replay;
pub mod scout;
pub mod snapshot;

pub use netstate::{KernelEvent, NetState};
pub use scout::{Scout, Subscription};
pub use snapshot::{Change, Snapshot};
