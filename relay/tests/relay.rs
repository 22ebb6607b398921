//! The relay on loopback: a client session over TLS (two "networks" bound to `lo`), streams
//! opened with an open request, destinations on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cmm::relay::{OpenReply, OpenRequest, OpenStatus};
use cmm::tls::Identity;
use cmm::{
    Callbacks, Connector, Host, Labels, MultiSocket, Network, NetworkKind, Policy, Scout, Stream, Target,
};
use cmm_relay::{Destinations, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

fn net(name: &str, kind: NetworkKind) -> Network {
    let mut n = Network::new(name, "lo", kind);
    n.addresses = vec!["127.0.0.1".parse().unwrap()];
    n
}

struct Setup {
    client: MultiSocket,
    _relay: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn setup(destinations: Destinations, half_close_timeout: Duration) -> Setup {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (relay_id, proxy_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let relay = Relay::bind(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: relay_id.clone(),
        allowed: vec![proxy_id.public_key()],
        destinations,
        connect_timeout: Duration::from_secs(5),
        half_close_timeout,
    })
    .await
    .unwrap();
    let addr = relay.local_addr();
    let relay = tokio::spawn(relay.run());
    let connector = Connector::new(
        Scout::manual(vec![net("wifi", NetworkKind::Wifi), net("cell", NetworkKind::Cellular)]),
        Arc::new(Policy::default()),
        Duration::from_secs(2),
    );
    let client = MultiSocket::connect_tls(
        &connector,
        addr,
        Labels::NONE,
        Callbacks::default(),
        proxy_id.client_config(relay_id.public_key()).unwrap(),
    )
    .await
    .unwrap();
    Setup { client, _relay: relay }
}

/// Opens a relayed connection to `target`: the stream and the relay's reply.
async fn open(client: &MultiSocket, target: Target) -> (Stream, OpenReply) {
    let mut s = client.open_stream(Labels::ONDEMAND).unwrap();
    let mut req = Vec::new();
    OpenRequest { target }.encode(&mut req).unwrap();
    s.write_all(&req).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so that nothing after the reply is taken here.
    loop {
        if let Some((reply, _)) = OpenReply::decode(&got).unwrap() {
            return (s, reply);
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut byte)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended before the reply");
        got.push(byte[0]);
    }
}

/// A TCP server on loopback that answers each connection with "echo: " and what it read, once
/// the client half-closed.
async fn echo_after_fin() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(b"echo: ").await.unwrap();
                s.write_all(&got).await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_upload_that_ends_with_fin_still_gets_its_answer() {
    let s = setup(Destinations::default(), Duration::from_secs(60)).await;
    let dest = echo_after_fin().await;
    let (mut stream, reply) = open(&s.client, Target::ip(dest)).await;
    assert_eq!(reply.status, OpenStatus::Connected, "{reply:?}");
    let upload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&upload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer[..6], b"echo: ");
    assert!(answer[6..] == upload[..], "the answer differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_resolved_by_the_relay_and_failures_come_back_as_statuses() {
    let s = setup(
        Destinations { nets: vec!["127.0.0.0/8".parse().unwrap()], ports: vec![] },
        Duration::from_secs(60),
    )
    .await;
    let dest = echo_after_fin().await;
    // A name, resolved on the relay's side.
    let (mut stream, reply) =
        open(&s.client, Target { host: Host::Name("localhost".into()), port: dest.port() }).await;
    assert_eq!(reply.status, OpenStatus::Connected, "{reply:?}");
    stream.write_all(b"hi").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, b"echo: hi");
    // A closed port: refused, as a direct connect would be.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (_, reply) = open(&s.client, Target::ip(closed)).await;
    assert_eq!(reply.status, OpenStatus::Refused, "{reply:?}");
    // Outside the allowed networks.
    let (_, reply) = open(&s.client, Target::ip("192.0.2.1:80".parse::<SocketAddr>().unwrap())).await;
    assert_eq!(reply.status, OpenStatus::NotAllowed, "{reply:?}");
    // A name that does not resolve.
    let (_, reply) =
        open(&s.client, Target { host: Host::Name("no-such-host.invalid".into()), port: 80 }).await;
    assert_eq!(reply.status, OpenStatus::NameNotResolved, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_whose_other_side_stays_silent_is_reaped() {
    let s = setup(Destinations::default(), Duration::from_millis(500)).await;
    // A destination that reads everything and never answers nor closes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let (mut stream, reply) = open(&s.client, Target::ip(dest)).await;
    assert_eq!(reply.status, OpenStatus::Connected);
    stream.write_all(b"request").await.unwrap();
    stream.shutdown().await.unwrap();
    // The relay gives up on the silent half and resets the stream.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
    assert!(r.is_err(), "the reaped stream ended cleanly: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_either_side_reaches_the_other() {
    let s = setup(Destinations::default(), Duration::from_secs(60)).await;
    // The destination resets: the client's stream is reset.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let destination = tokio::spawn(async move {
        let (c, _) = l.accept().await.unwrap();
        let _ = rx.await;
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        // The second connection: the client resets it; the destination sees ECONNRESET.
        let (mut c, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(WAIT, async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    });
    let (mut stream, reply) = open(&s.client, Target::ip(dest)).await;
    assert_eq!(reply.status, OpenStatus::Connected);
    tx.send(()).unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    let (stream, reply) = open(&s.client, Target::ip(dest)).await;
    assert_eq!(reply.status, OpenStatus::Connected);
    stream.reset(9).unwrap();
    tokio::time::timeout(WAIT, destination).await.unwrap().unwrap();
}
