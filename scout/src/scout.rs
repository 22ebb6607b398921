//! [`Scout`]: the live view of networks that the library and the proxy subscribe to.
//!
//! A scout has a *source* of networks — the kernel through rtnetlink ([`Scout::embedded`]), or
//! a list set by hand ([`Scout::manual`], for tests and emulation) — and overlays on top: forced
//! up/down overrides and measured figures. Every change publishes a new [`Snapshot`] through a
//! `tokio::sync::watch` channel, so a subscriber always sees the latest state, never blocks the
//! scout, and holds no queue that could grow.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use cmm_policy::{Classifier, Figures, Network};
use tokio::sync::watch;

use crate::monitor;
use crate::snapshot::{Change, Snapshot};

/// A handle on the live network view; cheap to clone. The background task that watches the
/// kernel stops when the last handle is dropped.
#[derive(Clone)]
pub struct Scout {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<Overlay>,
    tx: watch::Sender<Arc<Snapshot>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Overlay {
    base: Vec<Network>,
    local: Vec<IpAddr>,
    overrides: BTreeMap<String, bool>,
    estimates: BTreeMap<String, Figures>,
    generation: u64,
}

impl Overlay {
    fn render(&self) -> Vec<Network> {
        let mut out = self.base.clone();
        for n in &mut out {
            let forced = self.overrides.get(&n.interface).or_else(|| self.overrides.get(&n.name));
            match forced {
                Some(true) if !n.up => {
                    n.up = true;
                    n.down_reason = None;
                }
                Some(false) if n.up => {
                    n.up = false;
                    n.down_reason = Some("forced down".into());
                }
                _ => {}
            }
            if let Some(f) = self.estimates.get(&n.interface) {
                n.estimated = *f;
            }
        }
        out
    }
}

impl Scout {
    fn with_state(overlay: Overlay) -> Scout {
        let first =
            Snapshot { generation: 0, networks: overlay.render(), local_addresses: overlay.local.clone() };
        let (tx, _) = watch::channel(Arc::new(first));
        Scout { shared: Arc::new(Shared { state: Mutex::new(overlay), tx, task: Mutex::new(None) }) }
    }

    /// A scout whose networks come from the kernel of the current network namespace, classified
    /// by `classifier`. Returns once the initial state has been read, so the first snapshot is
    /// already real.
    pub async fn embedded(classifier: Classifier) -> io::Result<Scout> {
        let scout = Scout::with_state(Overlay::default());
        let weak: Weak<Shared> = Arc::downgrade(&scout.shared);
        let publish: monitor::Publish = Box::new(move |state| {
            let Some(shared) = weak.upgrade() else { return false };
            let networks = state.networks(&classifier);
            let local = state.local_addresses();
            Scout { shared }.set_base(networks, local);
            true
        });
        let task = monitor::spawn(publish).await?;
        *scout.shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        tracing::debug!(networks = ?scout.snapshot().networks.iter().map(|n| &n.interface).collect::<Vec<_>>(), "embedded scout started");
        Ok(scout)
    }

    /// A scout whose networks are set by hand with [`Scout::set_networks`]: for tests, traces
    /// and emulation.
    pub fn manual(networks: Vec<Network>) -> Scout {
        Scout::with_state(Overlay { base: networks, ..Overlay::default() })
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.tx.borrow().clone()
    }

    /// A subscription: the current snapshot now, and every change after it.
    pub fn subscribe(&self) -> Subscription {
        let rx = self.shared.tx.subscribe();
        let seen = rx.borrow().clone();
        Subscription { rx, seen }
    }

    /// Replaces the source networks (for a manual scout, or a trace replay).
    pub fn set_networks(&self, networks: Vec<Network>) {
        let local = self.lock().local.clone();
        self.set_base(networks, local);
    }

    /// Sets this machine's own addresses (for a manual scout).
    pub fn set_local_addresses(&self, local: Vec<IpAddr>) {
        let base = self.lock().base.clone();
        self.set_base(base, local);
    }

    /// Forces a network (by interface or name) up or down, or (`None`) lets its real state
    /// show again.
    pub fn set_override(&self, network: &str, up: Option<bool>) {
        self.update(|o| match up {
            Some(up) => {
                o.overrides.insert(network.to_string(), up);
            }
            None => {
                o.overrides.remove(network);
            }
        });
    }

    /// Records measured figures for the network on `interface`; they win over declared ones.
    pub fn set_estimate(&self, interface: &str, figures: Figures) {
        self.update(|o| {
            o.estimates.insert(interface.to_string(), figures);
        });
    }

    fn set_base(&self, networks: Vec<Network>, local: Vec<IpAddr>) {
        self.update(|o| {
            o.base = networks;
            o.local = local;
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `f` and publishes a new snapshot if anything visible changed.
    fn update(&self, f: impl FnOnce(&mut Overlay)) {
        let mut o = self.lock();
        f(&mut o);
        let networks = o.render();
        let current = self.shared.tx.borrow().clone();
        if current.networks == networks && current.local_addresses == o.local {
            return;
        }
        o.generation += 1;
        let snapshot = Snapshot { generation: o.generation, networks, local_addresses: o.local.clone() };
        for change in snapshot.changes_since(&current) {
            tracing::info!(target: "cmm_scout", "network {change}");
        }
        // Sent while holding the lock so snapshots leave in generation order.
        self.shared.tx.send_replace(Arc::new(snapshot));
    }
}

/// A subscriber's view: the snapshot it has seen and a way to wait for the next one.
///
/// Intermediate states may be skipped when several changes happen before the subscriber looks
/// again; the changes it is given always lead from what it saw to the latest state.
pub struct Subscription {
    rx: watch::Receiver<Arc<Snapshot>>,
    seen: Arc<Snapshot>,
}

impl Subscription {
    /// The snapshot this subscriber has seen last.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.seen.clone()
    }

    /// Waits for the next change. `None` when the scout is gone.
    pub async fn next(&mut self) -> Option<(Arc<Snapshot>, Vec<Change>)> {
        loop {
            self.rx.changed().await.ok()?;
            let new = self.rx.borrow_and_update().clone();
            let changes = new.changes_since(&self.seen);
            self.seen = new.clone();
            if !changes.is_empty() {
                return Some((new, changes));
            }
        }
    }

    /// Waits until `f` gives an answer for the current or a later snapshot. `None` when the
    /// scout is gone first.
    pub async fn wait_for<T>(&mut self, mut f: impl FnMut(&Snapshot) -> Option<T>) -> Option<T> {
        self.seen = self.rx.borrow_and_update().clone();
        if let Some(t) = f(&self.seen) {
            return Some(t);
        }
        loop {
            let (snap, _) = self.next().await?;
            if let Some(t) = f(&snap) {
                return Some(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::NetworkKind;
    use std::time::Duration;

    fn nets() -> Vec<Network> {
        vec![
            Network::new("cell", "cell0", NetworkKind::Cellular),
            Network::new("wifi", "wifi0", NetworkKind::Wifi),
        ]
    }

    #[tokio::test]
    async fn subscribers_see_changes_in_order() {
        let scout = Scout::manual(nets());
        let mut sub = scout.subscribe();
        assert_eq!(sub.snapshot().networks.len(), 2);
        scout.set_override("wifi", Some(false));
        let (snap, changes) = sub.next().await.unwrap();
        assert!(!snap.is_up("wifi0"));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to_string(), "wifi (wifi0) down: forced down");
        scout.set_override("wifi", None);
        let (snap, _) = sub.next().await.unwrap();
        assert!(snap.is_up("wifi0"));
        // No visible change, no publication.
        let before = scout.snapshot().generation;
        scout.set_networks(nets());
        assert_eq!(scout.snapshot().generation, before);
    }

    #[tokio::test]
    async fn wait_for_and_end_of_scout() {
        let scout = Scout::manual(vec![]);
        let mut sub = scout.subscribe();
        let s2 = scout.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            s2.set_networks(nets());
        });
        let got = sub.wait_for(|s| s.by_interface("wifi0").map(|n| n.name.clone())).await;
        assert_eq!(got.as_deref(), Some("wifi"));
        drop(scout);
        assert!(sub.next().await.is_none(), "a subscription ends with its scout");
    }

    #[tokio::test]
    async fn estimates_overlay_declared_figures() {
        let scout = Scout::manual(nets());
        scout.set_estimate(
            "wifi0",
            Figures { rtt: Some(Duration::from_millis(7)), bandwidth_down: None, bandwidth_up: None },
        );
        assert_eq!(scout.snapshot().by_interface("wifi0").unwrap().rtt(), Duration::from_millis(7));
    }
}
