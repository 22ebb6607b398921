//! The multi-socket API over real sockets on loopback. Two "networks" are both bound to `lo`,
//! described as Wi-Fi (fast, far) and cellular (slow, near, metered); the scout is set by hand
//! so a network can be taken down and brought back at will.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmm::{
    Callbacks, Check, Connector, Labels, Listener, MultiSocket, Network, NetworkKind, Policy, Scout, Target,
    Thunk, TrySend,
};
use cmm_policy::{LabelPolicy, NetworkRef, NoMatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn net(name: &str, kind: NetworkKind, mbit: u64, rtt_ms: u64, metered: bool) -> Network {
    let mut n = Network::new(name, "lo", kind);
    n.declared.bandwidth_down = Some(mbit * 1_000_000);
    n.declared.bandwidth_up = Some(mbit * 1_000_000);
    n.declared.rtt = Some(Duration::from_millis(rtt_ms));
    n.metered = metered;
    n.addresses = vec!["127.0.0.1".parse().unwrap()];
    n
}

fn networks() -> Vec<Network> {
    vec![net("wifi", NetworkKind::Wifi, 50, 80, false), net("cell", NetworkKind::Cellular, 2, 30, true)]
}

/// Background may not use the metered network.
fn strict() -> Policy {
    let mut p = Policy::default();
    p.label_policies.push(LabelPolicy {
        labels: Labels::BACKGROUND,
        networks: Some(vec![NetworkRef::Any]),
        metered: false,
        on_no_match: NoMatch::Defer,
        max_wait: Duration::from_secs(30),
    });
    p
}

struct Pair {
    scout: Scout,
    client: MultiSocket,
    server: MultiSocket,
    _listener: Listener,
}

async fn pair(policy: Policy, callbacks: Callbacks) -> Pair {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let scout = Scout::manual(networks());
    let connector = Connector::new(scout.clone(), Arc::new(policy.clone()), Duration::from_secs(2));
    let server_side = Connector::new(Scout::manual(vec![]), Arc::new(policy), Duration::from_secs(2));
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), server_side).await.unwrap();
    let addr = listener.local_addr();
    let client = MultiSocket::connect(&connector, addr, Labels::NONE, callbacks).await.unwrap();
    let server = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await.unwrap().unwrap();
    // Both paths up on both sides.
    wait_for(|| client.paths().iter().filter(|p| p.established).count() == 2).await;
    wait_for(|| server.paths().len() == 2).await;
    Pair { scout, client, server, _listener: listener }
}

#[track_caller]
fn wait_for(mut cond: impl FnMut() -> bool) -> impl Future<Output = ()> {
    let caller = std::panic::Location::caller();
    async move {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition at {caller} not met within 10 s");
    }
}

async fn read_exactly(s: &MultiSocket, n: usize) -> (Vec<u8>, Vec<(usize, Labels)>) {
    let mut out = Vec::with_capacity(n);
    let mut runs: Vec<(usize, Labels)> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < n {
        let (k, l) = tokio::time::timeout(Duration::from_secs(30), s.recv(&mut buf))
            .await
            .expect("recv timed out")
            .unwrap();
        assert!(k > 0, "end of stream after {} of {n} bytes", out.len());
        out.extend_from_slice(&buf[..k]);
        match runs.last_mut() {
            Some((len, last)) if *last == l => *len += k,
            _ => runs.push((k, l)),
        }
    }
    (out, runs)
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(131).wrapping_add(seed) ^ (i >> 10) as u8).collect()
}

fn sent_on(s: &MultiSocket, name: &str) -> u64 {
    s.paths().iter().filter(|p| p.network.name == name).map(|p| p.bytes_sent).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_choose_networks_and_travel_with_the_bytes() {
    let p = pair(Policy::default(), Callbacks::default()).await;
    let bg = payload(2_000_000, 1);
    let fg = payload(3_000, 2);
    p.client.send(&bg, Labels::BACKGROUND).await.unwrap();
    p.client.send(&fg, Labels::ONDEMAND).await.unwrap();
    let (got, runs) = read_exactly(&p.server, bg.len() + fg.len()).await;
    assert_eq!(&got[..bg.len()], &bg[..]);
    assert_eq!(&got[bg.len()..], &fg[..]);
    assert_eq!(runs, vec![(bg.len(), Labels::BACKGROUND), (fg.len(), Labels::ONDEMAND)]);
    // BACKGROUND took the high-bandwidth network, ONDEMAND the low-RTT one.
    assert_eq!(sent_on(&p.client, "wifi"), bg.len() as u64);
    assert_eq!(sent_on(&p.client, "cell"), fg.len() as u64);

    // And back: the server chooses by the client's descriptions of its networks.
    p.server.send(b"reply", Labels::SMALL).await.unwrap();
    let (got, runs) = read_exactly(&p.client, 5).await;
    assert_eq!(got, b"reply");
    assert_eq!(runs, vec![(5, Labels::SMALL)]);
    assert_eq!(sent_on(&p.server, "cell"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_going_down_loses_nothing() {
    let p = pair(Policy::default(), Callbacks::default()).await;
    let data = payload(40_000_000, 3);
    let sender = {
        let c = p.client.clone();
        let d = data.clone();
        tokio::spawn(async move {
            for chunk in d.chunks(100_000) {
                c.send(chunk, Labels::BACKGROUND).await.unwrap();
            }
        })
    };
    let reader = {
        let s = p.server.clone();
        let n = data.len();
        tokio::spawn(async move { read_exactly(&s, n).await.0 })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let still_sending = !sender.is_finished();
    p.scout.set_override("wifi", Some(false));
    sender.await.unwrap();
    let got = reader.await.unwrap();
    assert!(got == data, "the stream differs after failover");
    if still_sending {
        assert!(sent_on(&p.client, "cell") > 0, "nothing moved to cell");
    }
    assert_eq!(p.client.paths().len(), 1);
    // Wi-Fi returns: a new path opens and background goes back to it.
    p.scout.set_override("wifi", None);
    wait_for(|| p.client.paths().iter().any(|x| x.network.name == "wifi" && x.established)).await;
    let before = sent_on(&p.client, "wifi");
    p.client.send(&payload(100_000, 4), Labels::BACKGROUND).await.unwrap();
    read_exactly(&p.server, 100_000).await;
    assert_eq!(sent_on(&p.client, "wifi") - before, 100_000);
}

/// `send` (`copy`) or `send_bytes` of `data`.
async fn send_either(
    s: &MultiSocket,
    data: bytes::Bytes,
    labels: Labels,
    copy: bool,
) -> std::io::Result<usize> {
    if copy { s.send(&data, labels).await } else { s.send_bytes(data, labels).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_send_bytes_report_a_partial_send_alike_when_the_wait_for_a_network_runs_out() {
    let max_wait = Duration::from_millis(300);
    for copy in [true, false] {
        let p = pair(Policy { default_max_wait: max_wait, ..Policy::default() }, Callbacks::default()).await;
        // The server reads nothing, so the send stalls once the buffers are full, part taken.
        let data = bytes::Bytes::from(vec![5u8; 64 << 20]);
        let sender = {
            let (c, d) = (p.client.clone(), data.clone());
            tokio::spawn(async move { send_either(&c, d, Labels::NONE, copy).await })
        };
        // Under way (on loopback its bytes may all be acknowledged before a look at `unacked`).
        wait_for(|| p.client.paths().iter().any(|s| s.bytes_sent > 0)).await;
        p.scout.set_override("wifi", Some(false));
        p.scout.set_override("cell", Some(false));
        let n = tokio::time::timeout(Duration::from_secs(10), sender).await.unwrap().unwrap().unwrap();
        assert!(n > 0 && n < data.len(), "copy={copy}: {n} of {} bytes", data.len());
        // With no network from the start, nothing is taken: an error, after the wait.
        let t0 = std::time::Instant::now();
        let e = send_either(&p.client, data.slice(n..), Labels::NONE, copy).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "copy={copy}: {e}");
        assert!(t0.elapsed() >= max_wait, "copy={copy}: gave up after {:?}", t0.elapsed());
    }
}

static THUNK_RAN: AtomicUsize = AtomicUsize::new(0);

fn on_network(arg: Box<dyn Any + Send>) {
    let tx = arg.downcast::<mpsc::UnboundedSender<&'static str>>().expect("arg");
    THUNK_RAN.fetch_add(1, Ordering::SeqCst);
    let _ = tx.send("resumed");
}

fn never(_: Box<dyn Any + Send>) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thunks_run_when_a_matching_network_appears_and_can_be_cancelled() {
    let p = pair(strict(), Callbacks::default()).await;
    p.scout.set_override("wifi", Some(false));
    wait_for(|| p.client.paths().len() == 1).await;

    // Background may not use the metered cell: deferred, thunk stored.
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    assert!(matches!(
        p.client.try_send(b"sync", Labels::BACKGROUND, Some(Thunk::new(on_network, tx))),
        TrySend::Deferred
    ));
    assert_eq!(p.client.check_label(Labels::BACKGROUND, None), Check::Failed);
    assert_eq!(p.client.check_label(Labels::ONDEMAND, None), Check::Ready);
    // Without a thunk: WouldBlock.
    assert!(
        matches!(p.client.try_send(b"x", Labels::BACKGROUND, None), TrySend::Failed(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );

    // Two more, to cancel: the deleter gets each argument; the count comes back.
    assert_eq!(p.client.check_label(Labels::BACKGROUND, Some(Thunk::new(never, 1u32))), Check::Deferred);
    assert_eq!(p.client.check_label(Labels::BACKGROUND, Some(Thunk::new(never, 2u32))), Check::Deferred);
    let mut deleted = Vec::new();
    let n =
        p.client.thunk_cancel(Labels::BACKGROUND, never, |arg| deleted.push(*arg.downcast::<u32>().unwrap()));
    assert_eq!(n, 2);
    deleted.sort();
    assert_eq!(deleted, vec![1, 2]);

    // Wi-Fi returns: the remaining thunk runs; the application resends from it.
    p.scout.set_override("wifi", None);
    let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("thunk ran").unwrap();
    assert_eq!(msg, "resumed");
    assert_eq!(THUNK_RAN.load(Ordering::SeqCst), 1);
    assert!(matches!(p.client.try_send(b"sync", Labels::BACKGROUND, None), TrySend::Sent(4)));
    let (got, _) = read_exactly(&p.server, 4).await;
    assert_eq!(got, b"sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_run_for_each_connection_and_reset_runs_label_up_again() {
    let ups = Arc::new(Mutex::new(Vec::new()));
    let downs = Arc::new(AtomicUsize::new(0));
    let callbacks = Callbacks {
        label_up: Some({
            let ups = ups.clone();
            Arc::new(move |e: &cmm::PathEvent| ups.lock().unwrap().push((e.network.name.clone(), e.labels)))
        }),
        label_down: Some({
            let downs = downs.clone();
            Arc::new(move |_: &cmm::PathEvent| {
                downs.fetch_add(1, Ordering::SeqCst);
            })
        }),
    };
    let p = pair(Policy::default(), callbacks).await;
    wait_for(|| ups.lock().unwrap().len() == 2).await;
    {
        let ups = ups.lock().unwrap();
        let wifi = ups.iter().find(|(n, _)| n == "wifi").unwrap().1;
        assert!(wifi.contains(Labels::WIFI_ONLY), "{wifi}");
    }
    p.client.reset();
    wait_for(|| downs.load(Ordering::SeqCst) == 2).await;
    assert!(p.client.paths().is_empty());
    // Nothing dials until the next send…
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(p.client.paths().is_empty());
    // …which reconnects, runs label_up again, and the stream goes on unbroken.
    p.client.send(b"after reset", Labels::ONDEMAND).await.unwrap();
    let (got, _) = read_exactly(&p.server, 11).await;
    assert_eq!(got, b"after reset");
    wait_for(|| ups.lock().unwrap().len() == 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_close_deliver_everything_then_end_of_stream() {
    let p = pair(Policy::default(), Callbacks::default()).await;
    let data = payload(1_000_000, 9);
    p.client.send(&data, Labels::NONE).await.unwrap();
    let client = p.client.clone();
    tokio::spawn(async move { client.close().await });
    let (got, _) = read_exactly(&p.server, data.len()).await;
    assert_eq!(got, data);
    let mut buf = [0u8; 16];
    let (n, _) =
        tokio::time::timeout(Duration::from_secs(10), p.server.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(n, 0, "end of stream after the data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_puts_close_on_the_wire_before_the_sockets_go() {
    let p = pair(Policy::default(), Callbacks::default()).await;
    p.client.send(b"last words", Labels::NONE).await.unwrap();
    let t0 = std::time::Instant::now();
    p.client.clone().close().await;
    eprintln!("close returned after {:?}", t0.elapsed());
    assert_eq!(read_exactly(&p.server, 10).await.0, b"last words");
    // The peer learns it from CLOSE, not from its paths ending (which would leave it waiting
    // for a path, its sends `WouldBlock`): its sends fail as closed by the peer.
    wait_for(|| match p.server.try_send(b"x", Labels::NONE, None) {
        TrySend::Failed(e) => e.kind() == std::io::ErrorKind::ConnectionAborted,
        _ => false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_refuses_garbage_and_keeps_serving() {
    let p = pair(Policy::default(), Callbacks::default()).await;
    let addr = p._listener.local_addr();
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0xff, 0, 0, 0, 1, 0]).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "a connection that does not start with HELLO is closed");
    p.client.send(b"still here", Labels::NONE).await.unwrap();
    assert_eq!(read_exactly(&p.server, 10).await.0, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_talks_to_ordinary_servers_and_redials_after_reset() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let scout = Scout::manual(networks());
    let connector = Connector::new(scout.clone(), Arc::new(Policy::default()), Duration::from_secs(2));
    let ups = Arc::new(AtomicUsize::new(0));
    let downs = Arc::new(AtomicUsize::new(0));
    let counter = |c: &Arc<AtomicUsize>| -> cmm::Callback {
        let c = c.clone();
        Arc::new(move |_: &cmm::PathEvent| {
            c.fetch_add(1, Ordering::SeqCst);
        })
    };
    let callbacks = Callbacks { label_up: Some(counter(&ups)), label_down: Some(counter(&downs)) };
    let s =
        MultiSocket::connect_plain(&connector, Target::ip(addr), Labels::ONDEMAND, callbacks).await.unwrap();
    assert!(!s.is_cmm());
    s.send(b"ping", Labels::ONDEMAND).await.unwrap();
    let mut buf = [0u8; 4];
    let (n, labels) = s.recv(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], labels), (&b"ping"[..], Labels::NONE), "a plain server sends no labels");
    // A loopback destination is this machine: direct, whatever the labels.
    assert_eq!(s.paths()[0].network.name, "direct");
    assert_eq!(s.paths()[0].bytes_sent, 4);
    // Reset drops the connection; the next send dials again and runs label_up.
    s.reset();
    wait_for(|| s.paths().is_empty()).await;
    assert_eq!(s.recv(&mut buf).await.unwrap_err().kind(), std::io::ErrorKind::NotConnected);
    s.send(b"pong", Labels::BACKGROUND).await.unwrap();
    let (n, _) = s.recv(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"pong");
    wait_for(|| ups.load(Ordering::SeqCst) == 2 && downs.load(Ordering::SeqCst) == 1).await;
    // A refused server is reported as refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = MultiSocket::connect_plain(&connector, Target::ip(closed), Labels::NONE, Callbacks::default())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// A cmm server in a runtime of its own, so that it can vanish at once as a process that
/// exits does: every path closed by the kernel, nothing said, its port refusing.
struct Server {
    rt: Option<tokio::runtime::Runtime>,
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(addr: std::net::SocketAddr) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let connector =
                Connector::new(Scout::manual(vec![]), Arc::new(Policy::default()), Duration::from_secs(2));
            // The port of a process that just exited may take a moment to be free.
            let mut tries = 0;
            let listener = loop {
                match Listener::bind(addr, connector.clone()).await {
                    Ok(l) => break l,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        eprintln!("bind {addr}: {e}; again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            };
            tx.send(listener.local_addr()).unwrap();
            // Echo every multi-socket, as long as the runtime lives.
            loop {
                let ms = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok((n, l)) = ms.recv(&mut buf).await {
                        if n == 0 || ms.send(&buf[..n], l).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Server { rt: Some(rt), addr }
    }

    fn crash(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.crash();
    }
}

async fn echo_once(client: &MultiSocket, msg: &[u8]) {
    client.send(msg, Labels::ONDEMAND).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < msg.len() {
        let (n, _) =
            tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, msg);
}

#[tokio::test]
async fn a_peer_that_exits_is_noticed_within_seconds() {
    let mut server = Server::start("127.0.0.1:0".parse().unwrap());
    let scout = Scout::manual(networks());
    let connector = Connector::new(scout, Arc::new(Policy::default()), Duration::from_secs(2));
    let client =
        MultiSocket::connect(&connector, server.addr, Labels::NONE, Callbacks::default()).await.unwrap();
    wait_for(|| client.paths().iter().filter(|p| p.established).count() == 2).await;
    echo_once(&client, b"hello").await;
    // The server's process is gone: its paths closed, its port refusing every redial.
    let t0 = std::time::Instant::now();
    server.crash();
    let mut buf = [0u8; 64];
    let r =
        tokio::time::timeout(Duration::from_secs(30), client.recv(&mut buf)).await.expect("a read returns");
    let err = r.expect_err("no data can come from a peer that is gone");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("the peer is gone"), "{err}");
    eprintln!("the lost peer was noticed after {:?}", t0.elapsed());
    // Sends fail too, at once.
    let e = tokio::time::timeout(Duration::from_secs(5), client.send(b"x", Labels::ONDEMAND))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

#[tokio::test]
async fn a_restarted_peer_refuses_the_old_session_rather_than_lose_its_bytes() {
    let mut server = Server::start("127.0.0.1:0".parse().unwrap());
    let addr = server.addr;
    let scout = Scout::manual(networks());
    let connector = Connector::new(scout, Arc::new(Policy::default()), Duration::from_secs(2));
    let client = MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap();
    wait_for(|| client.paths().iter().filter(|p| p.established).count() == 2).await;
    echo_once(&client, b"before").await;
    server.crash();
    // A new process on the same port knows nothing of the session.
    let _restarted = Server::start(addr);
    let mut buf = [0u8; 64];
    let r =
        tokio::time::timeout(Duration::from_secs(30), client.recv(&mut buf)).await.expect("a read returns");
    let err = r.expect_err("the session cannot go on");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("refused the session"), "{err}");
    // A new multi-socket to it works.
    let fresh = MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap();
    echo_once(&fresh, b"after").await;
}

/// A TCP connection from `source` that never says HELLO.
async fn silent(source: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Whether the other end closed `s` (end of stream or a reset) within `wait`.
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(wait, s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_are_bounded_and_real_peers_still_connect() {
    use cmm::listener::{MAX_AWAITING_HELLO, MAX_AWAITING_HELLO_PER_IP};
    let server = Server::start("127.0.0.1:0".parse().unwrap());
    let addr = server.addr;
    // One source fills its share: its next connection is closed at once, not after the 10 s
    // HELLO timeout, and those within the bound stay open.
    let mut held = Vec::new();
    for _ in 0..MAX_AWAITING_HELLO_PER_IP {
        held.push(silent("127.0.0.2", addr).await);
    }
    let mut extra = silent("127.0.0.2", addr).await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "over the bound of one source");
    for s in &held {
        let r = s.try_read(&mut [0u8; 1]);
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "{r:?}");
    }
    // A real peer from another address still connects.
    let connector =
        Connector::new(Scout::manual(networks()), Arc::new(Policy::default()), Duration::from_secs(2));
    let client = MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap();
    wait_for(|| client.paths().iter().filter(|p| p.established).count() == 2).await;
    echo_once(&client, b"past the silent ones").await;

    // Many sources fill the total: a connection from yet another is closed at once.
    for i in 0..MAX_AWAITING_HELLO / MAX_AWAITING_HELLO_PER_IP - 1 {
        for _ in 0..MAX_AWAITING_HELLO_PER_IP {
            held.push(silent(&format!("127.0.1.{i}"), addr).await);
        }
    }
    assert_eq!(held.len(), MAX_AWAITING_HELLO);
    let mut extra = silent("127.0.2.1", addr).await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "over the total bound");
    // Established paths do not count: the first peer carries on.
    echo_once(&client, b"still here").await;
    // Once the silent ones go, their places are free again, and a new peer connects.
    drop(held);
    for _ in 0..100 {
        let mut probe = silent("127.0.2.2", addr).await;
        if !closed_within(&mut probe, Duration::from_millis(100)).await {
            break;
        }
    }
    let fresh = MultiSocket::connect(&connector, addr, Labels::NONE, Callbacks::default()).await.unwrap();
    echo_once(&fresh, b"after").await;
}
