//! The scout daemon's protocol (see `IPC.md`): messages over a Unix stream socket, each a
//! 4-byte big-endian length and a JSON object. Sans-IO: [`encode`] and [`FrameReader`] only
//! turn messages into bytes and back, with every length bounded.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::snapshot::{Change, Snapshot};

/// Protocol version.
pub const VERSION: u32 = 1;
/// Longest message accepted, either way.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message: the protocol version the client speaks.
    Hello {
        /// Version.
        version: u32,
        /// Who is asking (for logs).
        #[serde(default)]
        client: String,
    },
    /// Send the networks now and every change after.
    Subscribe,
    /// Stop sending changes.
    Unsubscribe,
    /// Send the networks once.
    GetNetworks,
    /// Force a network (name or interface) up or down, or let it follow the kernel again.
    Set {
        /// Network name or interface.
        network: String,
        /// `up`, `down` or `auto`.
        state: ForcedState,
    },
    /// A measurement of a connection on an interface, for the estimates.
    Report {
        /// The interface the connection leaves through.
        interface: String,
        /// What was measured.
        sample: Sample,
    },
}

/// What a client may force a network to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForcedState {
    /// Up, whatever the kernel says.
    Up,
    /// Down, whatever the kernel says.
    Down,
    /// As the kernel says.
    Auto,
}

/// What the daemon says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to Hello.
    Hello {
        /// The daemon's version.
        version: u32,
    },
    /// The networks (answer to Subscribe and GetNetworks).
    Snapshot {
        /// The networks.
        snapshot: Snapshot,
    },
    /// A change, pushed to subscribers (with the whole new state, so a subscriber that missed
    /// one is never wrong for long).
    Update {
        /// What changed since the subscriber's previous update.
        changes: Vec<Change>,
        /// The networks now.
        snapshot: Snapshot,
    },
    /// The request was done.
    Ok,
    /// The request was refused; the daemon closes the connection after a malformed one.
    Error {
        /// Why.
        message: String,
    },
}

/// One measurement of a connection, reported by the library or the proxy from TCP_INFO, or
/// taken by a probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The connection's minimum round-trip time.
    #[serde(default, with = "opt_micros")]
    pub rtt: Option<Duration>,
    /// Upstream delivery rate, bits/s, from a sender that was not application-limited.
    #[serde(default)]
    pub rate_up: Option<u64>,
    /// Downstream throughput, bits/s, measured while the connection was busy receiving.
    #[serde(default)]
    pub rate_down: Option<u64>,
}

mod opt_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_micros() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpcError {
    /// The length prefix is over [`MAX_MESSAGE`].
    #[error("message of {0} bytes exceeds the maximum of {MAX_MESSAGE}")]
    TooLong(usize),
    /// The body is not a message this version knows.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// The bytes of one message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_else(|e| {
        serde_json::to_vec(&Reply::Error { message: format!("cannot encode: {e}") }).unwrap_or_default()
    });
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Splits a byte stream into messages.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Adds bytes read from the socket.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next message, `Ok(None)` when more bytes are needed, or an error (after which the
    /// connection is closed).
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, IpcError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(IpcError::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
        serde_json::from_slice(&body).map(Some).map_err(|e| IpcError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmm_policy::{Network, NetworkKind};
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(m: T) {
        let bytes = encode(&m);
        let mut r = FrameReader::new();
        for b in &bytes {
            r.push(&[*b]);
        }
        assert_eq!(r.next_message::<T>().unwrap(), Some(m));
        assert_eq!(r.next_message::<T>().unwrap(), None);
    }

    #[test]
    fn messages_round_trip() {
        roundtrip(Request::Hello { version: VERSION, client: "test".into() });
        roundtrip(Request::Subscribe);
        roundtrip(Request::Set { network: "wifi".into(), state: ForcedState::Down });
        roundtrip(Request::Report {
            interface: "wifi0".into(),
            sample: Sample { rtt: Some(Duration::from_micros(1500)), rate_up: Some(10), rate_down: None },
        });
        let snap = Snapshot {
            generation: 3,
            networks: vec![Network::new("wifi", "wifi0", NetworkKind::Wifi)],
            local_addresses: vec!["10.0.0.1".parse().unwrap()],
        };
        roundtrip(Reply::Snapshot { snapshot: snap.clone() });
        roundtrip(Reply::Update { changes: vec![Change::Up(snap.networks[0].clone())], snapshot: snap });
        roundtrip(Reply::Error { message: "no".into() });
    }

    #[test]
    fn the_wire_is_readable_json() {
        let bytes = encode(&Request::Set { network: "wifi".into(), state: ForcedState::Up });
        assert_eq!(&bytes[4..], br#"{"type":"set","network":"wifi","state":"up"}"#);
    }

    #[test]
    fn the_examples_in_ipc_md_are_what_the_code_speaks() {
        let doc = include_str!("../IPC.md");
        let set = encode(&Request::Set { network: "wifi".into(), state: ForcedState::Up });
        let framed = format!(
            "{}  {}",
            set[..4].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
            std::str::from_utf8(&set[4..]).unwrap()
        );
        assert!(doc.contains(&framed), "IPC.md should show {framed}");
        let mut requests = 0;
        for line in doc.lines() {
            if let Some(json) = line.strip_prefix("→ ") {
                let mut r = FrameReader::new();
                r.push(&encode(&serde_json::from_str::<serde_json::Value>(json).unwrap()));
                r.next_message::<Request>().unwrap_or_else(|e| panic!("{line}: {e}")).unwrap();
                requests += 1;
            }
        }
        assert_eq!(requests, 3);
        assert!(doc.contains(&format!(
            "← {}",
            std::str::from_utf8(&encode(&Reply::Hello { version: VERSION })[4..]).unwrap()
        )));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut r = FrameReader::new();
        r.push(&u32::MAX.to_be_bytes());
        assert!(matches!(r.next_message::<Request>(), Err(IpcError::TooLong(_))));
        let mut r = FrameReader::new();
        r.push(&encode(&serde_json::json!({"type": "subscribe", "added_later": 1})));
        assert_eq!(r.next_message::<Request>(), Ok(Some(Request::Subscribe)), "unknown fields are ignored");
        let mut r = FrameReader::new();
        r.push(&encode(&serde_json::json!({"type": "reboot"})));
        assert!(matches!(r.next_message::<Request>(), Err(IpcError::Malformed(_))));
        let mut r = FrameReader::new();
        r.push(&[0, 0, 0, 3, b'{', b'x', b'}']);
        assert!(matches!(r.next_message::<Request>(), Err(IpcError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut r = FrameReader::new();
            r.push(&data);
            while let Ok(Some(_)) = r.next_message::<Request>() {}
        }
    }
}
