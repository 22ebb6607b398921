//! Deterministic test payloads: byte `i` of every payload is the same function of `i`, so a
//! receiver can check content, order and length without the sender's copy.

use sha2::{Digest, Sha256};

/// Byte `i` of the pattern: a position hash, so a dropped, duplicated or reordered chunk changes
/// the digest whatever its length.
pub fn byte_at(i: u64) -> u8 {
    let mut z = (i >> 3).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.to_le_bytes()[(i & 7) as usize]
}

/// Fills `buf` with the pattern starting at offset `start`.
pub fn fill(buf: &mut [u8], start: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = byte_at(start + k as u64);
    }
}

/// The first `len` bytes of the pattern.
pub fn bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, 0);
    v
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Hex SHA-256 of the first `len` bytes of the pattern, computed in chunks.
pub fn pattern_sha256(len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        fill(&mut buf[..n], pos);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    hex(&h.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_whole_digests_agree() {
        assert_eq!(pattern_sha256(200_000), sha256_hex(&bytes(200_000)));
        assert_ne!(bytes(16)[..8], bytes(16)[8..]);
    }
}
