//! The choice of a network for a set of labels: [`Policy::choose`].
//!
//! Follows libcmm: restriction labels first (wifi-only, cellular-only, relaxed by
//! fallback-allowed); then SMALL → lowest RTT, LARGE → highest bandwidth; without a size label,
//! ONDEMAND (or nothing) → lowest RTT and BACKGROUND → highest bandwidth. A [`LabelPolicy`]
//! from the config can restrict and order the networks, keep traffic off metered ones, and say
//! what happens when nothing fits. Ties break on rank, then interface name: the same snapshot
//! always gives the same answer.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::time::Duration;

use crate::glob::Glob;
use crate::labels::Labels;
use crate::network::{Network, NetworkKind};

/// What to do when no up network is allowed for the labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoMatch {
    /// Hold the traffic until an allowed network comes up, for at most the policy's wait.
    Defer,
    /// Use any up network that the restriction labels allow, ignoring the policy's list.
    Fallback,
    /// Refuse the traffic at once.
    Reject,
}

/// An entry of a label policy's `networks` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkRef {
    /// Networks whose name or interface matches this pattern (`wifi`, `wlan*`).
    Named(Glob),
    /// `*`: every other network, in the default order.
    Any,
}

impl NetworkRef {
    /// Parses a list entry: `*` or a name/interface pattern.
    pub fn parse(text: &str) -> NetworkRef {
        if text.trim() == "*" { NetworkRef::Any } else { NetworkRef::Named(Glob::new(text.trim())) }
    }

    fn matches(&self, n: &Network) -> bool {
        match self {
            NetworkRef::Any => true,
            NetworkRef::Named(g) => g.matches(&n.name) || g.matches(&n.interface),
        }
    }
}

impl std::fmt::Display for NetworkRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkRef::Any => f.write_str("*"),
            NetworkRef::Named(g) => write!(f, "{g}"),
        }
    }
}

impl std::fmt::Display for NoMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoMatch::Defer => "defer",
            NoMatch::Fallback => "fallback",
            NoMatch::Reject => "reject",
        })
    }
}

/// How traffic with some labels chooses its network (`[label.<labels>]` in proxy.toml).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelPolicy {
    /// The labels this policy is for; it applies to any traffic carrying all of them.
    pub labels: Labels,
    /// The allowed networks, best first; `None` allows all in the default order.
    pub networks: Option<Vec<NetworkRef>>,
    /// Whether metered networks may carry this traffic.
    pub metered: bool,
    /// What happens when no allowed network is up.
    pub on_no_match: NoMatch,
    /// How long deferred traffic may wait.
    pub max_wait: Duration,
}

/// Everything the chooser needs from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Labels used when the traffic carries none.
    pub default_labels: Labels,
    /// Label policies in file order.
    pub label_policies: Vec<LabelPolicy>,
    /// How long deferred traffic waits when its label policy does not say.
    pub default_max_wait: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            default_labels: Labels::ONDEMAND,
            label_policies: Vec::new(),
            default_max_wait: Duration::from_secs(60),
        }
    }
}

/// What the chooser decided, with the reason in words for logs.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Use these networks, best first (indices into the snapshot given to `choose`).
    Use {
        /// Never empty.
        candidates: Vec<usize>,
        /// Why the first one was chosen.
        why: String,
    },
    /// Nothing fits now: hold the traffic for at most `max_wait`.
    Defer {
        /// The longest the traffic may wait.
        max_wait: Duration,
        /// Why nothing fits.
        why: String,
    },
    /// Refuse the traffic.
    Reject {
        /// Why.
        why: String,
    },
}

/// Which figure decides among allowed networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Lowest round-trip time first.
    LowestRtt,
    /// Highest bandwidth first.
    HighestBandwidth,
}

impl Metric {
    /// libcmm's rule: the size label decides; without one, foreground/background does.
    pub fn for_labels(labels: Labels) -> Metric {
        if labels.contains(Labels::SMALL) {
            Metric::LowestRtt
        } else if labels.contains(Labels::LARGE) || labels.contains(Labels::BACKGROUND) {
            Metric::HighestBandwidth
        } else {
            Metric::LowestRtt
        }
    }

    fn compare(self, a: &Network, b: &Network) -> Ordering {
        match self {
            Metric::LowestRtt => a.latency().cmp(&b.latency()),
            Metric::HighestBandwidth => {
                b.bandwidth_down().cmp(&a.bandwidth_down()).then(b.bandwidth_up().cmp(&a.bandwidth_up()))
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Metric::LowestRtt => "lowest RTT",
            Metric::HighestBandwidth => "highest bandwidth",
        }
    }
}

/// Whether `n` satisfies the hard restriction in `labels` (ignoring fallback-allowed).
pub fn fits_restriction(labels: Labels, n: &Network) -> bool {
    if labels.contains(Labels::WIFI_ONLY) {
        matches!(n.kind, NetworkKind::Wifi | NetworkKind::Ethernet)
    } else if labels.contains(Labels::CELLULAR_ONLY) {
        n.kind == NetworkKind::Cellular
    } else {
        true
    }
}

impl Policy {
    /// The labels that apply: `labels`, or the default when there are none.
    pub fn effective_labels(&self, labels: Labels) -> Labels {
        if labels.is_empty() { self.default_labels } else { labels }
    }

    /// The most specific label policy for `labels`: the one with the most labels among those
    /// whose labels are all present; on a tie, the first in the file.
    pub fn label_policy(&self, labels: Labels) -> Option<&LabelPolicy> {
        let mut best: Option<&LabelPolicy> = None;
        for lp in &self.label_policies {
            if labels.contains(lp.labels) && best.is_none_or(|b| lp.labels.count() > b.labels.count()) {
                best = Some(lp);
            }
        }
        best
    }

    /// The longest that traffic with `labels` may be deferred.
    pub fn max_wait(&self, labels: Labels) -> Duration {
        let labels = self.effective_labels(labels);
        self.label_policy(labels).map_or(self.default_max_wait, |lp| lp.max_wait)
    }

    /// Chooses networks for `labels` from a snapshot.
    pub fn choose(&self, labels: Labels, networks: &[Network]) -> Decision {
        let labels = self.effective_labels(labels);
        let lp = self.label_policy(labels);
        let metric = Metric::for_labels(labels);
        let metered_ok = lp.is_none_or(|lp| lp.metered);
        let list = lp.and_then(|lp| lp.networks.as_deref());

        let restricted: Vec<usize> =
            (0..networks.len()).filter(|&i| fits_restriction(labels, &networks[i])).collect();
        let restriction_relaxed =
            labels.contains(Labels::FALLBACK_ALLOWED) && !restricted.iter().any(|&i| networks[i].up);
        let mut excluded = String::new();
        let mut candidates: Vec<(usize, usize)> = Vec::new(); // (index, position in list)
        for (i, n) in networks.iter().enumerate() {
            let why_not = if !n.up {
                Some(format!("down ({})", n.down_reason.as_deref().unwrap_or("not usable")))
            } else if !restriction_relaxed && !fits_restriction(labels, n) {
                Some(format!("{} does not fit {}", n.kind, labels.restrictions()))
            } else if n.metered && !metered_ok {
                Some("metered".to_string())
            } else if n.refused.intersects(labels) {
                let both = Labels::from_bits(n.refused.bits() & labels.bits()).unwrap_or(n.refused);
                Some(format!("the peer's policy keeps {both} off it"))
            } else {
                match list {
                    None => {
                        candidates.push((i, 0));
                        None
                    }
                    Some(list) => match list.iter().position(|r| r.matches(n)) {
                        Some(pos) => {
                            candidates.push((i, pos));
                            None
                        }
                        None => Some("not in the label policy's networks".to_string()),
                    },
                }
            };
            if let Some(why) = why_not {
                let _ = write!(excluded, "{}{} ({}): {}", sep(&excluded), n.name, n.interface, why);
            }
        }

        let order = |a: &(usize, usize), b: &(usize, usize)| {
            let (na, nb) = (&networks[a.0], &networks[b.0]);
            a.1.cmp(&b.1)
                .then_with(|| metric.compare(na, nb))
                .then(na.rank.cmp(&nb.rank))
                .then_with(|| na.interface.cmp(&nb.interface))
        };
        candidates.sort_by(order);

        if let Some(&(first, _)) = candidates.first() {
            let n = &networks[first];
            let how = if list.is_some() {
                "first allowed by the label policy".into()
            } else {
                metric.describe().to_string()
            };
            return Decision::Use {
                candidates: candidates.into_iter().map(|c| c.0).collect(),
                why: format!("{labels}: {} ({}) by {how}", n.name, n.interface),
            };
        }

        let nothing = if networks.is_empty() { "no networks".to_string() } else { excluded };
        let on_no_match = lp.map_or(NoMatch::Defer, |lp| lp.on_no_match);
        match on_no_match {
            NoMatch::Fallback => {
                let mut any: Vec<usize> = (0..networks.len())
                    .filter(|&i| {
                        networks[i].up && (restriction_relaxed || fits_restriction(labels, &networks[i]))
                    })
                    .collect();
                any.sort_by(|&a, &b| order(&(a, 0), &(b, 0)));
                if let Some(&first) = any.first() {
                    let n = &networks[first];
                    return Decision::Use {
                        why: format!(
                            "{labels}: fallback to {} ({}); nothing allowed: {nothing}",
                            n.name, n.interface
                        ),
                        candidates: any,
                    };
                }
                Decision::Defer {
                    max_wait: self.max_wait(labels),
                    why: format!("{labels}: no up network, even for fallback: {nothing}"),
                }
            }
            NoMatch::Defer => Decision::Defer {
                max_wait: self.max_wait(labels),
                why: format!("{labels}: no allowed network is up: {nothing}"),
            },
            NoMatch::Reject => {
                Decision::Reject { why: format!("{labels}: no allowed network is up: {nothing}") }
            }
        }
    }
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() { "" } else { "; " }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(name: &str, kind: NetworkKind, down_mbit: u64, rtt_ms: u64) -> Network {
        let mut n = Network::new(name, &format!("{name}0"), kind);
        n.declared.bandwidth_down = Some(down_mbit * 1_000_000);
        n.declared.rtt = Some(Duration::from_millis(rtt_ms));
        n
    }

    fn lab() -> Vec<Network> {
        let mut cell = net("cell", NetworkKind::Cellular, 2, 120);
        cell.metered = true;
        vec![net("wifi", NetworkKind::Wifi, 50, 40), cell]
    }

    fn first(d: &Decision) -> usize {
        match d {
            Decision::Use { candidates, .. } => candidates[0],
            other => panic!("expected a network, got {other:?}"),
        }
    }

    #[test]
    fn libcmm_defaults() {
        let p = Policy::default();
        let mut nets = lab();
        // Wi-Fi wins both ways here.
        assert_eq!(first(&p.choose(Labels::ONDEMAND, &nets)), 0);
        assert_eq!(first(&p.choose(Labels::BACKGROUND, &nets)), 0);
        // A fast but distant Wi-Fi: interactive traffic takes the low-RTT network.
        nets[0].declared.rtt = Some(Duration::from_millis(300));
        assert_eq!(first(&p.choose(Labels::ONDEMAND, &nets)), 1);
        assert_eq!(first(&p.choose(Labels::SMALL, &nets)), 1);
        assert_eq!(first(&p.choose(Labels::BACKGROUND, &nets)), 0);
        assert_eq!(first(&p.choose("ondemand+large".parse().unwrap(), &nets)), 0);
        assert_eq!(first(&p.choose("background+small".parse().unwrap(), &nets)), 1);
    }

    #[test]
    fn a_queue_of_our_own_traffic_sends_ondemand_to_an_idle_network() {
        let p = Policy::default();
        let mut nets = lab();
        // 40 ms + 100 ms of queue is slower for a request than cellular's idle 120 ms.
        nets[0].queueing = Duration::from_millis(100);
        assert_eq!(first(&p.choose(Labels::ONDEMAND, &nets)), 1);
        // A shorter queue keeps Wi-Fi, and bandwidth choices ignore queues.
        nets[0].queueing = Duration::from_millis(60);
        assert_eq!(first(&p.choose(Labels::ONDEMAND, &nets)), 0);
        nets[0].queueing = Duration::from_millis(500);
        assert_eq!(first(&p.choose(Labels::BACKGROUND, &nets)), 0);
    }

    #[test]
    fn down_networks_are_never_chosen() {
        let p = Policy::default();
        let mut nets = lab();
        nets[0].up = false;
        nets[0].down_reason = Some("no carrier".into());
        match p.choose(Labels::ONDEMAND, &nets) {
            Decision::Use { candidates, .. } => assert_eq!(candidates, vec![1]),
            d => panic!("{d:?}"),
        }
        nets[1].up = false;
        match p.choose(Labels::ONDEMAND, &nets) {
            Decision::Defer { why, max_wait } => {
                assert!(why.contains("no carrier"), "{why}");
                assert_eq!(max_wait, Duration::from_secs(60));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn restrictions_and_fallback() {
        let p = Policy::default();
        let mut nets = lab();
        assert_eq!(first(&p.choose(Labels::CELLULAR_ONLY, &nets)), 1);
        nets[0].up = false;
        assert!(matches!(p.choose(Labels::WIFI_ONLY, &nets), Decision::Defer { .. }));
        assert_eq!(first(&p.choose(Labels::WIFI_PREFERRED, &nets)), 1);
    }

    #[test]
    fn label_policy_lists_metered_and_no_match() {
        let mut p = Policy::default();
        p.label_policies.push(LabelPolicy {
            labels: Labels::BACKGROUND,
            networks: Some(vec![NetworkRef::parse("wifi")]),
            metered: false,
            on_no_match: NoMatch::Defer,
            max_wait: Duration::from_secs(600),
        });
        p.label_policies.push(LabelPolicy {
            labels: "background+small".parse().unwrap(),
            networks: Some(vec![NetworkRef::parse("cell"), NetworkRef::Any]),
            metered: true,
            on_no_match: NoMatch::Reject,
            max_wait: Duration::from_secs(1),
        });
        let mut nets = lab();
        assert_eq!(first(&p.choose(Labels::BACKGROUND, &nets)), 0);
        // The more specific policy wins and its list order beats the metric.
        assert_eq!(first(&p.choose("background+small".parse().unwrap(), &nets)), 1);
        nets[0].up = false;
        match p.choose(Labels::BACKGROUND, &nets) {
            Decision::Defer { max_wait, why } => {
                assert_eq!(max_wait, Duration::from_secs(600));
                assert!(why.contains("metered"), "{why}");
            }
            d => panic!("{d:?}"),
        }
        nets[1].up = false;
        assert!(matches!(p.choose("background+small".parse().unwrap(), &nets), Decision::Reject { .. }));
        p.label_policies[0].on_no_match = NoMatch::Fallback;
        nets[1].up = true;
        assert_eq!(first(&p.choose(Labels::BACKGROUND, &nets)), 1);
    }

    #[test]
    fn default_labels_apply_to_unlabelled_traffic() {
        let p = Policy { default_labels: Labels::BACKGROUND, ..Policy::default() };
        let mut nets = lab();
        nets[0].declared.rtt = Some(Duration::from_millis(300));
        assert_eq!(first(&p.choose(Labels::NONE, &nets)), 0);
    }

    fn arb_network(i: usize) -> impl Strategy<Value = Network> {
        (any::<bool>(), 0u8..4, 1u64..100, 1u64..500, any::<bool>(), 0u32..3).prop_map(
            move |(up, kind, bw, rtt, metered, rank)| {
                let kind =
                    [NetworkKind::Ethernet, NetworkKind::Wifi, NetworkKind::Cellular, NetworkKind::Other]
                        [kind as usize];
                let mut n = net(&format!("n{i}"), kind, bw, rtt);
                n.up = up;
                n.metered = metered;
                n.rank = rank;
                n
            },
        )
    }

    fn arb_labels() -> impl Strategy<Value = Labels> {
        (0u32..3, 0u32..3, 0u32..3, any::<bool>()).prop_map(|(a, b, c, d)| {
            let bits = [0, 4, 8][a as usize]
                | [0, 0x10, 0x20][b as usize]
                | [0, 0x10000, 0x20000][c as usize]
                | if d { 0x100000 } else { 0 };
            Labels::from_bits(bits).unwrap()
        })
    }

    proptest! {
        #[test]
        fn chooser_invariants(
            nets in (0usize..5).prop_flat_map(|n| (0..n).map(arb_network).collect::<Vec<_>>()),
            labels in arb_labels(),
            no_metered in any::<bool>(),
        ) {
            let mut p = Policy::default();
            if no_metered {
                p.label_policies.push(LabelPolicy {
                    labels: Labels::NONE, networks: None, metered: false,
                    on_no_match: NoMatch::Defer, max_wait: Duration::from_secs(5),
                });
            }
            let d = p.choose(labels, &nets);
            // Deterministic.
            prop_assert_eq!(&d, &p.choose(labels, &nets));
            // The order of the snapshot does not matter.
            let mut reversed = nets.clone();
            reversed.reverse();
            let names = |d: &Decision, nets: &[Network]| match d {
                Decision::Use { candidates, .. } => candidates.iter().map(|&i| nets[i].interface.clone()).collect(),
                _ => Vec::new(),
            };
            prop_assert_eq!(names(&d, &nets), names(&p.choose(labels, &reversed), &reversed));
            match d {
                Decision::Use { candidates, .. } => {
                    prop_assert!(!candidates.is_empty());
                    for &i in &candidates {
                        let n = &nets[i];
                        prop_assert!(n.up, "a down network was chosen");
                        prop_assert!(!(no_metered && n.metered));
                        if !labels.contains(Labels::FALLBACK_ALLOWED) {
                            prop_assert!(fits_restriction(labels, n));
                        }
                    }
                }
                Decision::Defer { .. } => {
                    // Deferred only if no up network passes the filters.
                    prop_assert!(!nets.iter().any(|n| n.up && fits_restriction(labels, n) && !(no_metered && n.metered)));
                }
                Decision::Reject { .. } => prop_assert!(false, "no policy rejects here"),
            }
        }
    }
}
