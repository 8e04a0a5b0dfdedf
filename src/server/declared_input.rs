//! Inputs as a client announces them, checked before anything is staged.

use std::collections::BTreeSet;

use super::error::ServerError;
use crate::{
    nix::{content_address::ContentAddress, hash::Sha256Hash, store_path::StorePath},
    proto,
};

/// An input path as the client announced it, already checked to be
/// content-addressed as its store path claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredInput {
    /// The store path.
    pub path: StorePath,
    /// Its references, without itself.
    pub references: BTreeSet<StorePath>,
    /// Its content address.
    pub ca: ContentAddress,
    /// SHA-256 of its NAR.
    pub nar_hash: Sha256Hash,
    /// Size of its NAR.
    pub nar_size: u64,
}

impl DeclaredInput {
    /// Parses and checks an announced input: its store path must be exactly
    /// what its content address and references make it. Input-addressed
    /// paths (outputs of other derivations) are refused: nobody can check
    /// them, so the builder builds or substitutes them itself.
    pub fn from_proto(input: proto::InputPath) -> Result<Self, ServerError> {
        Self::parse(input).map_err(ServerError::InvalidArgument)
    }

    fn parse(input: proto::InputPath) -> Result<Self, String> {
        let path: StorePath = input
            .store_path
            .parse()
            .map_err(|err| format!("input {:?}: {err}", input.store_path))?;
        let mut references = BTreeSet::new();
        let mut self_reference = false;
        for reference in &input.references {
            let reference: StorePath = reference
                .parse()
                .map_err(|err| format!("input {path}: reference {reference:?}: {err}"))?;
            if reference == path {
                self_reference = true;
            } else {
                references.insert(reference);
            }
        }
        if input.content_address.is_empty() {
            return Err(format!(
                "input {path} is not content-addressed: only .drv files and sources can be uploaded, \
                 outputs of other derivations are built or substituted by the builder"
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
        let nar_hash: Sha256Hash = input
            .nar_hash
            .parse()
            .map_err(|err| format!("input {path}: nar_hash: {err}"))?;
        if input.nar_size == 0 {
            return Err(format!("input {path}: nar_size is zero"));
        }
        Ok(Self {
            path,
            references,
            ca,
            nar_hash,
            nar_size: input.nar_size,
        })
    }
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
}
