//! The measured cases.

use std::{
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    measure::{ConcurrentRun, Measured, Remote, timed},
    options::Case,
    setup::{Bench, progress},
    stores::{Side, builder_status, clear_cache},
};

/// The method name of a build in the client's own store, the reference
/// the build overheads are measured against.
pub(crate) const LOCAL_BUILD: &str = "local nix build";

/// The baselines' method names.
pub(crate) const FILE: &str = "nix copy file://";
pub(crate) const HTTP: &str = "nix copy http://";
pub(crate) const SSH_NG: &str = "nix copy ssh-ng://";

/// What to undo before each run of a method, so every run does the same work.
#[derive(Clone, Copy)]
pub(crate) struct Reset<'a> {
    /// Paths to delete from the client's store.
    pub(crate) client: &'a [String],
    /// Paths to delete from the builder's store.
    pub(crate) builder: &'a [String],
    /// Whether to empty the builder's signed output cache.
    pub(crate) cold_cache: bool,
}

impl Bench {
    /// The far end of variant `variant`'s builds.
    fn builder(&self, variant: usize) -> Remote<'_> {
        Remote::Builder(&self.variants[variant].server)
    }

    /// Times `command` once per run, after `reset`; on a link, with the
    /// line's CPU time.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn measure(
        &self,
        case: Case,
        method: String,
        variant: Option<usize>,
        bytes: u64,
        reset: Reset<'_>,
        remote: Remote<'_>,
        mut command: impl FnMut() -> Command,
    ) -> Measured {
        let mut samples = Vec::new();
        for run in 0..self.options.runs {
            self.world.delete(Side::Client, reset.client);
            self.world.delete(Side::Builder, reset.builder);
            if reset.cold_cache {
                for variant in &self.variants {
                    clear_cache(&variant.server);
                }
            }
            self.world.forget_narinfo_cache(Side::Client);
            self.world.forget_narinfo_cache(Side::Builder);
            sync();
            let what = format!("{} / {method} (run {})", case.name(), run + 1);
            let line = self.link.as_ref().map(|link| link.line());
            let line_before = line.map(|line| line.cpu_secs());
            let mut sample = timed(command(), &what, remote);
            sample.line_cpu = line
                .zip(line_before)
                .map(|(l, before)| l.cpu_secs() - before);
            progress(&format!("{what}: {:.2} s", sample.secs));
            samples.push(sample);
        }
        Measured {
            case,
            method,
            variant,
            bytes,
            samples,
        }
    }

    pub(crate) fn download(&self, case: Case) -> Vec<Measured> {
        let p = &self.paths;
        let closure = p.closure.as_ref();
        let (drv, top, paths, bytes): (&str, &str, Vec<String>, u64) = match (case, closure) {
            (Case::Download, _) => (
                &p.rand_drv,
                &p.rand,
                vec![p.rand.clone()],
                self.options.size,
            ),
            (Case::DownloadText, _) => (
                &p.text_drv,
                &p.text,
                vec![p.text.clone()],
                self.options.size,
            ),
            (Case::ClosureDown, Some(c)) => (&c.down_drv, &c.down, vec![c.down.clone()], c.bytes),
            _ => (
                &p.small_down_drv,
                &p.small_down,
                self.small_down_paths(),
                p.small_bytes,
            ),
        };
        let warm = Reset {
            client: &paths,
            builder: &[],
            cold_cache: false,
        };
        let cold = Reset {
            cold_cache: true,
            ..warm
        };
        let mut results = Vec::new();
        for (i, variant) in self.variants.iter().enumerate() {
            for (reset, which) in [(cold, "cold"), (warm, "warm")] {
                results.push(self.measure(
                    case,
                    format!("{} (builder cache {which})", variant.label),
                    Some(i),
                    bytes,
                    reset,
                    self.builder(i),
                    || self.drv_thru_build(variant, drv),
                ));
            }
        }
        results.extend(self.baselines(case, bytes, warm, |url| {
            self.nix_copy(Side::Client, "--from", url, &[top])
        }));
        results
    }

    /// The `nix copy` baselines: from `file://`, `http://` and `ssh-ng://`
    /// on loopback, only `ssh-ng://` over a link. `copy` makes the command
    /// for a URL.
    pub(crate) fn baselines(
        &self,
        case: Case,
        bytes: u64,
        reset: Reset<'_>,
        copy: impl Fn(&str) -> Command,
    ) -> Vec<Measured> {
        let cache = match case {
            Case::Upload | Case::SmallUp | Case::ClosureUp => "cache-up",
            _ => "cache-down",
        };
        let mut urls = Vec::new();
        if self.link.is_none() {
            urls.push((FILE, self.file_url(cache), Remote::None));
            if let Some((service, port)) = &self.http {
                let url = format!("http://127.0.0.1:{port}/{cache}");
                urls.push((HTTP, url, Remote::Server(service.child.id())));
            }
        }
        if let Ok(ssh) = &self.ssh {
            urls.push((
                SSH_NG,
                ssh.url.clone(),
                Remote::Server(ssh.service.child.id()),
            ));
        }
        urls.into_iter()
            .map(|(method, url, remote)| {
                self.measure(case, method.to_owned(), None, bytes, reset, remote, || {
                    copy(&url)
                })
            })
            .collect()
    }

    pub(crate) fn small_down_paths(&self) -> Vec<String> {
        self.paths.small_down_closure.clone()
    }

    pub(crate) fn upload(&self, case: Case) -> Vec<Measured> {
        let p = &self.paths;
        let (drv, out, srcs, bytes): (&str, &str, Vec<String>, u64) = match (case, &p.closure) {
            (Case::Upload, _) => (
                &p.upload_drv,
                &p.upload_out,
                vec![p.upload_src.clone()],
                self.options.size,
            ),
            (Case::ClosureUp, Some(c)) => (&c.up_drv, &c.up_out, vec![c.up_src.clone()], c.bytes),
            _ => (
                &p.small_up_drv,
                &p.small_up_out,
                p.small_srcs.clone(),
                p.small_bytes,
            ),
        };
        // What a drv-thru run leaves on the builder, so each run starts afresh.
        let mut builder_paths = vec![out.to_owned(), drv.to_owned()];
        builder_paths.extend(srcs.iter().cloned());
        let src_refs: Vec<&str> = srcs.iter().map(String::as_str).collect();
        let client_paths = [out.to_owned()];
        let reset = Reset {
            client: &client_paths,
            builder: &builder_paths,
            cold_cache: false,
        };
        let mut results: Vec<Measured> = self
            .variants
            .iter()
            .enumerate()
            .map(|(i, variant)| {
                self.measure(
                    case,
                    variant.label.clone(),
                    Some(i),
                    bytes,
                    reset,
                    self.builder(i),
                    || self.drv_thru_build(variant, drv),
                )
            })
            .collect();
        results.extend(self.baselines(case, bytes, reset, |url| {
            if url.starts_with("ssh-ng:") {
                self.nix_copy(Side::Client, "--to", url, &src_refs)
            } else {
                self.nix_copy(Side::Builder, "--from", url, &src_refs)
            }
        }));
        results
    }

    /// Builds each of `drvs` once with the command `build` makes for it:
    /// one series of `case`, so every run builds something new.
    fn series(
        &self,
        case: Case,
        method: String,
        drvs: &[String],
        variant: Option<usize>,
        remote: Remote<'_>,
        build: impl Fn(&str) -> Command,
    ) -> Measured {
        let samples = drvs
            .iter()
            .enumerate()
            .map(|(i, drv)| {
                sync();
                let what = format!("{} / {method} (run {})", case.name(), i + 1);
                let sample = timed(build(drv), &what, remote);
                progress(&format!("{what}: {:.3} s", sample.secs));
                sample
            })
            .collect();
        Measured {
            case,
            method,
            variant,
            bytes: 0,
            samples,
        }
    }

    pub(crate) fn trivial(&self) -> Vec<Measured> {
        let runs = self.options.runs;
        let mut results: Vec<Measured> = self
            .variants
            .iter()
            .zip(self.paths.remote.chunks(runs))
            .enumerate()
            .map(|(i, (variant, drvs))| {
                self.series(
                    Case::Trivial,
                    format!("{} build", variant.label),
                    drvs,
                    Some(i),
                    self.builder(i),
                    |drv| self.drv_thru_build(variant, drv),
                )
            })
            .collect();
        results.push(self.local_series(Case::Trivial, &self.paths.local));
        results
    }

    /// A trivial derivation offloaded by Nix's own build hook (`nix build
    /// -j0 --builders LINE`, the client's Nix), through drv-thru's machine
    /// line and through an ssh-ng one to the same builder store, beside a
    /// local build: what Nix's scheduler pays per offloaded derivation.
    pub(crate) fn offload(&self) -> Vec<Measured> {
        let runs = self.options.runs;
        let mut drvs = self.paths.offload.chunks(runs);
        let mut next = || drvs.next().expect("fresh derivations for every method");
        let variant = &self.variants[0];
        let machine_line = format!(
            "ssh-ng://localhost?remote-program={}&remote-store={} x86_64-linux - 1 1",
            variant.bin.display(),
            variant.name
        );
        let mut results = vec![self.series(
            Case::Offload,
            "nix build, drv-thru machine line".to_owned(),
            next(),
            Some(0),
            self.builder(0),
            |drv| self.offloaded_build(&machine_line, drv),
        )];
        match &self.ssh {
            Ok(ssh) => {
                let ssh_line = format!("{} x86_64-linux - 1 1", ssh.url);
                results.push(self.series(
                    Case::Offload,
                    "nix build, ssh-ng machine line".to_owned(),
                    next(),
                    None,
                    Remote::Server(ssh.service.child.id()),
                    |drv| {
                        let mut command = self.offloaded_build(&ssh_line, drv);
                        command.env("NIX_SSHOPTS", &ssh.opts);
                        command
                    },
                ));
            }
            Err(_) => {
                next();
            }
        }
        results.push(self.local_series(Case::Offload, next()));
        results
    }

    /// `nix build` of `drv` in the client's store, offloaded to `line`.
    fn offloaded_build(&self, line: &str, drv: &str) -> Command {
        let mut command = self.world.command(Side::Client, "nix");
        command.args(["build", "--no-link", "-j0", "--builders", line, drv]);
        command
    }

    /// `nix build` of each of `drvs` in the client's own store.
    fn local_series(&self, case: Case, drvs: &[String]) -> Measured {
        self.series(
            case,
            LOCAL_BUILD.to_owned(),
            drvs,
            None,
            Remote::None,
            |drv| {
                let mut command = self.world.command(Side::Client, "nix");
                command.args(["build", "--no-link", drv]);
                command
            },
        )
    }

    pub(crate) fn concurrent(&self) -> Vec<ConcurrentRun> {
        let clients = self.options.clients;
        let variant = &self.variants[0];
        let mut runs = Vec::new();
        for (run, drvs) in self.paths.conc.chunks(clients).enumerate() {
            let order = Arc::new(Mutex::new(QueueOrder::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let order = order.clone();
                let stop = stop.clone();
                let data_dir = variant.server.data_dir.clone();
                thread::spawn(move || watch_queue(&data_dir, &order, &stop))
            };
            // Let the watcher subscribe first.
            thread::sleep(Duration::from_millis(300));
            let start = Instant::now();
            let children: Vec<_> = drvs
                .iter()
                .map(|drv| {
                    let mut command = self.drv_thru_build(variant, drv);
                    command
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped());
                    (Instant::now(), command.spawn().expect("starting a client"))
                })
                .collect();
            let mut per_build = Vec::new();
            let mut finished = 0;
            let handles: Vec<_> = children
                .into_iter()
                .map(|(started, mut child)| {
                    thread::spawn(move || {
                        let mut err = String::new();
                        if let Some(mut stderr) = child.stderr.take() {
                            let _ = stderr.read_to_string(&mut err);
                        }
                        let status = child.wait().expect("waiting for a client");
                        (started.elapsed().as_secs_f64(), status.success(), err)
                    })
                })
                .collect();
            for handle in handles {
                let (secs, ok, err) = handle.join().expect("client thread");
                per_build.push(secs);
                if ok {
                    finished += 1;
                } else {
                    progress(&format!("a concurrent client failed:\n{err}"));
                }
            }
            let total = start.elapsed().as_secs_f64();
            // Give the builder a moment to record the last sessions' ends.
            let mut idle_after = false;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let status = builder_status(&self.world, &variant.server);
                let busy = status["active"].as_array().map_or(1, Vec::len)
                    + status["queued"].as_array().map_or(1, Vec::len);
                if busy == 0 {
                    idle_after = true;
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::Relaxed);
            let _ = watcher.join();
            let order = order.lock().unwrap();
            let result = ConcurrentRun {
                total,
                per_build,
                finished,
                fifo: order.is_fifo(),
                queued: order.queued.len(),
                idle_after,
            };
            progress(&format!(
                "concurrent (run {}): {:.2} s, {finished}/{clients} finished, {} queued, FIFO {}, idle after {}",
                run + 1,
                result.total,
                result.queued,
                result.fifo,
                result.idle_after
            ));
            runs.push(result);
        }
        runs
    }
}

pub(crate) fn sync() {
    unsafe { libc::sync() };
}

/// The order builds entered the queue and the order they started building,
/// from the builder's status stream.
#[derive(Debug, Default)]
pub(crate) struct QueueOrder {
    pub(crate) queued: Vec<String>,
    pub(crate) started: Vec<String>,
}

impl QueueOrder {
    pub(crate) fn observe(&mut self, status: &drv_thru::proto::BuilderStatus) {
        let mut queued: Vec<_> = status.queued.iter().collect();
        queued.sort_by_key(|q| q.position);
        for build in queued {
            if !self.queued.contains(&build.session_id) {
                self.queued.push(build.session_id.clone());
            }
        }
        for build in &status.active {
            let building = matches!(
                build.phase(),
                drv_thru::proto::BuildPhase::Building | drv_thru::proto::BuildPhase::ServingOutputs
            );
            if building && !self.started.contains(&build.session_id) {
                self.started.push(build.session_id.clone());
            }
        }
    }

    /// Whether the builds that waited started in the order they were queued.
    pub(crate) fn is_fifo(&self) -> bool {
        let started: Vec<&String> = self
            .started
            .iter()
            .filter(|id| self.queued.contains(id))
            .collect();
        let queued: Vec<&String> = self
            .queued
            .iter()
            .filter(|id| started.contains(id))
            .collect();
        started == queued
    }
}

pub(crate) fn watch_queue(data_dir: &Path, order: &Mutex<QueueOrder>, stop: &AtomicBool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let Ok(channel) = drv_thru::client::admin(data_dir).await else {
            progress("cannot watch the builder's status; FIFO not checked");
            return;
        };
        let mut client = drv_thru::proto::builder_client::BuilderClient::new(channel);
        let Ok(stream) = client
            .watch_status(drv_thru::proto::WatchStatusRequest::default())
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                Ok(Ok(Some(message))) => {
                    if let Some(status) = message.status {
                        order.lock().unwrap().observe(&status);
                    }
                }
                Ok(_) => return,
                Err(_) => {}
            }
        }
    });
}
