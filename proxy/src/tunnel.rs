//! A tunnel: what happens after the client has been told "connected" (SOCKS5 success, or
//! `200` to CONNECT), shared by both front ends.
//!
//! - Deferred: the client's bytes are held in a bounded buffer while the upstream waits for a
//!   network. Past the bound nothing more is read, so TCP back-pressure holds the client and
//!   nothing is dropped. When the network comes, every held byte is written in order first.
//!   Past the maximum wait the client is closed.
//! - Then the byte path runs until both directions end, one side fails, or the upstream's
//!   network goes down — then both sides are closed, so the client sees the end at once instead
//!   of hanging on a dead uplink.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytes::buf::BufMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::log::ConnLog;
use crate::splice::{self, Counts, Pace, TransferError};
use crate::upstream::{OpenState, UpstreamConn, UpstreamIo};

/// Runs a tunnel to its end; returns the outcome for the log line.
pub async fn run(
    mut client: TcpStream,
    read_ahead: &[u8],
    state: OpenState,
    max_held: usize,
    log: &mut ConnLog,
) -> String {
    let mut held = BytesMut::from(read_ahead);
    let conn = match state {
        OpenState::Ready(conn) => conn,
        OpenState::Deferred(deferred) => {
            log.deferred = Some(deferred.why().to_string());
            tracing::info!(
                target: "cmm_proxy::conn",
                id = log.id,
                dest = %log.dest,
                max_wait_s = deferred.max_wait().as_secs(),
                "deferred: {}",
                deferred.why()
            );
            let complete = deferred.complete();
            tokio::pin!(complete);
            let mut client_done = false;
            loop {
                let room = max_held.saturating_sub(held.len());
                let mut limited = (&mut held).limit(room);
                tokio::select! {
                    result = &mut complete => match result {
                        Ok(conn) => break conn,
                        Err(e) => {
                            log.up = held.len() as u64;
                            return format!("deferred, then failed: {e}");
                        }
                    },
                    read = client.read_buf(&mut limited), if !client_done && room > 0 => match read {
                        Ok(0) => client_done = true,
                        Ok(_) => {}
                        Err(e) => return format!("client failed while deferred: {e}"),
                    },
                }
            }
        }
    };
    log.network = Some(conn.network.clone().unwrap_or_else(|| "direct".into()));
    relay(client, held, conn, log).await
}

async fn relay(client: TcpStream, held: BytesMut, conn: UpstreamConn, log: &mut ConnLog) -> String {
    let UpstreamConn { io, lost, path, .. } = conn;
    let pace: Option<&dyn Pace> = path.as_deref().map(|p| p as &dyn Pace);
    let mut counts = Counts::default();
    let mut client = client;
    let result = match io {
        UpstreamIo::Tcp(mut upstream) => {
            if let Err(e) = splice::write_held(&mut upstream, &held).await {
                return format!("upstream failed: {e}");
            }
            counts.up = held.len() as u64;
            let mut last = (Instant::now(), cmm::net::tcp_stats(&upstream));
            let mut report = |upstream: &TcpStream| {
                if let (Some(p), Some(now)) = (&path, cmm::net::tcp_stats(upstream)) {
                    p.report(last.1.as_ref(), &now, last.0.elapsed());
                    last = (Instant::now(), Some(now));
                }
            };
            let transfer = splice::splice_bidirectional(&client, &upstream, &mut counts, pace);
            tokio::pin!(transfer, lost);
            let every = path.as_ref().map_or(Duration::from_secs(3600), |p| p.report_every());
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let r = loop {
                tokio::select! {
                    r = &mut transfer => break Ok(r),
                    why = &mut lost => break Err(why),
                    _ = tick.tick() => report(&upstream),
                }
            };
            report(&upstream);
            r
        }
        UpstreamIo::Stream(mut upstream) => {
            if let Err(e) = splice::write_held(&mut upstream, &held).await {
                return format!("upstream failed: {e}");
            }
            counts.up = held.len() as u64;
            let r = tokio::select! {
                r = splice::copy_bidirectional(&mut client, &mut upstream, &mut counts, pace) => Ok(r),
                why = lost => Err(why),
            };
            // The far end failed (reset, or a dial that failed after an early answer): the
            // client is reset too rather than told the stream ended well.
            if matches!(r, Ok(Err(TransferError::Upstream(_)))) {
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
            r
        }
    };
    log.up = counts.up;
    log.down = counts.down;
    match result {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(TransferError::Client(e))) => format!("client error: {e}"),
        Ok(Err(TransferError::Upstream(e))) => format!("upstream error: {e}"),
        Err(why) => why,
    }
}
