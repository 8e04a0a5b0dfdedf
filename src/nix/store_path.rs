//! Store paths: `/nix/store/<hash>-<name>`, validated as Nix validates them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::nix::base32;

/// The only store directory drv-thru supports. Store paths hash the store directory in, so paths from a
/// store elsewhere could never match the ones the peer computes.
pub const STORE_DIR: &str = "/nix/store";

/// Longest store path name Nix accepts: 255 (a file name) less the hash and the dash, less 11 spare
/// characters Nix keeps for suffixes such as `.lock` and `.chroot`.
pub const MAX_NAME_LEN: usize = 211;

/// Number of bytes in a store path hash.
const HASH_BYTES: usize = 20;

/// Number of nix base-32 characters in the hash part of a store path.
const HASH_CHARS: usize = base32::encoded_len(HASH_BYTES);

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StorePathError {
    /// The path does not start with `/nix/store/`.
    #[error("path {0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    /// The path goes below a store entry, e.g. `/nix/store/<hash>-foo/bin`.
    #[error("path {0:?} is not a direct child of {STORE_DIR}")]
    NotDirectChild(String),
    /// The base name is too short to hold a hash, a dash and a name.
    #[error("store path base name {0:?} is too short")]
    TooShort(String),
    /// The hash part is not 32 nix base-32 characters.
    #[error("store path {path:?} has an invalid hash part")]
    Hash {
        /// The rejected path or base name.
        path: String,
        /// What is wrong with the hash part.
        #[source]
        source: base32::Base32Error,
    },
    /// There is no dash between the hash part and the name.
    #[error("store path base name {0:?} has no dash after the hash")]
    NoDash(String),
    /// The name part breaks Nix's naming rules.
    #[error("invalid store path name {name:?}: {reason}")]
    Name {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

/// The hash part of a store path: 20 bytes, written as 32 nix base-32 characters.
///
/// `Ord` follows the written form, as Nix sorts store paths by their text.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StorePathHash([u8; HASH_BYTES]);

impl StorePathHash {
    /// Wraps 20 raw hash bytes.
    pub const fn from_bytes(bytes: [u8; HASH_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes.
    pub const fn as_bytes(&self) -> &[u8; HASH_BYTES] {
        &self.0
    }
}

impl Ord for StorePathHash {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The text encodes the bytes as a little-endian number, most significant digit first, with an
        // alphabet in ASCII order; comparing the bytes from the last one compares the text.
        self.0.iter().rev().cmp(other.0.iter().rev())
    }
}

impl PartialOrd for StorePathHash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32::encode(&self.0))
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({self})")
    }
}

impl FromStr for StorePathHash {
    type Err = base32::Base32Error;

    /// Parses the 32-character hash part, e.g. `i9pmrzmpshapij2kin22pff6fc2adavx`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        base32::decode(s).map(Self)
    }
}

/// A store object's path, `/nix/store/<hash>-<name>`, with both parts checked.
///
/// It is always a direct child of [`STORE_DIR`]. Displays and serializes as the full path; `Ord` is
/// the order of those strings, which is the order Nix uses in reference lists and hashes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

impl StorePath {
    /// Builds a store path from a hash and a name, checking the name.
    pub fn from_parts(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Parses a base name `<hash>-<name>`, as narinfo `References:` and `Deriver:` lines write them.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        if base.contains('/') {
            return Err(StorePathError::NotDirectChild(base.to_owned()));
        }
        if base.len() < HASH_CHARS + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        // Split after 32 characters rather than bytes, so a non-ASCII hash is reported as such.
        let hash_end = base
            .char_indices()
            .nth(HASH_CHARS)
            .map_or(base.len(), |(i, _)| i);
        let (hash, rest) = base.split_at(hash_end);
        let hash = hash.parse().map_err(|source| StorePathError::Hash {
            path: base.to_owned(),
            source,
        })?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::NoDash(base.to_owned()))?;
        Self::from_parts(hash, name)
    }

    /// The hash part.
    pub fn hash_part(&self) -> &StorePathHash {
        &self.hash
    }

    /// The name after the hash, e.g. `hello-2.12` or `t.drv`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last component, `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// Whether this is a derivation (its name ends in `.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

/// Checks a store path name against the rules of Nix 2.8's `checkName`.
fn check_name(name: &str) -> Result<(), StorePathError> {
    let reject = |reason| {
        Err(StorePathError::Name {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return reject("name is longer than 211 characters");
    }
    // Besides hiding the file, a leading dot would allow `.` and `..`.
    if name.starts_with('.') {
        return reject("name starts with a period");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
    {
        return reject("name contains a character other than letters, digits and +-._?=");
    }
    Ok(())
}

impl FromStr for StorePath {
    type Err = StorePathError;

    /// Parses a full path, `/nix/store/<hash>-<name>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        if base.contains('/') {
            return Err(StorePathError::NotDirectChild(s.to_owned()));
        }
        Self::from_base_name(base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic generator (xorshift64) for round-trip tests over many values: the crate
    /// has no property-testing dependency, and a fixed seed makes every failure reproducible.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed | 1)
        }

        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A number in `0..n`.
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub(crate) fn bytes<const N: usize>(&mut self) -> [u8; N] {
            std::array::from_fn(|_| self.next() as u8)
        }

        pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }

        /// Text of `1..=max` characters from `alphabet`, not starting with `.`.
        pub(crate) fn text(&mut self, alphabet: &[u8], max: usize) -> String {
            let len = 1 + self.below(max);
            (0..len)
                .map(|i| {
                    loop {
                        let c = *self.pick(alphabet);
                        if i > 0 || c != b'.' {
                            break char::from(c);
                        }
                    }
                })
                .collect()
        }

        /// Any valid store path; names are mostly short, sometimes as long as allowed.
        pub(crate) fn store_path(&mut self) -> StorePath {
            let max = if self.below(8) == 0 { MAX_NAME_LEN } else { 12 };
            let name = self.text(NAME_CHARS, max);
            StorePath::from_parts(StorePathHash::from_bytes(self.bytes()), &name).unwrap()
        }
    }

    /// Every character a store path name may hold.
    const NAME_CHARS: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=";

    const HELLO: &str = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt";

    #[test]
    fn parses_and_displays_a_full_path() {
        let p: StorePath = HELLO.parse().unwrap();
        assert_eq!(p.to_string(), HELLO);
        assert_eq!(
            p.hash_part().to_string(),
            "i9pmrzmpshapij2kin22pff6fc2adavx"
        );
        assert_eq!(p.name(), "hello.txt");
        assert_eq!(p.base_name(), "i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt");
        assert!(!p.is_derivation());
        assert_eq!(
            StorePathHash::from_bytes(*p.hash_part().as_bytes()),
            *p.hash_part()
        );
        let drv: StorePath = "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv"
            .parse()
            .unwrap();
        assert!(drv.is_derivation());
    }

    #[test]
    fn base_name_round_trips() {
        let p = StorePath::from_base_name("i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt").unwrap();
        assert_eq!(p, HELLO.parse().unwrap());
    }

    #[test]
    fn accepts_every_allowed_character_and_longest_name() {
        let name = "aZ09+-._?=";
        let p = StorePath::from_parts("i9pmrzmpshapij2kin22pff6fc2adavx".parse().unwrap(), name)
            .unwrap();
        assert_eq!(p.name(), name);
        let long = "a".repeat(MAX_NAME_LEN);
        assert!(
            format!("{STORE_DIR}/i9pmrzmpshapij2kin22pff6fc2adavx-{long}")
                .parse::<StorePath>()
                .is_ok()
        );
    }

    #[test]
    fn rejects_bad_paths() {
        let hash = "i9pmrzmpshapij2kin22pff6fc2adavx";
        let cases = [
            ("", "not in"),
            ("/nix/store", "not in"),
            ("/nix/storex/i9pmrzmpshapij2kin22pff6fc2adavx-a", "not in"),
            ("nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a", "not in"),
            ("/gnu/store/i9pmrzmpshapij2kin22pff6fc2adavx-a", "not in"),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a/bin",
                "direct child",
            ),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a/",
                "direct child",
            ),
            (
                "/nix/store//i9pmrzmpshapij2kin22pff6fc2adavx-a",
                "direct child",
            ),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-", "too short"),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx", "too short"),
            ("/nix/store/..", "too short"),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavxxa", "no dash"),
            ("/nix/store/e9pmrzmpshapij2kin22pff6fc2adavx-a", "hash part"),
            ("/nix/store/I9PMRZMPSHAPIJ2KIN22PFF6FC2ADAVX-a", "hash part"),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-.hidden",
                "period",
            ),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-..", "period"),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a b",
                "character",
            ),
            ("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-ü", "character"),
            ("/nix/store/ü9pmrzmpshapij2kin22pff6fc2adavx-a", "hash part"),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a\0",
                "character",
            ),
            (
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a:b",
                "character",
            ),
        ];
        for (input, expect) in cases {
            let err = input.parse::<StorePath>().unwrap_err().to_string();
            assert!(err.contains(expect), "{input:?}: {err}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let err = format!("{STORE_DIR}/{hash}-{long}")
            .parse::<StorePath>()
            .unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
    }

    #[test]
    fn orders_as_nix_orders_the_strings() {
        let mut paths: Vec<StorePath> = [
            "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-a",
            "/nix/store/00000000000000000000000000000001-a",
            "/nix/store/10000000000000000000000000000000-a",
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-b",
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a",
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a-b",
            "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut strings: Vec<String> = paths.iter().map(ToString::to_string).collect();
        paths.sort();
        strings.sort();
        let sorted: Vec<String> = paths.iter().map(ToString::to_string).collect();
        assert_eq!(sorted, strings);
    }

    #[test]
    fn serde_uses_the_full_path() {
        let p: StorePath = HELLO.parse().unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{HELLO}\""));
        let back: StorePath = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<StorePath>("\"/nix/store/x\"").is_err());
    }

    #[test]
    fn generated_paths_print_parse_and_sort_as_their_strings() {
        let mut rng = Rng::new(0x5eed);
        let mut previous = rng.store_path();
        for _ in 0..20_000 {
            let path = rng.store_path();
            // Same hash now and then, so names decide the order too.
            let path = if rng.below(4) == 0 {
                StorePath::from_parts(*previous.hash_part(), path.name()).unwrap()
            } else {
                path
            };
            assert_eq!(path.to_string().parse::<StorePath>().unwrap(), path);
            assert_eq!(StorePath::from_base_name(&path.base_name()).unwrap(), path);
            assert_eq!(
                path.hash_part()
                    .to_string()
                    .parse::<StorePathHash>()
                    .unwrap(),
                *path.hash_part()
            );
            assert_eq!(
                path.cmp(&previous),
                path.to_string().cmp(&previous.to_string()),
                "{path} vs {previous}"
            );
            previous = path;
        }
    }
}
