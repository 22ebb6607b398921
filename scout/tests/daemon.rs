//! The scout daemon and its clients over a real Unix socket. The daemon's own networks are set
//! by hand (a manual scout), so these tests need no privileges and no netlink.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cmm_policy::{Classifier, Network, NetworkKind, Policy};
use cmm_scout::ipc::{self, FrameReader, Reply, Request, Sample};
use cmm_scout::{Scout, daemon, remote};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

fn nets() -> Vec<Network> {
    let mut wifi = Network::new("wifi", "wifi0", NetworkKind::Wifi);
    wifi.declared.rtt = Some(Duration::from_millis(80));
    let mut cell = Network::new("cell", "cell0", NetworkKind::Cellular);
    cell.declared.rtt = Some(Duration::from_millis(30));
    vec![cell, wifi]
}

struct Daemon {
    scout: Scout,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start(path: &Path, networks: Vec<Network>) -> Daemon {
        let scout = Scout::manual(networks);
        let listener = daemon::bind(path).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::serve(scout.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Daemon { scout, stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("scout.sock")
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test]
async fn subscribers_get_the_networks_then_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    let client = remote::connect(&socket(&dir), "test", Classifier::default()).await.unwrap();
    assert_eq!(client.snapshot().networks.len(), 2);
    assert!(client.source().starts_with("daemon at"));

    // A change at the daemon reaches the subscriber.
    let mut sub = client.subscribe();
    d.scout.set_override("wifi", Some(false));
    let (snap, changes) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    assert!(!snap.is_up("wifi0"));
    assert_eq!(changes[0].to_string(), "wifi (wifi0) down: forced down");

    // A client's override goes to the daemon, and so to everyone.
    let other = remote::connect(&socket(&dir), "other", Classifier::default()).await.unwrap();
    other.set_override("wifi", None);
    eventually("the override reached the daemon", || d.scout.snapshot().is_up("wifi0")).await;
    eventually("and came back to the first client", || client.snapshot().is_up("wifi0")).await;

    // Reports become estimates, which the chooser then uses.
    other.report("wifi0", Sample { rtt: Some(Duration::from_millis(5)), ..Sample::default() });
    eventually("the estimate", || {
        client.snapshot().by_interface("wifi0").is_some_and(|n| n.rtt() == Duration::from_millis(5))
    })
    .await;
    let snap = client.snapshot();
    match Policy::default().choose(cmm_policy::Labels::ONDEMAND, &snap.networks) {
        cmm_policy::Decision::Use { candidates, .. } => assert_eq!(snap.networks[candidates[0]].name, "wifi"),
        d => panic!("{d:?}"),
    }
    d.stop().await;
}

#[tokio::test]
async fn a_restarted_daemon_is_rejoined_without_losing_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    let client = remote::connect(&socket(&dir), "test", Classifier::default()).await.unwrap();
    d.stop().await;
    // The daemon is gone: the view stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.snapshot().networks.len(), 2);
    // A new daemon, whose view differs: the client rejoins and takes it.
    let mut changed = nets();
    changed[1].up = false;
    changed[1].down_reason = Some("no carrier".into());
    let d2 = Daemon::start(&socket(&dir), changed).await;
    eventually("rejoined", || !client.snapshot().is_up("wifi0")).await;
    d2.scout.set_networks(nets());
    eventually("updates flow again", || client.snapshot().is_up("wifi0")).await;
    d2.stop().await;
}

async fn raw(path: &Path) -> (UnixStream, FrameReader) {
    (UnixStream::connect(path).await.unwrap(), FrameReader::new())
}

async fn read_reply(stream: &mut UnixStream, reader: &mut FrameReader) -> Option<Reply> {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(r) = reader.next_message::<Reply>().unwrap() {
            return Some(r);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            return None;
        }
        reader.push(&buf[..n]);
    }
}

#[tokio::test]
async fn malformed_messages_get_an_error_and_close_that_client_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    let good = remote::connect(&socket(&dir), "good", Classifier::default()).await.unwrap();

    // Not JSON.
    let (mut s, mut r) = raw(&socket(&dir)).await;
    s.write_all(&[0, 0, 0, 4, b'n', b'o', b'p', b'e']).await.unwrap();
    match read_reply(&mut s, &mut r).await {
        Some(Reply::Error { message }) => assert!(message.contains("malformed"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(read_reply(&mut s, &mut r).await.is_none(), "closed after the error");

    // A huge length.
    let (mut s, mut r) = raw(&socket(&dir)).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(matches!(read_reply(&mut s, &mut r).await, Some(Reply::Error { .. })));

    // Another version.
    let (mut s, mut r) = raw(&socket(&dir)).await;
    s.write_all(&ipc::encode(&Request::Hello { version: 99, client: "future".into() })).await.unwrap();
    match read_reply(&mut s, &mut r).await {
        Some(Reply::Error { message }) => assert!(message.contains("version 99"), "{message}"),
        other => panic!("{other:?}"),
    }

    // Something other than hello first.
    let (mut s, mut r) = raw(&socket(&dir)).await;
    s.write_all(&ipc::encode(&Request::Subscribe)).await.unwrap();
    assert!(matches!(read_reply(&mut s, &mut r).await, Some(Reply::Error { .. })));

    // An unknown network in `set` is an error, but not a malformed message.
    let (mut s, mut r) = raw(&socket(&dir)).await;
    let mut out = ipc::encode(&Request::Hello { version: ipc::VERSION, client: "t".into() });
    out.extend(ipc::encode(&Request::Set { network: "nosuch".into(), state: ipc::ForcedState::Down }));
    out.extend(ipc::encode(&Request::GetNetworks));
    s.write_all(&out).await.unwrap();
    assert!(matches!(read_reply(&mut s, &mut r).await, Some(Reply::Hello { .. })));
    assert!(matches!(read_reply(&mut s, &mut r).await, Some(Reply::Error { .. })));
    assert!(matches!(read_reply(&mut s, &mut r).await, Some(Reply::Snapshot { .. })));

    // The good client never noticed.
    d.scout.set_override("cell", Some(false));
    eventually("the good client still gets updates", || !good.snapshot().is_up("cell0")).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_and_a_stuck_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    // One subscriber that never reads.
    let (mut stuck, _) = raw(&socket(&dir)).await;
    let mut out = ipc::encode(&Request::Hello { version: ipc::VERSION, client: "stuck".into() });
    out.extend(ipc::encode(&Request::Subscribe));
    stuck.write_all(&out).await.unwrap();
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(remote::connect(&socket(&dir), &format!("c{i}"), Classifier::default()).await.unwrap());
    }
    // Many changes, fast: every reader ends at the latest state; the stuck one holds nobody.
    for i in 0..300 {
        d.scout.set_override("wifi", Some(i % 2 == 1));
    }
    eventually("all 100 saw the last state", || clients.iter().all(|c| c.snapshot().is_up("wifi0"))).await;
    d.scout.set_override("cell", Some(false));
    eventually("and the next change", || clients.iter().all(|c| !c.snapshot().is_up("cell0"))).await;
    drop(stuck);
    d.stop().await;
}

#[tokio::test]
async fn a_second_daemon_refuses_a_live_socket_and_replaces_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    let e = daemon::bind(&socket(&dir)).await.unwrap_err();
    assert!(e.to_string().contains("already listens"), "{e}");
    d.stop().await;
    // A stale file (no one listening) is replaced.
    std::fs::write(socket(&dir), b"").unwrap();
    let d = Daemon::start(&socket(&dir), nets()).await;
    d.stop().await;
}
