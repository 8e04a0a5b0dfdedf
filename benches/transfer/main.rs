//! Transfer benchmark: drv-thru against `nix copy` on the same data, in one run.
//!
//! ```text
//! cargo bench --bench transfer -- [--size 1G] [--runs 3] [--json] [--cases LIST]
//!                                  [--small-count 2000] [--clients 8] [--dir DIR] [--keep]
//!                                  [--compare OTHER_DRV_THRU_BINARY [--compare-label before]]
//!                                  [--wan]
//! ```
//!
//! `--compare` measures a second drv-thru build (its own builder process and
//! client) in the same run, for before/after figures on equal terms.
//!
//! `--wan` measures drv-thru alone, and only download, upload, small-up and
//! small-down, over an emulated link instead of loopback: the builder and the
//! client each get a network namespace joined to this one by a veth pair
//! capped at 1 Gbit/s (`tbf`), with no route between them. The client dials
//! a UDP delay line in this process that forwards to the builder 25 ms later
//! each way (50 ms round trip; this kernel has no `netem`).
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
//! by the timed request) and warm.
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
