//! Parsing the JSON that Nix commands print, in the shapes of Nix 2.8 and of 2.18–2.26, and the
//! path infos its worker protocol carries.
//!
//! Pure functions from text to values, so the tests run on captured output without Nix. Each
//! returns a reason string on failure; the caller wraps it with the command that printed the text.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::nix::content_address::ContentAddress;
use crate::nix::hash::{Hash, HashAlgo, Sha256Hash};
use crate::nix::narinfo::NarInfo;
use crate::nix::signing::Signature;
use crate::nix::store_path::StorePath;
use crate::worker_protocol as wire;

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

/// Reads `path`'s info as the worker protocol carries it (`QueryPathInfo`'s answer): the NAR
/// hash in hex, empty strings for no deriver and no content address.
pub fn wire_path_info(path: StorePath, info: wire::PathInfo) -> Result<PathInfo, String> {
    let context = |what: &str, err: &dyn std::fmt::Display| format!("{what} of {path}: {err}");
    let nar_hash = Hash::parse_digest(HashAlgo::Sha256, &info.nar_hash)
        .and_then(Sha256Hash::try_from)
        .map_err(|e| context("bad narHash", &e))?;
    let references = info
        .references
        .iter()
        .map(|r| store_path(r))
        .collect::<Result<_, _>>()?;
    let deriver = match info.deriver.as_str() {
        "" => None,
        deriver => Some(store_path(deriver)?),
    };
    let ca = match info.ca.as_str() {
        "" => None,
        ca => Some(ca.parse().map_err(|e| context("bad ca", &e))?),
    };
    let signatures = info
        .sigs
        .iter()
        .map(|s| s.parse().map_err(|e| context("bad signature", &e)))
        .collect::<Result<_, _>>()?;
    Ok(PathInfo {
        path,
        nar_hash,
        nar_size: info.nar_size,
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

    const CONFIG_28: &str = include_str!("../../tests/data/nixcmd/show-config-2.8.json");
    const CONFIG_226: &str = include_str!("../../tests/data/nixcmd/config-show-2.26.json");
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

    /// `QueryPathInfo`'s answer for the `.drv` of the 2.26 captures, as `nix path-info --json`
    /// printed it there.
    fn multi_drv() -> (StorePath, wire::PathInfo) {
        let path = store_path("/nix/store/3va1gl78nb592cy4ngd1aj3pywlx8cx8-nixcmd-multi.drv");
        let info = wire::PathInfo {
            deriver: String::new(),
            nar_hash: "8d9ae4960149bcf17ce66dfa1035eed6261adfb6bde4a87b966862ddd575ee6f".to_owned(),
            references: vec![
                "/nix/store/4gf863p6zvhq4vjvxfs8shxk9kzipdrx-nixcmd-hello.drv".to_owned(),
                "/nix/store/i86aashvzkhvg84wh8b8sppr9mjiifqj-nixcmd-fixture-src".to_owned(),
            ],
            registration_time: 1795794325,
            nar_size: 944,
            ultimate: false,
            sigs: Vec::new(),
            ca: "text:sha256:1lfn7f6zcgd96lxnqlc4q25hx4bwx5kgm1ysr2p0ajldr762lq0w".to_owned(),
        };
        (path.unwrap(), info)
    }

    #[test]
    fn wire_path_infos_read_every_field() {
        let (path, info) = multi_drv();
        let drv = wire_path_info(path.clone(), info.clone()).unwrap();
        assert_eq!(drv.path, path);
        let json_hash: Sha256Hash = "sha256-jZrklgFJvPF85m36EDXu1iYa37a95Kh7lmhi3dV17m8="
            .parse()
            .unwrap();
        assert_eq!(drv.nar_hash, json_hash);
        assert_eq!(drv.nar_size, 944);
        assert!(matches!(drv.ca, Some(ContentAddress::Text(_))));
        assert_eq!(drv.deriver, None);
        assert_eq!(drv.references.len(), 2);
        assert_ca_recomputes(&drv);

        let signed = wire::PathInfo {
            deriver: "/nix/store/4gf863p6zvhq4vjvxfs8shxk9kzipdrx-nixcmd-hello.drv".to_owned(),
            sigs: vec!["k-1:2nffe0lw1Lh8JFkA6gLCsKe62t4wsBiNwe+Utnxwuj6+uv9gQRtNJ5bpFZ+H3aZDgWyiVhVUdyCx6Ln3fQBRCw==".to_owned()],
            ca: String::new(),
            ..info.clone()
        };
        let out = wire_path_info(path.clone(), signed).unwrap();
        assert_eq!(out.deriver.unwrap().name(), "nixcmd-hello.drv");
        assert_eq!(out.signatures[0].key_name(), "k-1");
        assert_eq!(out.ca, None);

        let prefixed = wire::PathInfo {
            nar_hash: format!("sha256:{}", info.nar_hash),
            ..info.clone()
        };
        assert!(
            wire_path_info(path.clone(), prefixed)
                .unwrap_err()
                .contains("narHash")
        );
        let bad_ref = wire::PathInfo {
            references: vec!["/tmp/x".to_owned()],
            ..info
        };
        assert!(wire_path_info(path, bad_ref).is_err());
    }

    #[test]
    fn narinfo_from_path_info_round_trips() {
        let (path, info) = multi_drv();
        let info = wire_path_info(path, info).unwrap();
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
