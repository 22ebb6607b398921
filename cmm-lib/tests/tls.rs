//! Multi-sockets whose every path is TLS 1.3 with pinned keys, over real sockets on loopback
//! (two "networks" both bound to `lo`, so a session has two paths).

use std::sync::Arc;
use std::time::Duration;

use cmm::frame::{Frame, FrameDecoder, NetworkInfo, SessionId};
use cmm::tls::Identity;
use cmm::{Callbacks, Connector, Labels, Listener, MultiSocket, Network, NetworkKind, Policy, Scout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn net(name: &str, kind: NetworkKind) -> Network {
    let mut n = Network::new(name, "lo", kind);
    n.addresses = vec!["127.0.0.1".parse().unwrap()];
    n
}

fn connector(networks: Vec<Network>) -> Connector {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Connector::new(Scout::manual(networks), Arc::new(Policy::default()), Duration::from_secs(2))
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_is_tls_and_streams_and_labels_work_over_it() {
    let (relay, proxy) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let server_tls = relay.server_config(&[proxy.public_key()]).unwrap();
    let listener =
        Listener::bind_tls("127.0.0.1:0".parse().unwrap(), connector(vec![]), server_tls).await.unwrap();
    let nets = vec![net("wifi", NetworkKind::Wifi), net("cell", NetworkKind::Cellular)];
    let client_tls = proxy.client_config(relay.public_key()).unwrap();
    let client = MultiSocket::connect_tls(
        &connector(nets),
        listener.local_addr(),
        Labels::NONE,
        Callbacks::default(),
        client_tls,
    )
    .await
    .unwrap();
    let server = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
    assert_eq!(server.peer_key(), Some(proxy.public_key()), "the relay knows who connected");
    wait_for(|| client.paths().iter().filter(|p| p.established).count() == 2).await;
    wait_for(|| server.paths().len() == 2).await;

    // Stream 0, both ways, with labels.
    client.send(b"hello over TLS", Labels::ONDEMAND).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, labels) = server.recv(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], labels), (&b"hello over TLS"[..], Labels::ONDEMAND));
    server.send(b"and back", Labels::BACKGROUND).await.unwrap();
    let (n, labels) = client.recv(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], labels), (&b"and back"[..], Labels::BACKGROUND));

    // A stream with more than a TLS record's worth, echoed, half-closed.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    let echo = tokio::spawn(async move {
        let mut s = server.accept_stream().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
        server
    });
    let mut s = client.open_stream(Labels::BACKGROUND).unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert!(back == data, "the echo differs");
    let _server = echo.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_an_allowed_key_or_a_relay_with_another_key_gets_no_session() {
    let (relay, proxy, stranger) =
        (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let server_tls = relay.server_config(&[proxy.public_key()]).unwrap();
    let listener =
        Listener::bind_tls("127.0.0.1:0".parse().unwrap(), connector(vec![]), server_tls).await.unwrap();
    let nets = vec![net("wifi", NetworkKind::Wifi)];
    let policy = Policy { default_max_wait: Duration::from_secs(1), ..Policy::default() };
    let short = Connector::new(Scout::manual(nets), Arc::new(policy), Duration::from_millis(500));
    let refused = MultiSocket::connect_tls(
        &short,
        listener.local_addr(),
        Labels::NONE,
        Callbacks::default(),
        stranger.client_config(relay.public_key()).unwrap(),
    )
    .await;
    assert!(refused.is_err(), "a stranger's key got a session");
    let wrong_relay = MultiSocket::connect_tls(
        &short,
        listener.local_addr(),
        Labels::NONE,
        Callbacks::default(),
        proxy.client_config(stranger.public_key()).unwrap(),
    )
    .await;
    assert!(wrong_relay.is_err(), "a relay with another key was trusted");
    assert!(listener.try_accept().is_none());
    // A plain (non-TLS) multi-socket gets nothing either.
    let plain = MultiSocket::connect(&short, listener.local_addr(), Labels::NONE, Callbacks::default()).await;
    assert!(plain.is_err());
    assert!(listener.try_accept().is_none());
}

/// One raw TLS connection to the listener speaking HELLO by hand, as an attacker with an
/// allowed key would: what the listener answers (WELCOME or CLOSE), and the connection's
/// exporter for a session id (to compute a proof with).
struct RawPath {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl RawPath {
    async fn open(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> RawPath {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls =
            tokio_rustls::TlsConnector::from(config).connect(cmm::tls::server_name(), tcp).await.unwrap();
        RawPath { tls }
    }

    fn exporter(&self, session: &[u8; 16]) -> [u8; 32] {
        self.tls
            .get_ref()
            .1
            .export_keying_material([0u8; 32], cmm::tls::JOIN_EXPORTER_LABEL, Some(session))
            .unwrap()
    }

    async fn hello(&mut self, session: [u8; 16], path: u32, join: bool, proof: [u8; 32]) -> Frame {
        let hello = Frame::Hello {
            version: cmm::frame::VERSION,
            session: SessionId(session),
            path,
            join,
            proof,
            network: NetworkInfo {
                name: "wifi".into(),
                kind: NetworkKind::Wifi,
                metered: false,
                bandwidth_down: 0,
                bandwidth_up: 0,
                rtt_us: 0,
                refused: 0,
            },
        };
        let mut out = bytes::BytesMut::new();
        hello.encode(&mut out);
        self.tls.write_all(&out).await.unwrap();
        let mut d = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = d.next_frame().unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.tls.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed without an answer");
            d.push(&buf[..n]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_id_alone_or_a_replayed_proof_lets_no_path_join() {
    let (relay, proxy) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let listener = Listener::bind_tls(
        "127.0.0.1:0".parse().unwrap(),
        connector(vec![]),
        relay.server_config(&[proxy.public_key()]).unwrap(),
    )
    .await
    .unwrap();
    let addr = listener.local_addr();
    let config = proxy.client_config(relay.public_key()).unwrap();
    // A session of our own, opened by hand: its WELCOME tells the join secret.
    let session = [42u8; 16];
    let mut first = RawPath::open(addr, config.clone()).await;
    let secret = match first.hello(session, 1, false, [0; 32]).await {
        Frame::Welcome { secret, .. } => secret,
        other => panic!("{other:?}"),
    };
    assert_ne!(secret, [0; 32]);
    let _accepted = listener.accept().await.unwrap();
    let refused = |f: &Frame, why: &str| {
        assert!(
            matches!(f, Frame::Close { code: cmm::frame::CLOSE_PATH_REFUSED, reason } if reason.contains(why)),
            "{f:?}"
        )
    };
    // The session id alone, as a first path or as a join without a proof.
    let mut p = RawPath::open(addr, config.clone()).await;
    refused(&p.hello(session, 2, false, [0; 32]).await, "join with a proof");
    let mut p = RawPath::open(addr, config.clone()).await;
    refused(&p.hello(session, 3, true, [0; 32]).await, "bad join proof");
    // A valid proof joins; the same proof replayed on a new connection does not.
    let mut good = RawPath::open(addr, config.clone()).await;
    let proof = cmm::tls::proof_over(&good.exporter(&session), &secret);
    assert!(matches!(good.hello(session, 4, true, proof).await, Frame::Welcome { .. }));
    let mut replay = RawPath::open(addr, config.clone()).await;
    refused(&replay.hello(session, 5, true, proof).await, "bad join proof");

    // Paths per session are bounded: two are open; fourteen more join, the next is refused.
    let mut open = vec![first, good];
    for path in 10..24u32 {
        let mut p = RawPath::open(addr, config.clone()).await;
        let proof = cmm::tls::proof_over(&p.exporter(&session), &secret);
        let answer = p.hello(session, path, true, proof).await;
        assert!(matches!(answer, Frame::Welcome { .. }), "path {path}: {answer:?}");
        open.push(p);
    }
    let mut extra = RawPath::open(addr, config.clone()).await;
    let proof = cmm::tls::proof_over(&extra.exporter(&session), &secret);
    refused(&extra.hello(session, 99, true, proof).await, "too many paths");
}
