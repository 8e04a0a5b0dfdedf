//! The command line.

use std::path::PathBuf;

use crate::link::{PROFILES, Profile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Case {
    Download,
    DownloadText,
    Upload,
    SmallUp,
    SmallDown,
    ClosureDown,
    ClosureUp,
    Trivial,
    Offload,
    Concurrent,
}

impl Case {
    const ALL: [Case; 10] = [
        Case::Download,
        Case::DownloadText,
        Case::Upload,
        Case::SmallUp,
        Case::SmallDown,
        Case::ClosureDown,
        Case::ClosureUp,
        Case::Trivial,
        Case::Offload,
        Case::Concurrent,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Download => "download",
            Case::DownloadText => "download-text",
            Case::Upload => "upload",
            Case::SmallUp => "small-up",
            Case::SmallDown => "small-down",
            Case::ClosureDown => "closure-down",
            Case::ClosureUp => "closure-up",
            Case::Trivial => "trivial",
            Case::Offload => "offload",
            Case::Concurrent => "concurrent",
        }
    }

    /// Whether the case's data is random, so no method can move it in
    /// fewer bytes.
    pub(crate) fn incompressible(self) -> bool {
        matches!(
            self,
            Case::Download | Case::Upload | Case::SmallUp | Case::SmallDown
        )
    }

    /// Whether the case moves data, and so runs over a `--link` too.
    pub(crate) fn transfers(self) -> bool {
        !matches!(self, Case::Trivial | Case::Offload | Case::Concurrent)
    }
}

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) size: u64,
    pub(crate) runs: usize,
    pub(crate) json: bool,
    pub(crate) cases: Vec<Case>,
    pub(crate) small_count: usize,
    pub(crate) clients: usize,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) keep: bool,
    pub(crate) compare: Option<PathBuf>,
    pub(crate) compare_label: String,
    /// The emulated link, if not loopback.
    pub(crate) link: Option<&'static Profile>,
}

pub(crate) fn usage() -> String {
    let links: Vec<String> = PROFILES
        .iter()
        .map(|p| format!("  {}", p.describe()))
        .collect();
    format!(
        "usage: cargo bench --bench transfer -- [--size 1G] [--runs 3] [--json] \
[--cases download,download-text,upload,small-up,small-down,closure,trivial,offload,concurrent] \
[--small-count 2000] [--clients 8] [--dir DIR] [--keep] [--compare OTHER_DRV_THRU_BINARY [--compare-label before]] \
[--link NAME | --wan]\n\
`closure` is closure-down and closure-up. --link measures the transfer cases, against nix copy over \
ssh-ng only, over an emulated link (--wan is --link {}):\n{}",
        PROFILES[0].name,
        links.join("\n")
    )
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let number: u64 = digits.parse().map_err(|_| format!("bad size {text:?}"))?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("bad size unit in {text:?} (use K, M or G)")),
    };
    Ok(number << shift)
}

pub(crate) fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        size: 1 << 30,
        runs: 3,
        json: false,
        cases: Case::ALL.to_vec(),
        small_count: 2000,
        clients: 8,
        dir: None,
        keep: false,
        compare: None,
        compare_label: "before".to_owned(),
        link: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--size" => options.size = parse_size(&value("--size")?)?,
            "--runs" => {
                options.runs = value("--runs")?
                    .parse()
                    .map_err(|_| "--runs needs a number")?
            }
            "--json" => options.json = true,
            "--cases" => {
                let list = value("--cases")?;
                options.cases = Vec::new();
                for name in list.split(',').filter(|name| !name.is_empty()) {
                    if name == "closure" {
                        options.cases.extend([Case::ClosureDown, Case::ClosureUp]);
                        continue;
                    }
                    let case = Case::ALL
                        .into_iter()
                        .find(|case| case.name() == name)
                        .ok_or(format!("unknown case {name:?}"))?;
                    options.cases.push(case);
                }
            }
            "--small-count" => {
                options.small_count = value("--small-count")?
                    .parse()
                    .map_err(|_| "--small-count needs a number")?
            }
            "--clients" => {
                options.clients = value("--clients")?
                    .parse()
                    .map_err(|_| "--clients needs a number")?
            }
            "--dir" => options.dir = Some(PathBuf::from(value("--dir")?)),
            "--keep" => options.keep = true,
            "--compare" => options.compare = Some(PathBuf::from(value("--compare")?)),
            "--compare-label" => options.compare_label = value("--compare-label")?,
            "--wan" => options.link = Some(&PROFILES[0]),
            "--link" => {
                let name = value("--link")?;
                options.link = Some(
                    Profile::named(&name)
                        .ok_or_else(|| format!("unknown link {name:?}\n{}", usage()))?,
                );
            }
            "--help" | "-h" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if options.runs == 0 || options.size < 1024 || options.small_count == 0 || options.clients == 0
    {
        return Err(format!("sizes and counts must be positive\n{}", usage()));
    }
    options.cases.sort();
    options.cases.dedup();
    Ok(options)
}
