//! [`Config`]: the `proxy.toml` schema, its built-in defaults, and errors that name the file,
//! line, column and key.
//!
//! Reading the file is the only I/O this crate does. Every table rejects unknown keys, and every
//! value is checked where it is read, so a typo is reported at its line, not ignored.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use toml::Spanned;

use crate::choose::{LabelPolicy, NetworkRef, NoMatch, Policy};
use crate::classify::{Classifier, NetworkDef};
use crate::glob::Glob;
use crate::labels::Labels;
use crate::network::{Figures, NetworkKind, Trickle};
use crate::rules::{PortRange, Rule, RuleSet, Via};
use crate::units::{ConfigDuration, ConfigRate, ConfigSize};

/// Where [`Config::discover`] looks when neither a path nor `$CMM_CONFIG` is given.
pub const SYSTEM_CONFIG: &str = "/etc/cmm/proxy.toml";

/// The whole configuration, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The proxy's listeners and limits.
    pub proxy: ProxyConfig,
    /// Limits on deferred connections.
    pub defer: DeferConfig,
    /// How the scout finds and classifies networks.
    pub scout: ScoutConfig,
    /// Declared networks, in file order.
    pub networks: Vec<NetworkDef>,
    /// Default labels and label policies.
    pub policy: Policy,
    /// Destination rules.
    pub rules: RuleSet,
    /// Users allowed to authenticate; when there are any, authentication is required.
    pub users: Vec<User>,
    /// `[relay]`: the relay connections may ride (none by default).
    pub relay: Option<RelaySettings>,
    /// The file this came from (`None` for the built-in defaults).
    pub source: Option<PathBuf>,
}

/// `[relay]`: a cmm-relay that the proxy reaches over every network at once.
#[derive(Clone, Debug, PartialEq)]
pub struct RelaySettings {
    /// `host:port` of the relay.
    pub address: String,
    /// The relay's public key (one base64 line, from `cmm-relay keygen`): the only key the
    /// proxy accepts from it.
    pub public_key: String,
    /// The proxy's own private key file (`cmm-relay keygen` writes one); relative to the
    /// config file's folder.
    pub key: PathBuf,
    /// Where connections go when no rule says (`via` of a `[[rule]]`).
    pub default_via: Via,
    /// When no path reaches the relay for this long, new connections go direct; `None`
    /// (`fallback_after = "strict"`): they never do, they wait up to `grace` for a path and
    /// are refused after it.
    pub fallback_after: Option<Duration>,
    /// When no path has reached the relay for this long, the session's live connections are
    /// reset (until then they wait for a network, nothing lost).
    pub grace: Duration,
    /// `via` of `[label.…]` policies: traffic carrying all of a policy's labels goes this way
    /// when no rule says (the first that applies).
    pub by_label: Vec<(Labels, Via)>,
    /// Whether a connection to a destination the relay reached lately is answered at once
    /// and its first bytes sent with the open request (one round trip saved); a failure is
    /// then a reset rather than a SOCKS5 error code or an HTTP status.
    pub open_early: bool,
}

/// `[proxy]`: listeners and limits of cmm-proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Addresses that serve SOCKS5 and HTTP both (told apart by the first byte).
    pub listen: Vec<SocketAddr>,
    /// Addresses that serve SOCKS5 only.
    pub socks_listen: Vec<SocketAddr>,
    /// Addresses that serve HTTP only.
    pub http_listen: Vec<SocketAddr>,
    /// Longest wait for an upstream TCP connect, per address tried.
    pub connect_timeout: Duration,
    /// Longest a client may take to send its SOCKS5 or HTTP request.
    pub handshake_timeout: Duration,
    /// Most client connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long live connections may go on before they are closed.
    pub shutdown_grace: Duration,
}

/// `[defer]`: what a deferred connection may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct DeferConfig {
    /// Bytes from the client held per deferred connection; past this nothing more is read.
    pub max_bytes: usize,
    /// Default longest wait for a matching network (label policies may say otherwise).
    pub max_wait: Duration,
}

/// `[scout]`: how networks are found.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoutConfig {
    /// Whether interfaces that no `[[network]]` matches become networks of their own (named
    /// after the interface, kind guessed from the name).
    pub auto_networks: bool,
    /// The scout daemon's Unix socket (`None`: the default place).
    pub socket: Option<PathBuf>,
    /// A `host:port` to connect to through every up network now and then, to measure RTT.
    pub probe: Option<String>,
    /// How often to probe.
    pub probe_interval: Duration,
}

/// A user allowed to authenticate to the proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The identity part of the username.
    pub name: String,
    /// The password.
    pub password: String,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User").field("name", &self.name).field("password", &"…").finish()
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1080))],
            socks_listen: Vec::new(),
            http_listen: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for DeferConfig {
    fn default() -> Self {
        DeferConfig { max_bytes: 256 * 1024, max_wait: Duration::from_secs(60) }
    }
}

impl Default for ScoutConfig {
    fn default() -> Self {
        ScoutConfig {
            auto_networks: true,
            socket: None,
            probe: None,
            probe_interval: Duration::from_secs(30),
        }
    }
}

impl Default for Config {
    /// The built-in defaults: listen on 127.0.0.1:1080, every up interface with a default route
    /// is a network, unlabelled traffic is ONDEMAND, deferral waits up to 60 s.
    fn default() -> Config {
        Config {
            proxy: ProxyConfig::default(),
            defer: DeferConfig::default(),
            scout: ScoutConfig::default(),
            networks: Vec::new(),
            policy: Policy::default(),
            rules: RuleSet::default(),
            users: Vec::new(),
            relay: None,
            source: None,
        }
    }
}

/// A config that cannot be used, and where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key or value is wrong.
    #[error("{file}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        /// The file name (or `<config>` for text without a file).
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The key the problem is at, when it can be told.
        key: Option<String>,
        /// What is wrong, in words.
        message: String,
    },
}

impl ConfigError {
    /// The line of the problem, for tests and tools (0 when the file could not be read).
    pub fn line(&self) -> usize {
        match self {
            ConfigError::Read { .. } => 0,
            ConfigError::Invalid { line, .. } => *line,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.source = Some(path.to_path_buf());
        // A relative key file is next to the config, wherever the program runs from.
        if let Some(relay) = &mut config.relay
            && relay.key.is_relative()
            && let Some(dir) = path.parent()
        {
            relay.key = dir.join(&relay.key);
        }
        Ok(config)
    }

    /// The config a program uses: `explicit` if given, else the file named by `$CMM_CONFIG`,
    /// else `/etc/cmm/proxy.toml` when it exists, else the built-in defaults.
    pub fn discover(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = explicit {
            return Config::load(path);
        }
        if let Some(path) = std::env::var_os("CMM_CONFIG").filter(|p| !p.is_empty()) {
            return Config::load(Path::new(&path));
        }
        let system = Path::new(SYSTEM_CONFIG);
        if system.exists() {
            return Config::load(system);
        }
        Ok(Config::default())
    }

    /// Validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let src = Source { text, file };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            src.error(span, e.message().trim_end())
        })?;
        raw.validate(&src)
    }

    /// Whether clients must authenticate (there are users).
    pub fn auth_required(&self) -> bool {
        !self.users.is_empty()
    }

    /// The classifier that turns interfaces into networks.
    pub fn classifier(&self) -> Classifier {
        Classifier::new(self.networks.clone(), self.scout.auto_networks)
    }

    /// Checks a username and password against the configured users.
    pub fn check_password(&self, name: &str, password: &str) -> bool {
        self.users
            .iter()
            .any(|u| u.name == name && constant_time_eq(u.password.as_bytes(), password.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Source<'a> {
    text: &'a str,
    file: &'a str,
}

impl Source<'_> {
    /// An error at a byte span, naming the key found on that line.
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self.text[line_start..start].chars().count() + 1;
        let line_text = self.text[line_start..].lines().next().unwrap_or("");
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            key: key_on_line(line_text, start - line_start),
            message: message.into(),
        }
    }
}

/// The key of a `key = value` line, or the word under the cursor when the error is on a key.
fn key_on_line(line: &str, at: usize) -> Option<String> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('#') || trimmed.is_empty() {
        return None;
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || at > line.len() { None } else { Some(key.to_string()) }
}

// ---------------------------------------------------------------------------------------------
// The raw schema, as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    default_labels: Option<Labels>,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    defer: RawDefer,
    #[serde(default)]
    scout: RawScout,
    #[serde(default)]
    network: Vec<Spanned<RawNetwork>>,
    #[serde(default)]
    label: OrderedMap<RawLabelPolicy>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    user: Vec<Spanned<RawUser>>,
    relay: Option<RawRelay>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    address: Spanned<String>,
    public_key: Spanned<String>,
    key: Spanned<PathBuf>,
    default_via: Option<Via>,
    fallback_after: Option<Spanned<String>>,
    grace: Option<ConfigDuration>,
    open_early: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Vec<Spanned<SocketAddr>>>,
    #[serde(default)]
    socks_listen: Vec<Spanned<SocketAddr>>,
    #[serde(default)]
    http_listen: Vec<Spanned<SocketAddr>>,
    connect_timeout: Option<Spanned<ConfigDuration>>,
    handshake_timeout: Option<Spanned<ConfigDuration>>,
    max_connections: Option<Spanned<u64>>,
    shutdown_grace: Option<ConfigDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefer {
    max_bytes: Option<Spanned<ConfigSize>>,
    max_wait: Option<ConfigDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScout {
    auto_networks: Option<bool>,
    socket: Option<PathBuf>,
    probe: Option<Spanned<String>>,
    probe_interval: Option<Spanned<ConfigDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: Spanned<String>,
    interface: Spanned<String>,
    kind: Option<NetworkKind>,
    bandwidth_down: Option<ConfigRate>,
    bandwidth_up: Option<ConfigRate>,
    rtt: Option<ConfigDuration>,
    metered: Option<bool>,
    use_estimates: Option<bool>,
    trickle: Option<bool>,
    trickle_fraction: Option<Spanned<f64>>,
    trickle_idle: Option<ConfigDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabelPolicy {
    via: Option<Spanned<Via>>,
    networks: Option<Vec<Spanned<String>>>,
    metered: Option<bool>,
    on_no_match: Option<RawNoMatch>,
    max_wait: Option<ConfigDuration>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawNoMatch {
    Defer,
    Fallback,
    Reject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    host: OneOrMany<String>,
    #[serde(default)]
    domain: OneOrMany<String>,
    #[serde(default)]
    glob: OneOrMany<String>,
    #[serde(default)]
    cidr: OneOrMany<CidrValue>,
    #[serde(default)]
    port: OneOrMany<PortValue>,
    #[serde(default)]
    user: OneOrMany<String>,
    labels: Labels,
    via: Option<Spanned<Via>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    password: String,
}

/// A port written as a number or as a string range.
struct PortValue(PortRange);

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port such as 443 or a range such as \"8000-8100\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortValue, E> {
                let p = u16::try_from(n).map_err(|_| E::custom(format!("{n} is not a port")))?;
                Ok(PortValue(PortRange { first: p, last: p }))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortValue, E> {
                PortRange::parse(s).map(PortValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// An address range (`10.0.0.0/8`) or a single address.
struct CidrValue(IpNet);

impl<'de> Deserialize<'de> for CidrValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(CidrValue(net));
        }
        match text.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(CidrValue(IpNet::from(ip))),
            Err(_) => {
                Err(de::Error::custom(format!("{text:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8")))
            }
        }
    }
}

/// A value that may be written alone or as a list.
struct OneOrMany<T>(Vec<T>);

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::IntoDeserializer;
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(|t| OneOrMany(vec![t]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(|t| OneOrMany(vec![t]))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A table whose keys keep their order and position.
struct OrderedMap<V>(Vec<(Spanned<String>, Spanned<V>)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(MapVisitor(PhantomData))
    }
}

impl Raw {
    fn validate(self, src: &Source<'_>) -> Result<Config, ConfigError> {
        let defaults = Config::default();
        let mut config = Config { source: None, ..defaults };

        // Users first: whether authentication is on decides whether a public listener is safe.
        let mut names = HashSet::new();
        for user in self.user {
            let u = user.into_inner();
            let name = u.name.get_ref();
            if name.is_empty() || name.contains(',') || name.contains(':') {
                return Err(
                    src.error(u.name.span(), "a user name must be non-empty and contain no ',' or ':'")
                );
            }
            if u.password.is_empty() {
                return Err(src.error(u.name.span(), format!("user {name:?} needs a non-empty password")));
            }
            if !names.insert(name.clone()) {
                return Err(src.error(u.name.span(), format!("user {name:?} is listed twice")));
            }
            config.users.push(User { name: u.name.into_inner(), password: u.password });
        }

        let p = self.proxy;
        let addrs = |v: Vec<Spanned<SocketAddr>>| -> Result<Vec<SocketAddr>, ConfigError> {
            let mut out = Vec::new();
            for a in v {
                if !a.get_ref().ip().is_loopback() && config.users.is_empty() {
                    return Err(src.error(
                        a.span(),
                        format!(
                            "listening on {} would make an open proxy: add [[user]] entries so that \
                             clients must authenticate, or listen on a loopback address",
                            a.get_ref()
                        ),
                    ));
                }
                out.push(a.into_inner());
            }
            Ok(out)
        };
        if let Some(listen) = p.listen {
            config.proxy.listen = addrs(listen)?;
        }
        config.proxy.socks_listen = addrs(p.socks_listen)?;
        config.proxy.http_listen = addrs(p.http_listen)?;
        if config.proxy.listen.is_empty()
            && config.proxy.socks_listen.is_empty()
            && config.proxy.http_listen.is_empty()
        {
            return Err(src.error(0..0, "[proxy] has no listener: set listen, socks_listen or http_listen"));
        }
        if let Some(d) = p.connect_timeout {
            config.proxy.connect_timeout = nonzero(d, src)?;
        }
        if let Some(d) = p.handshake_timeout {
            config.proxy.handshake_timeout = nonzero(d, src)?;
        }
        if let Some(d) = p.shutdown_grace {
            config.proxy.shutdown_grace = d.0;
        }
        if let Some(m) = p.max_connections {
            let n = *m.get_ref();
            if n == 0 || n > 1_000_000 {
                return Err(src.error(m.span(), "max_connections must be between 1 and 1000000"));
            }
            config.proxy.max_connections = n as usize;
        }

        if let Some(b) = self.defer.max_bytes {
            let n = b.get_ref().0;
            if n > 64 * 1024 * 1024 {
                return Err(src
                    .error(b.span(), "max_bytes above 64MiB: a deferred connection holds that much memory"));
            }
            config.defer.max_bytes = n as usize;
        }
        if let Some(d) = self.defer.max_wait {
            config.defer.max_wait = d.0;
        }
        if let Some(a) = self.scout.auto_networks {
            config.scout.auto_networks = a;
        }
        config.scout.socket = self.scout.socket;
        if let Some(p) = self.scout.probe {
            let ok = p
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(src.error(p.span(), format!("{:?} is not a host:port to probe", p.get_ref())));
            }
            config.scout.probe = Some(p.into_inner());
        }
        if let Some(i) = self.scout.probe_interval {
            config.scout.probe_interval = nonzero(i, src)?;
        }

        let mut network_names = HashSet::new();
        for (rank, net) in self.network.into_iter().enumerate() {
            let n = net.into_inner();
            if n.name.get_ref().is_empty() || n.name.get_ref() == "*" {
                return Err(src.error(n.name.span(), "a network needs a name other than \"\" or \"*\""));
            }
            if !network_names.insert(n.name.get_ref().clone()) {
                return Err(
                    src.error(n.name.span(), format!("network {:?} is declared twice", n.name.get_ref()))
                );
            }
            let iface = n.interface.get_ref();
            if iface.is_empty() || iface.len() > 15 && !iface.contains('*') {
                return Err(
                    src.error(n.interface.span(), format!("{iface:?} is not an interface name or pattern"))
                );
            }
            let kind = n.kind.unwrap_or_else(|| NetworkKind::guess(iface));
            let mut trickle = Trickle::default();
            if let Some(on) = n.trickle {
                trickle.enabled = on;
            }
            if let Some(f) = n.trickle_fraction {
                let v = *f.get_ref();
                if !(v > 0.0 && v <= 1.0) {
                    return Err(src.error(f.span(), format!("trickle_fraction {v} is not in (0, 1]")));
                }
                trickle.fraction = v;
            }
            if let Some(idle) = n.trickle_idle {
                trickle.idle = idle.0;
            }
            config.networks.push(NetworkDef {
                name: n.name.into_inner(),
                interface: Glob::new(iface),
                kind,
                declared: Figures {
                    bandwidth_down: n.bandwidth_down.map(|r| r.0),
                    bandwidth_up: n.bandwidth_up.map(|r| r.0),
                    rtt: n.rtt.map(|d| d.0),
                },
                metered: n.metered.unwrap_or(kind == NetworkKind::Cellular),
                use_estimates: n.use_estimates.unwrap_or(true),
                trickle,
                rank: rank as u32,
            });
        }

        config.policy.default_labels = self.default_labels.unwrap_or(Labels::ONDEMAND);
        config.policy.default_max_wait = config.defer.max_wait;
        let mut seen = HashSet::new();
        let mut label_via: Vec<(Labels, Spanned<Via>)> = Vec::new();
        for (key, lp) in self.label.0 {
            let labels: Labels = if key.get_ref() == "default" {
                Labels::NONE
            } else {
                key.get_ref()
                    .parse()
                    .map_err(|e| src.error(key.span(), format!("[label.{}]: {e}", key.get_ref())))?
            };
            if !seen.insert(labels) {
                return Err(src.error(key.span(), format!("a policy for {labels} is already defined")));
            }
            let lp = lp.into_inner();
            let networks = match lp.networks {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for entry in list {
                        let r = NetworkRef::parse(entry.get_ref());
                        if let NetworkRef::Named(g) = &r
                            && g.is_literal()
                            && !network_names.contains(entry.get_ref())
                            && !config.scout.auto_networks
                        {
                            return Err(src.error(
                                entry.span(),
                                format!("no [[network]] is named {:?}", entry.get_ref()),
                            ));
                        }
                        out.push(r);
                    }
                    if out.is_empty() {
                        return Err(
                            src.error(key.span(), "networks = [] allows nothing; leave it out to allow all")
                        );
                    }
                    Some(out)
                }
            };
            if let Some(v) = lp.via {
                label_via.push((labels, v));
            }
            config.policy.label_policies.push(LabelPolicy {
                labels,
                networks,
                metered: lp.metered.unwrap_or(true),
                on_no_match: match lp.on_no_match.unwrap_or(RawNoMatch::Defer) {
                    RawNoMatch::Defer => NoMatch::Defer,
                    RawNoMatch::Fallback => NoMatch::Fallback,
                    RawNoMatch::Reject => NoMatch::Reject,
                },
                max_wait: lp.max_wait.map_or(config.defer.max_wait, |d| d.0),
            });
        }

        config.relay = self.relay.map(|r| validate_relay(r, src)).transpose()?;
        for (labels, v) in label_via {
            match &mut config.relay {
                Some(relay) => relay.by_label.push((labels, v.into_inner())),
                None => {
                    return Err(
                        src.error(v.span(), format!("via = \"{}\" needs a [relay] section", v.get_ref()))
                    );
                }
            }
        }
        for rule in self.rule {
            let line = src_line(src, rule.span().start);
            let r = rule.into_inner();
            if let Some(v) = &r.via
                && config.relay.is_none()
            {
                return Err(src.error(v.span(), format!("via = \"{}\" needs a [relay] section", v.get_ref())));
            }
            config.rules.rules.push(Rule {
                via: r.via.map(Spanned::into_inner),
                hosts: r.host.0.iter().map(|h| h.trim_end_matches('.').to_ascii_lowercase()).collect(),
                domains: r.domain.0.iter().map(|d| d.trim_matches('.').to_ascii_lowercase()).collect(),
                globs: r.glob.0.iter().map(|g| Glob::new_case_insensitive(g)).collect(),
                cidrs: r.cidr.0.into_iter().map(|c| c.0).collect(),
                ports: r.port.0.into_iter().map(|p| p.0).collect(),
                users: r.user.0,
                labels: r.labels,
                line,
            });
        }
        Ok(config)
    }
}

/// `[relay]`: the address must be `host:port` and the key a relay public key.
fn validate_relay(r: RawRelay, src: &Source<'_>) -> Result<RelaySettings, ConfigError> {
    use base64::Engine;
    let address = r.address.get_ref();
    let port_ok = address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        return Err(src.error(r.address.span(), format!("{address:?} is not host:port")));
    }
    let key = r.public_key.get_ref().trim();
    let decoded = base64::engine::general_purpose::STANDARD.decode(key).ok();
    if decoded.is_none_or(|k| k.len() != 32) {
        return Err(src.error(
            r.public_key.span(),
            "not a relay public key (one base64 line of 32 bytes, as `cmm-relay keygen` prints)",
        ));
    }
    if r.key.get_ref().as_os_str().is_empty() {
        return Err(
            src.error(r.key.span(), "the proxy's key file is missing (`cmm-relay keygen FILE` makes one)")
        );
    }
    Ok(RelaySettings {
        address: address.clone(),
        public_key: key.to_string(),
        key: r.key.into_inner(),
        default_via: r.default_via.unwrap_or(Via::Relay),
        fallback_after: match &r.fallback_after {
            None => Some(Duration::from_secs(3)),
            Some(f) if f.get_ref() == "strict" => None,
            Some(f) => Some(crate::units::parse_duration(f.get_ref()).map_err(|_| {
                src.error(f.span(), "expected a duration such as \"3s\", or \"strict\" (never go direct)")
            })?),
        },
        grace: r.grace.map_or(Duration::from_secs(60), |d| d.0),
        by_label: Vec::new(),
        open_early: r.open_early.unwrap_or(true),
    })
}

fn src_line(src: &Source<'_>, at: usize) -> usize {
    src.text[..at.min(src.text.len())].matches('\n').count() + 1
}

fn nonzero(d: Spanned<ConfigDuration>, src: &Source<'_>) -> Result<Duration, ConfigError> {
    if d.get_ref().0.is_zero() {
        return Err(src.error(d.span(), "must be above zero"));
    }
    Ok(d.into_inner().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "proxy.toml").expect_err("expected an error")
    }

    #[test]
    fn empty_text_is_the_defaults() {
        let c = Config::parse("", "proxy.toml").unwrap();
        assert_eq!(c.proxy, ProxyConfig::default());
        assert_eq!(c.policy.default_labels, Labels::ONDEMAND);
        assert!(c.scout.auto_networks);
        assert!(!c.auth_required());
    }

    #[test]
    fn a_full_config_reads() {
        let text = r#"
default_labels = "ondemand"

[proxy]
listen = ["127.0.0.1:1080", "[::1]:1080"]
connect_timeout = "3s"
max_connections = 100

[defer]
max_bytes = "1MiB"
max_wait = "2m"

[[network]]
name = "wifi"
interface = "wlan*"
kind = "wifi"
bandwidth_down = "50mbit"
rtt = "40ms"

[[network]]
name = "cell"
interface = "wwan0"
bandwidth_down = "2mbit"

[label.background]
networks = ["wifi"]
metered = false
max_wait = "10m"

[label."ondemand+small"]
networks = ["cell", "*"]
on_no_match = "fallback"

[[rule]]
domain = "updates.example.com"
port = ["80", 443, "8000-8100"]
labels = "background+large"

[[rule]]
cidr = ["10.0.0.0/8", "fd00::1"]
labels = 0x10
"#;
        let c = Config::parse(text, "proxy.toml").unwrap();
        assert_eq!(c.proxy.listen.len(), 2);
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.defer.max_bytes, 1 << 20);
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks[1].kind, NetworkKind::Cellular);
        assert!(c.networks[1].metered, "cellular is metered unless said otherwise");
        assert_eq!(c.networks[0].declared.rtt, Some(Duration::from_millis(40)));
        assert_eq!(c.policy.label_policies.len(), 2);
        assert_eq!(c.policy.label_policies[0].max_wait, Duration::from_secs(600));
        assert_eq!(c.policy.label_policies[1].max_wait, Duration::from_secs(120));
        assert_eq!(c.rules.rules[0].ports.len(), 3);
        assert_eq!(c.rules.rules[0].line, 34);
        assert_eq!(c.rules.rules[1].labels, Labels::SMALL);
    }

    #[test]
    fn unknown_keys_name_key_and_line() {
        let e = err("[proxy]\nlisten = [\"127.0.0.1:1080\"]\nconect_timeout = \"5s\"\n");
        let msg = e.to_string();
        assert_eq!(e.line(), 3, "{msg}");
        assert!(msg.starts_with("proxy.toml:3:1:"), "{msg}");
        assert!(msg.contains("conect_timeout"), "{msg}");
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let e = err("[[rule]]\nhost = \"a.test\"\nlabels = \"backgrond\"\n");
        let msg = e.to_string();
        assert_eq!(e.line(), 3, "{msg}");
        assert!(msg.contains("key `labels`"), "{msg}");
        assert!(msg.contains("backgrond"), "{msg}");

        let e = err("[proxy]\nconnect_timeout = \"5 parsecs\"\n");
        assert_eq!(e.line(), 2);
        assert!(e.to_string().contains("key `connect_timeout`"), "{e}");

        let e = err("[[rule]]\nhost = \"a.test\"\nlabels = \"small\"\nvia = \"relay\"\n");
        assert_eq!(e.line(), 4, "{e}");
        assert!(e.to_string().contains("needs a [relay] section"), "{e}");
        let relay =
            "[relay]\naddress = \"relay.example:7443\"\npublic_key = \"{KEY}\"\nkey = \"proxy.key\"\n";
        let good_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let e = err(&relay.replace("{KEY}", "short"));
        assert_eq!(e.line(), 3, "{e}");
        assert!(
            e.to_string().contains("public_key") && e.to_string().contains("not a relay public key"),
            "{e}"
        );
        let e = err(&relay.replace("relay.example:7443", "relay.example").replace("{KEY}", good_key));
        assert_eq!(e.line(), 2, "{e}");
        assert!(e.to_string().contains("not host:port"), "{e}");
        let c = Config::parse(
            &format!(
                "{}\n[[rule]]\nport = 22\nlabels = \"small\"\nvia = \"direct\"\n",
                relay.replace("{KEY}", good_key)
            ),
            "t",
        )
        .unwrap();
        let r = c.relay.unwrap();
        assert_eq!(
            (r.default_via, r.fallback_after, r.grace, r.open_early),
            (Via::Relay, Some(Duration::from_secs(3)), Duration::from_secs(60), true)
        );
        assert_eq!(c.rules.rules[0].via, Some(Via::Direct));
        let c = Config::parse(
            &format!("[label.background]\nvia = \"direct\"\n\n{}", relay.replace("{KEY}", good_key)),
            "t",
        )
        .unwrap();
        assert_eq!(c.relay.unwrap().by_label, vec![(Labels::BACKGROUND, Via::Direct)]);
        let strict = relay.replace("{KEY}", good_key) + "fallback_after = \"strict\"\n";
        assert_eq!(Config::parse(&strict, "t").unwrap().relay.unwrap().fallback_after, None);
        let bad = relay.replace("{KEY}", good_key) + "fallback_after = \"soon\"\n";
        let e = Config::parse(&bad, "t").unwrap_err();
        assert!(e.to_string().contains("fallback_after") && e.to_string().contains("strict"), "{e}");
        let e = err("[label.background]\nvia = \"relay\"\n");
        assert_eq!(e.line(), 2, "{e}");
        let e = err("[[rule]]\ncidr = \"10.0.0.0/33\"\nlabels = \"small\"\n");
        assert_eq!(e.line(), 2, "{e}");
        assert!(e.to_string().contains("CIDR"), "{e}");

        let e = err("[[rule]]\nport = \"9000-80\"\nlabels = \"small\"\n");
        assert!(e.to_string().contains("empty"), "{e}");

        let e = err("[label.\"ondemand+background\"]\nmetered = false\n");
        assert!(e.to_string().contains("cannot be combined"), "{e}");

        let e = err("[label.background]\non_no_match = \"panic\"\n");
        assert_eq!(e.line(), 2, "{e}");
        assert!(e.to_string().contains("key `on_no_match`"), "{e}");
    }

    #[test]
    fn scout_keys() {
        let c = Config::parse(
            "[scout]\nsocket = \"/tmp/s.sock\"\nprobe = \"example.com:443\"\nprobe_interval = \"10s\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.scout.socket.as_deref(), Some(Path::new("/tmp/s.sock")));
        assert_eq!(c.scout.probe.as_deref(), Some("example.com:443"));
        assert_eq!(c.scout.probe_interval, Duration::from_secs(10));
        let e = err("[scout]\nprobe = \"nohost\"\n");
        assert_eq!(e.line(), 2);
    }

    #[test]
    fn trickle_keys() {
        let net = "[[network]]\nname = \"wifi\"\ninterface = \"wl*\"\n";
        let c = Config::parse(&format!("{net}trickle_fraction = 0.5\ntrickle_idle = \"2s\"\n"), "t").unwrap();
        let t = c.networks[0].trickle;
        assert_eq!((t.enabled, t.fraction, t.idle), (true, 0.5, Duration::from_secs(2)));
        let c = Config::parse(&format!("{net}trickle = false\n"), "t").unwrap();
        assert!(!c.networks[0].trickle.enabled);
        assert_eq!(Config::parse(net, "t").unwrap().networks[0].trickle, cmm_policy_trickle_default());
        let e = err(&format!("{net}trickle_fraction = 1.5\n"));
        assert_eq!(e.line(), 4, "{e}");
        assert!(e.to_string().contains("trickle_fraction"), "{e}");
    }

    fn cmm_policy_trickle_default() -> Trickle {
        Trickle { enabled: true, fraction: 0.9, idle: Duration::from_secs(5) }
    }

    #[test]
    fn an_open_proxy_is_refused() {
        let e = err("[proxy]\nlisten = [\"0.0.0.0:1080\"]\n");
        assert_eq!(e.line(), 2);
        assert!(e.to_string().contains("open proxy"), "{e}");
        let ok = "[proxy]\nlisten = [\"0.0.0.0:1080\"]\n[[user]]\nname = \"alice\"\npassword = \"pw\"\n";
        let c = Config::parse(ok, "proxy.toml").unwrap();
        assert!(c.auth_required());
        assert!(c.check_password("alice", "pw"));
        assert!(!c.check_password("alice", "PW"));
        assert!(!c.check_password("bob", "pw"));
    }

    #[test]
    fn references_to_unknown_networks_are_errors_without_auto_networks() {
        let e = err("[scout]\nauto_networks = false\n[label.background]\nnetworks = [\"wfi\"]\n");
        assert_eq!(e.line(), 4);
        assert!(e.to_string().contains("wfi"));
    }

    #[test]
    fn duplicates_are_errors() {
        let e = err(
            "[[network]]\nname = \"a\"\ninterface = \"x\"\n[[network]]\nname = \"a\"\ninterface = \"y\"\n",
        );
        assert_eq!(e.line(), 5);
        let e = err("[[user]]\nname = \"a\"\npassword = \"p\"\n[[user]]\nname = \"a\"\npassword = \"q\"\n");
        assert_eq!(e.line(), 5);
    }

    #[test]
    fn missing_file_says_which() {
        let e = Config::load(Path::new("/nonexistent/proxy.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/proxy.toml"));
    }
}

#[cfg(test)]
mod sample {
    use super::*;

    /// The commented sample at the repository root must always be valid, and mean what its
    /// comments say.
    #[test]
    fn the_sample_proxy_toml_is_valid() {
        let text = include_str!("../../proxy.toml");
        let c = Config::parse(text, "proxy.toml").unwrap_or_else(|e| panic!("{e}"));
        let d = Config::default();
        assert_eq!(c.proxy, d.proxy, "the sample's [proxy] values are the defaults");
        assert_eq!(c.defer, d.defer);
        assert_eq!(c.scout, d.scout);
        assert_eq!(c.policy.default_labels, Labels::ONDEMAND);
        assert_eq!(c.networks.len(), 2);
        assert!(c.networks[1].metered);
        assert_eq!(c.policy.label_policies.len(), 2);
        assert_eq!(c.rules.rules.len(), 2);
        assert!(!c.auth_required());
    }
}
