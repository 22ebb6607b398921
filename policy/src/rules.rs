//! [`RuleSet`]: destination rules that give labels to traffic that carries none.
//!
//! A rule lists conditions — host names, domain suffixes, globs, CIDRs, ports, inbound users —
//! and the labels it gives. Within one key any value may match; across keys all must match; a
//! rule with no condition matches everything. The first matching rule wins.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::glob::Glob;
use crate::labels::Labels;

/// An inclusive range of ports (`22`, or `8000-8100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port in the range.
    pub first: u16,
    /// Last port in the range (equal to `first` for a single port).
    pub last: u16,
}

impl PortRange {
    /// Parses `22` or `8000-8100`.
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let bad = || format!("{text:?} is not a port or a port range such as 8000-8100");
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text.trim(), text.trim()),
        };
        let first: u16 = a.parse().map_err(|_| bad())?;
        let last: u16 = b.parse().map_err(|_| bad())?;
        if first > last {
            return Err(format!("port range {text:?} is empty: {first} is above {last}"));
        }
        Ok(PortRange { first, last })
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One rule of `proxy.toml`'s `[[rule]]` list.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// Exact host names (case-insensitive).
    pub hosts: Vec<String>,
    /// Domain suffixes: `example.com` matches itself and every name below it.
    pub domains: Vec<String>,
    /// Host name patterns.
    pub globs: Vec<Glob>,
    /// Address ranges, matched against IP destinations and resolved addresses.
    pub cidrs: Vec<IpNet>,
    /// Destination ports.
    pub ports: Vec<PortRange>,
    /// Inbound user names (the identity part of the proxy username).
    pub users: Vec<String>,
    /// The labels given to matching traffic.
    pub labels: Labels,
    /// Whether matching traffic rides the relay or goes direct (`None`: the relay's
    /// `default_via`).
    pub via: Option<Via>,
    /// Line of the rule in the config, for logs (0 when built in code).
    pub line: usize,
}

/// How a connection reaches its destination when a relay is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// As a stream of the proxy's session with the relay: it survives the loss of a network.
    Relay,
    /// From this machine, through the chosen network.
    Direct,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Relay => "relay",
            Via::Direct => "direct",
        })
    }
}

/// Where a connection goes and who asked, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    /// The host name when the client gave one (`socks5h://`, HTTP), else `None`.
    pub host: Option<&'a str>,
    /// The destination addresses: the IP the client gave, or what the name resolved to.
    pub addrs: &'a [IpAddr],
    /// Destination port.
    pub port: u16,
    /// The authenticated inbound user, if any.
    pub user: Option<&'a str>,
}

impl Rule {
    /// Whether the rule applies to `dest`.
    pub fn matches(&self, dest: &Destination<'_>) -> bool {
        let host = dest.host.map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        let host = host.as_deref();
        let any_host = |f: &dyn Fn(&str) -> bool| host.is_some_and(f);
        (self.hosts.is_empty() || any_host(&|h| self.hosts.iter().any(|x| x == h)))
            && (self.domains.is_empty() || any_host(&|h| self.domains.iter().any(|d| domain_matches(d, h))))
            && (self.globs.is_empty() || any_host(&|h| self.globs.iter().any(|g| g.matches(h))))
            && (self.cidrs.is_empty()
                || dest.addrs.iter().any(|a| self.cidrs.iter().any(|c| c.contains(&canonical(*a)))))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dest.port)))
            && (self.users.is_empty() || dest.user.is_some_and(|u| self.users.iter().any(|x| x == u)))
    }

    /// Whether the rule looks at destination addresses, so a name must be resolved first.
    pub fn needs_addresses(&self) -> bool {
        !self.cidrs.is_empty()
    }
}

/// IPv4-mapped IPv6 addresses are matched as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

fn domain_matches(domain: &str, host: &str) -> bool {
    host == domain
        || (host.len() > domain.len()
            && host.ends_with(domain)
            && host.as_bytes()[host.len() - domain.len() - 1] == b'.')
}

/// The rules in order; the first match wins.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The first rule that matches `dest`, if any.
    pub fn find(&self, dest: &Destination<'_>) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(dest))
    }

    /// Whether any rule needs resolved addresses to decide.
    pub fn needs_addresses(&self) -> bool {
        self.rules.iter().any(Rule::needs_addresses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest<'a>(host: Option<&'a str>, addrs: &'a [IpAddr], port: u16) -> Destination<'a> {
        Destination { host, addrs, port, user: None }
    }

    #[test]
    fn conditions_combine() {
        let rule = Rule {
            domains: vec!["example.com".into()],
            ports: vec![PortRange::parse("8000-8100").unwrap()],
            labels: Labels::BACKGROUND,
            ..Rule::default()
        };
        assert!(rule.matches(&dest(Some("dl.example.com"), &[], 8080)));
        assert!(rule.matches(&dest(Some("Example.COM."), &[], 8000)));
        assert!(!rule.matches(&dest(Some("dl.example.com"), &[], 443)));
        assert!(!rule.matches(&dest(Some("badexample.com"), &[], 8080)));
        assert!(!rule.matches(&dest(None, &["1.2.3.4".parse().unwrap()], 8080)));
    }

    #[test]
    fn cidr_and_user() {
        let rule = Rule {
            cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            users: vec!["alice".into()],
            ..Rule::default()
        };
        let v4 = ["10.1.2.3".parse().unwrap()];
        let mapped = ["::ffff:10.1.2.3".parse().unwrap()];
        let v6 = ["fd01::1".parse().unwrap()];
        let mut d = dest(None, &v4, 80);
        assert!(!rule.matches(&d));
        d.user = Some("alice");
        assert!(rule.matches(&d));
        assert!(rule.matches(&Destination { addrs: &mapped, ..d }));
        assert!(rule.matches(&Destination { addrs: &v6, ..d }));
        assert!(rule.needs_addresses());
    }

    #[test]
    fn first_match_wins_and_empty_rule_matches_all() {
        let set = RuleSet {
            rules: vec![
                Rule { hosts: vec!["a.test".into()], labels: Labels::SMALL, ..Rule::default() },
                Rule { labels: Labels::BACKGROUND, ..Rule::default() },
            ],
        };
        assert_eq!(set.find(&dest(Some("a.test"), &[], 1)).unwrap().labels, Labels::SMALL);
        assert_eq!(set.find(&dest(Some("b.test"), &[], 1)).unwrap().labels, Labels::BACKGROUND);
    }

    #[test]
    fn port_ranges() {
        assert!(PortRange::parse("22").unwrap().contains(22));
        assert!(PortRange::parse("9-7").unwrap_err().contains("empty"));
        assert!(PortRange::parse("http").is_err());
        assert!(PortRange::parse("70000").is_err());
    }
}
