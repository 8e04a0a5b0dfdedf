//! The checked outputs the connections of one build hook share.
//!
//! Nix's build hook may fetch a build's outputs over several connections,
//! each a process of its own: Nix 2.26 kills the connection that built a
//! multi-output derivation after the first NAR and opens another for the
//! next. The builder serves a session's outputs only to the connection that
//! opened it, so the building connection downloads the checked output
//! closure into a directory of the hook that started it, and every
//! connection of that hook serves from there.
//!
//! A hook's directory is `SHARED_DIR/PID-START`, the hook's process id and
//! start time, so a reused process id names a new directory. Everything is
//! root only: the directories are created `0700`, and one owned by another
//! user or writable by others is refused rather than followed. A directory
//! whose hook is gone is removed by a connection of that hook that ends
//! after it, or else by the next connection to start.

use std::{
    fs::DirBuilder,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail, ensure};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;

use crate::nix::{narinfo::NarInfo, store_path::StorePath};

/// Where the hooks' directories are.
pub const SHARED_DIR: &str = "/run/drv-thru/nix-stdio";

/// The outputs kept for one build hook, whose connection this process
/// serves.
#[derive(Debug)]
pub struct SharedOutputs {
    hook: ProcessId,
    dir: PathBuf,
}

impl SharedOutputs {
    /// Opens the directory of the hook, process `hook`, under `root`,
    /// creating it, and removes those of hooks that are gone.
    pub fn open(root: &Path, hook: u32) -> anyhow::Result<Self> {
        let hook = ProcessId::of(hook)
            .with_context(|| format!("cannot read /proc/{hook}/stat, Nix's build hook's"))?;
        Self::open_for(root, hook).with_context(|| {
            format!(
                "cannot keep outputs in {}, as drv-thru --stdio does when nix-daemon runs it as root",
                root.display()
            )
        })
    }

    fn open_for(root: &Path, hook: ProcessId) -> anyhow::Result<Self> {
        if let Some(parent) = root.parent() {
            private_dir(parent)?;
        }
        private_dir(root)?;
        sweep(root);
        let dir = root.join(hook.dir_name());
        private_dir(&dir)?;
        Ok(Self { hook, dir })
    }

    /// Starts keeping `narinfo`'s NAR; nothing of it is visible to the
    /// other connections until [`Keeping::finish`].
    pub fn keep<'a>(&'a self, narinfo: &'a NarInfo) -> anyhow::Result<Keeping<'a>> {
        let (file, temp) = tempfile::Builder::new()
            .prefix(".")
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .with_context(|| format!("creating a file in {}", self.dir.display()))?
            .into_parts();
        Ok(Keeping {
            shared: self,
            narinfo,
            file: tokio::fs::File::from_std(file),
            temp,
            written: 0,
        })
    }

    /// The narinfo some connection of this hook kept for `path`, and the
    /// file of its NAR. The narinfo is for the caller to check.
    pub fn find(&self, path: &StorePath) -> anyhow::Result<Option<(NarInfo, PathBuf)>> {
        let file = self.narinfo_file(path);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).with_context(|| format!("reading {}", file.display())),
        };
        let narinfo: NarInfo = text
            .parse()
            .with_context(|| format!("the narinfo in {}", file.display()))?;
        ensure!(
            narinfo.store_path == *path,
            "{} is the narinfo of {}, not of {path}",
            file.display(),
            narinfo.store_path
        );
        Ok(Some((narinfo, file.with_extension("nar"))))
    }

    /// Removes the hook's directory if the hook is gone: no connection of
    /// it will ask for its outputs again.
    pub fn close(self) {
        if !self.hook.is_running() {
            remove(&self.dir);
        }
    }

    fn narinfo_file(&self, path: &StorePath) -> PathBuf {
        self.dir.join(path.hash_part().to_string())
    }
}

/// A NAR being written under a temporary name, removed if this is dropped
/// unfinished.
#[derive(Debug)]
pub struct Keeping<'a> {
    shared: &'a SharedOutputs,
    narinfo: &'a NarInfo,
    file: tokio::fs::File,
    temp: TempPath,
    written: u64,
}

impl Keeping<'_> {
    /// Appends `data`, which must not take the NAR past its size.
    pub async fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.written += data.len() as u64;
        if self.written > self.narinfo.nar_size {
            bail!(
                "the builder sent more than the {} bytes of {}'s NAR",
                self.narinfo.nar_size,
                self.narinfo.store_path
            );
        }
        self.file
            .write_all(data)
            .await
            .with_context(|| format!("writing {}", self.temp.display()))
    }

    /// Checks the NAR is whole, then makes it and its narinfo visible to
    /// the hook's connections, the narinfo last. Returns the NAR's file.
    pub async fn finish(mut self) -> anyhow::Result<PathBuf> {
        let narinfo = self.narinfo;
        ensure!(
            self.written == narinfo.nar_size,
            "the builder sent {} bytes of {}'s {}-byte NAR",
            self.written,
            narinfo.store_path,
            narinfo.nar_size
        );
        self.file.flush().await?;
        let file = self.shared.narinfo_file(&narinfo.store_path);
        let nar = file.with_extension("nar");
        self.temp
            .persist(&nar)
            .with_context(|| format!("keeping the NAR of {}", narinfo.store_path))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".")
            .suffix(".tmp")
            .tempfile_in(&self.shared.dir)
            .with_context(|| format!("creating a file in {}", self.shared.dir.display()))?;
        std::io::Write::write_all(&mut temp, narinfo.to_string().as_bytes())?;
        temp.persist(&file)
            .with_context(|| format!("keeping the narinfo of {}", narinfo.store_path))?;
        Ok(nar)
    }
}

/// A process, told apart from a later one with the same id by its start
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessId {
    pid: u32,
    /// Clock ticks after boot.
    start: u64,
}

impl ProcessId {
    /// The running process `pid`.
    fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            pid,
            start: start_time(&stat)?,
        })
    }

    fn is_running(self) -> bool {
        Self::of(self.pid) == Some(self)
    }

    fn dir_name(self) -> String {
        format!("{}-{}", self.pid, self.start)
    }

    fn from_dir_name(name: &str) -> Option<Self> {
        let (pid, start) = name.split_once('-')?;
        Some(Self {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

/// The start time, field 22, of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may hold anything, spaces and
/// parentheses too, so fields are counted after its last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Creates `dir` (mode 0700) unless it exists, and makes sure it is a
/// directory of this user's that no one else may write to. One that others
/// may read is used still: `/run/drv-thru` is shared with the import
/// helper's socket, and what is kept here goes to the world-readable store.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot create {}", dir.display()));
        }
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    // SAFETY: geteuid(2) cannot fail.
    let user = unsafe { libc::geteuid() };
    if let Some(problem) = unfit_dir(meta.file_type().is_dir(), meta.uid(), meta.mode(), user) {
        bail!("refusing to use {}: {problem}", dir.display());
    }
    Ok(())
}

/// What makes a directory entry unfit to keep outputs in, if anything: not
/// a directory (a symbolic link is not followed), another owner than
/// `user`, or a mode that lets group or others write.
fn unfit_dir(is_dir: bool, owner: u32, mode: u32, user: u32) -> Option<String> {
    if !is_dir {
        Some("it is not a directory".to_owned())
    } else if owner != user {
        Some(format!(
            "it is owned by uid {owner}, not by this user ({user})"
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "its mode {:o} lets others write to it",
            mode & 0o7777
        ))
    } else {
        None
    }
}

/// Removes the directories under `root` whose hook is gone.
fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let hook = entry
            .file_name()
            .to_str()
            .and_then(ProcessId::from_dir_name);
        if hook.is_some_and(|hook| !hook.is_running()) {
            remove(&entry.path());
        }
    }
}

fn remove(dir: &Path) {
    if let Err(err) = std::fs::remove_dir_all(dir)
        && err.kind() != ErrorKind::NotFound
    {
        tracing::debug!("cannot remove {}: {err}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_counted_after_the_command_name() {
        let stat =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("4242 (short) S 1"), None);
        assert_eq!(start_time("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_running_and_a_later_one_is_not() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_running());
        let later = ProcessId {
            start: me.start + 1,
            ..me
        };
        assert!(!later.is_running());
        assert_eq!(ProcessId::from_dir_name(&me.dir_name()), Some(me));
        assert_eq!(ProcessId::from_dir_name("12-x"), None);
        assert_eq!(ProcessId::from_dir_name("lost+found"), None);
    }

    #[test]
    fn only_private_directories_of_this_user_are_used() {
        assert_eq!(unfit_dir(true, 0, 0o40700, 0), None);
        assert_eq!(unfit_dir(true, 0, 0o40750, 0), None);
        assert!(unfit_dir(false, 0, 0o120777, 0).is_some());
        assert!(unfit_dir(true, 1000, 0o40700, 0).is_some());
        assert!(unfit_dir(true, 0, 0o40770, 0).is_some());
        assert!(unfit_dir(true, 0, 0o41777, 0).is_some());
    }

    fn hook(pid: u32, start: u64) -> ProcessId {
        ProcessId { pid, start }
    }

    #[tokio::test]
    async fn a_kept_nar_is_found_by_another_connection_and_swept_with_its_hook() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("nix-stdio");
        let me = ProcessId::of(std::process::id()).unwrap();
        let writer = SharedOutputs::open_for(&root, me).unwrap();
        let path: StorePath = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-t"
            .parse()
            .unwrap();
        let narinfo: NarInfo = format!(
            "StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 3\nReferences: \n"
        )
        .parse()
        .unwrap();

        let mut keeping = writer.keep(&narinfo).unwrap();
        keeping.write(b"ab").await.unwrap();
        drop(keeping);
        assert_eq!(
            std::fs::read_dir(&writer.dir).unwrap().count(),
            0,
            "an unfinished NAR leaves nothing"
        );
        let mut keeping = writer.keep(&narinfo).unwrap();
        assert!(keeping.write(b"abcd").await.is_err(), "longer than NarSize");
        let mut keeping = writer.keep(&narinfo).unwrap();
        keeping.write(b"ab").await.unwrap();
        assert!(keeping.finish().await.is_err(), "shorter than NarSize");
        assert!(writer.find(&path).unwrap().is_none());

        let mut keeping = writer.keep(&narinfo).unwrap();
        keeping.write(b"abc").await.unwrap();
        keeping.finish().await.unwrap();
        let reader = SharedOutputs::open_for(&root, me).unwrap();
        let (found, nar) = reader.find(&path).unwrap().unwrap();
        assert_eq!(found.store_path, path);
        assert_eq!(std::fs::read(nar).unwrap(), b"abc");
        let mode = std::fs::metadata(&writer.dir).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);

        // A hook that is gone: its directory goes when the next one opens.
        let gone = SharedOutputs::open_for(&root, hook(me.pid, me.start + 1)).unwrap();
        SharedOutputs::open_for(&root, me).unwrap();
        assert!(!gone.dir.exists());
        assert!(writer.dir.exists());
    }

    #[test]
    fn a_directory_of_someone_else_or_open_to_others_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("nix-stdio");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let me = ProcessId::of(std::process::id()).unwrap();
        let err = SharedOutputs::open_for(&root, me).unwrap_err();
        assert!(format!("{err:#}").contains("lets others write"), "{err:#}");

        let link = temp.path().join("link");
        std::os::unix::fs::symlink(temp.path(), &link).unwrap();
        let err = SharedOutputs::open_for(&link, me).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
    }
}
