//! libcmm.h: C programs built with gcc against the library, the header and the pkg-config
//! file the build writes, run in the lab.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cmm_lab::{Lab, profile_dir};

fn c_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cmm-lib/tests/c").join(name)
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("libcmm")
        .env("PKG_CONFIG_PATH", profile_dir())
        .output()
        .expect("pkg-config (apt install pkg-config)");
    assert!(out.status.success(), "pkg-config: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

/// Compiles a C program against the shared library, with warnings as errors.
fn compile(source: &str, out: &Path) {
    let mut cmd = Command::new("gcc");
    cmd.args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .args(pkg_config(&["--cflags"]))
        .arg(c_source(source))
        .arg("-o")
        .arg(out)
        .args(pkg_config(&["--libs"]));
    let o = cmd.output().expect("gcc");
    assert!(o.status.success(), "gcc {source} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn has_valgrind() -> bool {
    Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_header_declares_exactly_what_the_library_exports() {
    let Some(lab) = Lab::new("the_header_declares_exactly_what_the_library_exports") else { return };
    // The header's declarations, by name.
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../cmm-lib/include/libcmm.h"))
            .unwrap();
    let mut declared: Vec<String> = header
        .lines()
        .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
        .filter_map(|l| {
            let i = l.find("cmm_")?;
            let rest = &l[i..];
            let end = rest.find('(')?;
            let name = &rest[..end];
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_').then(|| name.to_string())
        })
        .collect();
    declared.sort();
    declared.dedup();
    // What libcmm.so exports.
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(profile_dir().join("libcmm.so"))
        .output()
        .unwrap();
    let mut exported: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().filter(|n| n.starts_with("cmm_")).map(String::from))
        .collect();
    exported.sort();
    assert_eq!(declared.len(), 23, "{declared:?}");
    assert_eq!(declared, exported);

    // The header pins every signature and constant (-Werror), links, and runs.
    let bin = lab.dir().join("header_check");
    compile("header_check.c", &bin);
    let run = Command::new(&bin).output().unwrap();
    assert!(run.status.success(), "header_check: {:?} {}", run.status, String::from_utf8_lossy(&run.stderr));

    // The static library links too.
    let static_bin = lab.dir().join("header_check_static");
    let o = Command::new("gcc")
        .args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror"])
        .args(pkg_config(&["--cflags"]))
        .arg(c_source("header_check.c"))
        .arg("-o")
        .arg(&static_bin)
        .arg(profile_dir().join("libcmm.a"))
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s"])
        .output()
        .unwrap();
    assert!(o.status.success(), "static link: {}", String::from_utf8_lossy(&o.stderr));
    assert!(Command::new(&static_bin).status().unwrap().success());
}

const CLIENT_SETTINGS: &str = r#"
[label.background]
metered = false
"#;

const RESTORE_WIFI: &str = "ip link set wifi0 up && ip addr replace 10.1.0.2/24 dev wifi0 \
    && ip addr replace fd01::2/64 dev wifi0 nodad \
    && ip route replace default via 10.1.0.1 dev wifi0 metric 100 \
    && ip -6 route replace default via fd01::1 dev wifi0 metric 100";

const RESTORE_CELL: &str = "ip link set cell0 up && ip addr replace 10.2.0.2/24 dev cell0 \
    && ip addr replace fd02::2/64 dev cell0 nodad \
    && ip route replace default via 10.2.0.1 dev cell0 metric 200 \
    && ip -6 route replace default via fd02::1 dev cell0 metric 200";

/// Bytes sent on a client uplink, from its TBF qdisc.
fn uplink_bytes(lab: &Lab, dev: &str) -> u64 {
    let out = lab.run(&lab.client(), "tc", &["-s", "qdisc", "show", "dev", dev]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().skip_while(|w| *w != "Sent").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Runs a C client to its end; it must succeed. Returns its standard output. A failure shows
/// both sides' output (and the library's log in it).
fn run_client(mut cmd: Command, server: &cmm_lab::Proc) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client failed ({:?}):\n{stdout}\n{stderr}\nserver (exited: {:?}):\n{}",
        out.status,
        server.exited(),
        server.output()
    );
    stdout
}

/// The C server saw the end of the stream and exited cleanly (under valgrind: without invalid
/// accesses or definite leaks).
fn server_ends_cleanly(server: &cmm_lab::Proc) {
    server.wait_for_line("end of stream", Duration::from_secs(60));
    let status = server.wait_exit(Duration::from_secs(60)).expect("server exits");
    assert!(status.success(), "server: {status:?}\n{}", server.output());
}

/// The program and arguments that run `bin`, under valgrind (invalid accesses and definite
/// leaks are errors, exit code 99) when `valgrind`.
fn under_valgrind(bin: &Path, valgrind: bool) -> (String, Vec<String>) {
    if valgrind {
        let args = [
            "--quiet",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ];
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push(bin.display().to_string());
        ("valgrind".into(), v)
    } else {
        (bin.display().to_string(), Vec::new())
    }
}

fn run_c_programs(test: &str, valgrind: bool) {
    let Some(lab) = Lab::new(test) else { return };
    let (server_bin, client_bin) = (lab.dir().join("server"), lab.dir().join("client"));
    compile("server.c", &server_bin);
    compile("client.c", &client_bin);
    let vg = |bin: &Path| under_valgrind(bin, valgrind);
    let (prog, mut args) = vg(&server_bin);
    args.push("7100".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The library's log goes with the server's output, so a failure shows both sides.
    let log = std::env::var("CMM_TEST_LOG").unwrap_or_else(|_| "cmm=debug".into());
    let mut cmd = lab.command(&lab.server(), &prog);
    cmd.args(&args).env("RUST_LOG", &log);
    let server = lab.spawn_command(cmd);
    server.wait_for_line("listening on 7100", Duration::from_secs(60));

    let config = lab.write_file("libcmm.toml", &cmm_lab::config(CLIENT_SETTINGS));
    let wifi_before = uplink_bytes(&lab, "wifi0");
    let (prog, mut args) = vg(&client_bin);
    args.extend(["10.3.0.2".into(), "7100".into()]);
    let mut cmd = lab.command(&lab.client(), &prog);
    cmd.args(&args)
        .env("CMM_CONFIG", &config)
        .env("CMM_CUT", "ip link set wifi0 down")
        .env("CMM_RESTORE", RESTORE_WIFI)
        .env("RUST_LOG", &log);
    let stdout = run_client(cmd, &server);
    for line in [
        "got 5 bytes labelled 0x4",
        "got 200000 bytes labelled 0x8",
        "deferred",
        "thunk ran",
        "got 3000 bytes labelled 0x8",
        "got 11 bytes labelled 0x4",
        "ok",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} missing from:\n{stdout}");
    }
    // The 200 kB background message went over Wi-Fi.
    assert!(uplink_bytes(&lab, "wifi0") - wifi_before > 200_000);
    // The server saw the end of the stream and closed cleanly (and, under valgrind, without
    // invalid accesses or definite leaks).
    server_ends_cleanly(&server);
}

#[test]
fn c_client_and_server_exchange_labelled_data() {
    run_c_programs("c_client_and_server_exchange_labelled_data", false);
}

#[test]
fn c_programs_are_clean_under_valgrind() {
    if !has_valgrind() {
        assert!(!cmm_lab::under_ci(), "CI must have valgrind");
        eprintln!("SKIPPED: no valgrind");
        return;
    }
    run_c_programs("c_programs_are_clean_under_valgrind", true);
}

/// The issue-11 scenario: a C client on one multi-socket loses every network at once (admin),
/// again and again; a message its resume handler sends once they return must reach the server
/// every time — the server still believes in its old paths meanwhile.
#[test]
fn c_client_outlives_total_outages() {
    let Some(lab) = Lab::new("c_client_outlives_total_outages") else { return };
    let (server_bin, client_bin) = (lab.dir().join("server"), lab.dir().join("outage_client"));
    compile("server.c", &server_bin);
    compile("outage_client.c", &client_bin);
    let log = std::env::var("CMM_TEST_LOG").unwrap_or_else(|_| "cmm=debug".into());
    let mut cmd = lab.command(&lab.server(), &server_bin);
    cmd.arg("7101").env("RUST_LOG", &log);
    let server = lab.spawn_command(cmd);
    server.wait_for_line("listening on 7101", Duration::from_secs(60));
    let config = lab.write_file("libcmm.toml", &cmm_lab::config(CLIENT_SETTINGS));
    let rounds = std::env::var("CMM_ROUNDS").unwrap_or_else(|_| "5".into());
    let mut cmd = lab.command(&lab.client(), &client_bin);
    cmd.args(["10.3.0.2", "7101"])
        .env("CMM_CONFIG", &config)
        .env("CMM_CUT", "ip link set wifi0 down && ip link set cell0 down")
        .env("CMM_RESTORE", format!("{RESTORE_WIFI} && {RESTORE_CELL}"))
        .env("CMM_ROUNDS", &rounds)
        .env("RUST_LOG", &log);
    let stdout = run_client(cmd, &server);
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    server_ends_cleanly(&server);
}

/// The conformance suite (`cmm-lib/tests/c/conformance.c`): one process per behaviour, the
/// client in the two-uplink namespace, the echo server behind the router; each case has an
/// alarm, so a missing feature fails rather than hangs.
#[test]
fn c_conformance_suite() {
    run_conformance("c_conformance_suite", false);
}

#[test]
fn c_conformance_suite_is_clean_under_valgrind() {
    if !has_valgrind() {
        assert!(!cmm_lab::under_ci(), "CI must have valgrind");
        eprintln!("SKIPPED: no valgrind");
        return;
    }
    run_conformance("c_conformance_suite_is_clean_under_valgrind", true);
}

fn run_conformance(test: &str, valgrind: bool) {
    let Some(lab) = Lab::new(test) else { return };
    let (server_bin, client_bin) = (lab.dir().join("echo_server"), lab.dir().join("conformance"));
    compile("echo_server.c", &server_bin);
    compile("conformance.c", &client_bin);
    let log = std::env::var("CMM_TEST_LOG").unwrap_or_else(|_| "cmm=info".into());
    let mut cmd = lab.command(&lab.server(), &server_bin);
    cmd.arg("7200").env("RUST_LOG", &log);
    let server = lab.spawn_command(cmd);
    server.wait_for_line("listening on 7200", Duration::from_secs(60));
    let config = lab.write_file("libcmm.toml", &cmm_lab::config(CLIENT_SETTINGS));
    for case in ["waitall", "peek", "nonblock", "plainfd", "timeouts", "failtimeout"] {
        let (prog, mut args) = under_valgrind(&client_bin, valgrind);
        args.extend([case.to_string(), "10.3.0.2".into(), "7200".into()]);
        let mut cmd = lab.command(&lab.client(), &prog);
        cmd.args(&args).env("CMM_CONFIG", &config).env("RUST_LOG", &log);
        let stdout = run_client(cmd, &server);
        assert!(stdout.contains(&format!("ok {case}")), "{case}: {stdout}");
    }
    // The listening side: poll-then-accept, and paths joining accepted sockets not counted.
    let accept_bin = lab.dir().join("accept_poll");
    compile("accept_poll.c", &accept_bin);
    let mut cmd = lab.command(&lab.server(), &accept_bin);
    cmd.arg("7201").env("RUST_LOG", &log);
    let acceptor = lab.spawn_command(cmd);
    acceptor.wait_for_line("listening on 7201", Duration::from_secs(60));
    let mut cmd = lab.command(&lab.client(), &client_bin);
    cmd.args(["twoconnections", "10.3.0.2", "7201"]).env("CMM_CONFIG", &config).env("RUST_LOG", &log);
    run_client(cmd, &acceptor);
    acceptor.wait_for_line("ok accept_poll", Duration::from_secs(30));
    let status = acceptor.wait_exit(Duration::from_secs(30)).expect("accept_poll exits");
    assert!(status.success(), "accept_poll: {status:?}\n{}", acceptor.output());
}
