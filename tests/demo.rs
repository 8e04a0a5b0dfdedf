//! The README's main job: a real remote build on one machine (run by
//! `tests/demo.sh`). A builder and a client get separate Nix stores (each a
//! directory mounted over `/nix` in its own mount namespace, as two machines
//! would have); the builder issues a ticket, and the client builds the
//! example flake in tests/data/e2e through it and imports the signed output.
//! Relays are off: everything stays on loopback. It says what it does as it
//! goes, and stops the builder however it ends.

#[path = "support/builder.rs"]
mod builder;
#[path = "support/two_stores.rs"]
mod two_stores;

use std::{process::Stdio, sync::Arc};

use builder::{Builder, Options, binary, launcher_in};
use two_stores::World;

fn main() {
    if !two_stores::available() {
        return;
    }
    let salt = format!(
        "demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    let world = Arc::new(World::new(&salt));
    let client = world.store("client");

    println!("== starting a builder with its own store");
    let builder = Builder::start_in(
        launcher_in(&world.store("builder"), binary()),
        world.dir.join("data"),
        Options {
            rust_log: "drv_thru=info,iroh=warn".to_owned(),
            ..Options::new(&[])
        },
    );
    println!("endpoint id {}", builder.ready.endpoint_id);
    for addr in &builder.ready.direct_addresses {
        println!("listening on {addr}");
    }
    println!(
        "outputs are signed with {}",
        builder.ready.signing_public_key
    );

    println!("== issuing a ticket");
    let ticket = builder.cli_ok(&["ticket", "create", "--name", "demo"]);
    let ticket = ticket.trim();
    println!("{ticket}");

    let installable = world.installable("app");
    println!("== building {installable} from the client's store through the ticket");
    let output = client
        .command(binary())
        .args(["build", &installable, "--ticket", ticket, "--no-nom"])
        .current_dir(&world.dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running drv-thru build");
    assert!(output.status.success(), "the build failed");
    let out = String::from_utf8(output.stdout).expect("a store path");
    let out = out.trim();
    println!("output: {out}");

    println!("== the output in the client's store, signed by the builder");
    print!("{}", client.run_ok("nix", &["path-info", "--sigs", out]));
    print!("{}", client.run_ok(&format!("{out}/bin/app"), &[]));
}
