//! The adversarial suite (issue 13): hostile peers against a real
//! `drv-thru serve` over Iroh on loopback (relays and address lookup off),
//! each attack beside a well-behaved client whose real build (two stores)
//! must finish unaffected, with the server's memory, files and tasks
//! sampled throughout and held under a ceiling. Then a bounded soak of mixed
//! traffic (`DRV_THRU_SOAK`, default 2m).
//!
//! `cargo test --test adversarial -- --nocapture` prints the fault table:
//! one line per case with the status expected and seen and the peaks
//! measured.

mod arena;
mod attacks;
mod budgets;
#[path = "../support/builder.rs"]
mod builder;
#[path = "../integration/common.rs"]
mod common;
mod faults;
mod public;
mod soak;
mod ticket_holder;
#[path = "../support/two_stores.rs"]
mod two_stores;
