//! Who the client is and which labels it asked for, from the proxy username.
//!
//! The username carries the labels, so that any client that can set a proxy URL can label its
//! traffic: `socks5h://background@127.0.0.1:1080`, `http://ondemand+small@127.0.0.1:1080`.
//!
//! - Without `[[user]]` entries (the default), the username is only labels, and the password is
//!   ignored — curl sends an empty one, which is fine. An empty username means no label.
//! - With users, clients must authenticate: the username is `NAME` or `NAME,LABELS` (for
//!   example `alice,background`) and the password is NAME's password. The identity can be
//!   matched by `user = "alice"` in `[[rule]]`s.
//!
//! A label that does not parse is an error, not silently ignored: a typo would otherwise send
//! traffic where the user did not intend.

use cmm_policy::{Config, LabelError, Labels};

/// What the credentials say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The authenticated user, when authentication is on.
    pub user: Option<String>,
    /// The labels from the username, when it has any.
    pub labels: Option<Labels>,
}

/// Why credentials are refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Authentication is on and the client sent no credentials.
    #[error("this proxy requires a username and password")]
    Missing,
    /// Wrong user name or password.
    #[error("unknown user {0:?} or wrong password")]
    BadPassword(String),
    /// The labels in the username do not parse.
    #[error("bad labels in the proxy username: {0}")]
    BadLabels(LabelError),
    /// A `NAME,LABELS` username while this proxy has no users.
    #[error("this proxy has no users: write only labels in the username (such as \"background\"), not {0:?}")]
    NoUsers(String),
}

/// Checks credentials (`None` when the client sent none) against the config.
pub fn identify(config: &Config, credentials: Option<(&str, &str)>) -> Result<Identity, AuthError> {
    let Some((username, password)) = credentials else {
        return if config.auth_required() { Err(AuthError::Missing) } else { Ok(Identity::default()) };
    };
    if config.auth_required() {
        let (name, labels) = match username.split_once(',') {
            Some((name, labels)) => (name, Some(labels)),
            None => (username, None),
        };
        if !config.check_password(name, password) {
            return Err(AuthError::BadPassword(name.to_string()));
        }
        let labels = labels.map(parse_labels).transpose()?;
        return Ok(Identity { user: Some(name.to_string()), labels });
    }
    if username.contains(',') {
        return Err(AuthError::NoUsers(username.to_string()));
    }
    let labels = if username.trim().is_empty() { None } else { Some(parse_labels(username)?) };
    Ok(Identity { user: None, labels })
}

fn parse_labels(text: &str) -> Result<Labels, AuthError> {
    // URL userinfo cannot hold a literal '+' in every client: accept '|' and ' ' too.
    let text = text.replace(['|', ' '], "+");
    text.parse::<Labels>().map_err(AuthError::BadLabels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_users() -> Config {
        Config::parse("[[user]]\nname = \"alice\"\npassword = \"pw\"\n", "test").unwrap()
    }

    #[test]
    fn without_users_the_username_is_labels() {
        let c = Config::default();
        assert_eq!(identify(&c, None), Ok(Identity::default()));
        assert_eq!(
            identify(&c, Some(("background", ""))),
            Ok(Identity { user: None, labels: Some(Labels::BACKGROUND) })
        );
        assert_eq!(
            identify(&c, Some(("ondemand+small", "x"))).unwrap().labels,
            Some("ondemand+small".parse().unwrap())
        );
        assert_eq!(identify(&c, Some(("", ""))), Ok(Identity::default()));
        assert!(matches!(identify(&c, Some(("backgrond", ""))), Err(AuthError::BadLabels(_))));
        assert!(matches!(identify(&c, Some(("alice,background", "pw"))), Err(AuthError::NoUsers(_))));
    }

    #[test]
    fn with_users_identity_and_labels_combine() {
        let c = with_users();
        assert_eq!(identify(&c, None), Err(AuthError::Missing));
        assert_eq!(
            identify(&c, Some(("alice", "pw"))),
            Ok(Identity { user: Some("alice".into()), labels: None })
        );
        assert_eq!(
            identify(&c, Some(("alice,background", "pw"))),
            Ok(Identity { user: Some("alice".into()), labels: Some(Labels::BACKGROUND) })
        );
        assert_eq!(identify(&c, Some(("alice", "nope"))), Err(AuthError::BadPassword("alice".into())));
        assert_eq!(identify(&c, Some(("background", ""))), Err(AuthError::BadPassword("background".into())));
        assert!(matches!(
            identify(&c, Some(("alice,ondemand+background", "pw"))),
            Err(AuthError::BadLabels(_))
        ));
    }
}
