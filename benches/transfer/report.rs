//! The table and JSON of results.

use std::{collections::BTreeMap, fmt::Write as _, process::Command, thread};

use serde_json::{Value, json};

use crate::{
    MIB,
    cases::{FILE, HTTP, LOCAL_BUILD, SSH_NG},
    link::QUEUE,
    measure::{ConcurrentRun, Measured, median, percentile},
    options::Case,
    setup::{Bench, human},
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
    /// What crossed the emulated link, and what the line cost. Fails if a
    /// method moved more random data than the line carried for it, which
    /// would mean it found a way around.
    pub(crate) fn link_report(&self, report: &Report) -> Vec<String> {
        let Some(link) = &self.link else {
            return Vec::new();
        };
        let line = link.line();
        let moved = |pick: &dyn Fn(&Measured) -> bool| -> u64 {
            report
                .measured
                .iter()
                .filter(|m| m.case.incompressible() && pick(m))
                .map(|m| m.bytes * m.samples.len() as u64)
                .sum()
        };
        let mut checks: Vec<_> = self
            .variants
            .iter()
            .enumerate()
            .filter_map(|(i, variant)| {
                let watched = variant.watched.as_ref()?;
                Some((watched, moved(&|m: &Measured| m.variant == Some(i))))
            })
            .collect();
        if let Some(watched) = &self.ssh_watched {
            checks.push((watched, moved(&|m: &Measured| m.method == SSH_NG)));
        }
        let mut carried = Vec::new();
        for (watched, moved) in checks {
            let total = watched.total();
            assert!(
                total >= moved,
                "{}: the line carried {total} bytes for it, less than the {moved} it moved",
                watched.name
            );
            carried.push(format!(
                "{} {:.1} MiB, for {:.1} MiB of random data moved",
                watched.name,
                total as f64 / MIB,
                moved as f64 / MIB
            ));
        }
        let line_cpu: f64 = report
            .measured
            .iter()
            .flat_map(|m| m.samples.iter().filter_map(|s| s.line_cpu))
            .sum();
        let all = report
            .measured
            .iter()
            .map(|m| m.bytes * m.samples.len() as u64)
            .sum::<u64>() as f64
            / (1u64 << 30) as f64;
        vec![
            format!("the line carried {}", carried.join("; ")),
            format!("line: {}", line.summary()),
            format!(
                "the line's threads used {line_cpu:.2} CPU s during the timed runs ({} per GiB \
                 moved); that includes the receiving end's kernel work on each frame it hands on",
                if all > 0.0 {
                    format!("{:.2} s", line_cpu / all)
                } else {
                    "–".to_owned()
                }
            ),
        ]
    }

    /// The baselines the transfer table compares drv-thru with.
    fn baseline_methods(&self) -> &'static [&'static str] {
        if self.link.is_some() {
            &[SSH_NG]
        } else {
            &[FILE, HTTP, SSH_NG]
        }
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
            "link": self.link.as_ref().map(|link| json!({
                "name": link.profile.name,
                "up_bits_per_sec": link.profile.up,
                "down_bits_per_sec": link.profile.down,
                "rtt_ms": 2 * link.profile.delay.as_millis(),
                "queue_ms": QUEUE.as_millis(),
            })),
            "notes": self.notes,
        })
    }

    pub(crate) fn markdown(&self, report: &Report) -> String {
        let meta = self.meta();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drv-thru transfer benchmark, {}; {}; {} CPUs; {}; size {}, {} small paths ({}); medians of {} runs\n",
            meta["date"].as_str().unwrap_or(""),
            meta["nix"].as_str().unwrap_or(""),
            meta["cpus"],
            self.link
                .as_ref()
                .map_or("loopback".to_owned(), |link| format!(
                    "link {}",
                    link.profile.describe()
                )),
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
            let baselines = self.baseline_methods();
            let names: String = baselines
                .iter()
                .map(|b| {
                    format!(
                        " vs {} |",
                        b.trim_start_matches("nix copy ").trim_end_matches("://")
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "| case | method | median s | MiB/s | min–max s |{names}\n|---|---|---|---|---|{}",
                "---|".repeat(baselines.len())
            );
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
                let ratios: String = baselines
                    .iter()
                    .map(|b| match m.variant {
                        Some(_) => format!(" {} |", fmt_ratio(baseline(b), m.median())),
                        None => "  |".to_owned(),
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.2} | {} | {:.2}–{:.2} |{ratios}",
                    m.case.name(),
                    m.method,
                    m.median(),
                    rate(m.mib_s()),
                    min,
                    max,
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
        let cpu: Vec<&Measured> = report.measured.iter().filter(|m| m.bytes > 0).collect();
        if !cpu.is_empty() {
            let line = if self.link.is_some() { " line s |" } else { "" };
            let _ = writeln!(
                out,
                "\n| CPU, median (each side with the Nix processes it waited for) | builder s | client s | builder s/GiB | client s/GiB |{line}\n|---|---|---|---|---|{}",
                if line.is_empty() { "" } else { "---|" }
            );
            let secs =
                |value: Option<f64>| value.map_or("–".to_owned(), |secs| format!("{secs:.2}"));
            for m in cpu {
                let line = if self.link.is_some() {
                    format!(" {} |", secs(m.median_of(|s| s.line_cpu)))
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "| {} / {} | {} | {} | {} | {} |{line}",
                    m.case.name(),
                    m.method,
                    secs(m.median_of(|s| s.server_cpu)),
                    secs(m.median_of(|s| Some(s.client_cpu))),
                    secs(m.per_gib(|s| s.server_cpu)),
                    secs(m.per_gib(|s| Some(s.client_cpu))),
                );
            }
            out.push_str("\nThe builder side of `nix copy ssh-ng://` is sshd with its sessions and `nix-daemon --stdio`; of `http://`, python's server; `file://` has none.\n");
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
                let per_gib = |pick| m.per_gib(pick).map_or(Value::Null, |secs| json!(secs));
                json!({
                    "case": m.case.name(),
                    "method": m.method,
                    "bytes": m.bytes,
                    "secs": m.secs(),
                    "median_secs": m.median(),
                    "mib_per_sec": if m.bytes > 0 { json!(m.mib_s()) } else { Value::Null },
                    "throughput_vs": if m.variant.is_some() { json!(baselines) } else { Value::Null },
                    "server_peak_rss_bytes": m.samples.iter().map(|s| s.server_rss).collect::<Vec<_>>(),
                    "client_peak_rss_bytes": m.samples.iter().map(|s| s.client_rss).collect::<Vec<_>>(),
                    "server_cpu_secs": m.samples.iter().map(|s| s.server_cpu).collect::<Vec<_>>(),
                    "client_cpu_secs": m.samples.iter().map(|s| s.client_cpu).collect::<Vec<_>>(),
                    "server_cpu_secs_per_gib": per_gib(|s| s.server_cpu),
                    "client_cpu_secs_per_gib": per_gib(|s| Some(s.client_cpu)),
                    "line_cpu_secs": m.samples.iter().map(|s| s.line_cpu).collect::<Vec<_>>(),
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
