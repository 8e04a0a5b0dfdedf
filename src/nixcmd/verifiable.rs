//! Checking paths offered to the store as content-addressed or signed,
//! and ordering them for import.

use std::collections::{BTreeMap, BTreeSet};

use super::NixCmdError;
use crate::nix::import_order::{Cycle, import_groups};
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::StorePath;

/// Checks that each narinfo is content-addressed or signed, and returns
/// them (without duplicates) with every path after the paths it refers to.
pub(super) fn check_and_order(infos: Vec<NarInfo>) -> Result<Vec<NarInfo>, NixCmdError> {
    let refuse = |path: &StorePath, reason: String| NixCmdError::NotContentAddressed {
        path: path.clone(),
        reason,
    };
    let mut references: BTreeMap<StorePath, BTreeSet<StorePath>> = BTreeMap::new();
    let mut by_path = BTreeMap::new();
    for info in infos {
        check(&info).map_err(|reason| refuse(&info.store_path, reason))?;
        references.insert(info.store_path.clone(), info.references.clone());
        by_path.insert(info.store_path.clone(), info);
    }
    // References outside `infos` must already be valid; Nix checks that.
    let groups = import_groups(&references)
        .map_err(|Cycle(path)| refuse(&path, "the references form a cycle".to_owned()))?;
    Ok(groups
        .into_iter()
        .flat_map(|group| group.paths)
        .filter_map(|path| by_path.remove(&path))
        .collect())
}

/// Checks one narinfo: its content address with its name and references gives back its path;
/// without a content address, it must carry signatures, which Nix checks (the import requires
/// them).
fn check(info: &NarInfo) -> Result<(), String> {
    let path = &info.store_path;
    let Some(ca) = &info.ca else {
        if info.signatures.is_empty() {
            return Err("the narinfo has no CA field and no signature".to_owned());
        }
        return Ok(());
    };
    let self_reference = info.references.contains(path);
    let mut references = info.references.clone();
    references.remove(path);
    let computed = ca
        .store_path(path.name(), &references, self_reference)
        .map_err(|e| format!("content address {ca} does not apply: {e}"))?;
    if computed != *path {
        return Err(format!(
            "content address {ca} with these references gives {computed}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::content_address::ContentAddress;
    use crate::nix::hash::Sha256Hash;

    /// A text path like a `.drv`, with the given references.
    fn text_path(name: &str, bytes: &[u8], refs: &[&StorePath]) -> NarInfo {
        let ca = ContentAddress::Text(Sha256Hash::digest(bytes));
        let references: BTreeSet<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
        NarInfo {
            store_path: ca.store_path(name, &references, false).unwrap(),
            url: "nar/x.nar".to_owned(),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash: Sha256Hash::digest(b"not checked here"),
            nar_size: 1,
            references,
            deriver: None,
            signatures: Vec::new(),
            ca: Some(ca),
            extra: Vec::new(),
        }
    }

    fn paths(infos: &[NarInfo]) -> Vec<StorePath> {
        infos.iter().map(|info| info.store_path.clone()).collect()
    }

    #[test]
    fn orders_references_first() {
        let a = text_path("a.drv", b"a", &[]);
        let b = text_path("b.drv", b"b", &[&a.store_path]);
        let c = text_path("c.drv", b"c", &[&b.store_path, &a.store_path]);
        let order = check_and_order(vec![c.clone(), b.clone(), a.clone(), c.clone()]).unwrap();
        assert_eq!(paths(&order), paths(&[a, b.clone(), c]));
        // References outside the request are left to Nix.
        assert_eq!(
            paths(&check_and_order(vec![b.clone()]).unwrap()),
            paths(&[b])
        );
    }

    #[test]
    fn refuses_lies() {
        let a = text_path("a.drv", b"a", &[]);
        let mut b = text_path("b.drv", b"b", &[&a.store_path]);
        let err = |info: &NarInfo| check_and_order(vec![info.clone()]).unwrap_err().to_string();

        // A reference dropped: the path no longer follows from the content address.
        b.references.clear();
        assert!(
            err(&b).contains("with these references gives"),
            "{}",
            err(&b)
        );

        // No content address at all: an input-addressed path.
        b.references.insert(a.store_path.clone());
        b.ca = None;
        assert!(err(&b).contains("no CA field and no signature"));
        // Unless it is signed: then Nix checks the signature (signatures required).
        let key = crate::nix::signing::SecretKey::generate("k-1").unwrap();
        b.sign(&key);
        assert_eq!(check_and_order(vec![b.clone()]).unwrap().len(), 1);
        b.signatures.clear();

        // A content address of other bytes.
        b.ca = Some(ContentAddress::Text(Sha256Hash::digest(b"other")));
        assert!(err(&b).contains("gives"));
        b.ca = Some(ContentAddress::Text(Sha256Hash::digest(b"b")));
        assert_eq!(check_and_order(vec![b]).unwrap().len(), 1);
    }
}
