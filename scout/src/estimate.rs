//! [`Estimator`]: a network's RTT and bandwidth from what its connections report (TCP_INFO)
//! and from probes. Sans-IO: fed samples and time, it answers figures.
//!
//! - RTT: the smallest connection RTT seen in the last minute. Queueing only ever adds to a
//!   round trip, so the minimum is the path's own.
//! - Bandwidth: the largest rate seen in the last minute, from senders that were not
//!   application-limited (up) and receivers that were busy (down). A link that only carried
//!   light traffic has no estimate, and then its declared figure stands.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cmm_policy::Figures;

use crate::ipc::Sample;

/// How long a sample counts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most samples kept per figure.
const MAX_SAMPLES: usize = 256;

/// Samples within the window; answers their minimum or maximum.
#[derive(Clone, Debug, Default)]
struct Windowed<T> {
    samples: VecDeque<(Instant, T)>,
}

impl<T: Copy + Ord> Windowed<T> {
    fn add(&mut self, now: Instant, v: T) {
        self.expire(now);
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now, v));
    }

    fn expire(&mut self, now: Instant) {
        while self.samples.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW) {
            self.samples.pop_front();
        }
    }

    fn min(&self, now: Instant) -> Option<T> {
        self.live(now).min()
    }

    fn max(&self, now: Instant) -> Option<T> {
        self.live(now).max()
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = T> + '_ {
        self.samples.iter().filter(move |(t, _)| now.saturating_duration_since(*t) <= WINDOW).map(|(_, v)| *v)
    }
}

/// Estimates for one network.
#[derive(Clone, Debug, Default)]
pub struct Estimator {
    rtt: Windowed<Duration>,
    up: Windowed<u64>,
    down: Windowed<u64>,
}

impl Estimator {
    /// A new estimator with no samples.
    pub fn new() -> Estimator {
        Estimator::default()
    }

    /// Takes a sample measured at `now`. Zero values are ignored (no measurement).
    pub fn add(&mut self, sample: &Sample, now: Instant) {
        if let Some(rtt) = sample.rtt.filter(|d| !d.is_zero()) {
            self.rtt.add(now, rtt);
        }
        if let Some(r) = sample.rate_up.filter(|r| *r > 0) {
            self.up.add(now, r);
        }
        if let Some(r) = sample.rate_down.filter(|r| *r > 0) {
            self.down.add(now, r);
        }
    }

    /// The figures now; each `None` where no sample is recent.
    pub fn figures(&self, now: Instant) -> Figures {
        Figures { bandwidth_down: self.down.max(now), bandwidth_up: self.up.max(now), rtt: self.rtt.min(now) }
    }

    /// Whether any sample is recent.
    pub fn is_empty(&self, now: Instant) -> bool {
        self.figures(now) == Figures::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_rtt_and_maximum_rates_within_the_window() {
        let t0 = Instant::now();
        let mut e = Estimator::new();
        assert!(e.is_empty(t0));
        let ms = Duration::from_millis;
        e.add(&Sample { rtt: Some(ms(90)), rate_up: Some(1_000_000), rate_down: None }, t0);
        e.add(
            &Sample { rtt: Some(ms(40)), rate_up: Some(3_000_000), rate_down: Some(9_000_000) },
            t0 + ms(10),
        );
        e.add(&Sample { rtt: Some(ms(70)), rate_up: Some(0), rate_down: None }, t0 + ms(20));
        let f = e.figures(t0 + ms(30));
        assert_eq!(f.rtt, Some(ms(40)));
        assert_eq!(f.bandwidth_up, Some(3_000_000));
        assert_eq!(f.bandwidth_down, Some(9_000_000));
        // A minute later the old samples are gone; the declared figures stand again.
        let later = t0 + WINDOW + ms(100);
        assert!(e.is_empty(later));
        e.add(&Sample { rtt: Some(ms(55)), ..Sample::default() }, later);
        assert_eq!(e.figures(later).rtt, Some(ms(55)));
        assert_eq!(e.figures(later).bandwidth_up, None);
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut e = Estimator::new();
        for i in 0..10_000u64 {
            e.add(&Sample { rtt: Some(Duration::from_micros(1000 + i)), ..Sample::default() }, t0);
        }
        assert!(e.rtt.samples.len() <= MAX_SAMPLES);
    }
}
