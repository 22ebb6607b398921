//! [`Scout`]: the live view of networks that the library and the proxy subscribe to.
//!
//! A scout has a *source* of networks — the kernel through rtnetlink ([`Scout::embedded`]), a
//! scout daemon over its Unix socket ([`Scout::discover`] prefers one when it runs), or a list
//! set by hand ([`Scout::manual`], for tests and emulation) — and overlays on top: forced
//! up/down overrides and measured figures ([`Scout::report`]). With a daemon as the source,
//! overrides and reports go to the daemon, which applies them for every subscriber.
//!
//! Every change publishes a new [`Snapshot`] through a `tokio::sync::watch` channel, so a
//! subscriber always sees the latest state, never blocks the scout, and holds no queue that
//! could grow.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use std::time::Instant;

use cmm_policy::{Classifier, Config, Figures, Network};
use tokio::sync::{mpsc, watch};

use crate::estimate::Estimator;
use crate::ipc::{ForcedState, Request, Sample};
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
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// When a daemon is the source: requests (overrides, reports) for it.
    remote: Mutex<Option<mpsc::Sender<Request>>>,
    /// Where the networks come from, for logs.
    source: Mutex<String>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner).drain(..) {
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
    estimators: BTreeMap<String, Estimator>,
    generation: u64,
}

impl Overlay {
    fn render(&self) -> Vec<Network> {
        let now = Instant::now();
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
            let measured = self.estimators.get(&n.interface).map(|e| e.figures(now)).unwrap_or_default();
            if let Some(f) = self.estimates.get(&n.interface).or_else(|| self.estimates.get(&n.name)) {
                n.estimated = f.or(measured);
            } else if measured != Figures::default() {
                n.estimated = measured.or(n.estimated);
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
        Scout {
            shared: Arc::new(Shared {
                state: Mutex::new(overlay),
                tx,
                tasks: Mutex::new(Vec::new()),
                remote: Mutex::new(None),
                source: Mutex::new("manual".into()),
            }),
        }
    }

    /// The scout a program should use: the daemon at the configured socket when one runs (its
    /// view, overrides and estimates are shared by every program), else an embedded one
    /// watching the kernel, silently (a debug log line says which).
    pub async fn discover(config: &Config, client: &str) -> io::Result<Scout> {
        let path = crate::daemon::socket_path(config);
        match crate::remote::connect(&path, client, config.classifier()).await {
            Ok(scout) => {
                tracing::debug!("using the scout daemon at {}", path.display());
                Ok(scout)
            }
            Err(e) => {
                tracing::debug!("no scout daemon at {} ({e}): using the embedded scout", path.display());
                let scout = Scout::embedded(config.classifier()).await?;
                if let Some(target) = &config.scout.probe {
                    scout.start_probes(target.clone(), config.scout.probe_interval);
                }
                Ok(scout)
            }
        }
    }

    /// A scout whose networks and local addresses start as `snapshot` and are then set by its
    /// source's task (`remote` keeps it, and sends it requests).
    pub(crate) fn from_snapshot(snapshot: &Snapshot, source: String) -> Scout {
        let scout = Scout::with_state(Overlay {
            base: snapshot.networks.clone(),
            local: snapshot.local_addresses.clone(),
            ..Overlay::default()
        });
        *scout.shared.source.lock().unwrap_or_else(PoisonError::into_inner) = source;
        scout
    }

    /// Sends requests for the daemon to `tx` from now on.
    pub(crate) fn set_remote(&self, tx: Option<mpsc::Sender<Request>>) {
        *self.shared.remote.lock().unwrap_or_else(PoisonError::into_inner) = tx;
    }

    /// Keeps `task` running as long as the scout lives.
    pub(crate) fn own_task(&self, task: tokio::task::JoinHandle<()>) {
        self.shared.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(task);
    }

    /// A weak handle, for the scout's own tasks.
    pub(crate) fn downgrade(&self) -> WeakScout {
        WeakScout(Arc::downgrade(&self.shared))
    }

    /// Where the networks come from (`embedded`, `daemon at PATH`, `manual`).
    pub fn source(&self) -> String {
        self.shared.source.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn remote(&self) -> Option<mpsc::Sender<Request>> {
        self.shared.remote.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Takes a measurement of a connection on `interface` (TCP_INFO, or a probe). The
    /// network's estimates follow; with a daemon as source, the daemon takes it.
    pub fn report(&self, interface: &str, sample: Sample) {
        if let Some(tx) = self.remote() {
            // A full queue (the daemon is slow) drops the sample: more follow.
            let _ = tx.try_send(Request::Report { interface: interface.to_string(), sample });
            return;
        }
        self.update(|o| o.estimators.entry(interface.to_string()).or_default().add(&sample, Instant::now()));
    }

    /// Renders again, so estimates past their window are dropped.
    pub fn refresh(&self) {
        self.update(|_| {});
    }

    /// Probes every up network every `interval` by connecting to `target` through it; the
    /// handshake time is an RTT sample.
    pub fn start_probes(&self, target: String, interval: std::time::Duration) {
        let task = tokio::spawn(crate::probe::run(self.downgrade(), target, interval));
        self.own_task(task);
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
        scout.own_task(task);
        *scout.shared.source.lock().unwrap_or_else(PoisonError::into_inner) = "embedded".into();
        // Estimates age out even when nothing else changes.
        let weak = scout.downgrade();
        scout.own_task(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                s.refresh();
            }
        }));
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

    /// Replaces networks and local addresses at once (a remote source's update).
    pub(crate) fn set_view(&self, networks: Vec<Network>, local: Vec<IpAddr>) {
        self.set_base(networks, local);
    }

    /// Sets this machine's own addresses (for a manual scout).
    pub fn set_local_addresses(&self, local: Vec<IpAddr>) {
        let base = self.lock().base.clone();
        self.set_base(base, local);
    }

    /// Forces a network (by interface or name) up or down, or (`None`) lets its real state
    /// show again. With a daemon as source, the daemon does it, for every subscriber.
    pub fn set_override(&self, network: &str, up: Option<bool>) {
        if let Some(tx) = self.remote() {
            let state = match up {
                Some(true) => ForcedState::Up,
                Some(false) => ForcedState::Down,
                None => ForcedState::Auto,
            };
            if tx.try_send(Request::Set { network: network.to_string(), state }).is_err() {
                tracing::warn!("the scout daemon is not taking requests: {network} not forced");
            }
            return;
        }
        self.update(|o| match up {
            Some(up) => {
                o.overrides.insert(network.to_string(), up);
            }
            None => {
                o.overrides.remove(network);
            }
        });
    }

    /// Records figures for the network on `interface` (or named so), as a trace replay does; they
    /// win over declared and measured ones.
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
            // Figures move often (estimates); ups and downs are what a person reads logs for.
            match change {
                Change::Changed(_) => tracing::debug!(target: "cmm_scout", "network {change}"),
                _ => tracing::info!(target: "cmm_scout", "network {change}"),
            }
        }
        // Sent while holding the lock so snapshots leave in generation order.
        self.shared.tx.send_replace(Arc::new(snapshot));
    }
}

/// A scout that does not keep it alive (its own tasks hold these).
#[derive(Clone)]
pub(crate) struct WeakScout(std::sync::Weak<Shared>);

impl WeakScout {
    /// The scout, if it still exists.
    pub(crate) fn upgrade(&self) -> Option<Scout> {
        self.0.upgrade().map(|shared| Scout { shared })
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
