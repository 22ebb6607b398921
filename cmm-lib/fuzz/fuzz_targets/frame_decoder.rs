//! Arbitrary bytes, fed to the frame decoder in arbitrary pieces: it must never panic, and
//! never hold more than one frame's worth of bytes.
#![no_main]

use cmm::frame::{FrameDecoder, HEADER, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the input is cut into reads.
    let Some((&cut, rest)) = data.split_first() else { return };
    let step = usize::from(cut).max(1);
    let mut d = FrameDecoder::new();
    for piece in rest.chunks(step) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= HEADER + MAX_PAYLOAD + step);
    }
});
