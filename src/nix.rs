//! The pure Nix domain: store paths, hashes, NAR streams, narinfo files, signing keys, `.drv`
//! files and machines-file lines, as values that are checked when they are made.
//!
//! Nothing here runs Nix, touches the store, the file system or the network, or is async: every
//! function maps bytes or text to values and back. Code that needs Nix itself calls it elsewhere and
//! hands the results to these types, so each check here can be tested against fixtures alone.

pub mod base32;
pub mod content_address;
pub mod drv;
pub mod hash;
pub mod import_order;
pub mod machines;
pub mod nar;
pub mod narinfo;
pub mod signing;
pub mod store_path;
