//! cmm-policy: what traffic intends and which network serves it.
//!
//! This crate owns the vocabulary of cmm and the decisions that need no I/O:
//!
//! - [`labels`]: [`Labels`], libcmm's intent bits (ONDEMAND, BACKGROUND, SMALL, LARGE) and
//!   network restrictions, with their text form.
//! - [`network`]: [`Network`], one way out of the machine, with its kind and figures.
//! - [`classify`]: which interfaces are networks ([`Classifier`]).
//! - [`choose`]: [`Policy::choose`], the label-to-network choice, and what happens when nothing
//!   fits (defer, fall back, reject).
//! - [`rules`]: destination rules that give labels to unlabelled traffic.
//! - [`config`]: the `proxy.toml` schema and its built-in defaults.
//! - [`units`] and [`glob`]: small parsers the config uses.
//!
//! It reads its config file and does nothing else outside memory: the scout (`cmm-scout`)
//! watches the kernel, the library (`cmm`) and the proxy (`cmm-proxy`) move bytes.

pub mod choose;
pub mod classify;
pub mod config;
pub mod glob;
pub mod labels;
pub mod network;
pub mod rules;
pub mod units;

pub use choose::{Decision, LabelPolicy, Metric, NetworkRef, NoMatch, Policy};
pub use classify::{Classifier, NetworkDef};
pub use config::{Config, ConfigError, RelaySettings};
pub use glob::Glob;
pub use labels::{LabelError, Labels};
pub use network::{Figures, Network, NetworkKind, Trickle};
pub use rules::{Destination, PortRange, Rule, RuleSet, Via};
