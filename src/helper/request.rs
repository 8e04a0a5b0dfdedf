//! Checking a request before anything runs: the key against the allowlist,
//! the cache URL and the store paths. Only the values that come out of here
//! ever reach a Nix command line.

use std::{collections::BTreeSet, fmt, num::NonZeroU16};

use super::{HelperError, MAX_PATHS, allowlist::Allowlist, allowlist::parse_exact_key};
use crate::{
    nix::{
        signing::PublicKey,
        store_path::{StorePath, StorePathError},
    },
    proto::ImportRequest,
};

/// An import that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidImport {
    /// The allowlisted key, the only one Nix will trust for this copy.
    pub key: PublicKey,
    /// Where to copy from.
    pub url: LoopbackUrl,
    /// What to copy, without repeats, in the order asked.
    pub paths: Vec<StorePath>,
}

impl ValidImport {
    /// Checks `request` against `allowlist`: paths and URL first, so a
    /// malformed request is reported as such whatever its key.
    pub fn check(request: &ImportRequest, allowlist: &Allowlist) -> Result<Self, HelperError> {
        let paths = store_paths(&request.store_paths)?;
        let url = request.cache_url.parse()?;
        let key = allowlisted_key(&request.builder_public_key, allowlist)?;
        Ok(Self { key, url, paths })
    }
}

/// A well-formed key, written exactly as Nix writes it.
pub fn exact_key(text: &str) -> Result<PublicKey, HelperError> {
    parse_exact_key(text).map_err(|reason| HelperError::InvalidKey {
        key: text.to_owned(),
        reason,
    })
}

/// A well-formed key that is on the allowlist.
pub fn allowlisted_key(text: &str, allowlist: &Allowlist) -> Result<PublicKey, HelperError> {
    let key = exact_key(text)?;
    if allowlist.contains(&key) {
        Ok(key)
    } else {
        Err(HelperError::KeyNotAllowed(key.to_string()))
    }
}

/// Store paths written exactly as Nix writes them, at most [`MAX_PATHS`],
/// repeats dropped.
pub fn store_paths(texts: &[String]) -> Result<Vec<StorePath>, HelperError> {
    if texts.is_empty() {
        return Err(HelperError::NoPaths);
    }
    if texts.len() > MAX_PATHS {
        return Err(HelperError::TooManyPaths(texts.len()));
    }
    let mut seen = BTreeSet::new();
    let mut paths = Vec::with_capacity(texts.len());
    for text in texts {
        let path = exact_store_path(text)?;
        if seen.insert(path.clone()) {
            paths.push(path);
        }
    }
    Ok(paths)
}

fn exact_store_path(text: &str) -> Result<StorePath, HelperError> {
    let invalid = |reason: &str| HelperError::InvalidPath {
        path: text.to_owned(),
        reason: reason.to_owned(),
    };
    // Parsing is strict, and the path must also print back as given, so no
    // other spelling of a store path (or of something else) gets through.
    let path: StorePath = text.parse().map_err(|err| {
        invalid(match err {
            StorePathError::NotInStore(_) => "not in /nix/store",
            StorePathError::NotDirectChild(_) => "not a direct child of /nix/store",
            StorePathError::Name { reason, .. } => reason,
            _ => "not /nix/store/ followed by a 32-character nix-base32 hash, '-' and a name",
        })
    })?;
    if path.to_string() != text {
        return Err(invalid("not written as Nix writes store paths"));
    }
    Ok(path)
}

/// A loopback HTTP binary cache: `http://127.0.0.1:PORT` or
/// `http://[::1]:PORT`. Nothing else is accepted, so no store URL parameter
/// (such as `?trusted=1`), user, path or other host can be slipped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackUrl {
    ipv6: bool,
    port: NonZeroU16,
}

impl LoopbackUrl {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// The address to connect to.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let ip: std::net::IpAddr = if self.ipv6 {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        (ip, self.port.get()).into()
    }
}

impl std::str::FromStr for LoopbackUrl {
    type Err = HelperError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || HelperError::InvalidUrl(s.to_owned());
        let rest = s.strip_prefix("http://").ok_or_else(invalid)?;
        let (ipv6, port) = if let Some(port) = rest.strip_prefix("127.0.0.1:") {
            (false, port)
        } else if let Some(port) = rest.strip_prefix("[::1]:") {
            (true, port)
        } else {
            return Err(invalid());
        };
        let url = Self {
            ipv6,
            port: port.parse().map_err(|_| invalid())?,
        };
        // Rejects `+80`, `080` and the like, which parse but are not the
        // plain form.
        if url.to_string() != s {
            return Err(invalid());
        }
        Ok(url)
    }
}

impl fmt::Display for LoopbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ipv6 {
            write!(f, "http://[::1]:{}", self.port)
        } else {
            write!(f, "http://127.0.0.1:{}", self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::nix::signing::SecretKey;

    const PATH: &str = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello-2.12";

    #[test]
    fn loopback_urls() {
        for good in [
            "http://127.0.0.1:1",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:65535",
            "http://[::1]:443",
        ] {
            let url: LoopbackUrl = good.parse().unwrap();
            assert_eq!(url.to_string(), good);
        }
        for bad in [
            "",
            "http://127.0.0.1",
            "http://127.0.0.1:",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:+1",
            "http://127.0.0.1:01",
            "http://127.0.0.1: 1",
            "http://127.0.0.1:1 ",
            " http://127.0.0.1:1",
            "http://127.0.0.1:1/",
            "http://127.0.0.1:1/x",
            "http://127.0.0.1:1?trusted=1",
            "http://127.0.0.1:1#x",
            "http://127.0.0.1:1@x",
            "http://x@127.0.0.1:1",
            "http://127.0.0.1.evil:1",
            "http://127.0.0.2:1",
            "http://127.1:1",
            "http://2130706433:1",
            "http://localhost:1",
            "http://[::1]",
            "http://[::ffff:127.0.0.1]:1",
            "http://[0:0:0:0:0:0:0:1]:1",
            "HTTP://127.0.0.1:1",
            "https://127.0.0.1:1",
            "file:///tmp",
            "daemon",
            "local?root=/tmp/x",
            "ssh-ng://127.0.0.1:1",
            "--option",
            "-v",
        ] {
            assert!(
                matches!(bad.parse::<LoopbackUrl>(), Err(HelperError::InvalidUrl(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn exact_store_paths_only() {
        let paths = store_paths(&[PATH.to_owned(), PATH.to_owned()]).unwrap();
        assert_eq!(paths.len(), 1);
        for bad in [
            format!("{PATH}/"),
            format!("{PATH}/bin"),
            format!("{PATH}/.."),
            format!("/nix/store/../store/{}", &PATH[11..]),
            format!("/nix//store/{}", &PATH[11..]),
            format!("/nix/store//{}", &PATH[11..]),
            format!("/nix/store/./{}", &PATH[11..]),
            format!("//nix/store/{}", &PATH[11..]),
            format!(" {PATH}"),
            format!("{PATH}\n"),
            format!("{PATH} --option"),
            PATH[11..].to_owned(),
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-".to_owned(),
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-..".to_owned(),
            "/nix/store/I9PMRZMPSHAPIJ2KIN22PFF6FC2ADAVX-x".to_owned(),
            "/nix/store/e9pmrzmpshapij2kin22pff6fc2adavx-x".to_owned(),
            "/nix/store".to_owned(),
            "/nix/var/nix/profiles/default".to_owned(),
            "/run/current-system".to_owned(),
            "--option".to_owned(),
            "-v".to_owned(),
            "".to_owned(),
        ] {
            assert!(
                matches!(
                    store_paths(std::slice::from_ref(&bad)),
                    Err(HelperError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(store_paths(&[]), Err(HelperError::NoPaths)));
        let many = vec![PATH.to_owned(); MAX_PATHS + 1];
        assert!(matches!(
            store_paths(&many),
            Err(HelperError::TooManyPaths(_))
        ));
        assert_eq!(store_paths(&many[1..]).unwrap().len(), 1);
    }

    #[test]
    fn keys_must_be_allowlisted_exactly() {
        let key = SecretKey::generate("builder-1").unwrap().to_public();
        let same_name = SecretKey::generate("builder-1").unwrap().to_public();
        let list = Allowlist::parse(&format!("{key}\n"), Path::new("keys")).unwrap();
        assert_eq!(allowlisted_key(&key.to_string(), &list).unwrap(), key);
        assert!(matches!(
            allowlisted_key(&same_name.to_string(), &list),
            Err(HelperError::KeyNotAllowed(_))
        ));
        let bytes = key.to_string().split_once(':').unwrap().1.to_owned();
        assert!(matches!(
            allowlisted_key(&format!("builder-2:{bytes}"), &list),
            Err(HelperError::KeyNotAllowed(_))
        ));
        for bad in [
            "--option".to_owned(),
            "-v".to_owned(),
            format!("-v:{bytes}"),
            format!("{key} "),
            format!("{key}\n--option"),
            "builder-1:AAAA".to_owned(),
        ] {
            assert!(
                matches!(
                    allowlisted_key(&bad, &list),
                    Err(HelperError::InvalidKey { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn checks_the_whole_request() {
        let key = SecretKey::generate("builder-1").unwrap().to_public();
        let list = Allowlist::parse(&format!("{key}\n"), Path::new("keys")).unwrap();
        let request = ImportRequest {
            builder_public_key: key.to_string(),
            cache_url: "http://[::1]:5000".into(),
            store_paths: vec![PATH.into()],
        };
        let valid = ValidImport::check(&request, &list).unwrap();
        assert_eq!(valid.key, key);
        assert_eq!(valid.url.port(), 5000);
        assert_eq!(valid.paths[0].to_string(), PATH);
        let refused = |request: ImportRequest| ValidImport::check(&request, &list).unwrap_err();
        assert!(matches!(
            refused(ImportRequest {
                cache_url: "http://127.0.0.1:1@x".into(),
                ..request.clone()
            }),
            HelperError::InvalidUrl(_)
        ));
        assert!(matches!(
            refused(ImportRequest {
                store_paths: vec![],
                ..request.clone()
            }),
            HelperError::NoPaths
        ));
        assert!(matches!(
            refused(ImportRequest {
                builder_public_key: "-v".into(),
                ..request
            }),
            HelperError::InvalidKey { .. }
        ));
    }
}
