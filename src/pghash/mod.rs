//! PostgreSQL 15's hash-partitioning hash, so that pgshard places a sharding key in exactly the
//! bucket `PARTITION BY HASH` would and any shard can recompute "does this row belong to bucket
//! b?" in plain SQL (publication row filters, COPY queries, cleanup DELETEs). See
//! /work/shared/pg-hash.md for the definition; the tests compare against a real server.
//!
//! Text hashing follows PostgreSQL on little-endian machines: PostgreSQL's lookup3 places tail
//! bytes differently on big-endian hosts, so hash partitions there are not portable anyway.

use thiserror::Error;

/// PostgreSQL's HASH_PARTITION_SEED.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// The constant `hash_combine64` adds; with a zero accumulator it is the whole combine step.
const HASH_COMBINE_CONST: u64 = 0x49a0_f4dd_15e5_a8e3;

/// lookup3's golden-ratio start value plus PostgreSQL's extra constant, before the length.
const LOOKUP3_INIT: u32 = 0x9e37_79b9u32.wrapping_add(3_923_095);

/// Longest value echoed back in an error, so a hostile literal cannot bloat logs.
const MAX_ECHO_CHARS: usize = 64;

/// A sharding key value of a supported type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyValue<'a> {
    /// int2/int4/int8, widened to i64 (PostgreSQL's integer hash opclasses agree on equal values).
    Int(i64),
    /// text/varchar as UTF-8 bytes.
    Text(&'a [u8]),
    /// uuid as its 16 raw bytes (hashed as bytes, never as its text form).
    Uuid([u8; 16]),
}

/// Why a sharding key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The column type cannot be a sharding key.
    #[error(
        "type '{0}' cannot be a sharding key (supported: int2, int4, int8, text, varchar, uuid)"
    )]
    UnsupportedType(String),
    /// The text is not a valid literal of the type.
    #[error("value '{value}' is not a valid {ty} sharding key")]
    Invalid {
        /// Column type name.
        ty: &'static str,
        /// The offending input, possibly shortened.
        value: String,
    },
    /// The integer does not fit the column's width.
    #[error("value '{value}' is out of range for an {ty} sharding key")]
    OutOfRange {
        /// Column type name.
        ty: &'static str,
        /// The offending input, possibly shortened.
        value: String,
    },
    /// A binary parameter has the wrong length for its type.
    #[error("binary {ty} sharding key must be {expected} bytes, got {got}")]
    BinaryLength {
        /// Column type name.
        ty: &'static str,
        /// Length the type's binary format has.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// Text that PostgreSQL itself would reject (invalid UTF-8 or a NUL byte), so it has no bucket.
    #[error("{ty} sharding key is not valid UTF-8 text without NUL bytes")]
    BadText {
        /// Column type name.
        ty: &'static str,
    },
}

/// Supported column types, after resolving SQL aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Int2,
    Int4,
    Int8,
    Text,
    Varchar,
    Uuid,
}

impl KeyType {
    /// Accepts PostgreSQL's internal names and the SQL spellings `format_type` and
    /// information_schema report, so callers can pass either.
    fn from_name(ty: &str) -> Option<KeyType> {
        // Compared in place: this runs for every key routed, so it must not allocate.
        const NAMES: [(&str, KeyType); 11] = [
            ("int2", KeyType::Int2),
            ("smallint", KeyType::Int2),
            ("int4", KeyType::Int4),
            ("integer", KeyType::Int4),
            ("int", KeyType::Int4),
            ("int8", KeyType::Int8),
            ("bigint", KeyType::Int8),
            ("text", KeyType::Text),
            ("varchar", KeyType::Varchar),
            ("character varying", KeyType::Varchar),
            ("uuid", KeyType::Uuid),
        ];
        let t = ty.trim();
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(t))
            .map(|&(_, k)| k)
    }

    fn name(self) -> &'static str {
        match self {
            KeyType::Int2 => "int2",
            KeyType::Int4 => "int4",
            KeyType::Int8 => "int8",
            KeyType::Text => "text",
            KeyType::Varchar => "varchar",
            KeyType::Uuid => "uuid",
        }
    }

    fn parse(ty: &str) -> Result<KeyType, KeyError> {
        KeyType::from_name(ty).ok_or_else(|| KeyError::UnsupportedType(echo(ty.as_bytes())))
    }
}

fn echo(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out: String = s.chars().take(MAX_ECHO_CHARS).collect();
    if s.chars().nth(MAX_ECHO_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Start state shared by the byte and the single-word variants; a zero seed skips the seed mix
/// in PostgreSQL, so seed 0 is not the same as "mix in zero".
#[inline(always)]
fn seeded_state(len: u32, seed: u64) -> (u32, u32, u32) {
    let init = LOOKUP3_INIT.wrapping_add(len);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

#[inline(always)]
fn le_word(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// hash_bytes_extended(k, seed) — lookup3 over the bytes, 64-bit result, as PostgreSQL.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    // PostgreSQL takes the length as a C int cast to uint32; values beyond 4 GiB cannot exist there.
    let (mut a, mut b, mut c) = seeded_state(k.len() as u32, seed);
    let mut blocks = k.chunks_exact(12);
    for blk in &mut blocks {
        a = a.wrapping_add(le_word(&blk[0..4]));
        b = b.wrapping_add(le_word(&blk[4..8]));
        c = c.wrapping_add(le_word(&blk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }
    let tail = blocks.remainder();
    let mut t = [0u8; 12];
    t[..tail.len()].copy_from_slice(tail);
    a = a.wrapping_add(le_word(&t[0..4]));
    b = b.wrapping_add(le_word(&t[4..8]));
    // Unlike stock lookup3, PostgreSQL keeps the lowest byte of c free in the tail, so bytes
    // 8..11 land one byte higher; and it runs the final mix even for an empty tail.
    c = c.wrapping_add(u32::from_le_bytes([0, t[8], t[9], t[10]]));
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// PostgreSQL's hash_uint32_extended: the same as hashing the word's 4 little-endian bytes,
/// without building them.
fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = seeded_state(4, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// hashint8extended(v, seed).
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    // Folding the high half in (inverted for negatives) makes every value that fits in int4
    // hash like hashint4extended, which is why widening int2/int4 keys is safe.
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_uint32_extended(folded, seed)
}

fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(HASH_COMBINE_CONST)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// The row hash satisfies_hash_partition compares: hash_combine64(0, type_hash(key, HASH_PARTITION_SEED)).
pub fn partition_hash(key: &KeyValue) -> u64 {
    let h = match key {
        KeyValue::Int(v) => hashint8extended(*v, HASH_PARTITION_SEED),
        KeyValue::Text(b) => hash_bytes_extended(b, HASH_PARTITION_SEED),
        KeyValue::Uuid(u) => hash_bytes_extended(u, HASH_PARTITION_SEED),
    };
    hash_combine64(0, h)
}

/// A geo hash column value of unknown type: the hash column's type is not in the map, so
/// integers and uuids are recognised by shape (text) or width (binary). Routers and moves
/// both place rows by it.
pub fn parse_loose(b: &[u8], binary: bool) -> KeyValue<'_> {
    if binary {
        return match b.len() {
            2 => KeyValue::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
            4 => KeyValue::Int(i64::from(i32::from_be_bytes(
                b.try_into().expect("4 bytes"),
            ))),
            8 => KeyValue::Int(i64::from_be_bytes(b.try_into().expect("8 bytes"))),
            16 => KeyValue::Uuid(b.try_into().expect("16 bytes")),
            _ => KeyValue::Text(b),
        };
    }
    parse_key("int8", b)
        .or_else(|_| parse_key("uuid", b))
        .unwrap_or(KeyValue::Text(b))
}

/// bucket for a power-of-two bucket count (row_hash & (buckets-1)); None if buckets is not a power of two.
pub fn bucket(key: &KeyValue, buckets: u32) -> Option<u32> {
    if !buckets.is_power_of_two() {
        return None;
    }
    let mask = u64::from(buckets - 1);
    u32::try_from(partition_hash(key) & mask).ok()
}

/// The immutable SQL expression computing the same bucket for column `col` of type `ty` ("int8"/"int4"/"int2"/"text"/"uuid"), usable in PG15 publication row filters, e.g. ((hashint8extended(col, 8816678312871386365) & 4095) + 2275) & 4095.
pub fn bucket_sql(col: &str, ty: &str, buckets: u32) -> Option<String> {
    if !buckets.is_power_of_two() {
        return None;
    }
    // hashint8extended for every integer width: int2/int4 columns get an implicit widening cast,
    // and the expression stays the same if the column is later widened.
    let func = match KeyType::from_name(ty)? {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => "hashint8extended",
        KeyType::Text | KeyType::Varchar => "hashtextextended",
        KeyType::Uuid => "uuid_hash_extended",
    };
    let ident = quote_ident(col)?;
    let mask = u64::from(buckets - 1);
    // Only the low bits of the sum matter, so adding the combine constant's low bits after
    // masking equals masking the full 64-bit row hash, without overflowing int8 in SQL.
    let offset = HASH_COMBINE_CONST & mask;
    Some(format!(
        "(({func}({ident}, {HASH_PARTITION_SEED}) & {mask}) + {offset}) & {mask}"
    ))
}

/// PostgreSQL keywords (PG15 `pg_get_keywords()` categories R, T and C) that quote_ident quotes.
#[rustfmt::skip]
const QUOTED_KEYWORDS: &[&str] = &[
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "between", "bigint", "binary", "bit", "boolean", "both", "case", "cast",
    "char", "character", "check", "coalesce", "collate", "collation", "column", "concurrently",
    "constraint", "create", "cross", "current_catalog", "current_date", "current_role",
    "current_schema", "current_time", "current_timestamp", "current_user", "dec", "decimal",
    "default", "deferrable", "desc", "distinct", "do", "else", "end", "except", "exists",
    "extract", "false", "fetch", "float", "for", "foreign", "freeze", "from", "full", "grant",
    "greatest", "group", "grouping", "having", "ilike", "in", "initially", "inner", "inout", "int",
    "integer", "intersect", "interval", "into", "is", "isnull", "join", "lateral", "leading",
    "least", "left", "like", "limit", "localtime", "localtimestamp", "national", "natural",
    "nchar", "none", "normalize", "not", "notnull", "null", "nullif", "numeric", "offset", "on",
    "only", "or", "order", "out", "outer", "overlaps", "overlay", "placing", "position",
    "precision", "primary", "real", "references", "returning", "right", "row", "select",
    "session_user", "setof", "similar", "smallint", "some", "substring", "symmetric", "table",
    "tablesample", "then", "time", "timestamp", "to", "trailing", "treat", "trim", "true", "union",
    "unique", "user", "using", "values", "varchar", "variadic", "verbose", "when", "where",
    "window", "with", "xmlattributes", "xmlconcat", "xmlelement", "xmlexists", "xmlforest",
    "xmlnamespaces", "xmlparse", "xmlpi", "xmlroot", "xmlserialize", "xmltable",
];

/// Quotes a bare column name the way PostgreSQL's quote_ident does, so names like "order" or
/// "UserId" still refer to the right column; None for names SQL cannot express.
pub fn quote_ident(name: &str) -> Option<String> {
    if name.is_empty() || name.contains('\0') {
        return None;
    }
    let mut chars = name.chars();
    let simple = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if simple && !QUOTED_KEYWORDS.contains(&name) {
        return Some(name.to_owned());
    }
    Some(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Parses a key from its text form for a column type (as it would arrive in a query literal or a text-format Bind parameter): "int2"/"int4"/"int8" (decimal, optional sign, surrounding spaces allowed, range-checked for the width), "text"/"varchar" (bytes as is), "uuid" (canonical 8-4-4-4-12 hex, case-insensitive, also braces/no-hyphen forms PostgreSQL accepts). Errors for anything else.
pub fn parse_key<'a>(ty: &str, text: &'a [u8]) -> Result<KeyValue<'a>, KeyError> {
    let kt = KeyType::parse(ty)?;
    match kt {
        KeyType::Int2 => parse_int(kt, text, i64::from(i16::MIN), i64::from(i16::MAX)),
        KeyType::Int4 => parse_int(kt, text, i64::from(i32::MIN), i64::from(i32::MAX)),
        KeyType::Int8 => parse_int(kt, text, i64::MIN, i64::MAX),
        KeyType::Text | KeyType::Varchar => checked_text(kt, text),
        KeyType::Uuid => parse_uuid(text)
            .map(KeyValue::Uuid)
            .ok_or_else(|| invalid(kt, text)),
    }
}

/// Parses a binary-format Bind parameter (int2: 2 bytes BE, int4: 4, int8: 8, uuid: 16, text: raw).
pub fn parse_key_binary<'a>(ty: &str, raw: &'a [u8]) -> Result<KeyValue<'a>, KeyError> {
    let kt = KeyType::parse(ty)?;
    let wrong_len = |expected: usize| KeyError::BinaryLength {
        ty: kt.name(),
        expected,
        got: raw.len(),
    };
    match kt {
        // Any integer width: a column or parameter of another integer type than the
        // distribution's (an int4 column of an int8 distribution) hashes the same value alike.
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => match raw.len() {
            2 => Ok(KeyValue::Int(i64::from(i16::from_be_bytes([
                raw[0], raw[1],
            ])))),
            4 => Ok(KeyValue::Int(i64::from(i32::from_be_bytes([
                raw[0], raw[1], raw[2], raw[3],
            ])))),
            8 => Ok(KeyValue::Int(i64::from_be_bytes(
                raw.try_into().expect("8 bytes"),
            ))),
            _ => Err(wrong_len(match kt {
                KeyType::Int2 => 2,
                KeyType::Int4 => 4,
                _ => 8,
            })),
        },
        KeyType::Uuid => <[u8; 16]>::try_from(raw)
            .map(KeyValue::Uuid)
            .map_err(|_| wrong_len(16)),
        // textrecv validates the encoding too, so the same rule applies to binary text.
        KeyType::Text | KeyType::Varchar => checked_text(kt, raw),
    }
}

fn invalid(kt: KeyType, text: &[u8]) -> KeyError {
    KeyError::Invalid {
        ty: kt.name(),
        value: echo(text),
    }
}

/// A UTF-8 server stores neither invalid UTF-8 nor NUL in text, so such a key has no row to place.
fn checked_text(kt: KeyType, text: &[u8]) -> Result<KeyValue<'_>, KeyError> {
    if text.contains(&0) || std::str::from_utf8(text).is_err() {
        return Err(KeyError::BadText { ty: kt.name() });
    }
    Ok(KeyValue::Text(text))
}

/// The whitespace C's isspace() accepts, which is what PostgreSQL's integer input trims.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// PostgreSQL 15 integer input: trimmed C whitespace, optional sign, at least one decimal digit
/// (no underscores or radix prefixes, which only PG16 accepts).
fn parse_int(kt: KeyType, text: &[u8], min: i64, max: i64) -> Result<KeyValue<'static>, KeyError> {
    let start = text
        .iter()
        .position(|&b| !is_c_space(b))
        .unwrap_or(text.len());
    let end = text
        .iter()
        .rposition(|&b| !is_c_space(b))
        .map_or(start, |p| p + 1);
    let body = text.get(start..end).unwrap_or_default();
    let (neg, digits) = match body.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, body),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid(kt, text));
    }
    let out_of_range = || KeyError::OutOfRange {
        ty: kt.name(),
        value: echo(text),
    };
    // Magnitude in u64 so i64::MIN's magnitude fits; any overflow is out of range for every width.
    let mut mag: u64 = 0;
    for &d in digits {
        mag = mag
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(d - b'0')))
            .ok_or_else(out_of_range)?;
    }
    let wide = if neg {
        -i128::from(mag)
    } else {
        i128::from(mag)
    };
    if wide < i128::from(min) || wide > i128::from(max) {
        return Err(out_of_range());
    }
    i64::try_from(wide)
        .map(KeyValue::Int)
        .map_err(|_| out_of_range())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// PostgreSQL's uuid input: optional surrounding braces, 32 hex digits, and at most one hyphen
/// after any complete group of four digits except the last; no whitespace.
fn parse_uuid(text: &[u8]) -> Option<[u8; 16]> {
    let (braced, mut rest) = match text.split_first() {
        Some((b'{', r)) => (true, r),
        _ => (false, text),
    };
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        let (pair, r) = rest.split_first_chunk::<2>()?;
        *byte = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        rest = r;
        if i % 2 == 1 && i < 15 {
            if let Some((b'-', r)) = rest.split_first() {
                rest = r;
            }
        }
    }
    if braced {
        rest = rest.strip_prefix(b"}")?;
    }
    rest.is_empty().then_some(out)
}

#[cfg(test)]
mod tests;
