//! A scout whose source is the daemon: it subscribes, mirrors every update, and sends
//! overrides and measurements to the daemon.
//!
//! When the daemon goes away the last view is kept, and the scout redials every second; if the
//! daemon stays away for more than [`FALLBACK_AFTER`], an embedded monitor takes over as the
//! source until the daemon is back (then the daemon's view wins again). Subscribers of the
//! scout see one continuous stream of snapshots throughout.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cmm_policy::Classifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::ipc::{self, FrameReader, Reply, Request};
use crate::scout::{Scout, WeakScout};
use crate::snapshot::Snapshot;

/// How long the daemon may be gone before an embedded monitor takes over.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests (overrides, reports) waiting to be written to the daemon; more are dropped.
const REQUEST_QUEUE: usize = 256;

/// Connects to the daemon at `path`, says hello as `client`, and subscribes. Fails fast (no
/// daemon, or one that does not answer in time).
async fn open(path: &Path, client: &str) -> io::Result<(UnixStream, FrameReader, Snapshot)> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut hello = ipc::encode(&Request::Hello { version: ipc::VERSION, client: client.to_string() });
    hello.extend_from_slice(&ipc::encode(&Request::Subscribe));
    stream.write_all(&hello).await?;
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let snapshot = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut said_hello = false;
        loop {
            loop {
                match reader
                    .next_message::<Reply>()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                {
                    Some(Reply::Hello { .. }) => said_hello = true,
                    Some(Reply::Snapshot { snapshot }) if said_hello => return Ok(snapshot),
                    Some(Reply::Error { message }) => return Err(io::Error::other(message)),
                    Some(other) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected {other:?}"),
                        ));
                    }
                    None => break,
                }
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection"));
            }
            reader.push(&buf[..n]);
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer"))??;
    Ok((stream, reader, snapshot))
}

/// A scout fed by the daemon at `path`. `classifier` is used only by the embedded fallback.
pub async fn connect(path: &Path, client: &str, classifier: Classifier) -> io::Result<Scout> {
    let (stream, reader, snapshot) = open(path, client).await?;
    let scout = Scout::from_snapshot(&snapshot, format!("daemon at {}", path.display()));
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    scout.set_remote(Some(tx));
    let task = tokio::spawn(run(
        scout.downgrade(),
        path.to_path_buf(),
        client.to_string(),
        classifier,
        stream,
        reader,
        rx,
    ));
    scout.own_task(task);
    Ok(scout)
}

async fn run(
    weak: WeakScout,
    path: PathBuf,
    client: String,
    classifier: Classifier,
    mut stream: UnixStream,
    mut reader: FrameReader,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Connected: mirror updates, forward requests.
        let why = 'connected: loop {
            loop {
                match reader.next_message::<Reply>() {
                    Ok(Some(Reply::Update { snapshot, .. } | Reply::Snapshot { snapshot })) => {
                        let Some(scout) = weak.upgrade() else { return };
                        scout.set_view(snapshot.networks, snapshot.local_addresses);
                    }
                    Ok(Some(Reply::Error { message })) => tracing::warn!("scout daemon: {message}"),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => break 'connected format!("malformed message from the daemon: {e}"),
                }
            }
            tokio::select! {
                n = stream.read(&mut buf) => match n {
                    Ok(0) => break "the daemon closed the connection".to_string(),
                    Ok(n) => reader.push(&buf[..n]),
                    Err(e) => break e.to_string(),
                },
                req = rx.recv() => match req {
                    // Every handle is gone: say goodbye.
                    None => {
                        let _ = stream.write_all(&ipc::encode(&Request::Unsubscribe)).await;
                        return;
                    }
                    Some(req) => {
                        if let Err(e) = stream.write_all(&ipc::encode(&req)).await {
                            break e.to_string();
                        }
                    }
                },
            }
        };
        tracing::info!(
            "lost the scout daemon at {} ({why}): keeping the last view, redialling",
            path.display()
        );

        // Disconnected: redial every second; after a while, watch the kernel ourselves.
        let lost_at = Instant::now();
        let mut fallback: Option<Scout> = None;
        let mut forward: Option<tokio::task::JoinHandle<()>> = None;
        let reconnected = loop {
            if weak.upgrade().is_none() {
                return;
            }
            match open(&path, &client).await {
                Ok(x) => break x,
                Err(_) if fallback.is_none() && lost_at.elapsed() >= FALLBACK_AFTER => {
                    match Scout::embedded(classifier.clone()).await {
                        Ok(embedded) => {
                            tracing::info!(
                                "the scout daemon is still gone: watching the networks here meanwhile"
                            );
                            forward = Some(tokio::spawn(mirror(embedded.clone(), weak.clone())));
                            fallback = Some(embedded);
                        }
                        Err(e) => tracing::warn!("cannot watch the networks here either: {e}"),
                    }
                }
                Err(_) => {}
            }
            // Requests while disconnected are dropped: estimates are refreshed continually,
            // and overrides belong to the daemon.
            while rx.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        if let Some(f) = forward.take() {
            f.abort();
        }
        drop(fallback);
        (stream, reader) = (reconnected.0, reconnected.1);
        let snap = reconnected.2;
        let Some(scout) = weak.upgrade() else { return };
        scout.set_view(snap.networks, snap.local_addresses);
        tracing::info!("rejoined the scout daemon at {}", path.display());
    }
}

/// Copies an embedded scout's view into the remote scout (the fallback source).
async fn mirror(embedded: Scout, weak: WeakScout) {
    let mut sub = embedded.subscribe();
    loop {
        let snap = sub.snapshot();
        let Some(scout) = weak.upgrade() else { return };
        scout.set_view(snap.networks.clone(), snap.local_addresses.clone());
        drop(scout);
        if sub.next().await.is_none() {
            return;
        }
    }
}
