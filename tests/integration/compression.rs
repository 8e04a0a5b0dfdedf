//! NAR transfers compressed on the fly (`--compress`): forced on, inputs
//! and outputs cross the QUIC connection in far fewer bytes and the Nix of
//! each side still gets exactly the NARs it would have; left to `auto` on
//! loopback, nothing is compressed. The bytes are counted by QUIC itself:
//! the client logs what its connection moved when it closes.

use std::time::Duration;

use crate::{
    builds::{Pair, salt, stderr, wait_until},
    two_stores::available,
};

/// Bytes of the text the `copy` derivation uploads and gets back: large
/// enough to dwarf everything else that crosses, and compressible as logs
/// or sources are.
const TEXT_BYTES: usize = 12 << 20;

/// Writes the input source `copy` reads.
fn write_text_input(pair: &Pair) -> Vec<u8> {
    let big = pair.world.flake.join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut text = Vec::with_capacity(TEXT_BYTES + 64);
    let mut line = 0u64;
    while text.len() < TEXT_BYTES {
        text.extend_from_slice(
            format!("line {line}: compressible input for drv-thru\n").as_bytes(),
        );
        line += 1;
    }
    text.truncate(TEXT_BYTES);
    std::fs::write(big.join("data.bin"), &text).unwrap();
    text
}

/// UDP payload bytes the client's connection sent and received, from the
/// line it logs (`-v`) as it closes.
fn wire_bytes(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|line| line.contains("connection closing"))
        .unwrap_or_else(|| panic!("the client logged no connection totals:\n{log}"));
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}=")).expect("the field is logged") + name.len() + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    let (sent, received) = (field("sent"), field("received"));
    eprintln!("the client's connection sent {sent} and received {received} bytes");
    (sent, received)
}

/// The NAR hash and size of `path` in the store `store`'s Nix reports.
fn nar_facts(store: &crate::two_stores::Store, path: &str) -> (String, String) {
    let query = |what: &str| store.run_ok("nix-store", &["--query", what, path]);
    (query("--hash"), query("--size"))
}

#[test]
fn forced_compression_moves_few_bytes_and_the_same_nars() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("compress-always"), &[]);
    let text = write_text_input(&pair);
    let output = pair.build(
        "copy",
        &["--ticket", &pair.ticket(&[]), "--compress", "always", "-v"],
    );
    pair.assert_built(&output);
    let log = stderr(&output);
    let (sent, received) = wire_bytes(&log);
    // The text compresses more than tenfold; busybox, the `.drv` files and
    // the calls themselves cost a few MiB more.
    assert!(
        sent < (TEXT_BYTES / 2) as u64 && received < (TEXT_BYTES / 2) as u64,
        "sent {sent}, received {received} for {TEXT_BYTES} bytes each way:\n{log}"
    );

    // Each side's Nix checked and holds the very NARs.
    let copy = pair.out_path("copy");
    assert_eq!(
        std::fs::read(pair.client.dir.join(&copy[5..])).unwrap(),
        text
    );
    assert_eq!(
        nar_facts(&pair.client, &copy),
        nar_facts(&pair.builder_store, &copy)
    );
    let source = pair
        .builder_store
        .entries()
        .into_iter()
        .find(|name| name.ends_with("-big-src"))
        .expect("the input reached the builder");
    let source = format!("/nix/store/{source}");
    assert_eq!(
        nar_facts(&pair.client, &source),
        nar_facts(&pair.builder_store, &source)
    );
    assert!(!pair.data_dir_has_uploads());

    // Kept compressed in the builder's cache, the output is fetched as it
    // is, not compressed a second time.
    wait_until(
        "a compressed entry is kept",
        Duration::from_secs(20),
        || pair.builder.log().contains("cache entry compressed"),
    );
    let second = pair.world.store("client2");
    let again = second
        .command(crate::common::binary())
        .args([
            "build",
            &pair.world.installable("copy"),
            "--no-nom",
            "--no-link",
            "--compress",
            "always",
            "-v",
            "--ticket",
            &pair.ticket(&[]),
        ])
        .current_dir(&pair.world.dir)
        .output()
        .unwrap();
    pair.assert_built(&again);
    let log = stderr(&again);
    assert!(log.contains("compressed already"), "{log}");
    assert!(second.has(&copy));
}

#[test]
fn auto_on_loopback_compresses_nothing() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("compress-auto"), &[]);
    write_text_input(&pair);
    let output = pair.build("copy", &["--ticket", &pair.ticket(&[]), "-v"]);
    pair.assert_built(&output);
    let log = stderr(&output);
    let (sent, received) = wire_bytes(&log);
    assert!(
        sent > TEXT_BYTES as u64 && received > TEXT_BYTES as u64,
        "sent {sent}, received {received} for {TEXT_BYTES} bytes each way:\n{log}"
    );
    let decisions: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("transfer compression"))
        .collect();
    assert!(!decisions.is_empty(), "{log}");
    assert!(
        decisions
            .iter()
            .all(|line| line.contains("compress=false") && line.contains("this machine")),
        "{decisions:#?}"
    );
}
