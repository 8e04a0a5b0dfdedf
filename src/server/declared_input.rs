//! Inputs as a client announces them, checked before anything is staged.

use std::collections::BTreeSet;

use super::error::ServerError;
use crate::{
    nix::{
        content_address::ContentAddress, hash::Sha256Hash, narinfo::NarInfo, signing::Signature,
        store_path::StorePath,
    },
    proto,
};

/// An input path as the client announced it: content-addressed as its
/// store path claims, or input-addressed and carrying signatures (which the
/// builder checks before it asks for the path; see
/// [`super::signed_inputs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredInput {
    /// The store path.
    pub path: StorePath,
    /// Its references, without itself.
    pub references: BTreeSet<StorePath>,
    /// Whether it refers to itself.
    pub self_reference: bool,
    /// What vouches for it.
    pub proof: Proof,
    /// SHA-256 of its NAR.
    pub nar_hash: Sha256Hash,
    /// Size of its NAR.
    pub nar_size: u64,
}

/// What makes an input's store path believable to the builder's Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Its content: the store path follows from this content address, which
    /// the builder and its Nix recompute.
    ContentAddress(ContentAddress),
    /// Signatures of its narinfo fingerprint, which the builder's Nix checks
    /// against its own trusted keys.
    Signatures {
        /// The derivation that built it, as the client's store recorded it.
        deriver: Option<StorePath>,
        /// The signatures, unverified as announced.
        signatures: Vec<Signature>,
    },
}

impl DeclaredInput {
    /// Parses and checks an announced input: its store path must be exactly
    /// what its content address and references make it. Input-addressed
    /// paths (outputs of other derivations) are refused here: only their
    /// signatures can vouch for them, and those come as
    /// [`Self::signed_from_proto`].
    pub fn from_proto(input: proto::InputPath) -> Result<Self, ServerError> {
        Self::parse(input).map_err(ServerError::InvalidArgument)
    }

    /// Parses an announced signed path. Its signatures are not checked
    /// here: one the builder does not trust makes the path ignored, not the
    /// session refused.
    pub fn signed_from_proto(input: proto::SignedPath) -> Result<Self, ServerError> {
        Self::parse_signed(input).map_err(ServerError::InvalidArgument)
    }

    fn parse(input: proto::InputPath) -> Result<Self, String> {
        let path = parse_path(&input.store_path)?;
        let (references, self_reference) = parse_references(&path, &input.references)?;
        if input.content_address.is_empty() {
            return Err(format!(
                "input {path} is not content-addressed: only .drv files and sources can be uploaded, \
                 outputs of other derivations are built or substituted by the builder \
                 (or announced with their signatures as signed inputs)"
            ));
        }
        let ca: ContentAddress = input
            .content_address
            .parse()
            .map_err(|err| format!("input {path}: {err}"))?;
        let computed = ca
            .store_path(path.name(), &references, self_reference)
            .map_err(|err| format!("input {path}: {err}"))?;
        if computed != path {
            return Err(format!(
                "input {path} does not match its content address {ca} (it would be {computed})"
            ));
        }
        let (nar_hash, nar_size) = parse_nar(&path, &input.nar_hash, input.nar_size)?;
        Ok(Self {
            path,
            references,
            self_reference,
            proof: Proof::ContentAddress(ca),
            nar_hash,
            nar_size,
        })
    }

    fn parse_signed(input: proto::SignedPath) -> Result<Self, String> {
        let path = parse_path(&input.store_path)?;
        if path.is_derivation() {
            return Err(format!(
                "signed input {path} is a .drv file; announce derivations as inputs"
            ));
        }
        let (references, self_reference) = parse_references(&path, &input.references)?;
        let (nar_hash, nar_size) = parse_nar(&path, &input.nar_hash, input.nar_size)?;
        let deriver = match input.deriver.as_str() {
            "" => None,
            deriver => Some(
                deriver
                    .parse()
                    .map_err(|err| format!("signed input {path}: deriver {deriver:?}: {err}"))?,
            ),
        };
        let signatures = input
            .signatures
            .iter()
            .map(|signature| {
                signature
                    .parse()
                    .map_err(|err| format!("signed input {path}: signature {signature:?}: {err}"))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            path,
            references,
            self_reference,
            proof: Proof::Signatures {
                deriver,
                signatures,
            },
            nar_hash,
            nar_size,
        })
    }

    /// Its content address, for a content-addressed input.
    pub fn content_address(&self) -> Option<&ContentAddress> {
        match &self.proof {
            Proof::ContentAddress(ca) => Some(ca),
            Proof::Signatures { .. } => None,
        }
    }

    /// The narinfo the builder's Nix imports it with: exactly what the
    /// client announced, so what the signatures sign. It names no NAR file
    /// (its `URL:` is empty): the NAR comes with it.
    pub fn narinfo(&self) -> NarInfo {
        let mut references = self.references.clone();
        if self.self_reference {
            references.insert(self.path.clone());
        }
        let (ca, deriver, signatures) = match &self.proof {
            Proof::ContentAddress(ca) => (Some(ca.clone()), None, Vec::new()),
            Proof::Signatures {
                deriver,
                signatures,
            } => (None, deriver.clone(), signatures.clone()),
        };
        NarInfo {
            store_path: self.path.clone(),
            url: String::new(),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references,
            deriver,
            signatures,
            ca,
            extra: Vec::new(),
        }
    }
}

fn parse_path(path: &str) -> Result<StorePath, String> {
    path.parse().map_err(|err| format!("input {path:?}: {err}"))
}

/// The references of `path` without itself, and whether it refers to itself.
fn parse_references(
    path: &StorePath,
    announced: &[String],
) -> Result<(BTreeSet<StorePath>, bool), String> {
    let mut references = BTreeSet::new();
    let mut self_reference = false;
    for reference in announced {
        let reference: StorePath = reference
            .parse()
            .map_err(|err| format!("input {path}: reference {reference:?}: {err}"))?;
        if reference == *path {
            self_reference = true;
        } else {
            references.insert(reference);
        }
    }
    Ok((references, self_reference))
}

fn parse_nar(path: &StorePath, nar_hash: &str, nar_size: u64) -> Result<(Sha256Hash, u64), String> {
    let nar_hash: Sha256Hash = nar_hash
        .parse()
        .map_err(|err| format!("input {path}: nar_hash: {err}"))?;
    if nar_size == 0 {
        return Err(format!("input {path}: nar_size is zero"));
    }
    Ok((nar_hash, nar_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real .drv path with its references and content address, from Nix 2.8.
    fn text_input() -> proto::InputPath {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nix");
        let drv = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .find(|name| name.ends_with("-t.drv"))
            .expect("fixture t.drv");
        let contents = std::fs::read(dir.join(&drv)).unwrap();
        proto::InputPath {
            store_path: format!("/nix/store/{drv}"),
            references: vec![],
            content_address: format!("text:{}", Sha256Hash::digest(&contents)),
            nar_hash: format!("{}", Sha256Hash::digest(b"not checked here")),
            nar_size: 1,
        }
    }

    #[test]
    fn accepts_a_drv_whose_path_matches_its_content_address() {
        let input = DeclaredInput::from_proto(text_input()).unwrap();
        assert!(input.path.is_derivation());
    }

    #[test]
    fn refuses_input_addressed_and_mismatching_paths() {
        let mut lying = text_input();
        lying.content_address = format!("text:{}", Sha256Hash::digest(b"other contents"));
        assert!(
            DeclaredInput::parse(lying)
                .unwrap_err()
                .contains("does not match")
        );

        let mut output = text_input();
        output.content_address.clear();
        assert!(
            DeclaredInput::parse(output)
                .unwrap_err()
                .contains("not content-addressed")
        );

        let mut extra_reference = text_input();
        extra_reference
            .references
            .push("/nix/store/00000000000000000000000000000000-x".into());
        assert!(DeclaredInput::from_proto(extra_reference).is_err());
    }

    fn signed_output() -> proto::SignedPath {
        let path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-out";
        proto::SignedPath {
            store_path: path.into(),
            references: vec![path.into()],
            nar_hash: format!("{}", Sha256Hash::digest(b"the NAR")),
            nar_size: 7,
            deriver: String::new(),
            signatures: vec![format!(
                "cache-1:{}",
                data_encoding::BASE64.encode(&[1; 64])
            )],
        }
    }

    #[test]
    fn a_signed_path_keeps_what_its_signatures_cover() {
        let input = DeclaredInput::signed_from_proto(signed_output()).unwrap();
        assert!(input.self_reference && input.references.is_empty());
        assert!(input.content_address().is_none());
        let narinfo = input.narinfo();
        assert_eq!(
            narinfo.fingerprint(),
            format!(
                "1;{0};{1};7;{0}",
                input.path,
                Sha256Hash::digest(b"the NAR")
            )
        );
        assert_eq!(narinfo.signatures.len(), 1);
        assert!(narinfo.ca.is_none());
    }

    #[test]
    fn malformed_signed_paths_are_refused() {
        let mut drv = signed_output();
        drv.store_path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x.drv".into();
        drv.references.clear();
        let refused = DeclaredInput::signed_from_proto(drv).unwrap_err();
        assert!(refused.to_string().contains(".drv file"), "{refused}");

        let mut garbled = signed_output();
        garbled.signatures.push("no signature".into());
        let refused = DeclaredInput::signed_from_proto(garbled).unwrap_err();
        assert!(refused.to_string().contains("signature"), "{refused}");

        let mut deriver = signed_output();
        deriver.deriver = "not a path".into();
        assert!(DeclaredInput::signed_from_proto(deriver).is_err());
    }
}
