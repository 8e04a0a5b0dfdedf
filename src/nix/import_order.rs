//! The order in which a set of store paths can be added to a store.
//!
//! `nix copy --no-recursive` adds the paths it is given in dependency order
//! itself, as long as every reference is among them or already valid. But
//! `.drv` files need a call of their own (`--derivation`), so a set that
//! mixes kinds is split into groups of one kind, each group after the ones
//! its paths refer to. Fewer groups mean fewer Nix processes; for what Nix
//! evaluation produces (sources, then derivations that refer to them) there
//! are two.

use std::collections::{BTreeMap, BTreeSet};

use super::store_path::StorePath;

/// A group of paths of one kind, in dependency order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportGroup {
    /// Whether the paths are `.drv` files.
    pub derivations: bool,
    /// The paths; each refers only to paths before it, in earlier groups, or
    /// outside the set.
    pub paths: Vec<StorePath>,
}

/// The references among the paths form a cycle, which no store accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the references of {0} form a cycle")]
pub struct Cycle(pub StorePath);

/// Groups `references` (each path with what it refers to) for import:
/// alternately as many non-derivations and as many derivations as are
/// ready, starting with non-derivations. A path's reference to itself and
/// references outside the map are ignored.
pub fn import_groups(
    references: &BTreeMap<StorePath, BTreeSet<StorePath>>,
) -> Result<Vec<ImportGroup>, Cycle> {
    let mut remaining: BTreeMap<&StorePath, BTreeSet<&StorePath>> = references
        .iter()
        .map(|(path, refs)| {
            let inside = refs
                .iter()
                .filter(|r| *r != path && references.contains_key(*r))
                .collect();
            (path, inside)
        })
        .collect();
    let mut groups = Vec::new();
    let mut derivations = false;
    let mut idle_turns = 0;
    while !remaining.is_empty() {
        let mut paths = Vec::new();
        loop {
            let ready: Vec<&StorePath> = remaining
                .iter()
                .filter(|(path, refs)| path.is_derivation() == derivations && refs.is_empty())
                .map(|(path, _)| *path)
                .collect();
            if ready.is_empty() {
                break;
            }
            for path in ready {
                remaining.remove(path);
                for refs in remaining.values_mut() {
                    refs.remove(path);
                }
                paths.push(path.clone());
            }
        }
        if paths.is_empty() {
            idle_turns += 1;
            // Neither kind could go: what is left waits on itself.
            if idle_turns == 2 {
                let (path, _) = remaining.first_key_value().expect("not empty");
                return Err(Cycle((*path).clone()));
            }
        } else {
            idle_turns = 0;
            groups.push(ImportGroup { derivations, paths });
        }
        derivations = !derivations;
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        // Distinct hash parts from the name, so the map's order is not the
        // dependency order.
        let hash: String = name
            .bytes()
            .map(|b| char::from(b"0123456789abcdfghijklmnpqrsvwxyz"[usize::from(b) % 32]))
            .chain(std::iter::repeat('0'))
            .take(32)
            .collect();
        format!("/nix/store/{hash}-{name}").parse().unwrap()
    }

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<StorePath, BTreeSet<StorePath>> {
        edges
            .iter()
            .map(|(from, to)| (path(from), to.iter().map(|t| path(t)).collect()))
            .collect()
    }

    fn names(groups: &[ImportGroup]) -> Vec<(bool, Vec<&str>)> {
        groups
            .iter()
            .map(|g| (g.derivations, g.paths.iter().map(|p| p.name()).collect()))
            .collect()
    }

    #[test]
    fn sources_then_derivations_in_two_groups() {
        let references = graph(&[
            ("z-src", &[]),
            ("a-src", &["z-src", "a-src"]),
            ("top.drv", &["dep.drv", "a-src"]),
            ("dep.drv", &["z-src", "elsewhere"]),
        ]);
        let groups = import_groups(&references).unwrap();
        assert_eq!(
            names(&groups),
            [
                (false, vec!["z-src", "a-src"]),
                (true, vec!["dep.drv", "top.drv"])
            ]
        );
    }

    #[test]
    fn alternates_only_as_often_as_references_demand() {
        // A text file naming a derivation, used by another derivation.
        let references = graph(&[
            ("b.drv", &[]),
            ("names-b", &["b.drv"]),
            ("c.drv", &["names-b", "b.drv"]),
            ("src", &[]),
        ]);
        let groups = import_groups(&references).unwrap();
        assert_eq!(
            names(&groups),
            [
                (false, vec!["src"]),
                (true, vec!["b.drv"]),
                (false, vec!["names-b"]),
                (true, vec!["c.drv"]),
            ]
        );
        assert!(import_groups(&BTreeMap::new()).unwrap().is_empty());
    }

    #[test]
    fn refuses_cycles() {
        let references = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &[])]);
        let err = import_groups(&references).unwrap_err();
        assert!(err.0.name() == "a" || err.0.name() == "b", "{err}");
    }
}
