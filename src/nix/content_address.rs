//! Recomputing the store paths of content-addressed objects, so that an uploaded path can be checked
//! against its contents rather than trusted.
//!
//! Nix names such an object after a *fingerprint* (`makeStorePath` in Nix's `store-api.cc`):
//! `<type>:sha256:<hex of inner hash>:/nix/store:<name>`, hashed with SHA-256 and folded to 20 bytes.
//! The type says how the inner hash was made:
//!
//! - `text[:<ref>...]`: SHA-256 of a file's bytes, used for `.drv` files and `builtins.toFile`;
//! - `source[:<ref>...][:self]`: SHA-256 of the NAR, for `nix-store --add`, `builtins.path` and
//!   recursive SHA-256 fixed outputs;
//! - `output:out`: any other fixed output, whose inner hash is SHA-256 of
//!   `fixed:out:[r:]<algo>:<hex>:`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::nix::hash::{Hash, HashAlgo, HashParseError, Sha256Hash};
use crate::nix::store_path::{STORE_DIR, StorePath, StorePathError, StorePathHash};

/// Why a content-addressed store path cannot be computed, or a content address not parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ContentAddressError {
    /// The name is not a valid store path name.
    #[error(transparent)]
    Name(#[from] StorePathError),
    /// A fixed output other than recursive SHA-256 claims references, which Nix never allows.
    #[error("fixed-output path {name:?} of kind {kind} cannot have references")]
    ReferencesNotAllowed {
        /// The name of the path.
        name: String,
        /// The content address kind, e.g. `fixed:sha256`.
        kind: String,
    },
    /// A text path claims to refer to itself, which its hash could not include.
    #[error("text path {0:?} cannot refer to itself")]
    TextSelfReference(String),
    /// A content address is neither `text:` nor `fixed:`.
    #[error("unknown content address {0:?}")]
    UnknownKind(String),
    /// A content address has a malformed hash.
    #[error("invalid hash in content address {input:?}")]
    Hash {
        /// The rejected content address.
        input: String,
        /// What is wrong with its hash.
        #[source]
        source: HashParseError,
    },
}

/// How a fixed output's contents were hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileIngestionMethod {
    /// The hash is of the bytes of a single regular file.
    Flat,
    /// The hash is of the NAR serialisation of the whole tree.
    Recursive,
}

/// A narinfo `CA:` value or a store object's content address, as Nix renders it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// `text:sha256:<nix32>`: the SHA-256 of the file's bytes.
    Text(Sha256Hash),
    /// `fixed:[r:]<algo>:<nix32>`.
    Fixed {
        /// Whether the hash is of file bytes or of a NAR.
        method: FileIngestionMethod,
        /// The hash.
        hash: Hash,
    },
}

impl ContentAddress {
    /// The store path this content address gives an object called `name` with these references.
    ///
    /// `references` excludes the object itself; `self_reference` says whether it refers to itself.
    pub fn store_path(
        &self,
        name: &str,
        references: &BTreeSet<StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, ContentAddressError> {
        match self {
            Self::Text(hash) => {
                if self_reference {
                    return Err(ContentAddressError::TextSelfReference(name.to_owned()));
                }
                make_text_path(name, hash, references)
            }
            Self::Fixed { method, hash } => {
                make_fixed_output_path(name, *method, hash, references, self_reference)
            }
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad_hash = |source| ContentAddressError::Hash {
            input: s.to_owned(),
            source,
        };
        if let Some(hash) = s.strip_prefix("text:") {
            let hash = hash.parse::<Sha256Hash>().map_err(bad_hash)?;
            return Ok(Self::Text(hash));
        }
        let Some(rest) = s.strip_prefix("fixed:") else {
            return Err(ContentAddressError::UnknownKind(s.to_owned()));
        };
        let (method, hash) = match rest.strip_prefix("r:") {
            Some(hash) => (FileIngestionMethod::Recursive, hash),
            None => (FileIngestionMethod::Flat, rest),
        };
        let hash = hash.parse().map_err(bad_hash)?;
        Ok(Self::Fixed { method, hash })
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(hash) => write!(f, "text:{hash}"),
            Self::Fixed { method, hash } => {
                f.write_str("fixed:")?;
                if *method == FileIngestionMethod::Recursive {
                    f.write_str("r:")?;
                }
                write!(f, "{hash}")
            }
        }
    }
}

/// Nix's `makeStorePath`: the store path named `name` for an object of `path_type` with `inner` hash.
pub fn make_store_path(
    path_type: &str,
    inner: &Sha256Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    let fingerprint = format!("{path_type}:sha256:{}:{STORE_DIR}:{name}", inner.to_hex());
    let digest = Sha256::digest(fingerprint.as_bytes());
    // Nix's `compressHash`: XOR the 32 bytes down onto 20, wrapping around.
    let mut folded = [0u8; 20];
    for (i, byte) in digest.iter().enumerate() {
        folded[i % 20] ^= byte;
    }
    StorePath::from_parts(StorePathHash::from_bytes(folded), name)
}

/// The store path of a text object (a `.drv` file, `builtins.toFile`) whose bytes hash to `hash`.
pub fn make_text_path(
    name: &str,
    hash: &Sha256Hash,
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, ContentAddressError> {
    Ok(make_store_path(
        &make_type("text", references, false),
        hash,
        name,
    )?)
}

/// The store path of a fixed-output object, as `nix-store --add[-fixed]` and fixed-output derivations
/// make them. Recursive SHA-256 is the `source` kind and may have references; the rest may not.
pub fn make_fixed_output_path(
    name: &str,
    method: FileIngestionMethod,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
    self_reference: bool,
) -> Result<StorePath, ContentAddressError> {
    if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
        let nar_hash =
            Sha256Hash::try_from(hash.clone()).map_err(|source| ContentAddressError::Hash {
                input: hash.to_string(),
                source,
            })?;
        let path_type = make_type("source", references, self_reference);
        return Ok(make_store_path(&path_type, &nar_hash, name)?);
    }
    let prefix = match method {
        FileIngestionMethod::Flat => "",
        FileIngestionMethod::Recursive => "r:",
    };
    if !references.is_empty() || self_reference {
        return Err(ContentAddressError::ReferencesNotAllowed {
            name: name.to_owned(),
            kind: format!("fixed:{prefix}{}", hash.algo()),
        });
    }
    let inner = Sha256Hash::digest(
        format!("fixed:out:{prefix}{}:{}:", hash.algo(), hash.to_hex()).as_bytes(),
    );
    Ok(make_store_path("output:out", &inner, name)?)
}

/// Nix's `makeType`: the type, then each reference in order, then `self` if the object refers to itself.
fn make_type(path_type: &str, references: &BTreeSet<StorePath>, self_reference: bool) -> String {
    let mut out = path_type.to_owned();
    for reference in references {
        out.push(':');
        out.push_str(&reference.to_string());
    }
    if self_reference {
        out.push_str(":self");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::drv::Derivation;
    use crate::nix::nar::NarHasher;
    use std::io::Write as _;

    // Every expected path below was printed by Nix 2.8 for the fixtures in tests/data/nix (see the
    // README there).

    fn nar_hash(nar: &[u8]) -> Hash {
        let mut h = NarHasher::new();
        h.write_all(nar).unwrap();
        h.finish().0.into()
    }

    fn path(s: &str) -> StorePath {
        s.parse().unwrap()
    }

    fn source(name: &str, nar: &[u8]) -> StorePath {
        let ca = ContentAddress::Fixed {
            method: FileIngestionMethod::Recursive,
            hash: nar_hash(nar),
        };
        ca.store_path(name, &BTreeSet::new(), false).unwrap()
    }

    #[test]
    fn source_paths_match_nix_store_add() {
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "hello.txt",
                include_bytes!("../../tests/data/nix/hello.txt.nar"),
                "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt",
            ),
            (
                "d",
                include_bytes!("../../tests/data/nix/d.nar"),
                "/nix/store/mwbrfvzc5g8n48lg1wnd1mz0h4pa8yxv-d",
            ),
            (
                "tree",
                include_bytes!("../../tests/data/nix/tree.nar"),
                "/nix/store/n4zspnjk5xiw031sqw9h3qfs2wq4bmsi-tree",
            ),
            (
                "exlink",
                include_bytes!("../../tests/data/nix/symlink.nar"),
                "/nix/store/kx4qr5lp5h2fxxh5pg045qpwa3bs2w55-exlink",
            ),
        ];
        for (name, nar, want) in cases {
            assert_eq!(source(name, nar), path(want), "{name}");
        }
    }

    #[test]
    fn flat_fixed_paths_match_nix_store_add_fixed() {
        let sha256: Hash = Sha256Hash::digest(b"hello\n").into();
        let p = make_fixed_output_path(
            "hello.txt",
            FileIngestionMethod::Flat,
            &sha256,
            &BTreeSet::new(),
            false,
        )
        .unwrap();
        assert_eq!(
            p,
            path("/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt")
        );

        let sha512 = Hash::parse_digest(
            HashAlgo::Sha512,
            "e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629",
        )
        .unwrap();
        let p = make_fixed_output_path(
            "hello.txt",
            FileIngestionMethod::Flat,
            &sha512,
            &BTreeSet::new(),
            false,
        )
        .unwrap();
        assert_eq!(
            p,
            path("/nix/store/9a8mxachqmcv8x2cfijdps9dyxgyyrzm-hello.txt")
        );
    }

    #[test]
    fn recursive_non_sha256_paths_match_nix() {
        // `nix-store --add-fixed --recursive sha1 d`; Nix reported `fixed:r:sha1:ca9jk01zqxxqb5spyyd4r7fphryb545i`.
        let ca: ContentAddress = "fixed:r:sha1:ca9jk01zqxxqb5spyyd4r7fphryb545i"
            .parse()
            .unwrap();
        let ContentAddress::Fixed { hash, .. } = &ca else {
            panic!("{ca:?}")
        };
        assert_eq!(hash.to_hex(), "b190b27c86d79d4c9af75797857bc73f80299362");
        assert_eq!(
            ca.store_path("d", &BTreeSet::new(), false).unwrap(),
            path("/nix/store/jms2g46zy78prk5sqi74l2vd0z849n8d-d")
        );
    }

    #[test]
    fn fixed_output_derivation_paths_match_the_drv() {
        for drv_file in [
            &include_bytes!("../../tests/data/nix/2d67gcd6mwskhn583wma5dzrpnalh3ik-fixed.drv")[..],
            include_bytes!("../../tests/data/nix/xrisckkm73jbgvjiwsf9qyxmzcvnda37-fixed-rec.drv"),
        ] {
            let drv = Derivation::parse(drv_file).unwrap();
            let out = &drv.outputs()["out"];
            let (method, algo) = match out.hash_algo().strip_prefix("r:") {
                Some(algo) => (FileIngestionMethod::Recursive, algo),
                None => (FileIngestionMethod::Flat, out.hash_algo()),
            };
            let hash = Hash::parse_digest(algo.parse().unwrap(), out.hash()).unwrap();
            let name = &drv.env()["name"];
            let p = make_fixed_output_path(name, method, &hash, &BTreeSet::new(), false).unwrap();
            assert_eq!(Some(&p), out.path(), "{name}");
        }
    }

    #[test]
    fn drv_paths_match_nix_instantiate() {
        let cases: [(&[u8], &str); 4] = [
            (
                include_bytes!("../../tests/data/nix/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv"),
                "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv",
            ),
            (
                include_bytes!("../../tests/data/nix/3g68jp7qaxpw5vcafq0q0kh7qla9a6lm-multi.drv"),
                "/nix/store/3g68jp7qaxpw5vcafq0q0kh7qla9a6lm-multi.drv",
            ),
            (
                include_bytes!("../../tests/data/nix/2d67gcd6mwskhn583wma5dzrpnalh3ik-fixed.drv"),
                "/nix/store/2d67gcd6mwskhn583wma5dzrpnalh3ik-fixed.drv",
            ),
            // Refers to two other .drv files and a source, so it exercises the references in the type.
            (
                include_bytes!(
                    "../../tests/data/nix/f07br121j8lgk07px9mrp5xjji8bn3hq-dependent.drv"
                ),
                "/nix/store/f07br121j8lgk07px9mrp5xjji8bn3hq-dependent.drv",
            ),
        ];
        for (contents, want) in cases {
            let want = path(want);
            let drv = Derivation::parse(contents).unwrap();
            let refs = drv.references();
            let ca = ContentAddress::Text(Sha256Hash::digest(contents));
            assert_eq!(ca.store_path(want.name(), &refs, false).unwrap(), want);
        }
    }

    #[test]
    fn references_change_the_path() {
        let hash = Sha256Hash::digest(b"x");
        let none = make_text_path("x", &hash, &BTreeSet::new()).unwrap();
        let one = make_text_path("x", &hash, &BTreeSet::from([none.clone()])).unwrap();
        assert_ne!(none, one);
        let nar: Hash = hash.into();
        let plain = make_fixed_output_path(
            "x",
            FileIngestionMethod::Recursive,
            &nar,
            &BTreeSet::new(),
            false,
        )
        .unwrap();
        let selfref = make_fixed_output_path(
            "x",
            FileIngestionMethod::Recursive,
            &nar,
            &BTreeSet::new(),
            true,
        )
        .unwrap();
        assert_ne!(plain, selfref);
    }

    #[test]
    fn refuses_references_nix_would_refuse() {
        let refs = BTreeSet::from([path(
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt",
        )]);
        let flat: Hash = Sha256Hash::digest(b"x").into();
        assert!(matches!(
            make_fixed_output_path("x", FileIngestionMethod::Flat, &flat, &refs, false),
            Err(ContentAddressError::ReferencesNotAllowed { .. })
        ));
        assert!(matches!(
            ContentAddress::Text(Sha256Hash::digest(b"x")).store_path("x", &refs, true),
            Err(ContentAddressError::TextSelfReference(_))
        ));
        assert!(matches!(
            make_text_path(".x", &Sha256Hash::digest(b"x"), &refs),
            Err(ContentAddressError::Name(_))
        ));
    }

    /// Runs a Nix CLI tool against a throwaway store under `store`, or returns `None` when Nix is not
    /// installed.
    fn run_nix(tool: &str, args: &[&std::ffi::OsStr], store: &std::path::Path) -> Option<Vec<u8>> {
        let result = std::process::Command::new(tool)
            .args(args)
            .env("NIX_REMOTE", store)
            .env("NIX_CONFIG", "substituters =")
            .output();
        let out = match result {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::two_stores::skip(&format!("{tool} is not on PATH"));
                return None;
            }
            Err(e) => panic!("running {tool}: {e}"),
        };
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out.stdout)
    }

    fn stdout_path(out: Vec<u8>) -> StorePath {
        String::from_utf8(out).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn fresh_nix_store_add_matches() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let tree = dir.path().join("fresh-tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        // Differs on every run, so this is not a fixture Nix happened to agree with once.
        let stamp = format!("{:?}", std::time::SystemTime::now());
        std::fs::write(tree.join("sub/stamp"), &stamp).unwrap();
        symlink("sub/stamp", tree.join("link")).unwrap();
        let file = dir.path().join("fresh-file");
        std::fs::write(&file, &stamp).unwrap();

        for path in [&tree, &file] {
            let Some(added) = run_nix("nix-store", &["--add".as_ref(), path.as_os_str()], &store)
            else {
                return;
            };
            let nar = run_nix("nix-store", &["--dump".as_ref(), path.as_os_str()], &store).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(source(name, &nar), stdout_path(added));
        }
        let flat = run_nix(
            "nix-store",
            &["--add-fixed".as_ref(), "sha256".as_ref(), file.as_os_str()],
            &store,
        )
        .unwrap();
        let hash: Hash = Sha256Hash::digest(stamp.as_bytes()).into();
        let ours = make_fixed_output_path(
            "fresh-file",
            FileIngestionMethod::Flat,
            &hash,
            &BTreeSet::new(),
            false,
        );
        assert_eq!(ours.unwrap(), stdout_path(flat));
    }

    #[test]
    fn fresh_nix_instantiate_matches() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let expr = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/nix/drvs.nix");
        for attr in ["simple", "multi", "fixed", "fixedRec", "dependent"] {
            let Some(out) = run_nix(
                "nix-instantiate",
                &[expr.as_ref(), "-A".as_ref(), attr.as_ref()],
                &store,
            ) else {
                return;
            };
            let drv_path = stdout_path(out);
            let real = store.join(drv_path.to_string().trim_start_matches('/'));
            let contents = std::fs::read(real).unwrap();
            let drv = Derivation::parse(&contents).unwrap();
            let ours = make_text_path(
                drv_path.name(),
                &Sha256Hash::digest(&contents),
                &drv.references(),
            );
            assert_eq!(ours.unwrap(), drv_path, "{attr}");
        }
    }

    #[test]
    fn content_addresses_round_trip() {
        for s in [
            "fixed:r:sha256:0fhmph6gq719lm6l2g0ny7j532s4r23hgs8qymaiknyc5vwfrljs",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "fixed:r:sha1:ca9jk01zqxxqb5spyyd4r7fphryb545i",
            "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
        ] {
            assert_eq!(s.parse::<ContentAddress>().unwrap().to_string(), s);
        }
        for s in [
            "",
            "text:sha1:ca9jk01zqxxqb5spyyd4r7fphryb545i",
            "fixed:r:",
            "nar:sha256:x",
            "fixed:sha256",
        ] {
            assert!(s.parse::<ContentAddress>().is_err(), "{s}");
        }
    }
}
