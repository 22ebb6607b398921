//! The scout daemon: one scout for the whole machine, served over a Unix socket (protocol in
//! `IPC.md`), so every program sees the same view, the same overrides and the same estimates.
//!
//! Each client has its own task. A subscriber is sent the whole state and then every change;
//! it is fed from a `watch` channel, so one that reads slowly only ever has the latest state
//! waiting — it cannot make the daemon buffer, and a write that blocks for 5 s drops that
//! client alone. A malformed message gets an `error` reply and closes that client only.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cmm_policy::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::ipc::{self, ForcedState, FrameReader, Reply, Request};
use crate::scout::Scout;

/// How long a client may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the daemon listens and clients look: `$CMM_SCOUT_SOCKET`, else `[scout] socket`, else
/// `/run/cmm/scout.sock` for root and `$XDG_RUNTIME_DIR/cmm/scout.sock` for other users.
pub fn socket_path(config: &Config) -> PathBuf {
    if let Some(p) = std::env::var_os("CMM_SCOUT_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = &config.scout.socket {
        return p.clone();
    }
    default_socket_path()
}

/// The default socket path for this user.
pub fn default_socket_path() -> PathBuf {
    let uid = nix::unistd::Uid::effective();
    if uid.is_root() {
        return PathBuf::from("/run/cmm/scout.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("cmm/scout.sock"),
        None => std::env::temp_dir().join(format!("cmm-{uid}/scout.sock")),
    }
}

/// Binds the socket: creates its directory, and replaces a stale socket file left by a daemon
/// that died — but refuses to start when a live daemon answers there.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("a scout daemon already listens on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot remove stale {}: {e}", path.display())))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    // Every local program may subscribe; forcing networks is checked per request.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(listener)
}

/// Serves clients until `shutdown` resolves; then removes the socket file.
pub async fn serve(scout: Scout, listener: UnixListener, shutdown: impl Future<Output = ()>) {
    let path = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let tasks = tasks::Tasks::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let scout = scout.clone();
                    tasks.spawn(async move {
                        if let Err(e) = client(scout, stream).await {
                            tracing::debug!("scout client ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("scout daemon: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    tasks.abort_all();
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

/// A tiny set of tasks aborted together (the daemon needs nothing more).
mod tasks {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Tasks(Mutex<Vec<tokio::task::AbortHandle>>);

    impl Tasks {
        pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
            let h = tokio::spawn(f).abort_handle();
            let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|t| !t.is_finished());
            v.push(h);
        }

        pub fn abort_all(&self) {
            for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                t.abort();
            }
        }
    }
}

async fn send(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&ipc::encode(reply))).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "client does not read")),
    }
}

/// Whether the peer may change what every program sees (root, or the daemon's own user).
fn may_set(stream: &UnixStream) -> bool {
    let me = nix::unistd::Uid::effective().as_raw();
    stream.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

async fn client(scout: Scout, mut stream: UnixStream) -> io::Result<()> {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Hello first.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match reader.next_message::<Request>() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before hello".to_string());
            }
            reader.push(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| Err("no hello in time".into()));
    let client_name = match hello {
        Ok(Request::Hello { version, client }) if version == ipc::VERSION => client,
        Ok(Request::Hello { version, .. }) => {
            let message =
                format!("protocol version {version} is not supported (this daemon speaks {})", ipc::VERSION);
            let _ = send(&mut stream, &Reply::Error { message: message.clone() }).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        Ok(other) => {
            let message = format!("expected hello first, got {other:?}");
            let _ = send(&mut stream, &Reply::Error { message: message.clone() }).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        Err(message) => {
            let _ = send(&mut stream, &Reply::Error { message: message.clone() }).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
    };
    send(&mut stream, &Reply::Hello { version: ipc::VERSION }).await?;
    tracing::debug!(client = %client_name, "scout client connected");

    let mut sub = scout.subscribe();
    let mut subscribed = false;
    loop {
        // Requests already buffered first.
        loop {
            let req = match reader.next_message::<Request>() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let message = e.to_string();
                    let _ = send(&mut stream, &Reply::Error { message: message.clone() }).await;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, message));
                }
            };
            match req {
                Request::Hello { .. } => {
                    send(&mut stream, &Reply::Error { message: "hello was already said".into() }).await?;
                    return Ok(());
                }
                Request::Subscribe => {
                    subscribed = true;
                    sub = scout.subscribe();
                    send(&mut stream, &Reply::Snapshot { snapshot: (*sub.snapshot()).clone() }).await?;
                }
                Request::Unsubscribe => {
                    subscribed = false;
                    send(&mut stream, &Reply::Ok).await?;
                }
                Request::GetNetworks => {
                    send(&mut stream, &Reply::Snapshot { snapshot: (*scout.snapshot()).clone() }).await?;
                }
                Request::Set { network, state } => {
                    let known =
                        scout.snapshot().networks.iter().any(|n| n.name == network || n.interface == network);
                    let reply = if !may_set(&stream) {
                        Reply::Error { message: "only root or the daemon's user may force networks".into() }
                    } else if !known {
                        Reply::Error { message: format!("no network is named {network:?}") }
                    } else {
                        let up = match state {
                            ForcedState::Up => Some(true),
                            ForcedState::Down => Some(false),
                            ForcedState::Auto => None,
                        };
                        tracing::info!(client = %client_name, "forcing {network} {state:?}");
                        scout.set_override(&network, up);
                        Reply::Ok
                    };
                    send(&mut stream, &reply).await?;
                }
                Request::Report { interface, sample } => scout.report(&interface, sample),
            }
        }
        tokio::select! {
            n = stream.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    tracing::debug!(client = %client_name, "scout client left");
                    return Ok(());
                }
                reader.push(&buf[..n]);
            }
            next = sub.next(), if subscribed => {
                let Some((snap, changes)) = next else { return Ok(()) };
                send(&mut stream, &Reply::Update { changes, snapshot: (*snap).clone() }).await?;
            }
        }
    }
}
