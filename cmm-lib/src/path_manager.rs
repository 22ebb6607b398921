//! [`PathManager`]: which physical connections a connecting multi-socket should have — sans-IO.
//!
//! Fed the scout's snapshots, the outcome of every dial and the end of every path, it says
//! which paths to dial (one per up network and remote address), which to end (their network
//! went down), how long to wait before dialling again (backoff, reset when a network comes
//! back), and when the peer is gone for good: no path is left, and every up network's dials
//! were refused (or its paths reset) since a path last worked there. A total outage of our own
//! networks is not that: with no network up, the session waits for one.
//!
//! The tokio driver ([`crate::driver`]) does the dialling and ending; time is a parameter.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cmm_policy::Network;
use cmm_scout::Snapshot;

use crate::frame::PathId;

/// First and longest wait before a failed path is dialled again.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Refused dials (or paths reset) in a row on a network, with no path working there since,
/// after which the peer counts as gone on that network.
pub const REFUSALS_FOR_GONE: u32 = 2;

/// A path's identity on the connecting side: the local network (`name/interface`) and the
/// remote address it was dialled for.
pub type PathKey = (String, SocketAddr);

/// A network's identity in path keys: name and interface (unique in any snapshot).
pub fn net_key(n: &Network) -> String {
    format!("{}/{}", n.name, n.interface)
}

/// What the driver should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Dial `remote` over `network`; `settle` says it is the first dial since the network came
    /// up, which gets a short timeout (its first SYN may be lost: a fresh socket beats the
    /// kernel's retransmission).
    Dial {
        /// The local network.
        network: Box<Network>,
        /// The peer's address.
        remote: SocketAddr,
        /// Whether a short, settling timeout applies.
        settle: bool,
    },
    /// End a path: its network went down.
    End {
        /// The path.
        path: PathId,
        /// Why, for logs and the path's events.
        reason: String,
    },
}

/// How a dial or a path ended, as far as the peer's liveness goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The peer's host answered that nobody listens (ECONNREFUSED), or reset the path.
    Refused,
    /// Anything else: a timeout, an unreachable network, a local error.
    Failed,
}

/// The connecting side's paths, dials and backoffs.
#[derive(Debug)]
pub struct PathManager {
    remotes: Vec<SocketAddr>,
    open: HashMap<PathId, PathKey>,
    connecting: HashSet<PathKey>,
    /// Per key: not before, next backoff.
    backoff: HashMap<PathKey, (Instant, Duration)>,
    /// Networks up at the last snapshot.
    seen_up: HashSet<String>,
    /// Per network key: refusals in a row since a path last worked there.
    refused: HashMap<String, u32>,
    /// Paths that completed their handshake and still exist.
    established: HashSet<PathId>,
    /// Whether any path ever completed its handshake.
    ever_established: bool,
    /// After `reset`: nothing is dialled until [`PathManager::resume`].
    paused: bool,
}

impl PathManager {
    /// A manager for paths to `remotes`.
    pub fn new(remotes: Vec<SocketAddr>) -> PathManager {
        PathManager {
            remotes,
            open: HashMap::new(),
            connecting: HashSet::new(),
            backoff: HashMap::new(),
            seen_up: HashSet::new(),
            refused: HashMap::new(),
            established: HashSet::new(),
            ever_established: false,
            paused: false,
        }
    }

    /// The actions a new snapshot calls for.
    pub fn reconcile(&mut self, snap: &Snapshot, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for (&id, (key, _)) in &self.open {
            let net = snap.networks.iter().find(|n| &net_key(n) == key);
            if net.is_none_or(|n| !n.up) {
                let why = net.and_then(|n| n.down_reason.clone()).unwrap_or_else(|| "gone".into());
                out.push(Action::End { path: id, reason: format!("network {key} went down: {why}") });
            }
        }
        // A network that has just come (back) up is dialled at once, whatever the backoff its
        // failures while it was down built up, and its refusals start afresh.
        let up_now: HashSet<String> = snap.up().map(net_key).collect();
        for key in up_now.difference(&self.seen_up) {
            self.backoff.retain(|(k, _), _| k != key);
            self.refused.remove(key);
        }
        self.seen_up = up_now;
        if self.paused {
            return out;
        }
        let open: HashSet<&PathKey> = self.open.values().collect();
        let mut dial = Vec::new();
        for n in snap.up() {
            for &remote in &self.remotes {
                let key = (net_key(n), remote);
                let family_ok = n.addresses.iter().any(|a| a.is_ipv4() == remote.is_ipv4());
                let waiting = self.backoff.get(&key).is_some_and(|(at, _)| now < *at);
                if family_ok && !open.contains(&key) && !self.connecting.contains(&key) && !waiting {
                    let settle = !self.backoff.contains_key(&key);
                    dial.push((key, Action::Dial { network: Box::new(n.clone()), remote, settle }));
                }
            }
        }
        for (key, action) in dial {
            self.connecting.insert(key);
            out.push(action);
        }
        out
    }

    fn back_off(&mut self, key: PathKey, now: Instant) {
        let entry = self.backoff.entry(key).or_insert((now, BACKOFF_MIN));
        entry.0 = now + entry.1;
        entry.1 = (entry.1 * 2).min(BACKOFF_MAX);
    }

    /// A dial failed. A short settling dial that timed out is tried again at once with the
    /// full timeout; anything else backs off.
    pub fn dial_failed(&mut self, key: &PathKey, settle: bool, outcome: Outcome, now: Instant) {
        self.connecting.remove(key);
        if outcome == Outcome::Refused {
            *self.refused.entry(key.0.clone()).or_default() += 1;
        }
        if settle && outcome == Outcome::Failed {
            self.backoff.insert(key.clone(), (now, BACKOFF_MIN));
            return;
        }
        self.back_off(key.clone(), now);
    }

    /// A dial connected: it is path `id` now (its handshake still to come).
    pub fn dial_connected(&mut self, key: PathKey, id: PathId) {
        self.connecting.remove(&key);
        self.open.insert(id, key);
    }

    /// A dial connected but the socket is closing: forget it.
    pub fn dial_abandoned(&mut self, key: &PathKey) {
        self.connecting.remove(key);
    }

    /// Path `id` completed its handshake: the peer is there.
    /// Path `id` completed its handshake. The session's first one also ends every backoff: a
    /// path that ended before it (a TLS listener refuses a second first path, which must join
    /// with a proof the first path's WELCOME makes possible) is dialled again at once.
    pub fn path_established(&mut self, id: PathId) {
        if let Some((net, _)) = self.open.get(&id) {
            self.refused.remove(net);
            self.established.insert(id);
            if !self.ever_established {
                self.backoff.clear();
            }
            self.ever_established = true;
        }
    }

    /// Path `id` ended; its key is dialled again after a backoff. `outcome` says whether the
    /// peer reset or closed it (a sign it may be gone).
    pub fn path_ended(&mut self, id: PathId, outcome: Outcome, now: Instant) {
        self.established.remove(&id);
        if let Some(key) = self.open.remove(&id) {
            if outcome == Outcome::Refused {
                *self.refused.entry(key.0.clone()).or_default() += 1;
            }
            self.back_off(key, now);
        }
    }

    /// Path `id` was refused because it came before the session could join (a TLS
    /// listener's CLOSE code 2): once a path has been established it is dialled again at
    /// once, as a join; before, it backs off until the first establishment ends the backoff.
    pub fn path_refused_before_join(&mut self, id: PathId, now: Instant) {
        self.established.remove(&id);
        if let Some(key) = self.open.remove(&id) {
            if self.ever_established {
                self.backoff.remove(&key);
            } else {
                self.back_off(key, now);
            }
        }
    }

    /// Stops dialling (libcmm's `cmm_reset`) until [`PathManager::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Dials again after a pause; returns whether it was paused.
    pub fn resume(&mut self) -> bool {
        std::mem::replace(&mut self.paused, false)
    }

    /// Whether dialling is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Why the peer is gone for good, if it is: a path worked once, none is left, at least one
    /// network is up, and on every up network the peer refused our dials (or reset our paths)
    /// [`REFUSALS_FOR_GONE`] times in a row since a path last worked there.
    pub fn peer_gone(&self) -> Option<String> {
        if !self.ever_established || self.paused || !self.established.is_empty() || self.seen_up.is_empty() {
            return None;
        }
        let all = self.seen_up.iter().all(|n| self.refused.get(n).is_some_and(|&r| r >= REFUSALS_FOR_GONE));
        all.then(|| {
            let mut nets: Vec<&str> = self.seen_up.iter().map(String::as_str).collect();
            nets.sort();
            format!("the peer is gone: it refused every path on {}", nets.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::NetworkKind;

    fn net(name: &str, iface: &str, up: bool) -> Network {
        let mut n = Network::new(name, iface, NetworkKind::Wifi);
        n.up = up;
        n.addresses = vec!["10.0.0.2".parse().unwrap()];
        if !up {
            n.down_reason = Some("admin down".into());
        }
        n
    }

    fn snap(nets: Vec<Network>) -> Snapshot {
        Snapshot { generation: 1, networks: nets, local_addresses: Vec::new() }
    }

    const REMOTE: &str = "10.3.0.2:7000";

    fn dials(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial { network, settle, .. } => Some((network.interface.clone(), *settle)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_path_per_up_network_and_none_twice() {
        let mut m = PathManager::new(vec![REMOTE.parse().unwrap()]);
        let now = Instant::now();
        let s = snap(vec![net("wifi", "wifi0", true), net("cell", "cell0", true), net("x", "x0", false)]);
        let a = m.reconcile(&s, now);
        assert_eq!(dials(&a), vec![("wifi0".into(), true), ("cell0".into(), true)]);
        // Dials in progress are not repeated.
        assert!(m.reconcile(&s, now).is_empty());
        m.dial_connected(("wifi/wifi0".into(), REMOTE.parse().unwrap()), 1);
        assert!(m.reconcile(&s, now).is_empty());
    }

    #[test]
    fn a_network_going_down_ends_its_paths_and_its_return_dials_at_once() {
        let remote: SocketAddr = REMOTE.parse().unwrap();
        let mut m = PathManager::new(vec![remote]);
        let t0 = Instant::now();
        m.reconcile(&snap(vec![net("wifi", "wifi0", true)]), t0);
        m.dial_connected(("wifi/wifi0".into(), remote), 1);
        m.path_established(1);
        let a = m.reconcile(&snap(vec![net("wifi", "wifi0", false)]), t0);
        assert!(matches!(&a[..], [Action::End { path: 1, reason }] if reason.contains("admin down")));
        m.path_ended(1, Outcome::Failed, t0);
        // Back: dialled at once, without waiting out the backoff, with the settling timeout.
        let a = m.reconcile(&snap(vec![net("wifi", "wifi0", true)]), t0 + Duration::from_millis(10));
        assert_eq!(dials(&a), vec![("wifi0".into(), true)]);
    }

    #[test]
    fn failures_back_off_and_a_settling_timeout_retries_at_once() {
        let remote: SocketAddr = REMOTE.parse().unwrap();
        let key = ("wifi/wifi0".to_string(), remote);
        let mut m = PathManager::new(vec![remote]);
        let s = snap(vec![net("wifi", "wifi0", true)]);
        let t0 = Instant::now();
        m.reconcile(&s, t0);
        m.dial_failed(&key, true, Outcome::Failed, t0);
        // The settling dial timed out: again at once, now with the full timeout.
        assert_eq!(dials(&m.reconcile(&s, t0)), vec![("wifi0".into(), false)]);
        m.dial_failed(&key, false, Outcome::Failed, t0);
        assert!(m.reconcile(&s, t0 + Duration::from_millis(400)).is_empty());
        assert_eq!(dials(&m.reconcile(&s, t0 + BACKOFF_MIN)).len(), 1);
        m.dial_failed(&key, false, Outcome::Failed, t0 + BACKOFF_MIN);
        // Doubled.
        assert!(m.reconcile(&s, t0 + BACKOFF_MIN * 2).is_empty());
        assert_eq!(dials(&m.reconcile(&s, t0 + BACKOFF_MIN * 3)).len(), 1);
    }

    #[test]
    fn the_first_established_path_ends_the_backoff_of_the_others() {
        let remote: SocketAddr = REMOTE.parse().unwrap();
        let (wifi, cell) = (("wifi/wifi0".to_string(), remote), ("cell/cell0".to_string(), remote));
        let mut m = PathManager::new(vec![remote]);
        let s = snap(vec![net("wifi", "wifi0", true), net("cell", "cell0", true)]);
        let t0 = Instant::now();
        assert_eq!(m.reconcile(&s, t0).len(), 2);
        m.dial_connected(wifi, 1);
        m.dial_connected(cell, 2);
        // Cell's path is refused before wifi's is welcomed (it must join with a proof).
        m.path_ended(2, Outcome::Failed, t0);
        assert!(m.reconcile(&s, t0).is_empty(), "backing off");
        m.path_established(1);
        let again = dials(&m.reconcile(&s, t0));
        assert!(again.len() == 1 && again[0].0 == "cell0", "{again:?}");
        // Refused after the first path was welcomed: again at once.
        m.dial_connected(("cell/cell0".to_string(), remote), 5);
        m.path_refused_before_join(5, t0);
        let again = dials(&m.reconcile(&s, t0));
        assert!(again.len() == 1 && again[0].0 == "cell0", "{again:?}");
        // Later establishments leave backoffs alone.
        m.dial_connected(("cell/cell0".to_string(), remote), 3);
        m.path_ended(3, Outcome::Failed, t0);
        m.path_ended(1, Outcome::Failed, t0);
        m.dial_connected(("wifi/wifi0".to_string(), remote), 4);
        m.path_established(4);
        assert!(
            m.reconcile(&s, t0).iter().all(|a| !matches!(a, Action::Dial { .. })),
            "cell still backs off"
        );
    }

    #[test]
    fn the_peer_is_gone_when_every_up_network_is_refused() {
        let remote: SocketAddr = REMOTE.parse().unwrap();
        let (wifi, cell) = (("wifi/wifi0".to_string(), remote), ("cell/cell0".to_string(), remote));
        let mut m = PathManager::new(vec![remote]);
        let s = snap(vec![net("wifi", "wifi0", true), net("cell", "cell0", true)]);
        let t = Instant::now();
        m.reconcile(&s, t);
        // Refusals before any path worked are connect's business, not a lost peer.
        m.dial_failed(&wifi, true, Outcome::Refused, t);
        m.dial_failed(&wifi, false, Outcome::Refused, t);
        assert_eq!(m.peer_gone(), None);
        m.dial_connected(wifi.clone(), 1);
        m.dial_connected(cell.clone(), 2);
        m.path_established(1);
        m.path_established(2);
        // The peer's process exits: both paths closed by it, then every redial refused.
        m.path_ended(1, Outcome::Refused, t);
        m.path_ended(2, Outcome::Refused, t);
        m.dial_failed(&wifi, false, Outcome::Refused, t);
        assert_eq!(m.peer_gone(), None, "cell has been refused only once");
        m.dial_failed(&cell, false, Outcome::Refused, t);
        let why = m.peer_gone().expect("gone");
        assert!(why.contains("cell/cell0") && why.contains("wifi/wifi0"), "{why}");
    }

    #[test]
    fn a_total_outage_of_our_own_networks_is_not_a_lost_peer() {
        let remote: SocketAddr = REMOTE.parse().unwrap();
        let wifi = ("wifi/wifi0".to_string(), remote);
        let mut m = PathManager::new(vec![remote]);
        let t = Instant::now();
        m.reconcile(&snap(vec![net("wifi", "wifi0", true)]), t);
        m.dial_connected(wifi.clone(), 1);
        m.path_established(1);
        m.path_ended(1, Outcome::Refused, t);
        m.reconcile(&snap(vec![net("wifi", "wifi0", false)]), t);
        assert_eq!(m.peer_gone(), None, "no network up: wait");
        // Timeouts are not refusals: a silent network is not a lost peer.
        m.reconcile(&snap(vec![net("wifi", "wifi0", true)]), t);
        for _ in 0..5 {
            m.dial_failed(&wifi, false, Outcome::Failed, t);
        }
        assert_eq!(m.peer_gone(), None);
        // A network that comes back starts its count afresh.
        m.dial_failed(&wifi, false, Outcome::Refused, t);
        m.reconcile(&snap(vec![net("wifi", "wifi0", false)]), t);
        m.reconcile(&snap(vec![net("wifi", "wifi0", true)]), t);
        m.dial_failed(&wifi, false, Outcome::Refused, t);
        assert_eq!(m.peer_gone(), None);
    }
}
