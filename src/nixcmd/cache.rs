//! Checking a `file://` binary cache of content-addressed or signed paths before Nix imports from
//! it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::Path;

use super::NixCmdError;
use crate::nix::import_order::{Cycle, ImportGroup, import_groups};
use crate::nix::narinfo::{MAX_NARINFO_LEN, NarInfo};
use crate::nix::store_path::StorePath;

/// Reads the narinfo of every path, checks that each names itself and is content-addressed or
/// signed, and returns the paths (without duplicates) in groups to import one after the other.
pub(super) fn check_and_order(
    dir: &Path,
    paths: &[StorePath],
) -> Result<Vec<ImportGroup>, NixCmdError> {
    let refuse = |path: &StorePath, reason: String| NixCmdError::NotContentAddressed {
        path: path.clone(),
        cache: dir.to_owned(),
        reason,
    };
    let mut references: BTreeMap<StorePath, BTreeSet<StorePath>> = BTreeMap::new();
    for path in paths {
        if references.contains_key(path) {
            continue;
        }
        let file = dir.join(format!("{}.narinfo", path.hash_part()));
        let text =
            read_bounded(&file).map_err(|e| refuse(path, format!("cannot read narinfo: {e}")))?;
        let info: NarInfo = text
            .parse()
            .map_err(|e| refuse(path, format!("invalid narinfo: {e}")))?;
        check(path, &info).map_err(|reason| refuse(path, reason))?;
        references.insert(path.clone(), info.references);
    }
    // References outside `paths` must already be valid; Nix checks that.
    import_groups(&references)
        .map_err(|Cycle(path)| refuse(&path, "the references form a cycle".to_owned()))
}

/// Checks one narinfo: it describes `path`, its NAR is inside the cache's `nar/` directory, and its
/// content address with its name and references gives back `path`; without a content address, it
/// must carry signatures, which Nix checks (the import requires them).
fn check(path: &StorePath, info: &NarInfo) -> Result<(), String> {
    if info.store_path != *path {
        return Err(format!("the narinfo describes {}", info.store_path));
    }
    if !info.has_plain_nar_url() {
        return Err(format!("NAR url {:?} is not a file under nar/", info.url));
    }
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

fn read_bounded(file: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(file)?
        .take(MAX_NARINFO_LEN as u64 + 1)
        .read_to_string(&mut text)?;
    if text.len() > MAX_NARINFO_LEN {
        return Err(std::io::Error::other("narinfo is too long"));
    }
    Ok(text)
}

/// Creates what Nix's `file://` store insists on creating when opened, so the cache can be read by
/// a user that may not write to it later: `nar/`, `realisations/`, `log/` and `nix-cache-info`.
pub(super) fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    for sub in ["nar", "realisations", "log"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let info = dir.join("nix-cache-info");
    if !info.exists() {
        std::fs::write(info, "StoreDir: /nix/store\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::content_address::ContentAddress;
    use crate::nix::hash::Sha256Hash;

    /// A text path like a `.drv`, with the given references, written to `dir`.
    fn text_path(
        dir: &Path,
        name: &str,
        bytes: &[u8],
        refs: &[&StorePath],
    ) -> (StorePath, NarInfo) {
        let ca = ContentAddress::Text(Sha256Hash::digest(bytes));
        let references: BTreeSet<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
        let path = ca.store_path(name, &references, false).unwrap();
        let info = NarInfo {
            store_path: path.clone(),
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
        };
        write(dir, &info);
        (path, info)
    }

    fn group(derivations: &[StorePath]) -> ImportGroup {
        ImportGroup {
            derivations: true,
            paths: derivations.to_vec(),
        }
    }

    fn write(dir: &Path, info: &NarInfo) {
        let file = dir.join(format!("{}.narinfo", info.store_path.hash_part()));
        std::fs::write(file, info.to_string()).unwrap();
    }

    #[test]
    fn orders_references_first() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = text_path(dir.path(), "a.drv", b"a", &[]);
        let (b, _) = text_path(dir.path(), "b.drv", b"b", &[&a]);
        let (c, _) = text_path(dir.path(), "c.drv", b"c", &[&b, &a]);
        let order =
            check_and_order(dir.path(), &[c.clone(), b.clone(), a.clone(), c.clone()]).unwrap();
        assert_eq!(order, [group(&[a.clone(), b.clone(), c])]);
        // References outside the request are left to Nix.
        let one = std::slice::from_ref(&b);
        assert_eq!(check_and_order(dir.path(), one).unwrap(), [group(one)]);
    }

    #[test]
    fn refuses_lies_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = text_path(dir.path(), "a.drv", b"a", &[]);
        let (b, mut info) = text_path(dir.path(), "b.drv", b"b", &[&a]);
        let err = |path: &StorePath| {
            check_and_order(dir.path(), std::slice::from_ref(path))
                .unwrap_err()
                .to_string()
        };

        // A reference dropped: the path no longer follows from the content address.
        info.references.clear();
        write(dir.path(), &info);
        assert!(
            err(&b).contains("with these references gives"),
            "{}",
            err(&b)
        );

        // No content address at all: an input-addressed path.
        info.references.insert(a.clone());
        info.ca = None;
        write(dir.path(), &info);
        assert!(err(&b).contains("no CA field and no signature"));
        // Unless it is signed: then Nix checks the signature (signatures required).
        let key = crate::nix::signing::SecretKey::generate("k-1").unwrap();
        info.sign(&key);
        write(dir.path(), &info);
        let one = std::slice::from_ref(&b);
        assert_eq!(check_and_order(dir.path(), one).unwrap(), [group(one)]);
        info.signatures.clear();

        // A content address of other bytes.
        info.ca = Some(ContentAddress::Text(Sha256Hash::digest(b"other")));
        write(dir.path(), &info);
        assert!(err(&b).contains("gives"));

        // A NAR url outside nar/.
        info.ca = Some(ContentAddress::Text(Sha256Hash::digest(b"b")));
        info.url = "nar/../../etc/x".to_owned();
        write(dir.path(), &info);
        assert!(err(&b).contains("not a file under nar/"));
        info.url = "nar/ok.nar".to_owned();
        write(dir.path(), &info);
        let one = std::slice::from_ref(&b);
        assert_eq!(check_and_order(dir.path(), one).unwrap(), [group(one)]);

        // A narinfo stored under another path's hash.
        let (c, _) = text_path(dir.path(), "c.drv", b"c", &[]);
        std::fs::copy(
            dir.path().join(format!("{}.narinfo", c.hash_part())),
            dir.path().join(format!("{}.narinfo", a.hash_part())),
        )
        .unwrap();
        assert!(err(&a).contains("describes"));

        // Missing narinfo.
        let missing: StorePath = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-gone.drv"
            .parse()
            .unwrap();
        assert!(err(&missing).contains("cannot read narinfo"));
    }

    #[test]
    fn prepares_the_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path()).unwrap();
        for sub in ["nar", "realisations", "log"] {
            assert!(dir.path().join(sub).is_dir());
        }
        std::fs::write(
            dir.path().join("nix-cache-info"),
            "StoreDir: /nix/store\nPriority: 9\n",
        )
        .unwrap();
        prepare_dir(dir.path()).unwrap();
        let info = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert!(info.contains("Priority: 9"));
    }
}
