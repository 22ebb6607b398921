//! `lab-server`: the test servers of the lab, in one process.
//!
//! - HTTP: `GET /bytes/N` sends N bytes of the lab pattern (`?rate=B` paces them at B bytes
//!   per second, never faster to catch up: a steady source); `GET /ip` answers the caller's
//!   source address; `POST /echo` sends the body back; `POST /sink` answers
//!   `<bytes> <sha256>` of the body; `GET /delay/MS` answers after MS milliseconds.
//! - TCP echo: sends back what it receives, half-closes when the client does.
//! - TCP sink: reads to end of stream, then answers `<bytes> <sha256>\n` and closes.
//! - With `--static DIR`, any other `GET /PATH` serves `DIR/PATH` (a git repository for the
//!   dumb HTTP protocol, a pip index).
//!
//! Prints `ready` on stdout once every listener is bound.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use cmm_lab::pattern;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// HTTP listen address.
    #[arg(long)]
    http: Vec<SocketAddr>,
    /// TCP echo listen address.
    #[arg(long)]
    echo: Vec<SocketAddr>,
    /// TCP sink listen address.
    #[arg(long)]
    sink: Vec<SocketAddr>,
    /// Serve files from this directory for other GET paths.
    #[arg(long = "static")]
    static_dir: Option<std::path::PathBuf>,
    /// Listen with MPTCP sockets (plain TCP clients are still served).
    #[arg(long)]
    mptcp: bool,
}

static STATIC_DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

type Body = BoxBody<Bytes, hyper::Error>;

/// IPPROTO_MPTCP.
const MPTCP: i32 = 262;

fn listen(addr: SocketAddr, mptcp: bool) -> TcpListener {
    let protocol = mptcp.then(|| socket2::Protocol::from(MPTCP));
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, protocol)
        .expect("socket");
    if addr.is_ipv6() {
        socket.set_only_v6(false).expect("dual stack");
    }
    socket.set_reuse_address(true).expect("reuseaddr");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(1024).expect("listen");
    TcpListener::from_std(socket.into()).expect("tokio listener")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = STATIC_DIR.set(args.static_dir.clone());
    let mut tasks = Vec::new();
    for addr in args.http {
        let l = listen(addr, args.mptcp);
        tasks.push(tokio::spawn(serve(l, |s, peer| Box::pin(http(s, peer)))));
    }
    for addr in args.echo {
        let l = listen(addr, args.mptcp);
        tasks.push(tokio::spawn(serve(l, |s, _| Box::pin(echo(s)))));
    }
    for addr in args.sink {
        let l = listen(addr, args.mptcp);
        tasks.push(tokio::spawn(serve(l, |s, _| Box::pin(sink(s)))));
    }
    println!("ready");
    for t in tasks {
        let _ = t.await;
    }
}

type Handler = fn(TcpStream, SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                tokio::spawn(handler(s, peer));
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn sink(mut s: TcpStream) {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(_) => return,
        }
    }
    let line = format!("{n} {}\n", pattern::hex(&h.finalize()));
    let _ = s.write_all(line.as_bytes()).await;
    let _ = s.shutdown().await;
}

async fn http(s: TcpStream, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |req| route(req, peer));
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), service).await;
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

fn canonical_ip(peer: SocketAddr) -> String {
    match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    }
}

async fn route(req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match (req.method(), path.split('/').collect::<Vec<_>>().as_slice()) {
        (&Method::GET, ["", "ip"]) => text(StatusCode::OK, format!("{}\n", canonical_ip(peer))),
        (&Method::GET, ["", "bytes", n]) => match n.parse::<u64>() {
            Ok(len) => pattern_response(len, query_rate(req.uri().query())),
            Err(_) => text(StatusCode::BAD_REQUEST, "bad length\n".into()),
        },
        (&Method::GET, ["", "delay", ms]) => match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, "done\n".into())
            }
            Err(_) => text(StatusCode::BAD_REQUEST, "bad delay\n".into()),
        },
        (&Method::POST, ["", "echo"]) => Response::new(req.into_body().boxed()),
        (&Method::POST, ["", "sink"]) => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            h.update(d);
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body error\n".into())),
                }
            }
            text(StatusCode::OK, format!("{n} {}\n", pattern::hex(&h.finalize())))
        }
        (&Method::GET, _) => static_file(&path).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Ok(response)
}

async fn static_file(path: &str) -> Response<Body> {
    let Some(Some(dir)) = STATIC_DIR.get() else { return text(StatusCode::NOT_FOUND, "not found\n".into()) };
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|part| part == "..") {
        return text(StatusCode::FORBIDDEN, "no\n".into());
    }
    let mut file = dir.join(rel);
    if file.is_dir() {
        file = file.join("index.html");
    }
    match tokio::fs::read(&file).await {
        Ok(data) => {
            let mut r = Response::new(Full::new(Bytes::from(data)).map_err(|never| match never {}).boxed());
            if file.extension().is_some_and(|e| e == "html") {
                r.headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, "text/html".parse().expect("static header"));
            }
            r
        }
        Err(_) => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// `rate=B` from a query string.
fn query_rate(query: Option<&str>) -> Option<u64> {
    query?.split('&').find_map(|kv| kv.strip_prefix("rate=")).and_then(|v| v.parse().ok()).filter(|&r| r > 0)
}

fn pattern_response(len: u64, rate: Option<u64>) -> Response<Body> {
    let chunk: u64 = if rate.is_some() { 16 * 1024 } else { 64 * 1024 };
    let start = tokio::time::Instant::now();
    let stream = futures::stream::unfold((0u64, start), move |(pos, next)| async move {
        if pos >= len {
            return None;
        }
        let mut next = next;
        if let Some(rate) = rate {
            tokio::time::sleep_until(next).await;
            // The next piece is due one piece's time after this one went out (or was due).
            next = next.max(tokio::time::Instant::now() - Duration::from_millis(5))
                + Duration::from_secs_f64(chunk as f64 / rate as f64);
        }
        let n = (len - pos).min(chunk) as usize;
        let mut buf = vec![0u8; n];
        pattern::fill(&mut buf, pos);
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(buf))), (pos + n as u64, next)))
    });
    let mut r = Response::new(StreamBody::new(stream).map_err(|never| match never {}).boxed());
    r.headers_mut().insert(hyper::header::CONTENT_LENGTH, len.into());
    r
}
