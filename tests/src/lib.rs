//! The cmm lab: real network namespaces with two shaped uplinks, for end-to-end tests.
//!
//! ```text
//!   client ns                      router ns                     server ns
//!  ┌──────────────┐  wifi 50 Mbit ┌───────────┐                ┌────────────┐
//!  │ wifi0 10.1.0.2├──────────────┤wifi-r .1.1│                │            │
//!  │ cell0 10.2.0.2├──────────────┤cell-r .2.1├── srv-r ─ srv0 │ 10.3.0.2   │
//!  └──────────────┘  cell 2 Mbit  └───────────┘   10.3.0.1     └────────────┘
//! ```
//!
//! Each [`Lab`] makes its own three namespaces with unique names, so tests run in parallel, and
//! deletes them when dropped — also when the test panics. Uplinks are shaped with TBF in both
//! directions (this kernel has no netem). An uplink can be cut by taking it down at the client
//! ([`Cut::Admin`]), by taking the router's end down so the client loses carrier silently
//! ([`Cut::Carrier`]), or by black-holing it at the router with no link change at all
//! ([`Cut::Blackhole`]); [`Lab::restore`] brings it back with its routes and addresses.
//!
//! Lab tests need root and `ip`; [`Lab::new`] returns `None` (and the test prints why it is
//! skipped) when they are missing, except under CI (`CI=true`), where that is a failure.

pub mod delay;
pub mod download;
pub mod pattern;
pub mod proc;
pub mod relay;
pub mod socks;

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use proc::Proc;

/// One of the client's two uplinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uplink {
    /// Fast (50 Mbit/s), the preferred default route.
    Wifi,
    /// Slow (2 Mbit/s), the second default route.
    Cell,
}

impl Uplink {
    /// The client-side interface name.
    pub fn client_if(self) -> &'static str {
        match self {
            Uplink::Wifi => "wifi0",
            Uplink::Cell => "cell0",
        }
    }

    /// The router-side interface name.
    pub fn router_if(self) -> &'static str {
        match self {
            Uplink::Wifi => "wifi-r",
            Uplink::Cell => "cell-r",
        }
    }

    fn subnet(self) -> u8 {
        match self {
            Uplink::Wifi => 1,
            Uplink::Cell => 2,
        }
    }

    /// The client's IPv4 address on this uplink: what the server sees as source.
    pub fn client_addr(self) -> IpAddr {
        format!("10.{}.0.2", self.subnet()).parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// The client's IPv6 address on this uplink.
    pub fn client_addr6(self) -> IpAddr {
        format!("fd0{}::2", self.subnet()).parse().unwrap_or(IpAddr::from([0u16; 8]))
    }

    /// Shaped rate in Mbit/s.
    pub fn rate_mbit(self) -> u32 {
        match self {
            Uplink::Wifi => 50,
            Uplink::Cell => 2,
        }
    }

    fn metric(self) -> u32 {
        match self {
            Uplink::Wifi => 100,
            Uplink::Cell => 200,
        }
    }
}

/// How an uplink is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// `ip link set wifi0 down` at the client: the kernel deletes its default routes.
    Admin,
    /// The router's end goes down: the client loses carrier, its routes stay.
    Carrier,
    /// The router drops everything to and from the uplink; no link state changes at all.
    Blackhole,
}

/// The server's IPv4 address.
pub const SERVER: &str = "10.3.0.2";
/// The server's IPv6 address.
pub const SERVER6: &str = "fd03::2";
/// The server's name in the client's /etc/hosts (both families).
pub const SERVER_NAME: &str = "server.lab";
/// HTTP test server port (`/bytes/N`, `/ip`, `/echo`, `/sink`).
pub const HTTP_PORT: u16 = 8080;
/// TCP echo port.
pub const ECHO_PORT: u16 = 7007;
/// TCP sink port: reads to end of stream, then answers `<bytes> <sha256>\n` and closes.
pub const SINK_PORT: u16 = 9000;

/// The lab's uplinks as `[[network]]` tables: bandwidths as shaped, the RTTs given, `extra`
/// lines in both tables and `cell_extra` in cellular's.
pub fn networks(wifi_rtt: &str, cell_rtt: &str, extra: &str, cell_extra: &str) -> String {
    format!(
        r#"
[[network]]
name = "wifi"
interface = "wifi0"
kind = "wifi"
bandwidth_down = "50mbit"
bandwidth_up = "50mbit"
rtt = "{wifi_rtt}"
{extra}
[[network]]
name = "cell"
interface = "cell0"
kind = "cellular"
bandwidth_down = "2mbit"
bandwidth_up = "2mbit"
rtt = "{cell_rtt}"
{extra}{cell_extra}"#
    )
}

/// A config of `settings` (top-level keys first, then tables) and the lab's two uplinks: Wi-Fi
/// fast but far (a busy hotspot, 80 ms), cellular slow but near (30 ms), and metered (its
/// kind's default). So ONDEMAND (lowest RTT) takes cell and BACKGROUND (highest bandwidth)
/// takes Wi-Fi. The lab's veths have no delay, so measured RTTs would be near zero on both: the
/// declared figures stand (`use_estimates = false`).
pub fn config(settings: &str) -> String {
    format!("{settings}\n{}", networks("80ms", "30ms", "use_estimates = false\n", ""))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A three-namespace lab, removed on drop.
pub struct Lab {
    id: String,
    dir: PathBuf,
    procs: std::sync::Mutex<Vec<std::sync::Weak<proc::Inner>>>,
    /// The delay lines, when [`Lab::add_delay`] added them.
    delay: std::sync::Mutex<Option<Proc>>,
}

/// Why lab tests cannot run here, or `None` when they can.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("lab tests need root (network namespaces)".into());
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Some("lab tests need `ip` (iproute2)".into()),
    }
    if Command::new("tc").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Some("lab tests need `tc` (iproute2)".into());
    }
    None
}

/// Whether this is a CI run, where lab tests must run.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

impl Lab {
    /// Builds a lab, or returns `None` after printing why lab tests are skipped here. Under CI,
    /// a missing prerequisite is a panic instead.
    pub fn new(test: &str) -> Option<Lab> {
        if let Some(why) = unavailable() {
            if under_ci() {
                panic!("{test}: {why}, and CI=true requires lab tests to run");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        remove_stale_labs();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("cmm{}x{}", std::process::id(), n);
        let dir = std::env::temp_dir().join(format!("{id}-lab"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let lab =
            Lab { id, dir, procs: std::sync::Mutex::new(Vec::new()), delay: std::sync::Mutex::new(None) };
        lab.build();
        Some(lab)
    }

    /// The client namespace (two uplinks; where the proxy and curl run).
    pub fn client(&self) -> String {
        format!("{}c", self.id)
    }

    /// The router namespace.
    pub fn router(&self) -> String {
        format!("{}r", self.id)
    }

    /// The server namespace.
    pub fn server(&self) -> String {
        format!("{}s", self.id)
    }

    /// A scratch directory for this lab's files (configs, outputs), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn build(&self) {
        let (c, r, s) = (self.client(), self.router(), self.server());
        for ns in [&c, &r, &s] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Name resolution inside the client namespace: `ip netns exec` binds these over /etc.
        let etc = Path::new("/etc/netns").join(&c);
        fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("cannot create {}: {e}", etc.display()));
        let hosts = format!(
            "127.0.0.1 localhost\n::1 localhost\n{SERVER} {SERVER_NAME} server4.lab\n{SERVER6} {SERVER_NAME} server6.lab\n"
        );
        write(&etc.join("hosts"), &hosts);
        write(&etc.join("resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n");

        for up in [Uplink::Wifi, Uplink::Cell] {
            ip(&[
                "link",
                "add",
                up.client_if(),
                "netns",
                &c,
                "type",
                "veth",
                "peer",
                "name",
                up.router_if(),
                "netns",
                &r,
            ]);
        }
        ip(&["link", "add", "srv-r", "netns", &r, "type", "veth", "peer", "name", "srv0", "netns", &s]);
        sh(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(&r, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        for up in [Uplink::Wifi, Uplink::Cell] {
            self.address_uplink(up);
            ip(&["-n", &c, "link", "set", up.client_if(), "up"]);
            ip(&["-n", &r, "link", "set", up.router_if(), "up"]);
            self.route_uplink(up);
            // TBF both ways: upload at the client, download at the router.
            self.shape(&c, up.client_if(), up.rate_mbit());
            self.shape(&r, up.router_if(), up.rate_mbit());
        }
        ip(&["-n", &r, "addr", "add", "10.3.0.1/24", "dev", "srv-r"]);
        ip(&["-n", &r, "addr", "add", "fd03::1/64", "dev", "srv-r", "nodad"]);
        ip(&["-n", &s, "addr", "add", "10.3.0.2/24", "dev", "srv0"]);
        ip(&["-n", &s, "addr", "add", "fd03::2/64", "dev", "srv0", "nodad"]);
        ip(&["-n", &r, "link", "set", "srv-r", "up"]);
        ip(&["-n", &s, "link", "set", "srv0", "up"]);
        ip(&["-n", &s, "route", "add", "default", "via", "10.3.0.1"]);
        ip(&["-n", &s, "-6", "route", "add", "default", "via", "fd03::1"]);
    }

    fn shape(&self, ns: &str, dev: &str, mbit: u32) {
        // burst: at least a few full-size packets at this rate; latency bounds the queue.
        let burst = if mbit >= 10 { "64kb" } else { "16kb" };
        let rate = format!("{mbit}mbit");
        sh(
            ns,
            &[
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", burst,
                "latency", "100ms",
            ],
        );
    }

    fn address_uplink(&self, up: Uplink) {
        let (c, r) = (self.client(), self.router());
        let n = up.subnet();
        ip(&["-n", &c, "addr", "replace", &format!("10.{n}.0.2/24"), "dev", up.client_if()]);
        ip(&["-n", &c, "addr", "replace", &format!("fd0{n}::2/64"), "dev", up.client_if(), "nodad"]);
        ip(&["-n", &r, "addr", "replace", &format!("10.{n}.0.1/24"), "dev", up.router_if()]);
        ip(&["-n", &r, "addr", "replace", &format!("fd0{n}::1/64"), "dev", up.router_if(), "nodad"]);
    }

    fn route_uplink(&self, up: Uplink) {
        let c = self.client();
        let n = up.subnet();
        let metric = up.metric().to_string();
        let gw4 = format!("10.{n}.0.1");
        let gw6 = format!("fd0{n}::1");
        ip(&["-n", &c, "route", "replace", "default", "via", &gw4, "dev", up.client_if(), "metric", &metric]);
        ip(&[
            "-n",
            &c,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            &gw6,
            "dev",
            up.client_if(),
            "metric",
            &metric,
        ]);
    }

    /// Adds a one-way delay to each uplink, both ways (so Wi-Fi's round trip gains twice
    /// `wifi`): a user-space delay line (`lab-delay`) on a TUN device in the router, which the
    /// router's policy routing sends each uplink's traffic through. Blackhole cuts still win.
    pub fn add_delay(&self, wifi: Duration, cell: Duration) {
        let r = self.router();
        let spec = |dev: &str, d: Duration| format!("{dev}={}ms", d.as_millis());
        let p = self.spawn(
            &r,
            lab_delay_bin(),
            &["--tun", &spec("dl-wifi", wifi), "--tun", &spec("dl-cell", cell)],
        );
        p.wait_for_line("ready", Duration::from_secs(20));
        for key in ["all", "default"] {
            sh(&r, &["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")]);
        }
        for (up, dev, table) in [(Uplink::Wifi, "dl-wifi", "101"), (Uplink::Cell, "dl-cell", "102")] {
            sh(&r, &["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.rp_filter=0")]);
            let n = up.subnet();
            for (family, client_net) in [("-4", format!("10.{n}.0.0/24")), ("-6", format!("fd0{n}::/64"))] {
                ip(&["-n", &r, family, "route", "replace", "default", "dev", dev, "table", table]);
                // Into the line: what the client sends up this uplink, and what the server
                // sends to the client's address on it. Out of the line (iif dev), the main
                // table forwards as before.
                ip(&[
                    "-n",
                    &r,
                    family,
                    "rule",
                    "add",
                    "iif",
                    up.router_if(),
                    "lookup",
                    table,
                    "priority",
                    "100",
                ]);
                ip(&[
                    "-n",
                    &r,
                    family,
                    "rule",
                    "add",
                    "iif",
                    "srv-r",
                    "to",
                    &client_net,
                    "lookup",
                    table,
                    "priority",
                    "100",
                ]);
            }
        }
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// Cuts an uplink.
    pub fn cut(&self, up: Uplink, how: Cut) {
        match how {
            Cut::Admin => ip(&["-n", &self.client(), "link", "set", up.client_if(), "down"]),
            Cut::Carrier => ip(&["-n", &self.router(), "link", "set", up.router_if(), "down"]),
            Cut::Blackhole => {
                let r = self.router();
                let n = up.subnet();
                // Downstream: nothing reaches the client. Upstream: nothing from it is forwarded.
                ip(&["-n", &r, "route", "replace", "blackhole", &format!("10.{n}.0.2/32")]);
                ip(&["-n", &r, "-6", "route", "replace", "blackhole", &format!("fd0{n}::2/128")]);
                ip(&["-n", &r, "rule", "add", "iif", up.router_if(), "priority", "10", "blackhole"]);
                ip(&["-n", &r, "-6", "rule", "add", "iif", up.router_if(), "priority", "10", "blackhole"]);
            }
        }
    }

    /// Restores an uplink cut with `how`: link up, addresses and default routes back.
    pub fn restore(&self, up: Uplink, how: Cut) {
        match how {
            Cut::Admin => {
                ip(&["-n", &self.client(), "link", "set", up.client_if(), "up"]);
                self.address_uplink(up);
                self.route_uplink(up);
            }
            Cut::Carrier => {
                ip(&["-n", &self.router(), "link", "set", up.router_if(), "up"]);
                self.address_uplink(up);
            }
            Cut::Blackhole => {
                let r = self.router();
                let n = up.subnet();
                ip(&["-n", &r, "route", "del", "blackhole", &format!("10.{n}.0.2/32")]);
                ip(&["-n", &r, "-6", "route", "del", "blackhole", &format!("fd0{n}::2/128")]);
                ip(&["-n", &r, "rule", "del", "iif", up.router_if(), "priority", "10"]);
                ip(&["-n", &r, "-6", "rule", "del", "iif", up.router_if(), "priority", "10"]);
            }
        }
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Runs `program args…` in `ns` to completion and returns its output.
    pub fn run(&self, ns: &str, program: &str, args: &[&str]) -> std::process::Output {
        self.command(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {ns}: {e}"))
    }

    /// Starts a long-running program in `ns` with its output captured; it is killed when the
    /// returned [`Proc`] or the lab is dropped.
    pub fn spawn(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Proc {
        let mut cmd = self.command(ns, program);
        cmd.args(args);
        self.spawn_command(cmd)
    }

    /// Starts `cmd` (made with [`Lab::command`], so it runs in a namespace) like
    /// [`Lab::spawn`]: output captured, killed when the lab goes.
    pub fn spawn_command(&self, cmd: Command) -> Proc {
        let p = Proc::spawn(cmd);
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).push(p.weak());
        p
    }

    /// Starts the test servers (HTTP, echo, sink) in the server namespace.
    pub fn start_servers(&self) -> Proc {
        let bin = lab_server_bin();
        let p = self.spawn(
            &self.server(),
            bin,
            &["--http", "[::]:8080", "--echo", "[::]:7007", "--sink", "[::]:9000"],
        );
        p.wait_for_line("ready", Duration::from_secs(20));
        p
    }

    /// Runs `f` on a new thread whose network namespace is `ns`; threads it spawns (a tokio
    /// runtime's workers) are in `ns` too.
    pub fn in_namespace<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = PathBuf::from("/run/netns").join(ns);
        std::thread::spawn(move || {
            let file =
                fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
    }

    /// Writes a file in the lab's directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        write(&path, contents);
        path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.procs.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            if let Some(p) = p.upgrade() {
                p.kill();
            }
        }
        for ns in [self.client(), self.router(), self.server()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(self.client()));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Deletes labs left by test processes that no longer exist (killed before they could clean up).
fn remove_stale_labs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/run/netns") else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix("cmm") else { continue };
            let Some((pid, _)) = rest.split_once('x') else { continue };
            let Ok(pid) = pid.parse::<u32>() else { continue };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&name));
            }
        }
    });
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs `ip args…` and panics with its error output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    if !out.status.success() {
        panic!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
}

/// Runs a command inside `ns` and panics if it fails.
pub fn sh(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    if !out.status.success() {
        panic!("{} (in {ns}) failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
}

/// The lab-delay binary of this package.
pub fn lab_delay_bin() -> PathBuf {
    workspace_bin("lab-delay")
}

/// The lab-server binary of this package.
pub fn lab_server_bin() -> PathBuf {
    workspace_bin("lab-server")
}

/// A binary of the workspace (`cmm-proxy`, `cmm-scout`, `lab-server`), built on first use with
/// the same cargo and profile as the running test, so tests always run the current code. The
/// libraries are built too, `libcmm.so` and `libcmm.a` included (`--bins` alone skips them).
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = built_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// An example program of the workspace (`label_client`), built like [`workspace_bin`].
pub fn workspace_example(name: &str) -> PathBuf {
    let path = built_dir().join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The build's profile directory (`target/debug`), where `libcmm.so`, `libcmm.a` and
/// `libcmm.pc` are, after building the workspace like [`workspace_bin`].
pub fn profile_dir() -> &'static Path {
    built_dir()
}

fn built_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build_workspace_bins).as_ref().unwrap_or_else(|e| panic!("{e}"))
}

fn build_workspace_bins() -> Result<PathBuf, String> {
    // A test or bench is target/<profile>/deps/<name>-<hash>; a binary (the evaluation
    // harness) is target/<profile>/<name>.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut profile_dir = exe.parent().ok_or("unexpected binary location")?.to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps" || n == "examples") {
        profile_dir = profile_dir.parent().ok_or("unexpected binary location")?.to_path_buf();
    }
    let target_dir = profile_dir.parent().ok_or("unexpected test binary location")?;
    let profile = profile_dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--lib", "--bins", "--examples", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--workspace");
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the workspace binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(profile_dir)
}
