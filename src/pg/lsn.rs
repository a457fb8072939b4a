//! Log sequence numbers: positions in the write-ahead log.
//!
//! An LSN has two spellings here. Humans, PostgreSQL and the JSON in manifests use PostgreSQL's own
//! `X/Y` form (`16/B374D848`: the upper and lower 32 bits in hexadecimal). Repository keys use 16
//! zero-padded uppercase hexadecimal digits (`00000016B374D848`) because keys must sort in LSN order
//! as plain strings, which the `X/Y` form does not (`9/0` > `10/0` as text).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A position in PostgreSQL's write-ahead log (`pg_lsn`).
///
/// Ordering is WAL order. `Lsn(0)` is PostgreSQL's `InvalidXLogRecPtr` (`0/0`), which the server
/// uses for "no position" (for example the WAL start of a pgoutput Relation message).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, PostgreSQL's invalid position.
    pub const INVALID: Lsn = Lsn(0);

    /// Number of characters of [`Lsn::to_key`]'s output.
    pub const KEY_LEN: usize = 16;

    /// The sortable repository-key spelling: 16 uppercase hexadecimal digits, zero-padded.
    #[must_use]
    pub fn to_key(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses [`Lsn::to_key`]'s spelling.
    ///
    /// Strict on purpose: exactly 16 digits, uppercase only, so that one LSN has exactly one key
    /// and a key that sorts wrongly (lowercase, short) is rejected rather than silently accepted.
    ///
    /// # Errors
    /// [`LsnParseError`] if `key` is not exactly 16 characters of `0-9A-F`.
    pub fn from_key(key: &str) -> Result<Lsn, LsnParseError> {
        let canonical = key.len() == Self::KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        if !canonical {
            return Err(LsnParseError::new(
                key,
                "expected 16 uppercase hexadecimal digits",
            ));
        }
        u64::from_str_radix(key, 16)
            .map(Lsn)
            .map_err(|_| LsnParseError::new(key, "expected 16 uppercase hexadecimal digits"))
    }

    /// True for `0/0`.
    #[must_use]
    pub fn is_invalid(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Same rendering as PostgreSQL's pg_lsn_out: "%X/%X" of the two halves.
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// `Lsn(16/B374D848)`: the decimal value means nothing to anyone reading a log or a failed assert.
impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Parses PostgreSQL's `X/Y` spelling, as `pg_lsn_in` does: each half 1 to 8 hexadecimal
    /// digits, either case.
    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| LsnParseError::new(s, "expected X/Y"))?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(LsnParseError::new(
                    s,
                    "each half must be 1 to 8 hexadecimal digits",
                ));
            }
            u32::from_str_radix(part, 16)
                .map_err(|_| LsnParseError::new(s, "each half must be 1 to 8 hexadecimal digits"))
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Lsn {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

/// So that LSNs read over ordinary SQL connections (`pg_current_wal_lsn()`, `confirmed_flush_lsn`)
/// convert without going through text.
impl From<tokio_postgres::types::PgLsn> for Lsn {
    fn from(lsn: tokio_postgres::types::PgLsn) -> Lsn {
        Lsn(u64::from(lsn))
    }
}

impl From<Lsn> for tokio_postgres::types::PgLsn {
    fn from(lsn: Lsn) -> tokio_postgres::types::PgLsn {
        tokio_postgres::types::PgLsn::from(lsn.0)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        struct LsnVisitor;

        impl Visitor<'_> for LsnVisitor {
            type Value = Lsn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a PostgreSQL LSN such as \"16/B374D848\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lsn, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(LsnVisitor)
    }
}

/// A string that is not an LSN in the expected spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: {reason}")]
pub struct LsnParseError {
    input: String,
    reason: &'static str,
}

impl LsnParseError {
    fn new(input: &str, reason: &'static str) -> LsnParseError {
        // Bounded so that a garbage multi-megabyte input does not end up in a log line.
        let input = input.chars().take(40).collect();
        LsnParseError { input, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_postgres_spelling() {
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse(), Ok(Lsn(0)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse(), Ok(Lsn(u64::MAX)));
        assert_eq!("00000001/00000002".parse(), Ok(Lsn(0x1_0000_0002)));
    }

    #[test]
    fn rejects_malformed_postgres_spelling() {
        for bad in [
            "",
            "/",
            "16",
            "16/",
            "/B3",
            "1/2/3",
            "G/0",
            "0/-1",
            "+1/0",
            " 1/0",
            "1/0 ",
            "100000000/0",
            "0/100000000",
            "1:0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn(v);
            assert_eq!(lsn.to_string().parse(), Ok(lsn));
        }
    }

    #[test]
    fn keys_are_sixteen_uppercase_digits_and_round_trip() {
        assert_eq!(Lsn(0x16_B374_D848).to_key(), "00000016B374D848");
        assert_eq!(Lsn(0).to_key(), "0000000000000000");
        assert_eq!(Lsn(u64::MAX).to_key(), "FFFFFFFFFFFFFFFF");
        for v in [0, 1, 0xABCD, 0x16_B374_D848, u64::MAX] {
            assert_eq!(Lsn::from_key(&Lsn(v).to_key()), Ok(Lsn(v)));
        }
    }

    #[test]
    fn keys_sort_like_lsns() {
        let mut lsns = [Lsn(0x10_0000_0000), Lsn(0x9_FFFF_FFFF), Lsn(0xA), Lsn(0)];
        let mut keys: Vec<String> = lsns.iter().map(|l| l.to_key()).collect();
        lsns.sort();
        keys.sort();
        let sorted: Vec<String> = lsns.iter().map(|l| l.to_key()).collect();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn from_key_is_strict() {
        for bad in [
            "",
            "16B374D848",
            "00000016b374d848",
            "00000016B374D84G",
            "000000016B374D848",
            "+0000016B374D848",
            "16/B374D848",
        ] {
            assert!(Lsn::from_key(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn debug_shows_the_postgres_spelling() {
        assert_eq!(format!("{:?}", Lsn(0x16_B374_D848)), "Lsn(16/B374D848)");
    }

    #[test]
    fn orders_in_wal_order() {
        assert!(Lsn(0x9_FFFF_FFFF) < Lsn(0x10_0000_0000));
        assert!(Lsn::INVALID < Lsn(1));
        assert!(Lsn::INVALID.is_invalid());
    }

    #[test]
    fn serde_uses_postgres_spelling() {
        let json = serde_json::to_string(&Lsn(0x16_B374_D848)).expect("serialize");
        assert_eq!(json, "\"16/B374D848\"");
        let back: Lsn = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, Lsn(0x16_B374_D848));
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Lsn>("42").is_err());
    }

    #[test]
    fn converts_with_pg_lsn() {
        let pg: tokio_postgres::types::PgLsn = "16/B374D848".parse().expect("PgLsn parses");
        assert_eq!(Lsn::from(pg), Lsn(0x16_B374_D848));
        assert_eq!(tokio_postgres::types::PgLsn::from(Lsn(0x16_B374_D848)), pg);
    }

    #[test]
    fn parse_error_does_not_echo_huge_inputs() {
        let huge = "x".repeat(1_000_000);
        let err = huge.parse::<Lsn>().expect_err("not an LSN");
        assert!(err.to_string().len() < 200);
    }
}
