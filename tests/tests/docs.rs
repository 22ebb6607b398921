//! Every command the README shows runs here, in the lab, exactly as written but for the
//! destination (example.com becomes the lab's server). If the README changes a command, this
//! test fails until it is updated to match.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cmm_lab::{Lab, Proc, workspace_bin};

const README: &str = include_str!("../../README.md");
const SAMPLE: &str = include_str!("../../proxy.toml");

/// Asserts the README shows `command` verbatim, and returns it.
fn readme(command: &str) -> &str {
    assert!(README.contains(command), "the README no longer shows:\n  {command}");
    command
}

fn sh(lab: &Lab, cwd: &std::path::Path, command: &str) -> String {
    let out = lab
        .command(&lab.client(), "sh")
        .args(["-c", command])
        .current_dir(cwd)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_CACHE_DIR", "1")
        .env("HOME", cwd)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{command}` failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A git repository served by the dumb HTTP protocol, and a pip index with one wheel.
fn static_site(lab: &Lab) -> std::path::PathBuf {
    let site = lab.dir().join("site");
    let src = lab.dir().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "intentional\n").unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        run(Command::new("git")
            .args(["-c", "user.name=cmm", "-c", "user.email=cmm@lab", "-C"])
            .arg(dir)
            .args(args))
    };
    git(&src, &["init", "-q"]);
    git(&src, &["add", "hello.txt"]);
    git(&src, &["commit", "-q", "-m", "hello"]);
    std::fs::create_dir_all(&site).unwrap();
    run(Command::new("git").args(["clone", "-q", "--bare"]).arg(&src).arg(site.join("repo.git")));
    git(&site.join("repo.git"), &["update-server-info"]);

    let files = site.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let wheel = files.join("cmmdemo-1.0-py3-none-any.whl");
    run(Command::new("python3").arg("-c").arg(format!(
        "import zipfile\n\
         z = zipfile.ZipFile({:?}, 'w')\n\
         z.writestr('cmmdemo/__init__.py', 'LABEL = \"background\"\\n')\n\
         z.writestr('cmmdemo-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: cmmdemo\\nVersion: 1.0\\n')\n\
         z.writestr('cmmdemo-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: cmm-lab\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
         z.writestr('cmmdemo-1.0.dist-info/RECORD', '')\n\
         z.close()\n",
        wheel.to_str().unwrap()
    )));
    let index = site.join("simple/cmmdemo");
    std::fs::create_dir_all(&index).unwrap();
    std::fs::write(
        index.join("index.html"),
        "<html><body><a href=\"../../files/cmmdemo-1.0-py3-none-any.whl\">cmmdemo-1.0-py3-none-any.whl</a></body></html>\n",
    )
    .unwrap();
    site
}

fn start_proxy(lab: &Lab, args: &[&str]) -> Proc {
    let p = lab.spawn(&lab.client(), workspace_bin("cmm-proxy"), args);
    p.wait_for_line("listening on 127.0.0.1:1080", Duration::from_secs(20));
    p
}

#[test]
fn readme_examples_run_as_written() {
    let Some(lab) = Lab::new("readme_examples_run_as_written") else { return };
    let site = static_site(&lab);
    let servers = lab.spawn(
        &lab.server(),
        cmm_lab::lab_server_bin(),
        &["--http", "[::]:8080", "--static", site.to_str().unwrap()],
    );
    servers.wait_for_line("ready", Duration::from_secs(20));
    let work = lab.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let here = |cmd: &str| {
        cmd.replace("http://example.com/repo.git", "http://server4.lab:8080/repo.git")
            .replace("http://example.com/", "http://server4.lab:8080/ip")
            // The lab has no TLS: the index is plain HTTP there, which pip must be told to trust.
            .replace("https://pypi.org/simple/", "http://server4.lab:8080/simple/ --trusted-host server4.lab")
            .replace(" requests", " cmmdemo")
    };

    // The quick start: no config file at all, built-in defaults.
    readme("cargo run --release -p cmm-proxy");
    let proxy = start_proxy(&lab, &[]);
    proxy.wait_for_line("built-in defaults", Duration::from_secs(1));

    // Labels in the username. With the defaults, wifi0 is guessed Wi-Fi and cell0 cellular, so
    // both labels take wifi here (more bandwidth, and lower RTT by default figures).
    let curl_bg = readme("curl -x socks5h://background@127.0.0.1:1080 http://example.com/");
    assert_eq!(sh(&lab, &work, &here(curl_bg)), "10.1.0.2");
    proxy.wait_for_line("labels=background labels_from=username network=wifi0", Duration::from_secs(5));
    let curl_fg = readme("curl -x http://ondemand+small@127.0.0.1:1080 http://example.com/");
    assert_eq!(sh(&lab, &work, &here(curl_fg)), "10.1.0.2");
    proxy.wait_for_line("labels=ondemand+small labels_from=username", Duration::from_secs(5));
    let env = readme("ALL_PROXY=socks5h://background@127.0.0.1:1080 curl http://example.com/");
    assert_eq!(sh(&lab, &work, &here(env)), "10.1.0.2");

    // git, over SOCKS5 with the label.
    let git =
        readme("git -c http.proxy=socks5h://background:@127.0.0.1:1080 clone http://example.com/repo.git");
    sh(&lab, &work, &here(git));
    assert_eq!(std::fs::read_to_string(work.join("repo/hello.txt")).unwrap(), "intentional\n");

    // pip, over the HTTP proxy with the label.
    let pip = readme(
        "pip download --proxy http://background@127.0.0.1:1080 --index-url https://pypi.org/simple/ -d wheels requests",
    );
    sh(&lab, &work, &here(pip));
    assert!(work.join("wheels/cmmdemo-1.0-py3-none-any.whl").exists());
    proxy.wait_for_line("proto=http client=", Duration::from_secs(5));

    // ssh through the proxy, labelled by the sample config's port-22 rule.
    drop(proxy);
    let sample = lab.write_file("proxy.toml", SAMPLE);
    let proxy = start_proxy(&lab, &["--config", sample.to_str().unwrap()]);
    let keys = lab.dir().join("ssh");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["host", "client"] {
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(keys.join(k)));
    }
    std::fs::copy(keys.join("client.pub"), keys.join("authorized_keys")).unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let sshd_opts = [
        format!("HostKey={}", keys.join("host").display()),
        format!("AuthorizedKeysFile={}", keys.join("authorized_keys").display()),
        "PermitRootLogin=prohibit-password".into(),
        "StrictModes=no".into(),
        "UsePAM=no".into(),
        "PidFile=none".into(),
        "ListenAddress=0.0.0.0:22".into(),
    ];
    let mut args: Vec<String> = vec!["-D".into(), "-e".into(), "-f".into(), "/dev/null".into()];
    for o in &sshd_opts {
        args.push("-o".into());
        args.push(o.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sshd = lab.spawn(&lab.server(), "/usr/sbin/sshd", &args);
    sshd.wait_for_line("Server listening", Duration::from_secs(10));
    let ssh = readme("ssh -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p' user@example.com");
    let ssh = ssh.replace(
        "user@example.com",
        &format!(
            "-i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes root@server4.lab echo via-ssh",
            keys.join("client").display()
        ),
    );
    assert_eq!(sh(&lab, &work, &ssh), "via-ssh");
    let line = proxy.wait_for_line("dest=server4.lab:22", Duration::from_secs(5));
    assert!(line.contains("labels=ondemand+small") && line.contains("labels_from=rule@"), "{line}");
}

#[test]
fn readme_library_examples_run_as_written() {
    let Some(lab) = Lab::new("readme_library_examples_run_as_written") else { return };
    let server_cmd = readme("cargo run -p cmm --example label_server -- 127.0.0.1:7000");
    let client_cmd =
        readme("cargo run -p cmm --example label_client -- 127.0.0.1:7000 background hello world");
    // As written, but the built examples run directly, the server in the server namespace.
    let args = |cmd: &str| -> Vec<String> {
        cmd.split(" -- ")
            .nth(1)
            .unwrap()
            .split(' ')
            .map(|a| a.replace("127.0.0.1:7000", "10.3.0.2:7000"))
            .collect()
    };
    let server_args = args(server_cmd);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let server = lab.spawn(&lab.server(), cmm_lab::workspace_example("label_server"), &server_args);
    server.wait_for_line("listening on 10.3.0.2:7000", Duration::from_secs(20));
    let out = lab
        .command(&lab.client(), cmm_lab::workspace_example("label_client"))
        .args(args(client_cmd))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["[background] got 6 bytes labelled background", "[background] got 6 bytes labelled background"]
    );
}

/// The C section: build commands and hello.c, run as written but for the prefix (a temporary
/// one) and the profile (this test's build).
#[test]
fn readme_c_example_builds_installs_and_runs() {
    let Some(lab) = Lab::new("readme_c_example_builds_installs_and_runs") else { return };
    readme("cargo build --release -p cmm");
    let install = readme("sudo cmm-lib/install.sh /usr/local");
    let compile = readme("cc hello.c -o hello $(pkg-config --cflags --libs libcmm)");
    assert!(install.ends_with("/usr/local"));
    // hello.c: the first C block.
    let start = README.find("```c\n").expect("a C block") + 5;
    let end = start + README[start..].find("```").unwrap();
    let work = lab.dir().join("c");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("hello.c"), &README[start..end]).unwrap();

    let prefix = lab.dir().join("prefix");
    let profile = cmm_lab::profile_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("cmm-lib/install.sh"))
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", profile.parent().unwrap())
        .env("PROFILE", profile.file_name().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
    for f in ["lib/libcmm.so", "lib/libcmm.a", "include/libcmm.h", "lib/pkgconfig/libcmm.pc"] {
        assert!(prefix.join(f).exists(), "{f} not installed");
    }
    let out = Command::new("sh")
        .args(["-c", compile])
        .current_dir(&work)
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{compile}: {}", String::from_utf8_lossy(&out.stderr));

    let server = lab.spawn(&lab.server(), cmm_lab::workspace_example("label_server"), &["10.3.0.2:7000"]);
    server.wait_for_line("listening on", Duration::from_secs(20));
    let out = lab.command(&lab.client(), work.join("hello")).arg("10.3.0.2").output().unwrap();
    assert!(out.status.success(), "hello: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[0x4] got 6 bytes labelled ondemand\n");
}

/// The scout section: the daemon, `status`, `set` and `replay`, as written but for the
/// interface (wlan0 is the lab's wifi0) and a socket of the test's own (tests run in parallel).
#[test]
fn readme_scout_commands_run_as_written() {
    let Some(lab) = Lab::new("readme_scout_commands_run_as_written") else { return };
    let _servers = lab.start_servers();
    let socket = lab.dir().join("scout.sock");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scout = |cmd: &str| -> Command {
        let args = cmd.strip_prefix("cargo run --release -p cmm-scout -- ").expect("a cmm-scout command");
        let mut c = lab.command(&lab.client(), workspace_bin("cmm-scout"));
        c.args(args.replace("wlan0", "wifi0").split(' ')).env("CMM_SCOUT_SOCKET", &socket).current_dir(&root);
        c
    };
    let status = || -> String {
        let out = scout(readme("cargo run --release -p cmm-scout -- status")).output().unwrap();
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let wifi_line = |table: &str| {
        table.lines().find(|l| l.contains("wifi0")).unwrap_or_else(|| panic!("{table}")).to_string()
    };

    let daemon = Proc::spawn(scout(readme("cargo run --release -p cmm-scout -- daemon")));
    daemon.wait_for_line("scout daemon listening on", Duration::from_secs(20));
    assert!(wifi_line(&status()).contains(" up "), "{}", status());

    // A program started now uses the daemon.
    let mut proxy = lab.command(&lab.client(), workspace_bin("cmm-proxy"));
    proxy.env("CMM_SCOUT_SOCKET", &socket);
    let proxy = Proc::spawn(proxy);
    let line = proxy.wait_for_line("scout: ", Duration::from_secs(20));
    assert!(line.contains("daemon at"), "{line}");

    // Its connections' TCP_INFO becomes the daemon's estimate for the network they used.
    proxy.wait_for_line("listening on", Duration::from_secs(20));
    let out = lab.run(
        &lab.client(),
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-x",
            "socks5h://background@127.0.0.1:1080",
            "http://server4.lab:8080/bytes/4000000",
        ],
    );
    assert!(out.status.success(), "curl: {}\n{}", String::from_utf8_lossy(&out.stderr), proxy.output());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let estimated = loop {
        let mut c = scout("cargo run --release -p cmm-scout -- status --json");
        let v: serde_json::Value = serde_json::from_slice(&c.output().unwrap().stdout).expect("JSON");
        let wifi =
            v["networks"].as_array().unwrap().iter().find(|n| n["interface"] == "wifi0").unwrap().clone();
        if wifi["estimated"]["bandwidth_down"].is_u64() || std::time::Instant::now() > deadline {
            break wifi["estimated"].clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("wifi0 as estimated from one proxied download: {estimated}");
    let rtt = estimated["rtt"].as_f64().unwrap_or_else(|| panic!("no RTT estimate: {estimated}"));
    assert!(rtt > 0.0 && rtt < 1000.0, "{estimated}");
    // The download crossed the Wi-Fi uplink's 50 Mbit/s TBF: the receive rate is of that order.
    let down =
        estimated["bandwidth_down"].as_u64().unwrap_or_else(|| panic!("no bandwidth estimate: {estimated}"));
    assert!((5_000_000..=100_000_000).contains(&down), "{estimated}");

    let ok = |cmd: &str| {
        let out = scout(readme(cmd)).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok("cargo run --release -p cmm-scout -- set wlan0 down");
    assert!(wifi_line(&status()).contains("forced down"), "{}", status());
    proxy.wait_for_line("network wifi0 (wifi0) down: forced down", Duration::from_secs(10));
    ok("cargo run --release -p cmm-scout -- set wlan0 auto");
    assert!(wifi_line(&status()).contains(" up "), "{}", status());
    drop(proxy);
    drop(daemon);

    // The drive trace, driving the lab's Wi-Fi: its figures become the estimates, and its
    // upload rate the TBF on wifi0.
    let replay = Proc::spawn(scout(readme(
        "cargo run --release -p cmm-scout -- replay scout/traces/drive.csv --drive wifi=wlan0",
    )));
    replay.wait_for_line("wifi up (driving wifi0)", Duration::from_secs(20));
    let line = wifi_line(&status());
    assert!(line.contains("20.0 Mbit/s") && line.contains("60ms"), "{line}");
    let tc = lab.run(&lab.client(), "tc", &["qdisc", "show", "dev", "wifi0"]);
    let tc = String::from_utf8_lossy(&tc.stdout);
    assert!(tc.contains("tbf") && tc.contains("rate 6Mbit"), "{tc}");
}
