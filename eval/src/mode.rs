//! The approaches compared, and how the lab is set up for each.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use cmm_lab::{Lab, Proc, workspace_bin};
use serde::{Deserialize, Serialize};

use crate::workload::Access;

/// One approach to two uplinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// cmm-proxy; foreground labelled `ondemand`, background `background`, background paced
    /// while foreground is active.
    Cmm,
    /// The same without pacing: foreground on the lowest-RTT network, that is all.
    CmmUnpaced,
    /// cmm-proxy with no labels at all: every connection takes the default labels.
    #[serde(rename = "cmm-nolabels")]
    CmmNoLabels,
    /// cmm-proxy riding a cmm-relay in the server's network over both uplinks at once, with
    /// labels and pacing as in `Cmm`.
    CmmRelay,
    /// The same relay with no labels.
    #[serde(rename = "cmm-relay-nolabels")]
    CmmRelayNoLabels,
    /// No proxy: the kernel's default route (Wi-Fi preferred by metric).
    DefaultRoute,
    /// No proxy: kernel MPTCP with a subflow on each uplink ("aggregate without intent").
    Mptcp,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 7] = [
        Mode::Cmm,
        Mode::CmmUnpaced,
        Mode::CmmNoLabels,
        Mode::CmmRelay,
        Mode::CmmRelayNoLabels,
        Mode::DefaultRoute,
        Mode::Mptcp,
    ];

    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cmm => "cmm",
            Mode::CmmUnpaced => "cmm-unpaced",
            Mode::CmmNoLabels => "cmm-nolabels",
            Mode::CmmRelay => "cmm-relay",
            Mode::CmmRelayNoLabels => "cmm-relay-nolabels",
            Mode::DefaultRoute => "default-route",
            Mode::Mptcp => "mptcp",
        }
    }

    /// What it is, for the table.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Cmm => "cmm-proxy, labels, BG paced while FG is active",
            Mode::CmmUnpaced => "cmm-proxy, labels, BG not paced",
            Mode::CmmNoLabels => "cmm-proxy, no labels",
            Mode::CmmRelay => "cmm-proxy → cmm-relay over both uplinks, labels, BG paced",
            Mode::CmmRelayNoLabels => "cmm-proxy → cmm-relay over both uplinks, no labels",
            Mode::DefaultRoute => "default route, no proxy",
            Mode::Mptcp => "kernel MPTCP over both uplinks",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Mode, String> {
        Mode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mode {s:?} (expected one of {})", names.join(", "))
        })
    }

    fn uses_proxy(self) -> bool {
        matches!(self, Mode::Cmm | Mode::CmmUnpaced | Mode::CmmNoLabels) || self.uses_relay()
    }

    fn uses_relay(self) -> bool {
        matches!(self, Mode::CmmRelay | Mode::CmmRelayNoLabels)
    }

    fn labelled(self) -> bool {
        !matches!(self, Mode::CmmNoLabels | Mode::CmmRelayNoLabels)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const PROXY: &str = "127.0.0.1:1080";

/// The proxy's config in the experiment: the uplinks as they are (declared figures match the
/// lab; the scout's measurements refine them), and background kept off the metered cellular
/// link, so it waits for Wi-Fi rather than slowing foreground traffic there.
fn proxy_config(mode: Mode) -> String {
    let trickle = match mode {
        Mode::CmmUnpaced => "trickle = false\n",
        _ => "",
    };
    // As the delay lines make them; the scout's measurements refine them.
    let networks = cmm_lab::networks("40ms", "120ms", trickle, "metered = true\n");
    format!(
        r#"
[proxy]
listen = ["{PROXY}"]
connect_timeout = "3s"

[defer]
max_wait = "120s"

{networks}[label.background]
metered = false
"#
    )
}

/// What a mode needs running during a run (dropped afterwards).
pub struct Setup {
    /// How the clients reach the server.
    pub access: Access,
    /// The proxy, for the proxy modes: kept running until the setup is dropped.
    _proxy: Option<Proc>,
    /// The relay, for the relay modes.
    _relay: Option<Proc>,
}

impl Setup {
    /// What the proxy logged, for the proxy modes.
    pub fn proxy_log(&self) -> Option<String> {
        self._proxy.as_ref().map(Proc::output)
    }

    /// What the relay logged, for the relay modes.
    pub fn relay_log(&self) -> Option<String> {
        self._relay.as_ref().map(Proc::output)
    }
}

/// Sets the lab up for `mode`: the proxy, or MPTCP endpoints.
pub fn setup(lab: &Lab, mode: Mode) -> Result<Setup, String> {
    if mode.uses_proxy() {
        let (proxy, relay) = if mode.uses_relay() {
            let rp = cmm_lab::relay::start_with_config(lab, &proxy_config(mode), "");
            // The experiment measures an open session (the proxy opens it at start).
            rp.proxy.wait_for_line("session with the relay opened", Duration::from_secs(30));
            (rp.proxy, Some(rp.relay))
        } else {
            let path = lab.write_file("proxy.toml", &proxy_config(mode));
            let proxy = lab.spawn(
                &lab.client(),
                workspace_bin("cmm-proxy"),
                &["--config", path.to_str().unwrap_or("")],
            );
            proxy.wait_for_line("listening on", Duration::from_secs(30));
            (proxy, None)
        };
        let labelled = mode.labelled();
        let access = Access::Proxy {
            proxy: PROXY.parse::<SocketAddr>().map_err(|e| e.to_string())?,
            fg_user: labelled.then(|| "ondemand".to_string()),
            bg_user: labelled.then(|| "background".to_string()),
        };
        return Ok(Setup { access, _proxy: Some(proxy), _relay: relay });
    }
    if mode == Mode::Mptcp {
        let (c, s) = (lab.client(), lab.server());
        for args in [
            vec!["-n", &c, "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4"],
            vec!["-n", &c, "mptcp", "endpoint", "add", "10.1.0.2", "dev", "wifi0", "subflow"],
            vec!["-n", &c, "mptcp", "endpoint", "add", "10.2.0.2", "dev", "cell0", "subflow"],
            vec!["-n", &s, "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4"],
        ] {
            let out = std::process::Command::new("ip").args(&args).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        return Ok(Setup { access: Access::Mptcp, _proxy: None, _relay: None });
    }
    Ok(Setup { access: Access::Direct, _proxy: None, _relay: None })
}
