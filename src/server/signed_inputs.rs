//! Inputs built elsewhere: which of the signed paths a client announces the
//! builder asks for. Pure decisions; the service asks its Nix for the
//! trusted keys and for what is valid already.
//!
//! A path is asked for only if the builder's own Nix would take it from a
//! substituter: signed by a key it trusts, with every reference available.
//! The builder's Nix checks the signature again when it imports the path, so
//! this decision only spares an upload that Nix would refuse.

use std::collections::{BTreeMap, BTreeSet};

use super::declared_input::{DeclaredInput, Proof};
use crate::nix::{signing::PublicKey, store_path::StorePath};

/// The keys the builder's Nix trusts (`trusted-public-keys`), by name.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(BTreeMap<String, PublicKey>);

impl TrustedKeys {
    /// The keys of a `trusted-public-keys` setting (`NAME:BASE64` each). As
    /// in Nix, the first key of a name is the one that counts; entries that
    /// are not keys are skipped, as they can verify nothing.
    pub fn from_config(keys: &[String]) -> Self {
        let mut by_name = BTreeMap::new();
        for key in keys.iter().filter_map(|key| key.parse::<PublicKey>().ok()) {
            by_name.entry(key.name().to_owned()).or_insert(key);
        }
        Self(by_name)
    }

    /// Whether one of `input`'s signatures verifies, over the fingerprint
    /// of what was announced, under the trusted key of its name.
    pub fn vouch_for(&self, input: &DeclaredInput) -> bool {
        let Proof::Signatures { signatures, .. } = &input.proof else {
            return false;
        };
        let fingerprint = input.narinfo().fingerprint();
        signatures.iter().any(|signature| {
            self.0
                .get(signature.key_name())
                .is_some_and(|key| key.verify(fingerprint.as_bytes(), signature))
        })
    }
}

/// The paths whose validity on the builder decides which of `signed` are
/// asked for: each of them and each of their references that is not among
/// `content_addressed` (the session's verified inputs).
pub fn paths_to_check(
    signed: &[DeclaredInput],
    content_addressed: &BTreeMap<StorePath, DeclaredInput>,
) -> Vec<StorePath> {
    let mut paths = BTreeSet::new();
    for input in signed {
        paths.insert(input.path.clone());
        paths.extend(
            input
                .references
                .iter()
                .filter(|reference| !content_addressed.contains_key(*reference))
                .cloned(),
        );
    }
    paths.into_iter().collect()
}

/// The signed paths to accept, of those `keys` vouch for: each whose
/// references are all content-addressed inputs of the session, `valid` on
/// the builder, or accepted themselves. A path that is also announced as
/// content-addressed is taken as that.
pub fn accepted(
    signed: Vec<DeclaredInput>,
    keys: &TrustedKeys,
    content_addressed: &BTreeMap<StorePath, DeclaredInput>,
    valid: &BTreeSet<StorePath>,
) -> BTreeMap<StorePath, DeclaredInput> {
    let mut accepted: BTreeMap<StorePath, DeclaredInput> = signed
        .into_iter()
        .filter(|input| !content_addressed.contains_key(&input.path) && keys.vouch_for(input))
        .map(|input| (input.path.clone(), input))
        .collect();
    // Dropping a path may strand those that refer to it: repeat until
    // nothing more drops. Each round drops at least one path or ends.
    loop {
        let stranded: Vec<StorePath> = accepted
            .values()
            .filter(|input| {
                !input.references.iter().all(|reference| {
                    content_addressed.contains_key(reference)
                        || valid.contains(reference)
                        || accepted.contains_key(reference)
                })
            })
            .map(|input| input.path.clone())
            .collect();
        if stranded.is_empty() {
            return accepted;
        }
        for path in stranded {
            accepted.remove(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{
        content_address::ContentAddress,
        hash::Sha256Hash,
        signing::{SecretKey, Signature},
    };

    fn path(name: &str) -> StorePath {
        let hash = Sha256Hash::digest(name.as_bytes()).to_string();
        // Any 32 characters of the Nix base32 alphabet make a hash part.
        let part: String = hash["sha256:".len()..][..32].to_owned();
        format!("/nix/store/{part}-{name}").parse().unwrap()
    }

    /// An output `name` referring to `references`, signed by `keys`.
    fn signed(name: &str, references: &[&DeclaredInput], keys: &[&SecretKey]) -> DeclaredInput {
        let mut input = DeclaredInput {
            path: path(name),
            references: references.iter().map(|r| r.path.clone()).collect(),
            self_reference: false,
            proof: Proof::Signatures {
                deriver: None,
                signatures: Vec::new(),
            },
            nar_hash: Sha256Hash::digest(name.as_bytes()),
            nar_size: 100,
        };
        sign(&mut input, keys);
        input
    }

    fn sign(input: &mut DeclaredInput, keys: &[&SecretKey]) {
        let fingerprint = input.narinfo().fingerprint();
        let new: Vec<Signature> = keys
            .iter()
            .map(|key| key.sign(fingerprint.as_bytes()))
            .collect();
        if let Proof::Signatures { signatures, .. } = &mut input.proof {
            *signatures = new;
        }
    }

    fn trusting(keys: &[&SecretKey]) -> TrustedKeys {
        let config: Vec<String> = keys.iter().map(|k| k.to_public().to_string()).collect();
        TrustedKeys::from_config(&config)
    }

    fn source(name: &str) -> DeclaredInput {
        let ca = ContentAddress::Text(Sha256Hash::digest(name.as_bytes()));
        DeclaredInput {
            path: ca.store_path(name, &BTreeSet::new(), false).unwrap(),
            references: BTreeSet::new(),
            self_reference: false,
            proof: Proof::ContentAddress(ca),
            nar_hash: Sha256Hash::digest(name.as_bytes()),
            nar_size: 100,
        }
    }

    fn names(accepted: &BTreeMap<StorePath, DeclaredInput>) -> BTreeSet<&str> {
        accepted.keys().map(StorePath::name).collect()
    }

    #[test]
    fn a_signature_counts_only_by_a_trusted_key_over_the_announced_fields() {
        let trusted = SecretKey::generate("trusted-1").unwrap();
        let other = SecretKey::generate("other-1").unwrap();
        let keys = trusting(&[&trusted]);
        assert!(keys.vouch_for(&signed("good", &[], &[&other, &trusted])));
        assert!(!keys.vouch_for(&signed("untrusted", &[], &[&other])));
        assert!(!keys.vouch_for(&signed("unsigned", &[], &[])));

        // Any announced field changed after signing breaks the signature.
        let lib = signed("lib", &[], &[]);
        let mut tampered = signed("hash", &[], &[&trusted]);
        tampered.nar_hash = Sha256Hash::digest(b"other bytes");
        assert!(!keys.vouch_for(&tampered));
        let mut tampered = signed("size", &[], &[&trusted]);
        tampered.nar_size += 1;
        assert!(!keys.vouch_for(&tampered));
        let mut tampered = signed("refs", &[], &[&trusted]);
        tampered.references.insert(lib.path.clone());
        assert!(!keys.vouch_for(&tampered));
        let mut tampered = signed("self", &[], &[&trusted]);
        tampered.self_reference = true;
        assert!(!keys.vouch_for(&tampered));

        // A signature copied from another path does not carry over.
        let donor = signed("donor", &[], &[&trusted]);
        let mut copied = signed("copied", &[], &[]);
        copied.proof = donor.proof.clone();
        assert!(!keys.vouch_for(&copied));

        // A signature under a trusted key's name but by another key.
        let impostor = SecretKey::generate("trusted-1").unwrap();
        assert!(!keys.vouch_for(&signed("impostor", &[], &[&impostor])));

        // Content-addressed inputs are never vouched for by signatures.
        assert!(!keys.vouch_for(&source("src")));
    }

    #[test]
    fn the_first_trusted_key_of_a_name_counts() {
        let first = SecretKey::generate("cache-1").unwrap();
        let second = SecretKey::generate("cache-1").unwrap();
        let keys = TrustedKeys::from_config(&[
            "not a key".to_owned(),
            first.to_public().to_string(),
            second.to_public().to_string(),
        ]);
        assert!(keys.vouch_for(&signed("a", &[], &[&first])));
        assert!(!keys.vouch_for(&signed("b", &[], &[&second])));
        assert!(!TrustedKeys::default().vouch_for(&signed("c", &[], &[&first])));
    }

    #[test]
    fn only_paths_whose_references_are_all_available_are_accepted() {
        let trusted = SecretKey::generate("trusted-1").unwrap();
        let other = SecretKey::generate("other-1").unwrap();
        let keys = trusting(&[&trusted]);
        let src = source("src");
        let content_addressed = BTreeMap::from([(src.path.clone(), src.clone())]);
        let on_builder = signed("on-builder", &[], &[]);
        let untrusted = signed("untrusted", &[], &[&other]);
        let base = signed("base", &[&src], &[&trusted]);
        let lib = signed("lib", &[&base, &on_builder], &[&trusted]);
        let app = signed("app", &[&lib], &[&trusted]);
        let stranded = signed("stranded", &[&untrusted], &[&trusted]);
        let above_stranded = signed("above-stranded", &[&stranded, &lib], &[&trusted]);
        let valid = BTreeSet::from([on_builder.path.clone()]);
        let all = vec![
            app.clone(),
            lib,
            base,
            untrusted.clone(),
            stranded,
            above_stranded,
        ];
        let accepted_now = accepted(all.clone(), &keys, &content_addressed, &valid);
        assert_eq!(names(&accepted_now), BTreeSet::from(["app", "lib", "base"]));

        // The untrusted path being valid on the builder makes up for it.
        let valid = BTreeSet::from([on_builder.path.clone(), untrusted.path.clone()]);
        assert_eq!(
            accepted(all.clone(), &keys, &content_addressed, &valid).len(),
            5
        );

        // Without what the base refers to, nothing stands.
        assert!(accepted(all, &keys, &BTreeMap::new(), &BTreeSet::new()).is_empty());

        // A path announced as content-addressed is taken as that.
        let mut as_signed = signed("src", &[], &[&trusted]);
        as_signed.path = src.path.clone();
        sign(&mut as_signed, &[&trusted]);
        assert!(accepted(vec![as_signed], &keys, &content_addressed, &BTreeSet::new()).is_empty());

        let checked = paths_to_check(
            &[app.clone(), signed("b2", &[&src], &[])],
            &content_addressed,
        );
        assert!(checked.contains(&app.path) && !checked.contains(&src.path));
    }
}
