//! Exact arithmetic on PostgreSQL `numeric` text values.
//!
//! Numeric can carry up to 131072 digits before the point, far beyond any fixed-width decimal
//! crate, so values stay digit strings and the few operations the merger needs (compare, add,
//! divide by a row count) are done digit by digit.

use std::cmp::Ordering;

/// A parsed numeric value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numeric {
    NaN,
    PosInf,
    NegInf,
    /// `digits` are ASCII decimal digits without leading zeros (empty for zero) holding the
    /// value times 10^scale; `scale` is the display scale (digits after the point), kept
    /// because PostgreSQL's output and division depend on it.
    Finite {
        negative: bool,
        digits: Vec<u8>,
        scale: usize,
    },
}

impl Numeric {
    /// Parses PostgreSQL's numeric output (no exponent); None for anything else.
    pub fn parse(s: &[u8]) -> Option<Numeric> {
        match s {
            b"NaN" => return Some(Numeric::NaN),
            b"Infinity" => return Some(Numeric::PosInf),
            b"-Infinity" => return Some(Numeric::NegInf),
            _ => {}
        }
        let (negative, rest) = match s.first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = match rest.iter().position(|&b| b == b'.') {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.iter().chain(frac).all(u8::is_ascii_digit) {
            return None;
        }
        let mut digits: Vec<u8> = int.iter().chain(frac).copied().collect();
        strip_leading_zeros(&mut digits);
        let negative = negative && !digits.is_empty();
        Some(Numeric::Finite {
            negative,
            digits,
            scale: frac.len(),
        })
    }

    /// Decodes numeric's binary format (numeric_send: ndigits, weight, sign, dscale, then
    /// base-10000 digits); None if malformed.
    pub fn from_binary(b: &[u8]) -> Option<Numeric> {
        let word =
            |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])) };
        let ndigits = word(0)? as usize;
        let weight = word(2)? as i16 as i64;
        let sign = word(4)?;
        let dscale = word(6)? as usize;
        if b.len() != 8 + 2 * ndigits {
            return None;
        }
        let negative = match sign {
            0x0000 => false,
            0x4000 => true,
            0xC000 => return Some(Numeric::NaN),
            0xD000 => return Some(Numeric::PosInf),
            0xF000 => return Some(Numeric::NegInf),
            _ => return None,
        };
        // All groups as decimal digits, the point after (weight + 1) groups.
        let mut all = Vec::with_capacity(4 * ndigits + 4);
        for i in 0..ndigits {
            let d = word(8 + 2 * i)?;
            if d > 9999 {
                return None;
            }
            all.extend_from_slice(format!("{d:04}").as_bytes());
        }
        let mut point = 4 * (weight + 1);
        if point < 0 {
            let mut padded = vec![b'0'; (-point) as usize];
            padded.extend_from_slice(&all);
            all = padded;
            point = 0;
        }
        let point = point as usize;
        if all.len() < point {
            all.resize(point, b'0');
        }
        // value * 10^dscale: digits after dscale are zero in a normalised value.
        all.resize(point + dscale, b'0');
        strip_leading_zeros(&mut all);
        Some(Numeric::Finite {
            negative: negative && !all.is_empty(),
            digits: all,
            scale: dscale,
        })
    }

    /// Encodes in numeric's binary format, as numeric_send would.
    pub fn to_binary(&self) -> Vec<u8> {
        let header = |ndigits: usize, weight: i16, sign: u16, dscale: usize| {
            let mut out = Vec::with_capacity(8 + 2 * ndigits);
            out.extend_from_slice(&(ndigits as u16).to_be_bytes());
            out.extend_from_slice(&weight.to_be_bytes());
            out.extend_from_slice(&sign.to_be_bytes());
            out.extend_from_slice(&(dscale as u16).to_be_bytes());
            out
        };
        let (negative, digits, scale) = match self {
            Numeric::NaN => return header(0, 0, 0xC000, 0),
            Numeric::PosInf => return header(0, 0, 0xD000, 0),
            Numeric::NegInf => return header(0, 0, 0xF000, 0),
            Numeric::Finite {
                negative,
                digits,
                scale,
            } => (*negative, digits, *scale),
        };
        let mut all = vec![b'0'; (scale + 1).saturating_sub(digits.len())];
        all.extend_from_slice(digits);
        let split = all.len() - scale;
        let mut int = vec![b'0'; (4 - split % 4) % 4];
        int.extend_from_slice(&all[..split]);
        let mut frac = all[split..].to_vec();
        frac.resize(frac.len().div_ceil(4) * 4, b'0');
        let group = |g: &[u8]| g.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        let mut groups: Vec<u16> = int.chunks(4).chain(frac.chunks(4)).map(group).collect();
        let mut weight = (int.len() / 4) as i64 - 1;
        let lead = groups.iter().take_while(|&&g| g == 0).count();
        groups.drain(..lead);
        weight -= lead as i64;
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let sign = if negative && !groups.is_empty() {
            0x4000
        } else {
            0
        };
        let mut out = header(groups.len(), weight as i16, sign, scale);
        for g in groups {
            out.extend_from_slice(&g.to_be_bytes());
        }
        out
    }

    /// Formats as PostgreSQL prints it (display scale kept, no exponent).
    pub fn format(&self) -> Vec<u8> {
        match self {
            Numeric::NaN => b"NaN".to_vec(),
            Numeric::PosInf => b"Infinity".to_vec(),
            Numeric::NegInf => b"-Infinity".to_vec(),
            Numeric::Finite {
                negative,
                digits,
                scale,
            } => {
                let mut out = Vec::with_capacity(digits.len() + 3);
                if *negative {
                    out.push(b'-');
                }
                let pad = (scale + 1).saturating_sub(digits.len());
                let mut all = vec![b'0'; pad];
                all.extend_from_slice(digits);
                let split = all.len() - scale;
                out.extend_from_slice(&all[..split]);
                if *scale > 0 {
                    out.push(b'.');
                    out.extend_from_slice(&all[split..]);
                }
                out
            }
        }
    }

    /// Total order as PostgreSQL sorts numeric: -Infinity < finite < Infinity < NaN.
    pub fn cmp_value(&self, other: &Numeric) -> Ordering {
        use Numeric::*;
        let rank = |n: &Numeric| match n {
            NegInf => 0,
            Finite { .. } => 1,
            PosInf => 2,
            NaN => 3,
        };
        match (self, other) {
            (
                Finite {
                    negative: na,
                    digits: da,
                    scale: sa,
                },
                Finite {
                    negative: nb,
                    digits: db,
                    scale: sb,
                },
            ) => {
                let mag = cmp_magnitude(da, *sa, db, *sb);
                match (na, nb) {
                    (false, false) => mag,
                    (true, true) => mag.reverse(),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }

    /// Exact sum; the display scale is the larger of the two, as in PostgreSQL.
    pub fn add(&self, other: &Numeric) -> Numeric {
        use Numeric::*;
        match (self, other) {
            (NaN, _) | (_, NaN) | (PosInf, NegInf) | (NegInf, PosInf) => NaN,
            (PosInf, _) | (_, PosInf) => PosInf,
            (NegInf, _) | (_, NegInf) => NegInf,
            (
                Finite {
                    negative: na,
                    digits: da,
                    scale: sa,
                },
                Finite {
                    negative: nb,
                    digits: db,
                    scale: sb,
                },
            ) => {
                let scale = (*sa).max(*sb);
                let a = rescale(da, *sa, scale);
                let b = rescale(db, *sb, scale);
                if na == nb {
                    let digits = add_digits(&a, &b);
                    return Finite {
                        negative: *na && !digits.is_empty(),
                        digits,
                        scale,
                    };
                }
                match cmp_digits(&a, &b) {
                    Ordering::Equal => Finite {
                        negative: false,
                        digits: Vec::new(),
                        scale,
                    },
                    Ordering::Greater => Finite {
                        negative: *na,
                        digits: sub_digits(&a, &b),
                        scale,
                    },
                    Ordering::Less => Finite {
                        negative: *nb,
                        digits: sub_digits(&b, &a),
                        scale,
                    },
                }
            }
        }
    }

    /// `self / count` with numeric_div's result scale and rounding (half away from zero),
    /// which is how PostgreSQL's avg finishes for integer and numeric input.
    pub fn div_count(&self, count: u64) -> Option<Numeric> {
        let Numeric::Finite {
            negative,
            digits,
            scale,
        } = self
        else {
            return Some(self.clone());
        };
        if count == 0 {
            return None;
        }
        let rscale = div_scale(digits, *scale, count);
        // digits / 10^scale / count at rscale digits, plus one guard digit for rounding.
        let mut num = digits.clone();
        num.extend(std::iter::repeat_n(
            b'0',
            rscale + 1 - (*scale).min(rscale + 1),
        ));
        let drop = (*scale).saturating_sub(rscale + 1);
        num.truncate(num.len().saturating_sub(drop));
        let (mut q, _) = div_small(&num, count as u128);
        let guard = q.pop().unwrap_or(b'0');
        if guard >= b'5' {
            q = add_digits(&q, b"1");
        }
        strip_leading_zeros(&mut q);
        Some(Numeric::Finite {
            negative: *negative && !q.is_empty(),
            digits: q,
            scale: rscale,
        })
    }
}

/// numeric_div's choice of result scale: at least 16 significant digits, never less than the
/// dividend's display scale. PostgreSQL reasons in base-10000 digits, so the estimate of the
/// quotient's weight is made on those groups to land on the same scale.
fn div_scale(digits: &[u8], scale: usize, count: u64) -> usize {
    let (w1, f1) = base10000_lead(digits, scale);
    let c = count.to_string();
    let (w2, f2) = base10000_lead(c.as_bytes(), 0);
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    let rscale = 16 - qweight * 4;
    rscale.max(scale as i64).clamp(0, 1000) as usize
}

/// Weight and value of the first non-zero base-10000 digit of digits×10^-scale.
fn base10000_lead(digits: &[u8], scale: usize) -> (i64, u32) {
    if digits.is_empty() {
        return (0, 0);
    }
    // Pad so the point falls on a group boundary, then group from the point outwards.
    let frac_pad = (4 - scale % 4) % 4;
    let int_len = digits.len() as i64 - scale as i64;
    let int_pad = (4 - int_len.rem_euclid(4)) % 4;
    let mut padded = vec![b'0'; int_pad as usize];
    padded.extend_from_slice(digits);
    padded.extend(std::iter::repeat_n(b'0', frac_pad));
    let int_groups = (int_len + int_pad) / 4;
    for (i, g) in padded.chunks(4).enumerate() {
        let v = g.iter().fold(0u32, |a, d| a * 10 + (d - b'0') as u32);
        if v != 0 {
            return (int_groups - 1 - i as i64, v);
        }
    }
    (0, 0)
}

fn strip_leading_zeros(d: &mut Vec<u8>) {
    let nz = d.iter().position(|&b| b != b'0').unwrap_or(d.len());
    d.drain(..nz);
}

fn rescale(digits: &[u8], from: usize, to: usize) -> Vec<u8> {
    let mut v = digits.to_vec();
    if !v.is_empty() {
        v.extend(std::iter::repeat_n(b'0', to - from));
    }
    v
}

fn cmp_digits(a: &[u8], b: &[u8]) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn cmp_magnitude(da: &[u8], sa: usize, db: &[u8], sb: usize) -> Ordering {
    let s = sa.max(sb);
    cmp_digits(&rescale(da, sa, s), &rescale(db, sb, s))
}

fn add_digits(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let (mut i, mut j, mut carry) = (a.len(), b.len(), 0u8);
    while i > 0 || j > 0 || carry > 0 {
        let mut s = carry;
        if i > 0 {
            i -= 1;
            s += a[i] - b'0';
        }
        if j > 0 {
            j -= 1;
            s += b[j] - b'0';
        }
        out.push(b'0' + s % 10);
        carry = s / 10;
    }
    out.reverse();
    strip_leading_zeros(&mut out);
    out
}

/// a - b for a >= b.
fn sub_digits(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let (mut j, mut borrow) = (b.len(), 0i8);
    for i in (0..a.len()).rev() {
        let mut d = (a[i] - b'0') as i8 - borrow;
        if j > 0 {
            j -= 1;
            d -= (b[j] - b'0') as i8;
        }
        borrow = (d < 0) as i8;
        out.push(b'0' + (d + 10 * borrow) as u8);
    }
    out.reverse();
    strip_leading_zeros(&mut out);
    out
}

/// Long division of a digit string by a small divisor: quotient digits (same length as the
/// input, leading zeros kept) and remainder.
fn div_small(num: &[u8], divisor: u128) -> (Vec<u8>, u128) {
    let mut rem = 0u128;
    let q = num
        .iter()
        .map(|&d| {
            rem = rem * 10 + (d - b'0') as u128;
            let q = rem / divisor;
            rem %= divisor;
            b'0' + q as u8
        })
        .collect();
    (q, rem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Numeric {
        Numeric::parse(s.as_bytes()).unwrap()
    }
    fn f(v: &Numeric) -> String {
        String::from_utf8(v.format()).unwrap()
    }

    #[test]
    fn binary_format_round_trips() {
        let enc = |s: &str| n(s).to_binary();
        // numeric_send(12345.678): 3 digits, weight 1, positive, dscale 3: 1 2345 6780.
        assert_eq!(
            enc("12345.678"),
            [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C]
        );
        // 0.0001: one digit 1 at weight -1; -5.00: digit 5, weight 0, dscale 2.
        assert_eq!(enc("0.0001"), [0, 1, 0xFF, 0xFF, 0, 0, 0, 4, 0, 1]);
        assert_eq!(enc("-5.00"), [0, 1, 0, 0, 0x40, 0, 0, 2, 0, 5]);
        assert_eq!(enc("0.00"), [0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(enc("100000000"), [0, 1, 0, 2, 0, 0, 0, 0, 0, 1]);
        for s in [
            "0",
            "1",
            "-1",
            "12345.678",
            "0.0001",
            "-5.00",
            "100000000",
            "9999.9999",
            "-0.000012345",
            "123456789012345678901234567890.5",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            let back = Numeric::from_binary(&enc(s)).unwrap();
            assert_eq!(f(&back), s, "round trip of {s}");
        }
        assert_eq!(
            Numeric::from_binary(&[0, 1, 0, 0, 0, 0, 0, 0]),
            None,
            "short"
        );
    }

    #[test]
    fn adds_exactly() {
        assert_eq!(f(&n("0.1").add(&n("0.2"))), "0.3");
        assert_eq!(
            f(&n("9223372036854775807").add(&n("9223372036854775807"))),
            "18446744073709551614"
        );
        assert_eq!(f(&n("1.50").add(&n("-1.5"))), "0.00");
        assert_eq!(f(&n("-3").add(&n("1.25"))), "-1.75");
        assert_eq!(f(&n("0.001").add(&n("-0.01"))), "-0.009");
        assert_eq!(f(&n("Infinity").add(&n("5"))), "Infinity");
        assert_eq!(f(&n("Infinity").add(&n("-Infinity"))), "NaN");
        assert_eq!(f(&n("-0")), "0");
    }

    #[test]
    fn compares_like_postgres() {
        let mut v: Vec<Numeric> = [
            "NaN",
            "10",
            "-Infinity",
            "9.99",
            "-10.5",
            "0",
            "Infinity",
            "10.000",
            "-2",
        ]
        .iter()
        .map(|s| n(s))
        .collect();
        v.sort_by(|a, b| a.cmp_value(b));
        let s: Vec<String> = v.iter().map(f).collect();
        assert_eq!(
            s,
            [
                "-Infinity",
                "-10.5",
                "-2",
                "0",
                "9.99",
                "10",
                "10.000",
                "Infinity",
                "NaN"
            ]
        );
        assert_eq!(n("10").cmp_value(&n("10.000")), Ordering::Equal);
    }

    /// Expected strings printed by PostgreSQL 15 for the same avg / division.
    #[test]
    fn divides_with_postgres_scale() {
        let cases = [
            ("7", 3, "2.3333333333333333"),
            ("7000000", 3, "2333333.333333333333"),
            ("1", 3000, "0.00033333333333333333"),
            ("7.75", 3, "2.5833333333333333"),
            ("7.373456789", 3, "2.4578189296666667"),
            ("1000000000006", 3, "333333333335.33333333"),
            ("30", 2, "15.0000000000000000"),
            ("100000000000000000001", 2, "50000000000000000001"),
            ("0.0035", 3, "0.00116666666666666667"),
            ("-7", 3, "-2.3333333333333333"),
            ("0", 3, "0.00000000000000000000"),
            ("1", 10000, "0.000100000000000000000000"),
            ("5", 10001, "0.00049995000499950005"),
        ];
        for (s, c, want) in cases {
            assert_eq!(f(&n(s).div_count(c).unwrap()), want, "{s}/{c}");
        }
    }
}
