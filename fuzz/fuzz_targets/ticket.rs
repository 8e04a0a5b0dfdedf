//! Ticket strings, which users paste from chat, and the `authorization`
//! metadata every ticket client sends.
//!
//! A random string almost never passes the ticket's SHA-256 checksum, so an
//! input whose first byte is odd is taken as a raw record instead and given
//! a valid checksum and encoding: that is how the fuzzer reaches the record
//! decoder.

#![no_main]

use drv_thru::ticket::{BearerSecret, Ticket, TicketId};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        let mut record = rest.to_vec();
        let checksum = Sha256::digest(rest);
        record.extend_from_slice(&checksum[..4]);
        let text = format!(
            "drvthru{}",
            data_encoding::BASE32_NOPAD
                .encode(&record)
                .to_ascii_lowercase()
        );
        check_ticket(&text);
    } else if let Ok(text) = std::str::from_utf8(rest) {
        check_ticket(text);
        check_authorization(text);
        if let Ok(id) = text.parse::<TicketId>() {
            assert_eq!(id.to_string().parse::<TicketId>().unwrap(), id);
        }
    }
});

fn check_ticket(text: &str) {
    let Ok(ticket) = text.parse::<Ticket>() else {
        return;
    };
    let printed = ticket.to_string();
    let back: Ticket = printed
        .parse()
        .unwrap_or_else(|err| panic!("printed ticket {printed:?} does not parse: {err}"));
    assert_eq!(back.builder(), ticket.builder());
    assert_eq!(back.signing_key(), ticket.signing_key());
    assert_eq!(back.id(), ticket.id());
    assert!(back.secret().matches(ticket.secret()));
    assert_eq!(back.to_string(), printed);
}

fn check_authorization(value: &str) {
    let Some((id, secret)) = BearerSecret::from_authorization(value) else {
        return;
    };
    let (back_id, back_secret) = BearerSecret::from_authorization(&secret.authorization(id))
        .expect("a printed authorization value parses");
    assert_eq!(back_id, id);
    assert!(back_secret.matches(&secret));
}
