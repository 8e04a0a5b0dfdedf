//! The bench's Nix expression, and everything made before timing.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;

use crate::{
    MIB,
    builder::Builder,
    options::{Case, Options},
    services::{Service, Ssh, start_http, start_sshd},
    stores::{Side, World, drv_thru_bin, start_builder},
    two_stores,
    wan::{DelayLine, WAN_DELAY, WAN_TBF, Wan},
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
    /// What the client dials with `--wan`.
    pub(crate) line: Option<DelayLine>,
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
}

pub(crate) struct Bench {
    pub(crate) options: Options,
    pub(crate) world: World,
    pub(crate) variants: Vec<Variant>,
    pub(crate) paths: Paths,
    pub(crate) http: Option<(Service, u16)>,
    pub(crate) ssh: Result<Ssh, String>,
    pub(crate) notes: Vec<String>,
    /// After `variants`, so the builders leave the namespaces before they go.
    pub(crate) wan: Option<Wan>,
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
        let wan = if options.wan {
            let (wan_cases, skipped): (Vec<Case>, Vec<Case>) =
                options.cases.iter().partition(|case| {
                    matches!(
                        case,
                        Case::Download | Case::Upload | Case::SmallUp | Case::SmallDown
                    )
                });
            if !skipped.is_empty() {
                let names: Vec<&str> = skipped.iter().map(|case| case.name()).collect();
                notes.push(format!(
                    "--wan measures only download, upload, small-up and small-down; skipped {}",
                    names.join(", ")
                ));
            }
            options.cases = wan_cases;
            let wan = Wan::setup()?;
            let rtt = wan.probe()?;
            progress(&format!(
                "a round trip through the delay line takes {:.1} ms",
                rtt.as_secs_f64() * 1000.0
            ));
            notes.push(format!(
                "WAN: builder and client in network namespaces joined through this host by veth \
                 pairs, each direction shaped by `{}`, {} ms one-way delay added by a userspace \
                 UDP delay line (probe round trip {:.1} ms); no nix copy baselines, as the line \
                 carries only drv-thru's UDP",
                WAN_TBF.join(" "),
                WAN_DELAY.as_millis(),
                rtt.as_secs_f64() * 1000.0
            ));
            Some(wan)
        } else {
            None
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
        let world = World::new(dir.clone(), wan.is_some());
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
        let builder_attrs: Vec<String> = ["tools", "rand", "text", "smallDown"]
            .map(str::to_owned)
            .to_vec();
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
        };

        let (http, ssh) = if wan.is_some() {
            (None, Err("--wan".to_owned()))
        } else {
            progress("filling the file:// caches for the baselines");
            let mut down: Vec<&str> = vec![&paths.rand, &paths.text, &paths.small_down];
            down.sort();
            let down_url = format!("file://{}/cache-down?compression=none", dir.display());
            let mut args = vec!["copy", "--to", down_url.as_str()];
            args.extend(down);
            world.run_ok(Side::Builder, "nix", &args);
            let up_url = format!("file://{}/cache-up?compression=none", dir.display());
            let mut args = vec!["copy", "--to", up_url.as_str(), paths.upload_src.as_str()];
            args.extend(paths.small_srcs.iter().map(String::as_str));
            world.run_ok(Side::Client, "nix", &args);

            let http = match start_http(&dir) {
                Ok(http) => Some(http),
                Err(err) => {
                    notes.push(format!("http baseline skipped: {err}"));
                    None
                }
            };
            let ssh = start_sshd(&world);
            if let Err(err) = &ssh {
                notes.push(format!("ssh-ng baseline skipped: {err}"));
            }
            (http, ssh)
        };

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
            let (label, line) = if wan.is_some() {
                let line = DelayLine::start(server.addr)?;
                let label = format!("{label} over {} ms WAN", 2 * WAN_DELAY.as_millis());
                (label, Some(line))
            } else {
                (label, None)
            };
            let addr = line.as_ref().map_or(server.addr, |line| line.addr);
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
                line,
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
            notes,
            wan,
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

    pub(crate) fn http_url(&self, cache: &str) -> Option<String> {
        self.http
            .as_ref()
            .map(|(_, port)| format!("http://127.0.0.1:{port}/{cache}"))
    }

    pub(crate) fn file_url(&self, cache: &str) -> String {
        format!("file://{}/{cache}", self.world.dir.display())
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
