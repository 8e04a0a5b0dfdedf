//! Human-friendly quantities used in flags and config files: durations such as
//! `30m` or `2h`, and byte sizes such as `20G` or `512MiB`.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written for humans (`90s`, `30m`, `2h`, `1day 2h`).
///
/// Zero is rejected: every place drv-thru takes a duration means a limit or a
/// lifetime, and a zero one would make the thing unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(Duration);

/// Why a duration or byte size did not parse.
#[derive(Debug, thiserror::Error)]
pub enum ParseQuantityError {
    /// The text is not a duration humantime understands.
    #[error("invalid duration {text:?}: {reason} (examples: 90s, 30m, 2h, 7days)")]
    Duration {
        /// The rejected input.
        text: String,
        /// humantime's explanation.
        reason: humantime::DurationError,
    },
    /// A duration of zero.
    #[error("duration {0:?} is zero; give a positive duration such as 30m")]
    ZeroDuration(String),
    /// The text is not a byte size.
    #[error("invalid size {0:?} (examples: 20G, 512MiB, 1048576)")]
    Bytes(String),
    /// The size does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    BytesOverflow(String),
}

impl HumanDuration {
    /// Wraps a duration; callers guarantee it is not zero.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// The duration itself.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = ParseQuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let duration = humantime::parse_duration(text.trim()).map_err(|reason| {
            ParseQuantityError::Duration {
                text: text.to_owned(),
                reason,
            }
        })?;
        if duration.is_zero() {
            return Err(ParseQuantityError::ZeroDuration(text.to_owned()));
        }
        Ok(Self(duration))
    }
}

impl TryFrom<Duration> for HumanDuration {
    type Error = ParseQuantityError;

    fn try_from(duration: Duration) -> Result<Self, Self::Error> {
        if duration.is_zero() {
            return Err(ParseQuantityError::ZeroDuration("0s".to_owned()));
        }
        Ok(Self(duration))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Whole seconds: sub-second precision only adds noise to limits.
        humantime::format_duration(Duration::from_secs(self.0.as_secs().max(1))).fmt(f)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte count written for humans.
///
/// Single-letter suffixes are binary, as in Nix and most Unix tools
/// (`20G` = 20 GiB); `KiB`/`MiB`/`GiB`/`TiB` mean the same, and `KB`/`MB`/
/// `GB`/`TB` are decimal. A bare number is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

impl ByteSize {
    /// A size of `bytes` bytes.
    pub const fn new(bytes: u64) -> Self {
        Self(bytes)
    }

    /// The number of bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseQuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, suffix) = trimmed.split_at(split);
        if digits.is_empty() {
            return Err(ParseQuantityError::Bytes(text.to_owned()));
        }
        let multiplier: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(ParseQuantityError::Bytes(text.to_owned())),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .map(Self)
            .ok_or_else(|| ParseQuantityError::BytesOverflow(text.to_owned()))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the shortest exact binary form (`20G`), falling back to bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "T"),
            (1 << 30, "G"),
            (1 << 20, "M"),
            (1 << 10, "K"),
        ];
        for (size, suffix) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{suffix}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    /// Accepts a string (`"20G"`) or a plain number of bytes.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Formats a byte count for people: `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A count with its noun agreeing: `1 input`, `2 inputs`, `0 inputs`.
pub fn plural(count: impl Into<u64>, one: &str, many: &str) -> String {
    let count = count.into();
    format!("{count} {}", if count == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(plural(1u32, "input", "inputs"), "1 input");
        assert_eq!(plural(0u32, "input", "inputs"), "0 inputs");
        assert_eq!(plural(2u64, "path", "paths"), "2 paths");
    }

    #[test]
    fn parses_durations_people_write() {
        assert_eq!(
            "30m".parse::<HumanDuration>().unwrap().get(),
            Duration::from_secs(1800)
        );
        assert_eq!(
            "2h".parse::<HumanDuration>().unwrap().get(),
            Duration::from_secs(7200)
        );
        assert_eq!(
            "1h 30m".parse::<HumanDuration>().unwrap().get(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            " 90s ".parse::<HumanDuration>().unwrap().get(),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn rejects_zero_and_garbage_durations() {
        assert!(matches!(
            "0s".parse::<HumanDuration>(),
            Err(ParseQuantityError::ZeroDuration(_))
        ));
        let err = "soon".parse::<HumanDuration>().unwrap_err().to_string();
        assert!(err.contains("\"soon\"") && err.contains("30m"), "{err}");
        assert!("".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn durations_round_trip_through_display() {
        for text in ["30m", "2h", "1day 2h 3m 4s"] {
            let parsed: HumanDuration = text.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<HumanDuration>().unwrap(), parsed);
        }
    }

    #[test]
    fn parses_byte_sizes_binary_and_decimal() {
        let cases = [
            ("20G", 20 << 30),
            ("20GiB", 20 << 30),
            ("20 GiB", 20 << 30),
            ("512m", 512 << 20),
            ("1K", 1024),
            ("1KB", 1000),
            ("5GB", 5_000_000_000),
            ("0", 0),
            ("1048576", 1 << 20),
            ("3b", 3),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>().unwrap().get(), bytes, "{text}");
        }
    }

    #[test]
    fn rejects_bad_byte_sizes() {
        for text in ["", "G", "-1G", "1.5G", "12X", "99999999999T"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text}");
        }
    }

    #[test]
    fn byte_sizes_display_exactly() {
        assert_eq!(ByteSize::new(20 << 30).to_string(), "20G");
        assert_eq!(ByteSize::new(1536).to_string(), "1536");
        assert_eq!(ByteSize::new(3 << 20).to_string(), "3M");
        for n in [0u64, 1, 1023, 1024, 1 << 40, 123_456_789] {
            assert_eq!(
                ByteSize::new(n)
                    .to_string()
                    .parse::<ByteSize>()
                    .unwrap()
                    .get(),
                n
            );
        }
    }

    #[test]
    fn byte_sizes_deserialize_from_number_or_string() {
        let sizes: Vec<ByteSize> = serde_json::from_str(r#"["20G", 1024]"#).unwrap();
        assert_eq!(sizes, [ByteSize::new(20 << 30), ByteSize::new(1024)]);
    }

    #[test]
    fn formats_bytes_for_people() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(20 << 30), "20.0 GiB");
    }
}
