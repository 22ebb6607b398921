//! [`DelayLine`]: a fixed one-way delay for packets, the user-space stand-in for netem (which
//! this kernel lacks). Sans-IO: packets go in with the time they arrived and come out when
//! due; `lab-delay` moves them between a TUN device and this queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Packets held for a fixed delay, in arrival order (a constant delay never reorders).
pub struct DelayLine {
    delay: Duration,
    max_packets: usize,
    queue: VecDeque<(Instant, Bytes)>,
    dropped: u64,
}

impl DelayLine {
    /// A line that holds each packet for `delay`, and at most `max_packets` at once (more are
    /// dropped, as a real link's buffer would).
    pub fn new(delay: Duration, max_packets: usize) -> DelayLine {
        DelayLine { delay, max_packets, queue: VecDeque::new(), dropped: 0 }
    }

    /// Takes a packet that arrived at `now`.
    pub fn push(&mut self, packet: Bytes, now: Instant) {
        if self.queue.len() >= self.max_packets {
            self.dropped += 1;
            return;
        }
        self.queue.push_back((now + self.delay, packet));
    }

    /// The next packet due by `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<Bytes> {
        if self.queue.front().is_some_and(|(due, _)| *due <= now) {
            return self.queue.pop_front().map(|(_, p)| p);
        }
        None
    }

    /// When the next packet is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// Packets dropped because the line was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_leave_in_order_after_the_delay_and_overflow_drops() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut line = DelayLine::new(ms(20), 2);
        line.push(Bytes::from_static(b"a"), t0);
        line.push(Bytes::from_static(b"b"), t0 + ms(5));
        line.push(Bytes::from_static(b"c"), t0 + ms(6));
        assert_eq!(line.dropped(), 1);
        assert_eq!(line.pop_due(t0 + ms(19)), None);
        assert_eq!(line.next_due(), Some(t0 + ms(20)));
        assert_eq!(line.pop_due(t0 + ms(20)).as_deref(), Some(&b"a"[..]));
        assert_eq!(line.pop_due(t0 + ms(24)), None);
        assert_eq!(line.pop_due(t0 + ms(30)).as_deref(), Some(&b"b"[..]));
        assert_eq!(line.next_due(), None);
    }
}
