//! Arbitrary bytes from a peer on an open path: the session must answer with an error or
//! nothing, never a panic, and its buffers stay bounded by the window it advertised.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use cmm::frame::SessionId;
use cmm::session::{Role, Session, SessionConfig};
use cmm::{Network, NetworkKind, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut s = Session::new(Role::Accepting, SessionId([1; 16]), SessionConfig::default(), Arc::new(Policy::default()));
    s.add_path(1, Network::new("wifi", "wifi0", NetworkKind::Wifi), now);
    s.add_path(2, Network::new("cell", "cell0", NetworkKind::Cellular), now);
    for (i, piece) in data.chunks(97).enumerate() {
        let path = 1 + (i % 2) as u32;
        if s.handle_input(path, piece, now).is_err() {
            s.remove_path(path, "protocol error", now);
        }
        while s.poll_transmit(1, now).is_some() || s.poll_transmit(2, now).is_some() {}
        s.handle_timeout(now);
        let mut buf = [0u8; 1024];
        let _ = s.recv(&mut buf);
    }
});
