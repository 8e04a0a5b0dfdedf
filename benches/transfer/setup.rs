//! The bench's Nix expression, and everything made before timing.

use std::{
    collections::{HashMap, HashSet},
    io::{self, Read as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use serde_json::json;

use crate::{
    MIB,
    builder::Builder,
    link::{Link, QUEUE, TCP, UDP, Watched},
    options::{Case, Options},
    services::{Service, Ssh, start_http, start_sshd},
    stores::{Side, World, drv_thru_bin, start_builder},
    two_stores,
};

pub(crate) const EXPRESSION: &str = r#"
# Written by benches/transfer. Only a static busybox is needed.
let
  params = import ./params.nix;
  inherit (params) salt size smallCount freshCount;
  system = "x86_64-linux";
  bb = builtins.path { path = ./bb; name = "busybox-static"; };
  tools = derivation {
    name = "bench-tools";
    inherit system salt;
    builder = "${bb}/bin/busybox";
    args = [ "sh" "-euc" "${bb}/bin/busybox mkdir -p $out/bin; ${bb}/bin/busybox --install -s $out/bin" ];
  };
  mk = name: script: attrs: derivation ({
    inherit name system salt;
    builder = "${tools}/bin/sh";
    args = [ "-euc" script ];
    PATH = "${tools}/bin";
  } // attrs);
  range = n: builtins.genList (i: i) n;
  smallOutputs = map (i: "o${toString i}") (range smallCount);
  smallSrcs = map (i: builtins.path { path = ./data/small + "/s${toString i}"; name = "bench-small-src-${toString i}"; }) (range smallCount);
  upSrc = builtins.path { path = ./data/upload.bin; name = "bench-upload-src"; };
  # The same files twice: the builder has the first, and lacks the second.
  closureSrc = builtins.path { path = ./data/closure; name = "bench-closure-src"; };
  closureUpSrc = builtins.path { path = ./data/closure; name = "bench-closure-up-src"; };
  fresh = tag: builtins.listToAttrs (map (i: {
    name = "n${toString i}";
    value = mk "bench-${tag}-${toString i}" "${if tag == "conc" then "sleep 0.3; " else ""}echo ${tag} ${toString i} > $out" { };
  }) (range freshCount));
in rec {
  inherit tools;

  # Incompressible.
  rand = mk "bench-rand" "head -c ${toString size} /dev/urandom > $out" { };

  # Text: a hex dump of random bytes (zstd -1 makes it about 47 %).
  text = mk "bench-text" ''
    od -An -tx1 -v /dev/urandom | head -c 8388608 > chunk
    i=0
    while [ $i -le $(( ${toString size} / 8388608 )) ]; do cat chunk; i=$((i+1)); done | head -c ${toString size} > $out
  '' { };

  # A source the builder lacks; the build does not read it.
  upload = mk "bench-upload" ": ${upSrc}; echo uploaded > $out" { };

  # Real binaries and text: shared libraries and documentation of this machine.
  closureDown = mk "bench-closure-down" "cp -r ${closureSrc} $out" { };
  closureUp = mk "bench-closure-up" ": ${closureUpSrc}; echo uploaded > $out" { };

  # Many small sources the builder lacks.
  smallUp = mk "bench-small-up" "echo uploaded > $out" { srcs = smallSrcs; passAsFile = [ "srcs" ]; };

  # Many small outputs, 1-16 KiB of random data each, and one path referring to all.
  smallMulti = mk "bench-small-multi" ''
    i=0
    while [ $i -lt ${toString smallCount} ]; do
      eval "o=\$o$i"
      head -c $(( 1024 + (i * 7919 % 16) * 1024 )) /dev/urandom > "$o"
      i=$((i+1))
    done
  '' { outputs = smallOutputs; };
  smallDown = mk "bench-small-down" "cp $refsPath $out" {
    refs = map (o: smallMulti.${o}) smallOutputs;
    passAsFile = [ "refs" ];
  };

  remote = fresh "remote";
  local = fresh "local";
  conc = fresh "conc";
  offload = fresh "offload";
}
"#;

pub(crate) fn small_size(i: usize) -> usize {
    1024 + (i * 7919 % 16) * 1024
}

/// A drv-thru build to measure: this tree's, or another given with `--compare`.
pub(crate) struct Variant {
    /// How the table names it.
    pub(crate) label: String,
    /// Its `drv-thru` binary, for both the builder and the client.
    pub(crate) bin: PathBuf,
    /// Its builder, and its name in the client's builders.json.
    pub(crate) server: Builder,
    pub(crate) name: String,
    /// Its traffic on the `--link` line.
    pub(crate) watched: Option<Arc<Watched>>,
}

/// The `closure` cases' paths.
pub(crate) struct Closure {
    pub(crate) down_drv: String,
    pub(crate) down: String,
    pub(crate) up_drv: String,
    pub(crate) up_out: String,
    pub(crate) up_src: String,
    /// The files' bytes.
    pub(crate) bytes: u64,
}

pub(crate) struct Paths {
    pub(crate) rand_drv: String,
    pub(crate) rand: String,
    pub(crate) text_drv: String,
    pub(crate) text: String,
    pub(crate) upload_drv: String,
    pub(crate) upload_out: String,
    pub(crate) upload_src: String,
    pub(crate) small_up_drv: String,
    pub(crate) small_up_out: String,
    pub(crate) small_srcs: Vec<String>,
    pub(crate) small_down_drv: String,
    pub(crate) small_down_closure: Vec<String>,
    pub(crate) small_down: String,
    pub(crate) small_bytes: u64,
    pub(crate) remote: Vec<String>,
    pub(crate) local: Vec<String>,
    pub(crate) conc: Vec<String>,
    /// Fresh trivial derivations for the offload case, `runs` per method.
    pub(crate) offload: Vec<String>,
    pub(crate) closure: Option<Closure>,
}

pub(crate) struct Bench {
    pub(crate) options: Options,
    pub(crate) world: World,
    pub(crate) variants: Vec<Variant>,
    pub(crate) paths: Paths,
    pub(crate) http: Option<(Service, u16)>,
    pub(crate) ssh: Result<Ssh, String>,
    /// sshd's traffic on the `--link` line.
    pub(crate) ssh_watched: Option<Arc<Watched>>,
    pub(crate) notes: Vec<String>,
    /// After `variants` and `ssh`, so the servers leave the namespaces
    /// before they go.
    pub(crate) link: Option<Link>,
    pub(crate) _tmp: Option<tempfile::TempDir>,
}

pub(crate) fn write_random(path: &Path, len: usize) {
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut file = std::fs::File::create(path).expect("creating a data file");
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buffer.len());
        urandom
            .read_exact(&mut buffer[..n])
            .expect("reading /dev/urandom");
        file.write_all(&buffer[..n]).expect("writing a data file");
        left -= n;
    }
}

pub(crate) fn lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Bench {
    pub(crate) fn setup(mut options: Options) -> Result<Self, String> {
        let busybox =
            two_stores::busybox().ok_or("no static busybox (apt-get install busybox-static)")?;
        let mut notes = Vec::new();
        let link = match options.link {
            Some(profile) => {
                let (cases, skipped): (Vec<Case>, Vec<Case>) =
                    options.cases.iter().partition(|case| case.transfers());
                if !skipped.is_empty() {
                    let names: Vec<&str> = skipped.iter().map(|case| case.name()).collect();
                    notes.push(format!(
                        "--link measures only the transfer cases; skipped {}",
                        names.join(", ")
                    ));
                }
                options.cases = cases;
                let link = Link::setup(profile)?;
                progress(&format!("probing the link {}", profile.describe()));
                let probe = link.probe()?;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                let note = format!(
                    "link {}. The builder and the client are in network namespaces whose veth \
                     pairs this process bridges frame by frame, each way a queue of {} ms at the \
                     rate that drops when full, then the one-way delay. Probe before the cases: \
                     UDP round trip {:.1} ms, TCP connect {:.1} ms, one TCP stream {:.0} Mbit/s \
                     up and {:.0} Mbit/s down ({}), for which the line used {:.2} CPU s ({:.2} s \
                     per GiB)",
                    profile.describe(),
                    QUEUE.as_millis(),
                    ms(probe.udp_rtt),
                    ms(probe.tcp_connect),
                    probe.tcp_up / 1e6,
                    probe.tcp_down / 1e6,
                    probe.congestion,
                    probe.line_cpu,
                    probe.line_cpu / (probe.line_bytes.max(1) as f64 / (1u64 << 30) as f64)
                );
                progress(&note);
                notes.push(note);
                Some(link)
            }
            None => None,
        };
        let (tmp, dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                (None, dir.canonicalize().map_err(|e| e.to_string())?)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("drv-thru-bench-")
                    .tempdir_in("/tmp")
                    .map_err(|e| e.to_string())?;
                let dir = tmp.path().to_owned();
                (Some(tmp), dir)
            }
        };
        let tmp = match tmp {
            Some(tmp) if options.keep => {
                let _ = tmp.keep();
                None
            }
            other => other,
        };
        let world = World::new(dir.clone(), link.is_some());
        std::fs::create_dir_all(dir.join("bb/bin")).map_err(|e| e.to_string())?;
        std::fs::copy(busybox, dir.join("bb/bin/busybox")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("data/small")).map_err(|e| e.to_string())?;

        let salt = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let fresh = options.runs * options.clients.max(3) + 1;
        std::fs::write(
            dir.join("params.nix"),
            format!(
                "{{ salt = \"{salt}\"; size = {}; smallCount = {}; freshCount = {fresh}; }}\n",
                options.size, options.small_count
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("bench.nix"), EXPRESSION).map_err(|e| e.to_string())?;
        progress(&format!(
            "setup in {}: {} of random upload data, {} small files",
            dir.display(),
            human(options.size),
            options.small_count
        ));
        write_random(&dir.join("data/upload.bin"), options.size as usize);
        let mut small_bytes = 0u64;
        for i in 0..options.small_count {
            write_random(&dir.join(format!("data/small/s{i}")), small_size(i));
            small_bytes += small_size(i) as u64;
        }
        let closure_cases = [Case::ClosureDown, Case::ClosureUp];
        let with_closure = options.cases.iter().any(|c| closure_cases.contains(c));
        let closure_bytes = if with_closure {
            let payload = write_closure(&dir.join("data/closure"), options.size)
                .map_err(|e| format!("the closure payload: {e}"))?;
            let note = payload.describe();
            progress(&note);
            notes.push(note);
            payload.bytes()
        } else {
            0
        };

        // The client instantiates everything; the builder only what it builds.
        let fresh_attrs = |tag: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("{tag}.n{i}")).collect()
        };
        let runs = options.runs;
        let mut client_attrs: Vec<String> =
            ["tools", "rand", "text", "upload", "smallUp", "smallDown"]
                .map(str::to_owned)
                .to_vec();
        client_attrs.extend(fresh_attrs("remote", runs * 2));
        client_attrs.extend(fresh_attrs("local", runs));
        client_attrs.extend(fresh_attrs("conc", runs * options.clients));
        client_attrs.extend(fresh_attrs("offload", runs * 3));
        if with_closure {
            client_attrs.extend(["closureDown", "closureUp"].map(str::to_owned));
        }
        progress("instantiating in the client store");
        let drvs = instantiate(&world, Side::Client, &client_attrs);
        let drv = |attr: &str| drvs[attr].clone();
        if options.cases.contains(&Case::Offload) {
            progress(
                "building the tools in the client store, so only the offloaded build runs remotely",
            );
            world.run_ok(Side::Client, "nix-store", &["--realise", &drv("tools")]);
        }
        progress("building download data in the builder store");
        let mut builder_attrs: Vec<String> = ["tools", "rand", "text", "smallDown"]
            .map(str::to_owned)
            .to_vec();
        if with_closure {
            builder_attrs.push("closureDown".to_owned());
        }
        let builder_drvs = instantiate(&world, Side::Builder, &builder_attrs);
        for attr in &builder_attrs {
            assert_eq!(
                builder_drvs[attr], drvs[attr],
                "both stores instantiate the same {attr}"
            );
        }
        let outputs = |side: Side, drv: &str| -> Vec<String> {
            lines(&world.run_ok(side, "nix-store", &["--realise", drv]))
        };
        let rand = outputs(Side::Builder, &drv("rand")).remove(0);
        let text = outputs(Side::Builder, &drv("text")).remove(0);
        let small_down = outputs(Side::Builder, &drv("smallDown")).remove(0);
        let small_down_closure = lines(&world.run_ok(
            Side::Builder,
            "nix-store",
            &["--query", "--requisites", &small_down],
        ));
        let query_out = |drv: &str| -> String {
            lines(&world.run_ok(Side::Client, "nix-store", &["--query", "--outputs", drv]))
                .remove(0)
        };
        let upload_drv = drv("upload");
        let small_up_drv = drv("smallUp");
        let refs = |drv: &str| -> Vec<String> {
            lines(&world.run_ok(Side::Client, "nix-store", &["--query", "--references", drv]))
        };
        let upload_src = refs(&upload_drv)
            .into_iter()
            .find(|p| p.ends_with("-bench-upload-src"))
            .expect("the upload derivation refers to its source");
        let small_srcs: Vec<String> = refs(&small_up_drv)
            .into_iter()
            .filter(|p| p.contains("-bench-small-src-"))
            .collect();
        assert_eq!(small_srcs.len(), options.small_count);
        let closure = with_closure.then(|| {
            let up_drv = drv("closureUp");
            Closure {
                down: outputs(Side::Builder, &drv("closureDown")).remove(0),
                down_drv: drv("closureDown"),
                up_out: query_out(&up_drv),
                up_src: refs(&up_drv)
                    .into_iter()
                    .find(|p| p.ends_with("-bench-closure-up-src"))
                    .expect("the closure upload refers to its source"),
                up_drv,
                bytes: closure_bytes,
            }
        });

        let paths = Paths {
            rand_drv: drv("rand"),
            rand,
            text_drv: drv("text"),
            text,
            upload_out: query_out(&upload_drv),
            upload_drv,
            upload_src,
            small_up_out: query_out(&small_up_drv),
            small_up_drv,
            small_srcs,
            small_down_drv: drv("smallDown"),
            small_down_closure,
            small_down,
            small_bytes,
            remote: fresh_attrs("remote", runs * 2)
                .iter()
                .map(|a| drv(a))
                .collect(),
            local: fresh_attrs("local", runs).iter().map(|a| drv(a)).collect(),
            conc: fresh_attrs("conc", runs * options.clients)
                .iter()
                .map(|a| drv(a))
                .collect(),
            offload: fresh_attrs("offload", runs * 3)
                .iter()
                .map(|a| drv(a))
                .collect(),
            closure,
        };

        let (http, ssh) = if link.is_some() {
            (None, start_sshd(&world))
        } else {
            progress("filling the file:// caches for the baselines");
            let mut down: Vec<&str> = vec![&paths.rand, &paths.text, &paths.small_down];
            let mut up = vec![paths.upload_src.as_str()];
            up.extend(paths.small_srcs.iter().map(String::as_str));
            if let Some(closure) = &paths.closure {
                down.push(&closure.down);
                up.push(&closure.up_src);
            }
            down.sort();
            let down_url = format!("file://{}/cache-down?compression=none", dir.display());
            let mut args = vec!["copy", "--to", down_url.as_str()];
            args.extend(down);
            world.run_ok(Side::Builder, "nix", &args);
            let up_url = format!("file://{}/cache-up?compression=none", dir.display());
            let mut args = vec!["copy", "--to", up_url.as_str()];
            args.extend(up);
            world.run_ok(Side::Client, "nix", &args);

            let http = match start_http(&dir) {
                Ok(http) => Some(http),
                Err(err) => {
                    notes.push(format!("http baseline skipped: {err}"));
                    None
                }
            };
            (http, start_sshd(&world))
        };
        if let Err(err) = &ssh {
            notes.push(format!("ssh-ng baseline skipped: {err}"));
        }
        let ssh_watched = link
            .as_ref()
            .zip(ssh.as_ref().ok())
            .map(|(link, ssh)| link.line().watch(crate::cases::SSH_NG, TCP, ssh.port));

        // The client is a trusted client of the builder and knows its key.
        let key = world.home(Side::Client).join(".config/drv-thru/secret.key");
        let client_id = drv_thru::keys::load_or_create_endpoint_key(&key)
            .map_err(|e| format!("client key: {e}"))?
            .public()
            .to_string();
        let mut builds = vec![("drv-thru".to_owned(), drv_thru_bin().to_owned())];
        if let Some(other) = &options.compare {
            let other = other
                .canonicalize()
                .map_err(|e| format!("--compare: {e}"))?;
            builds.push((format!("drv-thru ({})", options.compare_label), other));
        }
        let mut variants = Vec::new();
        let mut builders = serde_json::Map::new();
        for (i, (label, bin)) in builds.into_iter().enumerate() {
            let name = format!("bench{i}");
            let server = start_builder(&world, &bin, &name, &client_id);
            let public_key = std::fs::read_to_string(server.data_dir.join("signing-public.key"))
                .map_err(|e| format!("builder signing key: {e}"))?;
            let watched = link
                .as_ref()
                .map(|link| link.line().watch(&label, UDP, server.addr.port()));
            let addr = server.addr;
            builders.insert(
                name.clone(),
                json!({
                    "endpoint_id": server.endpoint_id,
                    "relay_url": null,
                    "addrs": [addr.to_string()],
                    "public_key": public_key.trim(),
                }),
            );
            variants.push(Variant {
                label,
                bin,
                server,
                name,
                watched,
            });
        }
        let builders = json!({ "builders": builders }).to_string();
        std::fs::write(
            world
                .home(Side::Client)
                .join(".config/drv-thru/builders.json"),
            &builders,
        )
        .map_err(|e| e.to_string())?;
        // Nix's build hook runs `drv-thru --stdio` as root with no home: it
        // reads the system builders file and dials with the machine key, here
        // the client's own key, which the builders trust.
        let system = world.client_etc().join("drv-thru");
        std::fs::create_dir_all(&system).map_err(|e| e.to_string())?;
        std::fs::write(system.join("builders.json"), &builders).map_err(|e| e.to_string())?;
        std::fs::copy(&key, system.join("machine.key")).map_err(|e| format!("machine key: {e}"))?;

        Ok(Self {
            options,
            world,
            variants,
            paths,
            http,
            ssh,
            ssh_watched,
            notes,
            link,
            _tmp: tmp,
        })
    }

    pub(crate) fn drv_thru_build(&self, variant: &Variant, drv: &str) -> Command {
        let mut command = self.world.command(Side::Client, &variant.bin);
        command.args([
            "build",
            drv,
            "--builder",
            &variant.name,
            "--no-nom",
            "--no-link",
        ]);
        command
    }

    pub(crate) fn nix_copy(
        &self,
        side: Side,
        direction: &str,
        url: &str,
        paths: &[&str],
    ) -> Command {
        let mut command = self.world.command(side, "nix");
        command.args(["copy", "--no-check-sigs", direction, url]);
        command.args(paths);
        if let Ok(ssh) = &self.ssh {
            command.env("NIX_SSHOPTS", &ssh.opts);
        }
        command
    }

    pub(crate) fn file_url(&self, cache: &str) -> String {
        format!("file://{}/{cache}", self.world.dir.display())
    }
}

/// The closure cases' files, as [`write_closure`] chose them.
pub(crate) struct Payload {
    pub(crate) files: usize,
    pub(crate) lib_bytes: u64,
    pub(crate) doc_bytes: u64,
    /// zstd -1's output over all the files' bytes.
    pub(crate) zstd_bytes: u64,
}

impl Payload {
    pub(crate) fn bytes(&self) -> u64 {
        self.lib_bytes + self.doc_bytes
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "closure: {} files, {} from {LIBS} and {} of text from {DOCS} (no .gz); zstd -1 \
             makes them {:.0} % of {}",
            self.files,
            human(self.lib_bytes),
            human(self.doc_bytes),
            100.0 * self.zstd_bytes as f64 / self.bytes().max(1) as f64,
            human(self.bytes())
        )
    }
}

/// Where the closure cases' binaries and text come from.
const LIBS: &str = "/usr/lib/x86_64-linux-gnu";
const DOCS: &str = "/usr/share/doc";

/// Copies about `size` bytes of this machine's shared libraries (three
/// quarters) and documentation into `dest`: real binaries and text, as a
/// closure holds. Files are taken in path order, each once however many
/// links it has, none over an eighth of `size`, so many files make it up.
pub(crate) fn write_closure(dest: &Path, size: u64) -> io::Result<Payload> {
    let mut seen = HashSet::new();
    let mut payload = Payload {
        files: 0,
        lib_bytes: 0,
        doc_bytes: 0,
        zstd_bytes: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::new(Counter(0), 1)?;
    for (source, name, budget) in [(LIBS, "lib", size / 4 * 3), (DOCS, "doc", size)] {
        let mut files = Vec::new();
        walk(Path::new(source), &mut files)?;
        files.sort();
        for file in files {
            let used = payload.bytes();
            let Ok(meta) = std::fs::metadata(&file) else {
                continue;
            };
            let skip = meta.len() > size / 8
                || used + meta.len() > budget
                || (name == "doc" && file.extension().is_some_and(|e| e == "gz"))
                || !seen.insert((meta.dev(), meta.ino()));
            if skip {
                continue;
            }
            let relative = file.strip_prefix(source).expect("walked from the source");
            let to = dest.join(name).join(relative);
            std::fs::create_dir_all(to.parent().expect("a file is in a directory"))?;
            std::fs::copy(&file, &to)?;
            io::copy(&mut std::fs::File::open(&to)?, &mut encoder)?;
            payload.files += 1;
            if name == "lib" {
                payload.lib_bytes += meta.len();
            } else {
                payload.doc_bytes += meta.len();
            }
        }
    }
    payload.zstd_bytes = encoder.finish()?.0;
    if payload.files == 0 {
        return Err(io::Error::other(format!("no files in {LIBS} or {DOCS}")));
    }
    Ok(payload)
}

/// The regular files under `dir`, not following links.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), files)?;
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    Ok(())
}

/// A writer that only counts.
struct Counter(u64);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn instantiate(world: &World, side: Side, attrs: &[String]) -> HashMap<String, String> {
    let mut found = HashMap::new();
    // Bounded batches keep the command line short.
    for batch in attrs.chunks(200) {
        let mut args: Vec<&str> = vec!["bench.nix"];
        for attr in batch {
            args.extend(["-A", attr]);
        }
        let out = lines(&world.run_ok(side, "nix-instantiate", &args));
        assert_eq!(out.len(), batch.len(), "one .drv per attribute: {out:?}");
        found.extend(batch.iter().cloned().zip(out));
    }
    found
}

pub(crate) fn progress(message: &str) {
    eprintln!("bench: {message}");
}

pub(crate) fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{:.0} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}
