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
