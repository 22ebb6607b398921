//! [`GrowBuf`]: a copy buffer that starts small and grows while reads fill it.
//!
//! A relayed or proxied connection copies through one buffer per direction. Most connections
//! are idle or small most of the time, so a buffer begins at 4 KiB and doubles (up to its
//! maximum, 64 KiB by default) each time a read fills it: an idle connection costs 8 KiB of
//! buffers, not 128, and a bulk transfer reaches full-size reads after a few of them.

/// A buffer for one direction of a copy loop.
#[derive(Debug)]
pub struct GrowBuf {
    buf: Vec<u8>,
    max: usize,
}

/// Where every buffer starts.
pub const START: usize = 4 * 1024;

impl GrowBuf {
    /// A buffer that grows up to `max` bytes (at least [`START`]).
    pub fn new(max: usize) -> GrowBuf {
        GrowBuf { buf: vec![0u8; START.min(max.max(1))], max: max.max(START) }
    }

    /// The space to read into next.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `n` bytes read.
    pub fn filled(&self, n: usize) -> &[u8] {
        &self.buf[..n]
    }

    /// Records that a read took `n` bytes: a full read doubles the buffer.
    pub fn took(&mut self, n: usize) {
        if n == self.buf.len() && self.buf.len() < self.max {
            let next = (self.buf.len() * 2).min(self.max);
            self.buf.resize(next, 0);
        }
    }

    /// Its size now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Never empty; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_reads_grow_it_to_its_maximum_and_short_ones_do_not() {
        let mut b = GrowBuf::new(64 * 1024);
        assert_eq!(b.len(), START);
        b.took(100);
        assert_eq!(b.len(), START);
        for _ in 0..10 {
            let n = b.len();
            b.took(n);
        }
        assert_eq!(b.len(), 64 * 1024);
    }
}
