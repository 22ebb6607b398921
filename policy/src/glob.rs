//! [`Glob`]: shell-style wildcards (`*`, `?`) for interface names (`wlan*`) and host names
//! (`*.example.*`). Matching is iterative and linear in practice; it never recurses.

use std::fmt;

/// A pattern with `*` (any run of characters, possibly empty) and `?` (one character).
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<char>,
    case_insensitive: bool,
}

impl Glob {
    /// A case-sensitive pattern (interface names).
    pub fn new(pattern: &str) -> Glob {
        Glob { pattern: pattern.chars().collect(), case_insensitive: false }
    }

    /// A case-insensitive pattern (host names).
    pub fn new_case_insensitive(pattern: &str) -> Glob {
        Glob { pattern: pattern.to_lowercase().chars().collect(), case_insensitive: true }
    }

    /// Whether the pattern has any wildcard at all.
    pub fn is_literal(&self) -> bool {
        !self.pattern.iter().any(|&c| c == '*' || c == '?')
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = if self.case_insensitive {
            text.to_lowercase().chars().collect()
        } else {
            text.chars().collect()
        };
        let p = &self.pattern;
        let (mut pi, mut ti) = (0usize, 0usize);
        // Position of the last `*` seen and the text position it was tried at.
        let mut star: Option<(usize, usize)> = None;
        while ti < text.len() {
            if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if pi < p.len() && (p[pi] == '?' || p[pi] == text[ti]) {
                pi += 1;
                ti += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == '*' {
            pi += 1;
        }
        pi == p.len()
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: String = self.pattern.iter().collect();
        f.write_str(&s)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards() {
        assert!(Glob::new("wlan*").matches("wlan0"));
        assert!(Glob::new("wlan*").matches("wlan"));
        assert!(!Glob::new("wlan*").matches("wwan0"));
        assert!(Glob::new("wl?n0").matches("wlan0"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
        assert!(Glob::new_case_insensitive("*.Example.COM").matches("www.example.com"));
        assert!(!Glob::new("eth0").matches("eth01"));
        assert!(Glob::new("eth0").is_literal());
    }

    proptest! {
        #[test]
        fn literal_patterns_match_only_themselves(a in "[a-z0-9]{0,8}", b in "[a-z0-9]{0,8}") {
            prop_assert_eq!(Glob::new(&a).matches(&b), a == b);
        }

        #[test]
        fn star_matches_any_suffix(prefix in "[a-z]{0,6}", rest in ".{0,10}") {
            let pattern = format!("{prefix}*");
            let text = format!("{prefix}{rest}");
            prop_assert!(Glob::new(&pattern).matches(&text));
        }
    }
}
