//! The table and JSON of results.

use std::{
    collections::BTreeMap, fmt::Write as _, process::Command, sync::atomic::Ordering, thread,
};

use serde_json::{Value, json};

use crate::{
    MIB,
    cases::LOCAL_BUILD,
    measure::{ConcurrentRun, Measured, median, percentile},
    options::Case,
    setup::{Bench, human},
    stores::Side,
    wan::{tbf_drops, wan_net},
};

pub(crate) fn fmt_ratio(numerator: f64, denominator: f64) -> String {
    if numerator.is_finite() && denominator.is_finite() && denominator > 0.0 {
        format!("{:.2}×", numerator / denominator)
    } else {
        "–".to_owned()
    }
}

pub(crate) fn rate(mib_s: f64) -> String {
    if mib_s < 10.0 {
        format!("{mib_s:.1}")
    } else {
        format!("{mib_s:.0}")
    }
}

pub(crate) fn mib(bytes: Option<f64>) -> String {
    bytes.map_or("–".to_owned(), |b| format!("{:.1}", b / MIB))
}

pub(crate) struct Report {
    pub(crate) measured: Vec<Measured>,
    pub(crate) concurrent: Vec<ConcurrentRun>,
}

impl Bench {
    /// What crossed the emulated link. Fails if drv-thru moved more than
    /// the delay line carried, which would mean it found a way around.
    pub(crate) fn wan_report(&self, report: &Report) -> Vec<String> {
        let Some(_) = &self.wan else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        for variant in &self.variants {
            let Some(line) = &variant.line else {
                continue;
            };
            let moved: u64 = report
                .measured
                .iter()
                .filter(|m| m.method.starts_with(&variant.label))
                .map(|m| m.bytes * m.samples.len() as u64)
                .sum();
            let carried =
                line.up.bytes.load(Ordering::Relaxed) + line.down.bytes.load(Ordering::Relaxed);
            assert!(
                carried >= moved,
                "{}: the delay line carried {carried} bytes, less than the {moved} moved",
                variant.label
            );
            notes.push(format!(
                "delay line of {}: {}",
                variant.label,
                line.summary()
            ));
        }
        let drops = [Side::Client, Side::Builder].map(|side| {
            tbf_drops(&wan_net(side).outside()).map_or("?".to_owned(), |n| n.to_string())
        });
        notes.push(format!(
            "tbf dropped {} packets towards the client, {} towards the builder",
            drops[0], drops[1]
        ));
        notes
    }

    pub(crate) fn meta(&self) -> Value {
        let nix = Command::new("nix")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        json!({
            "date": date,
            "nix": nix,
            "cpus": cpus,
            "size_bytes": self.options.size,
            "runs": self.options.runs,
            "small_count": self.options.small_count,
            "small_bytes": self.paths.small_bytes,
            "clients": self.options.clients,
            "max_concurrent_builds": 2,
            "notes": self.notes,
        })
    }

    pub(crate) fn markdown(&self, report: &Report) -> String {
        let meta = self.meta();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drv-thru transfer benchmark, {}; {}; {} CPUs; size {}, {} small paths ({}); medians of {} runs\n",
            meta["date"].as_str().unwrap_or(""),
            meta["nix"].as_str().unwrap_or(""),
            meta["cpus"],
            human(self.options.size),
            self.options.small_count,
            human(self.paths.small_bytes),
            self.options.runs
        );
        let transfer: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| !matches!(m.case, Case::Trivial | Case::Offload))
            .collect();
        if !transfer.is_empty() {
            out.push_str("| case | method | median s | MiB/s | min–max s | vs file:// | vs http | vs ssh-ng |\n");
            out.push_str("|---|---|---|---|---|---|---|---|\n");
            for m in &transfer {
                let baseline = |name: &str| {
                    transfer
                        .iter()
                        .find(|b| b.case == m.case && b.method == name)
                        .map_or(f64::NAN, |b| b.median())
                };
                let secs = m.secs();
                let (min, max) = (
                    secs.iter().copied().fold(f64::INFINITY, f64::min),
                    secs.iter().copied().fold(0.0, f64::max),
                );
                let ratios = if m.method.starts_with("drv-thru") {
                    ["nix copy file://", "nix copy http://", "nix copy ssh-ng://"]
                        .map(|b| fmt_ratio(baseline(b), m.median()))
                } else {
                    ["", "", ""].map(str::to_owned)
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.2} | {} | {:.2}–{:.2} | {} | {} | {} |",
                    m.case.name(),
                    m.method,
                    m.median(),
                    rate(m.mib_s()),
                    min,
                    max,
                    ratios[0],
                    ratios[1],
                    ratios[2]
                );
            }
            out.push_str("\nRatios are throughput relative to the baseline (baseline time ÷ drv-thru time; above 1 is faster). drv-thru times are a whole `drv-thru build` of an instantiated .drv (session, upload, a no-op or trivial build, import).\n");
        }
        for (case, title) in [
            (
                Case::Trivial,
                "trivial build (`echo > $out`) with `drv-thru build`, evaluation excluded",
            ),
            (
                Case::Offload,
                "trivial build offloaded by Nix's build hook (`nix build -j0 --builders LINE`)",
            ),
        ] {
            overheads(
                &mut out,
                title,
                report.measured.iter().filter(|m| m.case == case),
            );
        }
        if !report.concurrent.is_empty() {
            let c = &report.concurrent;
            let totals: Vec<f64> = c.iter().map(|r| r.total).collect();
            let all: Vec<f64> = c.iter().flat_map(|r| r.per_build.clone()).collect();
            let _ = writeln!(
                out,
                "\n| {} clients at once, max_concurrent_builds = 2 (builds sleep 0.3 s) | value |\n|---|---|",
                self.options.clients
            );
            let _ = writeln!(out, "| total s (median) | {:.2} |", median(&totals));
            let _ = writeln!(out, "| per build p50 s | {:.2} |", percentile(&all, 50.0));
            let _ = writeln!(out, "| per build p99 s | {:.2} |", percentile(&all, 99.0));
            let _ = writeln!(
                out,
                "| finished | {}/{} |",
                c.iter().map(|r| r.finished).sum::<usize>(),
                c.len() * self.options.clients
            );
            let _ = writeln!(
                out,
                "| builds that waited in the queue | {} |",
                c.iter().map(|r| r.queued).sum::<usize>()
            );
            let _ = writeln!(
                out,
                "| started in FIFO order | {} |",
                if c.iter().all(|r| r.fifo) {
                    "yes"
                } else {
                    "NO"
                }
            );
            let _ = writeln!(
                out,
                "| builder idle afterwards (no slot held) | {} |",
                if c.iter().all(|r| r.idle_after) {
                    "yes"
                } else {
                    "NO"
                }
            );
        }
        let rss: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| {
                matches!(m.case, Case::Download | Case::Upload) && m.method.starts_with("drv-thru")
            })
            .collect();
        if !rss.is_empty() {
            out.push_str("\n| peak RSS (VmHWM, drv-thru processes only), median | server MiB | client MiB |\n|---|---|---|\n");
            for m in rss {
                let _ = writeln!(
                    out,
                    "| {} / {} | {} | {} |",
                    m.case.name(),
                    m.method,
                    mib(m.median_of(|s| s.server_rss.map(|b| b as f64))),
                    mib(m.median_of(|s| s.client_rss.map(|b| b as f64)))
                );
            }
        }
        let cpu: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| m.bytes > 0 && (m.method.starts_with("drv-thru") || self.wan.is_none()))
            .collect();
        if !cpu.is_empty() {
            out.push_str(
                "\n| CPU seconds, median (each side with the Nix processes it waited for) | builder | client |\n|---|---|---|\n",
            );
            for m in cpu {
                let builder = m.median_of(|s| s.server_cpu);
                let _ = writeln!(
                    out,
                    "| {} / {} | {} | {:.2} |",
                    m.case.name(),
                    m.method,
                    builder.map_or("–".to_owned(), |secs| format!("{secs:.2}")),
                    m.median_of(|s| Some(s.client_cpu)).unwrap_or(f64::NAN)
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "\nNote: {note}");
        }
        out
    }

    pub(crate) fn json(&self, report: &Report) -> Value {
        let measured: Vec<Value> = report
            .measured
            .iter()
            .map(|m| {
                let baselines: BTreeMap<&str, f64> = report
                    .measured
                    .iter()
                    .filter(|b| b.case == m.case && b.method.starts_with("nix copy"))
                    .map(|b| (b.method.as_str(), b.median() / m.median()))
                    .collect();
                json!({
                    "case": m.case.name(),
                    "method": m.method,
                    "bytes": m.bytes,
                    "secs": m.secs(),
                    "median_secs": m.median(),
                    "mib_per_sec": if m.bytes > 0 { json!(m.mib_s()) } else { Value::Null },
                    "throughput_vs": if m.method.starts_with("drv-thru") { json!(baselines) } else { Value::Null },
                    "server_peak_rss_bytes": m.samples.iter().map(|s| s.server_rss).collect::<Vec<_>>(),
                    "client_peak_rss_bytes": m.samples.iter().map(|s| s.client_rss).collect::<Vec<_>>(),
                    "server_cpu_secs": m.samples.iter().map(|s| s.server_cpu).collect::<Vec<_>>(),
                    "client_cpu_secs": m.samples.iter().map(|s| s.client_cpu).collect::<Vec<_>>(),
                })
            })
            .collect();
        let concurrent: Vec<Value> = report
            .concurrent
            .iter()
            .map(|r| {
                json!({
                    "total_secs": r.total,
                    "per_build_secs": r.per_build,
                    "finished": r.finished,
                    "queued": r.queued,
                    "fifo": r.fifo,
                    "idle_after": r.idle_after,
                })
            })
            .collect();
        json!({ "meta": self.meta(), "measured": measured, "concurrent": concurrent })
    }
}

/// A table of `measured` build times with each one's overhead over the
/// local build among them; nothing without that reference.
fn overheads<'a>(out: &mut String, title: &str, measured: impl Iterator<Item = &'a Measured>) {
    let measured: Vec<&Measured> = measured.collect();
    let Some(local) = measured.iter().find(|m| m.method == LOCAL_BUILD) else {
        return;
    };
    let _ = writeln!(
        out,
        "\n| {title} | median s | min–max s | overhead s |\n|---|---|---|---|"
    );
    for m in &measured {
        let secs = m.secs();
        let overhead = if m.method == LOCAL_BUILD {
            String::new()
        } else {
            format!("**{:.3}**", m.median() - local.median())
        };
        let _ = writeln!(
            out,
            "| {} | {:.3} | {:.3}–{:.3} | {overhead} |",
            m.method,
            m.median(),
            secs.iter().copied().fold(f64::INFINITY, f64::min),
            secs.iter().copied().fold(0.0, f64::max)
        );
    }
}
