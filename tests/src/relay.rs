//! A relay in the lab's server namespace and a proxy in the client's that rides it, set up as
//! a user would: `cmm-relay keygen` on both sides, `cmm-relay serve`, `[relay]` in the proxy's
//! config.

use std::time::Duration;

use crate::proc::Proc;
use crate::{Lab, SERVER, workspace_bin};

/// The port the relay listens on, at [`SERVER`].
pub const RELAY_PORT: u16 = 7443;

/// The relay and the proxy, both running.
pub struct RelayProxy {
    /// `cmm-relay serve`, in the server namespace.
    pub relay: Proc,
    /// `cmm-proxy`, in the client namespace, listening on 127.0.0.1:1080.
    pub proxy: Proc,
}

fn keygen(lab: &Lab, name: &str) -> (String, String) {
    let path = lab.dir().join(name);
    let out = lab.run(
        &lab.server(),
        workspace_bin("cmm-relay").to_str().unwrap(),
        &["keygen", path.to_str().unwrap()],
    );
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    (path.to_str().unwrap().to_string(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts the relay and a proxy with the lab's networks, `settings` (top-level keys and
/// tables, as for [`crate::config`]) and a `[relay]` section naming it, plus `relay_extra`
/// lines in that section.
pub fn start(lab: &Lab, settings: &str, relay_extra: &str) -> RelayProxy {
    start_with_config(lab, &crate::config(settings), relay_extra)
}

/// Starts the relay and a proxy whose config is `config` (with no `[relay]` section) and a
/// `[relay]` section naming the relay, plus `relay_extra` lines in that section.
pub fn start_with_config(lab: &Lab, config: &str, relay_extra: &str) -> RelayProxy {
    let (relay_key, relay_public) = keygen(lab, "relay.key");
    let (proxy_key, proxy_public) = keygen(lab, "proxy.key");
    let listen = format!("{SERVER}:{RELAY_PORT}");
    let relay = lab.spawn(
        &lab.server(),
        workspace_bin("cmm-relay"),
        &["serve", "--listen", &listen, "--key", &relay_key, "--allow", &proxy_public],
    );
    relay.wait_for_line("relay serving", Duration::from_secs(20));
    let config = format!(
        "{config}\n[relay]\naddress = \"{listen}\"\npublic_key = \"{relay_public}\"\nkey = \"{proxy_key}\"\n{relay_extra}\n"
    );
    let path = lab.write_file("proxy.toml", &config);
    let proxy = lab.spawn(&lab.client(), workspace_bin("cmm-proxy"), &["--config", path.to_str().unwrap()]);
    proxy.wait_for_line("listening on ", Duration::from_secs(20));
    RelayProxy { relay, proxy }
}
