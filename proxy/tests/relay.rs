//! The proxy with `[relay]`, on loopback: SOCKS5 clients whose connections ride a relay (two
//! "networks" bound to `lo`), get the same replies as direct, and fall back to direct when the
//! relay cannot be reached.

use std::net::SocketAddr;
use std::time::Duration;

use cmm::tls::Identity;
use cmm::{Network, NetworkKind, Scout};
use cmm_policy::Config;
use cmm_proxy::Proxy;
use cmm_relay::{Destinations, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);

fn net(name: &str, kind: NetworkKind) -> Network {
    let mut n = Network::new(name, "lo", kind);
    n.addresses = vec!["127.0.0.1".parse().unwrap()];
    n
}

/// A TCP server that answers "echo: " and what it read once the client half-closed.
async fn echo_after_fin() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(b"echo: ").await;
                let _ = s.write_all(&got).await;
            });
        }
    });
    addr
}

/// A loopback address where nothing listens (connects are refused).
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A SOCKS5 CONNECT to `dest` through `proxy`: the reply code and, when 0, the stream.
async fn socks_connect(proxy: SocketAddr, dest: SocketAddr) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let SocketAddr::V4(v4) = dest else { panic!("v4 only") };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 10];
    tokio::time::timeout(WAIT, s.read_exact(&mut head)).await.unwrap().unwrap();
    (head[1], s)
}

struct Setup {
    proxy: SocketAddr,
    scout: Scout,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay that may connect only to `relay_port`, and a proxy whose loopback traffic rides it;
/// `relay_addr` overrides the relay's address (to point at nothing).
async fn setup(name: &str, relay_port: u16, relay_addr: Option<SocketAddr>) -> Setup {
    setup_with(name, relay_port, relay_addr, RIDE_LOOPBACK).await
}

/// Loopback would go direct: this rule makes it ride the relay.
const RIDE_LOOPBACK: &str = "[[rule]]\ncidr = \"127.0.0.0/8\"\nlabels = \"ondemand\"\nvia = \"relay\"\n";

async fn setup_with(name: &str, relay_port: u16, relay_addr: Option<SocketAddr>, rules: &str) -> Setup {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("cmm-proxy-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (relay_id, proxy_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    std::fs::write(dir.join("proxy.key"), proxy_id.to_text()).unwrap();
    let relay = Relay::bind(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: relay_id.clone(),
        allowed: vec![proxy_id.public_key()],
        destinations: Destinations { nets: vec![], ports: vec![relay_port] },
        connect_timeout: Duration::from_secs(5),
        half_close_timeout: Duration::from_secs(60),
    })
    .await
    .unwrap();
    let address = relay_addr.unwrap_or(relay.local_addr());
    tokio::spawn(relay.run());
    // `rules` may set the fallback itself (it follows the [relay] keys).
    let fallback = if rules.contains("fallback_after") { "" } else { "fallback_after = \"1s\"\n" };
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n\n[relay]\naddress = \"{address}\"\npublic_key = \"{}\"\nkey = \"proxy.key\"\n{fallback}grace = \"1s\"\n\n{rules}",
        relay_id.public_key()
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let scout = Scout::manual(vec![net("wifi", NetworkKind::Wifi), net("cell", NetworkKind::Cellular)]);
    let proxy = Proxy::new(config, scout.clone()).await.unwrap();
    let addr = proxy.local_addrs()[0];
    tokio::spawn(proxy.serve(std::future::pending()));
    Setup { proxy: addr, scout, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connections_ride_the_relay_with_the_replies_of_direct_mode() {
    let dest = echo_after_fin().await;
    let s = setup("ride", dest.port(), None).await;
    // Through the relay: a half-closed upload gets its whole answer.
    let (code, mut c) = socks_connect(s.proxy, dest).await;
    assert_eq!(code, 0);
    let upload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    c.write_all(&upload).await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer[..6], b"echo: ");
    assert!(answer[6..] == upload[..], "the answer differs");
    // The relay may not connect to another port: its refusal is the proxy's reply (a direct
    // connect would have reached this echo server), so the connection did ride the relay.
    let other = echo_after_fin().await;
    let (code, _) = socks_connect(s.proxy, other).await;
    assert_eq!(code, 2, "SOCKS5 'not allowed by ruleset'");
    // A closed port (allowed by the relay): refused, as direct.
    let closed = closed_port();
    let s2 = setup("refused", closed.port(), None).await;
    let (code, _) = socks_connect(s2.proxy, closed).await;
    assert_eq!(code, 5, "SOCKS5 'connection refused'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_relay_to_reach_new_connections_go_direct() {
    let dest = echo_after_fin().await;
    // Nothing listens where the relay should be.
    let nowhere = closed_port();
    let s = setup("fallback", dest.port(), Some(nowhere)).await;
    let start = std::time::Instant::now();
    let (code, mut c) = socks_connect(s.proxy, dest).await;
    assert_eq!(code, 0);
    assert!(start.elapsed() < Duration::from_secs(10), "fell back after {:?}", start.elapsed());
    c.write_all(b"direct").await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, b"echo: direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_fallback_refuses_rather_than_going_direct() {
    let dest = echo_after_fin().await;
    let nowhere = closed_port();
    let rules = format!("fallback_after = \"strict\"\n{RIDE_LOOPBACK}");
    let s = setup_with("strict", dest.port(), Some(nowhere), &rules).await;
    // It waits for a path up to `grace` (1 s here), then refuses: SOCKS5 "not allowed".
    let (code, _) = socks_connect(s.proxy, dest).await;
    assert_eq!(code, 2, "a strict relay setting never goes direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_wait_out_the_grace_period_then_are_reset() {
    // A destination that answers nothing and keeps the connection.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((c, _)) = l.accept().await {
            kept.push(c);
        }
    });
    let s = setup("grace", dest.port(), None).await;
    let (code, mut c) = socks_connect(s.proxy, dest).await;
    assert_eq!(code, 0);
    // Every network goes: the session has no path; after the grace (1 s here) the client is
    // told, instead of waiting for ever.
    s.scout.set_override("wifi", Some(false));
    s.scout.set_override("cell", Some(false));
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, c.read(&mut buf)).await.expect("the client was never told");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(900), "reset before the grace: {:?}", t0.elapsed());
}

/// Sends `msg`, half-closes, and reads the answer to the end.
async fn exchange(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    c.write_all(msg).await?;
    c.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut answer)).await.expect("an answer or an error")?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_reached_lately_is_answered_at_once_and_a_late_failure_resets() {
    for open_early in [true, false] {
        // An echo server that can be stopped: its port then refuses.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got).await;
                    let _ = s.write_all(b"echo: ").await;
                    let _ = s.write_all(&got).await;
                });
            }
        });
        let rules = format!("open_early = {open_early}\n{RIDE_LOOPBACK}");
        let s = setup_with(&format!("early-{open_early}"), dest.port(), None, &rules).await;
        // First contact waits for the relay's answer; the next is answered at once, and its
        // bytes (sent before the relay answered) arrive whole.
        for round in 0..2 {
            let (code, mut c) = socks_connect(s.proxy, dest).await;
            assert_eq!(code, 0, "round {round}");
            assert_eq!(exchange(&mut c, b"hello").await.unwrap(), b"echo: hello", "round {round}");
        }
        server.abort();
        let _ = server.await;
        let (code, mut c) = socks_connect(s.proxy, dest).await;
        if open_early {
            // Answered early, then the relay's dial failed: the client is reset.
            assert_eq!(code, 0);
            let e = exchange(&mut c, b"hello").await.expect_err("a reset");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            // Forgotten as reached: the next one waits and gets the code a direct connect would.
            let (code, _) = socks_connect(s.proxy, dest).await;
            assert_eq!(code, 5, "SOCKS5 'connection refused'");
        } else {
            assert_eq!(code, 5, "SOCKS5 'connection refused'");
        }
    }
}

/// A one-shot HTTP server: answers every request `200` with `hello`, then closes.
async fn hello_http() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                    .await;
            });
        }
    });
    addr
}

/// Writes `request` to the proxy and reads until the proxy closes or the head of a CONNECT
/// answer is complete (`connect`): the status and what came with it.
async fn http_exchange(proxy: SocketAddr, request: &str, connect: bool) -> (u16, TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    let done = |got: &[u8]| connect && got.windows(4).any(|w| w == b"\r\n\r\n");
    while !done(&got) {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, s, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_ride_the_relay_with_the_statuses_of_direct_mode() {
    let dest = echo_after_fin().await;
    let s = setup("http", dest.port(), None).await;
    // CONNECT through the relay: a half-closed upload gets its whole answer.
    let (status, mut c, _) =
        http_exchange(s.proxy, &format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n"), true).await;
    assert_eq!(status, 200);
    c.write_all(b"through the relay").await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, b"echo: through the relay");
    // A port the relay may not connect to: its refusal is the answer (503, the policy's
    // refusal), so the connection did ride the relay.
    let other = echo_after_fin().await;
    let (status, _, _) =
        http_exchange(s.proxy, &format!("CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n"), true).await;
    assert_eq!(status, 503);
    // Absolute-form GET through the relay.
    let web = hello_http().await;
    let s2 = setup("http-get", web.port(), None).await;
    let get = format!("GET http://{web}/ HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n");
    let (status, _, got) = http_exchange(s2.proxy, &get, false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert!(got.ends_with(b"hello"), "{}", String::from_utf8_lossy(&got));
    // A closed port: 502, as direct.
    let closed = closed_port();
    let s3 = setup("http-refused", closed.port(), None).await;
    let (status, _, got) =
        http_exchange(s3.proxy, &format!("CONNECT {closed} HTTP/1.1\r\nHost: {closed}\r\n\r\n"), true).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&got));
    let get = format!("GET http://{closed}/ HTTP/1.1\r\nHost: {closed}\r\nConnection: close\r\n\r\n");
    let (status, _, _) = http_exchange(s3.proxy, &get, false).await;
    assert_eq!(status, 502);
}
