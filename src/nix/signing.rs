//! Ed25519 keys and signatures in Nix's text form, `<key name>:<base64>`.
//!
//! A secret key encodes 64 bytes (the 32-byte seed, then the public key) as `nix key generate-secret`
//! and `nix-store --generate-binary-cache-key` write it; a public key 32 bytes; a signature 64 bytes.
//! The key name travels with every signature so a verifier knows which trusted key to try, so a
//! signature only verifies under a public key of the same name.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use thiserror::Error;

/// Why a key or signature cannot be parsed or made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SigningError {
    /// The key name is empty, too long, or holds `:` or whitespace.
    #[error(
        "invalid key name {0:?}: it must be 1 to {MAX_KEY_NAME} bytes, without ':' or whitespace"
    )]
    KeyName(String),
    /// There is no `:` between name and key material.
    #[error("{what} has no '<name>:' prefix")]
    NoName {
        /// What was being parsed (never the secret itself).
        what: &'static str,
    },
    /// The part after the name is not base64 of the right length.
    #[error("{what} named {name:?} is not base64 of {len} bytes")]
    Encoding {
        /// What was being parsed.
        what: &'static str,
        /// Its key name.
        name: String,
        /// The number of bytes it must encode.
        len: usize,
    },
    /// The secret key's second half is not the public key of its first half.
    #[error("secret key {0:?} is inconsistent: its public half does not match its seed")]
    InconsistentSecretKey(String),
    /// The bytes are not a valid Ed25519 public key.
    #[error("public key {0:?} is not a valid ed25519 point")]
    InvalidPublicKey(String),
    /// The operating system gave no randomness.
    #[error("cannot get randomness for a new key: {0}")]
    Random(String),
}

/// A Nix signing key (Ed25519), e.g. `cache.example.org-1:<base64 of 64 bytes>`.
///
/// `Debug` does not show the key, and the key held here is zeroized when dropped (by `SigningKey`).
/// Temporary copies made while parsing, generating or displaying are not cleared. `Display` writes
/// the full secret in Nix's form, for saving it to a key file.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Makes a new random key with this name.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        check_key_name(name)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SigningError::Random(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key to give to verifiers (`trusted-public-keys`).
    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a message, e.g. a narinfo fingerprint.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }
}

impl FromStr for SecretKey {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_key::<64>(s.trim(), "secret key")?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::InconsistentSecretKey(name.clone()))?;
        Ok(Self { name, key })
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// A Nix public key, e.g. `cache.example.org-1:<base64 of 32 bytes>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// A public key from its name and 32 key bytes (as carried in a ticket).
    pub fn from_parts(name: &str, bytes: [u8; 32]) -> Result<Self, SigningError> {
        check_key_name(name)?;
        let name = name.to_owned();
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::InvalidPublicKey(name.clone()))?;
        Ok(Self { name, key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// Whether `signature` is this key's signature of `message`. A signature under another key name
    /// never verifies.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        signature.name == self.name
            && self
                .key
                .verify_strict(
                    message,
                    &ed25519_dalek::Signature::from_bytes(&signature.bytes),
                )
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_key::<32>(s.trim(), "public key")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::InvalidPublicKey(name.clone()))?;
        Ok(Self { name, key })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A signature with the name of the key that made it, as in narinfo `Sig:` lines.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.name
    }
}

impl FromStr for Signature {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_key::<64>(s, "signature")?;
        Ok(Self { name, bytes })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The longest key name, in bytes: a ticket carries the name behind a
/// one-byte length.
pub const MAX_KEY_NAME: usize = 255;

fn check_key_name(name: &str) -> Result<(), SigningError> {
    if name.is_empty()
        || name.len() > MAX_KEY_NAME
        || name.contains(':')
        || name.contains(char::is_whitespace)
    {
        // Quoted back in the message, so cut short.
        return Err(SigningError::KeyName(name.chars().take(80).collect()));
    }
    Ok(())
}

/// Splits `<name>:<base64 of N bytes>`. Errors name the kind of value but never quote the material.
fn split_key<const N: usize>(
    s: &str,
    what: &'static str,
) -> Result<(String, [u8; N]), SigningError> {
    let (name, material) = s.split_once(':').ok_or(SigningError::NoName { what })?;
    check_key_name(name)?;
    let bad = || SigningError::Encoding {
        what,
        name: name.to_owned(),
        len: N,
    };
    let decoded = BASE64.decode(material).map_err(|_| bad())?;
    let bytes = <[u8; N]>::try_from(decoded.as_slice()).map_err(|_| bad())?;
    Ok((name.to_owned(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TEST-ONLY key from `nix key generate-secret --key-name test-1` (Nix 2.8), and what
    /// `nix key convert-secret-to-public` printed for it.
    const NIX_SECRET: &str = "test-1:hZSAY517I39ojkS0P5JWcFrcgKDMBXKrcGoixuWqHrc9jlUudcW6QFEpn0zDyt9EMO+BBkdpMn3cf/iSRf7iTQ==";
    const NIX_PUBLIC: &str = "test-1:PY5VLnXFukBRKZ9Mw8rfRDDvgQZHaTJ93H/4kkX+4k0=";

    #[test]
    fn reads_keys_written_by_nix() {
        let sk: SecretKey = NIX_SECRET.parse().unwrap();
        assert_eq!(sk.name(), "test-1");
        assert_eq!(sk.to_public().to_string(), NIX_PUBLIC);
        assert_eq!(sk.to_string(), NIX_SECRET);
        let pk: PublicKey = NIX_PUBLIC.parse().unwrap();
        assert_eq!(pk, sk.to_public());
        assert_eq!(pk.name(), "test-1");
        assert_eq!(pk.to_string(), NIX_PUBLIC);
        // Key files end with a newline.
        assert!(format!("{NIX_SECRET}\n").parse::<SecretKey>().is_ok());
    }

    #[test]
    fn signs_and_verifies() {
        let sk = SecretKey::generate("drv-thru-test-1").unwrap();
        let pk = sk.to_public();
        let sig = sk.sign(b"message");
        assert!(pk.verify(b"message", &sig));
        assert!(!pk.verify(b"messagf", &sig));
        let parsed: Signature = sig.to_string().parse().unwrap();
        assert_eq!(parsed, sig);
        assert_eq!(parsed.key_name(), "drv-thru-test-1");
        let other = SecretKey::generate("drv-thru-test-1").unwrap().to_public();
        assert!(!other.verify(b"message", &sig));
    }

    #[test]
    fn a_key_name_fits_a_ticket() {
        let longest = "k".repeat(MAX_KEY_NAME);
        assert!(SecretKey::generate(&longest).is_ok());
        let err = SecretKey::generate(&format!("{longest}k")).unwrap_err();
        assert!(err.to_string().contains("1 to 255 bytes"), "{err}");
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn signature_names_must_match() {
        let sk: SecretKey = NIX_SECRET.parse().unwrap();
        let sig = sk.sign(b"m");
        let renamed: Signature = sig
            .to_string()
            .replacen("test-1", "test-2", 1)
            .parse()
            .unwrap();
        assert!(!sk.to_public().verify(b"m", &renamed));
    }

    #[test]
    fn debug_hides_the_secret() {
        let sk: SecretKey = NIX_SECRET.parse().unwrap();
        let debug = format!("{sk:?}");
        assert!(
            debug.contains("[redacted]") && debug.contains("test-1"),
            "{debug}"
        );
        assert!(!debug.contains("hZSAY5"), "{debug}");
    }

    #[test]
    fn rejects_bad_names_and_material() {
        for name in ["", "a b", "a:b", "tab\t"] {
            assert_eq!(
                SecretKey::generate(name).unwrap_err(),
                SigningError::KeyName(name.to_owned())
            );
        }
        let material = NIX_PUBLIC.trim_start_matches("test-1:");
        assert!(material.parse::<PublicKey>().is_err());
        assert!(format!(":{material}").parse::<PublicKey>().is_err());
        assert!(NIX_SECRET.parse::<PublicKey>().is_err());
        assert!(NIX_PUBLIC.parse::<SecretKey>().is_err());
        assert!(
            format!("test-1:{}", &material[1..])
                .parse::<PublicKey>()
                .is_err()
        );
        // Seed and public half from different keys.
        let other = SecretKey::generate("test-1").unwrap().to_public();
        let mut bytes = BASE64.decode(&NIX_SECRET[7..]).unwrap();
        bytes[32..].copy_from_slice(other.key.as_bytes());
        let mixed = format!("test-1:{}", BASE64.encode(&bytes));
        assert_eq!(
            mixed.parse::<SecretKey>().unwrap_err(),
            SigningError::InconsistentSecretKey("test-1".to_owned())
        );
    }

    #[test]
    fn errors_never_quote_secret_material() {
        let broken = format!("{}!", &NIX_SECRET[..NIX_SECRET.len() - 1]);
        let err = broken.parse::<SecretKey>().unwrap_err().to_string();
        assert!(!err.contains("hZSAY5"), "{err}");
    }
}
