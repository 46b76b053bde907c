//! Decoder tests: every malformed kind is rejected with its reason; valid events
//! round-trip through Arrow unchanged (property test).

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::decode::{event_object, fmt_ms};
use crate::encode::events_to_json;
use crate::{DecodeLimits, Decoder, EventSchema, FieldKind, RawRecord, RejectCode};

const NOW: i64 = 1_800_000_000_000;

fn schema() -> EventSchema {
    EventSchema::builtin("wustl-flow-vitals/v1").unwrap()
}

fn valid_event(device: &str) -> Map<String, Value> {
    let s = schema();
    let mut m = Map::new();
    for f in s.fields.iter().filter(|f| f.required) {
        m.insert(f.name.clone(), json!(1.5));
    }
    m.insert("src_mac".into(), json!("aa:bb:cc:dd:ee:ff"));
    event_object(device, NOW - 1000, m)
}

fn decode_one(key: Option<&str>, payload: &[u8]) -> (usize, Vec<crate::Reject>) {
    let dec = Decoder::new(schema(), DecodeLimits::default());
    let rec = RawRecord { partition: 3, offset: 42, key: key.map(str::as_bytes), payload: Some(payload) };
    let out = dec.decode(&[rec], NOW).unwrap();
    (out.batch.num_rows(), out.rejects)
}

#[test]
fn valid_event_decodes_with_coordinates() {
    let bytes = serde_json::to_vec(&valid_event("dev-1")).unwrap();
    let dec = Decoder::new(schema(), DecodeLimits::default());
    let out = dec.decode(&[RawRecord { partition: 3, offset: 42, key: Some(b"dev-1"), payload: Some(&bytes) }], NOW).unwrap();
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    assert_eq!(out.batch.num_rows(), 1);
    assert_eq!(out.batch.schema(), schema().arrow_schema());
    let p = out.batch.column(2).as_any().downcast_ref::<arrow::array::Int32Array>().unwrap();
    let o = out.batch.column(3).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
    assert_eq!((p.value(0), o.value(0)), (3, 42));
}

// Kept whole: a table with one case per reject kind, read best in one place.
#[test]
fn every_malformed_kind_is_rejected_with_its_reason() {
    let good = valid_event("dev-1");
    let with = |k: &str, v: Value| {
        let mut m = good.clone();
        m.insert(k.into(), v);
        serde_json::to_vec(&m).unwrap()
    };
    let without = |k: &str| {
        let mut m = good.clone();
        m.remove(k);
        serde_json::to_vec(&m).unwrap()
    };
    let good_bytes = serde_json::to_vec(&good).unwrap();
    let nan = String::from_utf8(good_bytes.clone()).unwrap().replacen("\"src_bytes\":1.5", "\"src_bytes\":NaN", 1);
    let inf = String::from_utf8(good_bytes.clone()).unwrap().replacen("\"src_bytes\":1.5", "\"src_bytes\":1e999", 1);
    let cases: Vec<(&str, Option<&str>, Vec<u8>, RejectCode, &str)> = vec![
        ("empty", Some("dev-1"), Vec::new(), RejectCode::Empty, "no value"),
        ("not json", Some("dev-1"), b"{\"device_id\": \"dev-1\", ".to_vec(), RejectCode::NotJson, "not valid JSON"),
        ("binary", Some("dev-1"), vec![0xff, 0xfe, 0x00], RejectCode::NotJson, "not valid JSON"),
        ("array", Some("dev-1"), b"[1,2]".to_vec(), RejectCode::NotObject, "an array"),
        ("missing device id", Some("dev-1"), without("device_id"), RejectCode::MissingField, "device_id"),
        ("numeric device id", Some("dev-1"), with("device_id", json!(7)), RejectCode::WrongType, "device_id"),
        ("empty device id", Some(""), with("device_id", json!("")), RejectCode::BadDeviceId, "device_id"),
        ("key mismatch", Some("dev-2"), good_bytes.clone(), RejectCode::KeyMismatch, "dev-2"),
        ("no key", None, good_bytes.clone(), RejectCode::KeyMismatch, "no key"),
        ("missing time", Some("dev-1"), without("event_time"), RejectCode::MissingField, "event_time"),
        ("bad time", Some("dev-1"), with("event_time", json!("yesterday")), RejectCode::BadTimestamp, "yesterday"),
        ("float time", Some("dev-1"), with("event_time", json!(1.5)), RejectCode::BadTimestamp, "event_time"),
        ("ancient time", Some("dev-1"), with("event_time", json!("1970-01-01T00:00:00Z")), RejectCode::TimestampOutOfRange, "1970"),
        ("future time", Some("dev-1"), with("event_time", json!("2999-01-01T00:00:00Z")), RejectCode::TimestampOutOfRange, "2999"),
        ("missing metric", Some("dev-1"), without("src_bytes"), RejectCode::MissingField, "src_bytes"),
        ("null metric", Some("dev-1"), with("src_bytes", Value::Null), RejectCode::MissingField, "src_bytes"),
        ("string metric", Some("dev-1"), with("src_bytes", json!("lots")), RejectCode::WrongType, "src_bytes"),
        ("bool metric", Some("dev-1"), with("src_bytes", json!(true)), RejectCode::WrongType, "src_bytes"),
        ("float port", Some("dev-1"), with("dst_port", json!(80.5)), RejectCode::WrongType, "dst_port"),
        ("numeric mac", Some("dev-1"), with("src_mac", json!(5)), RejectCode::WrongType, "src_mac"),
        ("NaN", Some("dev-1"), nan.into_bytes(), RejectCode::NonFinite, "NaN"),
        ("overflow", Some("dev-1"), inf.into_bytes(), RejectCode::NonFinite, "f64"),
        ("negative bytes", Some("dev-1"), with("src_bytes", json!(-1.0)), RejectCode::OutOfRange, "src_bytes"),
        ("spo2 140", Some("dev-1"), with("spo2", json!(140.0)), RejectCode::OutOfRange, "spo2"),
        ("other schema", Some("dev-1"), with("schema", json!("ciciomt-flow-window/v1")), RejectCode::SchemaMismatch, "ciciomt"),
        ("oversized", Some("dev-1"), with("padding", json!("x".repeat(70_000))), RejectCode::Oversized, "limit"),
    ];
    for (name, key, bytes, code, needle) in cases {
        let (rows, rejects) = decode_one(key, &bytes);
        assert_eq!(rows, 0, "{name}: must not decode");
        assert_eq!(rejects.len(), 1, "{name}");
        assert_eq!(rejects[0].code, code, "{name}: {}", rejects[0].reason);
        assert!(rejects[0].reason.contains(needle), "{name}: reason {:?} should mention {needle:?}", rejects[0].reason);
    }
}

#[test]
fn a_bad_record_does_not_disturb_its_neighbours() {
    let dec = Decoder::new(schema(), DecodeLimits::default());
    let good = serde_json::to_vec(&valid_event("d")).unwrap();
    let recs: Vec<RawRecord<'_>> = (0..10)
        .map(|i| RawRecord { partition: 0, offset: i, key: Some(b"d"), payload: Some(if i % 3 == 1 { b"nope" } else { &good }) })
        .collect();
    let out = dec.decode(&recs, NOW).unwrap();
    assert_eq!(out.batch.num_rows(), 7);
    assert_eq!(out.rejects.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 4, 7]);
    let offs = out.batch.column(3).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
    assert_eq!(offs.values().to_vec(), vec![0, 2, 3, 5, 6, 8, 9]);
}

/// The decoder reuses one row of slots: a record rejected after its values were
/// read (its key names another device) leaves none of them to the next record.
#[test]
fn a_rejected_records_values_never_reach_the_next_record() {
    let dec = Decoder::new(schema(), DecodeLimits::default());
    let with_mac = serde_json::to_vec(&valid_event("d")).unwrap();
    let mut bare = valid_event("d");
    bare.remove("src_mac");
    let bare = serde_json::to_vec(&bare).unwrap();
    for first in [&with_mac[..], &with_mac[..with_mac.len() - 1]] {
        let recs = [
            RawRecord { partition: 0, offset: 0, key: Some(b"other"), payload: Some(first) },
            RawRecord { partition: 0, offset: 1, key: Some(b"d"), payload: Some(&bare) },
            RawRecord { partition: 0, offset: 2, key: Some(b"d"), payload: Some(&with_mac) },
            RawRecord { partition: 0, offset: 3, key: Some(b"d"), payload: Some(&bare) },
        ];
        let out = dec.decode(&recs, NOW).unwrap();
        assert_eq!((out.batch.num_rows(), out.rejects.len()), (3, 1), "{:?}", out.rejects);
        let mac = out.batch.column_by_name("src_mac").unwrap();
        assert!(mac.is_null(0) && !mac.is_null(1) && mac.is_null(2), "{mac:?}");
    }
}

fn arb_event(s: EventSchema) -> impl Strategy<Value = Map<String, Value>> {
    let n = s.fields.len();
    (
        "[a-z][a-z0-9-]{0,30}",
        946_684_800_000i64..NOW,
        proptest::collection::vec((any::<bool>(), 0.0f64..1.0, "[ -~]{0,12}"), n),
    )
        .prop_map(move |(dev, t, vals)| {
            let mut m = Map::new();
            for (f, (present, u, text)) in s.fields.iter().zip(vals) {
                if !present && !f.required {
                    continue;
                }
                let lo = f.min.unwrap_or(-1e6);
                let hi = f.max.unwrap_or(1e6);
                let v = match f.kind {
                    FieldKind::F64 => json!(lo + (hi - lo) * u),
                    FieldKind::I64 => json!((lo + (hi - lo) * u).floor() as i64),
                    FieldKind::String => json!(text),
                };
                m.insert(f.name.clone(), v);
            }
            let mut e = event_object(&dev, t, m);
            e.insert("event_time".into(), json!(fmt_ms(t)));
            e
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn valid_events_round_trip_through_arrow(events in proptest::collection::vec(arb_event(schema()), 1..20)) {
        for s in [schema()] {
            let dec = Decoder::new(s.clone(), DecodeLimits::default());
            let bytes: Vec<Vec<u8>> = events.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
            let recs: Vec<RawRecord<'_>> = events.iter().zip(&bytes).enumerate().map(|(i, (e, b))| RawRecord {
                partition: 0, offset: i as i64, key: Some(e["device_id"].as_str().unwrap().as_bytes()), payload: Some(b),
            }).collect();
            let out = dec.decode(&recs, NOW).unwrap();
            prop_assert!(out.rejects.is_empty(), "{:?}", out.rejects);
            let back = events_to_json(&s, &out.batch);
            prop_assert_eq!(&back, &events);
        }
    }
}

#[test]
fn ciciomt_schema_round_trips_too() {
    let s = EventSchema::builtin("ciciomt-flow-window/v1").unwrap();
    let mut m = Map::new();
    for f in s.fields.iter().filter(|f| f.required) {
        m.insert(f.name.clone(), json!(2.25));
    }
    let e = event_object("cic-1", NOW - 5, m);
    let b = serde_json::to_vec(&e).unwrap();
    let dec = Decoder::new(s.clone(), DecodeLimits::default());
    let out = dec.decode(&[RawRecord { partition: 0, offset: 0, key: Some(b"cic-1"), payload: Some(&b) }], NOW).unwrap();
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    assert_eq!(events_to_json(&s, &out.batch), vec![e]);
}

/// No patient value is quoted back in a dead-letter reason (it travels with the
/// device id): an out-of-range vital sign, and an integer vital sign that is not an
/// integer, are named but their values withheld.
#[test]
fn phi_values_are_withheld_from_reasons() {
    let mut bad = valid_event("dev-1");
    bad.insert("spo2".into(), json!(140.25));
    let (_, rejects) = decode_one(Some("dev-1"), &serde_json::to_vec(&bad).unwrap());
    assert_eq!(rejects[0].code, RejectCode::OutOfRange);
    assert!(rejects[0].reason.contains("spo2") && rejects[0].reason.contains("withheld") && !rejects[0].reason.contains("140"), "{}", rejects[0].reason);
    let s = EventSchema::parse(
        "name = \"int-vitals\"\nversion = 1\n[[fields]]\nname = \"heart_rate\"\ntype = \"i64\"\nrole = \"property\"\nphi = true\n[[fields]]\nname = \"port\"\ntype = \"i64\"\nrole = \"property\"\n[[fields]]\nname = \"rate\"\ntype = \"f64\"\nrole = \"metric\"\n",
        "test",
    )
    .unwrap();
    let dec = Decoder::new(s, DecodeLimits::default());
    for (field, shown) in [("heart_rate", false), ("port", true)] {
        let payload = format!("{{\"device_id\":\"d\",\"event_time\":\"2026-01-01T00:00:00Z\",\"heart_rate\":61,\"port\":80,\"rate\":1.0,\"{field}\":77.5}}");
        let out = dec.decode(&[RawRecord { partition: 0, offset: 0, key: Some(b"d"), payload: Some(payload.as_bytes()) }], NOW).unwrap();
        let r = &out.rejects[0];
        assert_eq!(r.code, RejectCode::WrongType, "{}", r.reason);
        assert!(r.reason.contains(field), "{}", r.reason);
        assert_eq!(r.reason.contains("77.5"), shown, "{field}: {}", r.reason);
    }
}

#[test]
fn a_schema_file_declares_its_label_taxonomy_and_bad_ones_are_named() {
    let base = "name = \"lab\"\nversion = 1\n[[fields]]\nname = \"x\"\ntype = \"f64\"\nrole = \"metric\"\n";
    let label = "[[fields]]\nname = \"verdict\"\ntype = \"string\"\nrole = \"label\"\n";
    let taxonomy = "[labels]\nnormal = [\"ok\"]\n[labels.classes]\nsweep = \"Recon-Sweep\"\n[labels.families]\n\"Recon-Sweep\" = \"Recon\"\n";
    let s = EventSchema::parse(&format!("{base}{label}{taxonomy}"), "test").unwrap();
    let m = s.labels.as_ref().unwrap();
    assert_eq!(m.fine_class(" OK "), "normal");
    assert_eq!(m.fine_class("sweep"), "Recon-Sweep");
    assert_eq!(m.fine_class("other"), "other", "an unlisted value is its own class");
    assert_eq!((m.family("Recon-Sweep").as_str(), m.family("other").as_str(), m.family("normal").as_str()), ("Recon", "other", "normal"));
    assert!(s.definition.contains("[labels]") && !s.is_builtin());
    assert!(EventSchema::builtin("wustl-flow-vitals/v1").unwrap().is_builtin());
    let err = |text: String| EventSchema::parse(&text, "test").unwrap_err().to_string();
    assert!(err(format!("{base}{taxonomy}")).contains("role `label`"));
    assert!(err(format!("{base}{label}[labels]\nnormal = []\n")).contains("normal traffic"));
    assert!(err(format!("{base}{label}[labels]\nnormal = [\"ok\"]\n[labels.classes]\nbad = \"normal\"\n")).contains("\"bad\""));
}
