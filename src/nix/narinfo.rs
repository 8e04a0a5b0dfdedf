//! Narinfo files: the `<hash>.narinfo` text a binary cache serves for each store path.
//!
//! ```text
//! StorePath: /nix/store/mwbrfvzc5g8n48lg1wnd1mz0h4pa8yxv-d
//! URL: nar/0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs.nar
//! Compression: none
//! FileHash: sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
//! FileSize: 840
//! NarHash: sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
//! NarSize: 840
//! References:
//! CA: fixed:r:sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
//! ```
//!
//! Signatures (`Sig:`) cover only the [fingerprint](NarInfo::fingerprint): path, NAR hash, NAR size
//! and references (Nix's `ValidPathInfo::fingerprint`). Everything else, the URL and compression
//! included, can be changed by whoever serves the file, so a client must check the NAR it downloads
//! against `NarHash`.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::nix::content_address::{ContentAddress, ContentAddressError};
use crate::nix::hash::{HashParseError, Sha256Hash};
use crate::nix::signing::{PublicKey, SecretKey, Signature, SigningError};
use crate::nix::store_path::{StorePath, StorePathError};

/// Largest narinfo accepted, in bytes. A path with thousands of references stays far below it.
pub const MAX_NARINFO_LEN: usize = 1 << 20;

/// Why text is not a narinfo.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NarInfoParseError {
    /// The text is longer than [`MAX_NARINFO_LEN`].
    #[error("narinfo is {0} bytes long, more than the {MAX_NARINFO_LEN} allowed")]
    TooLong(usize),
    /// A line has no `: ` separator.
    #[error("narinfo line {line} has no ': ' separator")]
    NoSeparator {
        /// The 1-based line number.
        line: usize,
    },
    /// A field other than `Sig` appears twice.
    #[error("narinfo field {0:?} appears twice")]
    Duplicate(String),
    /// A required field is missing.
    #[error("narinfo has no {0} field")]
    Missing(&'static str),
    /// A store path field is invalid.
    #[error("invalid {field} in narinfo")]
    StorePath {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: StorePathError,
    },
    /// A hash field is invalid.
    #[error("invalid {field} in narinfo")]
    Hash {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: HashParseError,
    },
    /// A size field is not a decimal number.
    #[error("invalid {field} {value:?} in narinfo")]
    Size {
        /// The field.
        field: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A `Sig:` line is not a signature.
    #[error("invalid signature in narinfo")]
    Signature(#[source] SigningError),
    /// The `CA:` field is invalid.
    #[error("invalid content address in narinfo")]
    ContentAddress(#[source] ContentAddressError),
    /// A text field holds whitespace or is empty, which the line format cannot carry back.
    #[error("invalid {field} {value:?} in narinfo")]
    Text {
        /// The field.
        field: &'static str,
        /// The rejected value.
        value: String,
    },
}

/// A parsed narinfo.
///
/// Fields Nix does not define (or that this type does not model) are kept in order and written back
/// after the known ones, so rewriting a narinfo from a newer Nix loses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described.
    pub store_path: StorePath,
    /// Where the (possibly compressed) NAR is, relative to the cache root.
    pub url: String,
    /// The NAR's compression, e.g. `xz`, `zstd` or `none`. Nix reads a missing field as `bzip2`.
    pub compression: Option<String>,
    /// The hash of the file at `url`.
    pub file_hash: Option<Sha256Hash>,
    /// The size of the file at `url`.
    pub file_size: Option<u64>,
    /// The hash of the uncompressed NAR.
    pub nar_hash: Sha256Hash,
    /// The size of the uncompressed NAR.
    pub nar_size: u64,
    /// The store paths the path refers to, possibly including itself.
    pub references: BTreeSet<StorePath>,
    /// The derivation that built the path, if known.
    pub deriver: Option<StorePath>,
    /// Signatures of the [fingerprint](Self::fingerprint).
    pub signatures: Vec<Signature>,
    /// The content address, for content-addressed paths.
    pub ca: Option<ContentAddress>,
    /// Other `Key: value` lines, in their original order.
    pub extra: Vec<(String, String)>,
}

impl NarInfo {
    /// Whether the file [`Self::url`] names is compressed: anything but
    /// `Compression: none` (a missing field is bzip2 to Nix).
    pub fn is_compressed(&self) -> bool {
        self.compression.as_deref() != Some("none")
    }

    /// Whether [`Self::url`] is a plain file under the cache's `nar/`: no
    /// scheme, no absolute path, no `..`, no query. Signatures do not cover
    /// the URL, so a cache that passes narinfos on to a more privileged Nix
    /// must refuse any other, which could point that Nix at a local file or
    /// another server.
    pub fn has_plain_nar_url(&self) -> bool {
        self.url.strip_prefix("nar/").is_some_and(|name| {
            !name.is_empty()
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        })
    }

    /// What signatures sign: `1;<path>;<nar hash>;<nar size>;<comma-separated reference paths>`.
    pub fn fingerprint(&self) -> String {
        let references: Vec<String> = self.references.iter().map(ToString::to_string).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash,
            self.nar_size,
            references.join(",")
        )
    }

    /// Adds a signature by `key`, replacing an earlier one by a key of the same name.
    pub fn sign(&mut self, key: &SecretKey) {
        let signature = key.sign(self.fingerprint().as_bytes());
        self.signatures.retain(|s| s.key_name() != key.name());
        self.signatures.push(signature);
    }

    /// Whether one of the signatures is valid under `key`.
    pub fn is_signed_by(&self, key: &PublicKey) -> bool {
        let fingerprint = self.fingerprint();
        self.signatures
            .iter()
            .any(|s| key.verify(fingerprint.as_bytes(), s))
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NARINFO_LEN {
            return Err(NarInfoParseError::TooLong(s.len()));
        }
        let mut fields = Fields::default();
        for (index, line) in s.lines().enumerate() {
            // `lines` drops the `\r` of a `\r\n` but keeps one that ends the text; drop that too,
            // or the value would lose it when printed back with a newline.
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            // The key ends at the first colon, as Nix reads it, so no key of
            // ours can hide a field Nix would see. `References: ` with no
            // references leaves nothing after the separator's space.
            let (key, value) = line
                .split_once(':')
                .and_then(|(key, rest)| match rest.strip_prefix(' ') {
                    Some(value) => Some((key, value)),
                    None => rest.is_empty().then_some((key, "")),
                })
                .ok_or(NarInfoParseError::NoSeparator { line: index + 1 })?;
            fields.set(key, value)?;
        }
        fields.build()
    }
}

impl fmt::Display for NarInfo {
    /// Writes the fields in the order Nix writes them, then the unknown ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        if let Some(compression) = &self.compression {
            writeln!(f, "Compression: {compression}")?;
        }
        if let Some(hash) = &self.file_hash {
            writeln!(f, "FileHash: {hash}")?;
        }
        if let Some(size) = self.file_size {
            writeln!(f, "FileSize: {size}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        let references: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        writeln!(f, "References: {}", references.join(" "))?;
        if let Some(deriver) = &self.deriver {
            writeln!(f, "Deriver: {}", deriver.base_name())?;
        }
        for signature in &self.signatures {
            writeln!(f, "Sig: {signature}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        for (key, value) in &self.extra {
            writeln!(f, "{key}: {value}")?;
        }
        Ok(())
    }
}

/// Fields as they are read, before the required ones are checked.
#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256Hash>,
    nar_size: Option<u64>,
    references: Option<BTreeSet<StorePath>>,
    deriver: Option<StorePath>,
    signatures: Vec<Signature>,
    ca: Option<ContentAddress>,
    extra: Vec<(String, String)>,
    /// The keys of `extra`, so a duplicate is found without a scan: a hostile
    /// narinfo with many fields must not cost quadratic time.
    extra_keys: HashSet<String>,
}

impl Fields {
    fn set(&mut self, key: &str, value: &str) -> Result<(), NarInfoParseError> {
        match key {
            "StorePath" => set_once(
                &mut self.store_path,
                key,
                value.parse().map_err(store_path("StorePath"))?,
            ),
            "URL" => set_once(&mut self.url, key, token("URL", value)?),
            "Compression" => set_once(&mut self.compression, key, token("Compression", value)?),
            "FileHash" => set_once(
                &mut self.file_hash,
                key,
                value.parse().map_err(hash("FileHash"))?,
            ),
            "FileSize" => set_once(&mut self.file_size, key, size("FileSize", value)?),
            "NarHash" => set_once(
                &mut self.nar_hash,
                key,
                value.parse().map_err(hash("NarHash"))?,
            ),
            "NarSize" => set_once(&mut self.nar_size, key, size("NarSize", value)?),
            "References" => {
                let references = value
                    .split(' ')
                    .filter(|r| !r.is_empty())
                    .map(StorePath::from_base_name)
                    .collect::<Result<_, _>>()
                    .map_err(store_path("References"))?;
                set_once(&mut self.references, key, references)
            }
            // Nix writes `Deriver: unknown-deriver` when it does not know the deriver.
            "Deriver" if value == "unknown-deriver" => Ok(()),
            "Deriver" => set_once(
                &mut self.deriver,
                key,
                StorePath::from_base_name(value).map_err(store_path("Deriver"))?,
            ),
            "Sig" => {
                self.signatures
                    .push(value.parse().map_err(NarInfoParseError::Signature)?);
                Ok(())
            }
            "CA" => set_once(
                &mut self.ca,
                key,
                value.parse().map_err(NarInfoParseError::ContentAddress)?,
            ),
            _ => {
                if !self.extra_keys.insert(key.to_owned()) {
                    return Err(NarInfoParseError::Duplicate(key.to_owned()));
                }
                self.extra.push((key.to_owned(), value.to_owned()));
                Ok(())
            }
        }
    }

    fn build(self) -> Result<NarInfo, NarInfoParseError> {
        Ok(NarInfo {
            store_path: self
                .store_path
                .ok_or(NarInfoParseError::Missing("StorePath"))?,
            url: self.url.ok_or(NarInfoParseError::Missing("URL"))?,
            compression: self.compression,
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or(NarInfoParseError::Missing("NarHash"))?,
            nar_size: self.nar_size.ok_or(NarInfoParseError::Missing("NarSize"))?,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver,
            signatures: self.signatures,
            ca: self.ca,
            extra: self.extra,
        })
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), NarInfoParseError> {
    if slot.is_some() {
        return Err(NarInfoParseError::Duplicate(key.to_owned()));
    }
    *slot = Some(value);
    Ok(())
}

fn store_path(field: &'static str) -> impl FnOnce(StorePathError) -> NarInfoParseError {
    move |source| NarInfoParseError::StorePath { field, source }
}

fn hash(field: &'static str) -> impl FnOnce(HashParseError) -> NarInfoParseError {
    move |source| NarInfoParseError::Hash { field, source }
}

fn size(field: &'static str, value: &str) -> Result<u64, NarInfoParseError> {
    // `u64::from_str` would also take a leading `+`, which Nix never writes. Nix refuses a zero
    // `NarSize`; no NAR is empty, and no compressed NAR either, so zero is refused for both sizes.
    if value.is_empty() || value == "0" || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NarInfoParseError::Size {
            field,
            value: value.to_owned(),
        });
    }
    value.parse().map_err(|_| NarInfoParseError::Size {
        field,
        value: value.to_owned(),
    })
}

fn token(field: &'static str, value: &str) -> Result<String, NarInfoParseError> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(NarInfoParseError::Text {
            field,
            value: value.to_owned(),
        });
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::content_address::FileIngestionMethod;
    use crate::nix::store_path::tests::Rng;
    use std::path::Path;
    use std::process::Command;

    /// Written by `nix copy --to file://...?compression=none` (Nix 2.8) for the path made from
    /// tests/data/nix/d.
    const NIX_NARINFO: &str = "\
StorePath: /nix/store/mwbrfvzc5g8n48lg1wnd1mz0h4pa8yxv-d
URL: nar/0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs.nar
Compression: none
FileHash: sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
FileSize: 840
NarHash: sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
NarSize: 840
References: 
CA: fixed:r:sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs
";

    /// A narinfo in the shape cache.nixos.org serves, with references, deriver and signature.
    const FULL_NARINFO: &str = "\
StorePath: /nix/store/hj68cw192z1l54m5y3d90rri4kl2vcki-dependent
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz
Compression: xz
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 4029176
NarHash: sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyf1xah
NarSize: 18735072
References: 2jmiqxxd2z4ypk8am71rc6kffqzgma57-t hj68cw192z1l54m5y3d90rri4kl2vcki-dependent i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt
Deriver: f07br121j8lgk07px9mrp5xjji8bn3hq-dependent.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
Sig: test-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
X-Future: kept as is
";

    #[test]
    fn parses_what_nix_writes() {
        let info: NarInfo = NIX_NARINFO.parse().unwrap();
        assert_eq!(info.store_path.name(), "d");
        assert_eq!(info.compression.as_deref(), Some("none"));
        assert_eq!(info.nar_size, 840);
        assert_eq!(info.file_hash, Some(info.nar_hash));
        assert!(info.references.is_empty());
        assert!(matches!(info.ca, Some(ContentAddress::Fixed { .. })));
        assert_eq!(info.to_string(), NIX_NARINFO);
    }

    #[test]
    fn round_trips_every_field() {
        let info: NarInfo = FULL_NARINFO.parse().unwrap();
        assert_eq!(info.references.len(), 3);
        assert_eq!(info.signatures.len(), 2);
        assert_eq!(
            info.deriver.as_ref().map(StorePath::name),
            Some("dependent.drv")
        );
        assert_eq!(
            info.extra,
            [("X-Future".to_owned(), "kept as is".to_owned())]
        );
        assert_eq!(info.to_string(), FULL_NARINFO);
    }

    #[test]
    fn a_carriage_return_ends_the_last_line_as_it_ends_others() {
        // Found with fuzz/ (target `narinfo`): the unterminated last line kept its `\r`, which
        // printing the narinfo back then dropped.
        let info: NarInfo = format!("{NIX_NARINFO}X: a\r").parse().unwrap();
        assert_eq!(info.extra, [("X".to_owned(), "a".to_owned())]);
        assert_eq!(info.to_string().parse::<NarInfo>().unwrap(), info);
    }

    #[test]
    fn a_key_ends_at_the_first_colon_as_for_nix() {
        // Nix reads this line as a second `URL` field ("xnar/other: y").
        let hidden = NIX_NARINFO.replace("Compression: none\n", "URL:xnar/other: y\n");
        assert!(matches!(
            hidden.parse::<NarInfo>(),
            Err(NarInfoParseError::NoSeparator { line: 3 })
        ));
    }

    #[test]
    fn many_unknown_fields_parse_in_linear_time_and_a_repeat_is_refused() {
        // As many fields as fit in the size limit: 100,000 took 55 s in a
        // debug build while each one was compared with all before it.
        let fields: String = (0..120_000).map(|n| format!("{n:x}:\n")).collect();
        let info: NarInfo = format!("{NIX_NARINFO}{fields}").parse().unwrap();
        assert_eq!(info.extra.len(), 120_000);
        assert!(matches!(
            format!("{NIX_NARINFO}{fields}7: again\n").parse::<NarInfo>(),
            Err(NarInfoParseError::Duplicate(key)) if key == "7"
        ));
    }

    #[test]
    fn only_a_plain_file_under_nar_is_a_plain_nar_url() {
        let mut info: NarInfo = NIX_NARINFO.parse().unwrap();
        for plain in ["nar/1abc.nar", "nar/x.nar.zst", "nar/a+b-c_d.nar.xz"] {
            info.url = plain.to_owned();
            assert!(info.has_plain_nar_url(), "{plain}");
        }
        for other in [
            "file:///etc/shadow",
            "http://127.0.0.1:1/nar/x.nar",
            "/nar/x.nar",
            "nar/../x.nar",
            "nar/..",
            "nar/",
            "nar/x/y.nar",
            "nar/x.nar?y",
            "./nar/x.nar",
            "x.nar",
        ] {
            info.url = other.to_owned();
            assert!(!info.has_plain_nar_url(), "{other}");
        }
    }

    #[test]
    fn fingerprint_has_nix_layout() {
        let info: NarInfo = FULL_NARINFO.parse().unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/hj68cw192z1l54m5y3d90rri4kl2vcki-dependent;\
             sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyf1xah;18735072;\
             /nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t,\
             /nix/store/hj68cw192z1l54m5y3d90rri4kl2vcki-dependent,\
             /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
        );
    }

    #[test]
    fn signing_replaces_a_signature_of_the_same_key() {
        let mut info: NarInfo = FULL_NARINFO.parse().unwrap();
        let key = SecretKey::generate("test-1").unwrap();
        assert!(!info.is_signed_by(&key.to_public()));
        info.sign(&key);
        assert_eq!(info.signatures.len(), 2);
        assert!(info.is_signed_by(&key.to_public()));
        info.nar_size += 1;
        assert!(!info.is_signed_by(&key.to_public()));
    }

    #[test]
    fn skips_unknown_deriver_and_accepts_sri_hashes() {
        let text = NIX_NARINFO
            .replace("References: \n", "References: \nDeriver: unknown-deriver\n")
            .replace(
                "NarHash: sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs",
                "NarHash: sha256-WtLs+C7M2xlV9RjpB4fIRItR5PEWPEFNpSkc/Ay8FTo=",
            );
        let info: NarInfo = text.parse().unwrap();
        assert_eq!(info.deriver, None);
        assert_eq!(info.to_string(), NIX_NARINFO);
    }

    #[test]
    fn rejects_malformed_narinfos() {
        let cases = [
            NIX_NARINFO.replace(
                "StorePath: /nix/store/mwbrfvzc5g8n48lg1wnd1mz0h4pa8yxv-d\n",
                "",
            ),
            NIX_NARINFO.replace("NarSize: 840\n", ""),
            NIX_NARINFO.replace("NarSize: 840", "NarSize: +840"),
            NIX_NARINFO.replace("NarSize: 840", "NarSize: 84O"),
            NIX_NARINFO.replace("NarSize: 840", "NarSize: 0"),
            NIX_NARINFO.replace("URL: nar/", "URL nar/"),
            NIX_NARINFO.replace("URL: nar/", "URL: nar /"),
            NIX_NARINFO.replace("Compression: none", "Compression: none\nCompression: xz"),
            format!("{NIX_NARINFO}X: 1\nX: 2\n"),
            format!("{NIX_NARINFO}Sig: test-1:bm90IGEgc2lnbmF0dXJl\n"),
            NIX_NARINFO.replace(
                "References: ",
                "References: /nix/store/mwbrfvzc5g8n48lg1wnd1mz0h4pa8yxv-d",
            ),
            NIX_NARINFO.replace("NarHash: sha256:", "NarHash: sha1:"),
            NIX_NARINFO.replace("CA: fixed:", "CA: nar:"),
            format!("{NIX_NARINFO}{}", "X-Pad: x\n".repeat(MAX_NARINFO_LEN / 8)),
        ];
        for case in cases {
            assert!(case.parse::<NarInfo>().is_err(), "{case}");
        }
    }

    /// A narinfo with every field drawn from `rng`, optional ones sometimes left out.
    fn generated(rng: &mut Rng, keys: &[SecretKey]) -> NarInfo {
        let hash = |rng: &mut Rng| Sha256Hash::from_bytes(rng.bytes());
        let size = |rng: &mut Rng| (rng.next() >> rng.below(64)).max(1);
        let mut info = NarInfo {
            store_path: rng.store_path(),
            url: format!("nar/{}.nar", hash(rng).to_nix_base32()),
            compression: (rng.below(4) > 0)
                .then(|| (*rng.pick(&["none", "xz", "zstd", "bzip2"])).to_owned()),
            file_hash: (rng.below(2) > 0).then(|| hash(rng)),
            file_size: (rng.below(2) > 0).then(|| size(rng)),
            nar_hash: hash(rng),
            nar_size: size(rng),
            references: (0..rng.below(5)).map(|_| rng.store_path()).collect(),
            deriver: (rng.below(2) > 0).then(|| rng.store_path()),
            signatures: Vec::new(),
            ca: match rng.below(4) {
                0 => Some(ContentAddress::Text(hash(rng))),
                1 => Some(ContentAddress::Fixed {
                    method: *rng.pick(&[FileIngestionMethod::Flat, FileIngestionMethod::Recursive]),
                    hash: hash(rng).into(),
                }),
                _ => None,
            },
            extra: Vec::new(),
        };
        for key in keys.iter().take(rng.below(keys.len() + 1)) {
            info.sign(key);
        }
        // Values keep spaces and colons, leading ones included; keys are made unique by a suffix.
        for n in 0..rng.below(3) {
            let key = format!("{}{n}", rng.text(b"X-Future", 8));
            let value = match rng.below(3) {
                0 => String::new(),
                _ => rng.text(b" :ab=/+", 20),
            };
            info.extra.push((key, value));
        }
        info
    }

    #[test]
    fn generated_narinfos_print_and_parse_back() {
        let keys = [
            SecretKey::generate("a-1").unwrap(),
            SecretKey::generate("b.example.org-2").unwrap(),
        ];
        let mut rng = Rng::new(0x4a21f0);
        for _ in 0..2_000 {
            let info = generated(&mut rng, &keys);
            let text = info.to_string();
            let back: NarInfo = text.parse().unwrap_or_else(|err| panic!("{err}\n{text}"));
            assert_eq!(back, info, "{text}");
            assert!(
                keys.iter()
                    .take(info.signatures.len())
                    .all(|key| back.is_signed_by(&key.to_public()))
            );
        }
    }

    /// Runs a Nix command in a clean environment, or returns `None` when Nix is not installed.
    fn nix(args: &[&str], store: &Path) -> Option<std::process::Output> {
        let result = Command::new("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", store)
            .env("NIX_CONFIG", "substituters =\nrequire-sigs = true")
            .env("NIX_REMOTE", store.join("local"))
            .output();
        match result {
            Ok(out) => Some(out),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("running nix: {e}"),
        }
    }

    #[test]
    fn real_nix_accepts_our_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let src = root.join("signed-src");
        std::fs::write(&src, "signed by drv-thru\n").unwrap();
        let Some(out) = nix(&["store", "add-file", src.to_str().unwrap()], root) else {
            crate::two_stores::skip("nix is not on PATH");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let cache = format!("file://{}?compression=none", root.join("cache").display());
        let out = nix(&["copy", "--to", &cache, &path], root).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let store_path: StorePath = path.parse().unwrap();
        let narinfo_file = root.join(format!("cache/{}.narinfo", store_path.hash_part()));
        let mut info: NarInfo = std::fs::read_to_string(&narinfo_file)
            .unwrap()
            .parse()
            .unwrap();
        // A content address alone makes Nix trust a path; without it only a signature can.
        info.ca = None;
        let key = SecretKey::generate("drv-thru-test-1").unwrap();
        info.sign(&key);
        std::fs::write(&narinfo_file, info.to_string()).unwrap();

        let copy_with = |trusted: &str, dest: &str| {
            let to = root.join(dest);
            nix(
                &[
                    "copy",
                    "--from",
                    &cache,
                    "--to",
                    to.to_str().unwrap(),
                    "--option",
                    "trusted-public-keys",
                    trusted,
                    &path,
                ],
                root,
            )
            .unwrap()
        };
        let wrong = SecretKey::generate("drv-thru-test-1").unwrap().to_public();
        let out = copy_with(&wrong.to_string(), "refused");
        assert!(
            !out.status.success(),
            "nix accepted a signature under the wrong key"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("signature"),
            "refused for another reason: {stderr}"
        );
        let out = copy_with(&key.to_public().to_string(), "accepted");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            root.join("accepted")
                .join(path.trim_start_matches('/'))
                .exists()
        );
    }
}
