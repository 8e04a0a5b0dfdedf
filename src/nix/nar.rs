//! NAR (Nix ARchive) streams: hashing them and checking that they are well formed, in constant memory.
//!
//! A NAR is a sequence of strings, each an 8-byte little-endian length, the bytes, and zero padding to a
//! multiple of 8. After the magic `nix-archive-1` comes one node:
//!
//! ```text
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
//!                    | "symlink" "target" <target>
//!                    | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"
//! ```
//!
//! Nix only ever writes one NAR per tree (entries sorted, no optional parts reordered), so
//! [`NarValidator`] accepts exactly that form and nothing looser: two NARs of one tree cannot differ, so
//! their hashes cannot either.

use std::io;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::nix::hash::Sha256Hash;

/// The string every NAR starts with.
const MAGIC: &[u8] = b"nix-archive-1";

/// Longest entry name accepted, in bytes. Linux allows 255; macOS counts 255 UTF-16 units, which can
/// take up to 765 bytes of UTF-8. Anything past this is not a real file name.
pub const MAX_NAME_LEN: usize = 1024;

/// Longest symlink target accepted, in bytes: Linux's `PATH_MAX`.
pub const MAX_TARGET_LEN: usize = 4096;

/// Deepest directory nesting accepted. The validator keeps one entry name per open directory, so this
/// with [`MAX_NAME_LEN`] bounds its memory (about 1 MiB at worst).
pub const MAX_DEPTH: usize = 1024;

/// Longest keyword of the format (`nix-archive-1`), rounded up; keyword positions allow no more.
const MAX_KEYWORD_LEN: usize = 16;

/// Why a byte stream is not a well-formed NAR. Offsets count bytes from the start of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NarError {
    /// The stream does not start with `nix-archive-1`.
    #[error("not a nar: the stream starts with {found:?} instead of \"nix-archive-1\"")]
    BadMagic {
        /// What the first string was (lossily decoded, shortened).
        found: String,
    },
    /// A string other than the one the format requires at this point.
    #[error("nar at offset {offset}: expected {expected}, found {found:?}")]
    Unexpected {
        /// Where the string starts.
        offset: u64,
        /// What the format requires here.
        expected: &'static str,
        /// What the string was (lossily decoded, shortened).
        found: String,
    },
    /// A string is longer than anything allowed at its position.
    #[error("nar at offset {offset}: a string of {len} bytes where at most {max} are allowed")]
    TooLong {
        /// Where the string starts.
        offset: u64,
        /// Its announced length.
        len: u64,
        /// The limit at this position.
        max: usize,
    },
    /// Padding after a string or file contents is not all zero.
    #[error("nar at offset {offset}: non-zero padding byte")]
    NonZeroPadding {
        /// Where the bad byte is.
        offset: u64,
    },
    /// A directory entry name is empty, `.`, `..`, or holds `/` or NUL.
    #[error("nar at offset {offset}: invalid entry name {name:?}")]
    InvalidName {
        /// Where the name starts.
        offset: u64,
        /// The name (lossily decoded).
        name: String,
    },
    /// A directory entry does not sort strictly after the one before it.
    #[error("nar at offset {offset}: entry {name:?} does not sort after {previous:?}")]
    Unsorted {
        /// Where the name starts.
        offset: u64,
        /// The entry name (lossily decoded).
        name: String,
        /// The name of the entry before it (lossily decoded).
        previous: String,
    },
    /// A symlink target is empty or holds NUL.
    #[error("nar at offset {offset}: invalid symlink target {target:?}")]
    InvalidTarget {
        /// Where the target starts.
        offset: u64,
        /// The target (lossily decoded).
        target: String,
    },
    /// Directories are nested deeper than [`MAX_DEPTH`].
    #[error("nar at offset {offset}: directories nested deeper than {MAX_DEPTH}")]
    TooDeep {
        /// Where the too-deep directory starts.
        offset: u64,
    },
    /// Bytes follow the end of the archive.
    #[error("nar at offset {offset}: data after the end of the archive")]
    TrailingData {
        /// Where the extra bytes start.
        offset: u64,
    },
    /// The stream ended before the archive did.
    #[error("nar truncated after {offset} bytes")]
    Truncated {
        /// How many bytes came.
        offset: u64,
    },
}

/// Computes a NAR's SHA-256 and size while it is written through, as narinfo `NarHash`/`NarSize` need.
#[derive(Debug, Clone, Default)]
pub struct NarHasher {
    sha256: Sha256,
    size: u64,
}

impl NarHasher {
    /// Starts with an empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hash and byte count of everything written so far.
    pub fn finish(self) -> (Sha256Hash, u64) {
        (
            Sha256Hash::from_bytes(self.sha256.finalize().into()),
            self.size,
        )
    }
}

impl io::Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sha256.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the format requires as the next string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    TypeKey,
    TypeValue,
    /// `executable` or `contents`.
    RegularField,
    /// The empty string after `executable`.
    ExecutableValue,
    ContentsKey,
    TargetKey,
    Target,
    NodeClose,
    /// `entry` or the `)` closing the directory.
    EntryOrClose,
    EntryOpen,
    NameKey,
    Name,
    NodeKey,
    EntryClose,
}

impl Expect {
    /// How long the string at this position may be.
    fn max_len(self) -> usize {
        match self {
            Self::Name => MAX_NAME_LEN,
            Self::Target => MAX_TARGET_LEN,
            _ => MAX_KEYWORD_LEN,
        }
    }
}

/// Where the byte-level reader is.
#[derive(Debug, Clone, Copy)]
enum Lex {
    /// Reading an 8-byte length: of a string, or of file contents if `contents`.
    Len {
        buf: [u8; 8],
        have: usize,
        contents: bool,
    },
    /// Reading a string's bytes into the token buffer.
    Bytes { len: usize },
    /// Skipping file contents, which are never buffered.
    Contents { remaining: u64, len: u64 },
    /// Checking zero padding; afterwards the token buffer is handed on unless it ends file contents.
    Padding {
        remaining: usize,
        after_contents: bool,
    },
    /// The archive is complete.
    Done,
}

impl Lex {
    const STRING_LEN: Self = Self::Len {
        buf: [0; 8],
        have: 0,
        contents: false,
    };
}

/// Checks that a byte stream is a well-formed NAR, fed in chunks of any size.
///
/// Memory stays bounded whatever the input: file contents are skipped, not kept, and names and targets
/// are capped ([`MAX_NAME_LEN`], [`MAX_TARGET_LEN`], [`MAX_DEPTH`]). After the first error every call
/// returns that error again.
#[derive(Debug)]
pub struct NarValidator {
    lex: Lex,
    expect: Expect,
    /// The last entry name of each open directory, innermost last; `None` before the first entry.
    dirs: Vec<Option<Vec<u8>>>,
    /// The string being read.
    token: Vec<u8>,
    /// Where the string being read starts.
    token_offset: u64,
    /// Bytes consumed so far.
    offset: u64,
    /// Whether the root node is a regular file, so the archive is a single file.
    single_file: bool,
    failed: Option<NarError>,
}

impl Default for NarValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl NarValidator {
    /// Expects the start of a NAR.
    pub fn new() -> Self {
        Self {
            lex: Lex::STRING_LEN,
            expect: Expect::Magic,
            dirs: Vec::new(),
            token: Vec::new(),
            token_offset: 0,
            offset: 0,
            single_file: false,
            failed: None,
        }
    }

    /// Checks the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        self.push_file_contents(chunk, |_| {})
    }

    /// Checks the next chunk of the stream like [`Self::push`], and hands `contents` each piece of
    /// the file's contents as it passes if the archive is a single regular file (as a `.drv` file's
    /// NAR is). That is what a text content address hashes, seen without being kept.
    pub fn push_file_contents(
        &mut self,
        chunk: &[u8],
        mut contents: impl FnMut(&[u8]),
    ) -> Result<(), NarError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.consume(chunk, &mut contents);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    /// Whether the archive read so far is a single regular file.
    pub fn is_single_file(&self) -> bool {
        self.single_file
    }

    /// Checks that the stream ended exactly where the archive does, and returns its size in bytes.
    pub fn finish(self) -> Result<u64, NarError> {
        match (self.failed, self.lex) {
            (Some(err), _) => Err(err),
            (None, Lex::Done) => Ok(self.offset),
            (None, _) => Err(NarError::Truncated {
                offset: self.offset,
            }),
        }
    }

    fn consume(
        &mut self,
        mut data: &[u8],
        contents: &mut impl FnMut(&[u8]),
    ) -> Result<(), NarError> {
        while !data.is_empty() {
            match self.lex {
                Lex::Done => {
                    return Err(NarError::TrailingData {
                        offset: self.offset,
                    });
                }
                Lex::Len {
                    mut buf,
                    have,
                    contents,
                } => {
                    let n = (8 - have).min(data.len());
                    buf[have..have + n].copy_from_slice(&data[..n]);
                    self.advance(&mut data, n);
                    if have + n == 8 {
                        self.on_len(u64::from_le_bytes(buf), contents)?;
                    } else {
                        self.lex = Lex::Len {
                            buf,
                            have: have + n,
                            contents,
                        };
                    }
                }
                Lex::Bytes { len } => {
                    let n = (len - self.token.len()).min(data.len());
                    self.token.extend_from_slice(&data[..n]);
                    self.advance(&mut data, n);
                    if self.token.len() == len {
                        self.start_padding(len as u64, false)?;
                    }
                }
                Lex::Contents { remaining, len } => {
                    let n = usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()));
                    // Only the root can be a file outside any directory.
                    if self.dirs.is_empty() {
                        contents(&data[..n]);
                    }
                    self.advance(&mut data, n);
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        self.start_padding(len, true)?;
                    } else {
                        self.lex = Lex::Contents { remaining, len };
                    }
                }
                Lex::Padding {
                    remaining,
                    after_contents,
                } => {
                    let n = remaining.min(data.len());
                    if let Some(bad) = data[..n].iter().position(|&b| b != 0) {
                        return Err(NarError::NonZeroPadding {
                            offset: self.offset + bad as u64,
                        });
                    }
                    self.advance(&mut data, n);
                    if n == remaining {
                        self.end_of_item(after_contents)?;
                    } else {
                        self.lex = Lex::Padding {
                            remaining: remaining - n,
                            after_contents,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts `n` bytes as read and drops them from `data`.
    fn advance(&mut self, data: &mut &[u8], n: usize) {
        self.offset += n as u64;
        *data = &data[n..];
    }

    fn on_len(&mut self, len: u64, contents: bool) -> Result<(), NarError> {
        if contents {
            self.lex = Lex::Contents {
                remaining: len,
                len,
            };
            if len == 0 {
                self.start_padding(0, true)?;
            }
            return Ok(());
        }
        let max = self.expect.max_len();
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(NarError::TooLong {
                offset: self.token_offset,
                len,
                max,
            })?;
        self.token.clear();
        self.lex = Lex::Bytes { len };
        if len == 0 {
            self.start_padding(0, false)?;
        }
        Ok(())
    }

    fn start_padding(&mut self, len: u64, after_contents: bool) -> Result<(), NarError> {
        // `len % 8` is below 8, so the cast cannot truncate.
        let remaining = ((8 - len % 8) % 8) as usize;
        if remaining == 0 {
            return self.end_of_item(after_contents);
        }
        self.lex = Lex::Padding {
            remaining,
            after_contents,
        };
        Ok(())
    }

    /// A string or file contents, with padding, is complete; move on to what follows.
    fn end_of_item(&mut self, after_contents: bool) -> Result<(), NarError> {
        self.lex = Lex::STRING_LEN;
        if !after_contents {
            self.on_token()?;
        }
        self.token_offset = self.offset;
        Ok(())
    }

    /// Steps the grammar with the string just read.
    fn on_token(&mut self) -> Result<(), NarError> {
        let token = std::mem::take(&mut self.token);
        let result = self.step(&token);
        // Keep the buffer's allocation for the next string.
        self.token = token;
        result
    }

    fn step(&mut self, token: &[u8]) -> Result<(), NarError> {
        let offset = self.token_offset;
        let unexpected = |expected| NarError::Unexpected {
            offset,
            expected,
            found: shorten(token),
        };
        let require = |keyword: &[u8], expected| {
            if token == keyword {
                Ok(())
            } else {
                Err(unexpected(expected))
            }
        };
        self.expect = match self.expect {
            Expect::Magic => {
                if token != MAGIC {
                    return Err(NarError::BadMagic {
                        found: shorten(token),
                    });
                }
                Expect::NodeOpen
            }
            Expect::NodeOpen => {
                require(b"(", "\"(\"")?;
                Expect::TypeKey
            }
            Expect::TypeKey => {
                require(b"type", "\"type\"")?;
                Expect::TypeValue
            }
            Expect::TypeValue => match token {
                b"regular" => {
                    self.single_file = self.dirs.is_empty();
                    Expect::RegularField
                }
                b"symlink" => Expect::TargetKey,
                b"directory" => {
                    if self.dirs.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep { offset });
                    }
                    self.dirs.push(None);
                    Expect::EntryOrClose
                }
                _ => return Err(unexpected("\"regular\", \"symlink\" or \"directory\"")),
            },
            Expect::RegularField => match token {
                b"executable" => Expect::ExecutableValue,
                b"contents" => self.start_contents(),
                _ => return Err(unexpected("\"executable\" or \"contents\"")),
            },
            Expect::ExecutableValue => {
                require(b"", "an empty string after \"executable\"")?;
                Expect::ContentsKey
            }
            Expect::ContentsKey => {
                require(b"contents", "\"contents\"")?;
                self.start_contents()
            }
            Expect::TargetKey => {
                require(b"target", "\"target\"")?;
                Expect::Target
            }
            Expect::Target => {
                if token.is_empty() || token.contains(&0) {
                    return Err(NarError::InvalidTarget {
                        offset,
                        target: String::from_utf8_lossy(token).into_owned(),
                    });
                }
                Expect::NodeClose
            }
            Expect::NodeClose => {
                require(b")", "\")\"")?;
                self.node_done()
            }
            Expect::EntryOrClose => match token {
                b"entry" => Expect::EntryOpen,
                b")" => {
                    self.dirs.pop();
                    self.node_done()
                }
                _ => return Err(unexpected("\"entry\" or \")\"")),
            },
            Expect::EntryOpen => {
                require(b"(", "\"(\"")?;
                Expect::NameKey
            }
            Expect::NameKey => {
                require(b"name", "\"name\"")?;
                Expect::Name
            }
            Expect::Name => {
                self.check_entry_name(token, offset)?;
                Expect::NodeKey
            }
            Expect::NodeKey => {
                require(b"node", "\"node\"")?;
                Expect::NodeOpen
            }
            Expect::EntryClose => {
                require(b")", "\")\"")?;
                Expect::EntryOrClose
            }
        };
        Ok(())
    }

    /// After `contents`, the next 8 bytes are the contents length rather than a string.
    fn start_contents(&mut self) -> Expect {
        self.lex = Lex::Len {
            buf: [0; 8],
            have: 0,
            contents: true,
        };
        Expect::NodeClose
    }

    /// A node's closing `)` was read: the archive ends, or the enclosing entry must close.
    fn node_done(&mut self) -> Expect {
        if self.dirs.is_empty() {
            self.lex = Lex::Done;
        }
        Expect::EntryClose
    }

    fn check_entry_name(&mut self, name: &[u8], offset: u64) -> Result<(), NarError> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(NarError::InvalidName {
                offset,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        // `step` pushed a frame when it saw `directory`, and entries only occur inside one.
        let Some(previous) = self.dirs.last_mut() else {
            return Err(NarError::Unexpected {
                offset,
                expected: "no entry outside a directory",
                found: shorten(name),
            });
        };
        if let Some(prev) = previous.as_deref()
            && name <= prev
        {
            return Err(NarError::Unsorted {
                offset,
                name: String::from_utf8_lossy(name).into_owned(),
                previous: String::from_utf8_lossy(prev).into_owned(),
            });
        }
        let buf = previous.get_or_insert_with(Vec::new);
        buf.clear();
        buf.extend_from_slice(name);
        Ok(())
    }
}

/// A string from the stream for an error message, cut short so a hostile NAR cannot bloat it.
fn shorten(token: &[u8]) -> String {
    let text = String::from_utf8_lossy(&token[..token.len().min(64)]);
    if token.len() > 64 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::tests::Rng;
    use std::collections::BTreeSet;
    use std::io::Write as _;
    use std::path::Path;
    use std::process::Command;

    /// NARs written by `nix-store --dump` (Nix 2.8); see tests/data/nix/README.md.
    const TREE_NAR: &[u8] = include_bytes!("../../tests/data/nix/tree.nar");
    const D_NAR: &[u8] = include_bytes!("../../tests/data/nix/d.nar");
    const HELLO_NAR: &[u8] = include_bytes!("../../tests/data/nix/hello.txt.nar");
    const SYMLINK_NAR: &[u8] = include_bytes!("../../tests/data/nix/symlink.nar");

    /// Chunk sizes that split lengths, strings and padding at every kind of boundary.
    const CHUNK_SIZES: &[usize] = &[1, 3, 7, 8, 9, 64, 4096, usize::MAX];

    fn validate_in_chunks(nar: &[u8], chunk: usize) -> Result<u64, NarError> {
        let mut v = NarValidator::new();
        for piece in nar.chunks(chunk.min(nar.len().max(1))) {
            v.push(piece)?;
        }
        v.finish()
    }

    fn validate(nar: &[u8]) -> Result<u64, NarError> {
        let mut first = None;
        for &chunk in CHUNK_SIZES {
            let result = validate_in_chunks(nar, chunk);
            match &first {
                None => first = Some(result),
                Some(f) => assert_eq!(&result, f, "chunk size {chunk} disagrees"),
            }
        }
        first.unwrap()
    }

    /// Writes NARs by hand, to build the corrupt ones Nix never would.
    #[derive(Default)]
    struct NarBuilder(Vec<u8>);

    impl NarBuilder {
        fn s(mut self, bytes: &[u8]) -> Self {
            self.0
                .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            self.0.extend_from_slice(bytes);
            self.0.resize(self.0.len().next_multiple_of(8), 0);
            self
        }
        fn strs(self, items: &[&str]) -> Self {
            items.iter().fold(self, |b, s| b.s(s.as_bytes()))
        }
        fn file(self, contents: &[u8]) -> Self {
            self.strs(&["(", "type", "regular", "contents"])
                .s(contents)
                .strs(&[")"])
        }
        fn entry(self, name: &str) -> Self {
            self.strs(&["entry", "(", "name", name, "node"])
        }
        fn start() -> Self {
            Self::default().strs(&["nix-archive-1"])
        }
    }

    fn dir_of(names: &[&str]) -> Vec<u8> {
        let mut b = NarBuilder::start().strs(&["(", "type", "directory"]);
        for name in names {
            b = b.entry(name).file(b"x").strs(&[")"]);
        }
        b.strs(&[")"]).0
    }

    #[test]
    fn accepts_nars_written_by_nix() {
        for nar in [TREE_NAR, D_NAR, HELLO_NAR, SYMLINK_NAR] {
            assert_eq!(validate(nar), Ok(nar.len() as u64));
        }
    }

    #[test]
    fn hashes_like_nix() {
        // `nix path-info --json` of the store path made from tests/data/nix/d: narHash and narSize.
        let mut h = NarHasher::new();
        for piece in D_NAR.chunks(5) {
            h.write_all(piece).unwrap();
        }
        let (hash, size) = h.finish();
        assert_eq!(
            hash.to_sri(),
            "sha256-WtLs+C7M2xlV9RjpB4fIRItR5PEWPEFNpSkc/Ay8FTo="
        );
        assert_eq!(size, 840);
        // `nix-hash --type sha256 --base32` of the tree the fixture was dumped from.
        let mut h = NarHasher::new();
        h.write_all(TREE_NAR).unwrap();
        assert_eq!(
            h.finish().0.to_nix_base32(),
            "1823zz8a7g1j4wy2h1c26cxa86gb1zx3ir4r1f68nxws65wm7bqb"
        );
    }

    #[test]
    fn accepts_hand_written_boundary_cases() {
        for size in [0usize, 1, 7, 8, 9, 16, 17] {
            let nar = NarBuilder::start().file(&vec![0xffu8; size]).0;
            assert_eq!(validate(&nar), Ok(nar.len() as u64), "size {size}");
        }
        let exe = NarBuilder::start()
            .strs(&["(", "type", "regular", "executable", "", "contents"])
            .s(b"#!")
            .strs(&[")"])
            .0;
        assert!(validate(&exe).is_ok());
        let empty_dir = NarBuilder::start().strs(&["(", "type", "directory", ")"]).0;
        assert!(validate(&empty_dir).is_ok());
        assert!(validate(&dir_of(&["A", "B", "a", "b", "ba"])).is_ok());
    }

    #[test]
    fn rejects_bad_magic() {
        let nar = NarBuilder::default().strs(&["nix-archive-2", "("]).0;
        assert!(matches!(validate(&nar), Err(NarError::BadMagic { .. })));
        assert!(matches!(
            validate(b"not a nar at all"),
            Err(NarError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_non_zero_padding() {
        let mut nar = HELLO_NAR.to_vec();
        // The magic's length is 13, so bytes 8+13..24 are its padding.
        nar[8 + 13] = 1;
        assert_eq!(validate(&nar), Err(NarError::NonZeroPadding { offset: 21 }));
        // Padding after the file contents ("hello\n", 6 bytes).
        let mut nar = NarBuilder::start().file(b"hello\n").0;
        let pos = nar.len() - 16 - 1;
        nar[pos] = 7;
        assert_eq!(
            validate(&nar),
            Err(NarError::NonZeroPadding { offset: pos as u64 })
        );
    }

    #[test]
    fn rejects_unsorted_and_duplicate_entries() {
        for names in [&["b", "a"][..], &["a", "a"], &["a", "B"], &["ab", "a"]] {
            assert!(
                matches!(validate(&dir_of(names)), Err(NarError::Unsorted { .. })),
                "{names:?}"
            );
        }
    }

    #[test]
    fn rejects_invalid_names() {
        for name in ["", ".", "..", "a/b", "/", "a\0"] {
            assert!(
                matches!(
                    validate(&dir_of(&[name])),
                    Err(NarError::InvalidName { .. })
                ),
                "{name:?}"
            );
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            validate(&dir_of(&[&long])),
            Err(NarError::TooLong {
                max: MAX_NAME_LEN,
                ..
            })
        ));
        assert!(validate(&dir_of(&[&long[1..]])).is_ok());
    }

    #[test]
    fn rejects_bad_symlinks() {
        let link = |target: &[u8]| {
            NarBuilder::start()
                .strs(&["(", "type", "symlink", "target"])
                .s(target)
                .strs(&[")"])
                .0
        };
        assert!(validate(&link(b"../x")).is_ok());
        assert!(matches!(
            validate(&link(b"")),
            Err(NarError::InvalidTarget { .. })
        ));
        assert!(matches!(
            validate(&link(b"a\0b")),
            Err(NarError::InvalidTarget { .. })
        ));
        assert!(matches!(
            validate(&link(&[b'a'; MAX_TARGET_LEN + 1])),
            Err(NarError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_truncation_anywhere() {
        for cut in 0..TREE_NAR.len() {
            let result = validate_in_chunks(&TREE_NAR[..cut], 7);
            assert!(
                matches!(result, Err(NarError::Truncated { offset }) if offset == cut as u64),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn rejects_trailing_data() {
        let mut nar = HELLO_NAR.to_vec();
        nar.extend_from_slice(&[0; 8]);
        assert_eq!(
            validate(&nar),
            Err(NarError::TrailingData {
                offset: HELLO_NAR.len() as u64
            })
        );
    }

    #[test]
    fn rejects_misplaced_keywords() {
        let cases = [
            NarBuilder::start().strs(&["(", "type", "fifo", ")"]),
            NarBuilder::start().strs(&["(", "kind", "regular"]),
            NarBuilder::start().strs(&["(", "type", "regular", "executable", "x", "contents"]),
            // `executable` after the contents is a form Nix never writes.
            NarBuilder::start().strs(&[
                "(",
                "type",
                "regular",
                "contents",
                "",
                "executable",
                "",
                ")",
            ]),
            NarBuilder::start().strs(&[
                "(",
                "type",
                "directory",
                "entry",
                "(",
                "name",
                "a",
                "node",
                "(",
                "type",
                "directory",
                ")",
                "x",
            ]),
            NarBuilder::start().strs(&[")"]),
        ];
        for b in cases {
            assert!(
                matches!(validate(&b.0), Err(NarError::Unexpected { .. })),
                "{:?}",
                validate(&b.0)
            );
        }
    }

    #[test]
    fn caps_nesting_depth() {
        let nested = |depth: usize| {
            let mut b = NarBuilder::start().strs(&["(", "type", "directory"]);
            for _ in 1..depth {
                b = b.entry("d").strs(&["(", "type", "directory"]);
            }
            for _ in 1..depth {
                b = b.strs(&[")", ")"]);
            }
            b.strs(&[")"]).0
        };
        assert!(validate(&nested(MAX_DEPTH)).is_ok());
        assert!(matches!(
            validate(&nested(MAX_DEPTH + 1)),
            Err(NarError::TooDeep { .. })
        ));
    }

    #[test]
    fn stays_failed_after_an_error() {
        let mut v = NarValidator::new();
        let err = v.push(b"\x01\0\0\0\0\0\0\0x\x01").unwrap_err();
        assert_eq!(v.push(&HELLO_NAR[..8]), Err(err.clone()));
        assert_eq!(v.finish(), Err(err));
    }

    #[test]
    fn skips_huge_contents_without_buffering() {
        // 8 GiB of announced contents, fed as the same zero buffer again and again.
        let size: u64 = 8 << 30;
        let mut v = NarValidator::new();
        v.push(
            &NarBuilder::start()
                .strs(&["(", "type", "regular", "contents"])
                .0,
        )
        .unwrap();
        v.push(&size.to_le_bytes()).unwrap();
        let block = vec![0u8; 1 << 20];
        for _ in 0..size / block.len() as u64 {
            v.push(&block).unwrap();
        }
        v.push(&NarBuilder::default().strs(&[")"]).0).unwrap();
        // Magic 24, four keywords 64, the length 8, the contents, the closing ")" 16.
        assert_eq!(v.finish(), Ok(24 + 64 + 8 + size + 16));
    }

    /// Appends a random node: a file, a symlink, or (above `depth` 0) a directory of sorted
    /// entries, as Nix would write them.
    fn random_node(b: NarBuilder, rng: &mut Rng, depth: usize) -> NarBuilder {
        match rng.below(if depth == 0 { 2 } else { 3 }) {
            0 => {
                let contents: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
                let b = b.strs(&["(", "type", "regular"]);
                let b = if rng.below(2) == 0 {
                    b.strs(&["executable", ""])
                } else {
                    b
                };
                b.strs(&["contents"]).s(&contents).strs(&[")"])
            }
            1 => b
                .strs(&["(", "type", "symlink", "target"])
                .s(rng.text(b"./ab-\x7f", 30).as_bytes())
                .strs(&[")"]),
            _ => {
                let names: BTreeSet<String> = (0..rng.below(5))
                    .map(|_| rng.text(b"aB.-_ \xff", 6))
                    .collect();
                let mut b = b.strs(&["(", "type", "directory"]);
                for name in &names {
                    b = random_node(b.entry(name), rng, depth - 1).strs(&[")"]);
                }
                b.strs(&[")"])
            }
        }
    }

    #[test]
    fn generated_nars_validate_in_any_chunking() {
        let mut rng = Rng::new(0x6e6172);
        for _ in 0..2_000 {
            let nar = random_node(NarBuilder::start(), &mut rng, 3).0;
            let mut validator = NarValidator::new();
            let mut rest = &nar[..];
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at((1 + rng.below(32)).min(rest.len()));
                validator.push(chunk).unwrap();
                rest = tail;
            }
            assert_eq!(validator.finish(), Ok(nar.len() as u64));
            assert_eq!(validate(&nar), Ok(nar.len() as u64));
        }
    }

    /// Runs `nix-store --dump` on `path`, or returns `None` when Nix is not installed.
    fn nix_dump(path: &Path) -> Option<Vec<u8>> {
        let out = match Command::new("nix-store").arg("--dump").arg(path).output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::two_stores::skip("nix-store is not on PATH");
                return None;
            }
            Err(e) => panic!("nix-store --dump: {e}"),
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out.stdout)
    }

    #[test]
    fn accepts_fresh_nix_dumps_of_many_shapes() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
        std::fs::create_dir(root.join("empty-dir")).unwrap();
        for size in [0usize, 1, 7, 8, 9, 1 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            std::fs::write(root.join(format!("file-{size}")), data).unwrap();
        }
        let exe = root.join("nested/run");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink("../file-1", root.join("nested/link")).unwrap();
        symlink("/nowhere", root.join("nested/deeper/dangling")).unwrap();
        std::fs::write(root.join("nested/deeper/deepest/Z"), "z").unwrap();
        std::fs::write(root.join("nested/deeper/deepest/a"), "a").unwrap();

        let mut paths = vec![
            root.clone(),
            root.join("file-0"),
            exe,
            root.join("nested/link"),
        ];
        paths.push(root.join("empty-dir"));
        for path in paths {
            let Some(nar) = nix_dump(&path) else { return };
            assert_eq!(validate(&nar), Ok(nar.len() as u64), "{}", path.display());
        }
    }

    fn nar_string(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }

    fn file_nar(contents: &[u8]) -> Vec<u8> {
        let mut nar = Vec::new();
        for part in [
            MAGIC,
            b"(",
            b"type",
            b"regular",
            b"contents",
            contents,
            b")",
        ] {
            nar_string(&mut nar, part);
        }
        nar
    }

    /// The file contents `nar` hands out, chunked by `chunk`, if it is a valid single-file NAR.
    fn file_contents(nar: &[u8], chunk: usize) -> Option<Vec<u8>> {
        let mut validator = NarValidator::new();
        let mut contents = Vec::new();
        for piece in nar.chunks(chunk) {
            validator
                .push_file_contents(piece, |part| contents.extend_from_slice(part))
                .unwrap();
        }
        let single = validator.is_single_file();
        validator.finish().unwrap();
        single.then_some(contents)
    }

    #[test]
    fn hands_out_the_file_of_a_single_file_nar_as_it_passes() {
        let hello =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nix/hello.txt"))
                .unwrap();
        for (nar, contents) in [
            (file_nar(b""), &b""[..]),
            (file_nar(b"Derive([])"), b"Derive([])"),
            (file_nar(&[7u8; 9]), &[7u8; 9]),
            (HELLO_NAR.to_vec(), &hello),
        ] {
            for &chunk in CHUNK_SIZES {
                let chunk = chunk.min(nar.len());
                assert_eq!(
                    file_contents(&nar, chunk).as_deref(),
                    Some(contents),
                    "chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn hands_out_nothing_for_other_shapes() {
        // A directory of files, a symlink, an empty directory.
        let empty = NarBuilder::start().strs(&["(", "type", "directory", ")"]).0;
        for nar in [TREE_NAR, D_NAR, SYMLINK_NAR, &empty] {
            let mut validator = NarValidator::new();
            validator
                .push_file_contents(nar, |part| panic!("handed out {} bytes", part.len()))
                .unwrap();
            assert!(!validator.is_single_file());
            validator.finish().unwrap();
        }
    }
}
