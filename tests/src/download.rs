//! A curl download through the proxy, watched as a person would: how long does the file stand
//! still (the longest stall), and does it end whole and identical?

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::proc::Proc;
use crate::{HTTP_PORT, Lab, SERVER, pattern};

/// A curl in the client namespace downloading the lab server's byte pattern through the proxy
/// at 127.0.0.1:1080 into a file.
pub struct Download {
    /// Where the body goes.
    pub out: PathBuf,
    /// The curl.
    pub curl: Proc,
    /// How many bytes it asks for.
    pub bytes: u64,
}

impl Download {
    /// Starts `curl -x socks5h://LABELS@127.0.0.1:1080 …/bytes/BYTES` with `extra` arguments,
    /// writing to `name` in the lab's folder; with `rate`, the server sends that many bytes
    /// per second, steadily (a rate-limited curl instead reads in bursts and pauses, which
    /// would look like stalls).
    pub fn start(
        lab: &Lab,
        name: &str,
        labels: &str,
        bytes: u64,
        rate: Option<u64>,
        extra: &[&str],
    ) -> Download {
        let out = lab.dir().join(name);
        let proxy = format!("socks5h://{labels}@127.0.0.1:1080");
        let query = rate.map_or(String::new(), |r| format!("?rate={r}"));
        let url = format!("http://{SERVER}:{HTTP_PORT}/bytes/{bytes}{query}");
        let mut args = vec!["-sS", "--max-time", "900", "-o", out.to_str().unwrap(), "-x", &proxy];
        args.extend_from_slice(extra);
        args.push(&url);
        let curl = lab.spawn(&lab.client(), "curl", &args);
        Download { out, curl, bytes }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.out).map_or(0, |m| m.len())
    }

    /// Waits until at least `bytes` are written; panics when curl ends first or `timeout` passes.
    pub fn wait_for(&self, bytes: u64, timeout: Duration) {
        let t0 = Instant::now();
        while self.size() < bytes {
            assert!(t0.elapsed() < timeout, "the download never reached {bytes} bytes");
            assert!(self.curl.exited().is_none(), "curl ended early: {}", self.curl.output());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Watches the file until `until` (or until curl ends) and returns the longest time it
    /// stood still, counted from the call: what a person would notice.
    pub fn longest_stall(&self, until: Instant) -> Duration {
        let (mut last, mut since, mut stall) = (self.size(), Instant::now(), Duration::ZERO);
        while Instant::now() < until && self.curl.exited().is_none() {
            std::thread::sleep(Duration::from_millis(5));
            let now = self.size();
            if now != last {
                stall = stall.max(since.elapsed());
                (last, since) = (now, Instant::now());
            }
        }
        if self.curl.exited().is_none() || self.size() < self.bytes {
            stall = stall.max(since.elapsed());
        }
        stall
    }

    /// Waits for curl to end and checks it succeeded with every byte identical.
    pub fn finish(&self, timeout: Duration) -> Result<(), String> {
        let status = self.curl.wait_exit(timeout).ok_or("curl did not finish")?;
        if !status.success() {
            return Err(format!("curl failed ({status}): {}", self.curl.output()));
        }
        let body = std::fs::read(&self.out).map_err(|e| e.to_string())?;
        if body.len() as u64 != self.bytes {
            return Err(format!("{} of {} bytes", body.len(), self.bytes));
        }
        if pattern::sha256_hex(&body) != pattern::pattern_sha256(self.bytes) {
            return Err("the body differs from what the server sent".into());
        }
        Ok(())
    }
}
