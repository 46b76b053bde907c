//! The fast path against serde_json: what it accepts, serde_json accepts with
//! the same values.

use super::*;
use proptest::prelude::*;
use serde::de::DeserializeSeed;

const KEYS: [&str; 4] = ["a", "b", "device_id", "unknown"];

fn index() -> KeyIndex {
    KEYS[..3].iter().enumerate().map(|(i, k)| (k.to_string(), i)).collect()
}

/// The slots serde_json fills (the decoder's other path), or None on its error.
fn by_serde(bytes: &[u8]) -> Option<Vec<Option<Value>>> {
    let index = index();
    let mut slots = vec![None; 3];
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let r = crate::decode::ObjectSeed { index: &index, slots: &mut slots }.deserialize(&mut de).and_then(|r| de.end().map(|()| r));
    matches!(r, Ok(Ok(()))).then_some(slots)
}

fn shown(slots: &[Option<Value>]) -> Vec<String> {
    // The JSON text tells -0.0 from 0.0 and an integer from a float.
    slots.iter().map(|v| v.as_ref().map_or("<none>".into(), |v| format!("{v} {:?}", v.as_f64().map(f64::to_bits)))).collect()
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|x| format!("{x}")),
        any::<f64>().prop_map(|x| format!("{x:e}")),
        any::<i64>().prop_map(|x| x.to_string()),
        any::<u64>().prop_map(|x| x.to_string()),
        (0u32..40, 0u32..40).prop_map(|(a, b)| format!("{a}.{b}e-{b}")),
        prop::sample::select(vec![
            "-0", "0", "-0.0", "01", "1.", ".5", "-", "1e", "1e400", "-1e400", "1e-400", "18446744073709551616",
            "-9223372036854775808", "-9223372036854775809", "123456789012345678901234567890", "2.5E+3", "true", "false",
            "null", "\"x\"", "\"esc\\\"aped\"", "\"tab\there\"", "[1, 2]", "{\"n\": 1}", "tru", "nul", "\"\"",
        ])
        .prop_map(str::to_string),
        "[a-z0-9 ]{0,8}".prop_map(|s| format!("\"{s}\"")),
    ]
}

proptest! {
    /// What the fast path accepts, serde_json accepts with the same values.
    #[test]
    fn fast_path_agrees_with_serde(fields in prop::collection::vec((prop::sample::select(KEYS.to_vec()), value()), 0..6), sep in prop::sample::select(vec!["", " ", "\n\t"])) {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{sep}\"{k}\"{sep}:{sep}{v}{sep}")).collect();
        let text = format!("{sep}{{{}}}{sep}", body.join(","));
        let mut slots = vec![None; 3];
        if object(text.as_bytes(), &index(), &mut slots) {
            let serde = by_serde(text.as_bytes());
            prop_assert!(serde.is_some(), "fast accepted what serde_json refuses: {text}");
            prop_assert_eq!(shown(&slots), shown(&serde.unwrap()), "{}", text);
        }
    }
}

proptest! {
    /// Decimals of up to 22 digits with a point anywhere and powers of ten
    /// around the fast path's ±22 bound (and 2^53's): the one-pass parse gives
    /// serde_json's bits.
    #[test]
    fn numbers_read_in_one_pass_have_serde_jsons_bits(neg in any::<bool>(), digits in "[1-9][0-9]{0,21}", point in 0usize..23, exp in -30i32..30, e_form in any::<bool>()) {
        let mut d = digits.clone();
        if point > 0 && point < d.len() {
            d.insert(point, '.');
        }
        let lit = format!("{}{d}{}", if neg { "-" } else { "" }, if e_form { format!("e{exp}") } else { String::new() });
        let text = format!("{{\"a\": {lit}}}");
        let mut slots = vec![None; 3];
        prop_assert!(object(text.as_bytes(), &index(), &mut slots), "{}", text);
        prop_assert_eq!(shown(&slots), shown(&by_serde(text.as_bytes()).unwrap()), "{}", text);
    }
}

#[test]
fn the_fast_paths_edges_round_like_serde() {
    // 2^53 and 2^53 + 1 (not exact: lexical), 10^22 and 10^23, halfway cases,
    // 19 and 20 digits, -0 forms, i64's edge.
    for lit in [
        "9007199254740992", "9007199254740993", "9007199254740993.0", "9007199254740992e22", "9007199254740992e-22", "1e22", "1e23",
        "1e-22", "1e-23", "0.1", "0.3", "2.5", "1.0000000000000002", "9999999999999999999", "99999999999999999999", "9999999999999999999.0",
        "-0", "-0.0", "-0e3", "0.000000000000000000001", "-9223372036854775808", "-9223372036854775809", "123.456e-7", "4.9e-324",
    ] {
        let text = format!("{{\"a\": {lit}}}");
        let mut slots = vec![None; 3];
        assert!(object(text.as_bytes(), &index(), &mut slots), "{text}");
        assert_eq!(shown(&slots), shown(&by_serde(text.as_bytes()).unwrap()), "{text}");
    }
}

#[test]
fn takes_the_common_record_and_leaves_the_rest_to_serde() {
    let index = index();
    let mut slots = vec![None; 3];
    assert!(object(br#" {"a": 1.5, "b": -0, "device_id": "p-1", "unknown": null} "#, &index, &mut slots));
    assert_eq!(shown(&slots), shown(&by_serde(br#"{"a": 1.5, "b": -0, "device_id": "p-1"}"#).unwrap()));
    for other in [&br#"{"a": "esc\"aped"}"#[..], br#"{"a": [1]}"#, br#"{"a": 1e400}"#, br#"{"a": 01}"#, b"[1]", br#"{"a": 1} x"#, b"{"] {
        assert!(!object(other, &index, &mut vec![None; 3]), "{}", String::from_utf8_lossy(other));
    }
}

/// chrono's reading of an RFC 3339 time, in epoch milliseconds.
fn by_chrono(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_millis())
}

proptest! {
    /// Every time the fast reader takes, chrono reads as the same millisecond;
    /// every time `fmt_ms` writes, the fast reader takes.
    #[test]
    fn event_times_read_fast_are_chronos(y in 0u32..10_000, mo in 0u32..14, d in 0u32..33, h in 0u32..25, mi in 0u32..61, s in 0u32..62, frac in "(\\.[0-9]{0,11})?", tail in prop::sample::select(vec!["Z", "z", "+00:00", "+01:30", ""])) {
        let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{tail}");
        if let Some(ms) = rfc3339_utc_ms(&text) {
            prop_assert_eq!(Some(ms), by_chrono(&text), "{}", text);
        }
    }

    #[test]
    fn every_time_fmt_ms_writes_is_read_fast(ms in -62_135_596_800_000i64..253_402_300_799_999) {
        let text = crate::decode::fmt_ms(ms);
        prop_assert_eq!(rfc3339_utc_ms(&text), Some(ms), "{}", text);
    }
}

#[test]
fn event_time_edges_read_fast_as_chrono_reads_them_or_go_to_chrono() {
    for t in [
        "1970-01-01T00:00:00Z", "1969-12-31T23:59:59.999Z", "2000-02-29T12:00:00.5Z", "1900-02-28T23:59:59.123456789Z", "2024-12-31T23:59:59.1Z",
        "0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z", "2026-03-01T00:00:00.000001Z",
    ] {
        assert_eq!(rfc3339_utc_ms(t), by_chrono(t), "{t}");
        assert!(rfc3339_utc_ms(t).is_some(), "{t}");
    }
    // Left to chrono: a leap second, an offset, a lower-case separator, an
    // impossible date, a fraction of ten digits or none after the point.
    for t in ["2016-12-31T23:59:60Z", "2026-01-01T00:00:00+01:00", "2026-01-01t00:00:00Z", "1900-02-29T00:00:00Z", "2026-01-01T00:00:00.0123456789Z", "2026-01-01T00:00:00.Z", "2026-1-01T00:00:00Z"] {
        assert_eq!(rfc3339_utc_ms(t), None, "{t}");
    }
}

proptest! {
    /// The string scan 8 bytes at a time ends where a byte-by-byte scan does: at
    /// the first quote, backslash or control character, wherever it lies in a word
    /// (non-ASCII text and bytes just past the stops included).
    #[test]
    fn strings_scanned_by_words_end_where_bytes_do(body in prop::collection::vec(prop::sample::select(vec!['a', 'é', '"', '\\', '\t', '\u{1f}', ' ', '!', '#', '[', '\u{7f}', '\u{80}', '1']), 0..40)) {
        let text: String = std::iter::once('"').chain(body).collect();
        let b = text.as_bytes();
        let by_bytes = b[1..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).and_then(|n| (b[1 + n] == b'"').then(|| (&text[1..1 + n], 2 + n)));
        prop_assert_eq!(string(&text, 0), by_bytes, "{:?}", text);
    }
}
