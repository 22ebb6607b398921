//! [`Network`]: one way out of this machine, as the scout sees it and the chooser ranks it.

use crate::labels::Labels;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What kind of link a network is; restriction labels and default figures depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// A wired link: fast, steady, unmetered.
    Ethernet,
    /// Wi-Fi: fast but intermittent.
    Wifi,
    /// Cellular (LTE, 5G, a tethered phone): slower, steady, often metered.
    Cellular,
    /// Anything else (VPN tunnels, unknown devices).
    Other,
}

impl NetworkKind {
    /// A guess from an interface name, used when the config does not classify it.
    pub fn guess(interface: &str) -> NetworkKind {
        let name = interface.to_ascii_lowercase();
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
        if starts(&["wl", "wifi", "ath", "ra"]) {
            NetworkKind::Wifi
        } else if starts(&["ww", "rmnet", "cell", "lte", "usb", "ppp", "wwan"]) {
            NetworkKind::Cellular
        } else if starts(&["en", "eth", "em", "eno", "ens", "enp"]) {
            NetworkKind::Ethernet
        } else {
            NetworkKind::Other
        }
    }

    /// Figures assumed when neither the config nor the scout gives any: (down, up, RTT).
    /// They only order networks of different kinds sensibly; declare real figures to do better.
    pub fn default_figures(self) -> (u64, u64, Duration) {
        match self {
            NetworkKind::Ethernet => (1_000_000_000, 1_000_000_000, Duration::from_millis(2)),
            NetworkKind::Wifi => (50_000_000, 20_000_000, Duration::from_millis(20)),
            NetworkKind::Cellular => (10_000_000, 5_000_000, Duration::from_millis(60)),
            NetworkKind::Other => (20_000_000, 20_000_000, Duration::from_millis(40)),
        }
    }

    /// The name used in config and output.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkKind::Ethernet => "ethernet",
            NetworkKind::Wifi => "wifi",
            NetworkKind::Cellular => "cellular",
            NetworkKind::Other => "other",
        }
    }
}

impl fmt::Display for NetworkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ethernet" | "wired" => Ok(NetworkKind::Ethernet),
            "wifi" | "wlan" => Ok(NetworkKind::Wifi),
            "cellular" | "cell" | "lte" | "3g" => Ok(NetworkKind::Cellular),
            "other" => Ok(NetworkKind::Other),
            _ => Err(format!("unknown network kind {s:?} (expected ethernet, wifi, cellular or other)")),
        }
    }
}

/// How background traffic is trickled on a network while foreground traffic is active there:
/// kept to `fraction` of the network's bandwidth, until no foreground traffic has been seen for
/// `idle` (libcmm's rule, with its 5 s).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trickle {
    /// Whether background traffic is paced at all.
    pub enabled: bool,
    /// The share of the bottleneck background may use while foreground is active (0–1].
    pub fraction: f64,
    /// How long after the last foreground traffic pacing goes on.
    #[serde(with = "duration_ms")]
    pub idle: Duration,
}

impl Default for Trickle {
    fn default() -> Trickle {
        Trickle { enabled: true, fraction: 0.9, idle: Duration::from_secs(5) }
    }
}

/// Bandwidth and latency of a network: each figure is optional, and a missing one falls back to
/// the other source or to the kind's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// Downstream bandwidth in bits per second.
    pub bandwidth_down: Option<u64>,
    /// Upstream bandwidth in bits per second.
    pub bandwidth_up: Option<u64>,
    /// Round-trip time.
    #[serde(with = "opt_duration_ms")]
    pub rtt: Option<Duration>,
}

impl Figures {
    /// Each figure of `self`, or `other`'s where `self` has none.
    pub fn or(self, other: Figures) -> Figures {
        Figures {
            bandwidth_down: self.bandwidth_down.or(other.bandwidth_down),
            bandwidth_up: self.bandwidth_up.or(other.bandwidth_up),
            rtt: self.rtt.or(other.rtt),
        }
    }
}

/// One network: an interface that leads out, classified and described.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    /// The name users and config refer to (`wifi`, `cell`, or the interface name).
    pub name: String,
    /// The interface that carries it (`wlan0`).
    pub interface: String,
    /// The kernel's interface index (0 when unknown, as for emulated networks).
    pub index: u32,
    /// Its kind.
    pub kind: NetworkKind,
    /// Whether it can carry traffic now: admin up, carrier, a usable address, a route out.
    pub up: bool,
    /// Why it is down, when it is (`"no carrier"`, `"no default route"`), for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    /// Its usable addresses.
    pub addresses: Vec<IpAddr>,
    /// Figures declared in the config.
    pub declared: Figures,
    /// Figures the scout measured; they win over declared ones unless `use_estimates` is off.
    #[serde(default)]
    pub estimated: Figures,
    /// Whether estimates win over declared figures (`use_estimates = false` in the config
    /// keeps the declared ones, for a link known better than a minute of measurements tells).
    #[serde(default = "yes")]
    pub use_estimates: bool,
    /// Whether traffic on it costs money (policies may keep background traffic off it).
    pub metered: bool,
    /// How background traffic is paced on it while foreground traffic is active.
    #[serde(default)]
    pub trickle: Trickle,
    /// The queueing delay this machine's own traffic causes on it now (measured from its
    /// connections); a request choosing by latency adds it to the RTT.
    #[serde(default, skip_serializing_if = "Duration::is_zero", with = "duration_ms")]
    pub queueing: Duration,
    /// Preference rank: lower is preferred when everything else is equal.
    pub rank: u32,
    /// Labels that must never be sent on it: the other end's policy keeps them off this
    /// network (a multi-socket peer says so in its HELLO, so that a relay honours the label
    /// policy of the proxy it serves).
    pub refused: Labels,
}

impl Network {
    /// A network that is up, with the kind's default figures; handy for tests and emulation.
    pub fn new(name: &str, interface: &str, kind: NetworkKind) -> Network {
        Network {
            name: name.to_string(),
            interface: interface.to_string(),
            index: 0,
            kind,
            up: true,
            down_reason: None,
            addresses: Vec::new(),
            declared: Figures::default(),
            estimated: Figures::default(),
            use_estimates: true,
            metered: false,
            trickle: Trickle::default(),
            queueing: Duration::ZERO,
            rank: 0,
            refused: Labels::NONE,
        }
    }

    /// The figures the chooser uses: estimates, else declared (declared first when
    /// `use_estimates` is off), else the kind's defaults.
    pub fn figures(&self) -> (u64, u64, Duration) {
        let (down, up, rtt) = self.kind.default_figures();
        let f = if self.use_estimates {
            self.estimated.or(self.declared)
        } else {
            self.declared.or(self.estimated)
        };
        (f.bandwidth_down.unwrap_or(down), f.bandwidth_up.unwrap_or(up), f.rtt.unwrap_or(rtt))
    }

    /// Downstream bandwidth in bits per second, as the chooser sees it.
    pub fn bandwidth_down(&self) -> u64 {
        self.figures().0
    }

    /// Upstream bandwidth in bits per second, as the chooser sees it.
    pub fn bandwidth_up(&self) -> u64 {
        self.figures().1
    }

    /// Round-trip time, as the chooser sees it.
    pub fn rtt(&self) -> Duration {
        self.figures().2
    }

    /// How long a small request waits on it now: the RTT plus the queue our own traffic keeps
    /// there.
    pub fn latency(&self) -> Duration {
        self.rtt() + self.queueing
    }
}

fn yes() -> bool {
    true
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        if !ms.is_finite() || ms < 0.0 {
            return Err(serde::de::Error::custom("a duration must be a finite number of milliseconds"));
        }
        Ok(Duration::from_secs_f64(ms / 1000.0))
    }
}

mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let ms: Option<f64> = Option::deserialize(d)?;
        match ms {
            Some(ms) if ms.is_finite() && ms >= 0.0 => Ok(Some(Duration::from_secs_f64(ms / 1000.0))),
            Some(_) => Err(serde::de::Error::custom("rtt must be a finite number of milliseconds")),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_guess_from_interface_names() {
        assert_eq!(NetworkKind::guess("wlan0"), NetworkKind::Wifi);
        assert_eq!(NetworkKind::guess("wlp2s0"), NetworkKind::Wifi);
        assert_eq!(NetworkKind::guess("wwan0"), NetworkKind::Cellular);
        assert_eq!(NetworkKind::guess("enp3s0"), NetworkKind::Ethernet);
        assert_eq!(NetworkKind::guess("eth0"), NetworkKind::Ethernet);
        assert_eq!(NetworkKind::guess("tun0"), NetworkKind::Other);
    }

    #[test]
    fn estimates_win_over_declared_figures() {
        let mut n = Network::new("wifi", "wlan0", NetworkKind::Wifi);
        assert_eq!(n.rtt(), Duration::from_millis(20));
        n.declared.rtt = Some(Duration::from_millis(40));
        assert_eq!(n.rtt(), Duration::from_millis(40));
        n.estimated.rtt = Some(Duration::from_millis(15));
        assert_eq!(n.rtt(), Duration::from_millis(15));
        assert_eq!(n.bandwidth_down(), 50_000_000);
        n.use_estimates = false;
        assert_eq!(n.rtt(), Duration::from_millis(40), "declared figures stand");
        n.estimated.bandwidth_down = Some(7_000_000);
        assert_eq!(n.bandwidth_down(), 7_000_000, "estimates fill what is not declared");
    }
}
