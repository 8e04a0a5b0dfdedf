//! Parsing the JSON that Nix commands print, in the shapes of Nix 2.8 and of 2.18–2.26.
//!
//! Pure functions from text to values, so the tests run on captured output without Nix. Each
//! returns a reason string on failure; the caller wraps it with the command that printed the text.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::nix::content_address::ContentAddress;
use crate::nix::hash::Sha256Hash;
use crate::nix::narinfo::NarInfo;
use crate::nix::signing::Signature;
use crate::nix::store_path::StorePath;

/// One derivation an installable evaluated to, with the paths its outputs will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluated {
    /// The `.drv` file, written to the store by the evaluation.
    pub drv_path: StorePath,
    /// The requested outputs by name (e.g. `out`, `dev`) and their store paths.
    pub outputs: BTreeMap<String, StorePath>,
}

/// What the store knows about one valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: Sha256Hash,
    /// Size of the NAR serialisation in bytes.
    pub nar_size: u64,
    /// Paths this one refers to, possibly including itself.
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it, if the store recorded one.
    pub deriver: Option<StorePath>,
    /// The content address, for content-addressed paths (`.drv` files, sources, fixed outputs).
    pub ca: Option<ContentAddress>,
    /// Signatures the store holds for it.
    pub signatures: Vec<Signature>,
}

impl PathInfo {
    /// A narinfo for this path whose NAR is stored uncompressed at `url` (e.g. `nar/<hash>.nar`),
    /// with this path's references, deriver, content address and signatures.
    pub fn to_narinfo(&self, url: String) -> NarInfo {
        NarInfo {
            store_path: self.path.clone(),
            url,
            compression: Some("none".to_owned()),
            file_hash: Some(self.nar_hash),
            file_size: Some(self.nar_size),
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            signatures: self.signatures.clone(),
            ca: self.ca.clone(),
            extra: Vec::new(),
        }
    }
}

/// The settings of `nix show-config --json` that decide what a user may import.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSubset {
    /// `trusted-users`: user names, `@group`s and `*`.
    pub trusted_users: Vec<String>,
    /// `trusted-public-keys` (including `extra-trusted-public-keys`), `name:base64` strings.
    pub trusted_public_keys: Vec<String>,
    /// `require-sigs`.
    pub require_sigs: bool,
    /// `store`: the store URL in effect (`auto`, `daemon`, `local`, …).
    pub store: String,
}

/// Parses `nix build --dry-run --json` output: `[{"drvPath": …, "outputs": {name: path}}]`, the
/// same shape in 2.8 and 2.26.
pub fn evaluated(stdout: &str) -> Result<Vec<Evaluated>, String> {
    let value: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("not json: {e}"))?;
    let Value::Array(entries) = value else {
        return Err("expected a json array".to_owned());
    };
    entries
        .iter()
        .map(|entry| {
            let entry = entry.as_object().ok_or("expected an array of objects")?;
            let drv_path = match entry.get("drvPath") {
                Some(Value::String(s)) => store_path(s)?,
                _ => {
                    let what = entry
                        .get("path")
                        .and_then(Value::as_str)
                        .unwrap_or("an entry");
                    return Err(format!("{what} is not a derivation (no drvPath)"));
                }
            };
            let outputs = entry
                .get("outputs")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("{drv_path} has no outputs"))?
                .iter()
                .map(|(name, path)| match path {
                    Value::String(path) => Ok((name.clone(), store_path(path)?)),
                    _ => Err(format!(
                        "output {name} of {drv_path} has no known path (floating content-addressed \
                         derivations are not supported)"
                    )),
                })
                .collect::<Result<_, String>>()?;
            Ok(Evaluated { drv_path, outputs })
        })
        .collect()
}

/// Parses `nix path-info --json`: an array of objects with `"path"` in 2.8, an object keyed by
/// path in 2.18+. Paths that are not valid (`"valid": false` in 2.8, `null` in 2.18+) are left out.
pub fn path_infos(stdout: &str) -> Result<Vec<PathInfo>, String> {
    let value: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("not json: {e}"))?;
    let mut infos = Vec::new();
    match value {
        Value::Array(entries) => {
            for entry in &entries {
                let entry = entry.as_object().ok_or("expected an array of objects")?;
                let path = entry
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or("an entry has no path")?;
                if entry.get("valid") == Some(&Value::Bool(false)) {
                    continue;
                }
                infos.push(path_info(store_path(path)?, entry)?);
            }
        }
        Value::Object(entries) => {
            for (path, entry) in &entries {
                match entry {
                    Value::Null => {}
                    Value::Object(entry) if entry.get("valid") == Some(&Value::Bool(false)) => {}
                    Value::Object(entry) => infos.push(path_info(store_path(path)?, entry)?),
                    _ => return Err(format!("the entry of {path} is not an object")),
                }
            }
        }
        _ => return Err("expected a json array or object".to_owned()),
    }
    Ok(infos)
}

fn path_info(path: StorePath, entry: &Map<String, Value>) -> Result<PathInfo, String> {
    let context = |what: &str| format!("{what} of {path}");
    let nar_hash = entry
        .get("narHash")
        .and_then(Value::as_str)
        .ok_or_else(|| context("missing narHash"))?
        .parse()
        .map_err(|e| format!("{}: {e}", context("bad narHash")))?;
    let nar_size = entry
        .get("narSize")
        .and_then(Value::as_u64)
        .ok_or_else(|| context("missing narSize"))?;
    let references = match entry.get("references") {
        Some(Value::Array(refs)) => refs
            .iter()
            .map(|r| r.as_str().ok_or_else(|| context("bad reference")))
            .map(|r| r.and_then(store_path))
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => BTreeSet::new(),
        Some(_) => return Err(context("bad references")),
    };
    let deriver = match entry.get("deriver") {
        Some(Value::String(d)) => Some(store_path(d)?),
        None | Some(Value::Null) => None,
        Some(_) => return Err(context("bad deriver")),
    };
    let ca = match entry.get("ca") {
        Some(Value::String(ca)) => Some(
            ca.parse()
                .map_err(|e| format!("{}: {e}", context("bad ca")))?,
        ),
        None | Some(Value::Null) => None,
        Some(_) => return Err(context("bad ca")),
    };
    let signatures = match entry.get("signatures") {
        Some(Value::Array(sigs)) => sigs
            .iter()
            .map(|s| {
                s.as_str()
                    .ok_or_else(|| context("bad signature"))?
                    .parse()
                    .map_err(|e| format!("{}: {e}", context("bad signature")))
            })
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(context("bad signatures")),
    };
    Ok(PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver,
        ca,
        signatures,
    })
}

/// Parses `nix show-config --json` (2.8) or `nix config show --json` (2.20+):
/// `{"<name>": {"value": …, …}, …}`.
pub fn config_subset(stdout: &str) -> Result<ConfigSubset, String> {
    let value: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("not json: {e}"))?;
    let settings = value.as_object().ok_or("expected a json object")?;
    let setting = |name: &str| settings.get(name).and_then(|s| s.get("value"));
    let list = |name: &str| -> Result<Vec<String>, String> {
        match setting(name) {
            // Lists are arrays; accept a whitespace-separated string too, as nix.conf writes them.
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("{name} is not a list of strings")),
            Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => Err(format!("{name} is not a list")),
        }
    };
    let require_sigs = match setting("require-sigs") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        // Nix's default.
        _ => true,
    };
    let store = setting("store")
        .and_then(Value::as_str)
        .unwrap_or("auto")
        .to_owned();
    Ok(ConfigSubset {
        trusted_users: list("trusted-users")?,
        trusted_public_keys: list("trusted-public-keys")?,
        require_sigs,
        store,
    })
}

/// Parses the `trusted` field of `nix store info --json` (2.19+) or `nix store ping --json`
/// (2.15–2.18): `{"trusted": 1, "url": "daemon", "version": "2.26.3"}`. `None` when the store did
/// not say (older daemons, stores without the notion).
pub fn store_trusted(stdout: &str) -> Result<Option<bool>, String> {
    let value: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("not json: {e}"))?;
    let info = value.as_object().ok_or("expected a json object")?;
    Ok(match info.get("trusted") {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Number(n)) => n.as_u64().map(|n| n != 0),
        _ => None,
    })
}

/// Parses `nix-store` output of one store path per line (`-qR`, `--references`, `--realise`,
/// `--print-invalid`), ignoring empty lines.
pub fn path_lines(stdout: &str) -> Result<Vec<StorePath>, String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(store_path)
        .collect()
}

fn store_path(s: &str) -> Result<StorePath, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// Asserts that `info`'s content address recomputes to its own store path.
#[cfg(test)]
pub(super) fn assert_ca_recomputes(info: &PathInfo) {
    let refs = info
        .references
        .iter()
        .filter(|r| **r != info.path)
        .cloned()
        .collect();
    let again = info
        .ca
        .as_ref()
        .expect("a content-addressed path")
        .store_path(info.path.name(), &refs, false);
    assert_eq!(again.unwrap(), info.path);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH_INFO_28: &str = include_str!("../../tests/data/nixcmd/path-info-2.8.json");
    const PATH_INFO_DRV_28: &str = include_str!("../../tests/data/nixcmd/path-info-drv-2.8.json");
    const PATH_INFO_226: &str = include_str!("../../tests/data/nixcmd/path-info-2.26.json");
    const CONFIG_28: &str = include_str!("../../tests/data/nixcmd/show-config-2.8.json");
    const CONFIG_226: &str = include_str!("../../tests/data/nixcmd/config-show-2.26.json");
    const STORE_INFO_226: &str = include_str!("../../tests/data/nixcmd/store-info-2.26.json");
    const BUILD_28: &str = include_str!("../../tests/data/nixcmd/build-dry-run-2.8.json");
    const BUILD_226: &str = include_str!("../../tests/data/nixcmd/build-dry-run-2.26.json");

    #[test]
    fn evaluates_both_versions() {
        let e28 = evaluated(BUILD_28).unwrap();
        let e226 = evaluated(BUILD_226).unwrap();
        assert_eq!(e28.len(), 1);
        assert_eq!(e28[0].drv_path.name(), "nixcmd-multi.drv");
        // 2.8 builds only `out` of a `-f` attribute, 2.26 every output; the drv is the same.
        assert_eq!(e28[0].outputs.keys().collect::<Vec<_>>(), ["out"]);
        assert_eq!(e226[0].outputs.keys().collect::<Vec<_>>(), ["dev", "out"]);
        assert_eq!(e28[0].drv_path, e226[0].drv_path);
        assert_eq!(e28[0].outputs["out"], e226[0].outputs["out"]);
        assert_eq!(e226[0].outputs["dev"].name(), "nixcmd-multi-dev");
    }

    #[test]
    fn refuses_unexpected_build_output() {
        assert!(evaluated("").unwrap_err().contains("not json"));
        assert!(evaluated("{}").unwrap_err().contains("array"));
        let opaque = r#"[{"path":"/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"}]"#;
        assert!(evaluated(opaque).unwrap_err().contains("not a derivation"));
        let floating = r#"[{"drvPath":"/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a.drv","outputs":{"out":null}}]"#;
        assert!(evaluated(floating).unwrap_err().contains("no known path"));
        let bad = r#"[{"drvPath":"/tmp/a.drv","outputs":{}}]"#;
        assert!(evaluated(bad).unwrap_err().contains("not in /nix/store"));
    }

    #[test]
    fn path_info_shapes_agree() {
        // 2.8 needed two calls (see capture.sh); 2.26 one. Both list a missing path, the multi .drv,
        // the source and the hello output.
        let mut a = path_infos(PATH_INFO_28).unwrap();
        a.extend(path_infos(PATH_INFO_DRV_28).unwrap());
        let b = path_infos(PATH_INFO_226).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 3);
        let by_name = |infos: &[PathInfo], name: &str| {
            infos
                .iter()
                .find(|i| i.path.name() == name)
                .cloned()
                .unwrap()
        };
        for name in ["nixcmd-multi.drv", "nixcmd-fixture-src", "nixcmd-hello"] {
            let (x, y) = (by_name(&a, name), by_name(&b, name));
            assert_eq!(x.path, y.path);
            assert_eq!(x.nar_hash, y.nar_hash);
            assert_eq!(x.nar_size, y.nar_size);
            assert_eq!(x.references, y.references);
            assert_eq!(x.deriver, y.deriver);
            assert_eq!(x.ca, y.ca);
        }
        let drv = by_name(&b, "nixcmd-multi.drv");
        assert!(matches!(drv.ca, Some(ContentAddress::Text(_))));
        assert!(
            drv.references
                .iter()
                .any(|r| r.name() == "nixcmd-hello.drv")
        );
        assert!(
            drv.references
                .iter()
                .any(|r| r.name() == "nixcmd-fixture-src")
        );
        assert_eq!(drv.deriver, None);
        let src = by_name(&a, "nixcmd-fixture-src");
        assert_eq!(
            src.ca.as_ref().unwrap().to_string().get(..14),
            Some("fixed:r:sha256")
        );
        let out = by_name(&a, "nixcmd-hello");
        assert_eq!(out.ca, None);
        assert_eq!(out.deriver.unwrap().name(), "nixcmd-hello.drv");
        // Content addresses recompute to the paths they describe.
        for info in [&drv, &src] {
            assert_ca_recomputes(info);
        }
    }

    #[test]
    fn path_info_reads_signatures_and_skips_missing() {
        let json = r#"{"/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt":{"ca":null,"deriver":null,
            "narHash":"sha256-LXfzyoobFXLCjjtInN3FVBweyiWTuX6ry2PqLV5kkTQ=","narSize":8,"references":[],
            "signatures":["k-1:2nffe0lw1Lh8JFkA6gLCsKe62t4wsBiNwe+Utnxwuj6+uv9gQRtNJ5bpFZ+H3aZDgWyiVhVUdyCx6Ln3fQBRCw=="]},
            "/nix/store/00000000000000000000000000000000-gone":null}"#;
        let infos = path_infos(json).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].signatures.len(), 1);
        assert_eq!(infos[0].signatures[0].key_name(), "k-1");
        let old = r#"[{"path":"/nix/store/00000000000000000000000000000000-gone","valid":false}]"#;
        assert!(path_infos(old).unwrap().is_empty());
        assert!(path_infos("[]").unwrap().is_empty());
        assert!(path_infos("{}").unwrap().is_empty());
        assert!(path_infos("3").is_err());
        let no_hash = r#"[{"path":"/nix/store/00000000000000000000000000000000-x","narSize":1}]"#;
        assert!(path_infos(no_hash).unwrap_err().contains("narHash"));
    }

    #[test]
    fn narinfo_from_path_info_round_trips() {
        let info = path_infos(PATH_INFO_226)
            .unwrap()
            .into_iter()
            .find(|i| i.path.name() == "nixcmd-multi.drv")
            .unwrap();
        let narinfo = info.to_narinfo(format!("nar/{}.nar", info.nar_hash.to_nix_base32()));
        let text = narinfo.to_string();
        assert!(text.contains("Compression: none\n"), "{text}");
        assert!(text.contains("CA: text:sha256:"), "{text}");
        let back: NarInfo = text.parse().unwrap();
        assert_eq!(back, narinfo);
    }

    #[test]
    fn config_of_both_versions() {
        for json in [CONFIG_28, CONFIG_226] {
            let c = config_subset(json).unwrap();
            assert_eq!(c.trusted_users, ["root"]);
            assert_eq!(
                c.trusted_public_keys,
                ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
            );
            assert!(c.require_sigs);
            assert_eq!(c.store, "auto");
        }
        let strings = r#"{"trusted-users":{"value":"root @wheel"},"require-sigs":{"value":false}}"#;
        let c = config_subset(strings).unwrap();
        assert_eq!(c.trusted_users, ["root", "@wheel"]);
        assert!(c.trusted_public_keys.is_empty());
        assert!(!c.require_sigs);
        assert!(config_subset("[]").is_err());
        assert!(config_subset(r#"{"trusted-users":{"value":3}}"#).is_err());
    }

    #[test]
    fn store_info_trust() {
        assert_eq!(store_trusted(STORE_INFO_226), Ok(Some(true)));
        assert_eq!(
            store_trusted(r#"{"trusted":0,"url":"daemon"}"#),
            Ok(Some(false))
        );
        assert_eq!(store_trusted(r#"{"trusted":false}"#), Ok(Some(false)));
        assert_eq!(store_trusted(r#"{"url":"daemon"}"#), Ok(None));
        assert!(store_trusted("Store URL: daemon").is_err());
    }

    #[test]
    fn path_lines_parse_and_reject() {
        let paths = path_lines(
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt\n\n\
             /nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv\n",
        )
        .unwrap();
        assert_eq!(paths.len(), 2);
        assert!(path_lines("").unwrap().is_empty());
        assert!(path_lines("warning: x\n").is_err());
    }
}
