//! Nix's worker protocol: what the daemon (or an `ssh-ng` remote store)
//! speaks to a Nix client on a byte stream. The store side is the stdio
//! program's; the client side only goes as far as the builder needs to
//! hand its own `nix-daemon` NARs ([`connect`], [`Reader::reply`]).
//!
//! Everything is a little-endian u64 or a byte string (u64 length, bytes,
//! zero padding to 8); lists are a count and their items. The handshake
//! agrees on `min(client, ours)` and the fields each version adds; every
//! reply is preceded by log frames (`STDERR_*`) and ends with
//! `STDERR_LAST` or `STDERR_ERROR`.
//!
//! Reading is over any [`AsyncRead`] and bounded (string length, list
//! length), so garbage yields an error, never a panic or a huge
//! allocation. Writing goes into a [`Writer`] buffer the caller flushes.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::nix::store_path::StorePath;

/// What a client sends first.
pub const MAGIC_1: u64 = 0x6e69_7863;
/// What the store answers with.
pub const MAGIC_2: u64 = 0x6478_696f;

/// The longest string accepted: derivation environments can be large, but
/// nothing a build needs comes near this.
const MAX_STRING: u64 = 64 << 20;
/// The longest list accepted.
const MAX_LIST: u64 = 1 << 20;
/// The largest frame of a framed stream accepted (Nix sends 32 KiB).
const MAX_FRAME: u64 = 16 << 20;

/// A protocol version as sent on the wire: `major << 8 | minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u64);

impl Version {
    /// The version `major.minor`.
    pub const fn new(major: u8, minor: u8) -> Self {
        Self((major as u64) << 8 | minor as u64)
    }

    /// The wire form.
    pub fn wire(self) -> u64 {
        self.0
    }

    /// The minor version.
    pub fn minor(self) -> u64 {
        self.0 & 0xff
    }

    /// The major version.
    pub fn major(self) -> u64 {
        self.0 >> 8
    }

    /// Whether this is at least `1.minor`.
    pub fn has(self, minor: u8) -> bool {
        self >= Self::new(1, minor)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// The newest version spoken here: Nix 2.24 and later (1.38, with the
/// feature exchange).
pub const NEWEST: Version = Version::new(1, 38);
/// The oldest version accepted: Nix 2.8 (Debian 12).
pub const OLDEST: Version = Version::new(1, 34);

/// Why a stream could not be read as the protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended where a value was due.
    #[error("the Nix client closed the connection")]
    Eof,
    /// The stream does not follow the protocol.
    #[error("malformed worker protocol message: {0}")]
    Malformed(String),
    /// Reading or writing failed.
    #[error("worker protocol I/O: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, WireError>;

/// Reads protocol values from a byte stream.
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Reads from `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The stream underneath, e.g. to watch it for its end.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    async fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.inner.read_exact(buf).await {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Eof),
            Err(err) => Err(err.into()),
        }
    }

    /// A u64.
    pub async fn u64(&mut self) -> Result<u64> {
        let mut buf = [0; 8];
        self.exact(&mut buf).await?;
        Ok(u64::from_le_bytes(buf))
    }

    /// A boolean (any non-zero u64 is true, as Nix reads it).
    pub async fn bool(&mut self) -> Result<bool> {
        Ok(self.u64().await? != 0)
    }

    /// A byte string.
    pub async fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = self.u64().await?;
        if len > MAX_STRING {
            return Err(WireError::Malformed(format!(
                "a string of {len} bytes (at most {MAX_STRING})"
            )));
        }
        let mut bytes = vec![0; len as usize];
        self.exact(&mut bytes).await?;
        let mut padding = [0; 8];
        let pad = &mut padding[..padding_len(len)];
        self.exact(pad).await?;
        if pad.iter().any(|&b| b != 0) {
            return Err(WireError::Malformed("non-zero string padding".into()));
        }
        Ok(bytes)
    }

    /// A string, which must be UTF-8.
    pub async fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes().await?)
            .map_err(|_| WireError::Malformed("a string that is not UTF-8".into()))
    }

    /// A list's length.
    async fn count(&mut self) -> Result<usize> {
        let n = self.u64().await?;
        if n > MAX_LIST {
            return Err(WireError::Malformed(format!(
                "a list of {n} items (at most {MAX_LIST})"
            )));
        }
        Ok(n as usize)
    }

    /// A list of strings.
    pub async fn strings(&mut self) -> Result<Vec<String>> {
        let n = self.count().await?;
        // Grows as items arrive: the count alone reserves nothing.
        let mut items = Vec::new();
        for _ in 0..n {
            items.push(self.string().await?);
        }
        Ok(items)
    }

    /// A store path.
    pub async fn path(&mut self) -> Result<StorePath> {
        let text = self.string().await?;
        text.parse()
            .map_err(|err| WireError::Malformed(format!("store path {text:?}: {err}")))
    }

    /// A list of store paths.
    pub async fn paths(&mut self) -> Result<Vec<StorePath>> {
        let n = self.count().await?;
        let mut paths = Vec::new();
        for _ in 0..n {
            paths.push(self.path().await?);
        }
        Ok(paths)
    }

    /// A string-to-string map, as pairs.
    async fn string_pairs(&mut self) -> Result<BTreeMap<String, String>> {
        let n = self.count().await?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let key = self.string().await?;
            map.insert(key, self.string().await?);
        }
        Ok(map)
    }

    /// Reads the log frames of a reply up to its end: `Ok` after
    /// `STDERR_LAST`, the store's message after `STDERR_ERROR`. Messages
    /// and activities on the way are dropped.
    pub async fn reply(&mut self) -> Result<std::result::Result<(), String>> {
        loop {
            match self.u64().await? {
                stderr::LAST => return Ok(Ok(())),
                stderr::ERROR => return self.error().await.map(Err),
                stderr::NEXT | stderr::WRITE => drop(self.bytes().await?),
                stderr::START_ACTIVITY => {
                    // Id, level, type, text, fields, parent.
                    self.u64().await?;
                    self.u64().await?;
                    self.u64().await?;
                    self.bytes().await?;
                    self.fields().await?;
                    self.u64().await?;
                }
                stderr::STOP_ACTIVITY => drop(self.u64().await?),
                stderr::RESULT => {
                    self.u64().await?;
                    self.u64().await?;
                    self.fields().await?;
                }
                tag => {
                    return Err(WireError::Malformed(format!(
                        "log frame {tag:#x}, which no reply here should carry"
                    )));
                }
            }
        }
    }

    /// An error's message (the format of 1.26 and later), its traces
    /// appended.
    async fn error(&mut self) -> Result<String> {
        // Type, level, name; then the message.
        self.bytes().await?;
        self.u64().await?;
        self.bytes().await?;
        let mut message = self.string().await?;
        // Nix never sends a position.
        self.u64().await?;
        for _ in 0..self.count().await? {
            self.u64().await?;
            message.push_str("; ");
            message.push_str(&self.string().await?);
        }
        Ok(message)
    }

    /// Reads and discards an activity's or result's fields.
    async fn fields(&mut self) -> Result<()> {
        for _ in 0..self.count().await? {
            match self.u64().await? {
                0 => drop(self.u64().await?),
                1 => drop(self.bytes().await?),
                kind => {
                    return Err(WireError::Malformed(format!("a field of type {kind}")));
                }
            }
        }
        Ok(())
    }

    /// Reads and discards a framed stream (frames of u64 length and bytes,
    /// ended by an empty one); returns the bytes it held.
    pub async fn drain_framed(&mut self) -> Result<u64> {
        let mut total = 0u64;
        let mut buf = vec![0; 64 << 10];
        loop {
            let mut left = self.u64().await?;
            if left == 0 {
                return Ok(total);
            }
            if left > MAX_FRAME {
                return Err(WireError::Malformed(format!(
                    "a frame of {left} bytes (at most {MAX_FRAME})"
                )));
            }
            total += left;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                self.exact(&mut buf[..n]).await?;
                left -= n as u64;
            }
        }
    }
}

fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// A field of a log activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A number.
    Int(u64),
    /// A string.
    Str(String),
}

/// Log frame tags (`STDERR_*`).
mod stderr {
    pub const NEXT: u64 = 0x6f6c_6d67;
    pub const LAST: u64 = 0x616c_7473;
    pub const ERROR: u64 = 0x6378_7470;
    pub const START_ACTIVITY: u64 = 0x5354_5254;
    pub const STOP_ACTIVITY: u64 = 0x5354_4f50;
    pub const RESULT: u64 = 0x5253_4c54;
    pub const WRITE: u64 = 0x6461_7416;
}

/// Nix's activity type of one derivation's build (`actBuild`).
pub const ACTIVITY_BUILD: u64 = 105;
/// Nix's result type of a build log line (`resBuildLogLine`).
pub const RESULT_BUILD_LOG_LINE: u64 = 101;
/// Nix's result type of a new build phase (`resSetPhase`).
pub const RESULT_SET_PHASE: u64 = 104;
/// Nix's `lvlInfo` verbosity.
pub const LEVEL_INFO: u64 = 3;

/// Protocol values waiting to be written, in order.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Appends a u64.
    pub fn u64(&mut self, n: u64) -> &mut Self {
        self.buf.extend_from_slice(&n.to_le_bytes());
        self
    }

    /// Appends a boolean.
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.u64(b.into())
    }

    /// Appends a byte string with its padding.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.u64(bytes.len() as u64);
        self.buf.extend_from_slice(bytes);
        let pad = padding_len(bytes.len() as u64);
        self.buf.extend_from_slice(&[0; 8][..pad]);
        self
    }

    /// Appends a string.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends a list of strings.
    pub fn strings<S: AsRef<str>>(&mut self, items: impl ExactSizeIterator<Item = S>) -> &mut Self {
        self.u64(items.len() as u64);
        for item in items {
            self.string(item.as_ref());
        }
        self
    }

    /// Appends the end of the log frames of a reply.
    pub fn last(&mut self) -> &mut Self {
        self.u64(stderr::LAST)
    }

    /// Appends a log message (Nix prints it as is).
    pub fn next(&mut self, message: &str) -> &mut Self {
        self.u64(stderr::NEXT).string(message)
    }

    /// Appends an error ending the reply (the format of 1.26 and later).
    pub fn error(&mut self, message: &str) -> &mut Self {
        // Type, level (0: error), name, message, no position, no traces.
        self.u64(stderr::ERROR)
            .string("Error")
            .u64(0)
            .string("Error")
            .string(message)
            .u64(0)
            .u64(0)
    }

    fn fields(&mut self, fields: &[Field]) -> &mut Self {
        self.u64(fields.len() as u64);
        for field in fields {
            match field {
                Field::Int(n) => self.u64(0).u64(*n),
                Field::Str(s) => self.u64(1).string(s),
            };
        }
        self
    }

    /// Appends the start of activity `id` of `kind`, at `level`.
    pub fn start_activity(
        &mut self,
        id: u64,
        level: u64,
        kind: u64,
        text: &str,
        fields: &[Field],
    ) -> &mut Self {
        self.u64(stderr::START_ACTIVITY)
            .u64(id)
            .u64(level)
            .u64(kind)
            .string(text)
            .fields(fields)
            // No parent activity.
            .u64(0)
    }

    /// Appends a result of kind `kind` within activity `id`.
    pub fn result(&mut self, id: u64, kind: u64, fields: &[Field]) -> &mut Self {
        self.u64(stderr::RESULT).u64(id).u64(kind).fields(fields)
    }

    /// Appends the end of activity `id`.
    pub fn stop_activity(&mut self, id: u64) -> &mut Self {
        self.u64(stderr::STOP_ACTIVITY).u64(id)
    }

    /// Writes what was appended to `out`, flushes it, and empties the
    /// buffer.
    pub async fn send(&mut self, out: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        out.write_all(&self.buf).await?;
        self.buf.clear();
        out.flush().await
    }

    /// What was appended and not sent yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The version both speak.
    pub version: Version,
    /// Whether the store trusts the client, where it says (1.35 and later).
    pub trusted: Option<bool>,
}

/// The store side of the handshake, up to (not including) the first log
/// frames: magic numbers, version, the feature exchange (1.38), the
/// obsolete CPU affinity and reserve-space fields, our Nix version (1.33)
/// and whether the store trusts the client (1.35). Offers no features.
pub async fn accept<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut Reader<R>,
    out: &mut W,
    nix_version: &str,
    trusted: bool,
) -> Result<Negotiated> {
    let magic = reader.u64().await?;
    if magic != MAGIC_1 {
        return Err(WireError::Malformed(format!(
            "the client sent {magic:#x}, not Nix's worker protocol magic number"
        )));
    }
    let mut w = Writer::default();
    w.u64(MAGIC_2).u64(NEWEST.wire()).send(out).await?;
    let client = Version(reader.u64().await?);
    if client.major() != 1 || client < OLDEST {
        return Err(WireError::Malformed(format!(
            "the client speaks worker protocol {client}; {OLDEST} (Nix 2.8) or newer is needed"
        )));
    }
    let version = client.min(NEWEST);
    if version.has(38) {
        reader.strings().await?;
        w.strings(std::iter::empty::<&str>()).send(out).await?;
    }
    if reader.bool().await? {
        reader.u64().await?;
    }
    reader.u64().await?;
    w.string(nix_version);
    if version.has(35) {
        // 1: trusted, 2: not trusted (0 would be "unknown").
        w.u64(if trusted { 1 } else { 2 });
    }
    w.send(out).await?;
    Ok(Negotiated {
        version,
        trusted: version.has(35).then_some(trusted),
    })
}

/// The version the client side speaks: Nix 2.15's, which is Nix 2.8's
/// with the store's word on whether it trusts the client. Every later Nix
/// still accepts it, and it has everything [`connect`]'s callers use.
pub const CLIENT: Version = Version::new(1, 35);

/// The client side of the handshake, up to the store's first reply:
/// magic numbers, version, no CPU affinity, no reserved space, the store's
/// Nix version (1.33), whether it trusts the client (1.35), and the log
/// frames that end the handshake.
pub async fn connect<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut Reader<R>,
    out: &mut W,
) -> Result<Negotiated> {
    let mut w = Writer::default();
    w.u64(MAGIC_1).send(out).await?;
    let magic = reader.u64().await?;
    if magic != MAGIC_2 {
        return Err(WireError::Malformed(format!(
            "the store sent {magic:#x}, not Nix's worker protocol magic number"
        )));
    }
    let store = Version(reader.u64().await?);
    if store.major() != 1 || store < OLDEST {
        return Err(WireError::Malformed(format!(
            "the store speaks worker protocol {store}; {OLDEST} (Nix 2.8) or newer is needed"
        )));
    }
    let version = store.min(CLIENT);
    w.u64(version.wire())
        .bool(false)
        .bool(false)
        .send(out)
        .await?;
    reader.bytes().await?;
    let trusted = if version.has(35) {
        // 0 is "unknown".
        match reader.u64().await? {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    } else {
        None
    };
    if let Err(message) = reader.reply().await? {
        return Err(WireError::Malformed(format!(
            "the store refused the connection: {message}"
        )));
    }
    Ok(Negotiated { version, trusted })
}

/// Operation codes (Nix's `WorkerProto::Op`).
pub mod op {
    /// `IsValidPath`.
    pub const IS_VALID_PATH: u64 = 1;
    /// `AddTempRoot`.
    pub const ADD_TEMP_ROOT: u64 = 11;
    /// `SetOptions`.
    pub const SET_OPTIONS: u64 = 19;
    /// `QueryPathInfo`.
    pub const QUERY_PATH_INFO: u64 = 26;
    /// `QueryValidPaths`.
    pub const QUERY_VALID_PATHS: u64 = 31;
    /// `BuildDerivation`.
    pub const BUILD_DERIVATION: u64 = 36;
    /// `NarFromPath`.
    pub const NAR_FROM_PATH: u64 = 38;
    /// `AddToStoreNar`.
    pub const ADD_TO_STORE_NAR: u64 = 39;
    /// `QueryRealisation`.
    pub const QUERY_REALISATION: u64 = 43;
    /// `AddMultipleToStore`.
    pub const ADD_MULTIPLE_TO_STORE: u64 = 44;
    /// `BuildPathsWithResults`.
    pub const BUILD_PATHS_WITH_RESULTS: u64 = 46;

    const NAMES: &[(u64, &str)] = &[
        (1, "IsValidPath"),
        (3, "HasSubstitutes"),
        (4, "QueryPathHash"),
        (5, "QueryReferences"),
        (6, "QueryReferrers"),
        (7, "AddToStore"),
        (8, "AddTextToStore"),
        (9, "BuildPaths"),
        (10, "EnsurePath"),
        (11, "AddTempRoot"),
        (12, "AddIndirectRoot"),
        (13, "SyncWithGC"),
        (14, "FindRoots"),
        (16, "ExportPath"),
        (18, "QueryDeriver"),
        (19, "SetOptions"),
        (20, "CollectGarbage"),
        (21, "QuerySubstitutablePathInfo"),
        (22, "QueryDerivationOutputs"),
        (23, "QueryAllValidPaths"),
        (24, "QueryFailedPaths"),
        (25, "ClearFailedPaths"),
        (26, "QueryPathInfo"),
        (27, "ImportPaths"),
        (28, "QueryDerivationOutputNames"),
        (29, "QueryPathFromHashPart"),
        (30, "QuerySubstitutablePathInfos"),
        (31, "QueryValidPaths"),
        (32, "QuerySubstitutablePaths"),
        (33, "QueryValidDerivers"),
        (34, "OptimiseStore"),
        (35, "VerifyStore"),
        (36, "BuildDerivation"),
        (37, "AddSignatures"),
        (38, "NarFromPath"),
        (39, "AddToStoreNar"),
        (40, "QueryMissing"),
        (41, "QueryDerivationOutputMap"),
        (42, "RegisterDrvOutput"),
        (43, "QueryRealisation"),
        (44, "AddMultipleToStore"),
        (45, "AddBuildLog"),
        (46, "BuildPathsWithResults"),
        (47, "AddPermRoot"),
    ];

    /// The operation's name, or its number if it has none.
    pub fn name(code: u64) -> String {
        NAMES
            .iter()
            .find(|(c, _)| *c == code)
            .map_or_else(|| format!("operation {code}"), |(_, n)| (*n).to_owned())
    }
}

/// Reads `SetOptions`' arguments, which a store serving builds ignores:
/// the builder's own settings apply.
pub async fn skip_options<R: AsyncRead + Unpin>(
    reader: &mut Reader<R>,
    version: Version,
) -> Result<()> {
    // keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
    // maxSilentTime, useBuildHook, verboseBuild, logType, printBuildTrace,
    // buildCores, useSubstitutes.
    for _ in 0..12 {
        reader.u64().await?;
    }
    if version.has(12) {
        reader.string_pairs().await?;
    }
    Ok(())
}

/// A path's metadata as the protocol carries it (`UnkeyedValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The deriver, or empty.
    pub deriver: String,
    /// The NAR's SHA-256 in hex, without the algorithm.
    pub nar_hash: String,
    /// References.
    pub references: Vec<String>,
    /// Seconds since the epoch, or 0.
    pub registration_time: u64,
    /// The NAR's size.
    pub nar_size: u64,
    /// Whether the store built it itself.
    pub ultimate: bool,
    /// Signatures.
    pub sigs: Vec<String>,
    /// The content address, or empty.
    pub ca: String,
}

impl PathInfo {
    /// Reads one (the fields of 1.16 and later).
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut Reader<R>) -> Result<Self> {
        Ok(Self {
            deriver: reader.string().await?,
            nar_hash: reader.string().await?,
            references: reader.strings().await?,
            registration_time: reader.u64().await?,
            nar_size: reader.u64().await?,
            ultimate: reader.bool().await?,
            sigs: reader.strings().await?,
            ca: reader.string().await?,
        })
    }

    /// Appends it to `w`.
    pub fn write(&self, w: &mut Writer) {
        w.string(&self.deriver)
            .string(&self.nar_hash)
            .strings(self.references.iter())
            .u64(self.registration_time)
            .u64(self.nar_size)
            .bool(self.ultimate)
            .strings(self.sigs.iter())
            .string(&self.ca);
    }
}

/// One output of a [`BasicDerivation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its store path; empty for a floating content-addressed output.
    pub path: String,
    /// The hash algorithm of a fixed output (`r:sha256`), or empty.
    pub hash_algo: String,
    /// A fixed output's hash, or empty.
    pub hash: String,
}

/// The derivation `BuildDerivation` carries: without its input
/// derivations, which Nix has already resolved to their output paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicDerivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, Output>,
    /// Every input path.
    pub input_srcs: Vec<StorePath>,
    /// The system it builds on.
    pub platform: String,
    /// The builder program.
    pub builder: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment.
    pub env: BTreeMap<String, String>,
}

impl BasicDerivation {
    /// Reads one.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut Reader<R>) -> Result<Self> {
        let n = reader.count().await?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let name = reader.string().await?;
            let output = Output {
                path: reader.string().await?,
                hash_algo: reader.string().await?,
                hash: reader.string().await?,
            };
            outputs.insert(name, output);
        }
        Ok(Self {
            outputs,
            input_srcs: reader.paths().await?,
            platform: reader.string().await?,
            builder: reader.string().await?,
            args: reader.strings().await?,
            env: reader.string_pairs().await?,
        })
    }

    /// Appends it to `w`, as Nix sends it.
    pub fn write(&self, w: &mut Writer) {
        w.u64(self.outputs.len() as u64);
        for (name, output) in &self.outputs {
            w.string(name)
                .string(&output.path)
                .string(&output.hash_algo)
                .string(&output.hash);
        }
        w.strings(self.input_srcs.iter().map(ToString::to_string))
            .string(&self.platform)
            .string(&self.builder)
            .strings(self.args.iter())
            .u64(self.env.len() as u64);
        for (key, value) in &self.env {
            w.string(key).string(value);
        }
    }
}

/// How a build ended, as Nix numbers it (`BuildResult::Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    /// Built.
    Built = 0,
    /// The outputs were valid already.
    AlreadyValid = 2,
    /// The build failed; trying again would fail again.
    PermanentFailure = 3,
    /// A time limit stopped it.
    TimedOut = 8,
    /// Anything else went wrong.
    MiscFailure = 9,
}

/// A build's result as `BuildDerivation` and `BuildPathsWithResults`
/// return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// How it ended.
    pub status: BuildStatus,
    /// Why it failed, or empty.
    pub error: String,
    /// When it started and stopped, in seconds since the epoch.
    pub times: (u64, u64),
}

impl BuildResult {
    /// Appends it to `w` as `version` lays it out. Reports no realisations
    /// (only floating content-addressed outputs need them) and no CPU times.
    pub fn write(&self, w: &mut Writer, version: Version) {
        w.u64(self.status as u64).string(&self.error);
        if version.has(29) {
            let times_built = u64::from(self.status == BuildStatus::Built);
            w.u64(times_built)
                .bool(false)
                .u64(self.times.0)
                .u64(self.times.1);
        }
        if version.has(37) {
            // cpuUser and cpuSystem, both absent.
            w.u64(0).u64(0);
        }
        if version.has(28) {
            w.u64(0);
        }
    }
}

/// A `BuildPathsWithResults` target, `DRV!OUT,...` (`^` since 2.18) or
/// `DRV!*`; an opaque path has no separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedPath {
    /// Outputs of a derivation; empty means all of them.
    Built {
        /// The derivation.
        drv: StorePath,
        /// The outputs asked for; empty for `*`.
        outputs: Vec<String>,
    },
    /// A store path as it is.
    Opaque(StorePath),
}

impl std::str::FromStr for DerivedPath {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |err: crate::nix::store_path::StorePathError| {
            WireError::Malformed(format!("derived path {s:?}: {err}"))
        };
        Ok(match s.rsplit_once(['!', '^']) {
            Some((drv, outputs)) => Self::Built {
                drv: drv.parse().map_err(bad)?,
                outputs: match outputs {
                    "*" => Vec::new(),
                    list => list.split(',').map(str::to_owned).collect(),
                },
            },
            None => Self::Opaque(s.parse().map_err(bad)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello";

    fn wire(build: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::default();
        build(&mut w);
        w.pending().to_vec()
    }

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        assert_eq!(
            wire(|w| {
                w.string("abc");
            }),
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
        assert_eq!(
            wire(|w| {
                w.string("");
            }),
            [0; 8]
        );
    }

    #[tokio::test]
    async fn values_round_trip() {
        let bytes = wire(|w| {
            w.u64(7)
                .bool(true)
                .string("12345678")
                .strings(["a", "bc"].iter())
                .strings([PATH].iter());
        });
        let mut r = Reader::new(bytes.as_slice());
        assert_eq!(r.u64().await.unwrap(), 7);
        assert!(r.bool().await.unwrap());
        assert_eq!(r.string().await.unwrap(), "12345678");
        assert_eq!(r.strings().await.unwrap(), ["a", "bc"]);
        assert_eq!(r.paths().await.unwrap(), [PATH.parse().unwrap()]);
        assert!(matches!(r.u64().await, Err(WireError::Eof)));
    }

    #[tokio::test]
    async fn path_info_and_derivation_round_trip() {
        let info = PathInfo {
            deriver: String::new(),
            nar_hash: "ab".repeat(32),
            references: vec![PATH.into()],
            registration_time: 0,
            nar_size: 120,
            ultimate: false,
            sigs: vec!["k:sig".into()],
            ca: String::new(),
        };
        let bytes = wire(|w| info.write(w));
        assert_eq!(
            PathInfo::read(&mut Reader::new(bytes.as_slice()))
                .await
                .unwrap(),
            info
        );
        let drv = BasicDerivation {
            outputs: [(
                "out".to_owned(),
                Output {
                    path: PATH.into(),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            )]
            .into(),
            input_srcs: vec![PATH.parse().unwrap()],
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi > $out".into()],
            env: [("out".to_owned(), PATH.to_owned())].into(),
        };
        let bytes = wire(|w| drv.write(w));
        assert_eq!(
            BasicDerivation::read(&mut Reader::new(bytes.as_slice()))
                .await
                .unwrap(),
            drv
        );
    }

    #[tokio::test]
    async fn framed_streams_are_drained() {
        // Frames carry raw bytes (no padding); an empty one ends the stream.
        let mut framed = 3u64.to_le_bytes().to_vec();
        framed.extend_from_slice(b"abc");
        framed.extend_from_slice(&0u64.to_le_bytes());
        framed.extend_from_slice(&42u64.to_le_bytes());
        let mut r = Reader::new(framed.as_slice());
        assert_eq!(r.drain_framed().await.unwrap(), 3);
        assert_eq!(r.u64().await.unwrap(), 42);
    }

    /// The client side of a handshake at `version` as Nix writes it, with
    /// `features` when it exchanges them.
    fn client_hello(version: Version) -> Vec<u8> {
        wire(|w| {
            w.u64(MAGIC_1).u64(version.wire());
            if version.has(38) {
                w.strings(["some-feature"].iter());
            }
            // No CPU affinity, no reserved space.
            w.u64(0).u64(0);
        })
    }

    async fn handshake(client: Version) -> (Result<Negotiated>, Vec<u8>) {
        let hello = client_hello(client);
        let mut out = Vec::new();
        let negotiated = accept(&mut Reader::new(hello.as_slice()), &mut out, "2.8.0", true).await;
        (negotiated, out)
    }

    /// What a store at `version` sends to [`connect`], saying `trust`
    /// where the version has it.
    async fn connect_to(version: Version, trust: u64) -> (Negotiated, Vec<u8>) {
        let store = wire(|w| {
            w.u64(MAGIC_2).u64(version.wire()).string("2.26.3");
            if version.has(35) {
                w.u64(trust);
            }
            w.last();
        });
        let mut out = Vec::new();
        let negotiated = connect(&mut Reader::new(store.as_slice()), &mut out)
            .await
            .unwrap();
        (negotiated, out)
    }

    #[tokio::test]
    async fn connecting_reads_the_store_trust_where_it_is_said() {
        let (negotiated, out) = connect_to(Version::new(1, 37), 2).await;
        assert_eq!(negotiated.version, CLIENT);
        assert_eq!(negotiated.trusted, Some(false));
        let hello = wire(|w| {
            w.u64(MAGIC_1).u64(CLIENT.wire()).u64(0).u64(0);
        });
        assert_eq!(out, hello);
        assert_eq!(
            connect_to(Version::new(1, 38), 1).await.0.trusted,
            Some(true)
        );
        assert_eq!(connect_to(Version::new(1, 37), 0).await.0.trusted, None);
        // Nix 2.8 does not say.
        let (negotiated, _) = connect_to(Version::new(1, 34), 0).await;
        assert_eq!(negotiated.version, Version::new(1, 34));
        assert_eq!(negotiated.trusted, None);
    }

    #[tokio::test]
    async fn handshake_with_nix_2_8_sends_version_and_trust() {
        let (negotiated, out) = handshake(Version::new(1, 34)).await;
        assert_eq!(negotiated.unwrap().version, Version::new(1, 34));
        // Magic, our version, then the Nix version; no trust flag before 1.35.
        let expected = wire(|w| {
            w.u64(MAGIC_2).u64(NEWEST.wire()).string("2.8.0");
        });
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn handshake_with_nix_2_26_adds_the_trust_flag() {
        let (negotiated, out) = handshake(Version::new(1, 37)).await;
        assert_eq!(negotiated.unwrap().version, Version::new(1, 37));
        let expected = wire(|w| {
            w.u64(MAGIC_2).u64(NEWEST.wire()).string("2.8.0").u64(1);
        });
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn handshake_with_a_newer_nix_exchanges_features_at_ours() {
        let (negotiated, out) = handshake(Version::new(1, 39)).await;
        assert_eq!(negotiated.unwrap().version, NEWEST);
        let expected = wire(|w| {
            w.u64(MAGIC_2)
                .u64(NEWEST.wire())
                .u64(0)
                .string("2.8.0")
                .u64(1);
        });
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn handshake_refuses_old_clients_and_other_protocols() {
        let (negotiated, _) = handshake(Version::new(1, 21)).await;
        assert!(matches!(negotiated, Err(WireError::Malformed(m)) if m.contains("1.21")));
        let garbage = wire(|w| {
            w.u64(0x1234);
        });
        let negotiated = accept(
            &mut Reader::new(garbage.as_slice()),
            &mut Vec::new(),
            "x",
            true,
        )
        .await;
        assert!(matches!(negotiated, Err(WireError::Malformed(_))));
    }

    #[test]
    fn build_results_follow_the_version() {
        let result = BuildResult {
            status: BuildStatus::Built,
            error: String::new(),
            times: (1, 2),
        };
        let at = |minor| wire(|w| result.write(w, Version::new(1, minor))).len();
        // Status and message; then four numbers (1.29); then realisations
        // (1.28); then two CPU times (1.37).
        assert_eq!(at(27), 16);
        assert_eq!(at(34), 16 + 8 + 32);
        assert_eq!(at(37), 16 + 8 + 32 + 16);
    }

    #[test]
    fn derived_paths_parse_both_separators() {
        let drv = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv";
        assert_eq!(
            format!("{drv}!out,dev").parse::<DerivedPath>().unwrap(),
            DerivedPath::Built {
                drv: drv.parse().unwrap(),
                outputs: vec!["out".into(), "dev".into()]
            }
        );
        assert_eq!(
            format!("{drv}^*").parse::<DerivedPath>().unwrap(),
            DerivedPath::Built {
                drv: drv.parse().unwrap(),
                outputs: vec![]
            }
        );
        assert_eq!(
            PATH.parse::<DerivedPath>().unwrap(),
            DerivedPath::Opaque(PATH.parse().unwrap())
        );
    }

    #[test]
    fn unknown_operations_are_named_by_number() {
        assert_eq!(op::name(op::BUILD_DERIVATION), "BuildDerivation");
        assert_eq!(op::name(99), "operation 99");
    }

    /// Garbage of every length and a seeded generator's bytes never panic
    /// the readers: each ends in a value or an error.
    #[tokio::test]
    async fn garbage_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2000 {
            let len = (next() % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often a plausible start, so the parsers get past the magic.
            if round % 2 == 0 && bytes.len() >= 16 {
                bytes[..8].copy_from_slice(&MAGIC_1.to_le_bytes());
                bytes[8..16]
                    .copy_from_slice(&Version::new(1, (next() % 50) as u8).wire().to_le_bytes());
            }
            let _ = accept(
                &mut Reader::new(bytes.as_slice()),
                &mut Vec::new(),
                "x",
                true,
            )
            .await;
            let _ = BasicDerivation::read(&mut Reader::new(bytes.as_slice())).await;
            let _ = PathInfo::read(&mut Reader::new(bytes.as_slice())).await;
            let _ = Reader::new(bytes.as_slice()).drain_framed().await;
            let _ = skip_options(&mut Reader::new(bytes.as_slice()), Version::new(1, 34)).await;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = text.parse::<DerivedPath>();
            }
        }
    }
}
