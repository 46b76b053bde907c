//! Twin operator tests: idempotent replays, restore equivalence, detection of
//! deviations and identity drift, bounded memory.

use arrow::array::{Array, BooleanArray, Float64Array, StringArray};
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use twinguard_schemas::decode::event_object;
use twinguard_schemas::{DecodeLimits, Decoder, EventSchema, RawRecord};

use crate::{TwinConfig, TwinOperator};

pub(crate) const T0: i64 = 1_750_000_000_000;

pub(crate) fn schema() -> EventSchema {
    EventSchema::builtin("wustl-flow-vitals/v1").unwrap()
}

/// A typical patient-monitor event; `k` perturbs the metrics slightly.
pub(crate) fn event(device: &str, i: i64, k: f64) -> Map<String, Value> {
    let s = schema();
    let mut m = Map::new();
    for (j, f) in s.fields.iter().enumerate().filter(|(_, f)| f.required) {
        let base = (100.0 + j as f64 * 10.0).min(f.max.unwrap_or(f64::MAX) * 0.3);
        m.insert(f.name.clone(), json!(base * (1.0 + 0.05 * ((i as f64 * 0.7 + j as f64).sin()) * k)));
    }
    for (name, v) in [("spo2", 97.0), ("heart_rate", 72.0), ("pulse_rate", 71.0), ("temp", 36.8), ("sys", 120.0), ("dia", 80.0), ("resp_rate", 14.0)] {
        m.insert(name.into(), json!(v + (i as f64 * 1.3).sin()));
    }
    m.insert("src_mac".into(), json!("aa:bb:cc:00:00:01"));
    m.insert("src_addr".into(), json!("10.0.0.5"));
    m.insert("dst_addr".into(), json!("10.0.1.150"));
    m.insert("dst_port".into(), json!(1111));
    m.insert("device_type".into(), json!("patient_monitor"));
    m.insert("firmware_hash".into(), json!("f".repeat(64)));
    event_object(device, T0 + i * 1000, m)
}

pub(crate) fn batch(events: &[(i32, i64, Map<String, Value>)]) -> RecordBatch {
    let dec = Decoder::new(schema(), DecodeLimits::default());
    let bytes: Vec<(Vec<u8>, String)> =
        events.iter().map(|(_, _, e)| (serde_json::to_vec(e).unwrap(), e["device_id"].as_str().unwrap().to_string())).collect();
    let recs: Vec<RawRecord<'_>> = events
        .iter()
        .zip(&bytes)
        .map(|((p, o, _), (b, k))| RawRecord { partition: *p, offset: *o, key: Some(k.as_bytes()), payload: Some(b) })
        .collect();
    let out = dec.decode(&recs, T0 + 10_000_000_000).unwrap();
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    out.batch
}

fn run(op: &mut TwinOperator, b: RecordBatch) -> Vec<RecordBatch> {
    let v = op.process_batch(b).unwrap();
    if v.num_rows() > 0 {
        vec![v]
    } else {
        Vec::new()
    }
}

fn col<T: 'static>(b: &RecordBatch, name: &str) -> T
where
    T: Clone,
{
    b.column_by_name(name).unwrap().as_any().downcast_ref::<T>().unwrap().clone()
}

#[test]
fn replayed_records_change_nothing_and_emit_nothing() {
    let mut op = TwinOperator::new(&schema(), TwinConfig::default());
    let evs: Vec<_> = (0..50).map(|i| (0, i, event("d1", i, 1.0))).collect();
    let v = run(&mut op, batch(&evs));
    assert_eq!(v.iter().map(RecordBatch::num_rows).sum::<usize>(), 50);
    let before = op.store().get(0, "d1").unwrap().clone();
    let again = run(&mut op, batch(&evs[10..]));
    assert!(again.is_empty(), "replayed records must not produce verdicts");
    assert_eq!(op.store().get(0, "d1").unwrap(), &before);
    assert_eq!(op.skipped(), 40);
}

#[test]
fn deviations_and_identity_drift_are_anomalous_normal_is_not() {
    let mut op = TwinOperator::new(&schema(), TwinConfig::default());
    let evs: Vec<_> = (0..200).map(|i| (0, i, event("d1", i, 1.0))).collect();
    let v = run(&mut op, batch(&evs));
    let anomalous = col::<BooleanArray>(&v[0], "anomalous");
    assert_eq!(anomalous.true_count(), 0, "normal behaviour must not be flagged");

    let mut spike = event("d1", 200, 1.0);
    spike.insert("tot_bytes".into(), json!(5.0e6));
    spike.insert("src_bytes".into(), json!(4.0e6));
    spike.insert("load".into(), json!(9.0e9));
    let mut spoof = event("d1", 201, 1.0);
    spoof.insert("src_mac".into(), json!("de:ad:be:ef:00:01"));
    let mut fw = event("d1", 202, 1.0);
    fw.insert("firmware_hash".into(), json!("0".repeat(64)));
    let mut vitals = event("d1", 203, 1.0);
    vitals.insert("spo2".into(), json!(84.0));
    vitals.insert("heart_rate".into(), json!(130.0));
    let normal = event("d1", 204, 1.0);
    let v = run(&mut op, batch(&[(0, 200, spike), (0, 201, spoof), (0, 202, fw), (0, 203, vitals), (0, 204, normal)]));
    let a = col::<BooleanArray>(&v[0], "anomalous");
    assert_eq!((0..5).map(|i| a.value(i)).collect::<Vec<_>>(), vec![true, true, true, true, false]);
    let drift = col::<StringArray>(&v[0], "identity_drift");
    assert_eq!(drift.value(1), "src_mac");
    assert_eq!(drift.value(2), "firmware_hash");
    assert!(drift.is_null(0) && drift.is_null(3));
    let score = col::<Float64Array>(&v[0], "score");
    assert!(score.value(0) > 0.5 && score.value(4) < 0.5);
    // The attacker's MAC did not become part of the device's identity.
    let twin = op.store().get(0, "d1").unwrap();
    assert_eq!(twin.bindings.iter().find(|b| b.field == "src_mac").unwrap().values, vec!["aa:bb:cc:00:00:01"]);
    assert_eq!(twin.anomalies, 4);
}

#[test]
fn twin_memory_is_within_two_kib() {
    let mut op = TwinOperator::new(&schema(), TwinConfig::default());
    let evs: Vec<_> = (0..100).map(|i| (0, i, event("icu-patient-monitor-001", i, 1.0))).collect();
    run(&mut op, batch(&evs));
    // With the recurrent state of the default LSTM (16 hidden units: h and c).
    let twin = op.store_mut().get_mut(0, "icu-patient-monitor-001").unwrap();
    assert_eq!(twin.window.len(), 34, "short windows are kept per metric");
    twin.lstm = vec![0.0; 2 * 16];
    let bytes = op.store().get(0, "icu-patient-monitor-001").unwrap().mem_bytes();
    println!("twin memory for a typical patient monitor (wustl-flow-vitals/v1, with LSTM state): {bytes} bytes");
    assert!(bytes <= 2048, "twin takes {bytes} bytes");
    // The lists learned once and kept for the device's life hold no spare room
    // (1 M twins in < 2 GiB: benches/RESULTS.md), nor do they after a restore.
    let twin = op.store().get(0, "icu-patient-monitor-001").unwrap();
    let tight = |t: &crate::Twin| {
        assert!(!t.bindings.is_empty() && !t.peers.is_empty(), "the event has identity fields and a peer");
        assert_eq!(t.bindings.capacity(), t.bindings.len());
        assert_eq!(t.peers.capacity(), t.peers.len());
        assert!(t.bindings.iter().all(|b| b.values.capacity() == b.values.len()));
    };
    tight(twin);
    let restored = crate::Twin::decode("icu-patient-monitor-001", &twin.encode()).unwrap();
    tight(&restored);
    assert_eq!(restored.mem_bytes(), bytes, "a restored twin costs what the live one did");
    // Short strings (ids, addresses, the schema's name) live inside the twin.
    assert!(!twin.device_id.is_heap_allocated() && !twin.schema.is_heap_allocated());
    assert!(twin.bindings.iter().flat_map(|b| &b.values).all(|v| !v.is_heap_allocated()));
}

/// Everything committed, far past every event: the sweep may use any twin.
fn all_durable() -> HashMap<i32, i64> {
    HashMap::from([(0, i64::MAX)])
}
const LATER: i64 = T0 + 10_000_000_000;

#[test]
fn max_twins_holds_but_only_once_durable() {
    let cfg = TwinConfig { idle_ttl_secs: 3600, max_twins: 3, ..TwinConfig::default() };
    let mut op = TwinOperator::new(&schema(), cfg);
    let evs: Vec<_> = (0..5).map(|i| (0, i as i64, event(&format!("d{i}"), i as i64 * 10, 1.0))).collect();
    run(&mut op, batch(&evs));
    op.drain_changelog();
    // Nothing is committed yet: a replay could re-read every event, so nothing goes.
    assert_eq!(op.expire(&HashMap::new(), LATER).evicted, 0);
    // Only d0 (offset 0) is committed: the cap of 3 wants two evictions, gets one.
    assert_eq!(op.expire(&HashMap::from([(0, 1)]), LATER).evicted, 1);
    assert_eq!(op.store().len(), 4);
    let e = op.expire(&all_durable(), LATER);
    assert_eq!((e.expired, e.evicted), (0, 1), "nobody idle for 2 h: the cap evicts the next oldest");
    assert_eq!(op.store().len(), 3);
    let tomb: Vec<_> = op.drain_changelog().into_iter().filter(|c| c.value.is_none()).map(|c| c.key).collect();
    assert_eq!(tomb, vec!["d0", "d1"]);
    assert_eq!(op.expire(&HashMap::from([(1, i64::MAX)]), LATER), Default::default(), "partitions not owned are never touched");
}

#[test]
fn the_sweep_takes_twins_silent_for_twice_the_ttl_before_the_partitions_median_capped_per_call() {
    let cfg = TwinConfig { idle_ttl_secs: 60, max_expiries_per_sweep: 1, ..TwinConfig::default() };
    let mut op = TwinOperator::new(&schema(), cfg);
    let mut evs: Vec<_> = (0..5).map(|i| (0, i as i64, event(&format!("d{i}"), i as i64, 1.0))).collect();
    evs.extend((2..5).map(|i| (0, 3 + i as i64, event(&format!("d{i}"), 300, 1.0))));
    run(&mut op, batch(&evs));
    op.drain_changelog();
    // Median last-seen is t=300 s: d0 and d1 (t=0, 1 s) are silent for > 2 × 60 s.
    assert_eq!(op.expire(&all_durable(), T0 + 20_000), Default::default(), "never later than the processing clock");
    assert_eq!(op.expire(&HashMap::from([(0, 1)]), LATER).expired, 1, "only d0's event is committed");
    let e = op.expire(&all_durable(), LATER);
    assert_eq!((e.expired, e.capped), (1, 0));
    assert_eq!(op.store().len(), 3);
    let mut op2 = TwinOperator::new(&schema(), TwinConfig { idle_ttl_secs: 60, max_expiries_per_sweep: 1, ..TwinConfig::default() });
    run(&mut op2, batch(&evs));
    let e = op2.expire(&all_durable(), LATER);
    assert_eq!((e.expired, e.capped), (1, 1), "one per sweep, the other waits");
    assert_eq!(op2.expire(&all_durable(), LATER).expired, 1);
}

/// The review's watermark poisoning: one valid event dated far ahead (within the
/// decoder's `max_future`) moved its partition's watermark, and the next sweep
/// removed every other twin of the partition.
#[test]
fn one_devices_future_claim_expires_no_other_twin() {
    let cfg = TwinConfig { idle_ttl_secs: 60, ..TwinConfig::default() };
    let mut op = TwinOperator::new(&schema(), cfg);
    let mut evs: Vec<_> = (0..10).map(|i| (0, i as i64, event(&format!("d{i}"), i as i64, 1.0))).collect();
    evs.push((0, 10, event("d9", 23 * 3600 + 50 * 60, 1.0)));
    run(&mut op, batch(&evs));
    op.drain_changelog();
    for _ in 0..2 {
        assert_eq!(op.expire(&all_durable(), LATER), Default::default());
    }
    assert_eq!(op.store().len(), 10, "no twin lost to one device's clock");
    run(&mut op, batch(&[(0, 11, event("d0", 12, 1.0))]));
    assert_eq!(op.store().get(0, "d0").unwrap().events, 2, "d0 continues its twin");
    assert_eq!(op.resets(), 1, "only the claimant itself starts over (its own gap exceeds the TTL)");
}

/// Expiry is deterministic: a device silent past the TTL starts over at its next
/// event whether or not the sweep removed its twin meanwhile (the review's
/// "twin state is a pure function of the events" for idle devices).
#[test]
fn an_idle_device_starts_over_whether_or_not_the_sweep_ran() {
    let cfg = || TwinConfig { idle_ttl_secs: 60, ..TwinConfig::default() };
    let mut first: Vec<_> = (0..40).map(|i| (0, i as i64, event("d0", i as i64, 1.0))).collect();
    first.extend((1..5).map(|d| (0, 39 + d as i64, event(&format!("d{d}"), 400, 1.0))));
    let second: Vec<_> = (0..5).map(|i| (0, 50 + i as i64, event("d0", 400 + i as i64, 1.0))).collect();
    let verdicts = |b: &[RecordBatch]| b.iter().flat_map(|b| twinguard_schemas::verdict::verdicts_from_batch(b, "t")).collect::<Vec<_>>();

    let mut kept = TwinOperator::new(&schema(), cfg());
    run(&mut kept, batch(&first));
    let va = verdicts(&run(&mut kept, batch(&second)));
    assert_eq!(kept.resets(), 1, "d0 was silent for 360 s > 60 s");

    let mut swept = TwinOperator::new(&schema(), cfg());
    run(&mut swept, batch(&first));
    assert_eq!(swept.expire(&all_durable(), LATER).expired, 1, "d0 swept");
    let vb = verdicts(&run(&mut swept, batch(&second)));
    assert_eq!(va, vb, "same verdicts with and without the sweep");
    assert_eq!(kept.store().get(0, "d0"), swept.store().get(0, "d0"));
    assert_eq!(kept.store().get(0, "d0").unwrap().events, 5, "warm-up starts over");
}

#[test]
fn a_twin_over_max_twin_bytes_sheds_learned_strings() {
    let cfg = TwinConfig { max_twin_bytes: 4096, max_peers: 16, ..TwinConfig::default() };
    let mut op = TwinOperator::new(&schema(), cfg);
    let evs: Vec<_> = (0..20)
        .map(|i| {
            let mut e = event("d0", i as i64, 1.0);
            e.insert("dst_addr".into(), json!(format!("{i:03}{}", "p".repeat(250))));
            (0, i as i64, e)
        })
        .collect();
    run(&mut op, batch(&evs));
    let log = op.drain_changelog();
    let v = log[0].value.as_ref().unwrap();
    assert!(v.len() <= 4096, "{} bytes", v.len());
    assert_eq!(op.shed(), 1);
    assert!(op.store().get(0, "d0").unwrap().peers.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Restoring from the changelog at any batch boundary and continuing gives the same
    /// twins and verdicts as an uninterrupted run.
    #[test]
    fn restore_from_changelog_is_equivalent(split in 1usize..9, k in 0.5f64..2.0, devices in 1usize..4) {
        let evs: Vec<_> = (0..120i64).map(|i| (0, i, event(&format!("d{}", i as usize % devices), i, k))).collect();
        let chunks: Vec<_> = evs.chunks(12).map(<[_]>::to_vec).collect();
        let mut a = TwinOperator::new(&schema(), TwinConfig::default());
        let mut va = Vec::new();
        for c in &chunks { va.extend(run(&mut a, batch(c))); }

        let mut b = TwinOperator::new(&schema(), TwinConfig::default());
        let mut vb = Vec::new();
        let mut log = Vec::new();
        for c in &chunks[..split] { vb.extend(run(&mut b, batch(c))); log.extend(b.drain_changelog()); }
        let mut r = TwinOperator::new(&schema(), TwinConfig::default());
        for rec in &log { r.restore_record(rec.partition, &rec.key, rec.value.as_deref()).unwrap(); }
        // Replay from an earlier position (at-least-once): already-applied records are skipped.
        for c in &chunks[split - 1..] { vb.extend(run(&mut r, batch(c))); }
        let key = |b: &RecordBatch| twinguard_schemas::verdict::verdicts_from_batch(b, "t");
        let fa: Vec<_> = va.iter().flat_map(key).collect();
        let fb: Vec<_> = vb.iter().flat_map(key).collect();
        prop_assert_eq!(fa, fb);
        for t in a.store().iter() {
            prop_assert_eq!(Some(t), r.store().get(0, &t.device_id));
        }
    }
}

/// A device with noisy traffic: its byte counts vary by a random log-normal factor
/// (σ = 0.5) around their usual level, event after event, the same way throughout.
fn bursty(i: i64) -> Map<String, Value> {
    let mut e = event("b1", i, 1.0);
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut u = || {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    // Box-Muller: one standard normal draw per event.
    let z = (-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos();
    for f in ["tot_bytes", "src_bytes", "load"] {
        let v = e[f].as_f64().unwrap();
        e.insert(f.into(), json!(v * (0.5 * z).exp()));
    }
    e
}

#[test]
fn a_calibrated_device_holds_its_false_positive_rate_and_sees_smaller_deviations() {
    // Benign: 360 events after warm-up and calibration. Attack: the device's bytes
    // and load eight times their usual level, a deviation the fixed distance of 6
    // does not reach on this device's own spread.
    let run_device = |cfg: TwinConfig| {
        let mut op = TwinOperator::new(&schema(), cfg);
        let evs: Vec<_> = (0..600).map(|i| (0, i, bursty(i))).collect();
        let v = run(&mut op, batch(&evs));
        let a = col::<BooleanArray>(&v[0], "anomalous");
        let false_positives = (240..600).filter(|&i| a.value(i)).count();
        let mut attack = bursty(600);
        for f in ["tot_bytes", "src_bytes", "load"] {
            let x = attack[f].as_f64().unwrap();
            attack.insert(f.into(), json!(x * 8.0));
        }
        let v = run(&mut op, batch(&[(0, 600, attack)]));
        (false_positives, col::<BooleanArray>(&v[0], "anomalous").value(0), op.store().get(0, "b1").unwrap().clone())
    };
    let (fixed_fp, fixed_caught, _) = run_device(TwinConfig::default());
    let (fp, caught, twin) = run_device(TwinConfig { calibration_events: 200, calibration_fpr: 0.01, ..TwinConfig::default() });
    let c = twin.calibration.as_ref().expect("calibration state");
    let own = c.threshold.expect("calibrated after warm-up + 200 events");
    assert!(c.distances.is_empty());
    assert!(own < 6.0, "this device's own threshold {own} is below the fixed 6");
    assert!(fp <= 7, "{fp} of 360 benign events flagged at a 1 % target (fixed threshold: {fixed_fp})");
    assert!(caught && !fixed_caught, "the calibrated twin sees the deviation, the fixed distance does not");
}

#[test]
fn calibration_settings_shape_features_only_when_on() {
    let off = crate::detect::feature_relevant(&TwinConfig::default());
    assert!(off.get("calibration_events").is_none(), "models trained before calibration existed still load");
    let on = crate::detect::feature_relevant(&TwinConfig { calibration_events: 100, ..TwinConfig::default() });
    assert_eq!(on["calibration_events"], 100);
    assert!(TwinConfig { calibration_fpr: 0.6, ..TwinConfig::default() }.validate().unwrap_err().to_string().contains("calibration_fpr"));
}

/// The runaway the WUSTL capture showed (56 % of its benign flows flagged): a
/// device whose benign traffic settles at a new level after warm-up. A baseline
/// that learned nothing from flagged events kept its old spread and flagged every
/// later event (all 300 here); learning the flagged events' spread (not their
/// level) absorbs the shift within a few events (6 here), while the shift itself
/// is flagged. The price: a sustained deviation of this size is flagged by the
/// twin for its first few events only (the models' members still score it).
#[test]
fn a_benign_level_shift_is_absorbed_not_flagged_for_ever() {
    let mut op = TwinOperator::new(&schema(), TwinConfig::default());
    let evs: Vec<_> = (0..400)
        .map(|i| {
            let mut e = bursty(i);
            if i >= 100 {
                for f in ["tot_bytes", "src_bytes", "load"] {
                    let x = e[f].as_f64().unwrap();
                    e.insert(f.into(), json!(x * 200.0));
                }
            }
            (0, i, e)
        })
        .collect();
    let v = run(&mut op, batch(&evs));
    let a = col::<BooleanArray>(&v[0], "anomalous");
    assert!(a.value(100), "the shift itself is flagged");
    let flagged_after: Vec<usize> = (100..400).filter(|&i| a.value(i)).collect();
    assert!(flagged_after.iter().all(|&i| i < 120), "still flagged long after the shift: {flagged_after:?}");
    let twin = op.store().get(0, "b1").unwrap();
    assert!((twin.anomalies as usize) < 20, "{} events flagged", twin.anomalies);
}

#[test]
fn the_largest_z_scores_come_first_as_a_full_sort_puts_them() {
    let mut seed = 5u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    for trial in 0..400 {
        let n = (next() % 40) as usize;
        // Ties in magnitude (±), zeros and NaN, so the index tie-break decides.
        let zs: Vec<(f64, usize)> = (0..n)
            .map(|i| {
                let z = match next() % 7 {
                    0 => f64::NAN,
                    1 => 0.0,
                    2 => -2.5,
                    3 => 2.5,
                    _ => (next() % 1000) as f64 / 100.0 - 5.0,
                };
                (z, i)
            })
            .collect();
        let mut full = zs.clone();
        full.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()).then(a.1.cmp(&b.1)));
        for k in [0, 1, 3, 5, n / 2, n] {
            let k = k.min(n);
            let mut got = zs.clone();
            crate::twin::largest_first(&mut got, k);
            let bits = |v: &[(f64, usize)]| v.iter().map(|(z, i)| (z.to_bits(), *i)).collect::<Vec<_>>();
            assert_eq!(bits(&got[..k]), bits(&full[..k]), "trial {trial}, n {n}, k {k}");
        }
    }
}
