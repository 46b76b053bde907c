//! Per-input properties of the fuzz targets of this crate (`fuzz/`, issue 13, C4):
//! twin restore and audit verification. Each `check_*` panics when a property
//! fails; a fuzz target is a thin call of one of them, and the tests below replay
//! the committed corpora (`fuzz/corpus/<target>/`) and the built-in seeds through
//! the same functions without libFuzzer, so `cargo test --workspace` fails on any
//! corpus input that fails.
//!
//! Compiled for tests and for `--cfg fuzzing` (the fuzz build) only.

use std::collections::HashMap;

use arrow::record_batch::RecordBatch;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde_json::{json, Map, Value};
use twinguard_schemas::decode::{event_object, fmt_ms};
use twinguard_schemas::respond::{AuditKind, AuditRecord, RESPONSE_VERSION};
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, FieldKind, RawRecord};

use crate::audit::{self, canonical_json, hex, record_hash, verify_chain, AuditLog, GENESIS};
use crate::twin::{Twin, TWIN_FORMAT_VERSION};
use crate::{OperatorError, TwinConfig, TwinOperator};

/// Event time of the twin target's events (2025-06-15).
pub const T0: i64 = 1_750_000_000_000;
/// The demo's schema, which the twin target's operator reads.
pub const SCHEMA: &str = "wustl-flow-vitals/v1";
/// Key (device id) under which the twin target restores its input.
pub const KEY: &str = "dev-1";

fn schema() -> &'static EventSchema {
    static S: std::sync::OnceLock<EventSchema> = std::sync::OnceLock::new();
    S.get_or_init(|| EventSchema::builtin(SCHEMA).expect("built-in schema"))
}

/// A plausible event of `device` at `T0 + i s`; `drift` changes its MAC and peer.
fn event(device: &str, i: i64, drift: bool) -> Map<String, Value> {
    let mut m = Map::new();
    for (j, f) in schema().fields.iter().enumerate() {
        let lo = f.min.unwrap_or(0.0);
        let hi = f.max.unwrap_or(lo + 1000.0);
        let u = 0.3 + 0.05 * ((i as f64 * 0.7 + j as f64).sin());
        let v = match f.kind {
            FieldKind::F64 => json!(lo + (hi - lo) * u),
            FieldKind::I64 => json!((lo + (hi - lo) * u).floor() as i64),
            FieldKind::String => json!(format!("{}-{j}", if drift { "evil" } else { "v" })),
        };
        m.insert(f.name.clone(), v);
    }
    event_object(device, T0 + i * 1000, m)
}

/// Decoded events, `(offset, event)`, all on partition 0.
fn batch(events: &[(i64, Map<String, Value>)]) -> RecordBatch {
    let dec = Decoder::new(schema().clone(), DecodeLimits::default());
    let bytes: Vec<(Vec<u8>, String)> = events
        .iter()
        .map(|(_, e)| (serde_json::to_vec(e).expect("serialises"), e["device_id"].as_str().expect("device id").to_string()))
        .collect();
    let recs: Vec<RawRecord<'_>> = events
        .iter()
        .zip(&bytes)
        .map(|((o, _), (b, k))| RawRecord { partition: 0, offset: *o, key: Some(k.as_bytes()), payload: Some(b) })
        .collect();
    let out = dec.decode(&recs, T0 + 10_000_000_000).expect("decode");
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    out.batch
}

/// The events applied to a restored twin: the next one, one after a long silence
/// (its twin resets), one with a new identity and peer.
fn next_events() -> &'static RecordBatch {
    static B: std::sync::OnceLock<RecordBatch> = std::sync::OnceLock::new();
    B.get_or_init(|| batch(&[(1000, event(KEY, 100, false)), (1001, event(KEY, 101, true)), (1002, event(KEY, 100 + 400_000, false))]))
}

fn undecodable_or_restore(e: &OperatorError) -> bool {
    matches!(e, OperatorError::Undecodable { .. } | OperatorError::Restore { .. })
}

/// Twin-restore target. Input: a changelog value.
///
/// Properties: `Twin::decode` never panics and fails only as `Undecodable` or
/// `Restore`, with a bounded key; a decoded twin encodes to a value that decodes to
/// the same twin. A value the twin operator restores (its shape fits the schema)
/// takes further events, a note of their verdicts and an idle sweep without panic
/// or error, and every changelog value it writes afterwards restores again and
/// fits `max_twin_bytes`.
pub fn check_twin_restore(data: &[u8]) {
    match Twin::decode(KEY, data) {
        Ok(t) => {
            assert_eq!(t.v, TWIN_FORMAT_VERSION);
            let _ = t.mem_bytes();
            let b = t.encode();
            let again = Twin::decode(KEY, &b).unwrap_or_else(|e| panic!("a decoded twin, encoded again, does not decode: {e}"));
            assert!(again == t, "a decoded twin does not round-trip");
        }
        Err(e) => assert!(undecodable_or_restore(&e), "unexpected error kind: {e}"),
    }
    let cfg = TwinConfig::default();
    let mut op = TwinOperator::new(schema(), cfg.clone());
    op.store_mut().ensure_partition(0);
    match op.restore_record(0, KEY, Some(data)) {
        Ok(()) => {}
        Err(e) => {
            assert!(undecodable_or_restore(&e), "unexpected error kind: {e}");
            return;
        }
    }
    let (verdicts, context) = op.process_with_context(next_events()).expect("a restored twin takes events");
    assert_eq!(verdicts.num_rows(), context.num_rows());
    op.note_verdict(0, KEY, 0.97, Some("spoofing"));
    let _ = op.explain(op.store().get(0, KEY).expect("the twin"), 3);
    let _ = op.store().mem_bytes();
    let _ = op.expire(&HashMap::from([(0, i64::MAX)]), T0 + 1_000_000_000);
    for rec in op.drain_changelog() {
        let Some(v) = rec.value else { continue };
        assert!(v.len() <= cfg.max_twin_bytes || data.len() > cfg.max_twin_bytes, "a changelog value of {} bytes", v.len());
        let mut fresh = TwinOperator::new(schema(), cfg.clone());
        fresh.store_mut().ensure_partition(rec.partition);
        fresh
            .restore_record(rec.partition, &rec.key, Some(&v))
            .unwrap_or_else(|e| panic!("a changelog value the operator wrote does not restore: {e}"));
    }
}

/// Seeds of the twin-restore target: real encoded twins (fresh, warmed up with
/// bindings and peers, after identity drift), and near misses.
pub fn seeds_twin_restore() -> Vec<Vec<u8>> {
    let mut op = TwinOperator::new(schema(), TwinConfig::default());
    op.store_mut().ensure_partition(0);
    let mut out = Vec::new();
    let mut grab = |op: &mut TwinOperator| {
        for rec in op.drain_changelog() {
            if let Some(v) = rec.value {
                out.push(v);
            }
        }
    };
    op.process_with_context(&batch(&[(0, event(KEY, 0, false))])).expect("events");
    grab(&mut op);
    let warm: Vec<(i64, Map<String, Value>)> = (1..40).map(|i| (i, event(KEY, i, false))).collect();
    op.process_with_context(&batch(&warm)).expect("events");
    op.note_verdict(0, KEY, 0.2, None);
    grab(&mut op);
    op.process_with_context(&batch(&[(40, event(KEY, 40, true))])).expect("events");
    op.note_verdict(0, KEY, 0.99, Some("spoofing"));
    grab(&mut op);
    let last = out.last().cloned().expect("a twin");
    let text = String::from_utf8(last).expect("JSON");
    out.push(text.replacen("\"v\":1", "\"v\":2", 1).into_bytes());
    out.push(text.replacen("\"schema\":\"wustl-flow-vitals/v1\"", "\"schema\":\"ciciomt-flow-window/v1\"", 1).into_bytes());
    out.push(b"{\"v\":1}".to_vec());
    out
}

/// The pinned key of the audit target's chains, and the key a rotation hands over to.
const SEED_A: [u8; 32] = [7; 32];
const SEED_B: [u8; 32] = [8; 32];

fn pinned() -> VerifyingKey {
    SigningKey::from_bytes(&SEED_A).verifying_key()
}

/// Reads fuzz input as a stream of small integers and slices (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |a, i| a | (u64::from(self.u8()) << (8 * i)))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

const KINDS: [AuditKind; 8] = [
    AuditKind::Verdict,
    AuditKind::Command,
    AuditKind::CommandAcknowledged,
    AuditKind::CommandRejected,
    AuditKind::CommandExpired,
    AuditKind::PolicySuspended,
    AuditKind::PolicyResumed,
    AuditKind::KeyRotation,
];

/// A JSON body from fuzz bytes: the bytes themselves when they are JSON, else a string.
fn body_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| json!({"text": String::from_utf8_lossy(b)}))
}

/// Audit-verification target. The first byte picks a mode:
/// - 0: a chain written by `AuditLog` (records, kinds, devices and bodies from the
///   input; optionally handed over to a second key), then one mutation from the
///   input (a byte changed, a record removed, swapped, duplicated or moved);
/// - 1: records signed with the pinned key whose every field comes from the input
///   (any `seq`, `prev`, `chain`, a `key_rotation` naming any key): valid
///   signatures over arbitrary content;
/// - otherwise: raw records, one per line.
///
/// Properties: `verify_chain` and `check_record` never panic, with and without
/// `allow_truncated_start`. Mode 0: the chain as written verifies with the pinned
/// key (records, head and rotations as written); after the mutation it verifies
/// only when what it says is still exactly what was written, or (the records no
/// chain can vouch for) a prefix of it, or with `allow_truncated_start` a
/// contiguous part of it.
pub fn check_audit_verify(data: &[u8]) {
    let mut inp = Input(data);
    match inp.u8() {
        0 => audit_written(&mut inp),
        1 => audit_signed(&mut inp),
        _ => {
            let lines: Vec<(i64, Vec<u8>)> = inp.0.split(|&b| b == b'\n').take(32).enumerate().map(|(i, l)| (i as i64, l.to_vec())).collect();
            for (_, l) in &lines {
                let _ = audit::check_record(l, &pinned());
            }
            for chain in [0, 3] {
                for allow in [false, true] {
                    let _ = verify_chain(chain, &lines, &pinned(), allow);
                }
            }
        }
    }
}

/// What a record says: its canonical JSON, signature included (parsed: no bytes of
/// whitespace or key order count).
fn content(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(bytes).ok().map(|v| canonical_json(&v))
}

fn audit_written(inp: &mut Input<'_>) {
    let flags = inp.u8();
    let chain = i32::from(inp.u8() % 4);
    let n = 1 + usize::from(inp.u8() % 8);
    let mut log = if flags & 1 != 0 {
        AuditLog::new(SEED_B).with_previous(SEED_A).expect("two keys")
    } else {
        AuditLog::new(SEED_A)
    };
    log.continue_from(chain, None).expect("an empty chain");
    let mut recs: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut rotations = 0;
    for i in 0..n {
        let kind = KINDS[usize::from(inp.u8()) % (KINDS.len() - 1)];
        let dev_len = usize::from(inp.u8() % 24);
        let device = (dev_len > 0).then(|| String::from_utf8_lossy(inp.bytes(dev_len - 1)).into_owned());
        let body_len = usize::from(inp.u8());
        let body = body_of(inp.bytes(body_len));
        for (rec, b) in log.append_all(chain, kind, fmt_ms(T0 + i as i64), device, body) {
            rotations += u64::from(rec.kind == AuditKind::KeyRotation);
            recs.push((2 * recs.len() as i64, b));
        }
    }
    let s = verify_chain(chain, &recs, &pinned(), false).unwrap_or_else(|f| panic!("a chain as written does not verify: {f}"));
    let head: AuditRecord = serde_json::from_slice(&recs.last().expect("records").1).expect("a record");
    assert_eq!((s.records, s.head.as_deref(), s.rotations), (recs.len() as u64, Some(head.hash.as_str()), rotations));
    assert_eq!(s.key, log.public_key_hex(), "the chain ends with the log's key");

    // One mutation.
    let original: Vec<String> = recs.iter().map(|(_, b)| content(b).expect("JSON")).collect();
    let mut t = recs.clone();
    let i = usize::from(inp.u8()) % t.len();
    let mut vchain = chain;
    match inp.u8() % 8 {
        0..=2 => {
            let b = &mut t[i].1;
            let at = (inp.u64() as usize) % b.len();
            b[at] = inp.u8();
        }
        3 => {
            t.remove(i);
        }
        4 => {
            let j = usize::from(inp.u8()) % t.len();
            t.swap(i, j);
        }
        5 => {
            let r = t[i].clone();
            t.insert(usize::from(inp.u8()) % (t.len() + 1), r);
        }
        6 => vchain = chain + 1,
        _ => {
            let b = &mut t[i].1;
            let at = (inp.u64() as usize) % (b.len() + 1);
            let extra = inp.bytes(4).to_vec();
            b.splice(at..at, extra);
        }
    }
    let said: Vec<Option<String>> = t.iter().map(|(_, b)| content(b)).collect();
    for allow in [false, true] {
        if verify_chain(vchain, &t, &pinned(), allow).is_ok() {
            let within = (0..=original.len()).any(|from| {
                (from == 0 || allow)
                    && said.len() <= original.len() - from
                    && said.iter().zip(&original[from..]).all(|(s, o)| s.as_deref() == Some(o.as_str()))
            });
            assert!(vchain == chain && within, "a mutated chain verifies (allow_truncated_start = {allow}) but says something else");
        }
    }
}

/// Signs `rec` (hash and signature) with `key`, as the log does, but with any content.
fn sign(mut rec: AuditRecord, key: &SigningKey) -> (AuditRecord, Vec<u8>) {
    let h = record_hash(&serde_json::to_value(&rec).expect("serialises"));
    rec.hash = hex(&h);
    rec.sig = hex(&key.sign(&h).to_bytes());
    let b = serde_json::to_vec(&rec).expect("serialises");
    (rec, b)
}

fn audit_signed(inp: &mut Input<'_>) {
    let n = 1 + usize::from(inp.u8() % 8);
    let mut key = SigningKey::from_bytes(&SEED_A);
    let mut prev = GENESIS.to_string();
    let mut seq = 0u64;
    let mut recs = Vec::new();
    for i in 0..n {
        let op = inp.u8();
        seq = match op & 7 {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX - 1,
            3 => inp.u64(),
            4 => seq.wrapping_sub(1),
            _ => seq,
        };
        let kind = if op & 8 != 0 { AuditKind::KeyRotation } else { KINDS[usize::from(op >> 4) % KINDS.len()] };
        let body = if kind == AuditKind::KeyRotation {
            let target = inp.u8();
            let pk = match target % 4 {
                0 => hex(SigningKey::from_bytes(&SEED_B).verifying_key().as_bytes()),
                1 => hex(key.verifying_key().as_bytes()),
                2 => hex(inp.bytes(32)),
                _ => String::from_utf8_lossy(inp.bytes(66)).into_owned(),
            };
            json!({"public_key": pk})
        } else {
            let l = usize::from(inp.u8() % 64);
            body_of(inp.bytes(l))
        };
        let rec = AuditRecord {
            v: if op & 0x40 != 0 && inp.u8() == 0 { inp.u8().into() } else { RESPONSE_VERSION },
            chain: if op & 0x80 != 0 { i32::from_le_bytes([inp.u8(), inp.u8(), 0, 0]) } else { 0 },
            seq,
            prev: if op & 0x20 != 0 && inp.u8() & 1 == 0 { hex(inp.bytes(32)) } else { prev.clone() },
            kind,
            at: fmt_ms(T0 + i as i64),
            device_id: None,
            body,
            key_id: String::new(),
            hash: String::new(),
            sig: String::new(),
        };
        let (rec, b) = sign(rec, &key);
        if rec.kind == AuditKind::KeyRotation && rec.body["public_key"] == hex(SigningKey::from_bytes(&SEED_B).verifying_key().as_bytes()) {
            key = SigningKey::from_bytes(&SEED_B);
        }
        prev = rec.hash.clone();
        seq = seq.wrapping_add(1);
        recs.push((i as i64, b));
    }
    for (_, b) in &recs {
        let _ = audit::check_record(b, &pinned());
    }
    for allow in [false, true] {
        let _ = verify_chain(0, &recs, &pinned(), allow);
    }
    // The log continues from any signed tail without panicking.
    let mut log = AuditLog::new(SEED_A);
    if log.continue_from(0, recs.last().map(|(_, b)| b.as_slice())).is_ok() {
        let _ = log.append_all(0, AuditKind::Verdict, fmt_ms(T0), None, json!({}));
    }
}

/// Seeds of the audit target: a real signed chain (raw lines), chains with a key
/// rotation, and structured inputs of each mode.
pub fn seeds_audit_verify() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for rotate in [false, true] {
        let mut log = if rotate { AuditLog::new(SEED_B).with_previous(SEED_A).expect("two keys") } else { AuditLog::new(SEED_A) };
        log.continue_from(0, None).expect("empty chain");
        let mut raw = vec![2u8];
        for i in 0..4 {
            for (_, b) in log.append_all(0, KINDS[i % 7], fmt_ms(T0 + i as i64), Some(format!("dev-{i}")), json!({"score": 0.91, "i": i})) {
                raw.extend(b);
                raw.push(b'\n');
            }
        }
        raw.pop();
        out.push(raw);
    }
    out.push(vec![0, 0, 3, 4, 0, 6, b'd', b'e', b'v', b'-', b'1', 9, b'{', b'"', b's', b'"', b':', b'1', b'}', 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    out.push(vec![0, 1, 0, 3, 1, 0, 2, b'{', b'}', 2, 0, 0, 3, 1]);
    out.push(vec![1, 4, 0, 0, 0x08, 0, 5, 0x0b]);
    out.push(vec![1, 3, 1, 0, 0x29, 0, 0]);
    out
}

#[cfg(test)]
pub(crate) fn replay(target: &str, check: fn(&[u8]), seeds: Vec<Vec<u8>>) {
    let corpus = twinguard_schemas::testing::manifest_dir().join("../fuzz/corpus");
    twinguard_schemas::testing::replay_corpus(&corpus, target, check, seeds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_fuzz_corpus_twin_restore() {
        replay("twin_restore", check_twin_restore, seeds_twin_restore());
    }

    #[test]
    fn replay_fuzz_corpus_audit_verify() {
        replay("audit_verify", check_audit_verify, seeds_audit_verify());
    }

    #[test]
    fn seeds_reach_the_interesting_paths() {
        // A real twin restores; a real chain verifies from its raw lines.
        let twins = seeds_twin_restore();
        let mut op = TwinOperator::new(schema(), TwinConfig::default());
        for t in &twins[..3] {
            op.restore_record(0, KEY, Some(t)).unwrap();
        }
        let raw = &seeds_audit_verify()[0];
        let lines: Vec<(i64, Vec<u8>)> = raw[1..].split(|&b| b == b'\n').enumerate().map(|(i, l)| (i as i64, l.to_vec())).collect();
        assert_eq!(verify_chain(0, &lines, &pinned(), false).unwrap().records, 4);
    }
}
