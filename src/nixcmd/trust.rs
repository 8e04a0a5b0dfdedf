//! Whether the store trusts the current user, and which signing keys it trusts.

use std::ffi::{CStr, CString};

use super::parse::{self, ConfigSubset};
use super::process::Program;
use super::{Nix, NixCmdError};
use crate::nix::signing::PublicKey;

/// What the store trusts, from [`Nix::trust`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustInfo {
    /// Whether the current user is a trusted user of the store: it may import unsigned paths,
    /// pass restricted settings such as `trusted-public-keys`, and so on.
    pub trusted_user: bool,
    /// How that was decided.
    pub basis: TrustBasis,
    /// `trusted-public-keys` of the configuration, `name:base64` strings.
    pub trusted_public_keys: Vec<String>,
    /// `require-sigs` of the configuration.
    pub require_sigs: bool,
}

impl TrustInfo {
    /// Whether `key` is among the trusted public keys. As in Nix, the first key of a name is the
    /// one that counts, so a later key with the same name but other bytes does not.
    pub fn trusts_key(&self, key: &PublicKey) -> bool {
        self.trusted_public_keys
            .iter()
            .find(|k| k.split_once(':').map(|(name, _)| name) == Some(key.name()))
            .and_then(|k| k.parse::<PublicKey>().ok())
            .is_some_and(|k| k == *key)
    }
}

/// How [`TrustInfo::trusted_user`] was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustBasis {
    /// The store said so itself (in the worker protocol's handshake, Nix 2.15+).
    StoreReported,
    /// The user is root.
    Root,
    /// This `trusted-users` entry matches the user (`*`, the name, or `@group`).
    TrustedUsers(String),
    /// The store is a local store the user can write to, which is as good as trusted.
    WritableLocalStore,
    /// None of the above.
    NotTrusted,
}

pub(super) async fn probe(nix: &Nix) -> Result<TrustInfo, NixCmdError> {
    // Neither waits for the other: every Nix process here costs tens of
    // milliseconds of a build's start.
    let (config, reported) = tokio::join!(show_config(nix), store_reported_trust(nix));
    let config = config?;
    let (trusted_user, basis) = match reported {
        Some(trusted) => (trusted, TrustBasis::StoreReported),
        None => {
            let (uid, gid) = nix
                .config
                .credentials
                .unwrap_or_else(|| (effective_uid(), effective_gid()));
            decide_locally(&config, uid, gid)
        }
    };
    Ok(TrustInfo {
        trusted_user,
        basis,
        trusted_public_keys: config.trusted_public_keys,
        require_sigs: config.require_sigs,
    })
}

/// The configuration, from `nix show-config --json` or, where that name is gone, `nix config show
/// --json`.
async fn show_config(nix: &Nix) -> Result<ConfigSubset, NixCmdError> {
    let mut last_error = None;
    for words in [&["show-config"][..], &["config", "show"][..]] {
        let mut args: Vec<_> = words.iter().map(Into::into).collect();
        args.push("--json".into());
        let line = nix.command_line(Program::Nix, args);
        let output = nix.run(&line).await?;
        if output.success() {
            return parse::config_subset(&output.stdout_text())
                .map_err(|reason| output.parse_error(&line, reason));
        }
        last_error = Some(output.failure(&line));
    }
    Err(last_error.expect("two attempts were made"))
}

/// Whether the store trusts this user, as it says when a connection opens (Nix 2.15 and later,
/// where `nix store info` reports the same); `None` where it does not say (Nix 2.8) or cannot be
/// reached.
async fn store_reported_trust(nix: &Nix) -> Option<bool> {
    let connection = nix.connection().await.ok()?;
    let trusted = connection.trusted();
    connection.finish(Ok(trusted)).await.ok().flatten()
}

/// Decides trust from the configuration, as a nix-daemon decides it for a connecting client.
fn decide_locally(config: &ConfigSubset, uid: u32, gid: u32) -> (bool, TrustBasis) {
    if uid == 0 {
        return (true, TrustBasis::Root);
    }
    let user = user_name(uid);
    let group = group_name(gid);
    if let Some(entry) = matching_trusted_user(
        &config.trusted_users,
        user.as_deref(),
        group.as_deref(),
        &|group| {
            user.as_deref()
                .is_some_and(|u| group_lists_member(group, u))
        },
    ) {
        return (true, TrustBasis::TrustedUsers(entry));
    }
    if uid == effective_uid() && local_store_is_writable(&config.store) {
        return (true, TrustBasis::WritableLocalStore);
    }
    (false, TrustBasis::NotTrusted)
}

/// The `trusted-users` entry that matches, following Nix's `matchUser`: `*`, the user's name, or
/// `@group` where the group is the user's primary group or lists the user as a member.
fn matching_trusted_user(
    entries: &[String],
    user: Option<&str>,
    primary_group: Option<&str>,
    is_member: &dyn Fn(&str) -> bool,
) -> Option<String> {
    entries
        .iter()
        .find(|entry| {
            if entry.as_str() == "*" || Some(entry.as_str()) == user {
                return true;
            }
            match entry.strip_prefix('@') {
                Some(group) => Some(group) == primary_group || is_member(group),
                None => false,
            }
        })
        .cloned()
}

/// Whether the configured store is the local store and its database is writable by us.
fn local_store_is_writable(store: &str) -> bool {
    if !matches!(store, "auto" | "local") {
        return false;
    }
    let state_dir = std::env::var("NIX_STATE_DIR").unwrap_or_else(|_| "/nix/var/nix".to_owned());
    let Ok(db) = CString::new(format!("{state_dir}/db")) else {
        return false;
    };
    // SAFETY: `db` is a valid nul-terminated string that outlives the call.
    unsafe { libc::access(db.as_ptr(), libc::W_OK) == 0 }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() }
}

fn effective_gid() -> u32 {
    // SAFETY: getegid(2) cannot fail.
    unsafe { libc::getegid() }
}

/// Size of the buffer for passwd and group entries; large groups need more, which is retried.
const ENTRY_BUFFER: usize = 16 * 1024;
const MAX_ENTRY_BUFFER: usize = 1024 * 1024;

/// The name of user `uid`, if it has a passwd entry.
fn user_name(uid: u32) -> Option<String> {
    let mut size = ENTRY_BUFFER;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local of the right type and `buf.len()` is its
        // size; on success the strings in `entry` point into `buf`, which outlives their use.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && size < MAX_ENTRY_BUFFER {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success `pw_name` is a nul-terminated string inside `buf`.
        return Some(
            unsafe { CStr::from_ptr(entry.pw_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

/// The name of group `gid`, if it has a group entry.
fn group_name(gid: u32) -> Option<String> {
    with_group(GroupKey::Gid(gid), |entry| {
        // SAFETY: on success `gr_name` is a nul-terminated string inside the entry's buffer.
        unsafe { CStr::from_ptr(entry.gr_name) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Whether group `name` lists `user` as a member.
fn group_lists_member(name: &str, user: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    with_group(GroupKey::Name(&name), |entry| {
        let mut member = entry.gr_mem;
        if member.is_null() {
            return false;
        }
        // SAFETY: `gr_mem` is a null-terminated array of nul-terminated strings inside the
        // entry's buffer.
        unsafe {
            while !(*member).is_null() {
                if CStr::from_ptr(*member).to_bytes() == user.as_bytes() {
                    return true;
                }
                member = member.add(1);
            }
        }
        false
    })
    .unwrap_or(false)
}

enum GroupKey<'a> {
    Gid(u32),
    Name(&'a CStr),
}

/// Looks a group up and hands its entry to `f` while the entry's buffer is alive.
fn with_group<T>(key: GroupKey<'_>, f: impl FnOnce(&libc::group) -> T) -> Option<T> {
    let mut size = ENTRY_BUFFER;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: all-zero is a valid `group` (null pointers, zero id).
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local of the right type and `buf.len()` is its
        // size; the name is nul-terminated.
        let rc = unsafe {
            match key {
                GroupKey::Gid(gid) => {
                    libc::getgrgid_r(gid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut result)
                }
                GroupKey::Name(name) => libc::getgrnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                ),
            }
        };
        if rc == libc::ERANGE && size < MAX_ENTRY_BUFFER {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some(f(&entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn matches_trusted_users_like_nix() {
        let member_of_wheel = |g: &str| g == "wheel";
        let nobody = |_: &str| false;
        let m = |list: &[&str], user, group, is_member: &dyn Fn(&str) -> bool| {
            matching_trusted_user(&entries(list), user, group, is_member)
        };
        assert_eq!(m(&["root"], Some("alice"), Some("users"), &nobody), None);
        assert_eq!(
            m(&["root", "alice"], Some("alice"), None, &nobody).as_deref(),
            Some("alice")
        );
        assert_eq!(m(&["*"], None, None, &nobody).as_deref(), Some("*"));
        assert_eq!(
            m(&["@users"], Some("alice"), Some("users"), &nobody).as_deref(),
            Some("@users")
        );
        assert_eq!(
            m(&["@wheel"], Some("alice"), Some("users"), &member_of_wheel).as_deref(),
            Some("@wheel")
        );
        assert_eq!(m(&["@wheel"], Some("alice"), Some("users"), &nobody), None);
        // A user called "@x" is not a group, and an unnamed user matches no name.
        assert_eq!(m(&["alice"], None, None, &nobody), None);
    }

    #[test]
    fn first_key_of_a_name_counts() {
        let key = "k-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        let other = crate::nix::signing::SecretKey::generate("k-1")
            .unwrap()
            .to_public()
            .to_string();
        let other = other.as_str();
        let info = |keys: &[&str]| TrustInfo {
            trusted_user: false,
            basis: TrustBasis::NotTrusted,
            trusted_public_keys: entries(keys),
            require_sigs: true,
        };
        let k: PublicKey = key.parse().unwrap();
        assert!(info(&[key]).trusts_key(&k));
        assert!(
            info(&[
                "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
                key
            ])
            .trusts_key(&k)
        );
        assert!(!info(&[other, key]).trusts_key(&k));
        assert!(!info(&[]).trusts_key(&k));
        assert!(!info(&["garbage", "k-1:bad"]).trusts_key(&k));
    }

    #[test]
    fn looks_up_root() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert!(!group_lists_member("no-such-group-here", "root"));
    }
}
