//! [`Proc`]: a child process whose output is captured line by line, killed when dropped.
//!
//! Output is read continuously by two threads, so a chatty child never blocks on a full pipe;
//! tests wait for a line (`ready`, `listening on`) and read the log afterwards. When a test
//! panics, the captured output is printed, which is usually the first thing needed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// A running child process with captured output.
pub struct Proc {
    inner: Arc<Inner>,
}

/// Shared state of a [`Proc`].
pub struct Inner {
    name: String,
    child: Mutex<Option<Child>>,
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl Inner {
    /// Kills the process (and waits for it), if it still runs.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Proc {
    /// Starts `cmd` with stdout and stderr captured.
    pub fn spawn(mut cmd: Command) -> Proc {
        let name = format!("{cmd:?}");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let inner = Arc::new(Inner {
            name,
            child: Mutex::new(Some(child)),
            lines: Mutex::new(Vec::new()),
            grew: Condvar::new(),
        });
        fn pump<R: std::io::Read + Send + 'static>(r: R, inner: Arc<Inner>) {
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    inner.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    inner.grew.notify_all();
                }
            });
        }
        if let Some(out) = stdout {
            pump(out, inner.clone());
        }
        if let Some(err) = stderr {
            pump(err, inner.clone());
        }
        Proc { inner }
    }

    pub(crate) fn weak(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    /// Waits until a captured line contains `pattern`, and returns that line. Panics after
    /// `timeout`, or if the process exits first, printing what it said.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_lines(pattern, 1, timeout).pop().unwrap_or_default()
    }

    /// Waits until `count` captured lines contain `pattern`; returns them.
    pub fn wait_for_lines(&self, pattern: &str, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let found: Vec<String> = lines.iter().filter(|l| l.contains(pattern)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "{}: no {count} line(s) with {pattern:?} after {timeout:?}; output:\n{}",
                    self.inner.name,
                    self.output()
                );
            }
            if let Some(status) = self.exited() {
                drop(lines);
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{} exited ({status}) before printing {pattern:?}; output:\n{}",
                    self.inner.name,
                    self.output()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            lines = self.inner.grew.wait_timeout(lines, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Everything captured so far.
    pub fn output(&self) -> String {
        self.inner.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// The exit status if the process has ended.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.inner.child.lock().unwrap_or_else(|e| e.into_inner());
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The process id (0 once it has been killed).
    pub fn pid(&self) -> u32 {
        self.inner.child.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, Child::id)
    }

    /// Sends a signal (e.g. SIGTERM) to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.pid();
        if pid != 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- output of {} ---\n{}\n---", self.inner.name, self.output());
        }
        self.inner.kill();
    }
}
