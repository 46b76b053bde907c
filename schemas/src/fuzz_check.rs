//! Per-input properties of the fuzz targets of this crate (`fuzz/`, issue 13, C4):
//! the decoder, the dead-letter builder and the control-record parsers. Each
//! `check_*` panics when a property fails; a fuzz target is a thin call of one of
//! them, and the tests below replay the committed corpora (`fuzz/corpus/<target>/`)
//! and the built-in seeds through the same functions without libFuzzer, so
//! `cargo test --workspace` fails on any corpus input that fails.
//!
//! Compiled for tests and for `--cfg fuzzing` (the fuzz build) only.

use serde_json::{json, Map, Value};

use crate::decode::{event_object, fmt_ms};
use crate::dlq::{self, DeadLetter, Source, MAX_DEAD_LETTER_BYTES, MAX_KEY_BYTES, MAX_REASON_BYTES};
use crate::encode::events_to_json;
use crate::respond::{Ack, Feedback};
use crate::{fields, DecodeLimits, Decoder, EventSchema, FieldKind, RawRecord};

/// The processing clock of the decoder target (2027-01-15).
pub const NOW_MS: i64 = 1_800_000_000_000;

/// Reads fuzz input as a stream of small integers and slices (zeros once it runs out).
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

fn decoders() -> &'static [Decoder] {
    static D: std::sync::OnceLock<Vec<Decoder>> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        EventSchema::builtin_names()
            .into_iter()
            .map(|n| Decoder::new(EventSchema::builtin(n).expect("built-in schema"), DecodeLimits::default()))
            .collect()
    })
}

/// Decoder target. Input: `key 0x00 payload` (no 0x00: no key, all payload). The
/// payload is decoded with every built-in schema (the demo's `wustl-flow-vitals/v1`
/// first) in one batch of three records: keyed by the given key, without a key, and
/// keyed by the payload's own `device_id`.
///
/// Properties: `decode` never fails as a whole and never panics; every record is
/// accounted for exactly once (a row or a reject, in input order); every reason fits
/// `MAX_REASON_BYTES`; a row's device id is its key; every accepted event encodes
/// back to JSON that decodes to the same row.
pub fn check_decode(data: &[u8]) {
    let (key, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    let own_key: Option<Vec<u8>> = serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get(fields::DEVICE_ID).and_then(Value::as_str).map(|s| s.as_bytes().to_vec()));
    let recs = [
        RawRecord { partition: 0, offset: 10, key, payload: Some(payload) },
        RawRecord { partition: 1, offset: 11, key: None, payload: Some(payload) },
        RawRecord { partition: 2, offset: 12, key: own_key.as_deref(), payload: Some(payload) },
    ];
    for dec in decoders() {
        let out = dec.decode(&recs, NOW_MS).expect("decode never fails as a whole");
        assert_eq!(out.batch.schema(), dec.arrow_schema(), "the batch has the schema's Arrow form");
        assert_eq!(out.batch.num_rows() + out.rejects.len(), recs.len(), "every record is a row or a reject");
        let mut rejected = vec![false; recs.len()];
        let mut last = None;
        for r in &out.rejects {
            assert!(r.index < recs.len() && last < Some(r.index), "rejects in input order, once each: {:?}", out.rejects);
            last = Some(r.index);
            rejected[r.index] = true;
            assert!(r.reason.len() <= MAX_REASON_BYTES, "reason of {} bytes", r.reason.len());
        }
        let kept: Vec<usize> = (0..recs.len()).filter(|&i| !rejected[i]).collect();
        let dev = out.batch.column(0).as_any().downcast_ref::<arrow::array::StringArray>().expect("device_id column");
        let off = out.batch.column(3).as_any().downcast_ref::<arrow::array::Int64Array>().expect("_offset column");
        for (row, &i) in kept.iter().enumerate() {
            assert_eq!(Some(dev.value(row).as_bytes()), recs[i].key, "a row's device id is its record key");
            assert_eq!(off.value(row), recs[i].offset, "rows keep their coordinates, in order");
        }
        // Round trip: what was accepted encodes to events that decode to the same rows.
        let back = events_to_json(dec.schema(), &out.batch);
        let bytes: Vec<Vec<u8>> = back.iter().map(|e| serde_json::to_vec(e).expect("event serialises")).collect();
        let again: Vec<RawRecord<'_>> = kept
            .iter()
            .zip(&bytes)
            .map(|(&i, b)| RawRecord { partition: recs[i].partition, offset: recs[i].offset, key: recs[i].key, payload: Some(b) })
            .collect();
        let out2 = dec.decode(&again, NOW_MS).expect("decode never fails as a whole");
        assert!(out2.rejects.is_empty(), "an accepted event, re-encoded, is rejected: {:?}", out2.rejects);
        assert_eq!(out2.batch, out.batch, "an accepted event does not round-trip");
    }
}

/// Seeds of the decoder target: valid events of each built-in schema, keyed and
/// unkeyed, plus a few malformed ones.
pub fn seeds_decode() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for name in EventSchema::builtin_names() {
        let s = EventSchema::builtin(name).expect("built-in schema");
        let mut all = Map::new();
        let mut required = Map::new();
        for (i, f) in s.fields.iter().enumerate() {
            let lo = f.min.unwrap_or(0.0);
            let hi = f.max.unwrap_or(lo + 1000.0);
            let v = match f.kind {
                FieldKind::F64 => json!(lo + (hi - lo) * 0.37),
                FieldKind::I64 => json!(((lo + hi) / 2.0).floor() as i64),
                FieldKind::String => json!(format!("v{i}-aa:bb")),
            };
            if f.required {
                required.insert(f.name.clone(), v.clone());
            }
            all.insert(f.name.clone(), v);
        }
        let mut full = event_object("infusion-pump-07", NOW_MS - 60_000, all);
        full.insert(fields::SCHEMA.into(), json!(s.id()));
        let minimal = event_object("dev-1", NOW_MS - 1000, required.clone());
        let mut epoch = minimal.clone();
        epoch.insert(fields::EVENT_TIME.into(), json!(NOW_MS - 5));
        for (key, e) in [("infusion-pump-07", &full), ("dev-1", &minimal), ("dev-1", &epoch)] {
            let mut b = key.as_bytes().to_vec();
            b.push(0);
            b.extend(serde_json::to_vec(e).expect("event serialises"));
            out.push(b);
        }
        out.push(serde_json::to_vec(&full).expect("event serialises"));
        let mut bad = minimal.clone();
        bad.insert(fields::EVENT_TIME.into(), json!(fmt_ms(NOW_MS + 48 * 3600 * 1000)));
        out.push([b"dev-1\0".as_slice(), &serde_json::to_vec(&bad).expect("serialises")].concat());
    }
    out.push(b"dev-1\0{\"device_id\":\"dev-1\",\"event_time\":\"2026-01-01T00:00:00Z\",\"src_bytes\":NaN}".to_vec());
    out.push(b"[1,2,{\"a\":null}]".to_vec());
    out
}

/// Dead-letter target. Input: sizes, flags and coordinates, then bytes that are
/// repeated to fill the key, value, reason, code, topic and schema (so a few bytes
/// describe a record of megabytes).
///
/// Properties: no panic; the letter fits `MAX_DEAD_LETTER_BYTES`; the reason header
/// fits `MAX_REASON_BYTES` and is a prefix of the reason (plus the cut mark); key and
/// value are prefixes of the originals, whole unless a `truncated` header records the
/// original length; header names are unique.
pub fn check_dead_letter(data: &[u8]) {
    let mut inp = Input(data);
    let flags = inp.u8();
    // Sizes around the limits are much more interesting than uniform ones.
    let size = |inp: &mut Input<'_>| -> usize {
        let pick = inp.u8();
        let small = inp.u32() as usize;
        let base = [0, MAX_KEY_BYTES, MAX_REASON_BYTES, MAX_DEAD_LETTER_BYTES, 1_000_000, 64, 512][(pick % 7) as usize];
        match pick >> 3 {
            0..=7 => small % 2048,
            8..=15 => (base + (small % 64)).saturating_sub(32),
            16..=23 => small % (2 * MAX_DEAD_LETTER_BYTES + 3),
            _ => base,
        }
    };
    let (kl, vl, rl, cl, tl, sl) = (size(&mut inp), size(&mut inp), size(&mut inp), size(&mut inp), size(&mut inp), size(&mut inp));
    let partition = inp.u32() as i32;
    let offset = inp.u64() as i64;
    let fill = inp.rest();
    let fill = if fill.is_empty() { "é".as_bytes() } else { fill };
    let bytes_of = |n: usize| -> Vec<u8> {
        let mut b = fill.repeat(n / fill.len() + 1);
        b.truncate(n);
        b
    };
    let text = String::from_utf8_lossy(fill);
    let text_of = |n: usize| -> String {
        let mut t = text.repeat(n / text.len() + 1);
        let mut end = n.min(t.len());
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
        t
    };
    let key = (flags & 1 != 0).then(|| bytes_of(kl));
    let value = (flags & 2 != 0).then(|| bytes_of(vl));
    let reason = text_of(rl);
    let code = text_of(cl);
    let topic = text_of(tl);
    let schema = (flags & 4 != 0).then(|| text_of(sl));
    let src = Source { topic: &topic, partition, offset };
    let dl = DeadLetter::build(src, key.clone(), value.clone(), &code, &reason, schema.as_deref());

    assert!(dl.size() <= MAX_DEAD_LETTER_BYTES, "dead letter of {} bytes", dl.size());
    let header = |name: &str| dl.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_slice());
    let mut names: Vec<&str> = dl.headers.iter().map(|(k, _)| *k).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), dl.headers.len(), "a header twice: {:?}", dl.headers.iter().map(|h| h.0).collect::<Vec<_>>());
    let r = header(fields::DLQ_REASON).expect("a reason header");
    assert!(r.len() <= MAX_REASON_BYTES, "reason header of {} bytes", r.len());
    let r = std::str::from_utf8(r).expect("the reason header is UTF-8");
    assert!(reason.starts_with(r.strip_suffix('…').unwrap_or(r)), "the reason header is not a prefix of the reason");
    assert_eq!(r == reason, reason.len() <= MAX_REASON_BYTES, "a reason within the limit is kept whole");
    assert!(header(fields::DLQ_CODE).expect("a code header").len() <= 64);
    assert!(header(fields::DLQ_TOPIC).expect("a topic header").len() <= 512);
    assert_eq!(header(fields::DLQ_PARTITION), Some(partition.to_string().as_bytes()));
    assert_eq!(header(fields::DLQ_OFFSET), Some(offset.to_string().as_bytes()));
    assert_eq!(header(fields::DLQ_SCHEMA).is_some(), schema.is_some());
    let key = key.unwrap_or_default();
    assert!(key.starts_with(&dl.key) && dl.key.len() <= MAX_KEY_BYTES);
    match header(fields::DLQ_TRUNCATED_KEY) {
        Some(n) => assert_eq!(n, key.len().to_string().as_bytes()),
        None => assert_eq!(dl.key, key, "a key cut without its header"),
    }
    let value = value.unwrap_or_default();
    assert!(value.starts_with(&dl.value), "the value is not a prefix of the original");
    match header(fields::DLQ_TRUNCATED) {
        Some(n) => assert_eq!(n, value.len().to_string().as_bytes()),
        None => assert_eq!(dl.value, value, "a value cut without its header"),
    }
    // The clip it is built on: a character-boundary prefix within the limit.
    for max in [3, 64, 512, MAX_REASON_BYTES] {
        let c = dlq::clip(&reason, max);
        assert!(c.len() <= max && reason.starts_with(c.strip_suffix('…').unwrap_or(&c)));
    }
}

/// Seeds of the dead-letter target: small letters and the sizes of the defect
/// (a ~1 MB control record quoted in its reason).
pub fn seeds_dead_letter() -> Vec<Vec<u8>> {
    let seed = |flags: u8, sizes: [(u8, u32); 6], fill: &[u8]| -> Vec<u8> {
        let mut b = vec![flags];
        for (pick, n) in sizes {
            b.push(pick);
            b.extend(n.to_le_bytes());
        }
        b.extend(7u32.to_le_bytes());
        b.extend(42u64.to_le_bytes());
        b.extend(fill);
        b
    };
    vec![
        seed(7, [(0, 5), (0, 2), (0, 30), (0, 14), (0, 12), (0, 20)], b"dev-1"),
        // A ~1 MB value quoted whole in a reason (the defect), and the limits exactly.
        seed(3, [(0, 10), (0xc1, 0), (0xc1, 0), (0, 22), (0, 4), (0, 0)], "x€".as_bytes()),
        seed(7, [(0xc7, 0), (0x43, 40), (0x42, 3), (0xc2, 0), (0xc6, 0), (0xc6, 0)], b"\xff\xfe"),
        seed(7, [(0xc1, 0), (0xc0, 0), (0xc7, 0), (0xc2, 0), (0xc6, 0), (0xc6, 0)], b"k"),
        seed(2, [(0, 0), (0x83, 7_000_000), (0x80, 3_000_000), (0, 8), (0, 8), (0, 0)], b"{\"v\":1}"),
    ]
}

/// Control-record target: the payload as an ack and as a feedback record.
///
/// Properties: no panic; an error fits `MAX_REASON_BYTES`; a record over
/// `MAX_CONTROL_RECORD_BYTES` is refused; what parses serialises and parses back to
/// the same value.
pub fn check_control(data: &[u8]) {
    check_control_as::<Ack>(data, "ack");
    check_control_as::<Feedback>(data, "feedback");
    assert!(dlq::parse_control::<Ack>(None, "ack").is_err());
}

fn check_control_as<T>(data: &[u8], what: &str)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    match dlq::parse_control::<T>(Some(data), what) {
        Ok(v) => {
            assert!(data.len() <= dlq::MAX_CONTROL_RECORD_BYTES);
            let b = serde_json::to_vec(&v).expect("a control record serialises");
            let back = dlq::parse_control::<T>(Some(&b), what).expect("a parsed control record parses again");
            assert_eq!(back, v, "a {what} record does not round-trip");
        }
        Err(e) => assert!(e.len() <= MAX_REASON_BYTES, "{what} error of {} bytes", e.len()),
    }
}

/// Seeds of the control-record target: valid acks and feedback, and near misses.
pub fn seeds_control() -> Vec<Vec<u8>> {
    [
        r#"{"v":1,"command_id":"cmd-0-42-isolate","device_id":"infusion-pump-07","status":"applied"}"#,
        r#"{"v":1,"command_id":"c1","device_id":"dev-1","status":"applied","reported":{"network":"isolated"},"mac":"5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"}"#,
        r#"{"v":1,"command_id":"c2","device_id":"dev-1","status":"failed"}"#,
        r#"{"v":1,"command_id":"c2","device_id":"dev-1","status":"isolated_maybe"}"#,
        r#"{"v":1,"ref":"alert-0-17","label":"false_positive","analyst":"alice","note":"maintenance window"}"#,
        r#"{"v":1,"ref":"iomt.telemetry:3:1200","label":"false_negative"}"#,
        r#"{"v":1,"ref":"alert-1","label":"true_positive","mac":"00ff"}"#,
        r#"{"v":1,"ref":"alert-1","label":"true_positive","extra":true}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[cfg(test)]
pub(crate) fn replay(target: &str, check: fn(&[u8]), seeds: Vec<Vec<u8>>) {
    let corpus = crate::testing::manifest_dir().join("../fuzz/corpus");
    crate::testing::replay_corpus(&corpus, target, check, seeds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_fuzz_corpus_decode() {
        replay("decode", check_decode, seeds_decode());
    }

    #[test]
    fn replay_fuzz_corpus_dead_letter() {
        replay("dead_letter", check_dead_letter, seeds_dead_letter());
    }

    #[test]
    fn replay_fuzz_corpus_control() {
        replay("control", check_control, seeds_control());
    }

    #[test]
    fn valid_seeds_decode_to_rows() {
        // The seeds must reach past the decoder's checks, or the fuzzer starts blind.
        let dec = &decoders()[0];
        let seeds = seeds_decode();
        let (k, p) = seeds[0].split_at(seeds[0].iter().position(|&b| b == 0).unwrap());
        let out = dec.decode(&[RawRecord { partition: 0, offset: 0, key: Some(k), payload: Some(&p[1..]) }], NOW_MS).unwrap();
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        assert!(dlq::parse_control::<Ack>(Some(&seeds_control()[1]), "ack").is_ok());
        assert!(dlq::parse_control::<Feedback>(Some(&seeds_control()[4]), "feedback").is_ok());
    }
}
