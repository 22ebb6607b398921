//! cmm-proxy end to end, in the lab, with curl as the client.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::Output;
use std::time::{Duration, Instant};

use cmm_lab::{Cut, HTTP_PORT, Lab, Proc, SERVER, SINK_PORT, Uplink, pattern, socks, workspace_bin};

/// The lab's proxy config: Wi-Fi is fast but far (a busy hotspot), cellular is slow but close
/// and metered. So ONDEMAND (lowest RTT) takes cell, BACKGROUND (highest bandwidth) takes wifi,
/// and background traffic never uses the metered network: with wifi down it waits.
const SETTINGS: &str = r#"
default_labels = "ondemand"

[proxy]
listen = ["127.0.0.1:1080"]
connect_timeout = "3s"
shutdown_grace = "20s"

[defer]
max_bytes = "64KiB"
max_wait = "60s"

[label.background]
metered = false

[label.small]
networks = ["cell"]
on_no_match = "reject"

[[rule]]
port = 9000
labels = "background"
"#;

/// [`SETTINGS`] and the lab's networks.
fn config() -> String {
    cmm_lab::config(SETTINGS)
}

struct ProxyLab {
    lab: Lab,
    _servers: Proc,
    proxy: Proc,
}

fn start(test: &str, config: &str) -> Option<ProxyLab> {
    let lab = Lab::new(test)?;
    let servers = lab.start_servers();
    let path = lab.write_file("proxy.toml", config);
    let bin = workspace_bin("cmm-proxy");
    let proxy = lab.spawn(&lab.client(), &bin, &["--config", path.to_str().unwrap()]);
    proxy.wait_for_line("listening on ", Duration::from_secs(20));
    Some(ProxyLab { lab, _servers: servers, proxy })
}

impl ProxyLab {
    fn curl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-sS", "--max-time", "90"];
        all.extend_from_slice(args);
        self.lab.run(&self.lab.client(), "curl", &all)
    }

    /// curl that must succeed; returns its stdout.
    fn curl_ok(&self, args: &[&str]) -> String {
        let out = self.curl(args);
        assert!(
            out.status.success(),
            "curl {args:?} failed: {}\nproxy log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proxy.output()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `f` on a thread inside the client namespace.
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.lab.in_namespace(&self.lab.client(), f).join().expect("client thread")
    }
}

const PROXY: &str = "127.0.0.1:1080";

/// Through the proxy (SOCKS5, from inside the client namespace): sends `data`, half-closes,
/// and returns everything the server answers until it closes.
fn upload(user: Option<&str>, host: &str, port: u16, data: &[u8]) -> String {
    let mut s =
        socks::request(PROXY.parse().unwrap(), user, socks::CONNECT, host, port).unwrap().expect("connect");
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn url(path: &str) -> String {
    format!("http://server4.lab:{HTTP_PORT}{path}")
}

#[test]
fn labels_from_the_username_choose_the_uplink() {
    let Some(p) = start("labels_from_the_username_choose_the_uplink", &config()) else { return };
    let via = |user: &str| p.curl_ok(&["-x", &format!("socks5h://{user}@{PROXY}"), &url("/ip")]);
    // ONDEMAND: lowest RTT (cell); BACKGROUND: highest bandwidth (wifi).
    assert_eq!(via("ondemand"), "10.2.0.2");
    assert_eq!(via("background"), "10.1.0.2");
    assert_eq!(via("background+large"), "10.1.0.2");
    assert_eq!(via("ondemand+small"), "10.2.0.2");
    assert_eq!(via("wifi-only"), "10.1.0.2");
    // No username: the default labels (ondemand).
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://{PROXY}"), &url("/ip")]), "10.2.0.2");
    // HTTP proxy, username in Proxy-Authorization, both CONNECT and forwarding.
    assert_eq!(p.curl_ok(&["-x", &format!("http://background@{PROXY}"), &url("/ip")]), "10.1.0.2");
    assert_eq!(p.curl_ok(&["-p", "-x", &format!("http://background@{PROXY}"), &url("/ip")]), "10.1.0.2");
    assert_eq!(p.curl_ok(&["-x", &format!("http://ondemand@{PROXY}"), &url("/ip")]), "10.2.0.2");

    // The log line says who, where, which labels from where, which network and the outcome.
    let line = p.proxy.wait_for_line("labels=background+large", Duration::from_secs(5));
    for field in [
        "proto=socks5",
        "dest=server4.lab:8080",
        "labels_from=username",
        "network=wifi0",
        "outcome=ok",
        "down=",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[test]
fn labels_from_rules_and_ipv6() {
    let Some(p) = start("labels_from_rules_and_ipv6", &config()) else { return };
    // Port 9000 is labelled background by a rule: it goes over wifi, and the rule is named.
    let answer = p.in_client(|| upload(None, SERVER, SINK_PORT, b"hello"));
    assert!(answer.starts_with("5 "), "{answer}");
    let line = p.proxy.wait_for_line("dest=10.3.0.2:9000", Duration::from_secs(5));
    assert!(line.contains("labels=background") && line.contains("labels_from=rule@"), "{line}");
    assert!(line.contains("network=wifi0"), "{line}");

    // IPv6 destinations, as a literal and by name (server6.lab has only the v6 address).
    let v6 = format!("http://[fd03::2]:{HTTP_PORT}/ip");
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://background@{PROXY}"), &v6]), "fd01::2");
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://ondemand@{PROXY}"), &v6]), "fd02::2");
    let by_name = format!("http://server6.lab:{HTTP_PORT}/ip");
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://background@{PROXY}"), &by_name]), "fd01::2");
}

#[test]
fn a_half_closed_upload_gets_its_whole_response() {
    let Some(p) = start("a_half_closed_upload_gets_its_whole_response", &config()) else { return };
    let data = pattern::bytes(3_000_000);
    let expected = format!("{} {}", data.len(), pattern::sha256_hex(&data));
    let answer = p.in_client(move || {
        let mut s =
            socks::request(PROXY.parse().unwrap(), Some("background"), socks::CONNECT, SERVER, SINK_PORT)
                .unwrap()
                .expect("connect");
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap(); // SHUT_WR: the response still has to arrive
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert_eq!(answer.trim(), expected);

    // The upstream's half-close reaches the client too: the echo server ends its side after
    // ours, and everything it sent arrives first.
    let echoed = p.in_client(|| {
        let mut s =
            socks::request(PROXY.parse().unwrap(), Some("background"), socks::CONNECT, "server.lab", 7007)
                .unwrap()
                .expect("connect");
        s.write_all(b"ping").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    });
    assert_eq!(echoed, b"ping");
}

#[test]
fn deferred_download_completes_when_its_network_returns() {
    let Some(p) = start("deferred_download_completes_when_its_network_returns", &config()) else { return };
    for (i, how) in [Cut::Admin, Cut::Carrier].into_iter().enumerate() {
        p.lab.cut(Uplink::Wifi, how);
        let out = p.lab.dir().join(format!("body{i}"));
        let out_s = out.to_str().unwrap().to_string();
        let bytes = 3_000_000u64;
        let curl = p.lab.spawn(
            &p.lab.client(),
            "curl",
            &[
                "-sS",
                "--max-time",
                "90",
                "-o",
                &out_s,
                "-x",
                &format!("socks5h://background@{PROXY}"),
                &url(&format!("/bytes/{bytes}")),
            ],
        );
        // Background may not use the metered cell: the proxy defers and says why.
        let line = p.proxy.wait_for_lines("deferred:", i + 1, Duration::from_secs(10)).pop().unwrap();
        assert!(line.contains("metered"), "{line}");
        std::thread::sleep(Duration::from_secs(2));
        assert!(curl.exited().is_none(), "curl should still be waiting");
        p.lab.restore(Uplink::Wifi, how);
        let status = curl.wait_exit(Duration::from_secs(60)).expect("curl finished");
        assert!(status.success(), "{how:?}: curl failed: {}\n{}", curl.output(), p.proxy.output());
        let body = std::fs::read(&out).unwrap();
        assert_eq!(body.len() as u64, bytes);
        assert_eq!(pattern::sha256_hex(&body), pattern::pattern_sha256(bytes), "{how:?}: body differs");
    }
    let done = p.proxy.wait_for_lines("deferred=", 1, Duration::from_secs(5));
    assert!(done.iter().any(|l| l.contains("network=wifi0") && l.contains("outcome=ok")), "{done:?}");
}

#[test]
fn deferred_upload_holds_every_byte_in_order() {
    let Some(p) = start("deferred_upload_holds_every_byte_in_order", &config()) else { return };
    p.lab.cut(Uplink::Wifi, Cut::Admin);
    // 1 MB through a 64 KiB hold buffer: the proxy must stop reading (back-pressure), not drop.
    let data = pattern::bytes(1_000_000);
    let expected = format!("{} {}", data.len(), pattern::sha256_hex(&data));
    let lab_client = p.lab.client();
    let sender = p.lab.in_namespace(&lab_client, move || {
        let mut s =
            socks::request(PROXY.parse().unwrap(), Some("background"), socks::CONNECT, SERVER, SINK_PORT)
                .unwrap()
                .expect("deferred connections are answered at once");
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    p.proxy.wait_for_line("deferred:", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    p.lab.restore(Uplink::Wifi, Cut::Admin);
    let answer = sender.join().unwrap();
    assert_eq!(answer.trim(), expected);
}

#[test]
fn connect_and_forwarding_over_http() {
    let Some(p) = start("connect_and_forwarding_over_http", &config()) else { return };
    let proxy = format!("http://background@{PROXY}");
    // Two requests on one client connection: forwarded with keep-alive on both sides.
    let out = p.curl(&[
        "-v",
        "-x",
        &proxy,
        &url("/ip"),
        &url("/bytes/100000"),
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Re-using existing") || err.contains("Reusing existing"), "no keep-alive:\n{err}");
    // A body through forwarding, both ways.
    let echoed = p.curl_ok(&["-x", &proxy, "--data-binary", "labelled bytes", &url("/echo")]);
    assert_eq!(echoed, "labelled bytes");
    // CONNECT tunnel.
    let file = p.lab.dir().join("tunnel");
    p.curl_ok(&["-p", "-x", &proxy, &url("/bytes/200000"), "-o", file.to_str().unwrap()]);
    assert_eq!(pattern::sha256_hex(&std::fs::read(&file).unwrap()), pattern::pattern_sha256(200_000));
    // Environment variables, as unmodified apps use them.
    let env_out = p
        .lab
        .command(&p.lab.client(), "curl")
        .args(["-sS", "--max-time", "30", &url("/ip")])
        .env("http_proxy", &proxy)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&env_out.stdout).trim(), "10.1.0.2");
}

#[test]
fn bad_requests_get_the_right_errors() {
    let Some(p) = start("bad_requests_get_the_right_errors", &config()) else { return };
    let code = |out: &Output| out.status.code().unwrap_or(-1);
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).to_string();

    // Connection refused: SOCKS5 reply 5, HTTP 502.
    let closed = format!("http://{SERVER}:1/");
    let out = p.curl(&["-x", &format!("socks5h://{PROXY}"), &closed]);
    assert_eq!(code(&out), 97, "{}", stderr(&out));
    assert!(stderr(&out).contains("(5)"), "{}", stderr(&out));
    let out = p.curl(&["-o", "/dev/null", "-w", "%{http_code}", "-x", &format!("http://{PROXY}"), &closed]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");

    // A name that does not resolve: host unreachable (4), and 502 over HTTP.
    let out = p.curl(&["-x", &format!("socks5h://{PROXY}"), "http://no-such-host.lab/"]);
    assert!(stderr(&out).contains("(4)"), "{}", stderr(&out));

    // Unknown labels: authentication fails, with the reason in the log.
    let out = p.curl(&["-x", &format!("socks5h://backgrond@{PROXY}"), &url("/ip")]);
    assert_eq!(code(&out), 97);
    p.proxy.wait_for_line("unknown label \"backgrond\"", Duration::from_secs(5));
    let out = p.curl(&["-w", "%{http_code}", "-x", &format!("http://backgrond@{PROXY}"), &url("/ip")]);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("400"), "{:?}", out);

    // Policy says reject: SMALL may only use cell; with cell down it is refused (2, and 503).
    p.lab.cut(Uplink::Cell, Cut::Admin);
    let out = p.curl(&["-x", &format!("socks5h://small@{PROXY}"), &url("/ip")]);
    assert!(stderr(&out).contains("(2)"), "{}", stderr(&out));
    let out = p.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &format!("http://small@{PROXY}"),
        &url("/ip"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");
    p.lab.restore(Uplink::Cell, Cut::Admin);

    // HTTP oddities: https:// without CONNECT, a request that is not a proxy request.
    let out = p.curl(&["-w", "%{http_code}", "-o", "/dev/null", &format!("http://{PROXY}/")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");

    // BIND and UDP ASSOCIATE: command not supported (7).
    let codes = p.in_client(|| {
        [socks::BIND, 3]
            .map(|cmd| socks::request(PROXY.parse().unwrap(), None, cmd, SERVER, 80).unwrap().err())
    });
    assert_eq!(codes, [Some(7), Some(7)]);

    // Garbage: the connection is closed, the proxy lives on.
    p.in_client(|| {
        let mut s = std::net::TcpStream::connect(PROXY).unwrap();
        s.write_all(&[5, 200]).unwrap(); // claims 200 methods, sends none, then closes
        drop(s);
        let mut s = std::net::TcpStream::connect(PROXY).unwrap();
        s.write_all(&[4, 1, 0, 80, 10, 3, 0, 2, 0]).unwrap(); // SOCKS4
        let mut r = [0u8; 8];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r[1], 0x5b, "SOCKS4 gets a rejection");
    });
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://{PROXY}"), &url("/ip")]), "10.2.0.2");
}

#[test]
fn a_network_lost_mid_transfer_closes_the_client() {
    let Some(p) = start("a_network_lost_mid_transfer_closes_the_client", &config()) else { return };
    for how in [Cut::Admin, Cut::Carrier] {
        // 40 MB over cell (2 Mbit/s) would take minutes; the network goes after a second.
        let curl = p.lab.spawn(
            &p.lab.client(),
            "curl",
            &[
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-x",
                &format!("socks5h://cellular-only@{PROXY}"),
                &url("/bytes/40000000"),
            ],
        );
        std::thread::sleep(Duration::from_millis(1500));
        let t0 = Instant::now();
        p.lab.cut(Uplink::Cell, how);
        let status = curl
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{how:?}: curl hangs on a dead network"));
        assert!(!status.success(), "{how:?}: a truncated download must fail");
        eprintln!("{how:?}: client closed {:?} after the cut", t0.elapsed());
        let line = p.proxy.wait_for_line(
            &format!("went down: {}", if how == Cut::Admin { "admin down" } else { "no carrier" }),
            Duration::from_secs(5),
        );
        assert!(line.contains("network=cell0"), "{line}");
        p.lab.restore(Uplink::Cell, how);
        // New connections choose again once it is back (wait for the scout to see it).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = p.curl(&["-x", &format!("socks5h://cellular-only@{PROXY}"), &url("/ip")]);
            if out.status.success() {
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.2.0.2");
                break;
            }
            assert!(Instant::now() < deadline, "cell never came back");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // A network without carrier is never chosen: ondemand moves to wifi while cell has none.
    p.lab.cut(Uplink::Cell, Cut::Carrier);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://ondemand@{PROXY}"), &url("/ip")]), "10.1.0.2");
}

#[test]
fn local_destinations_go_direct_whatever_the_labels() {
    let Some(p) = start("local_destinations_go_direct_whatever_the_labels", &config()) else { return };
    let bin = cmm_lab::lab_server_bin();
    let local = p.lab.spawn(&p.lab.client(), bin, &["--http", "127.0.0.1:8081", "--http", "10.1.0.2:8082"]);
    local.wait_for_line("ready", Duration::from_secs(10));
    // Both uplinks down: nothing could leave, yet the machine's own addresses answer.
    p.lab.cut(Uplink::Wifi, Cut::Carrier);
    p.lab.cut(Uplink::Cell, Cut::Carrier);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        p.curl_ok(&["-x", &format!("socks5h://background@{PROXY}"), "http://127.0.0.1:8081/ip"]),
        "127.0.0.1"
    );
    assert_eq!(
        p.curl_ok(&["-x", &format!("socks5h://small@{PROXY}"), "http://10.1.0.2:8082/ip"]),
        "10.1.0.2"
    );
    assert_eq!(p.curl_ok(&["-x", &format!("http://{PROXY}"), "http://localhost:8081/ip"]), "127.0.0.1");
    let line = p.proxy.wait_for_line("dest=127.0.0.1:8081", Duration::from_secs(5));
    assert!(line.contains("network=direct"), "{line}");
}

#[test]
fn sigterm_lets_live_connections_finish() {
    let Some(p) = start("sigterm_lets_live_connections_finish", &config()) else { return };
    // ~3 s over cell.
    let out = p.lab.dir().join("body");
    let curl = p.lab.spawn(
        &p.lab.client(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-o",
            out.to_str().unwrap(),
            "-x",
            &format!("socks5h://cellular-only@{PROXY}"),
            &url("/bytes/700000"),
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
    p.proxy.signal(nix::sys::signal::Signal::SIGTERM);
    p.proxy.wait_for_line("shutting down", Duration::from_secs(5));
    // New connections are refused at once …
    let refused = p.curl(&["--max-time", "5", "-x", &format!("socks5h://{PROXY}"), &url("/ip")]);
    assert!(!refused.status.success());
    // … while the live one completes.
    let status = curl.wait_exit(Duration::from_secs(30)).expect("curl finished");
    assert!(status.success(), "{}", curl.output());
    assert_eq!(std::fs::read(&out).unwrap().len(), 700_000);
    let exit = p.proxy.wait_exit(Duration::from_secs(10)).expect("proxy exited");
    assert!(exit.success());
}

#[test]
fn config_errors_name_the_key_and_line() {
    let Some(lab) = Lab::new("config_errors_name_the_key_and_line") else { return };
    let path = lab.write_file(
        "bad.toml",
        "[proxy]\nlisten = [\"127.0.0.1:1080\"]\n\n[[rule]]\nport = 22\nlabels = \"backgrond\"\n",
    );
    let out = lab.run(
        &lab.client(),
        workspace_bin("cmm-proxy").to_str().unwrap(),
        &["--config", path.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:6:") && err.contains("key `labels`") && err.contains("backgrond"),
        "{err}"
    );
    // An exposed listener without users is refused.
    let out =
        lab.run(&lab.client(), workspace_bin("cmm-proxy").to_str().unwrap(), &["--listen", "0.0.0.0:1080"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("open proxy"));
}

#[test]
fn authentication_when_exposed() {
    let config = config().replace("listen = [\"127.0.0.1:1080\"]", "listen = [\"0.0.0.0:1080\"]")
        + "\n[[user]]\nname = \"alice\"\npassword = \"s3cret\"\n\n[[rule]]\nuser = \"alice\"\nlabels = \"background\"\n";
    let Some(p) = start("authentication_when_exposed", &config) else { return };
    // No credentials: refused on both protocols, with a Basic challenge over HTTP.
    let out = p.curl(&["-x", &format!("socks5h://{PROXY}"), &url("/ip")]);
    assert_eq!(out.status.code(), Some(97));
    let out = p.curl(&["-i", "-x", &format!("http://{PROXY}"), &url("/ip")]);
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(head.to_ascii_lowercase().contains("proxy-authenticate: basic"), "{head}");
    // Wrong password.
    let out = p.curl(&["-x", &format!("socks5h://alice:nope@{PROXY}"), &url("/ip")]);
    assert_eq!(out.status.code(), Some(97));
    // Identity alone: labels from the user rule (background: wifi).
    assert_eq!(p.curl_ok(&["-x", &format!("socks5h://alice:s3cret@{PROXY}"), &url("/ip")]), "10.1.0.2");
    // Identity and labels: the username's labels win (ondemand: cell).
    assert_eq!(
        p.curl_ok(&["-x", &format!("socks5h://alice,ondemand:s3cret@{PROXY}"), &url("/ip")]),
        "10.2.0.2"
    );
    assert_eq!(p.curl_ok(&["-x", &format!("http://alice,ondemand:s3cret@{PROXY}"), &url("/ip")]), "10.2.0.2");
    let line = p.proxy.wait_for_line("user=alice", Duration::from_secs(5));
    assert!(line.contains("user=alice"), "{line}");
}

#[test]
fn timeouts_unreachable_and_deferral_limits() {
    let config = config()
        .replace("[label.background]\nmetered = false", "[label.background]\nmetered = false\nmax_wait = \"2s\"")
        .replace("listen = [\"127.0.0.1:1080\"]", "listen = [\"127.0.0.1:1080\"]\nsocks_listen = [\"127.0.0.1:1081\"]\nhttp_listen = [\"127.0.0.1:1082\"]");
    let Some(p) = start("timeouts_unreachable_and_deferral_limits", &config) else { return };
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).to_string();

    // Separate single-protocol listeners.
    assert_eq!(p.curl_ok(&["-x", "socks5h://background@127.0.0.1:1081", &url("/ip")]), "10.1.0.2");
    assert_eq!(p.curl_ok(&["-x", "http://background@127.0.0.1:1082", &url("/ip")]), "10.1.0.2");

    // No route beyond the router: network unreachable (3).
    let out = p.curl(&["-x", &format!("socks5h://background@{PROXY}"), "http://192.0.2.1/"]);
    assert!(stderr(&out).contains("(3)"), "{}", stderr(&out));
    // An address type SOCKS5 does not have: address type not supported (8).
    let code = p.in_client(|| {
        let mut s = std::net::TcpStream::connect(PROXY).unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).unwrap();
        s.write_all(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]).unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).unwrap();
        r[1]
    });
    assert_eq!(code, 8);

    // A black-holed uplink swallows SYNs: the connect times out (3 s) and HTTP says 504.
    p.lab.cut(Uplink::Wifi, Cut::Blackhole);
    let out = p.curl(&["-w", "\n%{http_code}", "-x", &format!("http://background@{PROXY}"), &url("/ip")]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.ends_with("504") && body.contains("no answer within"), "{body}");
    p.lab.restore(Uplink::Wifi, Cut::Blackhole);

    // Deferred past the policy's maximum wait (2 s): SOCKS5 clients are closed, forwarded HTTP
    // requests get 504.
    p.lab.cut(Uplink::Wifi, Cut::Admin);
    let t0 = Instant::now();
    let out = p.curl(&["-x", &format!("socks5h://background@{PROXY}"), &url("/ip")]);
    assert!(!out.status.success(), "a request past its wait must fail");
    assert!(t0.elapsed() >= Duration::from_millis(1900), "closed after {:?}, before max_wait", t0.elapsed());
    let out = p.curl(&["-w", "\n%{http_code}", "-x", &format!("http://background@{PROXY}"), &url("/ip")]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.ends_with("504") && body.contains("no matching network within"), "{body}");
    let line = p.proxy.wait_for_line("deferred, then failed", Duration::from_secs(5));
    assert!(line.contains("labels=background"), "{line}");
}
