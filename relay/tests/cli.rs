//! The `cmm-relay` commands as `relay/README.md` shows them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cmm-relay"))
}

/// The "relay serving" line of a started `serve` (within 30 s), after which it is stopped.
fn serving_line(child: &mut std::process::Child) -> Option<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut serving = None;
    while serving.is_none() && start.elapsed() < Duration::from_secs(30) {
        serving = rx.recv_timeout(Duration::from_millis(100)).ok().filter(|l| l.contains("relay serving"));
    }
    let _ = child.kill();
    let _ = child.wait();
    serving
}

#[test]
fn keygen_pubkey_and_serve_as_the_readme_shows() {
    let dir = std::env::temp_dir().join(format!("cmm-relay-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("relay.key");
    let proxy_key = dir.join("proxy.key");
    for shown in [
        "cmm-relay keygen relay.key",
        "cmm-relay pubkey relay.key",
        "cmm-relay serve --listen 0.0.0.0:7443 --key relay.key --allow <proxy's public key>",
    ] {
        assert!(README.contains(shown), "relay/README.md no longer shows: {shown}");
    }

    // cmm-relay keygen relay.key → one line, the public key.
    let out = relay().arg("keygen").arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(public.len(), 44, "{public}");
    // Never over an existing key.
    let again = relay().arg("keygen").arg(&key).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not overwritten"));
    // cmm-relay pubkey relay.key → the same line.
    let out = relay().arg("pubkey").arg(&key).output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), public);

    // Without an allowed client it refuses to start, saying why.
    let out = relay().args(["serve", "--listen", "127.0.0.1:0", "--key"]).arg(&key).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no client key is allowed"));
    // A bad key on the command line names itself.
    let out = relay()
        .args(["serve", "--listen", "127.0.0.1:0", "--allow", "not-a-key", "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a public key"));

    // With the proxy's key allowed it serves.
    let out = relay().arg("keygen").arg(&proxy_key).output().unwrap();
    let proxy_public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut child = relay()
        .args(["serve", "--listen", "127.0.0.1:0", "--allow", &proxy_public, "--key"])
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let serving = serving_line(&mut child);
    let line = serving.expect("no 'relay serving' line");
    assert!(line.contains(&public) && line.contains("clients=1"), "{line}");

    // The same from a config file (relative paths beside it); a bad key in it names its line.
    std::fs::write(dir.join("allowed_keys"), format!("{proxy_public}\n")).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nkey = \"relay.key\"\nallow_file = \"allowed_keys\"\n")
        .unwrap();
    let mut child = relay().args(["serve", "--config"]).arg(&config).stderr(Stdio::piped()).spawn().unwrap();
    let serving = serving_line(&mut child);
    assert!(serving.expect("no 'relay serving' line from --config").contains("clients=1"));
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nkey = \"relay.key\"\nalow = []\n").unwrap();
    let out = relay().args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("alow"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `docker/cmm-relay.service` passes `systemd-analyze verify`, with ExecStart pointed at the
/// binary just built (the unit names /usr/local/bin, where an install puts it).
#[test]
fn the_systemd_unit_verifies() {
    let unit = include_str!("../../docker/cmm-relay.service");
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze is missing (apt install systemd)");
        eprintln!("SKIPPED: systemd-analyze is missing (apt install systemd)");
        return;
    }
    assert!(unit.contains("ExecStart=/usr/local/bin/cmm-relay serve"));
    let dir = std::env::temp_dir().join(format!("cmm-relay-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cmm-relay.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/cmm-relay", env!("CARGO_BIN_EXE_cmm-relay"))).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
