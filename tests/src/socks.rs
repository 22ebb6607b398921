//! A minimal blocking SOCKS5 client for tests that need more than curl: raw CONNECT with a
//! chosen username, BIND, half-closed uploads.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// SOCKS5 commands.
pub const CONNECT: u8 = 1;
/// SOCKS5 BIND.
pub const BIND: u8 = 2;

/// Connects through a SOCKS5 proxy at `proxy` to `host:port` with command `cmd`, offering
/// username/password auth when `user` is given. Returns the stream, or the reply code.
pub fn request(
    proxy: SocketAddr,
    user: Option<&str>,
    cmd: u8,
    host: &str,
    port: u16,
) -> io::Result<Result<TcpStream, u8>> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    match user {
        Some(_) => s.write_all(&[5, 1, 2])?,
        None => s.write_all(&[5, 1, 0])?,
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    if m[1] == 0xff {
        return Ok(Err(0xff));
    }
    if let Some(u) = user {
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(0); // empty password, as curl sends
        s.write_all(&a)?;
        let mut r = [0u8; 2];
        s.read_exact(&mut r)?;
        if r[1] != 0 {
            return Ok(Err(0xff));
        }
    }
    let mut req = vec![5, cmd, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            l[0] as usize + 2
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad ATYP {other}"))),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip)?;
    if head[1] != 0 {
        return Ok(Err(head[1]));
    }
    Ok(Ok(s))
}
