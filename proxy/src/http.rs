//! The HTTP front end: CONNECT tunnels (RFC 9110 §9.3.6) and forwarding of plain `http://`
//! absolute-URI requests, served with hyper.
//!
//! - CONNECT: when a network is available the upstream is connected first, so the answer is
//!   accurate (`200`, or `502`/`503`/`504` with a short reason). When the connection is
//!   deferred, `200` goes out at once and the tunnel holds the client's bytes until a network
//!   comes up. After the upgrade, the raw client socket is taken back from hyper, so the byte
//!   path is the same splice(2) loop as for SOCKS5.
//! - Forwarding: the request is rewritten to origin form, `Proxy-*` and hop-by-hop headers are
//!   dropped, and it is sent on an upstream connection that is kept for the next request to
//!   the same place (keep-alive on both sides). A deferred request waits, unread, until a
//!   network comes up or the wait ends (`504`).
//! - Labels come from the username of `Proxy-Authorization: Basic`, as for SOCKS5.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use base64::Engine;
use bytes::Bytes;
use cmm::{ErrorKind, Target};
use cmm_policy::Labels;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::auth::{self, AuthError, Identity};
use crate::log::ConnLog;
use crate::server::Context;
use crate::tunnel;
use crate::upstream::{OpenState, UpstreamConn, UpstreamIo, UpstreamRequest};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// An upstream HTTP connection kept for the next request of the same client connection.
struct Kept {
    key: (Target, Option<Labels>, Option<String>),
    sender: SendRequest<CountingBody<Incoming>>,
    network: String,
    labels: Option<(Labels, crate::upstream::LabelSource)>,
}

/// Serves one HTTP client connection to the end.
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let kept: Arc<Mutex<Option<Kept>>> = Arc::new(Mutex::new(None));
    let timeout = ctx.config.proxy.handshake_timeout;
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let kept = kept.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, ctx, kept).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .preserve_header_case(true)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        tracing::debug!(client = %peer, "http connection ended: {e}");
    }
}

fn text(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let mut r =
        Response::new(Full::new(Bytes::from(format!("cmm-proxy: {why}\n"))).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The HTTP status for a failed connect: 502 for an answer we could not get, 503 when the
/// policy allows no network, 504 when time ran out.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Timeout | ErrorKind::DeferTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Rejected => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Credentials from `Proxy-Authorization: Basic …`.
fn credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, String> {
    let Some(value) = headers.get(header::PROXY_AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| "Proxy-Authorization is not text")?;
    let (scheme, b64) = value.trim().split_once(' ').ok_or("Proxy-Authorization has no scheme")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(format!("Proxy-Authorization scheme {scheme} is not supported (use Basic)"));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "Proxy-Authorization is not valid base64")?;
    let raw = String::from_utf8(raw).map_err(|_| "Proxy-Authorization is not UTF-8")?;
    let (user, pass) = raw.split_once(':').unwrap_or((raw.as_str(), ""));
    Ok(Some((user.to_string(), pass.to_string())))
}

fn identify(req: &Request<Incoming>, ctx: &Context) -> Result<Identity, Box<Response<ProxyBody>>> {
    let creds = credentials(req.headers()).map_err(|e| Box::new(text(StatusCode::BAD_REQUEST, &e)))?;
    let creds = creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    auth::identify(&ctx.config, creds).map_err(|e| {
        Box::new(match e {
            AuthError::Missing | AuthError::BadPassword(_) => {
                let mut r = text(StatusCode::PROXY_AUTHENTICATION_REQUIRED, &e.to_string());
                let realm = HeaderValue::from_static("Basic realm=\"cmm-proxy\"");
                r.headers_mut().insert(header::PROXY_AUTHENTICATE, realm);
                r
            }
            other => text(StatusCode::BAD_REQUEST, &other.to_string()),
        })
    })
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    ctx: Arc<Context>,
    kept: Arc<Mutex<Option<Kept>>>,
) -> Response<ProxyBody> {
    let proto = if req.method() == Method::CONNECT { "http-connect" } else { "http" };
    let mut log = ConnLog::new(proto, peer);
    let identity = match identify(&req, &ctx) {
        Ok(id) => id,
        Err(response) => {
            log.finish(&format!("refused: {}", response.status()));
            return *response;
        }
    };
    log.user = identity.user.clone();
    if req.method() == Method::CONNECT {
        connect(req, identity, ctx, log).await
    } else {
        forward(req, identity, ctx, kept, log).await
    }
}

/// Opens the upstream; on failure logs the request and gives the error response.
async fn open(
    ctx: &Context,
    req: &UpstreamRequest,
    log: &mut ConnLog,
) -> Result<crate::upstream::Opened, Box<Response<ProxyBody>>> {
    ctx.upstream.open(req).await.map_err(|e| {
        log.labels = e.labels;
        let response = text(status_for(e.error.kind()), &e.error.to_string());
        log.finish(&e.error);
        Box::new(response)
    })
}

/// The target of a CONNECT request: `host:port` in the request target.
fn connect_target(uri: &Uri) -> Option<Target> {
    let authority = uri.authority()?;
    let port = authority.port_u16()?;
    Some(Target::name(authority.host(), port))
}

async fn connect(
    req: Request<Incoming>,
    identity: Identity,
    ctx: Arc<Context>,
    mut log: ConnLog,
) -> Response<ProxyBody> {
    let Some(target) = connect_target(req.uri()) else {
        log.finish(&"bad request: CONNECT needs host:port");
        return text(StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
    };
    log.dest = target.to_string();
    let up_req = UpstreamRequest { target, user: identity.user, labels: identity.labels };
    let opened = match open(&ctx, &up_req, &mut log).await {
        Ok(o) => o,
        Err(response) => return *response,
    };
    log.labels = Some((opened.labels, opened.source));
    let state = opened.state;
    let max_held = ctx.config.defer.max_bytes;
    let cancel = ctx.cancel.clone();
    ctx.tasks.spawn(async move {
        let upgraded = tokio::select! {
            u = hyper::upgrade::on(req) => u,
            _ = cancel.cancelled() => { log.finish(&"proxy shut down"); return; }
        };
        let outcome = match upgraded {
            Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let client = parts.io.into_inner();
                    tokio::select! {
                        o = tunnel::run(client, &parts.read_buf, state, max_held, &mut log) => o,
                        _ = cancel.cancelled() => "proxy shut down".to_string(),
                    }
                }
                Err(_) => "upgrade gave an unexpected stream".to_string(),
            },
            Err(e) => format!("upgrade failed: {e}"),
        };
        log.finish(&outcome);
    });
    let mut ok = Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
    *ok.status_mut() = StatusCode::OK;
    ok
}

/// Headers that concern one hop only (RFC 9110 §7.6.1), plus the proxy's own.
fn strip_hop_headers(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    headers.remove("keep-alive");
}

async fn forward(
    req: Request<Incoming>,
    identity: Identity,
    ctx: Arc<Context>,
    kept: Arc<Mutex<Option<Kept>>>,
    mut log: ConnLog,
) -> Response<ProxyBody> {
    let uri = req.uri().clone();
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            log.finish(&format!("bad request: scheme {other}"));
            return text(
                StatusCode::BAD_REQUEST,
                &format!("{other}:// is not forwarded: use CONNECT for TLS"),
            );
        }
        None => {
            log.finish(&"bad request: not a proxy request");
            return text(
                StatusCode::BAD_REQUEST,
                "this is a proxy: send absolute http:// URIs or CONNECT (set http_proxy / https_proxy)",
            );
        }
    }
    let Some(authority) = uri.authority().cloned() else {
        log.finish(&"bad request: no host");
        return text(StatusCode::BAD_REQUEST, "the URI has no host");
    };
    let target = Target::name(authority.host(), authority.port_u16().unwrap_or(80));
    log.dest = target.to_string();
    let key = (target.clone(), identity.labels, identity.user.clone());

    // Reuse the upstream connection of the previous request when it goes to the same place.
    let reuse = {
        let mut slot = kept.lock().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some(k) if k.key == key && !k.sender.is_closed() => Some(k),
            _ => None,
        }
    };
    let mut kept_conn = match reuse {
        Some(k) => k,
        None => match open_http_upstream(&ctx, key.clone(), &mut log).await {
            Ok(k) => k,
            Err(response) => return *response,
        },
    };
    log.network = Some(kept_conn.network.clone());
    log.labels = kept_conn.labels.clone();

    let (mut parts, body) = req.into_parts();
    strip_hop_headers(&mut parts.headers);
    parts.uri = match uri.path_and_query() {
        Some(pq) => pq.as_str().parse().unwrap_or_else(|_| Uri::from_static("/")),
        None => Uri::from_static("/"),
    };
    if !parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    let up_counter = Arc::new(AtomicU64::new(0));
    let body = CountingBody { inner: body, counter: up_counter.clone(), log: None };
    if kept_conn.sender.ready().await.is_err() {
        log.finish(&"upstream closed before the request");
        return text(StatusCode::BAD_GATEWAY, "the upstream connection closed");
    }
    let response = kept_conn.sender.send_request(Request::from_parts(parts, body)).await;
    match response {
        Ok(response) => {
            *kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept_conn);
            let (mut parts, body) = response.into_parts();
            strip_hop_headers(&mut parts.headers);
            let status = parts.status;
            let body = CountingBody {
                inner: body,
                counter: Arc::new(AtomicU64::new(0)),
                log: Some((log, up_counter, format!("status {}", status.as_u16()))),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            log.up = up_counter.load(Ordering::Relaxed);
            let why = format!("upstream failed: {e}");
            log.finish(&why);
            text(StatusCode::BAD_GATEWAY, &why)
        }
    }
}

/// Opens (or waits for) an upstream connection for a forwarded request, and starts its HTTP/1
/// client.
async fn open_http_upstream(
    ctx: &Context,
    key: (Target, Option<Labels>, Option<String>),
    log: &mut ConnLog,
) -> Result<Kept, Box<Response<ProxyBody>>> {
    let up_req = UpstreamRequest { target: key.0.clone(), user: key.2.clone(), labels: key.1 };
    let opened = open(ctx, &up_req, log).await?;
    log.labels = Some((opened.labels, opened.source.clone()));
    let conn: UpstreamConn = match opened.state {
        OpenState::Ready(c) => c,
        OpenState::Deferred(d) => {
            log.deferred = Some(d.why().to_string());
            tracing::info!(target: "cmm_proxy::conn", id = log.id, dest = %log.dest, "deferred: {}", d.why());
            match d.complete().await {
                Ok(c) => c,
                Err(e) => {
                    let response = text(status_for(e.kind()), &e.to_string());
                    log.finish(&format!("deferred, then failed: {e}"));
                    return Err(Box::new(response));
                }
            }
        }
    };
    let network = conn.network.clone().unwrap_or_else(|| "direct".into());
    let UpstreamConn { io, lost, .. } = conn;
    let handshake = match io {
        UpstreamIo::Tcp(s) => hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(true)
            .handshake(TokioIo::new(s))
            .await
            .map(|(sender, conn)| (sender, Box::pin(conn) as Pin<Box<dyn Future<Output = _> + Send>>)),
        UpstreamIo::Stream(s) => hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(s))
            .await
            .map(|(sender, conn)| (sender, Box::pin(conn) as Pin<Box<dyn Future<Output = _> + Send>>)),
    };
    let (sender, conn) = match handshake {
        Ok(x) => x,
        Err(e) => {
            let why = format!("upstream HTTP handshake failed: {e}");
            log.finish(&why);
            return Err(Box::new(text(StatusCode::BAD_GATEWAY, &why)));
        }
    };
    let cancel = ctx.cancel.clone();
    ctx.tasks.spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r { tracing::debug!("upstream http connection: {e}") },
            why = lost => tracing::info!(target: "cmm_proxy::conn", "closing upstream HTTP connection: {why}"),
            _ = cancel.cancelled() => {}
        }
    });
    Ok(Kept { key, sender, network, labels: Some((opened.labels, opened.source)) })
}

/// A body that counts its bytes; the response side also logs the request line when it ends.
struct CountingBody<B> {
    inner: B,
    counter: Arc<AtomicU64>,
    /// For the response body: the log record, the request body's counter, and the outcome.
    log: Option<(ConnLog, Arc<AtomicU64>, String)>,
}

impl<B> CountingBody<B> {
    fn finish(&mut self, outcome: Option<String>) {
        if let Some((mut log, up, status)) = self.log.take() {
            log.up = up.load(Ordering::Relaxed);
            log.down = self.counter.load(Ordering::Relaxed);
            log.finish(&outcome.unwrap_or(status));
        }
    }
}

impl<B> Drop for CountingBody<B> {
    fn drop(&mut self) {
        self.finish(Some("client went away before the response ended".into()));
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // hyper stops polling once the body says it has ended (Content-Length reached).
                if this.log.is_some() && this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(None) => {
                if this.log.is_some() {
                    this.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Some("upstream failed during the response".into())),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic eA=="));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn basic_credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(credentials(&h), Ok(None));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic YmFja2dyb3VuZDo="));
        assert_eq!(credentials(&h), Ok(Some(("background".into(), "".into()))));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(credentials(&h).unwrap_err().contains("Basic"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert!(credentials(&h).is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(status_for(ErrorKind::Refused), StatusCode::BAD_GATEWAY);
        assert_eq!(status_for(ErrorKind::DeferTimeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status_for(ErrorKind::Rejected), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(connect_target(&"server.lab:443".parse().unwrap()).unwrap().to_string(), "server.lab:443");
        assert!(connect_target(&"server.lab".parse().unwrap()).is_none());
    }
}
