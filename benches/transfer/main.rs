//! Transfer benchmark: drv-thru against `nix copy` on the same data, in one run.
//!
//! ```text
//! cargo bench --bench transfer -- [--size 1G] [--runs 3] [--json] [--cases LIST]
//!                                  [--small-count 2000] [--clients 8] [--dir DIR] [--keep]
//!                                  [--compare OTHER_DRV_THRU_BINARY [--compare-label before]]
//!                                  [--link NAME | --wan]
//! ```
//!
//! `--compare` measures a second drv-thru build (its own builder process and
//! client) in the same run, for before/after figures on equal terms.
//!
//! `--link NAME` measures the transfer cases over an emulated link instead of
//! loopback, against `nix copy` over ssh-ng on the same link (see `link.rs`):
//!
//! - `1gbit-50ms`: 1 Gbit/s each way, 50 ms round trip (`--wan` is this one);
//! - `100mbit-20ms`: 100 Mbit/s each way, 20 ms round trip;
//! - `home`: 20 Mbit/s up (client to builder), 100 Mbit/s down, 30 ms round trip.
//!
//! Each direction queues up to 20 ms at its rate and drops when full.
//!
//! `closure` (the cases `closure-down` and `closure-up`) moves a path of real
//! binaries and text: about `--size` of this machine's shared libraries and
//! documentation, which the report gives zstd -1's ratio for.
//!
//! On the end-to-end tests' harness (`tests/support/`), it makes two Nix
//! stores on this machine (a directory bind-mounted over `/nix` in a private
//! mount namespace each), starts a real `drv-thru serve` in the builder's
//! store and runs the real `drv-thru build` in the client's. Needs root;
//! skips with a message otherwise (fails when `CI` is set). A `--compare`
//! binary must know `serve --ready-json`.
//!
//! Every case builds a `.drv` that was instantiated during setup, so evaluation
//! is never timed. Baselines move the same store paths with `nix copy`: from a
//! `file://?compression=none` cache, from the same cache over loopback HTTP
//! (`python3 -m http.server`) and over `ssh-ng://` through an sshd started in
//! the builder's store (skipped with a note when there is no sshd). Caches are
//! filled before timing; drv-thru's builder cache is measured both cold (filled
//! by the timed request) and warm. CPU seconds are given for both ends of
//! every method: the builder or sshd (with its sessions and `nix-daemon
//! --stdio`), and the client with the Nix processes it waited for.
//!
//! Prints a markdown table of medians (or JSON with `--json`). It asserts
//! nothing about timing.

#[path = "../../tests/support/builder.rs"]
mod builder;
mod cases;
mod link;
mod measure;
mod options;
mod report;
mod services;
mod setup;
mod stores;
#[path = "../../tests/support/two_stores.rs"]
mod two_stores;

use crate::{
    options::{Case, parse_options},
    report::Report,
    setup::{Bench, progress},
};

const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(2);
        }
    };
    if !two_stores::available() {
        return;
    }
    let json_output = options.json;
    let mut bench = match Bench::setup(options) {
        Ok(bench) => bench,
        Err(err) => {
            two_stores::skip(&format!("the transfer benchmark: {err}"));
            return;
        }
    };
    let mut report = Report {
        measured: Vec::new(),
        concurrent: Vec::new(),
    };
    for case in bench.options.cases.clone() {
        progress(&format!("case {}", case.name()));
        match case {
            Case::Download | Case::DownloadText | Case::SmallDown | Case::ClosureDown => {
                report.measured.extend(bench.download(case))
            }
            Case::Upload | Case::SmallUp | Case::ClosureUp => {
                report.measured.extend(bench.upload(case))
            }
            Case::Trivial => report.measured.extend(bench.trivial()),
            Case::Offload => report.measured.extend(bench.offload()),
            Case::Concurrent => report.concurrent = bench.concurrent(),
        }
    }
    for note in bench.link_report(&report) {
        progress(&note);
        bench.notes.push(note);
    }
    if json_output {
        println!(
            "{}",
            serde_json::to_string_pretty(&bench.json(&report)).expect("JSON")
        );
    } else {
        println!("{}", bench.markdown(&report));
    }
    progress("done");
}
