//! Human units in the config: durations (`250ms`, `5s`, `10m`), rates (`50mbit`, `2Mbit/s`)
//! and sizes (`256KiB`, `1MB`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `250ms`, `5s`, `1.5s`, `10m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = split_number(text);
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration (examples: 250ms, 5s, 10m, 1h)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" => 0.001,
        "" | "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?} (use ms, s, m or h)")),
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a rate in bits per second: `50mbit`, `2Mbit/s`, `500kbit`, `1gbit`, `10MB/s` (bytes),
/// or a bare number of bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = split_number(text);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a rate (examples: 2mbit, 50mbit, 1gbit, 10MB/s)"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(unit);
    let scale = match unit {
        "" | "bit" | "b" => 1.0,
        "k" | "kbit" | "Kbit" | "kb" => 1e3,
        "m" | "M" | "mbit" | "Mbit" | "mb" => 1e6,
        "g" | "G" | "gbit" | "Gbit" | "gb" => 1e9,
        "B" | "bytes" => 8.0,
        "KB" | "kB" => 8e3,
        "MB" => 8e6,
        "GB" => 8e9,
        other => {
            return Err(format!(
                "unknown rate unit {other:?} in {text:?} (use kbit, mbit, gbit, or KB/s, MB/s for bytes)"
            ));
        }
    };
    let bits = value * scale;
    if !(0.0..=1e15).contains(&bits) {
        return Err(format!("rate {text:?} is out of range"));
    }
    Ok(bits.round() as u64)
}

/// Parses a size in bytes: `65536`, `64KiB`, `256KB`, `1MiB`, `1MB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = split_number(text);
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let scale = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "K" | "k" | "KB" | "kB" | "kb" => 1e3,
        "KiB" | "Ki" => 1024.0,
        "M" | "MB" | "mb" => 1e6,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use B, KiB, MiB, KB, MB)")),
    };
    let bytes = value * scale;
    if !(0.0..=1e15).contains(&bytes) {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

fn split_number(text: &str) -> (&str, &str) {
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(text.len());
    (&text[..end], &text[end..])
}

/// Prints bits per second as `50 Mbit/s`.
pub fn format_rate(bits_per_sec: u64) -> String {
    let b = bits_per_sec as f64;
    if b >= 1e9 {
        format!("{:.1} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} Mbit/s", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} kbit/s", b / 1e3)
    } else {
        format!("{b} bit/s")
    }
}

macro_rules! unit_type {
    ($(#[$m:meta])* $name:ident, $inner:ty, $parse:path, $what:literal, $from_int:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $parse(v).map($name).map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$name, E> {
                        let v = u64::try_from(v).map_err(|_| E::custom(concat!($what, " cannot be negative")))?;
                        Ok($name($from_int(v)))
                    }
                    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<$name, E> {
                        $parse(&v.to_string()).map($name).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

unit_type!(
    /// A duration written as `250ms`, `5s`, `10m` (a bare number is seconds).
    ConfigDuration, Duration, parse_duration, "a duration such as \"5s\" or \"250ms\"", Duration::from_secs
);
unit_type!(
    /// A rate in bits per second written as `50mbit` (a bare number is bits per second).
    ConfigRate, u64, parse_rate, "a rate such as \"50mbit\"", |v| v
);
unit_type!(
    /// A size in bytes written as `256KiB` (a bare number is bytes).
    ConfigSize, u64, parse_size, "a size such as \"256KiB\"", |v| v
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50mbit"), Ok(50_000_000));
        assert_eq!(parse_rate("2Mbit/s"), Ok(2_000_000));
        assert_eq!(parse_rate("500kbit"), Ok(500_000));
        assert_eq!(parse_rate("10MB/s"), Ok(80_000_000));
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        assert!(parse_rate("fast").is_err());
        assert_eq!(format_rate(50_000_000), "50.0 Mbit/s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}
