//! The SOCKS5 front end (RFC 1928, RFC 1929), on fast-socks5's server protocol.
//!
//! fast-socks5 negotiates the method and reads the request; this module supplies its own
//! username/password method, because fast-socks5's rejects an empty password before any check
//! runs and curl sends `socks5h://background@host` with exactly that. Replies are written here
//! with `write_all`. Only CONNECT is served; BIND and UDP ASSOCIATE get "command not
//! supported". Names are resolved by the proxy, so `socks5h://` works.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use cmm::{ErrorKind, Target};
use fast_socks5::server::{
    AuthMethod, AuthMethodSuccessState, NoAuthentication, NoAuthenticationImpl, Socks5ServerProtocol,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{Socks5Command, SocksError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{self, Identity};
use crate::log::ConnLog;
use crate::server::Context;
use crate::tunnel;
use crate::upstream::{OpenState, UpstreamRequest};

/// SOCKS5 reply codes (RFC 1928 §6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
}

/// The reply code for a failed connect. SOCKS5 has no "timed out" code; host unreachable is
/// what clients show sensibly.
pub fn reply_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Refused => reply::CONNECTION_REFUSED,
        ErrorKind::NetworkUnreachable => reply::NETWORK_UNREACHABLE,
        ErrorKind::HostUnreachable | ErrorKind::Timeout | ErrorKind::DeferTimeout => reply::HOST_UNREACHABLE,
        ErrorKind::Rejected => reply::NOT_ALLOWED,
        ErrorKind::Other => reply::GENERAL_FAILURE,
    }
}

/// Encodes a reply with the bound address.
pub fn encode_reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![5, code, 0];
    match bound.ip() {
        IpAddr::V4(v4) => {
            out.push(1);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(4);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// RFC 1929 username/password that, unlike fast-socks5's own, accepts empty fields: the
/// password is irrelevant when the username carries only labels.
#[derive(Clone, Copy)]
struct UserPass;

struct UserPassStarted<T>(T);
struct UserPassDone<T>(T);

impl<T> AuthMethodSuccessState<T> for UserPassDone<T> {
    fn into_inner(self) -> T {
        self.0
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> UserPassStarted<T> {
    /// Reads `VER ULEN UNAME PLEN PASSWD`; lengths are one byte, so nothing unbounded.
    async fn read(mut self) -> io::Result<(String, String, UserPassStarted<T>)> {
        let mut head = [0u8; 2];
        self.0.read_exact(&mut head).await?;
        if head[0] != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("auth version {} is not 1", head[0]),
            ));
        }
        let mut user = vec![0u8; head[1] as usize];
        self.0.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        self.0.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; plen[0] as usize];
        self.0.read_exact(&mut pass).await?;
        let text = |b: Vec<u8>| {
            String::from_utf8(b)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "username is not UTF-8"))
        };
        Ok((text(user)?, text(pass)?, self))
    }

    async fn finish(mut self, ok: bool) -> io::Result<UserPassDone<T>> {
        self.0.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        Ok(UserPassDone(self.0))
    }
}

#[derive(Clone, Copy)]
enum Method {
    None(NoAuthentication),
    UserPass(UserPass),
}

enum MethodStarted<T> {
    None(NoAuthenticationImpl<T>),
    UserPass(UserPassStarted<T>),
}

impl<T> AuthMethod<T> for Method {
    type StartingState = MethodStarted<T>;

    fn method_id(self) -> u8 {
        match self {
            Method::None(m) => AuthMethod::<T>::method_id(m),
            Method::UserPass(_) => 0x02,
        }
    }

    fn new(self, inner: T) -> MethodStarted<T> {
        match self {
            Method::None(m) => MethodStarted::None(m.new(inner)),
            Method::UserPass(_) => MethodStarted::UserPass(UserPassStarted(inner)),
        }
    }
}

/// Why a handshake ended without a tunnel.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("bad request: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("client gone during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("command {0} not supported (only CONNECT)")]
    Command(&'static str),
}

impl From<SocksError> for Refusal {
    fn from(e: SocksError) -> Self {
        Refusal::Protocol(e.to_string())
    }
}

impl From<fast_socks5::server::SocksServerError> for Refusal {
    fn from(e: fast_socks5::server::SocksServerError) -> Self {
        Refusal::Protocol(e.to_string())
    }
}

/// Reads the greeting, credentials and request. Returns who asked for what.
async fn handshake(stream: &mut TcpStream, ctx: &Context) -> Result<(Identity, TargetAddr), Refusal> {
    let methods: &[Method] = if ctx.config.auth_required() {
        &[Method::UserPass(UserPass)]
    } else {
        // Prefer username/password when the client offers it: the username carries labels.
        &[Method::UserPass(UserPass), Method::None(NoAuthentication)]
    };
    let started = Socks5ServerProtocol::start(&mut *stream).negotiate_auth(methods).await?;
    let (identity, proto) = match started {
        MethodStarted::None(s) => (auth::identify(&ctx.config, None)?, s.finish_auth()),
        MethodStarted::UserPass(s) => {
            let (user, pass, s) = s.read().await?;
            match auth::identify(&ctx.config, Some((&user, &pass))) {
                Ok(id) => (id, s.finish(true).await?.finish_auth()),
                Err(e) => {
                    let _ = s.finish(false).await;
                    return Err(e.into());
                }
            }
        }
    };
    // `_` releases the protocol's borrow of the stream at once: replies are written below.
    let (_, cmd, target) = proto.read_command().await?;
    match cmd {
        Socks5Command::TCPConnect => Ok((identity, target)),
        Socks5Command::TCPBind => {
            stream.write_all(&encode_reply(reply::COMMAND_NOT_SUPPORTED, UNSPECIFIED)).await?;
            Err(Refusal::Command("BIND"))
        }
        Socks5Command::UDPAssociate => {
            stream.write_all(&encode_reply(reply::COMMAND_NOT_SUPPORTED, UNSPECIFIED)).await?;
            Err(Refusal::Command("UDP ASSOCIATE"))
        }
    }
}

/// Serves one SOCKS5 client to the end, and logs it.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, ctx: &Context) {
    let mut log = ConnLog::new("socks5", peer);
    let outcome = serve_inner(&mut stream, ctx, &mut log).await;
    match outcome {
        Ok(tunnel) => {
            let outcome = tunnel::run(stream, &[], tunnel, ctx.config.defer.max_bytes, &mut log).await;
            log.finish(&outcome);
        }
        Err(outcome) => log.finish(&outcome),
    }
}

async fn serve_inner(stream: &mut TcpStream, ctx: &Context, log: &mut ConnLog) -> Result<OpenState, String> {
    let (identity, target) =
        match tokio::time::timeout(ctx.config.proxy.handshake_timeout, handshake(stream, ctx)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!("handshake not done within {:?}", ctx.config.proxy.handshake_timeout));
            }
        };
    let target = match target {
        TargetAddr::Ip(addr) => Target::ip(addr),
        TargetAddr::Domain(name, port) => Target::name(&name, port),
    };
    log.dest = target.to_string();
    log.user = identity.user.clone();
    let req = UpstreamRequest { target, user: identity.user, labels: identity.labels };
    match ctx.upstream.open(&req).await {
        Ok(opened) => {
            log.labels = Some((opened.labels, opened.source));
            let bound = match &opened.state {
                OpenState::Ready(conn) => conn.local.unwrap_or(UNSPECIFIED),
                OpenState::Deferred(_) => UNSPECIFIED,
            };
            if let Err(e) = stream.write_all(&encode_reply(reply::SUCCEEDED, bound)).await {
                return Err(format!("client gone before the reply: {e}"));
            }
            Ok(opened.state)
        }
        Err(e) => {
            log.labels = e.labels;
            let code = reply_code(e.error.kind());
            let _ = stream.write_all(&encode_reply(code, UNSPECIFIED)).await;
            Err(e.error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_encode_both_families() {
        assert_eq!(
            encode_reply(0, "10.1.0.2:4000".parse().unwrap()),
            vec![5, 0, 0, 1, 10, 1, 0, 2, 0x0f, 0xa0]
        );
        let v6 = encode_reply(5, "[fd01::2]:1".parse().unwrap());
        assert_eq!(v6.len(), 4 + 16 + 2);
        assert_eq!(v6[3], 4);
        assert_eq!(reply_code(ErrorKind::Timeout), reply::HOST_UNREACHABLE);
        assert_eq!(reply_code(ErrorKind::Rejected), reply::NOT_ALLOWED);
    }
}
