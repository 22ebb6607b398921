//! The vocabulary of the cmm API that both kinds of multi-socket speak: libcmm's connection
//! callbacks ([`Callbacks`], told a [`PathEvent`]) and what the non-blocking calls did
//! ([`TrySend`], [`Check`]).
//!
//! A leaf: the cmm-mode driver and plain mode both answer in these terms, and
//! [`crate::MultiSocket`], the user above them, hands the answers on. Nothing here knows
//! either mode.

use std::io;
use std::sync::Arc;

use cmm_policy::{Labels, Network};

/// A physical connection came or went: which, on what network, serving which labels.
#[derive(Clone, Debug)]
pub struct PathEvent {
    /// The path (a connection number within this socket).
    pub path: u32,
    /// Its network.
    pub network: Network,
    /// The labels it serves: its kind's restriction (WIFI_ONLY, CELLULAR_ONLY) and, when it
    /// comes up, each of ONDEMAND/BACKGROUND/SMALL/LARGE that now chooses it.
    pub labels: Labels,
}

/// A `label_up` / `label_down` callback.
pub type Callback = Arc<dyn Fn(&PathEvent) + Send + Sync>;

/// libcmm's connection callbacks: run (on a library thread) whenever a physical connection is
/// set up or torn down, for application-level setup and teardown.
#[derive(Clone, Default)]
pub struct Callbacks {
    /// A physical connection is up.
    pub label_up: Option<Callback>,
    /// A physical connection is gone.
    pub label_down: Option<Callback>,
}

/// What a non-blocking send did.
#[derive(Debug)]
pub enum TrySend {
    /// This many bytes were taken.
    Sent(usize),
    /// No network fits the labels: the thunk was stored and runs when one comes up.
    Deferred,
    /// A real failure (or `WouldBlock`: no room, or no network and no thunk).
    Failed(io::Error),
}

/// What `check_label` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// A network that fits is up.
    Ready,
    /// None is: the thunk was stored.
    Deferred,
    /// None is, and there was no thunk.
    Failed,
}
