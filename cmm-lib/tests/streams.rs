//! Streams of one multi-socket on loopback: each independent, half-closed by FIN, reset with a
//! code, flow-controlled on its own. Two "networks", both on `lo`.

use std::sync::Arc;
use std::time::Duration;

use cmm::{Callbacks, Connector, Labels, Listener, MultiSocket, Network, NetworkKind, Policy, Scout, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn net(name: &str, kind: NetworkKind) -> Network {
    let mut n = Network::new(name, "lo", kind);
    n.addresses = vec!["127.0.0.1".parse().unwrap()];
    n
}

async fn pair() -> (MultiSocket, MultiSocket, Listener) {
    let scout = Scout::manual(vec![net("wifi", NetworkKind::Wifi), net("cell", NetworkKind::Cellular)]);
    let policy = Arc::new(Policy::default());
    let connector = Connector::new(scout, policy.clone(), Duration::from_secs(2));
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        Connector::new(Scout::manual(vec![]), policy, Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let client = MultiSocket::connect(&connector, listener.local_addr(), Labels::NONE, Callbacks::default())
        .await
        .unwrap();
    let server = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
    (client, server, listener)
}

/// Echoes every stream the peer opens: reads to its end, then ends its own half.
fn echo_streams(server: MultiSocket) {
    tokio::spawn(async move {
        while let Ok(mut s) = server.accept_stream().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

async fn exchange(mut s: Stream, data: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(&mut s);
    let write = async {
        wr.write_all(&data).await.unwrap();
        // FIN: a half-close — the echo still comes back.
        wr.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        if let Err(e) = rd.read_to_end(&mut got).await {
            panic!("read failed after {} bytes: {e:?}", got.len())
        }
        got
    };
    let ((), got) = tokio::join!(write, read);
    got
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_half_closed_stream_still_gets_its_answer() {
    let (client, server, _l) = pair().await;
    echo_streams(server);
    let s = client.open_stream(Labels::ONDEMAND).unwrap();
    let data = b"an upload that ends with SHUT_WR".to_vec();
    let got = tokio::time::timeout(WAIT, exchange(s, data.clone())).await.unwrap();
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_streams_at_once_each_arrive_whole() {
    let (client, server, _l) = pair().await;
    echo_streams(server);
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let s = client.open_stream(if i % 2 == 0 { Labels::BACKGROUND } else { Labels::ONDEMAND }).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect();
        tasks.push(tokio::spawn(async move { (exchange(s, data.clone()).await, data) }));
    }
    for t in tasks {
        let (got, want) = tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        assert!(got == want, "a stream differs");
    }
}

#[tokio::test]
async fn a_reset_reaches_the_peer_with_its_code() {
    let (client, server, _l) = pair().await;
    let s = client.open_stream(Labels::ONDEMAND).unwrap();
    s.send(b"partial", Labels::ONDEMAND).await.unwrap();
    let mut peer = tokio::time::timeout(WAIT, server.accept_stream()).await.unwrap().unwrap();
    let mut buf = [0u8; 7];
    peer.read_exact(&mut buf).await.unwrap();
    s.reset(42).unwrap();
    let e = tokio::time::timeout(WAIT, peer.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(e.to_string().contains("42"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_holds_up_only_its_own_stream() {
    let (client, server, _l) = pair().await;
    let mut stuck = client.open_stream(Labels::BACKGROUND).unwrap();
    let flowing = client.open_stream(Labels::BACKGROUND).unwrap();
    stuck.write_all(b"hello").await.unwrap();
    // A stream opens with its first bytes.
    flowing.send(b"!", Labels::BACKGROUND).await.unwrap();
    // The server accepts both and reads only the second.
    let _unread = tokio::time::timeout(WAIT, server.accept_stream()).await.unwrap().unwrap();
    let mut reader = tokio::time::timeout(WAIT, server.accept_stream()).await.unwrap().unwrap();
    // The stuck stream's writer stops at its window...
    let filler = vec![7u8; 4 << 20];
    let blocked = tokio::time::timeout(Duration::from_secs(2), stuck.write_all(&filler)).await;
    assert!(blocked.is_err(), "4 MB went into a stream nobody reads");
    // ...while 20 MB move on the other one.
    let data = vec![9u8; 20 << 20];
    let send = async {
        flowing.send(&data, Labels::BACKGROUND).await.unwrap();
        flowing.finish().unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        got.len()
    };
    let ((), n) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) }).await.unwrap();
    assert_eq!(n, data.len() + 1);
}
