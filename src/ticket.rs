//! The ticket string: everything a client needs to use a builder once.
//!
//! `drvthru` followed by lowercase base32 (no padding) of a small binary
//! record, so a ticket survives copy and paste, chat clients and shell
//! quoting, and a double-click selects all of it:
//!
//! ```text
//! u8      format version (1)
//! [32]    builder endpoint id
//! [8]     ticket id
//! [32]    bearer secret
//! u8+..   signing key name (length-prefixed UTF-8), then [32] key bytes
//! u16+..  relay URL (length-prefixed UTF-8, 0 = none)
//! u8      direct address count, each: u8 4|6, IP bytes, u16 port
//! [4]     first bytes of SHA-256 over all of the above (catches typos)
//! ```
//!
//! The signing key inside is what makes ticket builds safe to import: the
//! client trusts the key it was handed by the builder's admin, never one the
//! builder announces at connect time.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use iroh::{EndpointAddr, EndpointId, RelayUrl};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::nix::signing;

const PREFIX: &str = "drvthru";
const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 4;

/// A ticket id: 8 random bytes shown as 16 lowercase hex characters.
///
/// Ids are not secret; they name a ticket in `ticket list`, `reveal` and
/// `revoke`, and appear in logs and status.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId([u8; 8]);

impl TicketId {
    /// A fresh random id.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        Self(bytes)
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketId({self})")
    }
}

impl FromStr for TicketId {
    type Err = TicketParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.trim().as_bytes())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .map(Self)
            .ok_or_else(|| TicketParseError::BadId(text.to_owned()))
    }
}

impl serde::Serialize for TicketId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TicketId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A ticket's bearer secret. Never logged, never printed by `Debug`.
#[derive(Clone)]
pub struct BearerSecret([u8; 32]);

impl BearerSecret {
    /// Wraps raw secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Compares in constant time, so response timing does not leak a prefix.
    pub fn matches(&self, other: &BearerSecret) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The `authorization` metadata value presenting this secret for `id`.
    pub fn authorization(&self, id: TicketId) -> String {
        format!("Bearer {id}.{}", data_encoding::HEXLOWER.encode(&self.0))
    }

    /// Parses an `authorization` metadata value: `Bearer <id>.<secret>` as
    /// [`Self::authorization`] makes it, read as leniently as RFC 9110
    /// allows a stock client to vary it: the scheme in any case, one or more
    /// spaces after it, hex digits in either case, and surrounding
    /// whitespace. `proto/README.md` documents exactly this.
    pub fn from_authorization(value: &str) -> Option<(TicketId, BearerSecret)> {
        let (scheme, token) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("Bearer") {
            return None;
        }
        let (id, secret) = token.trim_start_matches(' ').split_once('.')?;
        Some((TicketId(hex_array(id)?), BearerSecret(hex_array(secret)?)))
    }
}

/// Exactly `N` bytes from hex digits of either case, and nothing else.
fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

impl fmt::Debug for BearerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerSecret([redacted])")
    }
}

/// A decoded ticket string.
#[derive(Debug, Clone)]
pub struct Ticket {
    builder: EndpointAddr,
    signing_key: signing::PublicKey,
    id: TicketId,
    secret: BearerSecret,
}

/// Why a string is not a usable ticket.
#[derive(Debug, thiserror::Error)]
pub enum TicketParseError {
    /// Wrong prefix.
    #[error("not a drv-thru ticket: it must start with `{PREFIX}`")]
    Prefix,
    /// Not base32.
    #[error("ticket is garbled (not base32); copy it again in full")]
    Encoding,
    /// The checksum does not match: a typo or truncation.
    #[error("ticket is damaged (checksum mismatch); copy it again in full")]
    Checksum,
    /// Made by a newer drv-thru.
    #[error("ticket format version {0} is not supported by this drv-thru; upgrade drv-thru")]
    Version(u8),
    /// Structurally invalid.
    #[error("ticket is malformed: {0}")]
    Malformed(&'static str),
    /// A ticket id that is not 16 hex characters.
    #[error("invalid ticket id {0:?}: expected 16 hexadecimal characters")]
    BadId(String),
}

impl Ticket {
    /// Assembles a ticket for a builder.
    pub fn new(
        builder: EndpointAddr,
        signing_key: signing::PublicKey,
        id: TicketId,
        secret: BearerSecret,
    ) -> Self {
        Self {
            builder,
            signing_key,
            id,
            secret,
        }
    }

    /// Where to reach the builder.
    pub fn builder(&self) -> &EndpointAddr {
        &self.builder
    }

    /// The builder's endpoint id.
    pub fn builder_id(&self) -> EndpointId {
        self.builder.id
    }

    /// The key the builder signs outputs with.
    pub fn signing_key(&self) -> &signing::PublicKey {
        &self.signing_key
    }

    /// The ticket id.
    pub fn id(&self) -> TicketId {
        self.id
    }

    /// The bearer secret.
    pub fn secret(&self) -> &BearerSecret {
        &self.secret
    }

    fn encode_record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.push(VERSION);
        out.extend_from_slice(self.builder.id.as_bytes());
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.secret.0);
        let name = self.signing_key.name().as_bytes();
        out.push(u8::try_from(name.len()).expect("key names are at most 255 bytes"));
        out.extend_from_slice(name);
        out.extend_from_slice(self.signing_key.as_bytes());
        let relay = self
            .builder
            .relay_urls()
            .next()
            .map(|url| url.to_string())
            .unwrap_or_default();
        let relay = &relay.as_bytes()[..relay.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(relay.len() as u16).to_be_bytes());
        out.extend_from_slice(relay);
        let addrs: Vec<&SocketAddr> = self.builder.ip_addrs().take(255).collect();
        out.push(addrs.len() as u8);
        for addr in addrs {
            match addr.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&addr.port().to_be_bytes());
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum[..CHECKSUM_LEN]);
        out
    }

    fn decode_record(bytes: &[u8]) -> Result<Self, TicketParseError> {
        if bytes.len() < CHECKSUM_LEN + 1 {
            return Err(TicketParseError::Malformed("too short"));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(body)[..CHECKSUM_LEN] != *checksum {
            return Err(TicketParseError::Checksum);
        }
        let mut reader = Reader(body);
        let version = reader.u8()?;
        if version != VERSION {
            return Err(TicketParseError::Version(version));
        }
        let endpoint_id = EndpointId::from_bytes(&reader.array()?)
            .map_err(|_| TicketParseError::Malformed("invalid endpoint id"))?;
        let id = TicketId(reader.array()?);
        let secret = BearerSecret(reader.array()?);
        let name_len = reader.u8()? as usize;
        let name = std::str::from_utf8(reader.take(name_len)?)
            .map_err(|_| TicketParseError::Malformed("signing key name is not UTF-8"))?;
        let key: [u8; 32] = reader.array()?;
        let signing_key = signing::PublicKey::from_parts(name, key)
            .map_err(|_| TicketParseError::Malformed("invalid signing key"))?;
        let relay_len = u16::from_be_bytes(reader.array()?) as usize;
        let mut builder = EndpointAddr::new(endpoint_id);
        if relay_len > 0 {
            let relay: RelayUrl = std::str::from_utf8(reader.take(relay_len)?)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(TicketParseError::Malformed("invalid relay URL"))?;
            builder = builder.with_relay_url(relay);
        }
        for _ in 0..reader.u8()? {
            let ip = match reader.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(reader.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(reader.array::<16>()?)),
                _ => return Err(TicketParseError::Malformed("unknown address family")),
            };
            let port = u16::from_be_bytes(reader.array()?);
            builder = builder.with_ip_addr(SocketAddr::new(ip, port));
        }
        if !reader.0.is_empty() {
            return Err(TicketParseError::Malformed("trailing bytes"));
        }
        Ok(Self {
            builder,
            signing_key,
            id,
            secret,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TicketParseError> {
        if self.0.len() < n {
            return Err(TicketParseError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TicketParseError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self) -> Result<u8, TicketParseError> {
        Ok(self.array::<1>()?[0])
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encoded = data_encoding::BASE32_NOPAD.encode(&self.encode_record());
        write!(f, "{PREFIX}{}", encoded.to_ascii_lowercase())
    }
}

impl FromStr for Ticket {
    type Err = TicketParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TicketParseError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketParseError::Encoding)?;
        Self::decode_record(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(addrs: &[&str], relay: Option<&str>) -> Ticket {
        let endpoint = iroh::SecretKey::from_bytes(&[3; 32]).public();
        let mut builder = EndpointAddr::new(endpoint);
        for addr in addrs {
            builder = builder.with_ip_addr(addr.parse().unwrap());
        }
        if let Some(relay) = relay {
            builder = builder.with_relay_url(relay.parse().unwrap());
        }
        let key = signing::SecretKey::generate("drv-thru-test-1")
            .unwrap()
            .to_public();
        Ticket::new(builder, key, TicketId([9; 8]), BearerSecret([5; 32]))
    }

    #[test]
    fn round_trips_with_addresses_and_relay() {
        let ticket = sample(
            &["127.0.0.1:4433", "[::1]:9"],
            Some("https://relay.example.org./"),
        );
        let text = ticket.to_string();
        assert!(text.starts_with("drvthru"), "{text}");
        assert!(
            text.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{text}"
        );
        let back: Ticket = text.parse().unwrap();
        assert_eq!(back.builder(), ticket.builder());
        assert_eq!(
            back.signing_key().to_string(),
            ticket.signing_key().to_string()
        );
        assert_eq!(back.id(), ticket.id());
        assert!(back.secret().matches(ticket.secret()));
        assert_eq!(back.to_string(), text);
    }

    /// The worked example in `proto/README.md` ("The ticket string").
    const EXAMPLE: &str = "drvthruagfiry65oqe7dfp5klns2pf2lvzmuzyjx4ozieq36n2iqanub5xvyaareizuivlgo4aacaqdaqcqmbyibefawdanbyhraeiscmkbkfqxdamrugy4dupb6clcovuwyzdfoiwtdajzo4hkq7ixl5lkgvdgyngh5tglrwfjdnhog6rf35qploh4tm4uaalgq5duobztulzpojswyylzfzsxqylnobwgklybataaaaqhcfiwiwwstu";

    fn example() -> Ticket {
        let builder = EndpointAddr::new(iroh::SecretKey::from_bytes(&[1; 32]).public())
            .with_relay_url("https://relay.example/".parse().unwrap())
            .with_ip_addr("192.0.2.7:4433".parse().unwrap());
        let key = *iroh::SecretKey::from_bytes(&[2; 32]).public().as_bytes();
        Ticket::new(
            builder,
            signing::PublicKey::from_parts("builder-1", key).unwrap(),
            "0011223344556677".parse().unwrap(),
            BearerSecret(std::array::from_fn(|i| i as u8)),
        )
    }

    #[test]
    fn the_documented_example_is_what_a_ticket_encodes_to() {
        let readme = include_str!("../proto/README.md");
        let ticket = example();
        assert_eq!(ticket.to_string(), EXAMPLE);
        assert!(
            readme.contains(EXAMPLE),
            "proto/README.md lacks the example"
        );
        // The README lists the record field by field, each line's first
        // word a field's bytes in hex.
        let listed: String = readme
            .split_once("```text\n01 ")
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(block, _)| {
                std::iter::once("01")
                    .chain(
                        block
                            .lines()
                            .skip(1)
                            .filter_map(|line| line.split_whitespace().next()),
                    )
                    .collect()
            })
            .expect("proto/README.md lists the example record");
        assert_eq!(
            listed,
            data_encoding::HEXLOWER.encode(&ticket.encode_record())
        );
        let authorization = ticket.secret().authorization(ticket.id());
        assert!(
            readme.contains(&format!("authorization: {authorization}\n")),
            "proto/README.md lacks {authorization:?}"
        );
        let back: Ticket = EXAMPLE.parse().unwrap();
        assert_eq!(back.builder(), ticket.builder());
    }

    #[test]
    fn round_trips_without_addresses() {
        let ticket = sample(&[], None);
        let back: Ticket = ticket.to_string().parse().unwrap();
        assert_eq!(back.builder(), ticket.builder());
    }

    #[test]
    fn detects_typos_truncation_and_foreign_strings() {
        let text = sample(&["127.0.0.1:1"], None).to_string();
        let mut typo: Vec<char> = text.chars().collect();
        let i = typo.len() / 2;
        typo[i] = if typo[i] == 'a' { 'b' } else { 'a' };
        let typo: String = typo.into_iter().collect();
        assert!(matches!(
            typo.parse::<Ticket>(),
            Err(TicketParseError::Checksum)
        ));
        assert!(text[..text.len() - 8].parse::<Ticket>().is_err());
        assert!(matches!(
            "hello".parse::<Ticket>(),
            Err(TicketParseError::Prefix)
        ));
        assert!(matches!(
            "drvthru!!!".parse::<Ticket>(),
            Err(TicketParseError::Encoding)
        ));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let ticket = sample(&[], None);
        let debug = format!("{ticket:?}");
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(!debug.contains("0505"), "{debug}");
    }

    #[test]
    fn authorization_value_round_trips() {
        let secret = BearerSecret([0xab; 32]);
        let id: TicketId = "0011223344556677".parse().unwrap();
        let value = secret.authorization(id);
        let (back_id, back_secret) = BearerSecret::from_authorization(&value).unwrap();
        assert_eq!(back_id, id);
        assert!(back_secret.matches(&secret));
        assert!(BearerSecret::from_authorization("Bearer nope").is_none());
        assert!(BearerSecret::from_authorization("Basic abc").is_none());
    }

    #[test]
    fn authorization_is_read_as_leniently_as_documented() {
        let id = "0011223344556677";
        let secret = "ab".repeat(32);
        let upper = secret.to_ascii_uppercase();
        for value in [
            format!("bearer {id}.{secret}"),
            format!("BEARER  {id}.{upper}"),
            format!(" Bearer {}.{secret}\t", id.to_ascii_uppercase()),
        ] {
            let (back_id, back_secret) = BearerSecret::from_authorization(&value)
                .unwrap_or_else(|| panic!("{value:?} refused"));
            assert_eq!(back_id.to_string(), id);
            assert!(back_secret.matches(&BearerSecret([0xab; 32])));
        }
        for value in [
            format!("Bearer{id}.{secret}"),
            format!("Bearer {id} .{secret}"),
            format!("Bearer {id}.{secret}00"),
            format!("Bearer {id}.{}", &secret[1..]),
            format!("Bearer {id}:{secret}"),
        ] {
            assert!(
                BearerSecret::from_authorization(&value).is_none(),
                "{value:?} accepted"
            );
        }
    }

    #[test]
    fn ticket_ids_parse_strictly() {
        assert!("0011223344556677".parse::<TicketId>().is_ok());
        assert!("00112233".parse::<TicketId>().is_err());
        assert!("zz11223344556677".parse::<TicketId>().is_err());
    }

    #[test]
    fn generated_tickets_print_and_parse_back() {
        let mut rng = crate::nix::store_path::tests::Rng::new(0x7c1c);
        for _ in 0..300 {
            let mut builder = EndpointAddr::new(iroh::SecretKey::from_bytes(&rng.bytes()).public());
            for _ in 0..rng.below(4) {
                let ip: IpAddr = if rng.below(2) == 0 {
                    Ipv4Addr::from(rng.bytes::<4>()).into()
                } else {
                    Ipv6Addr::from(rng.bytes::<16>()).into()
                };
                builder = builder.with_ip_addr(SocketAddr::new(ip, rng.next() as u16));
            }
            if rng.below(2) == 0 {
                let host = rng.text(b"abc123", 20);
                builder =
                    builder.with_relay_url(format!("https://{host}.example/").parse().unwrap());
            }
            let name = rng.text(b"abc-.19", 40);
            let key = signing::PublicKey::from_parts(
                &name,
                *iroh::SecretKey::from_bytes(&rng.bytes())
                    .public()
                    .as_bytes(),
            )
            .unwrap();
            let ticket = Ticket::new(
                builder,
                key,
                TicketId(rng.bytes()),
                BearerSecret(rng.bytes()),
            );
            let text = ticket.to_string();
            let back: Ticket = text.parse().unwrap_or_else(|err| panic!("{err}: {text}"));
            assert_eq!(back.builder(), ticket.builder());
            assert_eq!(back.signing_key(), ticket.signing_key());
            assert_eq!(back.id(), ticket.id());
            assert!(back.secret().matches(ticket.secret()));
            assert_eq!(back.to_string(), text);
        }
    }
}
