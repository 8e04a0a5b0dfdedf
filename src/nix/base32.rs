//! Nix's own base-32 encoding, used for store path hashes and for hashes in narinfo files.
//!
//! It is not RFC 4648: the alphabet omits `e`, `o`, `u` and `t` (so that hashes never spell words), and
//! the digits are produced from the *last* 5-bit group of the input to the first, so the encoded string
//! reads like the input taken as one little-endian number. Because the alphabet is in ASCII order,
//! comparing two encodings of equal length as strings compares those numbers.

use thiserror::Error;

/// The 32 digits, in value order.
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not the Nix base-32 encoding of the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Base32Error {
    /// The string has the wrong length for the number of bytes wanted.
    #[error("nix base-32 string {input:?} has {len} characters, expected {expected}")]
    Length {
        /// The rejected input.
        input: String,
        /// Its length in characters.
        len: usize,
        /// The length that encodes the wanted number of bytes.
        expected: usize,
    },
    /// The string holds a character outside the alphabet.
    #[error("invalid character {character:?} in nix base-32 string {input:?}")]
    Character {
        /// The rejected input.
        input: String,
        /// The first offending character.
        character: char,
    },
    /// The string encodes a number too large for the wanted bytes (bits set past the end).
    #[error("nix base-32 string {input:?} has bits set beyond its length")]
    Overflow {
        /// The rejected input.
        input: String,
    },
}

/// The number of base-32 characters that encode `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// Encodes bytes as Nix base-32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        // A digit may straddle two bytes; the high part comes from the next byte, if there is one.
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// The value of a digit, if `c` is one.
fn digit_value(c: u8) -> Option<u8> {
    // The position is below 32, so it always fits.
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes exactly `N` bytes from a Nix base-32 string of length [`encoded_len`]`(N)`.
pub fn decode<const N: usize>(input: &str) -> Result<[u8; N], Base32Error> {
    if let Some(character) = input
        .chars()
        .find(|&c| !c.is_ascii() || digit_value(c as u8).is_none())
    {
        return Err(Base32Error::Character {
            input: input.to_owned(),
            character,
        });
    }
    // All ASCII from here on, so bytes and characters count the same.
    let expected = encoded_len(N);
    if input.len() != expected {
        return Err(Base32Error::Length {
            input: input.to_owned(),
            len: input.len(),
            expected,
        });
    }
    let mut out = [0u8; N];
    for (n, c) in input.bytes().rev().enumerate() {
        // Every character was checked above, so the fallback is never taken.
        let digit = u16::from(digit_value(c).unwrap_or(0));
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        // The low 8 bits of the shifted digit belong to this byte, the rest carries into the next.
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => {
                return Err(Base32Error::Overflow {
                    input: input.to_owned(),
                });
            }
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256("") in hex, and as `nix-hash --type sha256 --to-base32` prints it.
    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    /// sha256("hello\n"), likewise.
    const HELLO_HEX: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const HELLO_NIX32: &str = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn encodes_like_nix_hash() {
        assert_eq!(encode(&hex32(EMPTY_HEX)), EMPTY_NIX32);
        assert_eq!(encode(&hex32(HELLO_HEX)), HELLO_NIX32);
    }

    #[test]
    fn decodes_like_nix_hash() {
        assert_eq!(decode::<32>(EMPTY_NIX32).unwrap(), hex32(EMPTY_HEX));
        assert_eq!(decode::<32>(HELLO_NIX32).unwrap(), hex32(HELLO_HEX));
    }

    #[test]
    fn lengths_match_nix() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encode(&[]), "");
    }

    #[test]
    fn round_trips_every_byte_position() {
        for i in 0..20 {
            for bit in 0..8 {
                let mut bytes = [0u8; 20];
                bytes[i] = 1 << bit;
                let s = encode(&bytes);
                assert_eq!(s.len(), 32);
                assert_eq!(decode::<20>(&s).unwrap(), bytes);
            }
        }
    }

    #[test]
    fn rejects_wrong_length() {
        let err = decode::<32>(&EMPTY_NIX32[1..]).unwrap_err();
        assert!(matches!(
            err,
            Base32Error::Length {
                len: 51,
                expected: 52,
                ..
            }
        ));
    }

    #[test]
    fn rejects_letters_outside_alphabet() {
        for bad in ['e', 'o', 'u', 't', 'A', '-'] {
            let s = format!("{bad}{}", &EMPTY_NIX32[1..]);
            let err = decode::<32>(&s).unwrap_err();
            assert_eq!(
                err,
                Base32Error::Character {
                    input: s.clone(),
                    character: bad
                }
            );
        }
    }

    #[test]
    fn rejects_non_ascii_without_panicking() {
        // Reported as the bad character it is, not as a length mismatch (it is two bytes).
        let s = format!("é{}", "0".repeat(30));
        assert!(matches!(
            decode::<20>(&s),
            Err(Base32Error::Character {
                character: 'é', ..
            })
        ));
    }

    #[test]
    fn rejects_bits_beyond_the_end() {
        // 32 characters carry 160 bits exactly, but 52 carry 260 for 256: the top digit must be < 2.
        let s = format!("2{}", &EMPTY_NIX32[1..]);
        assert!(matches!(
            decode::<32>(&s),
            Err(Base32Error::Overflow { .. })
        ));
        let s = format!("1{}", &EMPTY_NIX32[1..]);
        assert!(decode::<32>(&s).is_ok());
    }

    #[test]
    fn string_order_is_little_endian_number_order() {
        let a = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let b = [
            255u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(encode(&a) > encode(&b));
    }
}
