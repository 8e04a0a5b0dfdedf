//! Lines of Nix's machines file (`/etc/nix/machines`, NixOS's
//! `nix.buildMachines`): one remote builder per line, whose columns tell
//! Nix's scheduler what it may send there and how much at once.
//!
//! ```text
//! URI SYSTEMS SSH_KEY MAX_JOBS SPEED_FACTOR SUPPORTED_FEATURES MANDATORY_FEATURES PUBLIC_HOST_KEY
//! ```
//!
//! Lists are comma-separated and `-` marks an empty column. Nix 2.8 and
//! later read these eight columns alike; everything after a `#` is a
//! comment, and newer versions also split entries at `;`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How Nix's scheduler may use one builder: the columns of its line after
/// the URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduling {
    /// Systems it builds for (`x86_64-linux`); never empty.
    pub systems: Vec<String>,
    /// Builds Nix runs there at once.
    pub max_jobs: u32,
    /// Preference among machines with free slots: higher is chosen first.
    pub speed_factor: u32,
    /// Features a derivation may require and still go there
    /// (`requiredSystemFeatures`).
    pub supported_features: Vec<String>,
    /// Features a derivation must require to go there at all.
    pub mandatory_features: Vec<String>,
}

impl Scheduling {
    /// Checks what Nix would misread or silently ignore: an empty system
    /// list, zero jobs or speed, and list items that would split or end
    /// the line.
    pub fn validate(&self) -> Result<(), String> {
        if self.systems.is_empty() {
            return Err("systems must name at least one system, e.g. \"x86_64-linux\"".to_owned());
        }
        if self.max_jobs == 0 {
            return Err("max_jobs must be at least 1".to_owned());
        }
        if self.speed_factor == 0 {
            return Err("speed_factor must be at least 1".to_owned());
        }
        for (field, items) in [
            ("systems", &self.systems),
            ("supported_features", &self.supported_features),
            ("mandatory_features", &self.mandatory_features),
        ] {
            if let Some(bad) = items.iter().find(|item| !is_list_item(item)) {
                return Err(format!(
                    "{field} has {bad:?}: items may hold only letters, digits and . _ + -"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `item` survives a machines-file list unchanged: no comma, space,
/// `#` or `;`, and not the `-` that means an empty list.
fn is_list_item(item: &str) -> bool {
    !item.is_empty()
        && item != "-"
        && item
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'))
}

/// The Nix system this program was built for (`x86_64-linux`,
/// `aarch64-darwin`): the default system of a builder, as for Nix's own
/// `system` setting.
pub fn local_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        arch => arch,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        os => os,
    };
    format!("{arch}-{os}")
}

/// One line of the machines file. The URI is written as given: the caller
/// makes sure it holds no space, `#` or `;`.
#[derive(Debug, Clone, Copy)]
pub struct MachineLine<'a> {
    /// The store URI Nix opens to build there.
    pub uri: &'a str,
    /// The scheduling columns.
    pub scheduling: &'a Scheduling,
}

impl fmt::Display for MachineLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheduling = self.scheduling;
        // The SSH key and host key columns stay empty: no ssh runs.
        write!(
            f,
            "{} {} - {} {} {} {} -",
            self.uri,
            List(&scheduling.systems),
            scheduling.max_jobs,
            scheduling.speed_factor,
            List(&scheduling.supported_features),
            List(&scheduling.mandatory_features),
        )
    }
}

/// A list column: comma-separated, `-` when empty.
struct List<'a>(&'a [String]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&self.0.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    /// What a builders.json entry naming only its system gets.
    fn defaults() -> Scheduling {
        Scheduling {
            systems: strings(&["x86_64-linux"]),
            max_jobs: 1,
            speed_factor: 1,
            supported_features: Vec::new(),
            mandatory_features: Vec::new(),
        }
    }

    #[test]
    fn defaults_give_dashes_for_empty_columns() {
        let scheduling = defaults();
        let line = MachineLine {
            uri: "ssh-ng://localhost?remote-program=/bin/p&remote-store=a",
            scheduling: &scheduling,
        };
        assert_eq!(
            line.to_string(),
            "ssh-ng://localhost?remote-program=/bin/p&remote-store=a x86_64-linux - 1 1 - - -"
        );
    }

    #[test]
    fn lists_are_comma_separated() {
        let scheduling = Scheduling {
            systems: strings(&["x86_64-linux", "i686-linux"]),
            max_jobs: 8,
            speed_factor: 2,
            supported_features: strings(&["big-parallel", "kvm"]),
            mandatory_features: strings(&["benchmark"]),
        };
        let line = MachineLine {
            uri: "ssh-ng://localhost",
            scheduling: &scheduling,
        };
        assert_eq!(
            line.to_string(),
            "ssh-ng://localhost x86_64-linux,i686-linux - 8 2 big-parallel,kvm benchmark -"
        );
    }

    #[test]
    fn refuses_what_nix_would_misread() {
        let valid = defaults();
        assert_eq!(valid.validate(), Ok(()));
        type Change = fn(&mut Scheduling);
        let cases: [(Change, &str); 7] = [
            (|s| s.systems.clear(), "at least one system"),
            (|s| s.max_jobs = 0, "max_jobs must be at least 1"),
            (|s| s.speed_factor = 0, "speed_factor must be at least 1"),
            (
                |s| s.systems.push("x86_64-linux,aarch64-linux".to_owned()),
                "systems has",
            ),
            (
                |s| s.supported_features.push("big parallel".to_owned()),
                "supported_features has \"big parallel\"",
            ),
            (
                |s| s.mandatory_features.push("-".to_owned()),
                "mandatory_features",
            ),
            (
                |s| s.mandatory_features.push("a#b".to_owned()),
                "mandatory_features",
            ),
        ];
        for (change, needle) in cases {
            let mut scheduling = valid.clone();
            change(&mut scheduling);
            let err = scheduling.validate().unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn local_system_is_in_nix_form() {
        let system = local_system();
        let (arch, os) = system.split_once('-').unwrap();
        assert!(
            !arch.is_empty() && !os.is_empty() && os != "macos",
            "{system}"
        );
        assert!(is_list_item(&system));
    }
}
