//! [`Trickler`]: background traffic never makes foreground traffic wait.
//!
//! While foreground traffic has been seen on a network in the last `idle` (libcmm: 5 s),
//! background traffic on that network, all connections together, is kept to a fraction of the
//! network's bottleneck rate in each direction, so the bottleneck's queue stays nearly empty and
//! a foreground request finds the link free. With no foreground traffic background runs at full
//! speed. The settings are per network ([`cmm_policy::Trickle`]); the rate is the scout's
//! estimate of the bandwidth, or the declared figure.
//!
//! The Trickler also keeps the queueing delay that this machine's background connections see
//! on each network, so a request choosing by latency can prefer an idle network over a fast one
//! whose queue is full of our own bytes.
//!
//! Sans-IO: every call takes the time; a grant that must wait says how long. One per process
//! (in the [`crate::Connector`]), shared by the proxy's tunnels and every multi-socket.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use cmm_policy::Network;

/// Which way bytes move, seen from this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent: paced by the sender (here).
    Up,
    /// Received: paced by reading slowly, which closes the sender's window.
    Down,
}

/// What background traffic may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Anything: no foreground traffic to protect.
    Unlimited,
    /// At most this many bytes now.
    Bytes(usize),
    /// Nothing before this long.
    Wait(Duration),
}

/// The smallest grant: less would cost a system call per few packets.
const MIN_GRANT: usize = 8 * 1024;
/// Bytes a bucket may save up: this long at the paced rate (so a burst into the bottleneck
/// queue is at most about this long).
const BURST: Duration = Duration::from_millis(3);
/// The smallest receive window while paced: a few segments, so acknowledgements keep flowing.
const MIN_WINDOW: u32 = 32 * 1024;
/// How long a queueing measurement counts.
const QUEUE_FRESH: Duration = Duration::from_secs(3);

/// A token bucket, in bytes.
#[derive(Debug, Default)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, rate: f64, want: usize, now: Instant) -> Grant {
        let burst = (rate * BURST.as_secs_f64()).max(2.0 * MIN_GRANT as f64);
        let elapsed = self.at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        // A bucket that starts pacing (or was idle) starts with one burst.
        self.tokens =
            if self.at.is_none() { burst } else { (self.tokens + rate * elapsed.as_secs_f64()).min(burst) };
        self.at = Some(now);
        let need = want.min(MIN_GRANT) as f64;
        if self.tokens >= need {
            let n = (self.tokens as usize).min(want);
            self.tokens -= n as f64;
            return Grant::Bytes(n);
        }
        Grant::Wait(Duration::from_secs_f64((need - self.tokens) / rate).max(Duration::from_micros(100)))
    }

    /// Takes `len` bytes whole once a grant is possible, going into debt for the rest.
    fn take_whole(&mut self, rate: f64, len: usize, now: Instant) -> Option<Duration> {
        match self.take(rate, len, now) {
            Grant::Bytes(n) => {
                self.tokens -= (len - n) as f64;
                None
            }
            Grant::Wait(d) => Some(d),
            Grant::Unlimited => None,
        }
    }
}

#[derive(Debug, Default)]
struct NetworkState {
    last_foreground: Option<Instant>,
    up: Bucket,
    down: Bucket,
    queueing: Option<(Instant, Duration)>,
}

/// Per-network foreground activity, background allowances and queueing delays.
#[derive(Debug, Default)]
pub struct Trickler {
    networks: Mutex<HashMap<String, NetworkState>>,
}

impl Trickler {
    /// A trickler that has seen nothing yet.
    pub fn new() -> Trickler {
        Trickler::default()
    }

    fn with<T>(&self, interface: &str, f: impl FnOnce(&mut NetworkState) -> T) -> T {
        let mut map = self.networks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get_mut(interface) {
            return f(s);
        }
        f(map.entry(interface.to_string()).or_default())
    }

    /// Foreground traffic moved on the network on `interface` at `now`.
    pub fn foreground(&self, interface: &str, now: Instant) {
        self.with(interface, |s| s.last_foreground = Some(now));
    }

    /// Whether background traffic on `network` is being paced at `now`.
    pub fn pacing(&self, network: &Network, now: Instant) -> bool {
        network.trickle.enabled && self.with(&network.interface, |s| active(s, network, now))
    }

    /// How many of `want` background bytes may move on `network` in `dir` at `now`. Bytes
    /// granted are counted as moved; pass back what was not used with [`Trickler::unused`].
    pub fn background(&self, network: &Network, dir: Direction, want: usize, now: Instant) -> Grant {
        if want == 0 {
            return Grant::Unlimited;
        }
        self.paced_bucket(network, dir, now, Grant::Unlimited, |rate, bucket| bucket.take(rate, want, now))
    }

    /// Runs `f` on the bucket of `dir` with the paced rate, or returns `idle` when background
    /// traffic on `network` is not paced at `now`.
    fn paced_bucket<T>(
        &self,
        network: &Network,
        dir: Direction,
        now: Instant,
        idle: T,
        f: impl FnOnce(f64, &mut Bucket) -> T,
    ) -> T {
        if !network.trickle.enabled {
            return idle;
        }
        self.with(&network.interface, |s| {
            if !active(s, network, now) {
                // Idle: start afresh when pacing starts again.
                s.up = Bucket::default();
                s.down = Bucket::default();
                return idle;
            }
            let (bits, bucket) = match dir {
                Direction::Up => (network.bandwidth_up(), &mut s.up),
                Direction::Down => (network.bandwidth_down(), &mut s.down),
            };
            f((bits as f64 / 8.0 * network.trickle.fraction).max(1.0), bucket)
        })
    }

    /// For a message that cannot be split (a multi-socket's data chunk): `None` when `len`
    /// background bytes may go now on `network` in `dir` (all counted, the bucket may go
    /// briefly into debt), or how long to wait.
    pub fn background_whole(
        &self,
        network: &Network,
        dir: Direction,
        len: usize,
        now: Instant,
    ) -> Option<Duration> {
        if len == 0 {
            return None;
        }
        self.paced_bucket(network, dir, now, None, |rate, bucket| bucket.take_whole(rate, len, now))
    }

    /// The receive window background downloads on `network` should advertise at `now`, or
    /// `None` for the kernel's own: while paced, the paced rate times the network's round trip,
    /// so the sender never has more in flight than the paced rate needs and cannot build a
    /// standing queue at the bottleneck while reads are held back. (Measured in the
    /// evaluation: a fifth more left foreground requests 10 ms slower during downloads, and
    /// downloads no faster.)
    pub fn receive_window(&self, network: &Network, now: Instant) -> Option<u32> {
        if !self.pacing(network, now) {
            return None;
        }
        let rate = network.bandwidth_down() as f64 / 8.0 * network.trickle.fraction;
        let window = (rate * network.rtt().as_secs_f64()) as u64;
        Some(window.clamp(MIN_WINDOW as u64, u64::from(u32::MAX)) as u32)
    }

    /// Gives back `bytes` of a grant that were not moved (a read that returned less).
    pub fn unused(&self, network: &Network, dir: Direction, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.with(&network.interface, |s| {
            let b = match dir {
                Direction::Up => &mut s.up,
                Direction::Down => &mut s.down,
            };
            b.tokens += bytes as f64;
        });
    }

    /// The queueing delay a background connection on `interface` saw at `now` (its smoothed
    /// RTT above the path's minimum).
    pub fn queueing_seen(&self, interface: &str, delay: Duration, now: Instant) {
        self.with(interface, |s| s.queueing = Some((now, delay)));
    }

    /// `networks` with each one's current queueing delay filled in (zero when not measured
    /// lately). Background connections report zero while paced: pacing keeps the queue empty.
    pub fn with_queueing(&self, networks: &[Network], now: Instant) -> Vec<Network> {
        let map = self.networks.lock().unwrap_or_else(PoisonError::into_inner);
        networks
            .iter()
            .map(|n| {
                let mut n = n.clone();
                n.queueing = map
                    .get(&n.interface)
                    .and_then(|s| s.queueing)
                    .filter(|(at, _)| now.saturating_duration_since(*at) <= QUEUE_FRESH)
                    .map_or(Duration::ZERO, |(_, d)| d);
                n
            })
            .collect()
    }

    /// Whether any queueing delay is known at `now` (so choices need [`Trickler::with_queueing`]).
    pub fn any_queueing(&self, now: Instant) -> bool {
        let map = self.networks.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().any(|s| {
            s.queueing.is_some_and(|(at, d)| !d.is_zero() && now.saturating_duration_since(at) <= QUEUE_FRESH)
        })
    }
}

fn active(s: &NetworkState, network: &Network, now: Instant) -> bool {
    s.last_foreground.is_some_and(|t| now.saturating_duration_since(t) < network.trickle.idle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::{Figures, NetworkKind};

    fn wifi() -> Network {
        let mut n = Network::new("wifi", "wifi0", NetworkKind::Wifi);
        n.declared = Figures { bandwidth_down: Some(80_000_000), bandwidth_up: Some(8_000_000), rtt: None };
        n
    }

    /// Takes everything granted over `secs` in steps of 1 ms; returns bytes per second.
    fn drain(t: &Trickler, n: &Network, dir: Direction, start: Instant, secs: u64) -> f64 {
        let mut moved = 0usize;
        let mut now = start;
        while now < start + Duration::from_secs(secs) {
            if let Grant::Bytes(b) = t.background(n, dir, 1 << 20, now) {
                moved += b;
            }
            now += Duration::from_millis(1);
        }
        moved as f64 / secs as f64
    }

    #[test]
    fn without_foreground_background_is_unlimited() {
        let t = Trickler::new();
        let now = Instant::now();
        assert_eq!(t.background(&wifi(), Direction::Down, 1 << 20, now), Grant::Unlimited);
        assert!(!t.pacing(&wifi(), now));
    }

    #[test]
    fn foreground_paces_background_to_the_fraction_until_idle() {
        let t = Trickler::new();
        let n = wifi();
        let t0 = Instant::now();
        t.foreground("wifi0", t0);
        assert!(t.pacing(&n, t0));
        // 0.9 of 80 Mbit/s down = 9 MB/s; 0.9 of 8 Mbit/s up = 0.9 MB/s.
        let down = drain(&t, &n, Direction::Down, t0, 2);
        assert!((down - 9e6).abs() < 0.02 * 9e6, "{down}");
        let up = drain(&t, &n, Direction::Up, t0, 2);
        assert!((up - 0.9e6).abs() < 0.03 * 0.9e6, "{up}");
        // Another network is not affected.
        let mut cell = Network::new("cell", "cell0", NetworkKind::Cellular);
        cell.declared.bandwidth_down = Some(1_000_000);
        assert_eq!(t.background(&cell, Direction::Down, 100, t0), Grant::Unlimited);
        // 5 s after the last foreground traffic, full speed again.
        assert!(t.pacing(&n, t0 + Duration::from_millis(4999)));
        assert_eq!(t.background(&n, Direction::Down, 1 << 20, t0 + Duration::from_secs(5)), Grant::Unlimited);
    }

    #[test]
    fn the_receive_window_follows_the_paced_rate_and_round_trip() {
        let t = Trickler::new();
        let mut n = wifi();
        n.declared.rtt = Some(Duration::from_millis(40));
        let t0 = Instant::now();
        assert_eq!(t.receive_window(&n, t0), None);
        t.foreground("wifi0", t0);
        // 9 MB/s for 40 ms.
        assert_eq!(t.receive_window(&n, t0), Some(360_000));
        n.declared.rtt = Some(Duration::from_micros(100));
        assert_eq!(t.receive_window(&n, t0), Some(MIN_WINDOW));
        assert_eq!(t.receive_window(&n, t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn grants_are_bounded_and_waits_say_how_long() {
        let t = Trickler::new();
        let n = wifi();
        let t0 = Instant::now();
        t.foreground("wifi0", t0);
        // The first grant is one burst (3 ms at 9 MB/s = 27 kB), then the bucket is empty.
        let Grant::Bytes(first) = t.background(&n, Direction::Down, 1 << 20, t0) else { panic!() };
        assert_eq!(first, 27_000);
        let Grant::Wait(w) = t.background(&n, Direction::Down, 1 << 20, t0) else { panic!() };
        // 8 KiB at 9 MB/s.
        assert!(w > Duration::from_micros(850) && w < Duration::from_micros(950), "{w:?}");
        // Unused bytes come back.
        t.unused(&n, Direction::Down, 20_000);
        assert_eq!(t.background(&n, Direction::Down, 1 << 20, t0), Grant::Bytes(20_000));
    }

    #[test]
    fn disabled_or_idle_is_never_paced() {
        let t = Trickler::new();
        let mut n = wifi();
        n.trickle.enabled = false;
        let t0 = Instant::now();
        t.foreground("wifi0", t0);
        assert_eq!(t.background(&n, Direction::Up, 1 << 20, t0), Grant::Unlimited);
        n.trickle.enabled = true;
        n.trickle.idle = Duration::ZERO;
        assert_eq!(t.background(&n, Direction::Up, 1 << 20, t0), Grant::Unlimited);
    }

    #[test]
    fn queueing_is_fresh_for_a_few_seconds() {
        let t = Trickler::new();
        let t0 = Instant::now();
        t.queueing_seen("wifi0", Duration::from_millis(80), t0);
        assert!(t.any_queueing(t0));
        let nets = t.with_queueing(&[wifi()], t0 + Duration::from_secs(1));
        assert_eq!(nets[0].queueing, Duration::from_millis(80));
        let nets = t.with_queueing(&[wifi()], t0 + Duration::from_secs(4));
        assert_eq!(nets[0].queueing, Duration::ZERO);
        assert!(!t.any_queueing(t0 + Duration::from_secs(4)));
    }
}
