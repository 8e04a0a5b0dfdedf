//! The NixOS module and its documentation agree, and the Nix files parse.
//!
//! Option paths are read from `module.nix` by the convention its header
//! describes, without evaluating Nix (there is no nixpkgs here):
//!
//! * a comment line `# option-prefix: PATH` sets the attribute path of the
//!   declarations that follow it, until the next such line;
//! * a declaration is a line `NAME = lib.mkOption {`, `NAME = lib.mkEnableOption …`
//!   or `NAME = lib.mkPackageOption …`, and those functions appear nowhere
//!   else, so a declaration cannot hide in another form.
//!
//! The README's option table, between `<!-- module:begin -->` and
//! `<!-- module:end -->`, must list exactly those paths: one row per option,
//! with the path in backticks in the first column.

#[path = "support/two_stores.rs"]
mod two_stores;

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

const PREFIX_MARKER: &str = "# option-prefix:";
const DECLARATORS: [&str; 3] = ["mkOption", "mkEnableOption", "mkPackageOption"];
const README_BEGIN: &str = "<!-- module:begin -->";
const README_END: &str = "<!-- module:end -->";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_path(relative);
    fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '\''
}

/// Byte offsets where `word` occurs as a whole identifier in `line`.
fn word_positions(line: &str, word: &str) -> Vec<usize> {
    line.match_indices(word)
        .map(|(at, _)| at)
        .filter(|&at| {
            let before = line[..at].chars().next_back();
            let after = line[at + word.len()..].chars().next();
            !before.is_some_and(|c| is_identifier_char(c) && c != '.')
                && !after.is_some_and(is_identifier_char)
        })
        .collect()
}

/// The option paths `source` declares, in file order, or what breaks the
/// convention (with its line number).
fn module_options(source: &str) -> Result<Vec<String>, String> {
    let mut prefix: Option<&str> = None;
    let mut options = Vec::new();
    for (index, line) in source.lines().enumerate() {
        let number = index + 1;
        let text = line.trim();
        if let Some(path) = text.strip_prefix(PREFIX_MARKER) {
            let path = path.trim();
            if path.is_empty() || path.contains(char::is_whitespace) {
                return Err(format!(
                    "line {number}: `{PREFIX_MARKER}` needs one attribute path"
                ));
            }
            prefix = Some(path);
            continue;
        }
        if text.starts_with('#') {
            continue;
        }
        let uses: Vec<(usize, &str)> = DECLARATORS
            .iter()
            .flat_map(|word| {
                word_positions(text, word)
                    .into_iter()
                    .map(move |at| (at, *word))
            })
            .collect();
        let [(at, declarator)] = uses[..] else {
            if uses.is_empty() {
                continue;
            }
            return Err(format!(
                "line {number}: one option declaration per line: {text}"
            ));
        };
        let canonical = text[..at]
            .strip_suffix(" = lib.")
            .filter(|name| !name.is_empty() && name.chars().all(is_identifier_char));
        let Some(name) = canonical else {
            return Err(format!(
                "line {number}: write declarations as `NAME = lib.{declarator} …` \
                 (see the convention at the top of module.nix): {text}"
            ));
        };
        let Some(prefix) = prefix else {
            return Err(format!(
                "line {number}: option `{name}` comes before any `{PREFIX_MARKER}` line"
            ));
        };
        options.push(format!("{prefix}.{name}"));
    }
    Ok(options)
}

/// The option paths in the first column of the README's module table.
fn readme_options(readme: &str) -> Result<Vec<String>, String> {
    let start = readme
        .find(README_BEGIN)
        .ok_or_else(|| format!("README.md has no {README_BEGIN}"))?;
    let end = readme
        .find(README_END)
        .ok_or_else(|| format!("README.md has no {README_END}"))?;
    let section = readme
        .get(start + README_BEGIN.len()..end)
        .ok_or("README.md: the module markers are out of order")?;
    let mut options = Vec::new();
    for row in section.lines().filter(|line| line.starts_with('|')) {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        let first = cells[0];
        if first == "Option" || first.starts_with("---") {
            continue;
        }
        let path = first
            .strip_prefix('`')
            .and_then(|rest| rest.strip_suffix('`'))
            .ok_or_else(|| format!("README option row without a `path` first: {row}"))?;
        if cells.len() != 4 || cells.iter().any(|cell| cell.is_empty()) {
            return Err(format!(
                "README row for {path} needs four filled columns (option, type, default, description)"
            ));
        }
        options.push(path.to_owned());
    }
    Ok(options)
}

fn duplicates(paths: &[String]) -> Vec<&String> {
    let mut seen = BTreeSet::new();
    paths.iter().filter(|path| !seen.insert(*path)).collect()
}

#[test]
fn readme_lists_exactly_the_module_options() {
    let module =
        module_options(&read("module.nix")).unwrap_or_else(|err| panic!("module.nix: {err}"));
    let readme = readme_options(&read("README.md")).unwrap_or_else(|err| panic!("{err}"));
    assert!(
        module.len() > 30,
        "found only {} options in module.nix; is the convention still followed?",
        module.len()
    );
    assert_eq!(
        duplicates(&module),
        Vec::<&String>::new(),
        "options declared twice in module.nix"
    );
    assert_eq!(
        duplicates(&readme),
        Vec::<&String>::new(),
        "options listed twice in README.md"
    );

    let module: BTreeSet<&String> = module.iter().collect();
    let readme: BTreeSet<&String> = readme.iter().collect();
    let undocumented: Vec<_> = module.difference(&readme).collect();
    let stale: Vec<_> = readme.difference(&module).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "README.md's option table and module.nix disagree.\n\
         declared in module.nix but not in the README: {undocumented:?}\n\
         in the README but not declared in module.nix: {stale:?}"
    );
}

#[test]
fn the_seed_options_are_declared() {
    let module =
        module_options(&read("module.nix")).unwrap_or_else(|err| panic!("module.nix: {err}"));
    // Every option of the user-facing description's full example.
    let seed = [
        "package",
        "server.enable",
        "server.dataDir",
        "server.secretKeyFile",
        "server.maxConcurrentBuilds",
        "server.outputCacheMaxParallelFills",
        "server.recentBuildsLimit",
        "server.trustedClients.<name>.publicKey",
        "server.trustedClients.<name>.maxBuildTime",
        "server.trustedClients.<name>.maxUploadBytes",
        "client.enable",
        "client.narFetches",
        "client.builders.<name>.endpointId",
        "client.builders.<name>.endpointIdFile",
        "client.builders.<name>.relayUrl",
        "client.builders.<name>.publicKey",
        "client.trustedBuilders.<name>.publicKey",
        "client.ticketHelper.enable",
        "client.ticketHelper.group",
        "client.ticketHelper.trustedBuilderPublicKeys",
    ];
    let missing: Vec<_> = seed
        .iter()
        .map(|path| format!("services.drv-thru.{path}"))
        .filter(|path| !module.contains(path))
        .collect();
    assert!(missing.is_empty(), "module.nix lacks {missing:?}");
}

#[test]
fn extraction_follows_the_convention() {
    let sample = "\
# option-prefix: services.x
{
  # Not a declaration: lib.mkOption in a comment.
  package = lib.mkPackageOption pkgs \"x\" { };
  # option-prefix: services.x.server
  server = {
    enable = lib.mkEnableOption \"the server\";
    listen-port = lib.mkOption {
      type = lib.types.port;
    };
    other = lib.mkOptionDefault 3;
  };
}
";
    assert_eq!(
        module_options(sample).unwrap(),
        [
            "services.x.package",
            "services.x.server.enable",
            "services.x.server.listen-port"
        ]
    );

    let hidden = "# option-prefix: services.x\n{ inherit (lib) mkOption; port = mkOption { }; }\n";
    assert!(module_options(hidden).unwrap_err().contains("line 2"));
    let two = "# option-prefix: services.x\n{ a = lib.mkOption { }; b = lib.mkOption { }; }\n";
    assert!(
        module_options(two)
            .unwrap_err()
            .contains("one option declaration per line")
    );
    let orphan = "{\n  a = lib.mkOption { };\n}\n";
    assert!(module_options(orphan).unwrap_err().contains("before any"));

    let readme = "\
<!-- module:begin -->
| Option | Type | Default | Description |
| --- | --- | --- | --- |
| `services.x.package` | package | `pkgs.x` | The package. |
| `services.x.server.enable` | bool | `false` | Run it. |
<!-- module:end -->
";
    assert_eq!(
        readme_options(readme).unwrap(),
        ["services.x.package", "services.x.server.enable"]
    );
    let short = readme.replace(" | Run it. |", " |");
    assert!(
        readme_options(&short)
            .unwrap_err()
            .contains("four filled columns")
    );
}

/// The text of the `let` binding `name` in `source`: from its line to the
/// next blank line.
fn binding<'a>(source: &'a str, name: &str) -> &'a str {
    let start = source
        .find(&format!("\n  {name} ="))
        .unwrap_or_else(|| panic!("module.nix binds no {name}"));
    let rest = &source[start + 1..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The server's part of the module's `config`: from its `lib.mkIf` to the
/// next one.
fn server_config_section(source: &str) -> &str {
    let start = source
        .find("(lib.mkIf serverCfg.enable {")
        .expect("module.nix has no server config section");
    let rest = &source[start + 1..];
    &rest[..rest.find("(lib.mkIf ").unwrap_or(rest.len())]
}

#[test]
fn server_values_are_checked_by_the_binary_not_by_regexes() {
    let module = read("module.nix");
    // The module's top-level `let` bindings (indented by two spaces) that
    // match a regex, directly or through another such binding.
    let bindings = &module[..module
        .find("\nin\n")
        .expect("module.nix has no top-level let")];
    let mut regex_helpers: Vec<&str> = Vec::new();
    for line in bindings.lines() {
        let Some((name, definition)) = line
            .strip_prefix("  ")
            .and_then(|line| line.split_once(" = "))
        else {
            continue;
        };
        if name.chars().all(is_identifier_char)
            && (definition.contains("builtins.match")
                || regex_helpers
                    .iter()
                    .any(|helper| !word_positions(definition, helper).is_empty()))
        {
            regex_helpers.push(name);
        }
    }
    assert!(
        regex_helpers.contains(&"matches"),
        "the regex helpers moved: {regex_helpers:?}"
    );
    let server = server_config_section(&module);
    let used: Vec<_> = regex_helpers
        .iter()
        .filter(|helper| !word_positions(server, helper).is_empty())
        .collect();
    assert!(
        used.is_empty(),
        "the server section checks values with regexes {used:?}; \
         leave them to `drv-thru serve --check-config` (checkedConfigFile)"
    );
}

#[test]
fn the_service_runs_the_config_the_binary_checked() {
    let module = read("module.nix");
    let checked = binding(&module, "checkedConfigFile");
    assert!(
        checked.contains("/bin/drv-thru serve --check-config ${serverConfigFile}"),
        "checkedConfigFile must run the check on the generated file:\n{checked}"
    );
    let unchecked_uses = module
        .replace(checked, "")
        .replace(binding(&module, "serverConfigFile"), "")
        .contains("serverConfigFile");
    assert!(
        !unchecked_uses,
        "only checkedConfigFile may use the unchecked serverConfigFile"
    );
    assert!(
        server_config_section(&module).contains("\"${checkedConfigFile}\""),
        "the service must start with checkedConfigFile"
    );
}

/// Every `--flag` the module passes or mentions outside comments.
fn module_flags(source: &str) -> BTreeSet<&str> {
    source
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.match_indices("--").map(move |(at, _)| &line[at..]))
        .map(|flag| {
            let end = flag[2..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                .map_or(flag.len(), |end| end + 2);
            &flag[..end]
        })
        .filter(|flag| flag.len() > 2)
        .collect()
}

#[test]
fn the_flags_the_module_uses_exist() {
    let module = read("module.nix");
    let flags = module_flags(&module);
    for expected in ["--config", "--check-config", "--secret-key-file"] {
        assert!(
            flags.contains(expected),
            "module.nix no longer uses {expected}"
        );
    }
    let commands: [&[&str]; 5] = [
        &["serve"],
        &["import-helper"],
        &["build"],
        &["key", "show"],
        &["ticket", "create"],
    ];
    let help: String = commands
        .iter()
        .map(|command| {
            let output = Command::new(env!("CARGO_BIN_EXE_drv-thru"))
                .args(command.iter().chain(&["--help"]))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "drv-thru {} --help failed",
                command.join(" ")
            );
            String::from_utf8(output.stdout).unwrap()
        })
        .collect();
    let unknown: Vec<_> = flags
        .iter()
        .filter(|flag| word_positions(&help, flag).is_empty())
        .collect();
    assert!(
        unknown.is_empty(),
        "module.nix uses flags the binary does not have: {unknown:?}"
    );
}

#[test]
fn an_admin_provided_secret_key_is_a_systemd_credential() {
    let module = read("module.nix");
    let server = server_config_section(&module);
    assert!(
        server.contains("LoadCredential = \"${secretKeyCredential}:${serverCfg.secretKeyFile}\"")
            && server.contains("--secret-key-file %d/${secretKeyCredential}"),
        "the service must load secretKeyFile with LoadCredential and read it from %d"
    );
}

#[test]
fn nix_files_parse() {
    for file in ["module.nix", "flake.nix", "tests/nixos/default.nix"] {
        let path = repo_path(file);
        let output = match Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&path)
            .output()
        {
            Ok(output) => output,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                two_stores::skip(&format!(
                    "nix-instantiate is not on PATH; not parsing {file}"
                ));
                return;
            }
            Err(err) => panic!("cannot run nix-instantiate: {err}"),
        };
        assert!(
            output.status.success(),
            "nix-instantiate --parse {file} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
