//! The session's timers, by name. Each path has the same few; when one is due is said in one
//! place ([`Timer::deadline`]) and what it does in one match (`Session::on_timer`), so the two
//! cannot drift apart — a timer whose work is done always stops being due.

use std::time::{Duration, Instant};

use super::SessionConfig;
use super::path::PathState;

/// How long a troubled path waits between probes.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// One of a path's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A delayed acknowledgement is due.
    Ack,
    /// Background chunks may go again after pacing.
    Pace,
    /// Data or a probe went unacknowledged too long: the path becomes troubled.
    Trouble,
    /// A troubled path is probed again.
    Probe,
    /// An idle path is probed, so that a silently dead one is known before data needs it.
    IdlePing,
}

impl Timer {
    /// Every timer, in the order they run when due together.
    pub const ALL: [Timer; 5] = [Timer::Ack, Timer::Pace, Timer::Trouble, Timer::Probe, Timer::IdlePing];

    /// When this timer fires for path `p`, if it is armed.
    pub(super) fn deadline(self, p: &PathState, cfg: &SessionConfig) -> Option<Instant> {
        match self {
            Timer::Ack => p.ack_due,
            Timer::Pace => p.paced_until,
            // The rest watch established paths only, and exactly one of them at a time.
            _ if !p.established => None,
            Timer::Trouble => (!p.troubled && p.busy()).then(|| p.progress_at + p.trouble_timeout(cfg)),
            Timer::Probe => p.troubled.then(|| p.ping_at.unwrap_or(p.progress_at) + PROBE_EVERY),
            Timer::IdlePing => {
                (!p.troubled && !p.busy()).then(|| p.last_rx.max(p.progress_at) + cfg.ping_idle)
            }
        }
    }
}
