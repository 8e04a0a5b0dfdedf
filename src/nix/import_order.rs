//! The order in which a set of store paths can be added to a store.
//!
//! `nix copy --no-recursive` adds the paths it is given in dependency order
//! itself, as long as every reference is among them or already valid. But
//! `.drv` files need a call of their own (`--derivation`), so a set that
//! mixes kinds is split into groups of one kind, each group after the ones
//! its paths refer to. Fewer groups mean fewer Nix processes; for what Nix
//! evaluation produces (sources, then derivations that refer to them) there
//! are two.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
/// references outside the map are ignored. Linear in paths and references:
/// a session may announce tens of thousands.
pub fn import_groups(
    references: &BTreeMap<StorePath, BTreeSet<StorePath>>,
) -> Result<Vec<ImportGroup>, Cycle> {
    // For each path, how many of its references are not placed yet, and
    // which paths refer to it.
    let mut waiting: BTreeMap<&StorePath, usize> = BTreeMap::new();
    let mut referrers: BTreeMap<&StorePath, Vec<&StorePath>> = BTreeMap::new();
    for (path, refs) in references {
        let inside = refs
            .iter()
            .filter(|r| *r != path && references.contains_key(*r));
        let mut count = 0;
        for reference in inside {
            referrers.entry(reference).or_default().push(path);
            count += 1;
        }
        waiting.insert(path, count);
    }
    // Ready paths of each kind: [non-derivations, derivations].
    let mut ready: [VecDeque<&StorePath>; 2] = Default::default();
    for (path, count) in &waiting {
        if *count == 0 {
            ready[usize::from(path.is_derivation())].push_back(path);
        }
    }
    let mut groups = Vec::new();
    let mut placed = 0;
    let mut derivations = false;
    let mut idle_turns = 0;
    while placed < references.len() {
        let mut paths = Vec::new();
        while let Some(path) = ready[usize::from(derivations)].pop_front() {
            for referrer in referrers.get(path).map(Vec::as_slice).unwrap_or_default() {
                let count = waiting.get_mut(referrer).expect("every path is counted");
                *count -= 1;
                if *count == 0 {
                    ready[usize::from(referrer.is_derivation())].push_back(referrer);
                }
            }
            paths.push(path.clone());
        }
        if paths.is_empty() {
            idle_turns += 1;
            // Neither kind could go: what is left waits on itself.
            if idle_turns == 2 {
                let (path, _) = waiting
                    .iter()
                    .find(|(_, count)| **count > 0)
                    .expect("unplaced paths wait on others");
                return Err(Cycle((*path).clone()));
            }
        } else {
            idle_turns = 0;
            placed += paths.len();
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
    fn orders_a_long_chain_quickly() {
        // Each source refers to the one before; the derivation to all.
        let names: Vec<String> = (0..20_000).map(|i| format!("s{i}")).collect();
        let mut references: BTreeMap<StorePath, BTreeSet<StorePath>> = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let refs = i
                .checked_sub(1)
                .map(|j| path(&names[j]))
                .into_iter()
                .collect();
            references.insert(path(name), refs);
        }
        let all = references.keys().cloned().collect();
        references.insert(path("all.drv"), all);
        let groups = import_groups(&references).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].paths.len(), 20_000);
        assert_eq!(groups[0].paths[0].name(), "s0");
        assert_eq!(groups[0].paths[19_999].name(), "s19999");
        assert_eq!(groups[1].paths, [path("all.drv")]);
    }

    #[test]
    fn refuses_cycles() {
        let references = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &[])]);
        let err = import_groups(&references).unwrap_err();
        assert!(err.0.name() == "a" || err.0.name() == "b", "{err}");
    }
}
