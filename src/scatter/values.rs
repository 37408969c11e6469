//! Typed comparison and formatting of column values as the shards sent them (text or binary
//! format), so merged rows sort and aggregate as PostgreSQL would have.
//!
//! Text-like types compare by bytes, i.e. as the "C" collation: a database with another
//! collation sorts differently on each shard, and the k-way merge then interleaves shards in
//! byte order. Datetime values must be in ISO DateStyle (PostgreSQL's default).

use std::cmp::Ordering;

use super::decimal::Numeric;
use super::merge::MergeError;

/// How a column's values are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float4,
    Float8,
    Numeric,
    /// text, varchar, name, "char", bytea (its hex output sorts like its bytes), time.
    Bytes,
    /// char(n): trailing spaces are insignificant.
    Bpchar,
    Bool,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    Other,
}

/// A result column's type as announced in RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColType {
    pub oid: i32,
    pub binary: bool,
    pub kind: Kind,
}

/// Type OIDs from pg_type that the merger knows.
pub mod oid {
    pub const BOOL: i32 = 16;
    pub const BYTEA: i32 = 17;
    pub const CHAR: i32 = 18;
    pub const NAME: i32 = 19;
    pub const INT8: i32 = 20;
    pub const INT2: i32 = 21;
    pub const INT4: i32 = 23;
    pub const TEXT: i32 = 25;
    pub const OID: i32 = 26;
    pub const FLOAT4: i32 = 700;
    pub const FLOAT8: i32 = 701;
    pub const BPCHAR: i32 = 1042;
    pub const VARCHAR: i32 = 1043;
    pub const DATE: i32 = 1082;
    pub const TIME: i32 = 1083;
    pub const TIMESTAMP: i32 = 1114;
    pub const TIMESTAMPTZ: i32 = 1184;
    pub const NUMERIC: i32 = 1700;
    pub const UUID: i32 = 2950;
}

impl ColType {
    /// Classifies a column from its type OID and format code.
    pub fn new(type_oid: i32, format: i16) -> ColType {
        let binary = format == 1;
        let kind = match type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Kind::Int,
            oid::FLOAT4 => Kind::Float4,
            oid::FLOAT8 => Kind::Float8,
            oid::NUMERIC => Kind::Numeric,
            oid::TEXT | oid::VARCHAR | oid::NAME | oid::CHAR => Kind::Bytes,
            // Binary bytea is the raw bytes, text bytea the \x hex form: both sort as bytes.
            oid::BYTEA => Kind::Bytes,
            oid::TIME if !binary => Kind::Bytes,
            oid::TIME => Kind::Int,
            oid::BPCHAR => Kind::Bpchar,
            oid::BOOL => Kind::Bool,
            oid::DATE => Kind::Date,
            oid::TIMESTAMP => Kind::Timestamp,
            oid::TIMESTAMPTZ => Kind::TimestampTz,
            oid::UUID => Kind::Uuid,
            _ => Kind::Other,
        };
        ColType {
            oid: type_oid,
            binary,
            kind,
        }
    }

    /// Whether values of this column can be ordered.
    pub fn comparable(&self) -> bool {
        self.kind != Kind::Other
    }

    /// Orders two non-NULL values as PostgreSQL's default btree operator class would.
    pub fn compare(&self, a: &[u8], b: &[u8]) -> Result<Ordering, MergeError> {
        let bad = || {
            MergeError::Unsupported(format!(
                "cannot interpret a value of type oid {} for merging",
                self.oid
            ))
        };
        Ok(match (self.kind, self.binary) {
            (Kind::Int | Kind::Date | Kind::Timestamp | Kind::TimestampTz, true) => {
                // Binary dates and timestamps are integers whose infinities are the extremes.
                self.int(a)
                    .ok_or_else(bad)?
                    .cmp(&self.int(b).ok_or_else(bad)?)
            }
            (Kind::Int, false) => self
                .int(a)
                .ok_or_else(bad)?
                .cmp(&self.int(b).ok_or_else(bad)?),
            (Kind::Float4 | Kind::Float8, _) => cmp_float(
                self.float(a).ok_or_else(bad)?,
                self.float(b).ok_or_else(bad)?,
            ),
            (Kind::Numeric, _) => self
                .numeric(a)
                .ok_or_else(bad)?
                .cmp_value(&self.numeric(b).ok_or_else(bad)?),
            (Kind::Bytes, _) => a.cmp(b),
            (Kind::Bpchar, _) => trim_spaces(a).cmp(trim_spaces(b)),
            (Kind::Bool, _) => self
                .bool(a)
                .ok_or_else(bad)?
                .cmp(&self.bool(b).ok_or_else(bad)?),
            (Kind::Uuid, true) => a.cmp(b),
            // Output is lowercase hex in fixed positions, so bytes order like the 16-byte value.
            (Kind::Uuid, false) => a.to_ascii_lowercase().cmp(&b.to_ascii_lowercase()),
            (Kind::Date | Kind::Timestamp | Kind::TimestampTz, false) => parse_datetime(a)
                .ok_or_else(bad)?
                .cmp(&parse_datetime(b).ok_or_else(bad)?),
            (Kind::Other, _) => {
                return Err(MergeError::Unsupported(format!(
                    "ordering on type oid {} is not supported",
                    self.oid
                )))
            }
        })
    }

    /// An integer value (int2/4/8, oid; binary dates and timestamps).
    pub fn int(&self, v: &[u8]) -> Option<i64> {
        if !self.binary {
            return std::str::from_utf8(v).ok()?.parse().ok();
        }
        Some(match v.len() {
            2 => i16::from_be_bytes(v.try_into().ok()?) as i64,
            4 if self.oid == oid::OID => u32::from_be_bytes(v.try_into().ok()?) as i64,
            4 => i32::from_be_bytes(v.try_into().ok()?) as i64,
            8 => i64::from_be_bytes(v.try_into().ok()?),
            _ => return None,
        })
    }

    /// A numeric value, or an integer one as numeric (text or binary format).
    pub fn numeric(&self, v: &[u8]) -> Option<Numeric> {
        match (self.kind, self.binary) {
            (Kind::Numeric, false) => Numeric::parse(v),
            (Kind::Numeric, true) => Numeric::from_binary(v),
            (Kind::Int, _) => Numeric::parse(self.int(v)?.to_string().as_bytes()),
            _ => None,
        }
    }

    /// Encodes a numeric in this column's format.
    pub fn encode_numeric(&self, v: &Numeric) -> Vec<u8> {
        if self.binary {
            v.to_binary()
        } else {
            v.format()
        }
    }

    /// A float4/float8 value.
    pub fn float(&self, v: &[u8]) -> Option<f64> {
        if self.binary {
            return match v.len() {
                4 => Some(f32::from_be_bytes(v.try_into().ok()?) as f64),
                8 => Some(f64::from_be_bytes(v.try_into().ok()?)),
                _ => None,
            };
        }
        match v {
            b"NaN" => Some(f64::NAN),
            b"Infinity" => Some(f64::INFINITY),
            b"-Infinity" => Some(f64::NEG_INFINITY),
            _ => std::str::from_utf8(v).ok()?.parse().ok(),
        }
    }

    /// A bool value.
    pub fn bool(&self, v: &[u8]) -> Option<bool> {
        match (self.binary, v) {
            (true, [b]) => Some(*b != 0),
            (false, b"t") => Some(true),
            (false, b"f") => Some(false),
            _ => None,
        }
    }

    /// Encodes an integer in this column's type and format; None if out of the type's range.
    pub fn encode_int(&self, v: i64) -> Option<Vec<u8>> {
        let width = match self.oid {
            oid::INT2 => 2,
            oid::INT4 | oid::OID => 4,
            _ => 8,
        };
        let fits = match self.oid {
            oid::INT2 => i16::try_from(v).is_ok(),
            oid::INT4 => i32::try_from(v).is_ok(),
            oid::OID => u32::try_from(v).is_ok(),
            _ => true,
        };
        if !fits {
            return None;
        }
        Some(if self.binary {
            v.to_be_bytes()[8 - width..].to_vec()
        } else {
            v.to_string().into_bytes()
        })
    }

    /// Encodes a float in this column's type and format.
    pub fn encode_float(&self, v: f64) -> Vec<u8> {
        match (self.binary, self.kind) {
            (true, Kind::Float4) => (v as f32).to_be_bytes().to_vec(),
            (true, _) => v.to_be_bytes().to_vec(),
            (false, Kind::Float4) => format_float(v, true).into_bytes(),
            (false, _) => format_float(v, false).into_bytes(),
        }
    }

    /// Encodes a bool in this column's format.
    pub fn encode_bool(&self, v: bool) -> Vec<u8> {
        match (self.binary, v) {
            (true, v) => vec![v as u8],
            (false, true) => b"t".to_vec(),
            (false, false) => b"f".to_vec(),
        }
    }
}

fn trim_spaces(v: &[u8]) -> &[u8] {
    let end = v.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    &v[..end]
}

/// PostgreSQL's float order: NaN equals NaN and is above everything, -0 equals 0.
pub fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Formats a float like float4out/float8out with the default extra_float_digits (shortest
/// round-trip digits; exponent form below 1e-4 and from 1e15, or 1e6 for float4).
pub fn format_float(v: f64, float4: bool) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = if float4 {
        format!("{:e}", v as f32)
    } else {
        format!("{v:e}")
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let limit = if float4 { 6 } else { 15 };
    if exp < -4 || exp >= limit {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{sign}{digits}{}", "0".repeat(int_len - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// A date / timestamp / timestamptz in ISO output as microseconds since 1970-01-01 UTC
/// (offsets applied), with the infinities at the ends.
pub fn parse_datetime(v: &[u8]) -> Option<i128> {
    match v {
        b"infinity" => return Some(i128::MAX),
        b"-infinity" => return Some(i128::MIN),
        _ => {}
    }
    let s = std::str::from_utf8(v).ok()?;
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(s) => (s, true),
        None => (s, false),
    };
    let (date, time) = s.split_once(' ').unwrap_or((s, ""));
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let year = if bc { 1 - year } else { year };
    let mut micros = days_from_civil(year, month, day) as i128 * 86_400_000_000;
    if time.is_empty() {
        return Some(micros);
    }
    let zone_at = time.find(['+', '-']).unwrap_or(time.len());
    let (clock, zone) = time.split_at(zone_at);
    let mut parts = clock.splitn(3, ':');
    let h: i128 = parts.next()?.parse().ok()?;
    let m: i128 = parts.next()?.parse().ok()?;
    let sec = parts.next()?;
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let whole: i128 = whole.parse().ok()?;
    let mut frac_us: i128 = 0;
    for i in 0..6 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| (b - b'0') as i128);
        frac_us = frac_us * 10 + digit;
    }
    micros += ((h * 60 + m) * 60 + whole) * 1_000_000 + frac_us;
    if !zone.is_empty() {
        let negative = zone.starts_with('-');
        let mut secs = 0i128;
        for (i, p) in zone[1..].split(':').enumerate() {
            let p: i128 = p.parse().ok()?;
            secs += p * [3600, 60, 1].get(i)?;
        }
        // Local time = UTC + offset, so UTC = local - offset.
        micros -= if negative { -secs } else { secs } * 1_000_000;
    }
    Some(micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs printed by PostgreSQL 15 for the same values.
    #[test]
    fn floats_format_like_postgres() {
        let f8 = [
            (1e15, "1e+15"),
            (1e14, "100000000000000"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e300, "1.5e+300"),
            (-2.5e-7, "-2.5e-07"),
            (0.1 + 0.2, "0.30000000000000004"),
            (7.75, "7.75"),
            (-0.0, "-0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (v, want) in f8 {
            assert_eq!(format_float(v, false), want);
        }
        let f4 = [
            (1e6, "1e+06"),
            (1e5, "100000"),
            (123456.7, "123456.7"),
            (1234567.8, "1.2345678e+06"),
            (7.3, "7.3"),
        ];
        for (v, want) in f4 {
            assert_eq!(format_float(v, true), want);
        }
    }

    #[test]
    fn datetimes_order_across_offsets_and_eras() {
        let t = |s: &str| parse_datetime(s.as_bytes()).unwrap();
        // The autumn DST hour: later instant, smaller local time.
        assert!(t("2024-10-27 02:30:00+02") < t("2024-10-27 02:15:00+01"));
        assert!(t("0044-03-15 BC") < t("0001-01-01"));
        assert!(t("9999-12-31") < t("10000-01-01"));
        assert!(t("2020-01-01 00:00:00.5") > t("2020-01-01 00:00:00.499999"));
        assert_eq!(t("1970-01-01 05:30:00+05:30"), 0);
        assert_eq!(
            t("1900-01-01 00:19:32+00:19:32"),
            t("1900-01-01 00:00:00+00")
        );
        assert!(t("-infinity") < t("0044-03-15 BC") && t("infinity") > t("10000-01-01"));
        assert_eq!(t("1970-01-02"), 86_400_000_000);
    }

    #[test]
    fn typed_compare() {
        let int = ColType::new(oid::INT4, 0);
        assert_eq!(int.compare(b"9", b"10").unwrap(), Ordering::Less);
        let f = ColType::new(oid::FLOAT8, 0);
        assert_eq!(f.compare(b"NaN", b"Infinity").unwrap(), Ordering::Greater);
        assert_eq!(f.compare(b"-0", b"0").unwrap(), Ordering::Equal);
        let bin = ColType::new(oid::INT8, 1);
        assert_eq!(
            bin.compare(&(-5i64).to_be_bytes(), &3i64.to_be_bytes())
                .unwrap(),
            Ordering::Less
        );
        let bp = ColType::new(oid::BPCHAR, 0);
        assert_eq!(bp.compare(b"a  ", b"a").unwrap(), Ordering::Equal);
        assert!(ColType::new(1186, 0).compare(b"1 day", b"2 days").is_err());
        assert!(ColType::new(oid::INT4, 0).compare(b"x", b"1").is_err());
        assert_eq!(
            ColType::new(oid::INT4, 1).encode_int(-2),
            Some(vec![255, 255, 255, 254])
        );
        assert_eq!(ColType::new(oid::INT2, 0).encode_int(40000), None);
        assert_eq!(
            ColType::new(oid::INT8, 0).encode_int(40000),
            Some(b"40000".to_vec())
        );
    }
}
