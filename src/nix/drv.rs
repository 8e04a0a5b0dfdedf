//! Reading `.drv` files, which Nix writes in ATerm syntax:
//!
//! ```text
//! Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])
//! ```
//!
//! where an output is `("name","path","hashAlgo","hash")`, an input derivation `("path",["output",...])`
//! and an environment entry `("key","value")`. Nix 2.8 and current Nix (2.18 onwards) write the same
//! `Derive(` form; newer Nix only leaves output paths empty for content-addressed and impure outputs,
//! which is accepted. The experimental `DrvWithVersion(` form (dynamic derivations) is refused with
//! its own error.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::nix::store_path::{StorePath, StorePathError};

/// Why bytes are not a `.drv` file this parser understands.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DrvError {
    /// A derivation in the experimental versioned format.
    #[error("unsupported derivation format {0:?} (only \"Derive(\" is supported)")]
    UnsupportedFormat(String),
    /// The syntax is broken.
    #[error("derivation syntax error at byte {offset}: expected {expected}")]
    Syntax {
        /// Where parsing stopped.
        offset: usize,
        /// What the grammar required there.
        expected: &'static str,
    },
    /// A string is not UTF-8.
    #[error("derivation string at byte {offset} is not utf-8")]
    NotUtf8 {
        /// Where the string starts.
        offset: usize,
    },
    /// A store path in the derivation is invalid.
    #[error("invalid store path at byte {offset} of derivation")]
    StorePath {
        /// Where the path starts.
        offset: usize,
        /// What is wrong with it.
        #[source]
        source: StorePathError,
    },
    /// An input derivation path does not end in `.drv`.
    #[error("input derivation {0} is not a .drv")]
    NotADerivation(StorePath),
    /// An output, input derivation or environment variable appears twice.
    #[error("duplicate {what} {key:?} in derivation")]
    Duplicate {
        /// Which list has the duplicate.
        what: &'static str,
        /// The repeated key.
        key: String,
    },
}

/// One output of a derivation, as written in the `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationOutput {
    path: Option<StorePath>,
    hash_algo: String,
    hash: String,
}

impl DerivationOutput {
    /// The output path; `None` when Nix computes it only after the build (content-addressed,
    /// impure, or deferred outputs).
    pub fn path(&self) -> Option<&StorePath> {
        self.path.as_ref()
    }

    /// The hash algorithm of a fixed or content-addressed output, prefixed `r:` when recursive (e.g.
    /// `r:sha256`); empty for input-addressed outputs.
    pub fn hash_algo(&self) -> &str {
        &self.hash_algo
    }

    /// The expected hash of a fixed output in hex; `impure` for impure outputs; empty otherwise.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

/// A parsed `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    outputs: BTreeMap<String, DerivationOutput>,
    input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    input_srcs: BTreeSet<StorePath>,
    system: String,
    builder: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

impl Derivation {
    /// Parses the contents of a `.drv` file. The caller bounds the input size.
    pub fn parse(bytes: &[u8]) -> Result<Self, DrvError> {
        let mut p = Parser { bytes, pos: 0 };
        if bytes.starts_with(b"DrvWithVersion(") {
            // Quote the version so the error says what this Nix wrote.
            p.pos = "DrvWithVersion(".len();
            let version = p.string().unwrap_or_default();
            return Err(DrvError::UnsupportedFormat(format!(
                "DrvWithVersion({version:?}"
            )));
        }
        p.literal(b"Derive(", "\"Derive(\"")?;

        let mut outputs = BTreeMap::new();
        p.list(|p| {
            p.literal(b"(", "\"(\"")?;
            let name = p.string()?;
            p.literal(b",", "\",\"")?;
            let path_offset = p.pos;
            let path = p.string()?;
            let path = if path.is_empty() {
                None
            } else {
                Some(parse_store_path(&path, path_offset)?)
            };
            p.literal(b",", "\",\"")?;
            let hash_algo = p.string()?;
            p.literal(b",", "\",\"")?;
            let hash = p.string()?;
            p.literal(b")", "\")\"")?;
            let output = DerivationOutput {
                path,
                hash_algo,
                hash,
            };
            insert_new(&mut outputs, name, output, "output")
        })?;
        p.literal(b",", "\",\"")?;

        let mut input_drvs = BTreeMap::new();
        p.list(|p| {
            p.literal(b"(", "\"(\"")?;
            let path = p.store_path()?;
            if !path.is_derivation() {
                return Err(DrvError::NotADerivation(path));
            }
            p.literal(b",", "\",\"")?;
            let mut wanted = BTreeSet::new();
            p.list(|p| {
                wanted.insert(p.string()?);
                Ok(())
            })?;
            p.literal(b")", "\")\"")?;
            if input_drvs.contains_key(&path) {
                return Err(DrvError::Duplicate {
                    what: "input derivation",
                    key: path.to_string(),
                });
            }
            input_drvs.insert(path, wanted);
            Ok(())
        })?;
        p.literal(b",", "\",\"")?;

        let mut input_srcs = BTreeSet::new();
        p.list(|p| {
            input_srcs.insert(p.store_path()?);
            Ok(())
        })?;
        p.literal(b",", "\",\"")?;
        let system = p.string()?;
        p.literal(b",", "\",\"")?;
        let builder = p.string()?;
        p.literal(b",", "\",\"")?;

        let mut args = Vec::new();
        p.list(|p| {
            args.push(p.string()?);
            Ok(())
        })?;
        p.literal(b",", "\",\"")?;

        let mut env = BTreeMap::new();
        p.list(|p| {
            p.literal(b"(", "\"(\"")?;
            let key = p.string()?;
            p.literal(b",", "\",\"")?;
            let value = p.string()?;
            p.literal(b")", "\")\"")?;
            insert_new(&mut env, key, value, "environment variable")
        })?;
        p.literal(b")", "\")\"")?;
        if p.pos != bytes.len() {
            return Err(DrvError::Syntax {
                offset: p.pos,
                expected: "the end of the derivation",
            });
        }
        Ok(Self {
            outputs,
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env,
        })
    }

    /// The outputs by name.
    pub fn outputs(&self) -> &BTreeMap<String, DerivationOutput> {
        &self.outputs
    }

    /// The derivations this one needs, each with the outputs it uses.
    pub fn input_drvs(&self) -> &BTreeMap<StorePath, BTreeSet<String>> {
        &self.input_drvs
    }

    /// The store paths this derivation uses directly (sources and `builtins.toFile` files).
    pub fn input_srcs(&self) -> &BTreeSet<StorePath> {
        &self.input_srcs
    }

    /// The platform it builds on, e.g. `x86_64-linux`.
    pub fn system(&self) -> &str {
        &self.system
    }

    /// The program that runs the build.
    pub fn builder(&self) -> &str {
        &self.builder
    }

    /// The builder's arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The build environment, including `name`, `system` and the output paths.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// The `.drv` file's own references: its input derivations and input sources. These, not the
    /// outputs, go into the `.drv`'s text-hashed store path.
    pub fn references(&self) -> BTreeSet<StorePath> {
        self.input_drvs
            .keys()
            .chain(&self.input_srcs)
            .cloned()
            .collect()
    }
}

fn insert_new<V>(
    map: &mut BTreeMap<String, V>,
    key: String,
    value: V,
    what: &'static str,
) -> Result<(), DrvError> {
    if map.contains_key(&key) {
        return Err(DrvError::Duplicate { what, key });
    }
    map.insert(key, value);
    Ok(())
}

fn parse_store_path(s: &str, offset: usize) -> Result<StorePath, DrvError> {
    s.parse()
        .map_err(|source| DrvError::StorePath { offset, source })
}

/// A cursor over the `.drv` bytes.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn syntax(&self, expected: &'static str) -> DrvError {
        DrvError::Syntax {
            offset: self.pos,
            expected,
        }
    }

    /// Skips `lit` if it comes next.
    fn eat(&mut self, lit: &[u8]) -> bool {
        let found = self.bytes[self.pos..].starts_with(lit);
        if found {
            self.pos += lit.len();
        }
        found
    }

    fn literal(&mut self, lit: &[u8], expected: &'static str) -> Result<(), DrvError> {
        if self.eat(lit) {
            Ok(())
        } else {
            Err(self.syntax(expected))
        }
    }

    /// A bracketed, comma-separated list; `item` parses one element.
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DrvError>,
    ) -> Result<(), DrvError> {
        self.literal(b"[", "\"[\"")?;
        if self.eat(b"]") {
            return Ok(());
        }
        loop {
            item(self)?;
            if self.eat(b"]") {
                return Ok(());
            }
            self.literal(b",", "\",\" or \"]\"")?;
        }
    }

    /// A quoted string, with the escapes Nix writes (`\"`, `\\`, `\n`, `\r`, `\t`). Like Nix, any other
    /// escaped character stands for itself.
    fn string(&mut self) -> Result<String, DrvError> {
        let start = self.pos;
        self.literal(b"\"", "a string")?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.bytes.get(self.pos) else {
                return Err(self.syntax("the end of the string"));
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&escaped) = self.bytes.get(self.pos) else {
                        return Err(self.syntax("an escaped character"));
                    };
                    self.pos += 1;
                    out.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| DrvError::NotUtf8 { offset: start })
    }

    fn store_path(&mut self) -> Result<StorePath, DrvError> {
        let offset = self.pos;
        parse_store_path(&self.string()?, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `nix-instantiate` (Nix 2.8) of tests/data/nix/drvs.nix.
    const SIMPLE: &[u8] =
        include_bytes!("../../tests/data/nix/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv");
    const MULTI: &[u8] =
        include_bytes!("../../tests/data/nix/3g68jp7qaxpw5vcafq0q0kh7qla9a6lm-multi.drv");
    const FIXED: &[u8] =
        include_bytes!("../../tests/data/nix/2d67gcd6mwskhn583wma5dzrpnalh3ik-fixed.drv");
    const DEPENDENT: &[u8] =
        include_bytes!("../../tests/data/nix/f07br121j8lgk07px9mrp5xjji8bn3hq-dependent.drv");
    /// Hand-written in the shape current Nix gives a floating content-addressed derivation.
    const CA_FLOATING: &[u8] = include_bytes!("../../tests/data/nix/ca-floating.drv");

    fn path(s: &str) -> StorePath {
        s.parse().unwrap()
    }

    #[test]
    fn parses_a_simple_derivation() {
        let drv = Derivation::parse(SIMPLE).unwrap();
        let out = &drv.outputs()["out"];
        assert_eq!(
            out.path(),
            Some(&path("/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"))
        );
        assert_eq!((out.hash_algo(), out.hash()), ("", ""));
        assert!(drv.input_drvs().is_empty() && drv.input_srcs().is_empty());
        assert_eq!(drv.system(), "x86_64-linux");
        assert_eq!(drv.builder(), "/bin/sh");
        assert_eq!(drv.args(), ["-c", "echo hi > $out"]);
        assert_eq!(drv.env()["name"], "t");
        assert_eq!(drv.env().len(), 4);
    }

    #[test]
    fn parses_multiple_outputs_and_escapes() {
        let drv = Derivation::parse(MULTI).unwrap();
        let names: Vec<&str> = drv.outputs().keys().map(String::as_str).collect();
        assert_eq!(names, ["dev", "lib", "out"]);
        assert_eq!(
            drv.outputs()["dev"].path(),
            Some(&path(
                "/nix/store/llcqd4pdlkbziv3jwk6m4r8fpdxy91xz-multi-dev"
            ))
        );
        assert_eq!(
            drv.env()["weird"],
            "quote \" backslash \\ newline \n tab \t cr \r end"
        );
    }

    #[test]
    fn parses_a_fixed_output() {
        let drv = Derivation::parse(FIXED).unwrap();
        let out = &drv.outputs()["out"];
        assert_eq!(out.hash_algo(), "sha256");
        assert_eq!(
            out.hash(),
            "99b430ed9d40ac138d044f0c641fd27fc2e0de59742c225161524dd30b797768"
        );
    }

    #[test]
    fn parses_inputs() {
        let drv = Derivation::parse(DEPENDENT).unwrap();
        let multi = path("/nix/store/3g68jp7qaxpw5vcafq0q0kh7qla9a6lm-multi.drv");
        let t = path("/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv");
        let src = path("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt");
        assert_eq!(drv.input_drvs()[&multi], BTreeSet::from(["dev".to_owned()]));
        assert_eq!(drv.input_drvs()[&t], BTreeSet::from(["out".to_owned()]));
        assert_eq!(drv.input_srcs(), &BTreeSet::from([src.clone()]));
        assert_eq!(drv.references(), BTreeSet::from([multi, t, src]));
    }

    #[test]
    fn accepts_outputs_without_paths() {
        let drv = Derivation::parse(CA_FLOATING).unwrap();
        let out = &drv.outputs()["out"];
        assert_eq!(out.path(), None);
        assert_eq!(out.hash_algo(), "r:sha256");
        assert_eq!(drv.outputs()["dev"].path(), None);
        let impure =
            br#"Derive([("out","","r:sha256","impure")],[],[],"x86_64-linux","/bin/sh",[],[])"#;
        assert_eq!(
            Derivation::parse(impure).unwrap().outputs()["out"].hash(),
            "impure"
        );
    }

    #[test]
    fn refuses_versioned_derivations() {
        let err = Derivation::parse(br#"DrvWithVersion("xp-dyn-drv",[],[],[],"x","y",[],[])"#)
            .unwrap_err();
        assert_eq!(
            err,
            DrvError::UnsupportedFormat("DrvWithVersion(\"xp-dyn-drv\"".to_owned())
        );
    }

    #[test]
    fn rejects_malformed_derivations() {
        let s = std::str::from_utf8(SIMPLE).unwrap();
        let cases = [
            s[..s.len() - 1].to_owned(),
            format!("{s}\n"),
            s.replacen("Derive(", "Derive (", 1),
            s.replacen("[(\"out\"", "[,(\"out\"", 1),
            s.replacen("/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t", "/tmp/t", 1),
            s.replacen(
                "[],[]",
                "[(\"/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt\",[\"out\"])],[]",
                1,
            ),
            s.replacen("(\"name\",\"t\")", "(\"name\",\"t\"),(\"name\",\"u\")", 1),
            s.replacen("\"echo hi > $out\"", "\"echo hi > $out\\", 1),
            String::new(),
        ];
        for case in cases {
            assert!(Derivation::parse(case.as_bytes()).is_err(), "{case}");
        }
        // Cut inside the last value, `"x86_64-linux"`, and end it with a byte that is not UTF-8.
        let not_utf8 = [&SIMPLE[..SIMPLE.len() - 10], b"\xff\")])"].concat();
        assert!(matches!(
            Derivation::parse(&not_utf8),
            Err(DrvError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn unknown_escapes_stand_for_themselves() {
        let drv = Derivation::parse(br#"Derive([],[],[],"a\$b","\/",[],[])"#).unwrap();
        assert_eq!(drv.system(), "a$b");
        assert_eq!(drv.builder(), "/");
    }
}
