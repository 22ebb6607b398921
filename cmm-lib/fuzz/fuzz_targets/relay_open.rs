//! Arbitrary bytes at the start of a relayed stream, decoded as the relay decodes an open
//! request and as the proxy decodes the reply, whole and in every prefix: never a panic, a
//! value never claims more bytes than it had, and what decodes encodes back to the same bytes.
#![no_main]

use cmm::relay::{MAX_REQUEST, OpenReply, OpenRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for end in [data.len(), data.len() / 2, data.len().min(3)] {
        let part = &data[..end];
        if let Ok(Some((req, used))) = OpenRequest::decode(part) {
            assert!(used <= part.len() && used <= MAX_REQUEST);
            let mut again = Vec::new();
            req.encode(&mut again).expect("a decoded request encodes");
            assert_eq!(&again[..], &part[..used]);
        }
        if let Ok(Some((_, used))) = OpenReply::decode(part) {
            assert!(used <= part.len());
        }
    }
});
