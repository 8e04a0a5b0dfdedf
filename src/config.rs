//! Configuration files: the server's JSON config (written by the NixOS
//! module) and the client's `builders.json`.

use std::{
    collections::BTreeMap,
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use iroh::EndpointId;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    keys::{self, KeyError},
    nix::{
        machines::{self, Scheduling},
        signing,
    },
    ticket::Ticket,
    transport::endpoint::RelayChoice,
    units::{ByteSize, HumanDuration},
};

/// The default server data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/drv-thru";

/// The system-wide builders file the NixOS module writes.
pub const SYSTEM_BUILDERS_FILE: &str = "/etc/drv-thru/builders.json";

/// The client machine's Iroh key, used by the stdio program Nix's daemon starts (root only, mode 0600).
pub const MACHINE_KEY_FILE: &str = "/etc/drv-thru/machine.key";

/// Errors loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    ///
    /// The message carries serde's explanation, so it is not also a source:
    /// the one-line report would print it twice.
    #[error("{path} is invalid: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's explanation, with line and column.
        error: serde_json::Error,
    },
    /// A value that parsed but makes no sense.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A builder's `ticket_file` that cannot be read or holds no ticket.
    #[error("{path}: builder {name:?}: unusable ticket_file")]
    TicketFile {
        /// The builders file.
        path: PathBuf,
        /// The builder's name.
        name: String,
        /// Why the ticket could not be loaded.
        #[source]
        source: KeyError,
    },
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        error,
    })
}

/// Limits that apply to one admitted build session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock limit of one build.
    #[serde(default = "Limits::default_build_time")]
    pub max_build_time: HumanDuration,
    /// NAR bytes one session may upload.
    #[serde(default = "Limits::default_upload_bytes")]
    pub max_upload_bytes: ByteSize,
}

impl Limits {
    fn default_build_time() -> HumanDuration {
        HumanDuration::from_secs(30 * 60)
    }

    fn default_upload_bytes() -> ByteSize {
        ByteSize::new(20 << 30)
    }
}

impl Default for Limits {
    /// 30 minutes of build time and 20 GiB of upload, as documented.
    fn default() -> Self {
        Self {
            max_build_time: Self::default_build_time(),
            max_upload_bytes: Self::default_upload_bytes(),
        }
    }
}

/// A client allowed to build without a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedClient {
    /// The client's Iroh endpoint id (`drv-thru key show`).
    #[serde(deserialize_with = "endpoint_id")]
    pub public_key: EndpointId,
    /// Its per-session limits.
    #[serde(flatten)]
    pub limits: Limits,
}

/// An endpoint id, refused with what one looks like: iroh's own error says
/// only "invalid length" or the like.
fn endpoint_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EndpointId, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid endpoint id {text:?}: expected 64 hexadecimal characters, as `drv-thru key show` prints them"
        ))
    })
}

/// `drv-thru serve --config FILE`: everything the server needs, in one JSON
/// file. Unknown fields are errors so a typo never silently disables a
/// setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// State directory: keys, tickets, the admin socket and the cache.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The Iroh secret key; defaults to `DATA_DIR/secret.key`.
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// UDP socket to listen on; port 0 picks any free port.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// `"default"`, `"disabled"` or a relay URL.
    #[serde(default)]
    pub relay: RelayChoice,
    /// Members of this group may use the admin socket (tickets, status).
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Builds that may run at once.
    #[serde(default = "default_max_concurrent_builds")]
    pub max_concurrent_builds: u32,
    /// Cache entries compressed in parallel; `null` picks from the CPU
    /// count.
    #[serde(default)]
    pub output_cache_max_parallel_fills: Option<u32>,
    /// Size limit of the signed output cache; least recently used entries
    /// are pruned past it. `null` means no limit, which is never the
    /// default: what ticket holders build lands there.
    #[serde(default = "default_cache_max_size")]
    pub cache_max_size: Option<ByteSize>,
    /// Finished builds kept for `status`.
    #[serde(default = "default_recent_builds_limit")]
    pub recent_builds_limit: u32,
    /// Iroh connections served at once once authenticated (by a first
    /// authorized call, or as a trusted client); more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Iroh connections that have not authenticated yet, served at once
    /// besides `max_connections`, so strangers cannot take clients' slots.
    #[serde(default = "default_max_unauthenticated_connections")]
    pub max_unauthenticated_connections: u32,
    /// Iroh connections one endpoint id may hold at once.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: u32,
    /// How long a new Iroh connection has to make its first authorized
    /// call (trusted clients need none); it is closed after that.
    #[serde(default = "default_authentication_timeout")]
    pub authentication_timeout: HumanDuration,
    /// Sessions one client endpoint id may hold open (or being admitted)
    /// at once.
    #[serde(default = "default_max_sessions_per_client")]
    pub max_sessions_per_client: u32,
    /// Sessions one ticket may have open at once: client keys are free to
    /// make, so the per-client cap alone does not bound a ticket.
    #[serde(default = "default_max_sessions_per_ticket")]
    pub max_sessions_per_ticket: u32,
    /// Sessions the builder holds open at once, all clients together.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// How long an admitted session may sit idle (not building, and not
    /// uploading or reading outputs) before it is ended.
    #[serde(default = "default_session_idle_timeout")]
    pub session_idle_timeout: HumanDuration,
    /// Clients that may build without a ticket, by name.
    #[serde(default)]
    pub trusted_clients: BTreeMap<String, TrustedClient>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

fn default_max_concurrent_builds() -> u32 {
    1
}

fn default_recent_builds_limit() -> u32 {
    20
}

fn default_max_connections() -> u32 {
    256
}

fn default_session_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(5 * 60)
}

fn default_cache_max_size() -> Option<ByteSize> {
    Some(ByteSize::new(20 << 30))
}

fn default_max_unauthenticated_connections() -> u32 {
    32
}

fn default_max_connections_per_client() -> u32 {
    8
}

fn default_max_sessions_per_client() -> u32 {
    8
}

fn default_max_sessions_per_ticket() -> u32 {
    8
}

fn default_max_sessions() -> u32 {
    64
}

fn default_authentication_timeout() -> HumanDuration {
    HumanDuration::from_secs(20)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            secret_key_file: None,
            listen: None,
            relay: RelayChoice::default(),
            admin_group: None,
            max_concurrent_builds: default_max_concurrent_builds(),
            output_cache_max_parallel_fills: None,
            cache_max_size: default_cache_max_size(),
            recent_builds_limit: default_recent_builds_limit(),
            max_connections: default_max_connections(),
            max_unauthenticated_connections: default_max_unauthenticated_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            authentication_timeout: default_authentication_timeout(),
            max_sessions_per_client: default_max_sessions_per_client(),
            max_sessions_per_ticket: default_max_sessions_per_ticket(),
            max_sessions: default_max_sessions(),
            session_idle_timeout: default_session_idle_timeout(),
            trusted_clients: BTreeMap::new(),
        }
    }
}

impl ServerConfig {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = read_json(path)?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Checks values serde cannot: every problem is found at startup, not
    /// when a client first connects.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_builds == 0 {
            return Err("max_concurrent_builds must be at least 1".to_owned());
        }
        if self.recent_builds_limit == 0 {
            return Err("recent_builds_limit must be at least 1".to_owned());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".to_owned());
        }
        if self.max_unauthenticated_connections == 0 {
            return Err("max_unauthenticated_connections must be at least 1".to_owned());
        }
        if self.max_connections_per_client == 0 {
            return Err("max_connections_per_client must be at least 1".to_owned());
        }
        for (name, value) in [
            ("max_sessions_per_client", self.max_sessions_per_client),
            ("max_sessions_per_ticket", self.max_sessions_per_ticket),
            ("max_sessions", self.max_sessions),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.authentication_timeout.get().is_zero() {
            return Err("authentication_timeout must be longer than zero".to_owned());
        }
        if self.session_idle_timeout.get().is_zero() {
            return Err("session_idle_timeout must be longer than zero".to_owned());
        }
        if self.output_cache_max_parallel_fills == Some(0) {
            return Err("output_cache_max_parallel_fills must be at least 1 or null".to_owned());
        }
        let mut seen = BTreeMap::new();
        for (name, client) in &self.trusted_clients {
            if let Some(other) = seen.insert(client.public_key, name) {
                return Err(format!(
                    "trusted clients {other:?} and {name:?} have the same public_key"
                ));
            }
        }
        Ok(())
    }

    /// The Iroh secret key file.
    pub fn secret_key_path(&self) -> PathBuf {
        self.secret_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secret.key"))
    }
}

/// The admin socket of a server using `data_dir`.
pub fn admin_socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// The per-user config directory: `$XDG_CONFIG_HOME/drv-thru` or
/// `~/.config/drv-thru`.
pub fn user_config_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("drv-thru"))
}

/// One named builder in `builders.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderEntry {
    /// The builder's endpoint id.
    #[serde(default)]
    pub endpoint_id: Option<EndpointId>,
    /// A file holding the endpoint id (for secret-managed deployments).
    #[serde(default)]
    pub endpoint_id_file: Option<PathBuf>,
    /// A relay URL to reach it through.
    #[serde(default)]
    pub relay_url: Option<String>,
    /// Direct addresses (`IP:PORT`) to dial.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// The builder's Nix signing key (`NAME:BASE64`), trusted for this
    /// builder's outputs.
    #[serde(default)]
    pub public_key: Option<signing::PublicKey>,
    /// A file holding a ticket (`drvthru…`) to present instead of using
    /// trusted-client access; the endpoint id, addresses and signing key
    /// come from it unless set above. Every build takes one of its uses,
    /// so it must be unlimited or have enough of them: a client cannot see
    /// how many are left.
    #[serde(default)]
    pub ticket_file: Option<PathBuf>,
    /// Systems Nix may build there; `None` means this machine's.
    #[serde(default)]
    pub systems: Option<Vec<String>>,
    /// Builds Nix runs there at once.
    #[serde(default = "one")]
    pub max_jobs: u32,
    /// Nix prefers builders with a higher speed factor.
    #[serde(default = "one")]
    pub speed_factor: u32,
    /// Features a derivation may require and still be built there.
    #[serde(default)]
    pub supported_features: Vec<String>,
    /// Features a derivation must require to be built there.
    #[serde(default)]
    pub mandatory_features: Vec<String>,
}

fn one() -> u32 {
    1
}

/// A builder entry with its endpoint id resolved.
#[derive(Debug, Clone)]
pub struct NamedBuilder {
    /// The name it was configured under.
    pub name: String,
    /// The builder's endpoint id.
    pub endpoint_id: EndpointId,
    /// A relay URL to reach it through.
    pub relay_url: Option<String>,
    /// Direct addresses to dial.
    pub addrs: Vec<SocketAddr>,
    /// The configured signing key, or the ticket's.
    pub public_key: Option<signing::PublicKey>,
    /// The ticket presented with every call, from `ticket_file`; without
    /// one the builder must list this client as trusted.
    pub ticket: Option<Ticket>,
    /// What Nix's scheduler may send there.
    pub scheduling: Scheduling,
    /// The file the entry came from.
    pub source: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildersFile {
    builders: BTreeMap<String, BuilderEntry>,
}

/// The builders files consulted, in order: the system file, then the user's,
/// whose entries replace same-named system entries.
pub fn builders_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from(SYSTEM_BUILDERS_FILE)];
    if let Some(dir) = user_config_dir() {
        files.push(dir.join("builders.json"));
    }
    files
}

/// Whether `name` can name a builder: it goes verbatim into a machine
/// line's URI (`remote-store=NAME`), so it needs no escaping there.
fn is_builder_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Builder entries by name, each with the file it came from.
type Entries<'a> = BTreeMap<String, (BuilderEntry, &'a PathBuf)>;

/// The entries of `files`, a later file's replacing a same-named earlier
/// one; `None` when no file exists.
fn read_entries(files: &[PathBuf]) -> Result<Option<Entries<'_>>, ConfigError> {
    let mut entries = BTreeMap::new();
    let mut read_any = false;
    for path in files {
        let file: BuildersFile = match read_json(path) {
            Ok(file) => file,
            Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(err) => return Err(err),
        };
        read_any = true;
        for (name, entry) in file.builders {
            if !is_builder_name(&name) {
                return Err(ConfigError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "builder name {name:?} may hold only letters, digits and . _ - (it goes into Nix's machine lines); rename it"
                    ),
                });
            }
            entries.insert(name, (entry, path));
        }
    }
    Ok(read_any.then_some(entries))
}

fn listing(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks up the builder `name` in `files` (later files win).
pub fn find_builder(files: &[PathBuf], name: &str) -> Result<NamedBuilder, ConfigError> {
    let not_found = |message: String| ConfigError::Invalid {
        path: files.last().cloned().unwrap_or_default(),
        message,
    };
    let Some(mut entries) = read_entries(files)? else {
        return Err(not_found(format!(
            "no builders file exists (looked at {}); add the builder there",
            listing(files)
        )));
    };
    let Some((entry, path)) = entries.remove(name) else {
        return Err(not_found(if entries.is_empty() {
            format!(
                "no builder named {name:?}: the builders files ({}) define none",
                listing(files)
            )
        } else {
            format!(
                "no builder named {name:?}; configured builders: {}",
                entries.into_keys().collect::<Vec<_>>().join(", ")
            )
        }));
    };
    resolve(name, entry, path)
}

/// Every builder of the builders file `file`, resolved, in name order.
pub fn all_builders(file: &Path) -> Result<Vec<NamedBuilder>, ConfigError> {
    let files = [file.to_owned()];
    let invalid = |message: &str| ConfigError::Invalid {
        path: file.to_owned(),
        message: message.to_owned(),
    };
    let entries = read_entries(&files)?
        .ok_or_else(|| invalid("the file does not exist; add the builders there"))?;
    if entries.is_empty() {
        return Err(invalid("the file defines no builders"));
    }
    entries
        .into_iter()
        .map(|(name, (entry, path))| resolve(&name, entry, path))
        .collect()
}

/// Checks an entry and fills in what it leaves to its ticket or to the
/// defaults.
fn resolve(name: &str, entry: BuilderEntry, path: &Path) -> Result<NamedBuilder, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        message: format!("builder {name:?}: {message}"),
    };
    let ticket = entry
        .ticket_file
        .as_deref()
        .map(keys::load_ticket)
        .transpose()
        .map_err(|source| ConfigError::TicketFile {
            path: path.to_owned(),
            name: name.to_owned(),
            source,
        })?;
    let endpoint_id = match (&entry.endpoint_id, &entry.endpoint_id_file, &ticket) {
        (Some(_), Some(_), _) => {
            return Err(invalid(
                "sets both endpoint_id and endpoint_id_file; keep exactly one".to_owned(),
            ));
        }
        (Some(id), None, _) => *id,
        (None, Some(file), _) => {
            let text = fs::read_to_string(file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            text.trim().parse().map_err(|_| {
                invalid(format!(
                    "{} does not hold an endpoint id (64 hex characters)",
                    file.display()
                ))
            })?
        }
        (None, None, Some(ticket)) => ticket.builder_id(),
        (None, None, None) => {
            return Err(invalid(
                "set exactly one of endpoint_id and endpoint_id_file, or a ticket_file".to_owned(),
            ));
        }
    };
    let from_ticket = ticket.as_ref().map(Ticket::builder);
    let relay_url = entry.relay_url.or_else(|| {
        from_ticket
            .and_then(|addr| addr.relay_urls().next())
            .map(ToString::to_string)
    });
    let addrs = if entry.addrs.is_empty() {
        from_ticket
            .map(|addr| addr.ip_addrs().copied().collect())
            .unwrap_or_default()
    } else {
        entry.addrs
    };
    let public_key = entry
        .public_key
        .or_else(|| ticket.as_ref().map(|ticket| ticket.signing_key().clone()));
    let scheduling = Scheduling {
        systems: entry
            .systems
            .unwrap_or_else(|| vec![machines::local_system()]),
        max_jobs: entry.max_jobs,
        speed_factor: entry.speed_factor,
        supported_features: entry.supported_features,
        mandatory_features: entry.mandatory_features,
    };
    scheduling.validate().map_err(invalid)?;
    Ok(NamedBuilder {
        name: name.to_owned(),
        endpoint_id,
        relay_url,
        addrs,
        public_key,
        ticket,
        scheduling,
        source: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
    const ID_B: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn server_config_defaults_match_the_docs() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "c.json", "{}");
        let config = ServerConfig::load(&path).unwrap();
        assert_eq!(config.data_dir, Path::new("/var/lib/drv-thru"));
        assert_eq!(config.max_concurrent_builds, 1);
        assert_eq!(config.recent_builds_limit, 20);
        assert_eq!(
            config.secret_key_path(),
            Path::new("/var/lib/drv-thru/secret.key")
        );
        assert_eq!(config.relay, RelayChoice::Default);
        assert_eq!(config.cache_max_size, Some(ByteSize::new(20 << 30)));
        assert_eq!(config.max_connections, 256);
        assert_eq!(config.max_unauthenticated_connections, 32);
        assert_eq!(config.max_connections_per_client, 8);
        assert_eq!(config.max_sessions_per_client, 8);
        assert_eq!(config.max_sessions_per_ticket, 8);
        assert_eq!(config.max_sessions, 64);
        assert_eq!(config.authentication_timeout.get().as_secs(), 20);
        assert_eq!(config.session_idle_timeout.get().as_secs(), 300);
        let unbounded = write(dir.path(), "u.json", r#"{"cache_max_size": null}"#);
        assert_eq!(ServerConfig::load(&unbounded).unwrap().cache_max_size, None);
    }

    #[test]
    fn server_config_reads_trusted_clients_with_limits() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"{{"data_dir": "/srv/d", "relay": "disabled", "listen": "127.0.0.1:0",
                "trusted_clients": {{"alex": {{"public_key": "{ID_A}", "max_build_time": "1h",
                "max_upload_bytes": "1G"}}, "sam": {{"public_key": "{ID_B}"}}}}}}"#
        );
        let config = ServerConfig::load(&write(dir.path(), "c.json", &text)).unwrap();
        let alex = &config.trusted_clients["alex"];
        assert_eq!(alex.limits.max_build_time.get().as_secs(), 3600);
        assert_eq!(alex.limits.max_upload_bytes.get(), 1 << 30);
        assert_eq!(config.trusted_clients["sam"].limits, Limits::default());
        assert_eq!(config.relay, RelayChoice::Disabled);
    }

    #[test]
    fn server_config_rejects_typos_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            (r#"{"max_concurent_builds": 2}"#.to_owned(), "unknown field"),
            (r#"{"max_concurrent_builds": 0}"#.to_owned(), "at least 1"),
            (
                r#"{"max_sessions_per_ticket": 0}"#.to_owned(),
                "max_sessions_per_ticket must be at least 1",
            ),
            (
                format!(
                    r#"{{"trusted_clients": {{"a": {{"public_key": "{ID_A}", "max_build_time": "forever"}}}}}}"#
                ),
                "invalid duration",
            ),
            (
                format!(
                    r#"{{"trusted_clients": {{"a": {{"public_key": "{ID_A}", "max_build_time": "5 parsecs"}}}}}}"#
                ),
                r#"invalid duration "5 parsecs""#,
            ),
            (
                format!(
                    r#"{{"trusted_clients": {{"a": {{"public_key": "{ID_A}", "max_upload_bytes": "20 lightyears"}}}}}}"#
                ),
                r#"invalid size "20 lightyears""#,
            ),
            (
                r#"{"cache_max_size": "50 gigs"}"#.to_owned(),
                "invalid size",
            ),
            (r#"{"relay": "sometimes"}"#.to_owned(), "invalid relay"),
            (r#"{"listen": "7000"}"#.to_owned(), "invalid socket address"),
            (
                r#"{"trusted_clients": {"a": {"public_key": "nope"}}}"#.to_owned(),
                r#"invalid endpoint id "nope": expected 64 hexadecimal characters"#,
            ),
            (
                format!(
                    r#"{{"trusted_clients": {{"a": {{"public_key": "{ID_A}"}}, "b": {{"public_key": "{ID_A}"}}}}}}"#
                ),
                "same public_key",
            ),
        ] {
            let err = ServerConfig::load(&write(dir.path(), "c.json", &text))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn user_builders_file_overrides_system_entry() {
        let dir = tempfile::tempdir().unwrap();
        let system = write(
            dir.path(),
            "system.json",
            &format!(
                r#"{{"builders": {{"leviathan": {{"endpoint_id": "{ID_A}", "relay_url": null}}, "other": {{"endpoint_id": "{ID_A}"}}}}}}"#
            ),
        );
        let user = write(
            dir.path(),
            "user.json",
            &format!(
                r#"{{"builders": {{"leviathan": {{"endpoint_id": "{ID_B}", "addrs": ["127.0.0.1:7000"]}}}}}}"#
            ),
        );
        let missing = dir.path().join("missing.json");
        let found = find_builder(&[system.clone(), missing, user.clone()], "leviathan").unwrap();
        assert_eq!(found.endpoint_id.to_string(), ID_B);
        assert_eq!(found.addrs, ["127.0.0.1:7000".parse().unwrap()]);
        assert_eq!(found.source, user);

        let err = find_builder(&[system, user], "nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("leviathan") && err.contains("other"), "{err}");
    }

    #[test]
    fn builder_entry_needs_exactly_one_id_source() {
        let dir = tempfile::tempdir().unwrap();
        let id_file = write(dir.path(), "id", &format!("{ID_A}\n"));
        let both = write(
            dir.path(),
            "b.json",
            &format!(
                r#"{{"builders": {{"x": {{"endpoint_id": "{ID_A}", "endpoint_id_file": "{}"}}}}}}"#,
                id_file.display()
            ),
        );
        assert!(
            find_builder(&[both], "x")
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );
        let from_file = write(
            dir.path(),
            "f.json",
            &format!(
                r#"{{"builders": {{"x": {{"endpoint_id_file": "{}"}}}}}}"#,
                id_file.display()
            ),
        );
        assert_eq!(
            find_builder(&[from_file], "x")
                .unwrap()
                .endpoint_id
                .to_string(),
            ID_A
        );
    }

    /// A ticket for a builder with one direct address and a relay, in a
    /// private file.
    fn ticket_file(dir: &Path) -> (Ticket, PathBuf) {
        use std::os::unix::fs::PermissionsExt;

        let builder = iroh::EndpointAddr::new(ID_A.parse().unwrap())
            .with_ip_addr("192.0.2.1:7000".parse().unwrap())
            .with_relay_url("https://relay.example.org./".parse().unwrap());
        let signing_key = signing::SecretKey::generate("drv-thru-test-1")
            .unwrap()
            .to_public();
        let ticket = Ticket::new(
            builder,
            signing_key,
            crate::ticket::TicketId::generate(),
            crate::ticket::BearerSecret::from_bytes([7; 32]),
        );
        let path = write(dir, "ticket", &format!("{ticket}\n"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        (ticket, path)
    }

    fn builders_json(dir: &Path, entry: &str) -> PathBuf {
        write(
            dir,
            "builders.json",
            &format!(r#"{{"builders": {{"farm": {entry}}}}}"#),
        )
    }

    #[test]
    fn ticket_file_entry_takes_address_and_key_from_the_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let (ticket, file) = ticket_file(dir.path());
        let only_ticket = builders_json(
            dir.path(),
            &format!(r#"{{"ticket_file": "{}"}}"#, file.display()),
        );
        let found = find_builder(&[only_ticket], "farm").unwrap();
        assert_eq!(found.endpoint_id.to_string(), ID_A);
        assert_eq!(found.addrs, ["192.0.2.1:7000".parse().unwrap()]);
        assert_eq!(
            found.relay_url.as_deref(),
            Some("https://relay.example.org./")
        );
        assert_eq!(found.public_key.as_ref(), Some(ticket.signing_key()));
        assert_eq!(found.ticket.unwrap().id(), ticket.id());

        let other_key = signing::SecretKey::generate("drv-thru-test-2")
            .unwrap()
            .to_public();
        let overridden = builders_json(
            dir.path(),
            &format!(
                r#"{{"ticket_file": "{}", "endpoint_id": "{ID_B}", "addrs": ["127.0.0.1:9"], "public_key": "{other_key}"}}"#,
                file.display()
            ),
        );
        let found = find_builder(&[overridden], "farm").unwrap();
        assert_eq!(found.endpoint_id.to_string(), ID_B);
        assert_eq!(found.addrs, ["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(found.public_key, Some(other_key));
        assert!(found.ticket.is_some());
    }

    #[test]
    fn unusable_ticket_files_are_refused_with_the_reason() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let (_, readable) = ticket_file(dir.path());
        fs::set_permissions(&readable, fs::Permissions::from_mode(0o644)).unwrap();
        let garbage = write(dir.path(), "garbage", "drvthruoops\n");
        fs::set_permissions(&garbage, fs::Permissions::from_mode(0o600)).unwrap();
        for (file, needle) in [
            (dir.path().join("missing"), "the file does not exist"),
            (readable, "chmod 600"),
            (garbage, "does not hold a valid drv-thru ticket"),
        ] {
            let builders = builders_json(
                dir.path(),
                &format!(r#"{{"ticket_file": "{}"}}"#, file.display()),
            );
            let err = find_builder(&[builders], "farm").unwrap_err();
            let message = format!("{:#}", anyhow::Error::from(err));
            assert!(
                message.contains("builder \"farm\": unusable ticket_file")
                    && message.contains(needle),
                "{message}"
            );
        }
    }

    #[test]
    fn scheduling_defaults_to_one_job_on_this_system() {
        let dir = tempfile::tempdir().unwrap();
        let builders = builders_json(dir.path(), &format!(r#"{{"endpoint_id": "{ID_A}"}}"#));
        let scheduling = find_builder(&[builders], "farm").unwrap().scheduling;
        assert_eq!(
            scheduling,
            Scheduling {
                systems: vec![machines::local_system()],
                max_jobs: 1,
                speed_factor: 1,
                supported_features: Vec::new(),
                mandatory_features: Vec::new(),
            }
        );
    }

    #[test]
    fn bad_entries_are_refused_with_what_to_change() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            (
                format!(r#"{{"builders": {{"a b": {{"endpoint_id": "{ID_A}"}}}}}}"#),
                r#"builder name "a b" may hold only letters, digits and . _ -"#,
            ),
            (
                format!(
                    r#"{{"builders": {{"farm": {{"endpoint_id": "{ID_A}", "max_jobs": 0}}}}}}"#
                ),
                r#"builder "farm": max_jobs must be at least 1"#,
            ),
            (
                format!(
                    r#"{{"builders": {{"farm": {{"endpoint_id": "{ID_A}", "systems": []}}}}}}"#
                ),
                "systems must name at least one system",
            ),
            (
                format!(
                    r#"{{"builders": {{"farm": {{"endpoint_id": "{ID_A}", "speed_factor": -1}}}}}}"#
                ),
                "invalid value",
            ),
            (
                format!(r#"{{"builders": {{"farm": {{"endpoint_id": "{ID_A}", "max_job": 2}}}}}}"#),
                "unknown field `max_job`",
            ),
            (
                r#"{"builders": {"farm": {}}}"#.to_owned(),
                "set exactly one of endpoint_id and endpoint_id_file, or a ticket_file",
            ),
        ] {
            let err = find_builder(&[write(dir.path(), "b.json", &text)], "farm")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn all_builders_lists_a_file_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "builders.json",
            &format!(
                r#"{{"builders": {{"b": {{"endpoint_id": "{ID_A}"}}, "a": {{"endpoint_id": "{ID_B}", "max_jobs": 4}}}}}}"#
            ),
        );
        let summary: Vec<_> = all_builders(&file)
            .unwrap()
            .into_iter()
            .map(|builder| (builder.name, builder.scheduling.max_jobs))
            .collect();
        assert_eq!(summary, [("a".to_owned(), 4), ("b".to_owned(), 1)]);

        let empty = write(dir.path(), "empty.json", r#"{"builders": {}}"#);
        for (file, needle) in [
            (
                dir.path().join("none.json"),
                "none.json: the file does not exist",
            ),
            (empty, "empty.json: the file defines no builders"),
        ] {
            let err = all_builders(&file).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn no_builders_file_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_builder(&[dir.path().join("a.json")], "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.json") && err.contains("add the builder there"),
            "{err}"
        );
    }
}
