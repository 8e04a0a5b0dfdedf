//! Hashes in the textual forms Nix reads and writes.
//!
//! Nix writes a hash as `<algo>:<digest>` with the digest in nix base-32 (narinfo files, content
//! addresses), in hex (`.drv` files, store path fingerprints) or in base64, or as SRI `<algo>-<base64>`
//! (`nix path-info --json`, `nix hash`). Parsing accepts all of them and tells the encoding apart by its
//! length, as Nix does; printing picks one form per use.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::nix::base32;

/// Why a string is not a hash.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HashParseError {
    /// There is no `<algo>:` or `<algo>-` prefix.
    #[error("hash {0:?} has no algorithm prefix")]
    NoAlgorithm(String),
    /// The algorithm is not one Nix knows.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// A hash of another algorithm was given where only SHA-256 is allowed.
    #[error("hash {0:?} is not a sha256 hash")]
    NotSha256(String),
    /// The digest is in none of the encodings, or has the wrong length for its algorithm.
    #[error("hash {input:?} is not a valid {algo} digest in hex, nix base-32 or base64")]
    Digest {
        /// The rejected input.
        input: String,
        /// The algorithm the digest was read for.
        algo: HashAlgo,
    },
}

/// A hash algorithm Nix supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// MD5, 16 bytes; still accepted by Nix for old fixed-output derivations.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes; what Nix uses for everything it computes itself.
    Sha256,
    /// SHA-512, 64 bytes; common in fixed-output derivations fetched from npm.
    Sha512,
}

impl HashAlgo {
    /// The name Nix uses, e.g. `sha256`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// The digest length in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "md5" => Ok(Self::Md5),
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            "sha512" => Ok(Self::Sha512),
            _ => Err(HashParseError::UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// A digest of any algorithm Nix supports, as content addresses and fixed-output derivations carry.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: HashAlgo,
    // Invariant: `digest.len() == algo.digest_len()`.
    digest: Vec<u8>,
}

impl Hash {
    /// Parses a digest whose algorithm is known from elsewhere, e.g. the `outputHash` of a `.drv`,
    /// whose algorithm is in the field beside it. Hex, nix base-32 and base64 are accepted.
    pub fn parse_digest(algo: HashAlgo, digest: &str) -> Result<Self, HashParseError> {
        let len = algo.digest_len();
        let bad = || HashParseError::Digest {
            input: digest.to_owned(),
            algo,
        };
        let bytes = if digest.len() == 2 * len {
            decode_hex(digest).ok_or_else(bad)?
        } else if digest.len() == base32::encoded_len(len) {
            decode_base32(digest, len).ok_or_else(bad)?
        } else if digest.len() == len.div_ceil(3) * 4 {
            BASE64.decode(digest).map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        if bytes.len() != len {
            return Err(bad());
        }
        Ok(Self {
            algo,
            digest: bytes,
        })
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The raw digest, [`HashAlgo::digest_len`] bytes long.
    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// The digest in lowercase hex, without the algorithm.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.digest)
    }

    /// The digest in nix base-32, without the algorithm.
    pub fn to_nix_base32(&self) -> String {
        base32::encode(&self.digest)
    }

    /// The SRI form, `<algo>-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(&self.digest))
    }
}

impl FromStr for Hash {
    type Err = HashParseError;

    /// Parses `<algo>:<hex|nix32|base64>` or SRI `<algo>-<base64>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((algo, digest)) = s.split_once(':') {
            return Self::parse_digest(algo.parse()?, digest);
        }
        let Some((algo, digest)) = s.split_once('-') else {
            return Err(HashParseError::NoAlgorithm(s.to_owned()));
        };
        let algo: HashAlgo = algo.parse()?;
        // SRI is base64 only: a hex or base-32 digest there is a mistake, not a second spelling.
        let digest = BASE64
            .decode(digest)
            .ok()
            .filter(|d| d.len() == algo.digest_len())
            .ok_or_else(|| HashParseError::Digest {
                input: s.to_owned(),
                algo,
            })?;
        Ok(Self { algo, digest })
    }
}

impl fmt::Display for Hash {
    /// Writes `<algo>:<nix base-32>`, the form of narinfo files and content addresses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nix_base32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl From<Sha256Hash> for Hash {
    fn from(hash: Sha256Hash) -> Self {
        Self {
            algo: HashAlgo::Sha256,
            digest: hash.0.to_vec(),
        }
    }
}

/// A SHA-256 digest: NAR hashes, file hashes and the inputs of store path computation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash([u8; 32]);

impl Sha256Hash {
    /// Wraps 32 raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Hashes `data` in one go.
    pub fn digest(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest in lowercase hex, without the algorithm.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// The digest in nix base-32 (52 characters), without the algorithm.
    pub fn to_nix_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// The SRI form, `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }
}

impl TryFrom<Hash> for Sha256Hash {
    type Error = HashParseError;

    fn try_from(hash: Hash) -> Result<Self, Self::Error> {
        match <[u8; 32]>::try_from(hash.digest.as_slice()) {
            Ok(bytes) if hash.algo == HashAlgo::Sha256 => Ok(Self(bytes)),
            _ => Err(HashParseError::NotSha256(hash.to_string())),
        }
    }
}

impl FromStr for Sha256Hash {
    type Err = HashParseError;

    /// Parses any form [`struct@Hash`] accepts, as long as the algorithm is SHA-256.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hash: Hash = s.parse()?;
        if hash.algo != HashAlgo::Sha256 {
            return Err(HashParseError::NotSha256(s.to_owned()));
        }
        hash.try_into()
    }
}

impl fmt::Display for Sha256Hash {
    /// Writes `sha256:<nix base-32>`, as narinfo files do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix_base32())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({self})")
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(nibble(*hi)? << 4 | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

/// Decodes a nix base-32 digest of a length known only at run time.
fn decode_base32(s: &str, len: usize) -> Option<Vec<u8>> {
    match len {
        16 => base32::decode::<16>(s).ok().map(Vec::from),
        20 => base32::decode::<20>(s).ok().map(Vec::from),
        32 => base32::decode::<32>(s).ok().map(Vec::from),
        64 => base32::decode::<64>(s).ok().map(Vec::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello\n") as `nix-hash --type sha256 [--to-base32]` and `nix hash to-sri` print it.
    const HEX: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const NIX32: &str = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
    const SRI: &str = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";

    #[test]
    fn computes_and_prints_every_form() {
        let h = Sha256Hash::digest(b"hello\n");
        assert_eq!(h.to_hex(), HEX);
        assert_eq!(h.to_nix_base32(), NIX32);
        assert_eq!(h.to_sri(), SRI);
        assert_eq!(h.to_string(), format!("sha256:{NIX32}"));
        assert_eq!(Hash::from(h).to_sri(), SRI);
        assert_eq!(Sha256Hash::from_bytes(*h.as_bytes()), h);
    }

    #[test]
    fn parses_every_form_nix_prints() {
        let want = Sha256Hash::digest(b"hello\n");
        let b64 = SRI.trim_start_matches("sha256-");
        for s in [
            format!("sha256:{NIX32}"),
            format!("sha256:{HEX}"),
            format!("sha256:{b64}"),
            SRI.to_owned(),
        ] {
            assert_eq!(s.parse::<Sha256Hash>().unwrap(), want, "{s}");
        }
    }

    #[test]
    fn empty_input_hash_matches_nix() {
        assert_eq!(
            Sha256Hash::digest(b"").to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            Sha256Hash::digest(b"").to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn rejects_malformed_hashes() {
        for s in [
            NIX32.to_owned(),
            format!("sha256:{}", &NIX32[1..]),
            format!("sha256:{}x", &HEX[1..]),
            format!("sha256-{HEX}"),
            format!("sha257:{HEX}"),
            format!("SHA256:{HEX}"),
            "sha256:".to_owned(),
            String::new(),
        ] {
            assert!(s.parse::<Sha256Hash>().is_err(), "{s}");
        }
    }

    #[test]
    fn sha256_refuses_other_algorithms() {
        let sha1 = "sha1:2aae6c35c94fcfb415dbe95f408b9ce91ee846ed";
        let h: Hash = sha1.parse().unwrap();
        assert_eq!(h.algo(), HashAlgo::Sha1);
        assert_eq!(h.digest().len(), 20);
        assert_eq!(h.to_hex(), "2aae6c35c94fcfb415dbe95f408b9ce91ee846ed");
        assert_eq!(
            sha1.parse::<Sha256Hash>(),
            Err(HashParseError::NotSha256(sha1.to_owned()))
        );
    }

    #[test]
    fn parses_unprefixed_digests_of_a_known_algorithm() {
        let h = Hash::parse_digest(HashAlgo::Sha256, HEX).unwrap();
        assert_eq!(h.to_nix_base32(), NIX32);
        assert_eq!(
            Sha256Hash::try_from(h).unwrap(),
            Sha256Hash::digest(b"hello\n")
        );
        let sha512 = Hash::parse_digest(HashAlgo::Sha512, &"ab".repeat(64)).unwrap();
        assert_eq!(sha512.to_string().len(), "sha512:".len() + 103);
        assert_eq!(sha512.to_string().parse::<Hash>().unwrap(), sha512);
        assert!(Hash::parse_digest(HashAlgo::Sha1, HEX).is_err());
    }
}
