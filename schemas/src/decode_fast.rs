//! The decoder's fast path: a strict scanner for the common record — one flat JSON
//! object whose strings have no escapes — that fills the same slots, with the same
//! values, as the serde_json path, and parses numbers with lexical-core (correctly
//! rounded, like serde_json's `float_roundtrip`, and several times faster).
//!
//! It never rejects: on anything it does not handle exactly (an escape, a nested
//! value, a number out of f64's range, any syntax error) it answers `false`, and
//! the caller decodes the record with serde_json, which gives the reason. So a
//! record it accepts is one serde_json accepts with the same values; the property
//! test in `tests.rs` checks that on generated records.

use serde_json::{Number, Value};

pub(crate) use crate::key_index::KeyIndex;

/// Fill `slots` (indexed through `index`) from `bytes` when it is a flat JSON
/// object this path handles; `false` (slots left in any state) otherwise.
pub(crate) fn object(bytes: &[u8], index: &KeyIndex, slots: &mut [Option<Value>]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else { return false };
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return false;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return ws(b, i + 1) == b.len();
    }
    loop {
        let Some((key, after)) = string(text, i) else { return false };
        i = ws(b, after);
        if b.get(i) != Some(&b':') {
            return false;
        }
        i = ws(b, i + 1);
        let Some((value, after)) = scalar(text, i) else { return false };
        if let Some(slot) = index.get(key) {
            slots[slot] = Some(value);
        }
        i = ws(b, after);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => return ws(b, i + 1) == b.len(),
            _ => return false,
        }
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (8, little-endian) that end a plain string — a quote, a
/// backslash or a control character (below 0x20) — flagged in their high bits.
/// The lowest flag is exact (a borrow only runs upward from a flagged byte), so
/// its position is the first such byte; flags above it may be false.
#[inline]
fn stops(w: u64) -> u64 {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS)
}

/// A string without escapes or control characters starting at `i` (the quote):
/// its contents and the index after the closing quote. Scanned 8 bytes at a time
/// ([`stops`]), the last few one by one.
fn string(text: &str, i: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let mut j = start;
    let end = loop {
        match b.get(j..j + 8) {
            Some(chunk) => {
                let m = stops(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
                if m != 0 {
                    break j + (m.trailing_zeros() / 8) as usize;
                }
                j += 8;
            }
            None => break j + b[j..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?,
        }
    };
    (b[end] == b'"').then(|| (&text[start..end], end + 1))
}

/// A string, number, `true`, `false` or `null` at `i`, as serde_json's `Value`.
fn scalar(text: &str, i: usize) -> Option<(Value, usize)> {
    let b = text.as_bytes();
    match *b.get(i)? {
        b'"' => string(text, i).map(|(s, end)| (Value::String(s.to_string()), end)),
        b't' if b[i..].starts_with(b"true") => Some((Value::Bool(true), i + 4)),
        b'f' if b[i..].starts_with(b"false") => Some((Value::Bool(false), i + 5)),
        b'n' if b[i..].starts_with(b"null") => Some((Value::Null, i + 4)),
        b'-' | b'0'..=b'9' => number(b, i),
        _ => None,
    }
}

/// A JSON number at `i` (strict grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`),
/// as serde_json represents it: an integer as u64, or as i64 when negative
/// (`-0` and negatives below i64's range as f64), an integer beyond u64 or any
/// fraction or exponent as f64.
///
/// The digits are read once: up to 19 of them accumulate into a u64 as they are
/// checked. A float whose digits fit 2^53 and whose power of ten is within
/// ±22 is `m × 10^e` or `m / 10^-e` in one IEEE operation on two exact values:
/// correctly rounded (Clinger's fast path), as lexical-core and serde_json give
/// it. Anything else goes to lexical-core.
fn number(b: &[u8], i: usize) -> Option<(Value, usize)> {
    // Digits from `j`: (end, their value while it fits 19 digits, how many).
    let digits = |mut j: usize, mut m: u64, mut n: usize| {
        let s = j;
        while let Some(&c @ b'0'..=b'9') = b.get(j) {
            if n < 19 {
                m = m * 10 + u64::from(c - b'0');
            }
            n += 1;
            j += 1;
        }
        (j > s).then_some((j, m, n))
    };
    let negative = b[i] == b'-';
    let int_start = i + usize::from(negative);
    let (int_end, mut mant, mut count) = digits(int_start, 0, 0)?;
    if b[int_start] == b'0' && int_end > int_start + 1 {
        return None; // a leading zero
    }
    let mut end = int_end;
    let mut integer = true;
    let mut exp10: i64 = 0;
    if b.get(end) == Some(&b'.') {
        let (e, m, n) = digits(end + 1, mant, count)?;
        exp10 -= (e - end - 1) as i64;
        (end, mant, count, integer) = (e, m, n, false);
    }
    if matches!(b.get(end), Some(b'e' | b'E')) {
        let mut j = end + 1;
        let minus = b.get(j) == Some(&b'-');
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let (e, x, n) = digits(j, 0, 0)?;
        // Beyond 19 exponent digits the fast path is out of reach anyway.
        let x = if n > 18 { i64::MAX / 2 } else { x as i64 };
        exp10 = exp10.saturating_add(if minus { -x } else { x });
        (end, integer) = (e, false);
    }
    let exact = count <= 19;
    let float = || {
        const POW10: [f64; 23] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22];
        let x: f64 = if exact && mant <= 1 << 53 && (-22..=22).contains(&exp10) {
            let m = mant as f64;
            let x = if exp10 >= 0 { m * POW10[exp10 as usize] } else { m / POW10[(-exp10) as usize] };
            if negative { -x } else { x }
        } else {
            lexical_core::parse(&b[i..end]).ok()?
        };
        // Out of f64's range: serde_json refuses it; let it say so.
        Number::from_f64(x).filter(|_| x.is_finite())
    };
    let n = if integer {
        // serde_json's integer rules, so the same literal gives the same Number.
        // Up to 19 digits are in `mant`; longer ones are parsed (they may still fit u64).
        let sig = if exact { Some(mant) } else { std::str::from_utf8(&b[int_start..int_end]).ok()?.parse::<u64>().ok() };
        match sig {
            Some(sig) if !negative => Number::from(sig),
            Some(sig) => {
                let neg = (sig as i64).wrapping_neg();
                if neg >= 0 { Number::from_f64(-(sig as f64))? } else { Number::from(neg) }
            }
            None => float()?,
        }
    } else {
        float()?
    };
    Some((Value::Number(n), end))
}

/// An event time in the form `fmt_ms` writes and most producers send,
/// `YYYY-MM-DDTHH:MM:SS[.f…]Z` (1 to 9 fraction digits), as epoch milliseconds:
/// the value chrono's `parse_from_rfc3339` gives it (the fraction truncated to
/// milliseconds), without chrono's general parser. `None` for any other form
/// (an offset, a lower-case `t` or `z`, a space, a leap second, an invalid date,
/// more fraction digits): the caller asks chrono, which also words the reason.
pub(crate) fn rfc3339_utc_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let fixed = b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':' && b[b.len() - 1] == b'Z';
    if !fixed {
        return None;
    }
    let num = |d: &[u8]| d.iter().try_fold(0i64, |a, &c| c.is_ascii_digit().then(|| a * 10 + i64::from(c - b'0')));
    let (y, mo, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (h, mi, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let ms = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            num(digits)?;
            num(&digits[..digits.len().min(3)])? * [100, 10, 1][digits.len().min(3) - 1]
        }
        _ => return None,
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (years 0–9999 here):
    // the year taken to start in March, so the leap day is the year's last.
    let ym = if mo <= 2 { y - 1 } else { y };
    let era = ym.div_euclid(400);
    let yoe = ym - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((((days * 24 + h) * 60 + mi) * 60 + sec) * 1000 + ms)
}

#[cfg(test)]
#[path = "decode_fast_tests.rs"]
mod tests;
