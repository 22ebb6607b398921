//! [`Labels`]: what a piece of traffic intends, as libcmm's bit set.
//!
//! The bit values are libcmm's, so that a C program written against the original `libcmm.h`
//! passes the same numbers. Text form: words joined by `+` (`background+large`), or a number
//! (`0x8`, `8`). Parsing rejects unknown words, unknown bits and contradictory pairs.

use std::fmt;
use std::str::FromStr;

/// A set of intent labels and network restrictions.
///
/// At most one of [`Labels::ONDEMAND`] / [`Labels::BACKGROUND`], at most one of
/// [`Labels::SMALL`] / [`Labels::LARGE`], and at most one of [`Labels::WIFI_ONLY`] /
/// [`Labels::CELLULAR_ONLY`]: a value built through [`Labels::from_bits`] or parsing always
/// obeys this.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Labels(u32);

/// One named label: its bit and the words that spell it.
struct Word {
    bits: u32,
    name: &'static str,
    aliases: &'static [&'static str],
}

/// The words in printing order. `wifi-preferred` is an alias for two bits and is only parsed.
const WORDS: &[Word] = &[
    Word { bits: Labels::ONDEMAND.0, name: "ondemand", aliases: &["on-demand", "foreground", "fg"] },
    Word { bits: Labels::BACKGROUND.0, name: "background", aliases: &["bg"] },
    Word { bits: Labels::SMALL.0, name: "small", aliases: &[] },
    Word { bits: Labels::LARGE.0, name: "large", aliases: &[] },
    Word { bits: Labels::WIFI_ONLY.0, name: "wifi-only", aliases: &["wifi_only"] },
    Word {
        bits: Labels::CELLULAR_ONLY.0,
        name: "cellular-only",
        aliases: &["cellular_only", "threeg-only", "cell-only"],
    },
    Word {
        bits: Labels::FALLBACK_ALLOWED.0,
        name: "fallback-allowed",
        aliases: &["fallback_allowed", "fallback"],
    },
];

/// Pairs that cannot be set together, with the message part naming them.
const CONFLICTS: &[(Labels, Labels)] = &[
    (Labels::ONDEMAND, Labels::BACKGROUND),
    (Labels::SMALL, Labels::LARGE),
    (Labels::WIFI_ONLY, Labels::CELLULAR_ONLY),
];

impl Labels {
    /// No label at all: the policy's default applies.
    pub const NONE: Labels = Labels(0);
    /// A person is waiting for this traffic (libcmm `CMM_LABEL_ONDEMAND`, 0x4).
    pub const ONDEMAND: Labels = Labels(0x4);
    /// Traffic that can wait, such as a sync (libcmm `CMM_LABEL_BACKGROUND`, 0x8).
    pub const BACKGROUND: Labels = Labels(0x8);
    /// A small transfer: latency matters more than bandwidth (`CMM_LABEL_SMALL`, 0x10).
    pub const SMALL: Labels = Labels(0x10);
    /// A large transfer: bandwidth matters more than latency (`CMM_LABEL_LARGE`, 0x20).
    pub const LARGE: Labels = Labels(0x20);
    /// Only a Wi-Fi (or other local, non-cellular) network may carry it (0x10000).
    pub const WIFI_ONLY: Labels = Labels(0x10000);
    /// Only a cellular network may carry it (libcmm `THREEG_ONLY`, 0x20000).
    pub const CELLULAR_ONLY: Labels = Labels(0x20000);
    /// The restriction is a preference: any network may carry it when none fits (0x100000).
    pub const FALLBACK_ALLOWED: Labels = Labels(0x100000);
    /// Wi-Fi when there is one, anything otherwise.
    pub const WIFI_PREFERRED: Labels = Labels(0x10000 | 0x100000);

    /// Every bit that has a meaning.
    pub const ALL_BITS: u32 = 0x4 | 0x8 | 0x10 | 0x20 | 0x10000 | 0x20000 | 0x100000;

    /// The labels of a raw bit set, or why the bits are not a valid set.
    pub fn from_bits(bits: u32) -> Result<Labels, LabelError> {
        let unknown = bits & !Self::ALL_BITS;
        if unknown != 0 {
            return Err(LabelError::UnknownBits(unknown));
        }
        let labels = Labels(bits);
        for (a, b) in CONFLICTS {
            if labels.contains(*a) && labels.contains(*b) {
                return Err(LabelError::Conflict(*a, *b));
            }
        }
        Ok(labels)
    }

    /// The raw bits, as the C API passes them.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether no label is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every label of `other` is set here.
    pub const fn contains(self, other: Labels) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any label of `other` is set here.
    pub const fn intersects(self, other: Labels) -> bool {
        self.0 & other.0 != 0
    }

    /// The union of two sets, checked for conflicts.
    pub fn union(self, other: Labels) -> Result<Labels, LabelError> {
        Labels::from_bits(self.0 | other.0)
    }

    /// Number of labels set (used to pick the most specific label policy).
    pub const fn count(self) -> u32 {
        self.0.count_ones()
    }

    /// Whether this traffic is foreground for pacing purposes: anything not labelled
    /// BACKGROUND is something a person may be waiting for.
    pub const fn is_foreground(self) -> bool {
        !self.contains(Labels::BACKGROUND)
    }

    /// Whether this traffic is background (it may be paced and deferred).
    pub const fn is_background(self) -> bool {
        self.contains(Labels::BACKGROUND)
    }

    /// The network restriction bits alone (wifi-only, cellular-only, fallback-allowed).
    pub const fn restrictions(self) -> Labels {
        Labels(self.0 & (0x10000 | 0x20000 | 0x100000))
    }
}

/// Why a text or a number is not a valid set of labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A word that names no label.
    #[error(
        "unknown label {0:?} (expected ondemand, background, small, large, wifi-only, \
         cellular-only, fallback-allowed, wifi-preferred, none, or a number such as 0x8)"
    )]
    UnknownWord(String),
    /// Two labels that exclude each other.
    #[error("labels {0} and {1} cannot be combined")]
    Conflict(Labels, Labels),
    /// Bits that have no meaning.
    #[error("unknown label bits {0:#x}")]
    UnknownBits(u32),
    /// An empty word, as in `ondemand++small`.
    #[error("empty label in {0:?}")]
    EmptyWord(String),
}

impl FromStr for Labels {
    type Err = LabelError;

    fn from_str(text: &str) -> Result<Labels, LabelError> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("none") {
            return Ok(Labels::NONE);
        }
        let mut bits = 0u32;
        for word in text.split('+') {
            let word = word.trim();
            if word.is_empty() {
                return Err(LabelError::EmptyWord(text.to_string()));
            }
            bits |= parse_word(word)?;
        }
        Labels::from_bits(bits)
    }
}

fn parse_word(word: &str) -> Result<u32, LabelError> {
    let lower = word.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u32::from_str_radix(hex, 16).map_err(|_| LabelError::UnknownWord(word.to_string()));
    }
    if lower.bytes().all(|b| b.is_ascii_digit()) {
        return lower.parse::<u32>().map_err(|_| LabelError::UnknownWord(word.to_string()));
    }
    if lower == "wifi-preferred" || lower == "wifi_preferred" {
        return Ok(Labels::WIFI_PREFERRED.0);
    }
    WORDS
        .iter()
        .find(|w| w.name == lower || w.aliases.contains(&lower.as_str()))
        .map(|w| w.bits)
        .ok_or_else(|| LabelError::UnknownWord(word.to_string()))
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for word in WORDS {
            if self.0 & word.bits != 0 {
                if !first {
                    f.write_str("+")?;
                }
                f.write_str(word.name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Labels({self} = {:#x})", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("labels such as \"background+large\" or a number such as 8")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Labels, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Labels, E> {
                let bits = u32::try_from(v).map_err(|_| E::custom(LabelError::UnknownBits(0)))?;
                Labels::from_bits(bits).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn words_and_numbers_parse() {
        assert_eq!("ondemand".parse(), Ok(Labels::ONDEMAND));
        assert_eq!("Background+LARGE".parse(), Ok(Labels(0x8 | 0x20)));
        assert_eq!("0x8".parse(), Ok(Labels::BACKGROUND));
        assert_eq!("8".parse(), Ok(Labels::BACKGROUND));
        assert_eq!("ondemand + small".parse(), Ok(Labels(0x14)));
        assert_eq!("wifi-preferred".parse(), Ok(Labels::WIFI_PREFERRED));
        assert_eq!("none".parse(), Ok(Labels::NONE));
        assert_eq!("".parse(), Ok(Labels::NONE));
    }

    #[test]
    fn errors_say_which() {
        let err = "backgrond".parse::<Labels>().unwrap_err();
        assert_eq!(err, LabelError::UnknownWord("backgrond".into()));
        assert!(err.to_string().contains("\"backgrond\""));
        let err = "ondemand+background".parse::<Labels>().unwrap_err();
        assert_eq!(err.to_string(), "labels ondemand and background cannot be combined");
        let err = "small+large".parse::<Labels>().unwrap_err();
        assert_eq!(err.to_string(), "labels small and large cannot be combined");
        assert_eq!("0x1".parse::<Labels>(), Err(LabelError::UnknownBits(1)));
        assert!(matches!("ondemand++small".parse::<Labels>(), Err(LabelError::EmptyWord(_))));
    }

    #[test]
    fn prints_canonically() {
        assert_eq!(Labels(0x8 | 0x20).to_string(), "background+large");
        assert_eq!(Labels::NONE.to_string(), "none");
        assert_eq!(Labels::WIFI_PREFERRED.to_string(), "wifi-only+fallback-allowed");
    }

    fn valid_labels() -> impl Strategy<Value = Labels> {
        (0u8..3, 0u8..3, 0u8..3, any::<bool>()).prop_map(|(fg, size, net, fb)| {
            let mut bits = [0, 0x4, 0x8][fg as usize] | [0, 0x10, 0x20][size as usize];
            bits |= [0, 0x10000, 0x20000][net as usize];
            if fb {
                bits |= 0x100000;
            }
            Labels(bits)
        })
    }

    proptest! {
        #[test]
        fn display_round_trips(labels in valid_labels()) {
            let text = labels.to_string();
            prop_assert_eq!(text.parse::<Labels>(), Ok(labels));
            prop_assert_eq!(Labels::from_bits(labels.bits()), Ok(labels));
        }

        #[test]
        fn any_bits_either_parse_or_explain(bits in any::<u32>()) {
            match Labels::from_bits(bits) {
                Ok(l) => prop_assert_eq!(l.bits(), bits),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<Labels>();
        }
    }
}
