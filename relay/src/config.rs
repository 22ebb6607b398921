//! `cmm-relay serve --config FILE`: the same settings as the flags, in TOML.
//!
//! ```toml
//! listen = "0.0.0.0:7443"
//! key = "relay.key"                 # relative to this file
//! allow = ["<a proxy's public key>"]
//! allow_file = "allowed_keys"       # one key per line, relative to this file
//! allow_net = ["0.0.0.0/0", "::/0"] # default: any
//! allow_port = [80, 443]            # default: any
//! connect_timeout = "10s"
//! half_close_timeout = "60s"
//! ```
//!
//! Every key is optional here; flags given on the command line win (and `--allow` adds to
//! `allow`). An unknown key or a bad value is an error that names the file, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cmm_policy::units::ConfigDuration;
use ipnet::IpNet;
use serde::Deserialize;

/// The settings a relay config file may carry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// Where to listen.
    pub listen: Option<SocketAddr>,
    /// The relay's key file.
    pub key: Option<PathBuf>,
    /// Proxies' public keys.
    #[serde(default)]
    pub allow: Vec<String>,
    /// A file of proxies' public keys.
    pub allow_file: Option<PathBuf>,
    /// Allowed destination networks.
    #[serde(default)]
    pub allow_net: Vec<IpNet>,
    /// Allowed destination ports.
    #[serde(default)]
    pub allow_port: Vec<u16>,
    /// Longest connect to a destination.
    pub connect_timeout: Option<ConfigDuration>,
    /// Longest silence of a half-closed connection.
    pub half_close_timeout: Option<ConfigDuration>,
}

impl RelayFile {
    /// Reads `path`; relative file names in it are taken from its folder.
    pub fn load(path: &Path) -> Result<RelayFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut f: RelayFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => format!("{} line {l}: {}", path.display(), e.message().trim_end()),
                None => format!("{}: {}", path.display(), e.message().trim_end()),
            }
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut f.key, &mut f.allow_file].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_with_paths_beside_it_and_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("cmm-relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:7443\"\nkey = \"relay.key\"\nallow_port = [443]\nhalf_close_timeout = \"30s\"\n").unwrap();
        let f = RelayFile::load(&path).unwrap();
        assert_eq!(f.key.unwrap(), dir.join("relay.key"));
        assert_eq!(f.allow_port, vec![443]);
        assert_eq!(f.half_close_timeout.unwrap().0, std::time::Duration::from_secs(30));
        std::fs::write(&path, "listen = \"0.0.0.0:7443\"\n\nallow_prot = [443]\n").unwrap();
        let e = RelayFile::load(&path).unwrap_err();
        assert!(e.contains("line 3") && e.contains("allow_prot"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
