//! Arbitrary bytes from a peer on two open paths, decoded as a driver's reader does and fed
//! to the session's one entry point: the session must answer with an error or nothing, never a
//! panic, and what it holds stays bounded by the window it advertised.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use cmm::frame::{FrameDecoder, SessionId};
use cmm::session::{MAX_HELD, Role, Session, SessionConfig};
use cmm::{Network, NetworkKind, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut s = Session::new(Role::Accepting, SessionId([1; 16]), SessionConfig::default(), Arc::new(Policy::default()));
    s.add_path(1, Network::new("wifi", "wifi0", NetworkKind::Wifi), now);
    s.add_path(2, Network::new("cell", "cell0", NetworkKind::Cellular), now);
    let mut decoders = [FrameDecoder::new(), FrameDecoder::new()];
    for (i, piece) in data.chunks(97).enumerate() {
        let path = 1 + (i % 2) as u32;
        let d = &mut decoders[i % 2];
        d.push(piece);
        let failed = loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    if s.handle_frame(path, f, now).is_err() {
                        break true;
                    }
                }
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        if failed {
            s.remove_path(path, "protocol error", now);
        }
        while s.poll_transmit(1, now).is_some() || s.poll_transmit(2, now).is_some() {}
        s.handle_timeout(now);
        let mut buf = [0u8; 1024];
        let _ = s.recv(&mut buf);
        assert!(s.held_pieces() <= MAX_HELD + 1);
    }
});
